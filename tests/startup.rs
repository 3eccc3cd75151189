//! Start-up failures: one clear line on stderr, a non-zero exit, no backtrace.

mod common;

use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::{command, refused_at_start, Verve};

/// Runs verve expecting it to fail at once, and returns its one line of stderr.
fn fails(env: &[(&str, &str)]) -> String {
    let mut cmd = command(&[]);
    cmd.env(
        "VERVE_COUNT_LOG",
        std::env::temp_dir().join("verve-startup-test.log"),
    );
    // What is refused here is not the journal: it stays out of the way.
    cmd.env("VERVE_JOURNAL", "false");
    for (key, value) in env {
        cmd.env(key, value);
    }
    refused_at_start(cmd)
}

#[test]
fn a_port_in_use_by_another_process_is_refused() {
    let first = Verve::start(&[]);
    let addr = first.addr.to_string();
    let err = fails(&[("VERVE_ADDR", &addr)]);
    assert_eq!(
        err,
        format!(
            "verve: cannot listen on {addr}: address already in use by another process \
             (stop it or set VERVE_ADDR to a free port)"
        )
    );
    // The first instance still owns the port and serves.
    let mut client = common::Client::connect(first.addr);
    assert_eq!(client.get("/api/verve/accept?id=1").status, 200);
}

#[test]
fn a_port_held_by_a_plain_listener_is_refused() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let err = fails(&[("VERVE_ADDR", &addr)]);
    assert!(err.contains("address already in use"), "{err}");
}

#[test]
fn an_operations_port_in_use_is_refused() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    assert_eq!(
        fails(&[("VERVE_ADMIN_ADDR", &addr)]),
        format!(
            "verve: cannot listen on {addr} for /metrics and /healthz: address already in use \
             (set VERVE_ADMIN_ADDR to a free address, or to an empty value to turn it off)"
        )
    );
}

/// Issue 25: a second instance on one host with the defaults. The default
/// operations address being taken must not stop the service: it listens on a
/// free port of the same interface and says which.
#[test]
fn a_taken_default_operations_port_moves_to_a_free_one() {
    // Held by this test, or by anything else on this host: taken either way.
    let _holder = std::net::TcpListener::bind("127.0.0.1:9464");
    let mut cmd = command(&[]);
    cmd.env_remove("VERVE_ADMIN_ADDR");
    let mut verve = Verve::spawn(cmd);
    let admin = verve.admin.expect("an operations listener");
    assert_eq!(admin.ip().to_string(), "127.0.0.1");
    assert_ne!(admin.port(), 9464);
    assert_eq!(verve.admin_get("/healthz").status, 200);
    let warning = verve.wait_for_stderr("/metrics and /healthz is taken", Duration::from_secs(5));
    assert!(
        warning.contains("taken=127.0.0.1:9464") && warning.contains(&format!("admin={admin}")),
        "{warning}"
    );
}

/// Starts verve with the open-file limit (soft and hard) at `limit`, as `ulimit -n`
/// would, and returns its start-up line and whether it warned.
fn start_with_file_limit(limit: u64, env: &[(&str, &str)]) -> (String, bool) {
    let mut cmd = command(env);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let mut verve = Verve::spawn(cmd);
    let line = verve.wait_for_stderr("verve listening", Duration::from_secs(1));
    let warned = verve.stderr_text().contains("WARN");
    (line, warned)
}

#[test]
fn the_connection_cap_follows_a_low_open_file_limit_without_a_warning() {
    // 256 files: a quarter kept spare, the rest shared by the two workers.
    let (line, warned) = start_with_file_limit(256, &[]);
    assert!(line.contains(" max_connections=96 "), "{line}");
    assert!(line.contains(" open_files=256"), "{line}");
    assert!(!warned, "{line}");
}

#[test]
fn a_connection_cap_the_open_file_limit_cannot_meet_is_reported() {
    let (line, warned) = start_with_file_limit(256, &[("VERVE_MAX_CONNECTIONS", "1000")]);
    assert!(line.contains(" max_connections=1000 "), "{line}");
    assert!(warned, "{line}");
}

#[test]
fn bad_values_name_their_variable() {
    assert_eq!(
        fails(&[("VERVE_WINDOW_SECS", "soon")]),
        "verve: invalid value 'soon' for VERVE_WINDOW_SECS (--window-secs): invalid digit found in string"
    );
    assert_eq!(
        fails(&[("VERVE_ADDR", "localhost")]),
        "verve: invalid value 'localhost' for VERVE_ADDR (--addr): invalid socket address syntax"
    );
    assert_eq!(
        fails(&[("VERVE_ADMIN_ADDR", "9464")]),
        "verve: invalid value '9464' for VERVE_ADMIN_ADDR (--admin-addr): invalid socket address syntax"
    );
    assert_eq!(
        fails(&[("VERVE_IO_DRIVER", "fast")]),
        "verve: invalid value 'fast' for VERVE_IO_DRIVER (--io-driver): expected one of epoll, uring, auto"
    );
}

#[test]
fn a_bad_callback_allow_list_is_refused() {
    assert_eq!(
        fails(&[("VERVE_CALLBACK_ALLOW", "10.0.0.0/40")]),
        "verve: invalid value '10.0.0.0/40' for VERVE_CALLBACK_ALLOW (--callback-allow): '10.0.0.0/40': prefix must be 0 to 32"
    );
}

#[test]
fn a_redis_stream_without_a_redis_is_refused() {
    assert_eq!(
        fails(&[("VERVE_SINKS", "log,redis-stream")]),
        "verve: VERVE_SINKS includes redis-stream but neither VERVE_REDIS_STREAM_URL nor \
         VERVE_REDIS_URL is set: set one to redis://host:port/db"
    );
    let err = fails(&[
        ("VERVE_SINKS", "redis-stream"),
        ("VERVE_REDIS_STREAM_URL", "http://127.0.0.1:6379"),
    ]);
    assert!(
        err.starts_with("verve: invalid VERVE_REDIS_STREAM_URL 'http://127.0.0.1:6379': "),
        "{err}"
    );
}

#[test]
fn an_unwritable_count_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let path = blocker.join("counts.log");
    let err = fails(&[("VERVE_COUNT_LOG", path.to_str().unwrap())]);
    assert!(
        err.starts_with(&format!(
            "verve: cannot open count log {}: ",
            path.display()
        )),
        "{err}"
    );
    assert!(
        err.ends_with("(set VERVE_COUNT_LOG to a writable path)"),
        "{err}"
    );
}
