//! Test harness: runs the real `verve` binary on a free loopback port and talks to
//! it over real sockets. Every wait has a deadline; nothing sleeps hoping.

#![allow(dead_code)] // each test file uses its own share of the harness

pub mod framing;
pub mod haproxy;
pub mod kafka;
pub mod proxy;
pub mod receiver;
pub mod redis_cluster;
pub mod redis_server;
pub mod tansu;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use verve::config::IoDriver;
use verve::server::Driver;
use verve::window::{WindowLength, WindowStart};

/// Window length used by the integration tests.
pub const WINDOW_SECS: u64 = 2;

/// `VERVE_FLEET_WAIT_MS` in the Redis tests: within a window, past many flushes.
pub const FLEET_WAIT_MS: u64 = 1500;

/// The io drivers this machine can run: epoll always, io_uring where allowed.
pub fn drivers() -> Vec<&'static str> {
    let mut drivers = vec!["epoll"];
    if Driver::resolve(IoDriver::Uring).is_ok() {
        drivers.push("uring");
    } else {
        eprintln!("io_uring unavailable here: testing epoll only");
    }
    drivers
}

pub struct Verve {
    child: Child,
    pub addr: SocketAddr,
    /// Where `/metrics` and `/healthz` are served, if they are.
    pub admin: Option<SocketAddr>,
    pub count_log: PathBuf,
    /// Its `VERVE_FLEET_WAIT_MS` (verve's default if not set).
    fleet_wait: Duration,
    stderr: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

/// One line of the count log: a count record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowLine {
    pub window_start: String,
    pub unique_requests: u64,
    pub scope: String,
    pub revision: u64,
    pub complete: bool,
    pub partial: bool,
    pub instances: u64,
}

impl Verve {
    /// Starts verve with test defaults (2 s windows, port 0) plus `env`.
    pub fn start(env: &[(&str, &str)]) -> Verve {
        Verve::spawn(command(env))
    }

    /// Starts verve from a command made by [`command`], changed as a test needs.
    pub fn spawn(command: Command) -> Verve {
        Verve::spawn_within(command, Duration::from_secs(15))
    }

    /// [`Verve::spawn`], waiting up to `limit` for it to listen (a test that
    /// starts instances while the machine is loaded on purpose).
    pub fn spawn_within(mut command: Command, limit: Duration) -> Verve {
        let dir = tempfile::tempdir().unwrap();
        let count_log = dir.path().join("counts.log");
        // A journal of its own, unless the test keeps one across processes.
        let data_dir_set = command.get_envs().any(|(key, _)| key == "VERVE_DATA_DIR");
        let fleet_wait_ms = command
            .get_envs()
            .find(|(key, _)| *key == "VERVE_FLEET_WAIT_MS")
            .and_then(|(_, value)| value?.to_str()?.parse().ok())
            .unwrap_or(5_000);
        if !data_dir_set {
            command.env("VERVE_DATA_DIR", dir.path().join("data"));
        }
        let mut child = command
            .env("VERVE_COUNT_LOG", &count_log)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn verve");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let mut verve = Verve {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            admin: None,
            count_log,
            fleet_wait: Duration::from_millis(fleet_wait_ms),
            stderr,
            _dir: dir,
        };
        let line = verve.wait_for_stderr("verve listening", limit);
        let addr = token(&line, "addr").expect("addr= in the start-up line");
        verve.addr = addr.parse().unwrap();
        verve.admin = token(&line, "admin").and_then(|a| a.parse().ok());
        verve
    }

    /// Waits for a stderr line containing `needle` and returns it.
    pub fn wait_for_stderr(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                // Give the reader thread a moment to collect the last lines.
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "verve exited ({status}) before '{needle}':\n{}",
                    self.stderr_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no '{needle}' on stderr:\n{}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process, to signal and wait for.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Kills the process at once (SIGKILL), as a crash would, and waits for it.
    pub fn kill(&mut self) {
        signal(&self.child, libc::SIGKILL);
        wait_with_deadline(&mut self.child, Duration::from_secs(15));
    }

    /// The server's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// The process id, to read its file descriptors and memory from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A /metrics scrape of the operations listener.
    pub fn scrape(&self) -> String {
        let response = self.admin_get("/metrics");
        assert_eq!(response.status, 200);
        response.body
    }

    /// A GET from the operations listener, on a connection of its own (it answers
    /// one request per connection).
    pub fn admin_get(&self, target: &str) -> Response {
        let admin = self.admin.expect("an operations listener");
        Client::connect(admin).get(target)
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Every line of the count log so far.
    pub fn windows(&self) -> Vec<WindowLine> {
        let text = std::fs::read_to_string(&self.count_log).unwrap_or_default();
        text.lines().map(parse_count_line).collect()
    }

    /// Waits until the count log has a line for `window` and returns it.
    pub fn wait_for_window(&self, window: WindowStart) -> WindowLine {
        self.wait_for_record(window, "any record", |_| true)
    }

    /// Waits until the count log has a line for `window` that `wanted` accepts
    /// (`what` says which, for the failure message) and returns the first one.
    /// Checks on the way that the window's revisions only ever go up.
    pub fn wait_for_record(
        &self,
        window: WindowStart,
        what: &str,
        wanted: impl Fn(&WindowLine) -> bool,
    ) -> WindowLine {
        let start = window.to_string();
        let deadline = Instant::now() + Duration::from_secs(WINDOW_SECS * 3 + 15);
        loop {
            let lines = self.windows();
            let matching: Vec<_> = lines.iter().filter(|l| l.window_start == start).collect();
            assert!(
                matching
                    .windows(2)
                    .all(|pair| pair[0].revision < pair[1].revision),
                "window {start} reported twice with a revision: {lines:?}"
            );
            if let Some(line) = matching.into_iter().find(|l| wanted(l)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "window {start} never reported with {what}: {lines:?}\n{}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(mut self) -> (ExitStatus, Vec<WindowLine>) {
        signal(&self.child, libc::SIGTERM);
        let status = wait_with_deadline(&mut self.child, Duration::from_secs(15));
        (status, self.windows())
    }
}

impl Drop for Verve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Instance `name` of a fleet sharing the Redis at `redis_url`, with the test
/// defaults for Redis mode (a short fleet wait and Redis timeout), plus `extra`,
/// once the fleet took it in (it answers 503 until then).
pub fn fleet_member(redis_url: &str, name: &str, extra: &[(&str, &str)]) -> Verve {
    in_fleet(fleet_member_starting(redis_url, name, extra), name)
}

/// [`fleet_member`] as soon as it listens, in the fleet or not.
pub fn fleet_member_starting(redis_url: &str, name: &str, extra: &[(&str, &str)]) -> Verve {
    let wait = FLEET_WAIT_MS.to_string();
    Verve::start(&fleet_env(redis_url, name, &wait, extra))
}

/// The environment of instance `name` of a fleet on `redis_url`: the test
/// defaults for Redis mode (`wait`, [`FLEET_WAIT_MS`] as text, and a short Redis
/// timeout), plus `extra`.
pub fn fleet_env<'a>(
    redis_url: &'a str,
    name: &'a str,
    wait: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("VERVE_REDIS_URL", redis_url),
        ("VERVE_INSTANCE", name),
        ("VERVE_FLEET_WAIT_MS", wait),
        ("VERVE_REDIS_TIMEOUT_MS", "300"),
    ];
    env.extend_from_slice(extra);
    env
}

/// `verve` (instance `name`), once the fleet took it in.
pub fn in_fleet(verve: Verve, name: &str) -> Verve {
    in_fleet_within(verve, name, Duration::from_secs(10))
}

/// [`in_fleet`], waiting up to `limit`. Returns once the fleet's epoch is a
/// fleet wait (the instance's) old: a window that begins later may be
/// published `complete=true` (one that began sooner never is, see
/// `rules::may_be_complete`), so a test that sends in the next window may
/// expect it.
pub fn in_fleet_within(verve: Verve, name: &str, limit: Duration) -> Verve {
    let began_ms = epoch_began_ms(&verve, name, limit);
    sleep_until(UNIX_EPOCH + Duration::from_millis(began_ms) + verve.fleet_wait);
    verve
}

/// When the fleet's epoch began (`verve_redis_epoch_began_ms`, ms since the Unix
/// epoch by Redis's clock), once the fleet took `verve` (instance `name`) in,
/// waiting up to `limit`.
pub fn epoch_began_ms(verve: &Verve, name: &str, limit: Duration) -> u64 {
    eventually(
        limit,
        || format!("{name} in the fleet:\n{}", verve.stderr_text()),
        || {
            let scraped = verve.scrape();
            (metric(&scraped, "verve_redis_in_fleet") == 1)
                .then(|| metric(&scraped, "verve_redis_epoch_began_ms"))
        },
    )
}

/// Sleeps until this host's clock reaches `moment` (not at all if it has):
/// waiting for the clock is then the condition itself.
pub fn sleep_until(moment: SystemTime) {
    if let Ok(left) = moment.duration_since(SystemTime::now()) {
        std::thread::sleep(left);
    }
}

/// Two fleet members `a` and `b` sharing `redis_url` (with `extra`), sent ids 0..200
/// and 100..300 at once within one window; returns them and the window, once
/// both logged its count: 300.
pub fn two_members_with_overlapping_ids(
    redis_url: &str,
    extra: &[(&str, &str)],
) -> (Verve, Verve, WindowStart) {
    let a = fleet_member(redis_url, "a", extra);
    let b = fleet_member(redis_url, "b", extra);
    let (window, ()) = within_one_window(|| {
        std::thread::scope(|s| {
            s.spawn(|| accept_all(&mut Client::connect(a.addr), 0..200));
            s.spawn(|| accept_all(&mut Client::connect(b.addr), 100..300));
        });
    });
    let (line_a, line_b) = (a.wait_for_window(window), b.wait_for_window(window));
    assert_eq!((line_a.unique_requests, line_b.unique_requests), (300, 300));
    (a, b, window)
}

/// A `verve` command with the test defaults and `env` on top.
pub fn command(env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_verve"));
    cmd.env_clear()
        .env("RUST_LOG", "info")
        .env("VERVE_ADDR", "127.0.0.1:0")
        // Instances run side by side: each gets its own operations port.
        .env("VERVE_ADMIN_ADDR", "127.0.0.1:0")
        .env("VERVE_WORKERS", "2")
        .env("VERVE_WINDOW_SECS", WINDOW_SECS.to_string())
        // Tests call receivers on loopback, which the default refuses.
        .env("VERVE_CALLBACK_DENY_PRIVATE", "false")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

/// Runs `command` expecting verve to refuse to start: exit status 1 and one line
/// on stderr, which it returns.
pub fn refused_at_start(mut command: Command) -> String {
    let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
    let status = wait_with_deadline(&mut child, Duration::from_secs(10));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    stderr.trim_end().to_owned()
}

pub fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    let rc = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(rc, 0, "kill failed");
}

pub fn wait_with_deadline(child: &mut Child, limit: Duration) -> ExitStatus {
    eventually(
        limit,
        || "the process to exit".into(),
        || child.try_wait().unwrap(),
    )
}

/// Polls `check` every 10 ms until it gives a value; panics after `limit`, saying
/// what was awaited (`what` is asked only then, so it may describe the last state).
pub fn eventually<T>(
    limit: Duration,
    what: impl Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "waited {limit:?} for {}", what());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn token<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(prefix.as_str()))
}

pub fn parse_count_line(line: &str) -> WindowLine {
    let field = |key| token(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    WindowLine {
        window_start: field("window_start").to_owned(),
        unique_requests: field("unique_requests").parse().unwrap(),
        scope: field("scope").to_owned(),
        revision: field("revision").parse().unwrap(),
        complete: field("complete").parse().unwrap(),
        partial: field("partial").parse().unwrap(),
        instances: field("instances").parse().unwrap(),
    }
}

pub fn window_length() -> WindowLength {
    WindowLength::from_secs(WINDOW_SECS)
}

/// Sleeps until just after the next boundary of windows of `length`, and returns
/// the window that starts there.
pub fn start_of_next_window(length: WindowLength) -> WindowStart {
    let next = length.end_of(length.window_of(SystemTime::now()));
    sleep_until(next + Duration::from_millis(20));
    length.window_of(SystemTime::now())
}

/// Runs `send` so that it starts and ends inside one window, and returns that
/// window. Starts just after a boundary; if `send` overruns the window (a very
/// slow machine), tries again, so the window asserted on is always the right one.
pub fn within_one_window<T>(send: impl FnMut() -> T) -> (WindowStart, T) {
    within_one_window_of(window_length(), send)
}

/// [`within_one_window`] for windows of `length`, for verve started with a
/// `VERVE_WINDOW_SECS` of its own.
pub fn within_one_window_of<T>(
    length: WindowLength,
    mut send: impl FnMut() -> T,
) -> (WindowStart, T) {
    for _ in 0..3 {
        let before = start_of_next_window(length);
        let result = send();
        if length.window_of(SystemTime::now()) == before {
            return (before, result);
        }
        eprintln!("sending overran window {before}; trying again in the next one");
    }
    panic!(
        "could not send within one {} s window three times",
        length.as_secs()
    );
}

/// A parsed HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A client connection that reads responses one at a time.
pub struct Client {
    pub reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            reader: BufReader::new(stream),
        }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.reader.get_mut().write_all(raw).unwrap();
    }

    pub fn get(&mut self, target: &str) -> Response {
        self.send(format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        self.read_response()
    }

    pub fn read_response(&mut self) -> Response {
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line).unwrap();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"))
            .parse()
            .unwrap();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_owned(), value.trim().to_owned()));
        }
        let response = Response {
            status,
            body: String::new(),
            headers,
        };
        let len: usize = response.header("content-length").unwrap().parse().unwrap();
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).unwrap();
        Response {
            body: String::from_utf8(body).unwrap(),
            ..response
        }
    }

    /// True when the server has closed the connection (end of stream, nothing left).
    pub fn is_closed_by_server(&mut self) -> bool {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).is_ok() && rest.is_empty()
    }
}

/// Sends each id on `client` as its own keep-alive request and checks every answer.
pub fn accept_all(client: &mut Client, ids: impl IntoIterator<Item = i64>) {
    for id in ids {
        let response = client.get(&format!("/api/verve/accept?id={id}"));
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "ok"),
            "id {id}"
        );
    }
}

/// The value of the metric line that starts with `series ` (name and labels).
pub fn metric(text: &str, series: &str) -> u64 {
    let prefix = format!("{series} ");
    let line = text.lines().find(|l| l.starts_with(&prefix));
    line.unwrap_or_else(|| panic!("no {series}:\n{text}"))[prefix.len()..]
        .parse()
        .unwrap()
}

/// The number of distinct ids in `ids`.
pub fn distinct(ids: impl IntoIterator<Item = i64>) -> u64 {
    ids.into_iter().collect::<HashSet<_>>().len() as u64
}

/// Percent-encodes everything but unreserved characters, as a query value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Sends each id with `endpoint` on `client` and checks every answer.
pub fn accept_all_with(client: &mut Client, endpoint: &str, ids: impl IntoIterator<Item = i64>) {
    let endpoint = encode(endpoint);
    for id in ids {
        let response = client.get(&format!("/api/verve/accept?id={id}&endpoint={endpoint}"));
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "ok"),
            "id {id}"
        );
    }
}

/// Sends `id` on `client` until it is answered `ok`: an instance in Redis mode
/// answers 503 until the fleet took it in (its first heartbeat answered).
pub fn until_accepted(client: &mut Client, id: i64) {
    eventually(
        Duration::from_secs(10),
        || format!("id {id} accepted"),
        || (client.get(&format!("/api/verve/accept?id={id}")).status == 200).then_some(()),
    );
}
