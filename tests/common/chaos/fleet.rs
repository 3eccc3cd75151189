//! The processes of a chaos run: one redis-server, one tansu broker, N verve
//! instances each reaching Redis through a proxy of its own (so that one link can
//! be held), and the table the client threads read to find each instance's
//! current run. Every fault is a method here; `run.rs` decides when.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::proxy::Proxy;
use crate::common::redis_server::RedisServer;
use crate::common::tansu::Tansu;
use crate::common::{
    command, fleet_env, in_fleet_within, signal, wait_with_deadline, Verve, FLEET_WAIT_MS,
};

use super::schedule::name;

/// Where clients find instance `i` now: its address and run number (0 first,
/// one more per restart), or none while it is down.
pub type Directory = Arc<Vec<Mutex<Option<Target>>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub run: u32,
}

pub const TOPIC: &str = "chaos";

/// How long an instance may take to listen, and then to join the fleet: the
/// machine may be loaded far past its cores (a debug build was seen to take
/// more than 15 s to listen at a load of 14 on two cores).
const START_LIMIT: Duration = Duration::from_secs(60);

pub struct Fleet {
    pub redis: RedisServer,
    pub tansu: Tansu,
    links: Vec<Proxy>,
    env: Vec<(String, String)>,
    /// The current run of each instance (none while it is down), and its number.
    members: Vec<(Option<Verve>, u32)>,
    /// Runs that were killed, kept for their count logs and stderr.
    pub killed: Vec<(String, Verve)>,
    pub directory: Directory,
}

impl Fleet {
    /// Starts Redis, the broker with the topic, and `instances` instances with
    /// `env` (on top of the fleet test defaults and the Kafka sink), each once the
    /// fleet took it in.
    pub fn start(instances: usize, env: &[(&str, &str)]) -> Fleet {
        let redis = RedisServer::start();
        let tansu = Tansu::start();
        tansu.create_topic(TOPIC);
        let mut all: Vec<(String, String)> = vec![
            ("VERVE_SINKS".into(), "log,kafka".into()),
            ("VERVE_KAFKA_BROKERS".into(), tansu.brokers()),
            ("VERVE_KAFKA_TOPIC".into(), TOPIC.into()),
        ];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let links = (0..instances).map(|_| Proxy::start(redis.port)).collect();
        let directory = Arc::new((0..instances).map(|_| Mutex::new(None)).collect());
        let mut fleet = Fleet {
            redis,
            tansu,
            links,
            env: all,
            members: (0..instances).map(|_| (None, 0)).collect(),
            killed: Vec::new(),
            directory,
        };
        for i in 0..instances {
            fleet.launch(i);
        }
        fleet
    }

    /// Starts instance `i` (its next run) and tells the clients where it is.
    fn launch(&mut self, i: usize) {
        let url = format!("redis://127.0.0.1:{}/0", self.links[i].port);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let wait = FLEET_WAIT_MS.to_string();
        let command = command(&fleet_env(&url, &name(i), &wait, &env));
        let verve = in_fleet_within(
            Verve::spawn_within(command, START_LIMIT),
            &name(i),
            START_LIMIT,
        );
        let run = self.members[i].1;
        *self.directory[i].lock().unwrap() = Some(Target {
            addr: verve.addr,
            run,
        });
        self.members[i].0 = Some(verve);
    }

    /// The name of instance `i`'s current run (`b#1`).
    pub fn run_name(&self, i: usize) -> String {
        format!("{}#{}", name(i), self.members[i].1)
    }

    fn member(&mut self, i: usize) -> &mut Verve {
        self.members[i].0.as_mut().expect("instance running")
    }

    pub fn hold_link(&self, i: usize) {
        self.links[i].hold();
    }

    pub fn release_link(&self, i: usize) {
        self.links[i].release();
    }

    pub fn pause(&mut self, i: usize) {
        signal(self.member(i).child(), libc::SIGSTOP);
    }

    pub fn resume(&mut self, i: usize) {
        signal(self.member(i).child(), libc::SIGCONT);
    }

    /// SIGKILL; returns once the process is gone, with the run killed and when
    /// the signal went (on a loaded machine the process may take a second to go:
    /// it answered nothing after the signal).
    pub fn kill(&mut self, i: usize) -> (u32, SystemTime) {
        *self.directory[i].lock().unwrap() = None;
        let mut verve = self.members[i].0.take().expect("instance running");
        let signalled = SystemTime::now();
        verve.kill();
        let run = self.members[i].1;
        self.killed.push((format!("{}#{run}", name(i)), verve));
        self.members[i].1 += 1;
        (run, signalled)
    }

    /// Starts instance `i` again, under the same name.
    pub fn restart(&mut self, i: usize) {
        self.launch(i);
    }

    /// When instance `i`'s current run's heartbeat expires, by Redis's clock, as
    /// the fleet's registry holds it (none if it is not there).
    pub fn heartbeat_expiry(&self, i: usize) -> Option<SystemTime> {
        let runs: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg("verve:{fleet}:instances")
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query(&mut self.redis.connection())
            .unwrap();
        let prefix = format!("{}/", name(i));
        let latest = runs
            .into_iter()
            .filter(|(run, _)| run.starts_with(&prefix))
            .map(|(_, expiry)| expiry as u64)
            .max()?;
        Some(UNIX_EPOCH + Duration::from_millis(latest))
    }

    pub fn restart_redis(&mut self) {
        self.redis.restart();
    }

    pub fn flush_redis(&self) {
        let _: () = redis::cmd("FLUSHALL")
            .query(&mut self.redis.connection())
            .unwrap();
    }

    pub fn pause_redis(&self) {
        self.signal_redis(libc::SIGSTOP);
    }

    pub fn resume_redis(&self) {
        self.signal_redis(libc::SIGCONT);
    }

    fn signal_redis(&self, signal: i32) {
        let pid = self.redis.pid().expect("redis-server running");
        // SAFETY: kill(2) with the pid of a child we own and a valid signal number.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
    }

    /// Stops every running instance with SIGTERM, at once, and waits for them;
    /// returns what went wrong (an exit status other than success).
    pub fn stop(&mut self) -> Vec<String> {
        for (verve, _) in &mut self.members {
            if let Some(verve) = verve {
                signal(verve.child(), libc::SIGTERM);
            }
        }
        let mut problems = Vec::new();
        for (i, (verve, run)) in self.members.iter_mut().enumerate() {
            if let Some(verve) = verve {
                let status = wait_with_deadline(verve.child(), Duration::from_secs(30));
                if !status.success() {
                    problems.push(format!("{}#{run} stopped with {status}", name(i)));
                }
            }
        }
        problems
    }

    /// Every run, killed or not, by name (`b#1`: b's second run).
    pub fn runs(&self) -> Vec<(String, &Verve)> {
        let killed = self.killed.iter().map(|(n, v)| (n.clone(), v));
        let live = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(i, (v, run))| v.as_ref().map(|v| (format!("{}#{run}", name(i)), v)));
        killed.chain(live).collect()
    }
}
