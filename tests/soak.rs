//! Soak: connections opened and closed at a high rate while thousands of idle
//! keep-alive ones are held. Afterwards the server's file descriptors are back to
//! exactly their baseline, its resident memory to within a small margin of it, and
//! every id it answered `ok` is counted once. Memory is compared after two
//! identical rounds, each settled under light traffic, so allocator warm-up,
//! fragmentation and lazily returned pages do not count as a leak.
//!
//! `VERVE_SOAK_SECS` (default 5) sets how long the churn runs, `VERVE_SOAK_IDLE`
//! (default 3000) how many idle connections are held; the figures are printed, and
//! docs/performance.md records a long run.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{accept_all, eventually, Client, Verve};
use verve::server::file_limit;

const CHURN_THREADS: u64 = 4;

/// Resident memory may stay above the first round's settled level by this much:
/// allocator caches and the id sets of the windows in progress, none of which grows
/// with the number of connections. A leak of 8 bytes per connection exceeds it over
/// a million connections (a long run); the default 5 s run (about 60,000) only
/// catches leaks of about 140 bytes or more per connection.
const RSS_MARGIN_KIB: u64 = 8 * 1024;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().expect(name))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Holds `n` keep-alive connections, each having sent one id from `next_id`.
fn idle_crowd(verve: &Verve, n: u64, next_id: &AtomicU64) -> Vec<Client> {
    (0..n)
        .map(|_| {
            let mut client = Client::connect(verve.addr);
            accept_all(
                &mut client,
                [next_id.fetch_add(1, Ordering::Relaxed) as i64],
            );
            client
        })
        .collect()
}

/// Opens a connection, sends one id, reads the answer and closes, over and over on
/// several threads, for `length`. Returns the connections made.
fn churn(verve: &Verve, length: Duration, next_id: &Arc<AtomicU64>) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..CHURN_THREADS)
        .map(|_| {
            let (addr, stop, next_id) = (verve.addr, stop.clone(), next_id.clone());
            std::thread::spawn(move || {
                let mut made = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mut client = Client::connect(addr);
                    accept_all(
                        &mut client,
                        [next_id.fetch_add(1, Ordering::Relaxed) as i64],
                    );
                    made += 1;
                }
                made
            })
        })
        .collect();
    std::thread::sleep(length);
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().map(|t| t.join().unwrap()).sum()
}

/// Holds an idle crowd while connections churn for `length`, then lets the crowd go.
fn round(verve: &Verve, idle: u64, length: Duration, next_id: &Arc<AtomicU64>) -> u64 {
    let crowd = idle_crowd(verve, idle, next_id);
    let made = churn(verve, length, next_id);
    let fds = open_fds(verve.pid());
    eprintln!(
        "soak: end of churn beside {idle} idle: server fds {fds}, RSS {} KiB",
        verve.rss_kib()
    );
    assert!(fds >= idle as usize, "the idle crowd was not held");
    drop(crowd);
    made
}

/// Resident memory once the server has settled: light churn in short bursts, which
/// matters because mimalloc hands a thread's freed pages back to the kernel only on
/// that thread's later allocations, and because the id sets of the open windows
/// come and go. Without `ceiling`, returns the lowest level seen over three seconds;
/// with it, returns as soon as memory is at or under it, and panics after 20 s.
fn settled_rss(verve: &Verve, next_id: &Arc<AtomicU64>, ceiling: Option<u64>) -> u64 {
    let started = Instant::now();
    let mut lowest = u64::MAX;
    loop {
        churn(verve, Duration::from_millis(200), next_id);
        lowest = lowest.min(verve.rss_kib());
        match ceiling {
            None if started.elapsed() >= Duration::from_secs(3) => return lowest,
            Some(ceiling) if lowest <= ceiling => return lowest,
            Some(ceiling) => assert!(
                started.elapsed() < Duration::from_secs(20),
                "resident memory stayed above {ceiling} KiB: {lowest} KiB at the lowest"
            ),
            None => {}
        }
    }
}

#[test]
fn churn_beside_an_idle_crowd_leaks_nothing_and_loses_no_id() {
    let secs = setting("VERVE_SOAK_SECS", 5);
    // Each idle connection is a descriptor here and one in the server.
    let open_files = file_limit::raise_to_hard_limit().unwrap();
    let idle = setting("VERVE_SOAK_IDLE", 3000.min(open_files.saturating_sub(256)));
    // The crowd must stay for the whole churn, however long it is set to run.
    let verve = Verve::start(&[("VERVE_IDLE_TIMEOUT_MS", "3600000")]);
    let pid = verve.pid();
    let next_id = Arc::new(AtomicU64::new(0));
    // Listeners, the count log, runtimes: the descriptors of a server at rest.
    let at_rest = open_fds(pid);
    let back_to_rest = || {
        let what = || format!("server fds back to {at_rest} (now {})", open_fds(pid));
        eventually(Duration::from_secs(10), what, || {
            (open_fds(pid) == at_rest).then_some(())
        });
    };

    // The same round first, so that the allocator and the kernel reach their
    // working size (and the heap its fragmentation) before the baseline is read: a
    // leak then shows as growth over the second round, in proportion to the
    // connections it made.
    round(&verve, idle, Duration::from_secs(secs), &next_id);
    back_to_rest();
    let rss_before = settled_rss(&verve, &next_id, None);

    let started = Instant::now();
    let made = round(&verve, idle, Duration::from_secs(secs), &next_id);
    let elapsed = started.elapsed();
    back_to_rest();
    let rss_after = settled_rss(&verve, &next_id, Some(rss_before + RSS_MARGIN_KIB));
    eprintln!(
        "soak: {made} connections in {elapsed:.1?} ({:.0}/s) beside {idle} idle; \
         server fds back to {at_rest}; RSS {rss_before} KiB -> {rss_after} KiB",
        made as f64 / elapsed.as_secs_f64(),
    );
    let sent = next_id.load(Ordering::Relaxed);
    let (status, windows) = verve.terminate();
    assert!(status.success());
    // Every id was sent once, so each is in exactly one window's count.
    let counted: u64 = windows.iter().map(|w| w.unique_requests).sum();
    assert_eq!(counted, sent);
}
