//! A real redis-server for tests, on a free loopback port, without persistence.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use verve::window::WindowStart;

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = free_port();
        let mut server = RedisServer {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The server's process id, while it runs (to stop and continue it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server at once (SIGKILL): whatever it held is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Writes a snapshot (`SAVE`) that a restart then loads: Redis as it is now.
    pub fn snapshot(&self) {
        let _: () = redis::cmd("SAVE").query(&mut self.connection()).unwrap();
    }

    /// Starts the server again on the same port (empty, or from the last
    /// [`RedisServer::snapshot`]) and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let child = server_command(self.port, self.dir.path())
            .args(["--enable-debug-command", "local"])
            .spawn()
            .expect("redis-server on PATH (scripts/test.sh installs it)");
        self.child = Some(child);
        let ping = || {
            let mut connection = self.client().get_connection().ok()?;
            redis::cmd("PING").query::<String>(&mut connection).ok()
        };
        let what = || format!("redis-server on port {}", self.port);
        super::eventually(Duration::from_secs(10), what, ping);
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered,
    /// as with a Redis stalled by a fork or a slow disk.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("a running server");
        super::signal(child, signal);
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// The lowest revision of `window` under the fleet's epoch, read from Redis: 1 if
    /// the epoch began before the window, else the ms between × 2^20 + 1.
    pub fn first_revision(&self, window: WindowStart) -> u64 {
        let epoch: String = redis::cmd("GET")
            .arg("verve:{fleet}:epoch")
            .query(&mut self.connection())
            .unwrap();
        let (_, began) = epoch.rsplit_once(':').expect("<number>:<tag>:<began>");
        let began: u64 = began.parse().expect("ms");
        (began.saturating_sub(window.unix_secs() * 1000) << 20) + 1
    }

    pub fn connection(&self) -> redis::Connection {
        self.client().get_connection().unwrap()
    }

    /// The runs registered in the fleet (`<instance>/<pid>-<start>`), as the
    /// fleet protocol's registry holds them.
    pub fn registered_runs(&self) -> Vec<String> {
        redis::cmd("ZRANGE")
            .arg("verve:{fleet}:instances")
            .arg(0)
            .arg(-1)
            .query(&mut self.connection())
            .unwrap()
    }

    /// The runs whose heartbeat has not expired, by Redis's clock.
    pub fn live_runs(&self) -> Vec<String> {
        let mut connection = self.connection();
        let (now, _): (u64, u64) = redis::cmd("TIME").query(&mut connection).unwrap();
        redis::cmd("ZRANGEBYSCORE")
            .arg("verve:{fleet}:instances")
            .arg(now * 1000)
            .arg("+inf")
            .query(&mut connection)
            .unwrap()
    }

    /// `instance`'s mark for `window` in the fleet protocol: `sending`, `full`,
    /// `partial`, or none. Marks belong to runs, `<instance>/<pid>-<start>`; an
    /// instance of the tests runs once.
    pub fn mark(&self, window: WindowStart, instance: &str) -> Option<String> {
        let marks: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(format!("verve:{{{window}}}:marks"))
            .query(&mut self.connection())
            .unwrap();
        let run = format!("{instance}/");
        marks
            .into_iter()
            .find(|(name, _)| name.starts_with(&run))
            .map(|(_, mark)| mark)
    }

    /// Waits until `instance`'s mark for `window` is `mark`.
    pub fn wait_for_mark(&self, window: WindowStart, instance: &str, mark: &str) {
        super::eventually(
            Duration::from_secs(15),
            || format!("{instance}'s mark {mark} for {window}"),
            || (self.mark(window, instance).as_deref() == Some(mark)).then_some(()),
        );
    }

    /// How many ids `window` holds, split over `shards` shards.
    pub fn scard(&self, window: WindowStart, shards: usize) -> u64 {
        let mut connection = self.connection();
        self.window_sets(window, shards)
            .into_iter()
            .map(|key| -> u64 { redis::cmd("SCARD").arg(key).query(&mut connection).unwrap() })
            .sum()
    }

    /// How many sets each shard of `window` is split into, as its sentinel
    /// records (1 if none is recorded).
    pub fn sets_per_shard(&self, window: WindowStart) -> u32 {
        sets_per_shard(&mut self.connection(), window)
    }

    /// The keys of `window`'s sets, split over `shards` shards.
    pub fn window_sets(&self, window: WindowStart, shards: usize) -> Vec<String> {
        let sets = self.sets_per_shard(window);
        verve::store::window_shards("verve", window, shards)
            .iter()
            .flat_map(|shard| verve::store::window_sets(shard, sets))
            .collect()
    }

    /// A field of `window`'s published record.
    pub fn record_field(&self, window: WindowStart, field: &str) -> Option<String> {
        redis::cmd("HGET")
            .arg(format!("verve:{{{window}}}:record"))
            .arg(field)
            .query(&mut self.connection())
            .unwrap()
    }
}

/// How many sets each shard of `window` is split into, as its sentinel on one
/// server records (1 if none is recorded).
pub fn sets_per_shard(connection: &mut redis::Connection, window: WindowStart) -> u32 {
    let sets: Option<u32> = redis::cmd("HGET")
        .arg(format!("verve:{{{window}}}:rounds"))
        .arg("sets")
        .query(connection)
        .unwrap();
    sets.unwrap_or(1)
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A redis-server on loopback port `port`, without persistence, its files in
/// `dir`, its output dropped; the caller adds what its kind of server needs.
pub fn server_command(port: u16, dir: &Path) -> Command {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// A port nothing listens on right now, and never handed out before in this
/// process. The kernel may give a port just released to the next bind, and tests
/// run side by side: two clusters starting together could otherwise share a
/// port, or a new node take the port of a node an older cluster still gossips
/// with, and the two clusters merge.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if handed_out.insert(port) {
            return port;
        }
    }
}
