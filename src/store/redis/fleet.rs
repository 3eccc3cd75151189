//! The fleet protocol, as this run takes part in it: [`Fleet`], the state that its
//! parts share (this run's name, the settings they derive from, the Lua scripts),
//! and the pipeline that runs their commands.
//!
//! The protocol is described once, in docs/architecture.md ("The fleet
//! protocol": the keys, the steps, and why revisions never repeat). Its parts
//! are `impl Fleet` blocks, one job per file: `keys` (key names, shards, sets),
//! `membership` (heartbeat, leaving, what the run remembers of the fleet),
//! `delivery` (rounds of ids split into each window's sets, the `sending`
//! mark) and `settle` (survey, settle,
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
use super::rules;
use super::sets::SetCounts;
use super::settle::ACK;
use super::RedisSettings;
use crate::config::RedisMode;
use crate::record::Timestamp;
use crate::redis_link::RedisLink;
use crate::window::{WindowLength, WindowStart};

/// The longest between two heartbeats.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The longest between two checks of a window the fleet has not finished.
const POLL: Duration = Duration::from_millis(250);

/// Redis's default `set-max-intset-entries`.
const DEFAULT_INTSET_LIMIT: u64 = 512;

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
    /// `VERVE_REDIS_SHARDS`: shards per window.
    pub shards: usize,
    /// How many sets each shard of recent windows is split into.
    pub(super) sets: SetCounts,
    /// Redis keeps sets of up to this many integers as intsets
    /// (`set-max-intset-entries`; its default until read).
    pub intset_limit: u64,
    /// Live runs at the last heartbeat (this one included): the fleet's
    /// traffic is about this many times this run's.
    pub live_runs: usize,
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
            sets: SetCounts::default(),
            intset_limit: DEFAULT_INTSET_LIMIT,
            live_runs: 1,
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

    /// How often to check `window` while the fleet has not finished it: a
    /// quarter of the fleet's wait, at most [`POLL`], and less often for a
    /// window of many sets, whose survey costs Redis more
    /// ([`rules::poll_interval`]).
    pub fn poll_interval(&self, window: WindowStart) -> Duration {
        let sets = u64::from(self.sets.of(window, 0)) * self.shards as u64;
        rules::poll_interval(POLL.min(self.wait / 4), sets)
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

    /// Reads the settings of Redis (every master of a cluster) that counts
    /// depend on: warns when it may evict keys (an evicted window set would be
    /// counted short), and learns how large a set it keeps compact
    /// (`set-max-intset-entries`, the least of the masters'), saying how many
    /// ids a window then holds at about 8 bytes each. Users without the right
    /// to read the configuration (managed services often refuse `CONFIG`) are
    /// told once, and Redis's defaults are assumed.
    pub fn check_settings(&mut self, link: &mut RedisLink) {
        match config_get(link, "maxmemory-policy") {
            Ok(policies) => {
                if let Some(policy) = policies.iter().find(|policy| *policy != "noeviction") {
                    tracing::warn!(
                        policy = %policy,
                        "Redis may evict keys (maxmemory-policy is not noeviction): a window's ids \
                         evicted before its close are counted short; set maxmemory-policy noeviction"
                    );
                }
            }
            Err(error) => tracing::debug!(%error, "cannot read Redis's maxmemory-policy"),
        }
        let limits = config_get(link, "set-max-intset-entries").map(|limits| {
            limits
                .iter()
                .filter_map(|limit| limit.parse::<u64>().ok())
                .min()
        });
        match limits {
            Ok(Some(limit)) => {
                self.intset_limit = limit;
                let sets = rules::sets_per_shard(u64::MAX, self.shards, limit);
                let compact = u64::from(sets) * self.shards as u64 * limit;
                tracing::info!(
                    set_max_intset_entries = limit,
                    compact_ids_per_window = compact,
                    "Redis keeps a window compact (about 8 bytes per id) up to this many ids; \
                     raise set-max-intset-entries (8192 suits most) for more"
                );
            }
            Ok(None) | Err(_) => tracing::info!(
                "cannot read Redis's set-max-intset-entries (CONFIG GET refused): assuming its \
                 default, 512; if it was raised, windows are split into more sets than needed"
            ),
        }
    }
}

impl Fleet {
    /// Says when `window`'s `count` ids outgrew what its sets keep compact
    /// (more per set than `set-max-intset-entries`): Redis then holds them at
    /// about 72 bytes each rather than 8. A window far busier than the one
    /// before it does this; so does a low `set-max-intset-entries`.
    pub fn warn_if_not_compact(&self, window: WindowStart, count: u64) {
        if !self.sets.knows(window) {
            return;
        }
        let sets = u64::from(self.sets.of(window, 0)) * self.shards as u64;
        let compact = sets * self.intset_limit;
        if count > compact {
            tracing::warn!(
                window_start = %window,
                unique_requests = count,
                sets,
                set_max_intset_entries = self.intset_limit,
                "a window held more ids than its sets keep compact in Redis (about 72 bytes per \
                 id instead of 8): it was far busier than the one before it, or \
                 set-max-intset-entries is low (8192 suits most)"
            );
        }
    }
}

/// `CONFIG GET name` on every master: each one's value.
fn config_get(link: &mut RedisLink, name: &str) -> RedisResult<Vec<String>> {
    let mut get = redis::cmd("CONFIG");
    get.arg("GET").arg(name);
    link.on_every_master(&get)?
        .into_iter()
        .map(|answer| {
            let pair: Vec<String> = redis::from_redis_value(answer)?;
            Ok(pair.into_iter().nth(1).unwrap_or_default())
        })
        .collect()
}

/// An `EVALSHA` of `script` on `keys`, for a pipeline; the caller adds the
/// arguments. A node that does not know the script answers `NOSCRIPT`
/// ([`Fleet::pipeline`] loads it then).
pub(super) fn evalsha(script: &Script, keys: &[String]) -> Cmd {
    let mut call = redis::cmd("EVALSHA");
    call.arg(script.get_hash()).arg(keys.len()).arg(keys);
    call
}
