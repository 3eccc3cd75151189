//! The stall benchmark: one window's set grown to N new ids in process, in batches
//! of 512 as the aggregator receives them, reporting the longest single batch and
//! the memory per id at its worst.
//!
//!   cargo bench --bench set_growth -- [--ids N] [--set verve|verve-presized|scc|std|std-presized] [--thp]
//!
//! Transparent huge pages are off for the process, as the verve binary has them,
//! unless `--thp` is given.
//!
//! `verve` is the window set ([`IdSet`]), `verve-presized` the same laid out for N
//! ids from the start (as a window is after one of the same size); `scc` is
//! `scc::HashSet` as it was used before; `std` is std's `HashSet` (hashbrown) with
//! the same foldhash, and `std-presized` the same with room for N ids from the
//! start. Memory is the process's resident set above what it was before the set
//! existed, sampled every 64 batches; "worst" is the highest ratio of that to the
//! ids held at any sample from a million ids on (below that, the allocator's own
//! pages dominate), and for `verve` also the set's own count of bytes allocated.
//! Times are the thread's CPU time (this machine is shared; wall time would count
//! the time other processes held the core), with the wall time of the longest
//! batch beside. Figures and method: docs/performance.md. Run by `cargo test
//! --all-targets` (no `--bench`), it grows a verve set to a million ids and checks
//! the count, as a smoke test.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use verve::store::IdSet;

use common::{new_id, Args};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 512;

/// What the benchmark grows.
trait Grown {
    /// Inserts a batch; returns how many ids were new.
    fn insert_batch(&mut self, ids: &[i64]) -> u64;
    /// Bytes the set says it holds, if it can.
    fn allocated(&self) -> Option<usize> {
        None
    }
}

impl Grown for IdSet {
    fn insert_batch(&mut self, ids: &[i64]) -> u64 {
        self.insert_all(ids, |_| {})
    }
    fn allocated(&self) -> Option<usize> {
        Some(self.allocated_bytes())
    }
}

impl Grown for scc::HashSet<i64, foldhash::fast::RandomState> {
    fn insert_batch(&mut self, ids: &[i64]) -> u64 {
        ids.iter()
            .filter(|&&id| self.insert_sync(id).is_ok())
            .count() as u64
    }
}

impl Grown for HashSet<i64, foldhash::fast::RandomState> {
    fn insert_batch(&mut self, ids: &[i64]) -> u64 {
        ids.iter().filter(|&&id| self.insert(id)).count() as u64
    }
}

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `now` is.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

struct Growth {
    ids: u64,
    new: u64,
    took: Duration,
    took_cpu: Duration,
    /// CPU time of the thread: what the insert cost, without the time another
    /// process held the core (this machine is shared).
    longest: Duration,
    longest_at: u64,
    /// Wall time, preemption included.
    longest_wall: Duration,
    /// Batches that took more than a millisecond of CPU.
    over_1ms: u64,
    worst_rss_per_id: f64,
    worst_allocated_per_id: Option<f64>,
    final_rss_per_id: f64,
}

/// Grows `set` with `n` distinct pseudo-random ids (a bijection of 0..n, so no
/// repeats and no table of them to keep).
fn grow(set: &mut dyn Grown, n: u64) -> Growth {
    let base = resident_bytes();
    let mut batch = Vec::with_capacity(BATCH);
    let (mut new, mut longest, mut longest_at) = (0, Duration::ZERO, 0);
    let (mut longest_wall, mut over_1ms) = (Duration::ZERO, 0);
    let (mut worst_rss, mut worst_allocated) = (0f64, None::<f64>);
    let (started, started_cpu) = (Instant::now(), thread_cpu());
    let mut next = 0u64;
    let mut batches = 0u64;
    while next < n {
        batch.clear();
        while batch.len() < BATCH && next < n {
            batch.push(new_id(next));
            next += 1;
        }
        let (t, cpu) = (Instant::now(), thread_cpu());
        new += set.insert_batch(&batch);
        let (took, took_cpu) = (t.elapsed(), thread_cpu() - cpu);
        if took_cpu > longest {
            (longest, longest_at) = (took_cpu, new);
        }
        longest_wall = longest_wall.max(took);
        over_1ms += u64::from(took_cpu > Duration::from_millis(1));
        batches += 1;
        if batches % 64 == 0 && new >= 1_000_000 {
            let rss = resident_bytes().saturating_sub(base) as f64 / new as f64;
            worst_rss = worst_rss.max(rss);
            if let Some(bytes) = set.allocated() {
                let per_id = bytes as f64 / new as f64;
                worst_allocated = Some(worst_allocated.map_or(per_id, |w| w.max(per_id)));
            }
        }
    }
    let (took, took_cpu) = (started.elapsed(), thread_cpu() - started_cpu);
    let final_rss = resident_bytes().saturating_sub(base) as f64 / new.max(1) as f64;
    Growth {
        ids: n,
        new,
        took,
        took_cpu,
        longest,
        longest_at,
        longest_wall,
        over_1ms,
        worst_rss_per_id: worst_rss.max(final_rss),
        worst_allocated_per_id: worst_allocated,
        final_rss_per_id: final_rss,
    }
}

fn main() {
    let args = Args::from_env();
    if !args.has("--thp") {
        // As the verve binary does (src/main.rs); --thp keeps the system's setting.
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    if !args.benching() {
        let mut set = IdSet::new();
        let growth = grow(&mut set, 1_000_000);
        assert_eq!(growth.new, 1_000_000);
        assert_eq!(set.len(), 1_000_000);
        println!("set_growth smoke test: 1,000,000 ids counted");
        return;
    }
    let n: u64 = args
        .value("--ids")
        .map_or(250_000_000, |v| v.parse().expect("--ids N"));
    let kind = args.value("--set").unwrap_or_else(|| "verve".into());
    let growth = match kind.as_str() {
        "verve" => grow(&mut IdSet::new(), n),
        // The steady state: a window laid out for the size of the one before.
        "verve-presized" => grow(&mut IdSet::with_capacity(n as usize), n),
        "scc" => grow(&mut scc::HashSet::default(), n),
        "std" => grow(&mut HashSet::default(), n),
        "std-presized" => grow(
            &mut HashSet::with_capacity_and_hasher(n as usize, Default::default()),
            n,
        ),
        other => panic!("--set verve|verve-presized|scc|std|std-presized, not {other}"),
    };
    assert_eq!(growth.new, growth.ids, "every id counted once");
    println!(
        "set={kind} ids={} seconds={:.2} cpu_ns_per_id={:.1} longest_batch_cpu_ms={:.3} at_ids={} \
         longest_batch_wall_ms={:.3} batches_over_1ms_cpu={} worst_rss_bytes_per_id={:.2} final_rss_bytes_per_id={:.2} worst_allocated_bytes_per_id={}",
        growth.ids,
        growth.took.as_secs_f64(),
        growth.took_cpu.as_nanos() as f64 / growth.ids as f64,
        growth.longest.as_secs_f64() * 1e3,
        growth.longest_at,
        growth.longest_wall.as_secs_f64() * 1e3,
        growth.over_1ms,
        growth.worst_rss_per_id,
        growth.final_rss_per_id,
        growth
            .worst_allocated_per_id
            .map_or("-".into(), |b| format!("{b:.2}")),
    );
}
