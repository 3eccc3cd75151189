//! The ingest benchmark: producer threads stand in for workers (no network) and
//! send batches of new ids over the bounded channel to the aggregator, which
//! inserts them itself or routes them to its partition owners; it reports new ids
//! per second into the window's set, from the first send to the window's record.
//!
//!   cargo bench --bench ingest -- [--ids N] [--producers 1,2,4,8,16] [--partitions 1,2,4,8]
//!
//! Every combination runs once, in order; each checks that the record counts
//! exactly the ids sent. Figures and method: docs/performance.md. Run by
//! `cargo test --all-targets` (no `--bench`), it sends 200,000 ids from two
//! producers through one and through three partitions, as a smoke test.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use verve::aggregator::Aggregator;
use verve::batch::{Batch, Handoff};
use verve::record::CountRecord;
use verve::report::Reporter;
use verve::sink::CountSink;
use verve::store::LocalStore;
use verve::window::WindowLength;

use common::{new_id, Args};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 512;

/// Remembers the counts it is given.
#[derive(Clone, Default)]
struct Counts(Arc<Mutex<Vec<u64>>>);

impl CountSink for Counts {
    fn publish(&mut self, record: &CountRecord) {
        self.0.lock().unwrap().push(record.unique_requests);
    }
}

/// Sends `ids` distinct ids from `producers` threads through an aggregator with
/// `partitions` partitions; returns the time from the first send until the
/// window's record, after checking that it counts every id.
fn ingest(ids: u64, producers: usize, partitions: usize) -> Duration {
    let counts = Counts::default();
    let reporter = Reporter::new(vec![Box::new(counts.clone())], None, Default::default());
    // An hour's window, so that the run stays within one.
    let length = WindowLength::from_secs(3600);
    let now = SystemTime::now();
    let window = length.window_of(now);
    let store = Box::new(LocalStore::new(reporter, length));
    let aggregator = Aggregator::new(length, producers, now, store)
        .with_partitions(partitions)
        .expect("start the partition owners");
    let (tx, rx) = flume::bounded(1024);
    let started = Instant::now();
    let aggregator = std::thread::spawn(move || aggregator.run(rx));
    let share = ids / producers as u64;
    let threads: Vec<_> = (0..producers as u64)
        .map(|p| {
            let tx = tx.clone();
            let (first, last) = (
                p * share,
                if p + 1 == producers as u64 {
                    ids
                } else {
                    (p + 1) * share
                },
            );
            std::thread::spawn(move || {
                let mut next = first;
                while next < last {
                    let end = (next + BATCH as u64).min(last);
                    let batch = (next..end).map(new_id).collect();
                    next = end;
                    let batch = Batch {
                        window,
                        ids: batch,
                        endpoints: Vec::new(),
                    };
                    tx.send(Handoff::Ids(batch)).expect("aggregator running");
                }
            })
        })
        .collect();
    drop(tx);
    for thread in threads {
        thread.join().unwrap();
    }
    let store = aggregator.join().unwrap();
    let took = started.elapsed();
    store.finish(Instant::now() + Duration::from_secs(1));
    assert_eq!(
        *counts.0.lock().unwrap(),
        vec![ids],
        "one record, every id counted once"
    );
    took
}

fn list(value: Option<String>, default: &[usize]) -> Vec<usize> {
    value.map_or_else(
        || default.to_vec(),
        |v| {
            v.split(',')
                .map(|n| n.parse().expect("a list of numbers"))
                .collect()
        },
    )
}

fn main() {
    let args = Args::from_env();
    if !args.benching() {
        for partitions in [1, 3] {
            ingest(200_000, 2, partitions);
        }
        println!("ingest smoke test: 200,000 ids counted through 1 and 3 partitions");
        return;
    }
    let ids: u64 = args
        .value("--ids")
        .map_or(50_000_000, |v| v.parse().expect("--ids N"));
    let producers = list(args.value("--producers"), &[1, 2, 4, 8, 16]);
    let partitions = list(args.value("--partitions"), &[1, 2, 4, 8]);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("ingest: {ids} new ids per run, one window, {cpus} CPUs");
    for &p in &producers {
        for &parts in &partitions {
            let took = ingest(ids, p, parts);
            println!(
                "producers={p} partitions={parts} seconds={:.2} new_ids_per_second={:.0}",
                took.as_secs_f64(),
                ids as f64 / took.as_secs_f64()
            );
        }
    }
}
