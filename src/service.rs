//! Starting and stopping the whole service: workers, aggregator and sinks.
//!
//! [`Verve::start`] returns once every worker listens, so a caller (the binary, or a
//! test) can connect at once; [`Verve::shutdown`] returns once every accepted id
//! has been counted and every window reported, or at its deadline
//! (`VERVE_SHUTDOWN_TIMEOUT_MS` after it was called), whatever Redis, Kafka and the
//! callback endpoints are doing.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use clap::ValueEnum;

use crate::admin::{AdminError, AdminListener};
use crate::admission::Admission;
use crate::aggregator::{Aggregator, AggregatorGauges};
use crate::callback::{CallbackPolicy, Dispatcher};
use crate::config::{CallbackTiming, Config, SinkKind, StoreKind};
use crate::error::StartError;
use crate::journal::Journal;
use crate::metrics::Telemetry;
use crate::redis_link::RedisEndpoint;
use crate::report::Reporter;
use crate::server::file_limit::{self, ConnectionCap};
use crate::server::{claim_address, ClientLimits, Driver, Intake, Workers};
use crate::sink::{
    kafka, redis_stream, Acknowledged, Acks, CountSink, KafkaSettings, KafkaSink, LogSink,
    RedisStreamSettings,
};
use crate::store::{DedupStore, LocalStore, RedisSettings, RedisStore};

/// Raises the open-file limit as far as allowed and settles the connection cap on
/// it; warns when a cap the operator set needs more files than the limit allows.
fn settle_connection_cap(config: &Config) -> (ConnectionCap, Option<u64>) {
    let open_files = match file_limit::raise_to_hard_limit() {
        Ok(limit) => Some(limit),
        Err(err) => {
            tracing::warn!(error = %err, "cannot read or raise the open-file limit");
            None
        }
    };
    let cap = file_limit::connection_cap(config.max_connections, config.worker_count(), open_files);
    if cap.short_of_files {
        tracing::warn!(
            open_files,
            max_connections = cap.per_worker,
            workers = config.worker_count(),
            "the open-file limit is below VERVE_MAX_CONNECTIONS × workers, so accepting \
             fails before the cap applies; raise it (ulimit -n, docker run --ulimit nofile=…) \
             or lower VERVE_MAX_CONNECTIONS (unset, it follows the limit)"
        );
    }
    (cap, open_files)
}

/// A running service.
pub struct Verve {
    addr: SocketAddr,
    workers: Workers,
    /// Serves `/metrics` and `/healthz`, unless turned off.
    admin: Option<AdminListener>,
    /// Returns the dedup store once every window is closed, for it to finish reporting.
    aggregator: JoinHandle<Box<dyn DedupStore>>,
    dispatcher: Dispatcher,
    /// `VERVE_SHUTDOWN_TIMEOUT_MS`.
    stop_within: Duration,
}

impl Verve {
    /// Starts the service as configured.
    pub fn start(config: &Config) -> Result<Verve, StartError> {
        let driver = Driver::resolve(config.io_driver)?;
        let callback_policy =
            CallbackPolicy::new(config.callback_allow.clone(), config.callback_deny_private);
        // Each part gets its own counters; /metrics and /healthz read them all.
        let telemetry = Arc::new(Telemetry {
            redis_down_limit: Duration::from_secs(config.window_secs),
            max_clock_skew_ms: config.max_clock_skew_ms,
            aggregator: Arc::new(AggregatorGauges::starting_now()),
            ..Telemetry::default()
        });
        // First: a journal that cannot be used stops start-up before anything is
        // opened or registered in Redis.
        let journal = match config.journal {
            true => Some(Journal::open(
                &config.data_dir,
                config.window_length(),
                config.journal_fsync,
                telemetry.journal.clone(),
            )?),
            false => None,
        };

        // The shared sinks' acknowledgements, for the Redis store to note for the fleet.
        let (acks, acknowledged) = flume::unbounded();
        let in_fleet = matches!(config.store(), StoreKind::Redis { .. });
        let sinks = open_sinks(config, &telemetry, in_fleet.then_some(&acks))?;
        drop(acks);
        let claimed = claim_address(config.addr)?;
        let addr = claimed.addr;
        let admin = match config.admin_addr.0 {
            Some(admin_addr) => Some(start_admin(
                admin_addr,
                config.admin_addr_is_default,
                &telemetry,
            )?),
            None => None,
        };
        let (callbacks, dispatcher) = Dispatcher::start(
            &config.dispatcher_settings(),
            callback_policy.clone(),
            telemetry.callbacks.clone(),
        )
        .map_err(StartError::Thread)?;
        let (at_close, immediate) = match config.callback_timing {
            CallbackTiming::Close => (Some(callbacks), None),
            CallbackTiming::Immediate => (None, Some(callbacks)),
        };
        let reporter = Reporter::new(sinks, at_close, telemetry.report.clone());
        let admission = Admission::default();
        // Taken before any worker accepts, so no request predates the first window,
        // and before the Redis store registers this instance with its first window.
        let started_at = SystemTime::now();
        let first_window = config.window_length().window_of(started_at);
        let store: Box<dyn DedupStore> = match config.store() {
            StoreKind::Local => Box::new(LocalStore::new(reporter, config.window_length())),
            StoreKind::Redis { url } => {
                let settings = RedisSettings {
                    mode: config.redis_mode,
                    url: url.to_owned(),
                    prefix: config.redis_prefix.clone(),
                    buffer_ids: config.redis_buffer_ids as usize,
                    timeout: Duration::from_millis(config.redis_timeout_ms),
                    instance: config.instance_name(),
                    length: config.window_length(),
                    fleet_wait: config.fleet_wait(),
                    key_ttl_secs: config.test_key_ttl_secs,
                    max_clock_skew: Duration::from_millis(config.max_clock_skew_ms),
                    first_window,
                    shards: config.redis_shards(),
                    acks: Some(acknowledged),
                    redeliver_after: config.fleet_wait() + config.shutdown_timeout(),
                    journal_dir: config.journal.then(|| config.data_dir.clone()),
                };
                Box::new(
                    RedisStore::start(
                        settings,
                        reporter,
                        admission.clone(),
                        telemetry.redis.clone(),
                    )
                    .map_err(StartError::Store)?,
                )
            }
        };

        let (cap, open_files) = settle_connection_cap(config);
        let client_limits = ClientLimits::from_config(config, cap.per_worker);
        let (handoffs, received) = flume::bounded(config.queue_batches as usize);
        let intake = Intake {
            handoffs,
            first_window,
            admission,
        };
        let workers = Workers::start(
            config,
            addr,
            driver,
            client_limits,
            &callback_policy,
            &telemetry.server,
            &intake,
        )?;
        // The workers listen on the address now; it needs no holding any more.
        drop(claimed);
        // From here on only the workers hold senders: when they are gone, the
        // aggregator knows every batch has arrived.
        drop(intake);

        let aggregator = Aggregator::new(
            config.window_length(),
            config.worker_count(),
            started_at,
            store,
        )
        .with_endpoints(config.callback_max_endpoints as usize, immediate)
        .with_gauges(telemetry.aggregator.clone())
        .with_partitions(config.partition_count())
        .map(|aggregator| match journal {
            Some((journal, recovered)) => aggregator.with_journal(journal, recovered),
            None => aggregator,
        });
        let aggregator = match aggregator.and_then(|aggregator| {
            std::thread::Builder::new()
                .name("verve-aggregator".into())
                .spawn(move || aggregator.run(received))
        }) {
            Ok(thread) => thread,
            Err(err) => {
                workers.stop();
                return Err(StartError::Thread(err));
            }
        };

        tracing::info!(
            version = %env!("CARGO_PKG_VERSION"),
            %addr,
            admin = %admin.as_ref().map_or("off".to_owned(), |a| a.local_addr().to_string()),
            workers = config.worker_count(),
            io_driver = %driver,
            store = config.store().name(),
            sinks = %names(&config.sinks),
            callback_method = %names(&[config.callback_method]),
            callback_timing = %names(&[config.callback_timing]),
            window_secs = config.window_secs,
            count_log = %config.count_log.display(),
            journal = %match config.journal {
                true => config.data_dir.display().to_string(),
                false => "off".to_owned(),
            },
            max_connections = cap.per_worker,
            open_files = open_files.unwrap_or_default(),
            "verve listening"
        );
        Ok(Verve {
            addr,
            workers,
            admin,
            aggregator,
            dispatcher,
            stop_within: config.shutdown_timeout(),
        })
    }

    /// The address the workers listen on, with the real port if 0 was configured.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address `/metrics` and `/healthz` are served on, if they are.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminListener::local_addr)
    }

    /// Stops accepting, drains connections (for at most `VERVE_SHUTDOWN_DRAIN_MS`),
    /// counts every accepted id, reports the open window as partial, and lets the
    /// store, the sinks and the callbacks deliver what they can until
    /// `VERVE_SHUTDOWN_TIMEOUT_MS` from now; returns by then, with the number of
    /// ids Redis did not take (kept in the journal if it is on).
    pub fn shutdown(self) -> u64 {
        let deadline = Instant::now() + self.stop_within;
        self.workers.stop();
        let undelivered = match self.aggregator.join() {
            Ok(store) => store.finish(deadline),
            Err(_) => {
                tracing::error!("the aggregator panicked; the last windows may be unreported");
                0
            }
        };
        self.dispatcher.finish(deadline);
        drop(self.admin);
        undelivered
    }
}

/// The operations listener on `addr`. If `addr` is the default, not chosen, and
/// already taken (a second instance on this host, the usual first try of a fleet),
/// a free port of the same interface instead, said in a warning: the service must
/// not fail to start over a listener nobody asked for by name.
fn start_admin(
    addr: SocketAddr,
    is_default: bool,
    telemetry: &Arc<Telemetry>,
) -> Result<AdminListener, AdminError> {
    match AdminListener::start(addr, telemetry.clone()) {
        Err(AdminError::Bind { source, .. })
            if is_default && source.kind() == io::ErrorKind::AddrInUse =>
        {
            let free = SocketAddr::new(addr.ip(), 0);
            let listener = AdminListener::start(free, telemetry.clone())?;
            tracing::warn!(
                taken = %addr,
                admin = %listener.local_addr(),
                "the default address for /metrics and /healthz is taken (another instance on this host?): listening on a free port instead; set VERVE_ADMIN_ADDR to choose one"
            );
            Ok(listener)
        }
        started => started,
    }
}

/// Choices as they are written in flags and variables, e.g. `log,kafka`.
fn names<T: ValueEnum>(choices: &[T]) -> String {
    let name = |c: &T| {
        c.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    };
    choices.iter().map(name).collect::<Vec<_>>().join(",")
}

/// The sinks `VERVE_SINKS` names, in its order.
/// In Redis mode, the shared sinks' acknowledgements go to `acks`, for the fleet to
/// note: a record's, once every shared sink took it.
fn open_sinks(
    config: &Config,
    telemetry: &Arc<Telemetry>,
    acks: Option<&flume::Sender<Acknowledged>>,
) -> Result<Vec<Box<dyn CountSink>>, StartError> {
    let shared = config.sinks.iter().filter(|kind| kind.is_shared()).count();
    let acks = acks.map(|fleet| Acks::new(fleet.clone(), shared));
    let mut sinks: Vec<Box<dyn CountSink>> = Vec::new();
    for kind in &config.sinks {
        match kind {
            SinkKind::Log => {
                let sink = LogSink::open(&config.count_log, config.count_log_format);
                sinks.push(Box::new(sink.map_err(StartError::sink)?));
            }
            SinkKind::Kafka => {
                let settings = KafkaSettings {
                    brokers: config.kafka_brokers.clone(),
                    topic: config.kafka_topic.clone(),
                    message_timeout: Duration::from_millis(config.kafka_message_timeout_ms),
                    extra: config.kafka_config.0.clone(),
                };
                let counters = telemetry.sinks.register(kafka::METRICS);
                let sink = KafkaSink::new(&settings, counters, acks.clone());
                sinks.push(Box::new(sink.map_err(StartError::sink)?));
            }
            SinkKind::RedisStream => {
                let (url, variable) = config.redis_stream_url()?;
                let timeout = Duration::from_millis(config.redis_timeout_ms);
                let endpoint = RedisEndpoint::open(config.redis_mode, url, variable, timeout)
                    .map_err(StartError::sink)?;
                let settings = RedisStreamSettings {
                    stream: config.redis_stream.clone(),
                    maxlen: config.redis_stream_maxlen,
                    timeout: Duration::from_millis(config.redis_timeout_ms),
                };
                let sink = redis_stream::start(
                    endpoint,
                    settings,
                    telemetry.sinks.register(redis_stream::METRICS),
                    acks.clone(),
                );
                sinks.push(Box::new(sink.map_err(StartError::Thread)?));
            }
        }
    }
    Ok(sinks)
}
