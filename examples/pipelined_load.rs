//! A closed-loop, pipelined load for `loadtest/pipelined.py`: cheap enough that one
//! core of it keeps one worker of a server busy (a Lua script in wrk is not), and
//! able to take turns between servers, so that they are compared under the same
//! conditions.
//!
//!     pipelined_load <connections> <depth> <ids> <warmup_ms> <slice_ms> <slices> <addr>=<pid>...
//!
//! One thread, `connections` connections to each server; each connection writes
//! `depth` requests in one write and reads their answers before writing again.
//! Servers take turns: after a warm-up of `warmup_ms` each, `slices` slices of
//! `slice_ms`, only one server loaded at a time; a turn loads each server once,
//! the next turn starting one server later. Around each slice it
//! reads the server's CPU time (every thread's, from `/proc/<pid>/task/*/schedstat`,
//! in nanoseconds) and prints `slice=K server=I requests=N seconds=S cpu_seconds=C`.
//!
//! Each server's requests carry ids counting up over `ids` values again and again
//! (so that after the first pass every id repeats), or without end when `ids` is 0:
//! every id new. Every answer must be `200 ok`; anything else ends the run with an
//! error.

use std::cell::Cell;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::{LegacyDriver, RuntimeBuilder};

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";

struct Plan {
    connections: usize,
    depth: usize,
    ids: u64,
    warmup: Duration,
    slice: Duration,
    slices: usize,
    servers: Vec<(SocketAddr, u32)>,
}

impl Plan {
    fn parse(args: &[String]) -> Option<Plan> {
        let [connections, depth, ids, warmup_ms, slice_ms, slices, servers @ ..] = args else {
            return None;
        };
        let servers = servers
            .iter()
            .map(|server| {
                let (addr, pid) = server.split_once('=')?;
                Some((addr.parse().ok()?, pid.parse().ok()?))
            })
            .collect::<Option<Vec<_>>>()
            .filter(|servers| !servers.is_empty())?;
        Some(Plan {
            connections: connections.parse().ok().filter(|&c| c > 0)?,
            depth: depth.parse().ok().filter(|&d| d > 0)?,
            ids: ids.parse().ok()?,
            warmup: Duration::from_millis(warmup_ms.parse().ok()?),
            slice: Duration::from_millis(slice_ms.parse().ok()?),
            slices: slices.parse().ok()?,
            servers,
        })
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(plan) = Plan::parse(&args) else {
        eprintln!(
            "usage: pipelined_load <connections> <depth> <ids> <warmup_ms> <slice_ms> <slices> <addr>=<pid>..."
        );
        return ExitCode::from(2);
    };
    let mut runtime = RuntimeBuilder::<LegacyDriver>::new()
        .build()
        .expect("epoll runtime");
    match runtime.block_on(run(plan)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pipelined_load: {err}");
            ExitCode::FAILURE
        }
    }
}

/// One server under load: its connections, its ids, its process.
struct Server {
    streams: Vec<TcpStream>,
    ids: Rc<Ids>,
    pid: u32,
}

async fn run(plan: Plan) -> std::io::Result<()> {
    let mut servers = Vec::new();
    for &(addr, pid) in &plan.servers {
        let mut streams = Vec::with_capacity(plan.connections);
        for _ in 0..plan.connections {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            streams.push(stream);
        }
        let ids = Rc::new(Ids {
            range: plan.ids,
            sent: Cell::new(0),
        });
        servers.push(Server { streams, ids, pid });
    }
    for server in &mut servers {
        load(server, plan.depth, plan.warmup).await?;
    }
    let n = servers.len();
    for slice in 0..plan.slices {
        // Turn t visits every server once, starting at server t: no server is
        // always the one right after another.
        let index = (slice % n + slice / n) % n;
        let server = &mut servers[index];
        let cpu_before = cpu_seconds(server.pid)?;
        let started = Instant::now();
        let requests = load(server, plan.depth, plan.slice).await?;
        let took = started.elapsed();
        let cpu = cpu_seconds(server.pid)? - cpu_before;
        println!(
            "slice={slice} server={index} requests={requests} seconds={:.6} cpu_seconds={cpu:.6}",
            took.as_secs_f64()
        );
    }
    Ok(())
}

/// Loads `server` through all its connections for `how_long`; returns the
/// requests answered.
async fn load(server: &mut Server, depth: usize, how_long: Duration) -> std::io::Result<u64> {
    let deadline = Instant::now() + how_long;
    let tasks: Vec<_> = server
        .streams
        .drain(..)
        .map(|stream| monoio::spawn(connection(stream, depth, deadline, server.ids.clone())))
        .collect();
    let mut requests = 0;
    for task in tasks {
        let (stream, answered) = task.await?;
        server.streams.push(stream);
        requests += answered;
    }
    Ok(requests)
}

/// Sends groups of `depth` requests until `deadline`; returns the connection and
/// the requests answered.
async fn connection(
    mut stream: TcpStream,
    depth: usize,
    deadline: Instant,
    ids: Rc<Ids>,
) -> std::io::Result<(TcpStream, u64)> {
    let expected = OK.len() * depth;
    let mut out = Vec::with_capacity(64 * depth);
    let mut answers = Vec::with_capacity(expected);
    let mut answered = 0;
    while Instant::now() < deadline {
        out.clear();
        for _ in 0..depth {
            out.extend_from_slice(b"GET /api/verve/accept?id=");
            push_decimal(&mut out, ids.next());
            out.extend_from_slice(b" HTTP/1.1\r\nhost: verve\r\n\r\n");
        }
        let (written, returned) = stream.write_all(out).await;
        out = returned;
        written?;
        answers.clear();
        while answers.len() < expected {
            let (len, capacity) = (answers.len(), answers.capacity());
            let (read, returned) = stream.read(answers.slice_mut(len..capacity)).await;
            answers = returned.into_inner();
            if read? == 0 {
                return Err(std::io::Error::other("the server closed the connection"));
            }
        }
        if answers.chunks(OK.len()).any(|answer| answer != OK) {
            return Err(std::io::Error::other(format!(
                "an answer other than 200 ok: {:?}",
                String::from_utf8_lossy(&answers)
            )));
        }
        answered += depth as u64;
    }
    Ok((stream, answered))
}

/// The CPU time of every thread of process `pid` so far: the first field of each
/// thread's schedstat, in nanoseconds (the clock ticks of `/proc/<pid>/stat` are
/// too coarse for slices of a second).
fn cpu_seconds(pid: u32) -> std::io::Result<f64> {
    let mut nanos = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue; // a thread that ended
        };
        nanos += stat
            .split_whitespace()
            .next()
            .and_then(|field| field.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(nanos as f64 / 1e9)
}

/// The ids of one server's requests, shared by its connections (one thread).
struct Ids {
    /// Ids cycle over `0..range`; 0: they never repeat.
    range: u64,
    sent: Cell<u64>,
}

impl Ids {
    fn next(&self) -> u64 {
        let n = self.sent.get();
        self.sent.set(n + 1);
        if self.range == 0 {
            n
        } else {
            n % self.range
        }
    }
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}
