//! The fleet protocol, as this run takes part in it: [`Fleet`], the state that its
//! parts share (this run's name, the settings they derive from, the Lua scripts),
//! and the pipeline that runs their commands.
//!
//! The protocol is described once, in docs/architecture.md ("The fleet
//! protocol": the keys, the steps, and why revisions never repeat). Its parts
//! are `impl Fleet` blocks, one job per file: `keys` (key names, shards),
//! `membership` (heartbeat, leaving, what the run remembers of the fleet),
//! `delivery` (rounds of ids, the `sending` mark) and `settle` (survey, settle,
//! acknowledgements); its decisions (who is awaited, who adopts, who is refused,
//! who resends) are plain functions in `rules`, and the Lua scripts are its
//! atomic steps. Invariants: the fleet's members are runs, one per process
//! (`<instance>/<pid>-<start ms>`), so a restarted instance is a new member; on a
//! cluster no script touches two slots; every key written carries a time to
//! live: window keys `key_ttl_secs`, the registry's and the records
//! `registry_ttl_secs`.

use std::time::Duration;

use redis::{Cmd, RedisResult, Script, Value};

use super::keys::Keys;
use super::membership::Membership;
use super::settle::ACK;
use super::RedisSettings;
use crate::config::RedisMode;
use crate::record::Timestamp;
use crate::redis_link::RedisLink;
use crate::window::WindowLength;

/// The longest between two heartbeats.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The longest between two checks of a window the fleet has not finished.
const POLL: Duration = Duration::from_millis(250);

/// This run's side of the protocol: key names, scripts, what it knows of the
/// fleet. Its fields are shared by the protocol's parts (`keys`, `membership`,
/// `delivery`, `settle`); the forwarder reads only the public ones.
pub(super) struct Fleet {
    pub(super) keys: Keys,
    /// This process's name in the fleet: distinct from an earlier process that ran
    /// under the same instance name.
    pub run: String,
    pub(super) length: WindowLength,
    /// Window keys live this long, in seconds: five windows, at least five
    /// minutes and four fleet waits (longer than any run follows a window), or
    /// the test hook's.
    pub(super) key_ttl_secs: u64,
    /// `VERVE_REDIS_SHARDS`: sets per window.
    pub shards: usize,
    /// One server: a round may be a transaction over all its keys.
    pub(super) atomic: bool,
    /// `count.lua`, for the rounds of a single server.
    pub(super) count: &'static str,
    /// `VERVE_FLEET_WAIT_MS`: the heartbeat's time to live, and how long after a
    /// window's end the fleet waits for every instance.
    pub wait: Duration,
    pub(super) settle: Script,
    pub(super) heartbeat: Script,
    pub(super) leave: Script,
    pub(super) ack: Script,
    pub(super) round: Script,
    pub(super) tally: Script,
    pub(super) roster: Script,
    /// Why this run must not deliver to the fleet (its shards or window length
    /// differ), as of the last heartbeat.
    pub refusal: Option<String>,
    /// How far Redis's clock was ahead of this host's at the last heartbeat, ms.
    pub clock_offset_ms: Option<i64>,
    /// What this run knows of the fleet's members (`membership`).
    pub(super) membership: Membership,
}

impl Fleet {
    pub fn new(settings: &RedisSettings) -> Self {
        let (length, wait) = (settings.length, settings.fleet_wait);
        let (shards, mode, instance) = (settings.shards, settings.mode, &settings.instance);
        // Five windows, at least five minutes and four fleet waits: longer than
        // any run follows a window.
        let default_ttl = (length.as_secs() * 5).max(300).max(4 * wait.as_secs());
        Fleet {
            keys: Keys::new(&settings.prefix, shards, mode),
            run: format!(
                "{instance}/{}-{}",
                std::process::id(),
                Timestamp::now().unix_millis()
            ),
            length,
            key_ttl_secs: settings.key_ttl_secs.unwrap_or(default_ttl),
            shards,
            atomic: mode == RedisMode::Single,
            count: include_str!("count.lua"),
            wait,
            settle: Script::new(include_str!("settle.lua")),
            heartbeat: Script::new(include_str!("heartbeat.lua")),
            leave: Script::new(include_str!("leave.lua")),
            ack: Script::new(ACK),
            round: Script::new(include_str!("round.lua")),
            tally: Script::new(include_str!("tally.lua")),
            roster: Script::new(include_str!("roster.lua")),
            refusal: None,
            clock_offset_ms: None,
            membership: Membership::new(settings.first_window, default_ttl * 1000, wait),
        }
    }

    /// How often to tell the fleet this instance is alive: several times per
    /// heartbeat lifetime, so that one late heartbeat does not drop it.
    pub fn heartbeat_interval(&self) -> Duration {
        HEARTBEAT.min(self.wait / 4)
    }

    /// How often to check a window the fleet has not finished.
    pub fn poll_interval(&self) -> Duration {
        POLL.min(self.wait / 4)
    }

    /// Runs `commands` in one pipeline (one round trip per node), as one
    /// transaction if `atomic`, teaching a node that lacks them the scripts that
    /// pipelines call by hash.
    pub fn pipeline(
        &self,
        link: &mut RedisLink,
        commands: Vec<Cmd>,
        atomic: bool,
    ) -> RedisResult<Vec<Value>> {
        link.pipeline(commands, atomic, &[&self.round, &self.tally, &self.roster])
    }

    /// Warns when Redis (any master of a cluster) may evict keys: an evicted
    /// window set would be counted short. Users without the right to read the
    /// configuration are simply not warned.
    pub fn check_eviction_policy(link: &mut RedisLink) {
        let mut get = redis::cmd("CONFIG");
        get.arg("GET").arg("maxmemory-policy");
        let policies = link.on_every_master(&get).and_then(|answers| {
            answers
                .into_iter()
                .map(|answer| Ok(redis::from_redis_value::<Vec<String>>(answer)?))
                .collect::<RedisResult<Vec<_>>>()
        });
        match policies {
            Ok(policies) => {
                let evicting = policies.iter().find_map(|answer| match answer.as_slice() {
                    [_, policy] if policy != "noeviction" => Some(policy.clone()),
                    _ => None,
                });
                if let Some(policy) = evicting {
                    tracing::warn!(
                        policy = %policy,
                        "Redis may evict keys (maxmemory-policy is not noeviction): a window's ids \
                         evicted before its close are counted short; set maxmemory-policy noeviction"
                    );
                }
            }
            Err(error) => tracing::debug!(%error, "cannot read Redis's maxmemory-policy"),
        }
    }
}

/// An `EVALSHA` of `script` on `keys`, for a pipeline; the caller adds the
/// arguments. A node that does not know the script answers `NOSCRIPT`
/// ([`Fleet::pipeline`] loads it then).
pub(super) fn evalsha(script: &Script, keys: &[String]) -> Cmd {
    let mut call = redis::cmd("EVALSHA");
    call.arg(script.get_hash()).arg(keys.len()).arg(keys);
    call
}
