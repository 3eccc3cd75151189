//! The client threads of a chaos run and their log.
//!
//! Each thread sends ids to one instance, one request at a time on a keep-alive
//! connection, at its current address (a restarted instance has a new one), and
//! logs every request it sent: the id, which run answered, when it was sent and
//! when the answer came, and what came: `ok`, a refusal (503: not counted), or
//! nothing (the connection broke or timed out after the request was written: the
//! id may or may not count). Half the ids come from a small range all threads
//! share, so instances share many; half from a wide one, so that most of those
//! are new and a lost one shows. No request is sent within [`QUIET`] of a window
//! boundary: an `ok` whose request was sent and answered within one window
//! belongs to that window, as the instance reads the clock between the two.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::fleet::Directory;
use super::rng::Rng;

/// No request goes out this close to a window boundary, before or after.
pub const QUIET: Duration = Duration::from_millis(150);
/// Shared ids come from `0..SHARED_IDS` (about as many as a window's requests
/// over all threads), the others from `SHARED_IDS..WIDE_IDS`.
const SHARED_IDS: u64 = 2000;
const WIDE_IDS: u64 = 1 << 40;
/// A pause between two requests of one thread.
const PACE: Duration = Duration::from_millis(8);
/// Longest wait for an answer: longer than any pause of an instance.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `200 ok`: the id counts in its window.
    Ok,
    /// Another answer (503 while the fleet has not taken the run in): not counted.
    Refused,
    /// No answer: the connection broke, or the wait timed out. Counted or not.
    Unknown { timed_out: bool },
}

#[derive(Debug, Clone)]
pub struct Request {
    pub id: i64,
    pub instance: usize,
    /// The run of the instance the connection was made to.
    pub run: u32,
    pub sent: SystemTime,
    /// When the answer (or the error) came.
    pub answered: SystemTime,
    pub outcome: Outcome,
}

pub struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    log: Log,
}

/// Every request so far, in the order they were answered.
type Log = Arc<Mutex<Vec<Request>>>;

impl Clients {
    /// `per_instance` threads for each instance of `directory`, ids drawn from
    /// `seed`, for windows of `window`.
    pub fn start(seed: u64, directory: &Directory, per_instance: usize, window: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Log::default();
        let mut threads = Vec::new();
        for instance in 0..directory.len() {
            for k in 0..per_instance {
                let stream = (instance * per_instance + k) as u64 + 1;
                let mut thread = Thread {
                    instance,
                    directory: directory.clone(),
                    rng: Rng::stream(seed, stream),
                    window,
                    connection: None,
                    log: log.clone(),
                };
                let stop = stop.clone();
                threads.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        thread.step();
                    }
                }));
            }
        }
        Clients { stop, threads, log }
    }

    /// The `ok`s run `run` of `instance` answered since `since`: (id, answered).
    pub fn oks_of(&self, instance: usize, run: u32, since: SystemTime) -> Vec<(i64, SystemTime)> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|r| r.answered >= since)
            .filter(|r| (r.instance, r.run, r.outcome) == (instance, run, Outcome::Ok))
            .map(|r| (r.id, r.answered))
            .collect()
    }

    /// Stops every thread after its request in flight, and returns the log.
    pub fn stop(self) -> Vec<Request> {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().expect("client thread");
        }
        let mut log = std::mem::take(&mut *self.log.lock().unwrap());
        log.sort_by_key(|r| r.sent);
        log
    }
}

struct Thread {
    instance: usize,
    directory: Directory,
    rng: Rng,
    window: Duration,
    /// The connection, and the run it reaches.
    connection: Option<(BufReader<TcpStream>, u32)>,
    log: Log,
}

impl Thread {
    fn step(&mut self) {
        std::thread::sleep(PACE);
        wait_out_boundary(self.window);
        let target = *self.directory[self.instance].lock().unwrap();
        let Some(target) = target else {
            self.connection = None;
            std::thread::sleep(Duration::from_millis(20));
            return;
        };
        if self.connection.as_ref().map(|c| c.1) != Some(target.run) {
            match connect(target.addr) {
                Ok(stream) => self.connection = Some((BufReader::new(stream), target.run)),
                Err(_) => {
                    // Down, or not listening yet: nothing was sent.
                    self.connection = None;
                    std::thread::sleep(Duration::from_millis(20));
                    return;
                }
            }
        }
        let id = if self.rng.chance(50) {
            self.rng.below(SHARED_IDS)
        } else {
            SHARED_IDS + self.rng.below(WIDE_IDS - SHARED_IDS)
        } as i64;
        let (reader, run) = self.connection.as_mut().unwrap();
        let run = *run;
        let sent = SystemTime::now();
        let request = format!("GET /api/verve/accept?id={id} HTTP/1.1\r\nHost: t\r\n\r\n");
        if reader.get_mut().write_all(request.as_bytes()).is_err() {
            // Nothing (or part of a request) reached the instance: it may still
            // have read it all, so the id may count.
            self.note(id, run, sent, Outcome::Unknown { timed_out: false });
            self.connection = None;
            return;
        }
        let outcome = match read_answer(reader) {
            Ok((200, body)) if body == "ok" => Outcome::Ok,
            Ok(_) => Outcome::Refused,
            Err(err) => {
                self.connection = None;
                let timed_out = matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
                Outcome::Unknown { timed_out }
            }
        };
        self.note(id, run, sent, outcome);
    }

    fn note(&mut self, id: i64, run: u32, sent: SystemTime, outcome: Outcome) {
        self.log.lock().unwrap().push(Request {
            id,
            instance: self.instance,
            run,
            sent,
            answered: SystemTime::now(),
            outcome,
        });
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// The status and body of one response.
fn read_answer(reader: &mut BufReader<TcpStream>) -> std::io::Result<(u16, String)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| bad("content-length"))?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sleeps past the next window boundary (and [`QUIET`] after it) when it is
/// less than [`QUIET`] away, or the last one was less than [`QUIET`] ago.
fn wait_out_boundary(window: Duration) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into = Duration::from_nanos((now.as_nanos() % window.as_nanos()) as u64);
    if into + QUIET >= window {
        std::thread::sleep(window - into + QUIET);
    } else if into < QUIET {
        std::thread::sleep(QUIET - into);
    }
}
