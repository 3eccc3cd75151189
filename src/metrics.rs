//! What `/metrics` and `/healthz` report (served by [`crate::admin`]).
//!
//! Every part keeps its own counters and is the only one to write them: the
//! server's per worker ([`ServerCounters`]: a plain load and store, summed at
//! scrape), the callbacks', the aggregator's, the reporter's, the Redis store's
//! and the shared sinks', each written once per batch, window, callback or round,
//! never per request. [`Telemetry`] holds a handle to each; no part imports this
//! module. A scrape reads all of them into one snapshot, a `prometheus-client`
//! collector, which writes the OpenMetrics text; `/healthz` judges them.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{text, DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::aggregator::AggregatorGauges;
use crate::callback::CallbackCounters;
use crate::journal::JournalGauges;
use crate::record::Timestamp;
use crate::report::ReportCounters;
use crate::server::counters::{ServerCounters, ServerTotals};
use crate::sink::SinkMetrics;
use crate::store::RedisGauges;

/// What `/metrics` and `/healthz` read: each part's own counters, as handles
/// the service hands out at start; every part writes only its own.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// Redis unreachable for longer than this (a window) is unhealthy.
    pub redis_down_limit: Duration,
    /// `VERVE_MAX_CLOCK_SKEW_MS`: in Redis mode, a larger offset from Redis's
    /// clock is unhealthy.
    pub max_clock_skew_ms: u64,
    pub server: ServerCounters,
    pub callbacks: CallbackCounters,
    pub aggregator: Arc<AggregatorGauges>,
    pub report: Arc<ReportCounters>,
    /// Redis mode only: without Redis its buffer capacity stays 0.
    pub redis: Arc<RedisGauges>,
    /// The network sinks', registered as they start.
    pub sinks: SinkMetrics,
    pub journal: Arc<JournalGauges>,
}

/// An aggregator that has not gone round its loop for this long is stalled; a
/// window still open this long after its end is held up by a worker.
const STALLED_AFTER: Duration = Duration::from_secs(5);

impl Telemetry {
    /// `Ok` while the service keeps up; otherwise why not, in a few words.
    pub fn health(&self) -> Result<(), &'static str> {
        let now = Timestamp::now().unix_millis();
        let heartbeat = self.aggregator.heartbeat_ms.load(Ordering::Relaxed);
        if now.saturating_sub(heartbeat) > STALLED_AFTER.as_millis() as u64 {
            return Err("aggregator stalled");
        }
        let due = self.aggregator.next_close_due_ms.load(Ordering::Relaxed);
        if due > 0 && now.saturating_sub(due) > STALLED_AFTER.as_millis() as u64 {
            return Err("a worker is holding up the close of a window");
        }
        // Each store and the journal judge their own gauges.
        self.redis
            .health(now, self.redis_down_limit, self.max_clock_skew_ms)?;
        if self.journal.failing.load(Ordering::Relaxed) {
            return Err("journal cannot be written (disk full?): new ids counted in memory only");
        }
        Ok(())
    }

    /// `/metrics`: the OpenMetrics text of everything, read now.
    pub fn render(&self) -> String {
        let server = self.server.totals();
        let mut scrape = Scrape {
            callbacks: self.callbacks.by_class().collect(),
            single: vec![
                ("verve_ids_accepted", MetricType::Counter, "Ids accepted into a window.", server.ids_accepted),
                ("verve_connections_open", MetricType::Gauge, "Client connections open.", server.connections_open),
                ("verve_connections_refused", MetricType::Counter, "Connections closed at once because their worker held VERVE_MAX_CONNECTIONS.", server.connections_refused),
                ("verve_windows_closed", MetricType::Counter, "Windows closed and reported.", load(&self.aggregator.windows_closed)),
                ("verve_windows_skipped", MetricType::Counter, "Windows without ids skipped, not reported, because the clock jumped forward.", load(&self.aggregator.windows_skipped)),
                ("verve_records_published", MetricType::Counter, "Count records this instance published (in Redis mode, each revision by one instance).", load(&self.report.records_published)),
                ("verve_last_window_unique_requests", MetricType::Gauge, "Unique ids of the last reported window.", load(&self.report.last_window_unique)),
                ("verve_late_ids", MetricType::Counter, "Ids that arrived after their window closed (not counted; a bug if not 0).", load(&self.aggregator.late_ids)),
                ("verve_channel_depth", MetricType::Gauge, "Batches waiting for the aggregator.", load(&self.aggregator.channel_depth)),
                ("verve_channel_depth_peak", MetricType::Gauge, "The most batches ever seen waiting for the aggregator.", load(&self.aggregator.channel_depth_peak)),
                ("verve_aggregator_batch_longest_microseconds", MetricType::Gauge, "The longest time inserting one batch took, since start.", (self.aggregator.batch_times.longest() * 1e6) as u64),
                ("verve_redis_rounds", MetricType::Counter, "Pipelined rounds Redis took.", load(&self.redis.rounds)),
                ("verve_redis_errors", MetricType::Counter, "Failed Redis rounds (retried).", load(&self.redis.errors)),
                ("verve_redis_replays", MetricType::Counter, "Windows sent to Redis again because it had lost this instance's ids.", load(&self.redis.replays)),
                ("verve_redis_buffered_ids", MetricType::Gauge, "Ids waiting for Redis.", load(&self.redis.buffered_ids)),
                ("verve_redis_buffer_capacity_ids", MetricType::Gauge, "VERVE_REDIS_BUFFER_IDS (0 without Redis).", load(&self.redis.buffer_capacity)),
                ("verve_redis_in_fleet", MetricType::Gauge, "1 once the fleet took this instance in (ids get 503 before, and while the fleet refuses it); 0 without Redis.", load(&self.redis.in_fleet)),
                ("verve_redis_lease_lapsed", MetricType::Gauge, "1 while no heartbeat was answered within this instance's lease (most of VERVE_FLEET_WAIT_MS): new ids get 503, as the fleet may no longer wait for it.", load(&self.redis.lease_lapsed)),
                ("verve_redis_epoch_began_ms", MetricType::Gauge, "When the fleet's epoch began, in ms since the Unix epoch by Redis's clock: the fleet's start, or the last time Redis lost its data (alert on a change). Windows that began within VERVE_FLEET_WAIT_MS of it are never published complete=true; 0 without Redis.", load(&self.redis.epoch_began_ms)),
                ("verve_journal_enabled", MetricType::Gauge, "1 while the journal (VERVE_JOURNAL) is on.", load(&self.journal.enabled)),
                ("verve_journal_bytes_written", MetricType::Counter, "Bytes written to the journal.", load(&self.journal.bytes_written)),
                ("verve_journal_ids_written", MetricType::Counter, "Ids written to the journal (each new to this instance in its window).", load(&self.journal.ids_written)),
                ("verve_journal_write_errors", MetricType::Counter, "Journal writes that failed (disk full, file-size limit); retried every second.", load(&self.journal.write_errors)),
                ("verve_journal_unwritten_ids", MetricType::Gauge, "Ids counted in memory but not in the journal because its writes fail.", load(&self.journal.unwritten_ids)),
            ],
            batch_times: self.aggregator.batch_times.snapshot(),
            clock_offset_ms: self.redis.clock_offset_ms.load(Ordering::Relaxed),
            server,
        };
        let sinks = self.sinks.read().into_iter();
        let sinks = sinks.map(|(name, help, value)| (name, MetricType::Counter, help, value));
        scrape.single.extend(sinks);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(scrape));
        let mut out = String::with_capacity(4096);
        text::encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}

/// What one scrape read: the server's totals, the callbacks' classes, and every
/// metric without labels (name, type, help, value). Counters are named without
/// their `_total`, which the encoder adds.
#[derive(Debug)]
struct Scrape {
    server: ServerTotals,
    callbacks: Vec<(&'static str, u64)>,
    single: Vec<(&'static str, MetricType, &'static str, u64)>,
    /// Batch insert times: sum in seconds, count, buckets.
    batch_times: (f64, u64, Vec<(f64, u64)>),
    /// Signed, unlike the rest.
    clock_offset_ms: i64,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let server = &self.server;
        let requests = server.requests.iter().map(|(route, status, n)| {
            let labels = vec![("route", route.to_string()), ("status", status.to_string())];
            (labels, *n)
        });
        counters(
            &mut encoder,
            "verve_requests",
            "Requests answered, by route and status code.",
            requests,
        )?;
        let rejected = [
            ("invalid", server.ids_invalid),
            ("overloaded", server.ids_overloaded),
        ];
        counters(
            &mut encoder,
            "verve_ids_rejected",
            "Ids refused, by reason.",
            rejected.map(|(reason, n)| (vec![("reason", reason.to_owned())], n)),
        )?;
        counters(
            &mut encoder,
            "verve_callbacks",
            "Callbacks, by outcome class.",
            self.callbacks
                .iter()
                .map(|(class, n)| (vec![("class", class.to_string())], *n)),
        )?;
        counters(
            &mut encoder,
            "verve_connections_timed_out",
            "Connections closed for missing a deadline, by what they were waiting for.",
            server
                .connections_timed_out
                .iter()
                .map(|(waiting_for, n)| (vec![("waiting_for", waiting_for.to_string())], *n)),
        )?;
        let (sum, count, buckets) = &self.batch_times;
        encoder
            .encode_descriptor(
                "verve_aggregator_batch_seconds",
                "Time to insert one batch of ids into its window's set (in the aggregator, or an owner thread with VERVE_PARTITIONS > 1).",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?;
        for &(name, kind, help, value) in &self.single {
            let family = encoder.encode_descriptor(name, help, None, kind)?;
            match kind {
                MetricType::Counter => ConstCounter::new(value).encode(family)?,
                _ => ConstGauge::new(value).encode(family)?,
            }
        }
        let family = encoder.encode_descriptor(
            "verve_clock_offset_ms",
            "How far Redis's clock was ahead of this host's at the last heartbeat, in ms (negative: behind; 0 without Redis).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.clock_offset_ms).encode(family)?;
        Ok(())
    }
}

/// A counter family: one sample per label set.
fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, n) in samples {
        ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapes_render_the_workers_and_callbacks() {
        use crate::callback::CallbackOutcome;

        let telemetry = Telemetry::default();
        let (server, callbacks) = (&telemetry.server, &telemetry.callbacks);
        server.record_sample_traffic();
        callbacks.record(CallbackOutcome::Status(204));
        callbacks.record(CallbackOutcome::Status(503));
        callbacks.record(CallbackOutcome::Dropped);
        let text = telemetry.render();
        for line in [
            "verve_requests_total{route=\"accept\",status=\"200\"} 2",
            "verve_requests_total{route=\"accept\",status=\"400\"} 1",
            "verve_requests_total{route=\"accept\",status=\"503\"} 1",
            "verve_requests_total{route=\"other\",status=\"404\"} 1",
            "verve_ids_accepted_total 2",
            "verve_ids_rejected_total{reason=\"invalid\"} 1",
            "verve_ids_rejected_total{reason=\"overloaded\"} 1",
            "verve_connections_timed_out_total{waiting_for=\"idle\"} 0",
            "verve_callbacks_total{class=\"2xx\"} 1",
            "verve_callbacks_total{class=\"5xx\"} 1",
            "verve_callbacks_total{class=\"dropped\"} 1",
            "# TYPE verve_channel_depth gauge",
            "# TYPE verve_aggregator_batch_seconds histogram",
            "verve_aggregator_batch_seconds_count 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }

    #[test]
    fn health_names_what_is_wrong() {
        let now_ms = || Timestamp::now().unix_millis();
        let telemetry = Telemetry {
            redis_down_limit: Duration::from_secs(60),
            max_clock_skew_ms: 1_000,
            ..Telemetry::default()
        };
        telemetry
            .aggregator
            .heartbeat_ms
            .store(now_ms(), Ordering::Relaxed);
        assert_eq!(telemetry.health(), Ok(()));
        // Without Redis there is no clock to compare with.
        telemetry
            .redis
            .clock_offset_ms
            .store(-5_000, Ordering::Relaxed);
        assert_eq!(telemetry.health(), Ok(()));
        telemetry
            .aggregator
            .heartbeat_ms
            .store(now_ms() - 6_000, Ordering::Relaxed);
        assert_eq!(telemetry.health(), Err("aggregator stalled"));
        telemetry
            .aggregator
            .heartbeat_ms
            .store(now_ms(), Ordering::Relaxed);
        telemetry
            .aggregator
            .next_close_due_ms
            .store(now_ms() - 6_000, Ordering::Relaxed);
        assert_eq!(
            telemetry.health(),
            Err("a worker is holding up the close of a window")
        );
        telemetry
            .aggregator
            .next_close_due_ms
            .store(now_ms() + 60_000, Ordering::Relaxed);
        telemetry
            .redis
            .buffer_capacity
            .store(100, Ordering::Relaxed);
        telemetry.redis.buffered_ids.store(91, Ordering::Relaxed);
        assert_eq!(telemetry.health(), Err("dedup buffer over 90%"));
        telemetry.redis.buffered_ids.store(0, Ordering::Relaxed);
        telemetry
            .redis
            .down_since_ms
            .store(now_ms() - 61_000, Ordering::Relaxed);
        assert_eq!(
            telemetry.health(),
            Err("redis unreachable for longer than a window")
        );
        telemetry.redis.down_since_ms.store(0, Ordering::Relaxed);
        assert_eq!(
            telemetry.health(),
            Err("clock off Redis's by more than VERVE_MAX_CLOCK_SKEW_MS")
        );
        for offset in [-1_000, 1_000, 0] {
            telemetry
                .redis
                .clock_offset_ms
                .store(offset, Ordering::Relaxed);
            assert_eq!(telemetry.health(), Ok(()), "{offset}");
        }
        telemetry
            .redis
            .clock_offset_ms
            .store(1_001, Ordering::Relaxed);
        assert!(telemetry.health().is_err());
        telemetry.redis.clock_offset_ms.store(0, Ordering::Relaxed);
        // A lease over before the fleet took the run in is start-up, not trouble.
        telemetry.redis.lease_lapsed.store(1, Ordering::Relaxed);
        assert_eq!(telemetry.health(), Ok(()));
        telemetry.redis.in_fleet.store(1, Ordering::Relaxed);
        assert_eq!(
            telemetry.health(),
            Err("no heartbeat answered within the lease: refusing ids")
        );
    }
}
