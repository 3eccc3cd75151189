//! Every knob of the service, as a command-line flag and a `VERVE_*` environment variable.
//!
//! [`Config`] is the single source of truth: `--help` is generated from it and
//! `docs/configuration.md` mirrors it (a test keeps the two in step). Values are
//! checked here, at start-up, so that a bad one is a one-line error naming the
//! variable rather than a surprise later.

use std::error::Error as _;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::callback::{AllowList, DispatcherSettings};
pub use crate::callback::{CallbackMethod, CallbackTiming};
use crate::http::MAX_HEADERS_CEILING;
use crate::window::WindowLength;

/// Counts unique request ids per time window, thread-per-core.
#[derive(Debug, Clone, Parser)]
#[command(name = "verve", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on; every worker binds it with SO_REUSEPORT.
    #[arg(long, env = "VERVE_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,

    /// Address of the operations listener (/metrics, /healthz); 0.0.0.0:9464 exposes it to other hosts, empty turns it off.
    #[arg(long, env = "VERVE_ADMIN_ADDR", default_value = "127.0.0.1:9464")]
    pub admin_addr: AdminAddr,

    /// `admin_addr` is the default, not chosen by the user: if it is taken
    /// (another instance on this host), a free port is used instead.
    #[arg(skip)]
    pub admin_addr_is_default: bool,

    /// Worker threads, each with its own runtime and listener [default: available cores].
    #[arg(long, env = "VERVE_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,

    /// Length of a counting window in seconds; windows align to multiples of it (UTC).
    #[arg(long, env = "VERVE_WINDOW_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub window_secs: u64,

    /// Where window counts go, comma-separated: log (the count log file), kafka, redis-stream.
    #[arg(
        long,
        env = "VERVE_SINKS",
        value_enum,
        value_delimiter = ',',
        default_value = "log"
    )]
    pub sinks: Vec<SinkKind>,

    /// File that receives one line per closed window with its unique count.
    #[arg(
        long,
        env = "VERVE_COUNT_LOG",
        default_value = "logs/unique-requests.log"
    )]
    pub count_log: PathBuf,

    /// Format of the count log: text (tracing lines, key=value) or json (each line the count record).
    #[arg(long, env = "VERVE_COUNT_LOG_FORMAT", value_enum, default_value_t = CountLogFormat::Text)]
    pub count_log_format: CountLogFormat,

    /// Keep a journal of the ids accepted in each window in VERVE_DATA_DIR, so that a crash or a restart loses none; false keeps them in memory only.
    #[arg(long, env = "VERVE_JOURNAL", default_value_t = true, action = clap::ArgAction::Set)]
    pub journal: bool,

    /// Directory of the journal (one file per window not yet published, and a LOCK); one instance per directory.
    #[arg(long, env = "VERVE_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// When the journal is forced to the disk: batch (after every write), second (once a second), never (when the kernel likes).
    #[arg(long, env = "VERVE_JOURNAL_FSYNC", value_enum, default_value_t = JournalFsync::Second)]
    pub journal_fsync: JournalFsync,

    /// I/O driver of the worker runtimes: epoll (measured faster here), uring, or auto (io_uring when the kernel allows it).
    #[arg(long, env = "VERVE_IO_DRIVER", value_enum, default_value_t = IoDriver::Epoll)]
    pub io_driver: IoDriver,

    /// Ids a worker collects before it hands them to the aggregator as one batch.
    #[arg(long, env = "VERVE_BATCH_IDS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_ids: u32,

    /// Longest a partly filled batch waits before it is sent anyway, in milliseconds.
    #[arg(long, env = "VERVE_FLUSH_MS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=1_000))]
    pub flush_ms: u64,

    /// Batches that may wait for the aggregator; when full, requests get 503.
    #[arg(long, env = "VERVE_QUEUE_BATCHES", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub queue_batches: u32,

    /// Threads that insert ids into the windows' sets, ids split among them by hash; 1 inserts in the aggregator's own thread [default: one per four workers].
    #[arg(long, env = "VERVE_PARTITIONS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub partitions: Option<u16>,

    /// Pin each worker thread to one CPU of those the process may use.
    #[arg(long, env = "VERVE_PIN_WORKERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub pin_workers: bool,

    /// On shutdown, how long open connections may take to finish, in milliseconds.
    #[arg(long, env = "VERVE_SHUTDOWN_DRAIN_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub shutdown_drain_ms: u64,

    /// The whole stop, from the signal to the exit, in milliseconds: the drain, then the last windows to Redis, Kafka and the endpoints; below the orchestrator's grace (docker stop: 10 s, Kubernetes: 30 s).
    #[arg(long, env = "VERVE_SHUTDOWN_TIMEOUT_MS", default_value_t = 8_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub shutdown_timeout_ms: u64,

    /// Connections one worker holds at most; more are closed as they arrive, and counted [default: what the open-file limit allows, at most 25000].
    #[arg(long, env = "VERVE_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: Option<u32>,

    /// Largest request head (request line and header fields) in bytes; larger is answered 431.
    #[arg(long, env = "VERVE_MAX_HEAD_BYTES", default_value_t = 8 * 1024,
          value_parser = clap::value_parser!(u32).range(256..=1_048_576))]
    pub max_head_bytes: u32,

    /// Longest request line in bytes; longer is answered 414.
    #[arg(long, env = "VERVE_MAX_REQUEST_LINE_BYTES", default_value_t = 7 * 1024,
          value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    pub max_request_line_bytes: u32,

    /// Most header fields in a request; more is answered 431.
    #[arg(long, env = "VERVE_MAX_HEADERS", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=MAX_HEADERS_CEILING as i64))]
    pub max_headers: u16,

    /// Largest request body in bytes, read and discarded; larger is answered 413.
    #[arg(long, env = "VERVE_MAX_BODY_BYTES", default_value_t = 4 * 1024,
          value_parser = clap::value_parser!(u32).range(0..=1_048_576))]
    pub max_body_bytes: u32,

    /// Longest a client may take to send a request, from its first byte (or from connecting), in milliseconds; then 408.
    #[arg(long, env = "VERVE_HEAD_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub head_timeout_ms: u64,

    /// How long a keep-alive connection may wait for its next request, in milliseconds.
    #[arg(long, env = "VERVE_IDLE_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub idle_timeout_ms: u64,

    /// Longest a client may leave a response unread before its connection is closed, in milliseconds.
    #[arg(long, env = "VERVE_WRITE_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub write_timeout_ms: u64,

    /// Redis URL (redis://host:port/db) of the store shared by several instances, or in cluster mode seed nodes, comma-separated; unset keeps dedup local.
    #[arg(long, env = "VERVE_REDIS_URL")]
    pub redis_url: Option<String>,

    /// single (one Redis server) or cluster (a Redis Cluster; VERVE_REDIS_URL lists seed nodes); also how the Redis stream is reached.
    #[arg(long, env = "VERVE_REDIS_MODE", value_enum, default_value_t = RedisMode::Single)]
    pub redis_mode: RedisMode,

    /// Prefix of every Redis key, so that deployments can share one Redis.
    #[arg(long, env = "VERVE_REDIS_PREFIX", default_value = "verve")]
    pub redis_prefix: String,

    /// Ids waiting for Redis before new ids are refused with 503.
    #[arg(long, env = "VERVE_REDIS_BUFFER_IDS", default_value_t = 4_000_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub redis_buffer_ids: u64,

    /// Timeout of each Redis connect, read and write, in milliseconds.
    #[arg(long, env = "VERVE_REDIS_TIMEOUT_MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub redis_timeout_ms: u64,

    /// How long after a window ends the fleet waits for every instance before publishing anyway (complete=false), in milliseconds; also how long a silent instance still counts as live, and (less min(VERVE_MAX_CLOCK_SKEW_MS, a quarter of it)) how long an instance cut off from Redis answers ok.
    #[arg(long, env = "VERVE_FLEET_WAIT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub fleet_wait_ms: u64,

    /// Redis mode: the largest difference between this host's clock and Redis's (read at each heartbeat) that is healthy, in milliseconds; past it a warning is logged and /healthz fails (windows are cut by this host's clock).
    #[arg(long, env = "VERVE_MAX_CLOCK_SKEW_MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub max_clock_skew_ms: u64,

    /// Redis sets each window's ids are split over, by a hash of the id, so that Redis Cluster can spread a window over its masters; every instance sharing Redis must use the same number [default: 1 in single mode, 48 in cluster mode].
    #[arg(long, env = "VERVE_REDIS_SHARDS",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub redis_shards: Option<u16>,

    /// This instance's name in the fleet, unique among the instances sharing Redis [default: host name and process id].
    #[arg(long, env = "VERVE_INSTANCE")]
    pub instance: Option<String>,

    /// Test hook, not a setting (hidden from --help): how long a window's keys in Redis live, in seconds, instead of five windows (at least five minutes, four fleet waits), so that tests of what happens after they expire take seconds.
    #[arg(long, env = "VERVE_TEST_KEY_TTL_SECS", hide = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub test_key_ttl_secs: Option<u64>,

    /// Kafka bootstrap servers (host:port,…), for VERVE_SINKS=kafka.
    #[arg(long, env = "VERVE_KAFKA_BROKERS", default_value = "")]
    pub kafka_brokers: String,

    /// Kafka topic that receives one record per window.
    #[arg(
        long,
        env = "VERVE_KAFKA_TOPIC",
        default_value = "verve-unique-requests"
    )]
    pub kafka_topic: String,

    /// Extra librdkafka settings, comma-separated key=value (e.g. linger.ms=5,compression.type=lz4).
    #[arg(long, env = "VERVE_KAFKA_CONFIG", default_value = "")]
    pub kafka_config: KafkaOptions,

    /// How long a record is retried while brokers are unreachable, in milliseconds.
    #[arg(long, env = "VERVE_KAFKA_MESSAGE_TIMEOUT_MS", default_value_t = 600_000,
          value_parser = clap::value_parser!(u64).range(1..=2_147_483_647))]
    pub kafka_message_timeout_ms: u64,

    /// Redis URL (redis://host:port/db) of the stream, for VERVE_SINKS=redis-stream [default: VERVE_REDIS_URL].
    #[arg(long, env = "VERVE_REDIS_STREAM_URL")]
    pub redis_stream_url: Option<String>,

    /// Redis stream that receives one entry per count record.
    #[arg(long, env = "VERVE_REDIS_STREAM", default_value = "verve:counts")]
    pub redis_stream: String,

    /// Entries the stream keeps, trimmed approximately (XADD MAXLEN ~); 100000 is about 69 days of 60 s windows.
    #[arg(long, env = "VERVE_REDIS_STREAM_MAXLEN", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_stream_maxlen: u64,

    /// How endpoints are called: post (JSON body) or get (count as a query parameter).
    #[arg(long, env = "VERVE_CALLBACK_METHOD", value_enum, default_value_t = CallbackMethod::Post)]
    pub callback_method: CallbackMethod,

    /// When endpoints are called: close (once per window with the final count) or immediate (coalesced, count so far).
    #[arg(long, env = "VERVE_CALLBACK_TIMING", value_enum, default_value_t = CallbackTiming::Close)]
    pub callback_timing: CallbackTiming,

    /// Longest a callback may take to connect, in milliseconds.
    #[arg(long, env = "VERVE_CALLBACK_CONNECT_TIMEOUT_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub callback_connect_timeout_ms: u64,

    /// Longest a callback may take in all (connect, send, response), in milliseconds.
    #[arg(long, env = "VERVE_CALLBACK_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub callback_timeout_ms: u64,

    /// Retries after a connection error or a 5xx answer, with doubling backoff; none after a 4xx.
    #[arg(long, env = "VERVE_CALLBACK_RETRIES", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=10))]
    pub callback_retries: u32,

    /// Callbacks that may wait for a free caller; beyond it, callbacks are dropped and counted.
    #[arg(long, env = "VERVE_CALLBACK_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub callback_queue: u32,

    /// Callbacks in flight at once (one thread each).
    #[arg(long, env = "VERVE_CALLBACK_CONCURRENCY", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub callback_concurrency: u16,

    /// Distinct endpoints remembered per window; the excess is counted and logged, not called.
    #[arg(long, env = "VERVE_CALLBACK_MAX_ENDPOINTS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub callback_max_endpoints: u32,

    /// Hosts or CIDRs callbacks may go to, comma-separated; empty allows all.
    #[arg(long, env = "VERVE_CALLBACK_ALLOW", default_value = "")]
    pub callback_allow: AllowList,

    /// Refuse callbacks to loopback, private, link-local and other special-purpose addresses, and to localhost names (names are checked after DNS); false for local setups.
    #[arg(long, env = "VERVE_CALLBACK_DENY_PRIVATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub callback_deny_private: bool,
}

/// Where the operations endpoints listen, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminAddr(pub Option<SocketAddr>);

impl std::str::FromStr for AdminAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" => Ok(AdminAddr(None)),
            addr => addr.parse().map(|addr| AdminAddr(Some(addr))),
        }
    }
}

/// Which kernel interface the worker runtimes use for I/O.
/// Where ids are deduplicated, as the configuration chooses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind<'a> {
    /// Each instance's own sets (no `VERVE_REDIS_URL`).
    Local,
    /// The fleet's Redis, at `url` (one URL, or a cluster's seed nodes).
    Redis { url: &'a str },
}

impl StoreKind<'_> {
    /// Its name in the start-up line.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Local => "local",
            StoreKind::Redis { .. } => "redis",
        }
    }
}

/// A single Redis server, or a Redis Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RedisMode {
    /// One server (or a primary behind a proxy): `VERVE_REDIS_URL` is one URL.
    Single,
    /// A Redis Cluster: `VERVE_REDIS_URL` lists seed nodes, comma-separated.
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoDriver {
    /// epoll, readiness-based I/O.
    Epoll,
    /// io_uring; start-up fails if it is unavailable.
    Uring,
    /// io_uring when the kernel (and seccomp) allow it, epoll otherwise.
    Auto,
}

/// A destination for window counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SinkKind {
    /// The count log file (VERVE_COUNT_LOG).
    Log,
    /// A Kafka topic (VERVE_KAFKA_*).
    Kafka,
    /// A Redis stream (VERVE_REDIS_STREAM*).
    RedisStream,
}

impl SinkKind {
    /// Whether the fleet shares the destination, as [`CountSink::is_shared`] says of
    /// the sink itself, known before any sink is opened.
    ///
    /// [`CountSink::is_shared`]: crate::sink::CountSink::is_shared
    pub fn is_shared(self) -> bool {
        match self {
            SinkKind::Log => false,
            SinkKind::Kafka | SinkKind::RedisStream => true,
        }
    }
}

/// When the journal forces what it wrote to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JournalFsync {
    /// After every write of batches (fdatasync in the aggregator's thread).
    Batch,
    /// Once a second, from a thread of its own.
    Second,
    /// Never: the kernel writes back when it likes (a host crash may lose ~30 s).
    Never,
}

/// How the count log writes a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CountLogFormat {
    /// One `tracing` line per record, its fields as key=value.
    Text,
    /// One JSON document per line: the record, as Kafka and callbacks get it.
    Json,
}

impl Config {
    /// Reads flags and environment. `--help` and `--version` print and exit here.
    pub fn load() -> Result<Config, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    /// As [`Config::load`], with explicit arguments (the environment is still read).
    pub fn load_from<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let fail = |err: clap::Error| match err.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => err.exit(),
            _ => ConfigError(one_line(&err)),
        };
        let matches = Config::command().try_get_matches_from(args).map_err(fail)?;
        let mut config = Config::from_arg_matches(&matches).map_err(fail)?;
        config.admin_addr_is_default =
            matches.value_source("admin_addr") == Some(ValueSource::DefaultValue);
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.redis_url.is_some() && self.fleet_wait_ms < 3 * self.redis_timeout_ms {
            return Err(ConfigError(format!(
                "VERVE_FLEET_WAIT_MS ({}) must be at least three times VERVE_REDIS_TIMEOUT_MS ({}): \
                 an instance must be able to renew its heartbeat within its lifetime even when \
                 a Redis call times out",
                self.fleet_wait_ms, self.redis_timeout_ms
            )));
        }
        if self.shutdown_timeout_ms <= self.shutdown_drain_ms {
            return Err(ConfigError(format!(
                "VERVE_SHUTDOWN_TIMEOUT_MS ({}) must be more than VERVE_SHUTDOWN_DRAIN_MS ({}): \
                 what is left after the drain is when the last windows reach Redis, Kafka and \
                 the endpoints",
                self.shutdown_timeout_ms, self.shutdown_drain_ms
            )));
        }
        if self.max_request_line_bytes + 4 > self.max_head_bytes {
            return Err(ConfigError(format!(
                "VERVE_MAX_REQUEST_LINE_BYTES ({}) must be at least 4 less than \
                 VERVE_MAX_HEAD_BYTES ({}): the head is the request line, its line end, \
                 the headers and an empty line",
                self.max_request_line_bytes, self.max_head_bytes
            )));
        }
        if self.sinks.contains(&SinkKind::Kafka) && self.kafka_brokers.trim().is_empty() {
            return Err(ConfigError(
                "VERVE_SINKS includes kafka but VERVE_KAFKA_BROKERS is empty: set it to host:port[,host:port…]".into(),
            ));
        }
        if self.sinks.contains(&SinkKind::RedisStream) {
            self.redis_stream_url()?;
        }
        Ok(())
    }

    /// Where ids are deduplicated: `VERVE_REDIS_URL` set means the fleet's Redis.
    pub fn store(&self) -> StoreKind<'_> {
        match &self.redis_url {
            None => StoreKind::Local,
            Some(url) => StoreKind::Redis { url },
        }
    }

    /// How the callback dispatcher calls endpoints.
    pub fn dispatcher_settings(&self) -> DispatcherSettings {
        DispatcherSettings {
            queue: self.callback_queue as usize,
            timing: self.callback_timing,
            method: self.callback_method,
            connect_timeout: Duration::from_millis(self.callback_connect_timeout_ms),
            timeout: Duration::from_millis(self.callback_timeout_ms),
            retries: self.callback_retries,
            concurrency: usize::from(self.callback_concurrency),
        }
    }

    /// The Redis of the stream sink, with the variable it came from:
    /// `VERVE_REDIS_STREAM_URL`, else the store's `VERVE_REDIS_URL`.
    pub fn redis_stream_url(&self) -> Result<(&str, &'static str), ConfigError> {
        match (&self.redis_stream_url, &self.redis_url) {
            (Some(url), _) => Ok((url, "VERVE_REDIS_STREAM_URL")),
            (None, Some(url)) => Ok((url, "VERVE_REDIS_URL")),
            (None, None) => Err(ConfigError(
                "VERVE_SINKS includes redis-stream but neither VERVE_REDIS_STREAM_URL nor VERVE_REDIS_URL is set: set one to redis://host:port/db".into(),
            )),
        }
    }

    /// This instance's name in the fleet: as configured, else `<host>-<pid>`.
    pub fn instance_name(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
    }

    /// Worker threads to start: the configured number, else one per available core.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            Some(n) => usize::from(n),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Partitions of the windows' sets: the configured number, else one per four
    /// workers (one aggregator core inserts what about four worker cores accept
    /// 16 deep; unpipelined, far more).
    pub fn partition_count(&self) -> usize {
        match self.partitions {
            Some(n) => usize::from(n),
            None => self.worker_count().div_ceil(4),
        }
    }

    pub fn window_length(&self) -> WindowLength {
        WindowLength::from_secs(self.window_secs)
    }

    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_ms)
    }

    pub fn shutdown_drain(&self) -> Duration {
        Duration::from_millis(self.shutdown_drain_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    pub fn fleet_wait(&self) -> Duration {
        Duration::from_millis(self.fleet_wait_ms)
    }

    /// `VERVE_REDIS_SHARDS`, or its default: a single server gains nothing from
    /// splitting a window; 48 shards split every window evenly over any number of
    /// masters that divides 48 (2, 3, 4, 6, 8, …) and within one shard otherwise.
    pub fn redis_shards(&self) -> usize {
        let default = match self.redis_mode {
            RedisMode::Single => 1,
            RedisMode::Cluster => 48,
        };
        usize::from(self.redis_shards.unwrap_or(default))
    }
}

/// `VERVE_KAFKA_CONFIG`: extra librdkafka settings, as key-value pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaOptions(pub Vec<(String, String)>);

impl std::str::FromStr for KafkaOptions {
    type Err = String;

    fn from_str(list: &str) -> Result<Self, String> {
        let items = list.split(',').map(str::trim).filter(|i| !i.is_empty());
        items
            .map(|item| match item.split_once('=') {
                Some((key, value)) if !key.trim().is_empty() => {
                    Ok((key.trim().to_owned(), value.trim().to_owned()))
                }
                _ => Err(format!("'{item}' is not key=value")),
            })
            .collect::<Result<_, _>>()
            .map(KafkaOptions)
    }
}

/// A configuration problem, as one line that names the variable at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Rewrites a clap error as one line that names both the flag and its variable.
fn one_line(err: &clap::Error) -> String {
    let arg = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => Some(arg.as_str()),
        _ => None,
    };
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(value)) => Some(value.as_str()),
        _ => None,
    };
    match (arg, value) {
        (Some(arg), Some(value)) => {
            let flag = arg.split_whitespace().next().unwrap_or(arg);
            let var = env_var_of(flag).unwrap_or_else(|| flag.to_owned());
            let reason = match (err.source(), err.get(ContextKind::ValidValue)) {
                (Some(source), _) => source.to_string(),
                (None, Some(valid)) => format!("expected one of {valid}"),
                (None, None) => "not accepted".to_owned(),
            };
            format!("invalid value '{value}' for {var} ({flag}): {reason}")
        }
        _ => {
            let text = err.to_string();
            let first = text.lines().next().unwrap_or_default();
            first.trim_start_matches("error: ").to_owned()
        }
    }
}

/// The environment variable behind a long flag such as `--workers`.
fn env_var_of(flag: &str) -> Option<String> {
    let long = flag.strip_prefix("--")?;
    Config::command()
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Result<Config, ConfigError> {
        Config::load_from(std::iter::once("verve").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = load(&[]).unwrap();
        assert_eq!(c.addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.window_secs, 60);
        assert_eq!(c.fleet_wait(), Duration::from_millis(5000));
        assert_eq!(c.count_log_format, CountLogFormat::Text);
        assert_eq!(c.count_log, PathBuf::from("logs/unique-requests.log"));
        assert_eq!(c.io_driver, IoDriver::Epoll);
        assert_eq!(c.sinks, vec![SinkKind::Log]);
        assert_eq!(
            c.admin_addr,
            AdminAddr(Some("127.0.0.1:9464".parse().unwrap()))
        );
        assert_eq!(c.max_connections, None, "taken from the open-file limit");
    }

    #[test]
    fn the_request_line_limit_fits_in_the_head_limit() {
        let limits =
            |line: &str| load(&["--max-head-bytes", "1024", "--max-request-line-bytes", line]);
        assert_eq!(
            limits("1021").unwrap_err().to_string(),
            "VERVE_MAX_REQUEST_LINE_BYTES (1021) must be at least 4 less than \
             VERVE_MAX_HEAD_BYTES (1024): the head is the request line, its line end, \
             the headers and an empty line"
        );
        assert!(limits("1020").is_ok());
    }

    #[test]
    fn a_bad_number_names_the_variable_in_one_line() {
        let err = load(&["--workers", "many"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid value 'many' for VERVE_WORKERS (--workers): invalid digit found in string"
        );
        let err = load(&["--window-secs", "0"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid value '0' for VERVE_WINDOW_SECS (--window-secs): 0 is not in 1..=86400"
        );
    }

    #[test]
    fn a_bad_choice_lists_the_valid_ones() {
        let err = load(&["--io-driver", "kqueue"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid value 'kqueue' for VERVE_IO_DRIVER (--io-driver): expected one of epoll, uring, auto"
        );
    }

    #[test]
    fn the_fleet_wait_outlasts_a_redis_timeout_three_times() {
        let redis = ["--redis-url", "redis://127.0.0.1:6379/0"];
        let err = load(&[&redis[..], &["--fleet-wait-ms", "2999"]].concat()).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "VERVE_FLEET_WAIT_MS (2999) must be at least three times VERVE_REDIS_TIMEOUT_MS (1000)"
            ),
            "{err}"
        );
        assert!(load(&[&redis[..], &["--fleet-wait-ms", "3000"]].concat()).is_ok());
        // Without Redis there is no fleet to wait for.
        assert!(load(&["--fleet-wait-ms", "100"]).is_ok());
    }

    #[test]
    fn kafka_needs_brokers_and_well_formed_settings() {
        let err = load(&["--sinks", "log,kafka"]).unwrap_err().to_string();
        assert!(
            err.starts_with("VERVE_SINKS includes kafka but VERVE_KAFKA_BROKERS is empty"),
            "{err}"
        );
        let err = load(&[
            "--sinks",
            "kafka",
            "--kafka-brokers",
            "h:9092",
            "--kafka-config",
            "linger.ms",
        ])
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "invalid value 'linger.ms' for VERVE_KAFKA_CONFIG (--kafka-config): 'linger.ms' is not key=value"
        );
        let c = load(&[
            "--sinks",
            "kafka",
            "--kafka-brokers",
            "h:9092",
            "--kafka-config",
            "linger.ms=5, acks = all",
        ])
        .unwrap();
        assert_eq!(c.sinks, vec![SinkKind::Kafka]);
        let extra = vec![
            ("linger.ms".to_owned(), "5".to_owned()),
            ("acks".to_owned(), "all".to_owned()),
        ];
        assert_eq!(c.kafka_config, KafkaOptions(extra));
    }

    #[test]
    fn the_redis_stream_needs_a_redis_and_defaults_to_the_stores() {
        let err = load(&["--sinks", "log,redis-stream"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "VERVE_SINKS includes redis-stream but neither VERVE_REDIS_STREAM_URL nor VERVE_REDIS_URL is set: set one to redis://host:port/db"
        );
        let store = [
            "--sinks",
            "redis-stream",
            "--redis-url",
            "redis://store:6379/0",
        ];
        let c = load(&store).unwrap();
        assert_eq!(c.sinks, vec![SinkKind::RedisStream]);
        assert_eq!(
            c.redis_stream_url(),
            Ok(("redis://store:6379/0", "VERVE_REDIS_URL"))
        );
        assert_eq!(
            (c.redis_stream.as_str(), c.redis_stream_maxlen),
            ("verve:counts", 100_000)
        );
        let own = [&store[..], &["--redis-stream-url", "redis://stream:6379/1"]].concat();
        assert_eq!(
            load(&own).unwrap().redis_stream_url(),
            Ok(("redis://stream:6379/1", "VERVE_REDIS_STREAM_URL"))
        );
        // Without the store: a stream of this instance's own counts.
        let c = load(&[
            "--sinks",
            "redis-stream",
            "--redis-stream-url",
            "redis://s:6379/0",
        ])
        .unwrap();
        assert_eq!(c.redis_url, None);
    }

    #[test]
    fn the_stop_must_leave_time_after_the_drain_and_the_journal_is_on_by_default() {
        let c = load(&[]).unwrap();
        assert_eq!((c.shutdown_drain_ms, c.shutdown_timeout_ms), (2_000, 8_000));
        assert_eq!(
            (c.journal, c.data_dir.as_path(), c.journal_fsync),
            (true, std::path::Path::new("data"), JournalFsync::Second)
        );
        let err = load(&["--shutdown-drain-ms", "8000"]).unwrap_err();
        assert_eq!(
            err.0,
            "VERVE_SHUTDOWN_TIMEOUT_MS (8000) must be more than VERVE_SHUTDOWN_DRAIN_MS (8000): \
             what is left after the drain is when the last windows reach Redis, Kafka and \
             the endpoints"
        );
        let off = load(&["--journal", "false", "--journal-fsync", "batch"]).unwrap();
        assert_eq!(
            (off.journal, off.journal_fsync),
            (false, JournalFsync::Batch)
        );
    }

    #[test]
    fn shards_default_by_redis_mode() {
        assert_eq!(load(&[]).unwrap().redis_mode, RedisMode::Single);
        assert_eq!(load(&[]).unwrap().redis_shards(), 1);
        let cluster = ["--redis-mode", "cluster"];
        assert_eq!(load(&cluster).unwrap().redis_shards(), 48);
        let chosen = load(&[&cluster[..], &["--redis-shards", "16"]].concat()).unwrap();
        assert_eq!(chosen.redis_shards(), 16);
        let err = load(&["--redis-mode", "sentinel"]).unwrap_err();
        assert!(err.0.contains("VERVE_REDIS_MODE"), "{}", err.0);
    }
}
