//! One chaos run: start the fleet, send ids while the schedule's faults happen,
//! heal, wait for the fleet to settle, stop it, read every record, check.
//!
//! Faults run one at a time, each no earlier than planned and no earlier than
//! [`Spacing`] allows with the times that really happened (a fault held back
//! moves by whole windows, so a stall planned across a boundary still crosses
//! one). Before Redis loses data, the windows of the last kill must be on the
//! topic. When a run is cut off from Redis (its link held, it or Redis paused),
//! the run notes when its heartbeat lapsed and was renewed, by Redis's clock,
//! which tells a short `complete=true` record's cause.

use std::time::{Duration, Instant, SystemTime};

use verve::window::{WindowLength, WindowStart};

use crate::common::kafka::all_records;
use crate::common::redis_server::sets_per_shard;
use crate::common::{parse_count_line, sleep_until, start_of_next_window};

use super::checker::{check, Content, Cutoff, Published};
use super::clients::Clients;
use super::fleet::{Fleet, TOPIC};
use super::report::Report;
use super::schedule::{draw, name, Fault, Kind, Plan, Spacing};
use super::truth::{Kill, Truth, Undelivered, KILL_HORIZON};

pub const INSTANCES: usize = 3;
pub const WINDOW_SECS: u64 = 3;
/// `VERVE_FLEET_WAIT_MS`, as in the fleet tests: half a window.
pub const FLEET_WAIT_MS: u64 = 1500;
const CLIENTS_PER_INSTANCE: usize = 2;
/// How long the fleet gets to publish the truth once the faults and clients stopped.
const SETTLE: Duration = Duration::from_secs(60);

/// What a run of `secs` seconds draws its schedule for.
pub fn plan(secs: u64) -> Plan {
    Plan {
        instances: INSTANCES,
        window: Duration::from_secs(WINDOW_SECS),
        fleet_wait: Duration::from_millis(FLEET_WAIT_MS),
        run: Duration::from_secs(secs),
    }
}

pub fn run(seed: u64, secs: u64) -> Report {
    let length = WindowLength::from_secs(WINDOW_SECS);
    let window = Duration::from_secs(WINDOW_SECS);
    let plan = plan(secs);
    let schedule = draw(seed, &plan);
    eprintln!("chaos seed={seed} secs={secs}, schedule:");
    for fault in &schedule {
        eprintln!("  {fault}");
    }
    let wait = FLEET_WAIT_MS.to_string();
    let window_secs = WINDOW_SECS.to_string();
    let mut fleet = Fleet::start(
        INSTANCES,
        &[
            ("VERVE_WINDOW_SECS", &window_secs),
            ("VERVE_FLEET_WAIT_MS", &wait),
            ("VERVE_WORKERS", "1"),
        ],
    );
    let first: WindowStart = start_of_next_window(length);
    let origin = first.as_system_time();
    let clients = Clients::start(seed, &fleet.directory, CLIENTS_PER_INSTANCE, window);
    let mut chaos = Chaos {
        fleet: &mut fleet,
        clients: &clients,
        origin,
        length,
        end: origin + plan.run,
        spacing: Spacing::new(&plan),
        events: Vec::new(),
        kills: Vec::new(),
        cutoffs: Vec::new(),
    };
    for fault in &schedule {
        chaos.inflict(fault);
    }
    let (events, kills, cutoffs) = (chaos.events, chaos.kills, chaos.cutoffs);
    sleep_until(origin + plan.run);
    let log = clients.stop();
    let truth = Truth::of(&log, &kills, length);
    let settled = settle(&fleet, &truth);
    let stopped = fleet.stop();
    let mut records: Vec<Published> = all_records(&fleet.tansu.brokers(), TOPIC, SETTLE)
        .into_iter()
        .map(|r| published("topic".into(), r.key, &r.value))
        .collect();
    for (run, verve) in fleet.runs() {
        records.extend(count_log(&run, verve));
    }
    let mut verdict = check(&truth, &records, &cutoffs, origin);
    verdict.failures.extend(stopped);
    let report = Report {
        seed,
        secs,
        schedule,
        events,
        kills,
        origin,
        truth,
        verdict,
        settled,
        records,
    };
    report.save(&fleet);
    report
}

struct Chaos<'a> {
    fleet: &'a mut Fleet,
    clients: &'a Clients,
    origin: SystemTime,
    length: WindowLength,
    /// No fault may last past this.
    end: SystemTime,
    spacing: Spacing,
    events: Vec<String>,
    kills: Vec<Kill>,
    cutoffs: Vec<Cutoff>,
}

impl Chaos<'_> {
    fn inflict(&mut self, fault: &Fault) {
        let window = Duration::from_secs(self.length.as_secs());
        let start = self
            .spacing
            .no_earlier(fault.at, self.spacing.earliest(fault.kind));
        if self.origin + start + fault.lasts + window > self.end {
            self.note(format!("{fault}: skipped, no time left"));
            return;
        }
        sleep_until(self.origin + start);
        if fault.kind.loses_data() {
            if let Some(kill) = self.kills.last() {
                let window = self.length.window_of(kill.at);
                if !self.wait_for_records_up_to(window) {
                    self.note(format!("no record of {window} or the window before it"));
                }
            }
        }
        let began = self.since(SystemTime::now());
        match fault.kind {
            Kind::Stall { instance } => {
                self.fleet.hold_link(instance);
                let lapses = self.lapses(&[instance]);
                sleep_until(self.origin + Duration::from_secs_f64(began) + fault.lasts);
                self.fleet.release_link(instance);
                self.cut_off(began, lapses);
            }
            Kind::Pause { instance } => {
                self.fleet.pause(instance);
                let lapses = self.lapses(&[instance]);
                sleep_until(self.origin + Duration::from_secs_f64(began) + fault.lasts);
                self.fleet.resume(instance);
                self.cut_off(began, lapses);
            }
            Kind::Kill { instance } => {
                let (run, at) = self.fleet.kill(instance);
                let undelivered = self.undelivered(instance, run, at);
                std::thread::sleep(fault.lasts);
                let restarted = SystemTime::now();
                self.kills.push(Kill {
                    instance,
                    run,
                    name: format!("{}#{run}", name(instance)),
                    at,
                    restarted,
                    undelivered,
                });
                self.fleet.restart(instance);
            }
            Kind::RedisRestart => self.fleet.restart_redis(),
            Kind::Flush => self.fleet.flush_redis(),
            Kind::RedisPause => {
                let lapses = self.lapses(&(0..INSTANCES).collect::<Vec<_>>());
                self.fleet.pause_redis();
                std::thread::sleep(fault.lasts);
                self.fleet.resume_redis();
                self.cut_off(began, lapses);
            }
        }
        let ended = self.since(SystemTime::now());
        self.spacing.happened(
            fault.kind,
            Duration::from_secs_f64(began),
            Duration::from_secs_f64(ended),
        );
        self.note(format!("{fault}: ran +{began:.3}s to +{ended:.3}s"));
    }

    /// When the heartbeats of `instances`, just cut off from Redis (or about
    /// to be), expire: read once a heartbeat that was on its way had time to
    /// arrive.
    fn lapses(&self, instances: &[usize]) -> Vec<(usize, Option<SystemTime>)> {
        std::thread::sleep(Duration::from_millis(50));
        instances
            .iter()
            .map(|&i| (i, self.fleet.heartbeat_expiry(i)))
            .collect()
    }

    /// Notes each run of `lapses` whose heartbeat lapsed while it was cut off
    /// from Redis (from `began`), and when its next heartbeat renewed it.
    fn cut_off(&mut self, began: f64, lapses: Vec<(usize, Option<SystemTime>)>) {
        let back = SystemTime::now();
        for (instance, lapses) in lapses {
            let Some(lapsed) = lapses.filter(|l| *l < back) else {
                continue;
            };
            // The renewal, which the forwarder's backoff may put off by a second.
            let deadline = Instant::now() + Duration::from_secs(3);
            while self.fleet.heartbeat_expiry(instance) == Some(lapsed) && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let to = SystemTime::now();
            let name = self.fleet.run_name(instance);
            self.note(format!(
                "{name}'s heartbeat lapsed at +{:.3}s, renewed at +{:.3}s",
                self.since(lapsed),
                self.since(to)
            ));
            self.cutoffs.push(Cutoff {
                name,
                from: self.origin + Duration::from_secs_f64(began),
                lapsed,
                to,
            });
        }
    }

    /// The `ok`s run `run` of `instance`, killed at `at`, answered within
    /// [`KILL_HORIZON`] before, that Redis does not hold (an older id Redis
    /// does not hold may be in a window published before Redis lost it).
    fn undelivered(&self, instance: usize, run: u32, at: SystemTime) -> Vec<Undelivered> {
        // A round the run wrote before it died may still be on its way through
        // the proxy.
        std::thread::sleep(Duration::from_millis(200));
        let oks = self.clients.oks_of(instance, run, at - KILL_HORIZON);
        if oks.is_empty() {
            // Its clients were waiting for it (paused, or the machine busy).
            return Vec::new();
        }
        let mut connection = self.fleet.redis.connection();
        let mut sets = std::collections::BTreeMap::new();
        let mut pipe = redis::pipe();
        for (id, answered) in &oks {
            let window = self.length.window_of(*answered);
            let sets = *sets
                .entry(window)
                .or_insert_with(|| sets_per_shard(&mut connection, window));
            let shards = verve::store::window_shards("verve", window, 1);
            pipe.cmd("SISMEMBER")
                .arg(verve::store::set_of_id(&shards, sets, *id))
                .arg(id);
        }
        let held: Vec<bool> = pipe.query(&mut connection).unwrap();
        let mut undelivered: Vec<Undelivered> = oks
            .iter()
            .zip(held)
            .filter(|(_, held)| !held)
            .map(|((id, answered), _)| Undelivered {
                id: *id,
                window: self.length.window_of(*answered),
                age: at.duration_since(*answered).unwrap_or_default(),
            })
            .collect();
        undelivered.sort_by_key(|u| u.age);
        undelivered
    }

    /// Waits until the topic has a record of `window` and of the one before it
    /// (a killed run's ids are in the fleet's record, not only in Redis), for
    /// [`SETTLE`] at most; returns whether they came.
    fn wait_for_records_up_to(&self, window: WindowStart) -> bool {
        let secs = self.length.as_secs();
        let keys = [
            WindowStart::from_unix_secs(window.unix_secs() - secs).to_string(),
            window.to_string(),
        ];
        let brokers = self.fleet.tansu.brokers();
        let deadline = Instant::now() + SETTLE;
        loop {
            let records = all_records(&brokers, TOPIC, SETTLE);
            if keys.iter().all(|key| records.iter().any(|r| &r.key == key)) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn since(&self, t: SystemTime) -> f64 {
        t.duration_since(self.origin)
            .unwrap_or_default()
            .as_secs_f64()
    }

    fn note(&mut self, event: String) {
        eprintln!("chaos: {event}");
        self.events.push(event);
    }
}

/// Waits until the topic's last record of every window with ids counts at least
/// what it must; gives up after [`SETTLE`] (the check then says what is short).
/// Returns whether it settled.
fn settle(fleet: &Fleet, truth: &Truth) -> bool {
    let deadline = Instant::now() + SETTLE;
    loop {
        let records = all_records(&fleet.tansu.brokers(), TOPIC, SETTLE);
        let settled = truth.windows.iter().all(|(window, t)| {
            let key = window.to_string();
            let last = records
                .iter()
                .filter(|r| r.key == key)
                .max_by_key(|r| r.value["revision"].as_u64());
            t.lower() == 0
                || last.is_some_and(|r| {
                    r.value["unique_requests"].as_u64().unwrap() >= t.lower() - t.allowed()
                })
        });
        if settled {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn published(source: String, window: String, value: &serde_json::Value) -> Published {
    Published {
        source,
        window,
        revision: value["revision"].as_u64().unwrap(),
        content: Content {
            count: value["unique_requests"].as_u64().unwrap(),
            complete: value["complete"].as_bool().unwrap(),
            partial: value["partial"].as_bool().unwrap(),
            instances: value["instances"].as_u64().unwrap(),
            scope: value["scope"].as_str().unwrap().to_owned(),
        },
    }
}

/// The records of a run's count log; a line a kill cut short is left out.
fn count_log(run: &str, verve: &crate::common::Verve) -> Vec<Published> {
    let text = std::fs::read_to_string(&verve.count_log).unwrap_or_default();
    text.lines()
        .filter(|line| line.contains(" published_at="))
        .map(|line| {
            let l = parse_count_line(line);
            Published {
                source: run.to_owned(),
                window: l.window_start,
                revision: l.revision,
                content: Content {
                    count: l.unique_requests,
                    complete: l.complete,
                    partial: l.partial,
                    instances: l.instances,
                    scope: l.scope,
                },
            }
        })
        .collect()
}
