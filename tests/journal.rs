//! The journal, against the real binary: a window survives `kill -9` and a
//! restart, and every bad case (a torn tail, a damaged or foreign file, an
//! unusable or locked data directory, a full disk) ends in one clear line.
//!
//! The promise is that an id answered `ok` more than a flush interval before a
//! kill is counted; the tests wait for its condition (the journal's
//! `verve_journal_ids_written`) rather than for the time.

mod common;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::proxy::Proxy;
use common::redis_server::RedisServer;
use common::{
    accept_all, command, eventually, fleet_member, metric, refused_at_start, signal,
    start_of_next_window, wait_with_deadline, Client, Verve, WindowLine,
};
use verve::window::{WindowLength, WindowStart};

/// Long enough for a kill and a restart of the debug binary inside one window.
const WINDOW_SECS: u64 = 5;

/// Windows that do not end while a test runs.
const HOUR: &str = "3600";

fn length() -> WindowLength {
    WindowLength::from_secs(WINDOW_SECS)
}

/// verve journalling into `data`, with `VERVE_WINDOW_SECS` = `window_secs`, plus `env`.
fn start(data: &Path, window_secs: &str, env: &[(&str, &str)]) -> Verve {
    let mut cmd = command(env);
    cmd.env("VERVE_DATA_DIR", data)
        .env("VERVE_WINDOW_SECS", window_secs);
    Verve::spawn(cmd)
}

/// Waits until `n` ids are in the journal: then a `kill -9` loses none of them.
fn wait_journalled(verve: &Verve, n: u64) {
    eventually(
        Duration::from_secs(10),
        || format!("{n} ids journalled:\n{}", verve.scrape()),
        || (metric(&verve.scrape(), "verve_journal_ids_written_total") == n).then_some(()),
    );
}

/// The journal files in `data`.
fn journal_files(data: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "journal"))
        .collect();
    files.sort();
    files
}

fn file_of(data: &Path, window: WindowStart) -> PathBuf {
    data.join(format!("window-{}.journal", window.unix_secs()))
}

fn send(verve: &Verve, ids: std::ops::Range<i64>) {
    accept_all(&mut Client::connect(verve.addr), ids);
}

/// The record's (count, revision, complete, partial).
fn summary(line: &WindowLine) -> (u64, u64, bool, bool) {
    (
        line.unique_requests,
        line.revision,
        line.complete,
        line.partial,
    )
}

/// Runs verve expecting it to refuse to start, and returns its one line.
fn refused(data: &Path) -> String {
    let mut cmd = command(&[]);
    let scratch = tempfile::tempdir().unwrap();
    cmd.env("VERVE_DATA_DIR", data)
        .env("VERVE_COUNT_LOG", scratch.path().join("counts.log"));
    refused_at_start(cmd)
}

#[test]
fn killed_and_restarted_within_a_window_it_counts_every_id_once() {
    let data = tempfile::tempdir().unwrap();
    // One partition first, owner threads after the restart: both journal.
    let mut first = start(data.path(), "5", &[("VERVE_PARTITIONS", "1")]);
    let window = start_of_next_window(length());
    send(&first, 0..300);
    wait_journalled(&first, 300);
    first.kill();
    let second = start(data.path(), "5", &[("VERVE_PARTITIONS", "2")]);
    send(&second, 200..400);
    assert_eq!(
        length().window_of(std::time::SystemTime::now()),
        window,
        "the restart took longer than a window; the test cannot tell"
    );
    let line = second.wait_for_record(window, "a record", |_| true);
    assert_eq!(summary(&line), (400, 1, true, false), "{line:?}");
    eventually(
        Duration::from_secs(5),
        || format!("window's file deleted: {:?}", journal_files(data.path())),
        || (!file_of(data.path(), window).exists()).then_some(()),
    );
}

#[test]
fn killed_and_restarted_after_the_window_it_publishes_the_window() {
    let data = tempfile::tempdir().unwrap();
    let mut first = start(data.path(), "5", &[]);
    let window = start_of_next_window(length());
    send(&first, 0..300);
    wait_journalled(&first, 300);
    first.kill();
    assert!(file_of(data.path(), window).exists());
    // Waiting for the window to end is the condition itself.
    start_of_next_window(length());
    let second = start(data.path(), "5", &[]);
    let line = second.wait_for_record(window, "a record", |_| true);
    // Exact, and partial: no process was running when the window ended.
    assert_eq!(summary(&line), (300, 1, true, true), "{line:?}");
    assert!(!file_of(data.path(), window).exists(), "published: deleted");
    assert!(
        second
            .stderr_text()
            .contains("window read back from the journal"),
        "{}",
        second.stderr_text()
    );
}

#[test]
fn a_stop_and_a_start_within_a_window_end_in_one_final_record() {
    let data = tempfile::tempdir().unwrap();
    let first = start(data.path(), "5", &[]);
    let window = start_of_next_window(length());
    send(&first, 0..300);
    let (status, lines) = first.terminate();
    assert!(status.success());
    let stopped: Vec<_> = lines
        .iter()
        .filter(|line| line.window_start == window.to_string())
        .map(summary)
        .collect();
    assert_eq!(
        stopped,
        vec![(300, 1, true, true)],
        "the stop's partial record"
    );
    let second = start(data.path(), "5", &[]);
    send(&second, 250..350);
    assert_eq!(
        length().window_of(std::time::SystemTime::now()),
        window,
        "the restart took longer than a window; the test cannot tell"
    );
    let line = second.wait_for_record(window, "a record", |_| true);
    assert_eq!(summary(&line), (350, 2, true, false), "{line:?}");
    eventually(
        Duration::from_secs(5),
        || format!("window's file deleted: {:?}", journal_files(data.path())),
        || (!file_of(data.path(), window).exists()).then_some(()),
    );
}

#[test]
fn a_torn_last_entry_is_dropped_with_a_warning_and_the_rest_counted() {
    let data = tempfile::tempdir().unwrap();
    let mut first = start(data.path(), HOUR, &[]);
    send(&first, 0..300);
    wait_journalled(&first, 300);
    first.kill();
    let [file] = &journal_files(data.path())[..] else {
        panic!("one journal file: {:?}", journal_files(data.path()));
    };
    // The first 12 bytes of an entry of two ids (length 17), as a crash in the
    // middle of its write leaves it.
    let mut torn = 17u32.to_le_bytes().to_vec();
    torn.extend_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd, 1, 7, 7, 7]);
    let mut journal = std::fs::OpenOptions::new().append(true).open(file).unwrap();
    journal.write_all(&torn).unwrap();
    drop(journal);
    let mut second = start(data.path(), HOUR, &[]);
    let warning = second.wait_for_stderr("cut short by a crash", Duration::from_secs(5));
    assert!(warning.contains("dropped_bytes=12"), "{warning}");
    assert!(warning.contains("kept_ids=300"), "{warning}");
    send(&second, 300..310);
    let (status, lines) = second.terminate();
    assert!(status.success());
    let stopped: Vec<_> = lines.iter().map(summary).collect();
    assert_eq!(stopped, vec![(310, 1, true, true)]);
}

#[test]
fn a_damaged_or_foreign_journal_file_stops_start_up_naming_it() {
    let data = tempfile::tempdir().unwrap();
    let mut first = start(data.path(), HOUR, &[]);
    send(&first, 0..10);
    wait_journalled(&first, 10);
    send(&first, 10..20);
    wait_journalled(&first, 20);
    first.kill();
    let [file] = &journal_files(data.path())[..] else {
        panic!("one journal file: {:?}", journal_files(data.path()));
    };
    // A bit flipped in the first entry's ids, with a whole entry after it.
    let mut bytes = std::fs::read(file).unwrap();
    bytes[36 + 9] ^= 0x10;
    std::fs::write(file, &bytes).unwrap();
    assert_eq!(
        refused(data.path()),
        format!(
            "verve: journal file {} is damaged at byte 36: move it out of VERVE_DATA_DIR \
             and start again (the ids in it will not be counted)",
            file.display()
        )
    );
    std::fs::write(file, "window,id\n1,2\n3,4\n5,6\n7,8\n9,10\n11,12\n").unwrap();
    assert_eq!(
        refused(data.path()),
        format!(
            "verve: journal file {} is not a verve journal: move it out of VERVE_DATA_DIR \
             and start again (the ids in it will not be counted)",
            file.display()
        )
    );
}

#[test]
fn an_unusable_data_directory_stops_start_up_naming_verve_data_dir() {
    let scratch = tempfile::tempdir().unwrap();
    let not_a_dir = scratch.path().join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let data = not_a_dir.join("data");
    assert_eq!(
        refused(&data),
        format!(
            "verve: cannot use VERVE_DATA_DIR {}: Not a directory (os error 20) (make it a \
             directory this user may write, point VERVE_DATA_DIR elsewhere, or set \
             VERVE_JOURNAL=false)",
            data.display()
        )
    );
}

#[test]
fn a_second_process_on_the_same_data_directory_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let first = start(data.path(), HOUR, &[]);
    assert_eq!(
        refused(data.path()),
        format!(
            "verve: VERVE_DATA_DIR {} is in use by another verve process (it holds {}): give \
             each instance a data directory of its own",
            data.path().display(),
            data.path().join("LOCK").display()
        )
    );
    // The first goes on.
    send(&first, 0..3);
}

#[test]
fn a_full_disk_is_unhealthy_and_counted_and_new_ids_are_counted_in_memory() {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = command(&[]);
    cmd.env("VERVE_DATA_DIR", data.path())
        .env("VERVE_WINDOW_SECS", HOUR);
    // Files may grow to 8 KiB (300 ids in entries of one id each would take
    // 5.1 KiB; the count log's one line fits); past it a write fails with
    // EFBIG, as on a full disk with ENOSPC.
    // SAFETY: setrlimit and signal are async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 8192,
                rlim_max: 8192,
            };
            match libc::setrlimit(libc::RLIMIT_FSIZE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let verve = Verve::spawn(cmd);
    send(&verve, 0..300);
    wait_journalled(&verve, 300);
    assert_eq!(verve.admin_get("/healthz").status, 200);
    // 1,000 more ids (8,000 bytes at least) cannot all fit under the limit:
    // answered ok and counted, the last of them not journalled.
    send(&verve, 300..1300);
    let health = eventually(
        Duration::from_secs(5),
        || "healthz to turn 503".into(),
        || Some(verve.admin_get("/healthz")).filter(|r| r.status == 503),
    );
    assert!(
        health.body.contains("journal cannot be written"),
        "{health:?}"
    );
    let scrape = eventually(
        Duration::from_secs(5),
        || format!("every id journalled or waiting:\n{}", verve.scrape()),
        || {
            let scrape = verve.scrape();
            let written = metric(&scrape, "verve_journal_ids_written_total");
            let unwritten = metric(&scrape, "verve_journal_unwritten_ids");
            (written + unwritten == 1300).then_some(scrape)
        },
    );
    assert!(
        metric(&scrape, "verve_journal_write_errors_total") >= 1,
        "{scrape}"
    );
    assert!(
        metric(&scrape, "verve_journal_unwritten_ids") > 0,
        "{scrape}"
    );
    let file = &journal_files(data.path())[0];
    assert!(std::fs::metadata(file).unwrap().len() <= 8192);
    let (status, lines) = verve.terminate();
    assert!(status.success());
    let stopped: Vec<_> = lines.iter().map(summary).collect();
    assert_eq!(stopped, vec![(1300, 1, true, true)]);
}

/// Redis mode: a fleet of one, `solo`, journalling into `data`, plus `env`.
fn solo(redis_url: &str, data: &Path, env: &[(&str, &str)]) -> Verve {
    let data = data.to_str().unwrap();
    let mut extra = vec![("VERVE_DATA_DIR", data)];
    extra.extend_from_slice(env);
    fleet_member(redis_url, "solo", &extra)
}

/// Sends SIGTERM, waits for the exit and for the stop's last line on stderr.
fn stop(verve: &mut Verve) -> String {
    signal(verve.child(), libc::SIGTERM);
    let status = wait_with_deadline(verve.child(), Duration::from_secs(15));
    assert!(status.success(), "{status}");
    eventually(
        Duration::from_secs(2),
        || format!("the stop's last line in:\n{}", verve.stderr_text()),
        || {
            let stderr = verve.stderr_text();
            let last = stderr.lines().last()?;
            last.contains("stopped").then(|| last.to_owned())
        },
    )
}

#[test]
fn redis_mode_killed_with_its_ids_undelivered_delivers_them_after_a_restart() {
    let redis = RedisServer::start();
    let link = Proxy::start(redis.port);
    let data = tempfile::tempdir().unwrap();
    let length = WindowLength::from_secs(3);
    let env = [("VERVE_WINDOW_SECS", "3")];
    let held = format!("redis://127.0.0.1:{}/0", link.port);
    let mut first = solo(&held, data.path(), &env);
    let window = start_of_next_window(length);
    // Redis never hears of these ids: the link holds every byte, for good.
    link.hold();
    send(&first, 0..200);
    wait_journalled(&first, 200);
    first.kill();
    assert_eq!(redis.scard(window, 1), 0);
    // Restarted after the window ended, straight to Redis.
    start_of_next_window(length);
    let second = solo(&redis.url(), data.path(), &env);
    let line = second.wait_for_record(window, "every id", |line| line.unique_requests == 200);
    assert_eq!(line.scope, "global", "{line:?}");
    assert_eq!(redis.scard(window, 1), 200);
}

/// Issue 29: Redis stalls with ids waiting for it, and the stop comes.
fn a_stop_with_a_redis_backlog(journal: &str) -> (String, Vec<WindowLine>, Verve) {
    let redis = RedisServer::start();
    let data = tempfile::tempdir().unwrap();
    let env = [
        ("VERVE_WINDOW_SECS", HOUR),
        ("VERVE_JOURNAL", journal),
        ("VERVE_SHUTDOWN_DRAIN_MS", "200"),
        // Room for a loaded machine (the stress run's CPU hog): with 2 s, two
        // runs in eight there ended before the aggregator and the forwarder had
        // got the stop's records out.
        ("VERVE_SHUTDOWN_TIMEOUT_MS", "4000"),
    ];
    let mut first = solo(&redis.url(), data.path(), &env);
    send(&first, 0..1000);
    redis.pause();
    send(&first, 1000..3000);
    let started = std::time::Instant::now();
    let last_line = stop(&mut first);
    assert!(
        started.elapsed() < Duration::from_millis(5500),
        "{:?}",
        started.elapsed()
    );
    let stopped = first.windows();
    redis.resume();
    if journal == "false" {
        return (last_line, stopped, first);
    }
    // The first run could not leave the fleet (Redis was paused): until its
    // heartbeat expires it looks live, and the next run, stopping, would leave
    // the window to it rather than publish it.
    eventually(
        Duration::from_secs(10),
        || "the first run's heartbeat to expire".into(),
        || redis.live_runs().is_empty().then_some(()),
    );
    // The next start with the same name and directory delivers them.
    let mut second = solo(&redis.url(), data.path(), &env);
    send(&second, 2500..3500);
    let clean = stop(&mut second);
    assert!(clean.ends_with("verve: stopped"), "{clean}");
    (last_line, stopped, second)
}

#[test]
fn a_stop_with_a_redis_backlog_publishes_its_own_count_and_keeps_the_rest_in_the_journal() {
    let (last_line, stopped, second) = a_stop_with_a_redis_backlog("true");
    assert!(last_line.contains("undelivered_ids="), "{last_line}");
    assert!(last_line.contains("kept in the journal"), "{last_line}");
    // The window got a record at the stop: this instance's own ids.
    let own = stopped.last().expect("a record at the stop");
    assert_eq!(
        (
            own.unique_requests,
            own.scope.as_str(),
            own.revision,
            own.complete,
            own.partial
        ),
        (3000, "instance", 0, false, true),
        "{stopped:?}"
    );
    // After the restart, the fleet's record has every id answered ok.
    let fleet = second.windows();
    let last = fleet
        .last()
        .unwrap_or_else(|| panic!("no record from the restart:\n{}", second.stderr_text()));
    assert_eq!(
        (last.unique_requests, last.scope.as_str()),
        (3500, "global"),
        "{fleet:?}\n{}",
        second.stderr_text()
    );
}

#[test]
fn a_stop_with_a_redis_backlog_and_no_journal_says_how_many_ids_are_lost() {
    let (last_line, stopped, first) = a_stop_with_a_redis_backlog("false");
    assert!(last_line.contains("ERROR"), "{last_line}");
    assert!(last_line.contains("lost_ids="), "{last_line}");
    let stderr = first.stderr_text();
    let detail = stderr
        .lines()
        .find(|line| line.contains("VERVE_JOURNAL=false they are lost"))
        .unwrap_or_else(|| panic!("the give-up line:\n{stderr}"));
    assert!(detail.contains("windows="), "{detail}");
    let own = stopped.last().expect("a record at the stop");
    assert_eq!(
        (own.unique_requests, own.scope.as_str()),
        (3000, "instance")
    );
}
