//! Criterion benches of the request path and the aggregator.
//!
//! `cargo bench --bench hot_path` measures; `cargo test --all-targets` runs each
//! bench once as a smoke test. Figures and method: docs/performance.md.

use std::hint::black_box;
use std::ops::ControlFlow;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use verve::aggregator::Aggregator;
use verve::batch::{Batch, Watermark};
use verve::http;
use verve::record::CountRecord;
use verve::report::Reporter;
use verve::server::query::parse_accept_query;
use verve::sink::CountSink;
use verve::store::LocalStore;
use verve::window::{WindowLength, WindowStart};

const REQUEST: &[u8] = b"GET /api/verve/accept?id=123456789 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n";

const LIMITS: http::Limits = http::Limits::DEFAULT;

fn parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(1));
    group.bench_function("request", |b| {
        b.iter(|| {
            http::parse(black_box(REQUEST), &LIMITS)
                .unwrap()
                .unwrap()
                .len
        })
    });

    let pipelined = REQUEST.repeat(16);
    group.throughput(Throughput::Elements(16));
    group.bench_function("request_pipelined_16", |b| {
        b.iter(|| {
            let framed = http::frame_requests(black_box(&pipelined), &LIMITS, |req| {
                black_box(req.len);
                ControlFlow::Continue(())
            });
            framed.consumed
        })
    });

    group.throughput(Throughput::Elements(1));
    let mut scratch = Vec::new();
    group.bench_function("query_id", |b| {
        b.iter(|| {
            parse_accept_query(black_box(b"id=123456789"), &mut scratch)
                .unwrap()
                .id
        })
    });
    let with_endpoint = b"id=-42&endpoint=http%3A%2F%2F127.0.0.1%3A9000%2Fcallback%3Fx%3D1";
    group.bench_function("query_id_endpoint", |b| {
        b.iter(|| {
            parse_accept_query(black_box(with_endpoint), &mut scratch)
                .unwrap()
                .id
        })
    });
    group.finish();
}

/// Counts nothing: the benches measure the aggregator, not a sink.
struct Discard;

impl CountSink for Discard {
    fn publish(&mut self, record: &CountRecord) {
        black_box(record);
    }
}

/// Pseudo-random ids (xorshift), the same sequence every run.
fn ids(n: usize, range: u64) -> Vec<i64> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % range) as i64
        })
        .collect()
}

fn aggregator(start: SystemTime) -> Aggregator {
    Aggregator::new(
        WindowLength::from_secs(60),
        1,
        start,
        Box::new(LocalStore::new(
            Reporter::new(vec![Box::new(Discard)], None, Default::default()),
            WindowLength::from_secs(60),
        )),
    )
}

/// The one worker passes the window starting at 6,000 s: it closes.
fn close_first(agg: &mut Aggregator) {
    agg.advance(Watermark {
        worker: 0,
        window: WindowStart::from_unix_secs(6_060),
    });
}

fn aggregation(c: &mut Criterion) {
    let mut group = c.benchmark_group("aggregator");
    group.sample_size(10);
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(6_000);
    let window = WindowStart::from_unix_secs(6_000);

    // 1M ids from a range of 2M (so some repeat), in batches of 512 as workers send them.
    let batches: Vec<Batch> = ids(1 << 20, 2 << 20)
        .chunks(512)
        .map(|ids| Batch {
            window,
            ids: ids.to_vec(),
            endpoints: Vec::new(),
        })
        .collect();
    group.throughput(Throughput::Elements(1 << 20));
    let ingest = |agg: &mut Aggregator, batches: Vec<Batch>| {
        for batch in batches {
            agg.ingest(batch);
        }
    };
    group.bench_function("ingest_1m_ids_first_window", |b| {
        b.iter_batched(
            || (aggregator(start), batches.clone()),
            |(mut agg, batches)| {
                ingest(&mut agg, batches);
                agg
            },
            BatchSize::PerIteration,
        )
    });
    // The steady state: the window before was about as busy, so the set is presized.
    let next: Vec<Batch> = batches
        .iter()
        .map(|b| Batch {
            window: WindowStart::from_unix_secs(6_060),
            ids: b.ids.clone(),
            endpoints: Vec::new(),
        })
        .collect();
    group.bench_function("ingest_1m_ids_steady", |b| {
        b.iter_batched(
            || {
                let mut agg = aggregator(start);
                ingest(&mut agg, batches.clone());
                close_first(&mut agg);
                (agg, next.clone())
            },
            |(mut agg, batches)| {
                ingest(&mut agg, batches);
                agg
            },
            BatchSize::PerIteration,
        )
    });

    let distinct: Vec<i64> = (0..1_000_000).collect();
    group.throughput(Throughput::Elements(1_000_000));
    group.bench_function("close_window_of_1m_ids", |b| {
        b.iter_batched(
            || {
                let mut agg = aggregator(start);
                agg.ingest(Batch {
                    window,
                    ids: distinct.clone(),
                    endpoints: Vec::new(),
                });
                agg
            },
            |mut agg| {
                close_first(&mut agg);
                agg
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, parsing, aggregation);
criterion_main!(benches);
