//! A real HTTP endpoint for callback tests: a std TCP server on a loopback port
//! that records every request and answers as told (a status, after a delay, once
//! the test releases it, or never).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the receiver answers.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    Status(u16),
    /// The status, after holding the request this long.
    Delayed(u16, Duration),
    /// The status, once the test calls [`Receiver::release`]; requests are
    /// recorded as they arrive.
    Held(u16),
    /// Read the request, never answer.
    Never,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Call {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The JSON body, parsed.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

#[derive(Default)]
struct State {
    calls: Mutex<Vec<Call>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    released: AtomicBool,
    stopped: AtomicBool,
}

pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Receiver {
    pub fn start(answer: Answer) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if shared.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, &state, answer));
            }
        });
        Receiver { addr, state }
    }

    /// `http://127.0.0.1:<port><path_and_query>`
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    /// Waits until at least `n` calls have arrived and returns all of them.
    pub fn wait_for_calls(&self, n: usize, limit: Duration) -> Vec<Call> {
        let what = || format!("{n} calls: {:?}", self.calls());
        super::eventually(limit, what, || {
            Some(self.calls()).filter(|calls| calls.len() >= n)
        })
    }

    /// Waits until a call satisfies `matches`, and returns it.
    pub fn wait_for_call(&self, limit: Duration, matches: impl Fn(&Call) -> bool) -> Call {
        let what = || format!("a matching call: {:?}", self.calls());
        super::eventually(limit, what, || {
            self.calls().into_iter().find(|c| matches(c))
        })
    }

    /// Lets [`Answer::Held`] requests be answered, those waiting and any later.
    pub fn release(&self) {
        self.state.released.store(true, Ordering::SeqCst);
    }

    /// The most requests that were being answered at the same moment.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

fn serve(stream: TcpStream, state: &State, answer: Answer) {
    let mut reader = BufReader::new(stream);
    loop {
        let Some(call) = read_request(&mut reader) else {
            return;
        };
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        state.calls.lock().unwrap().push(call);
        let status = match answer {
            Answer::Status(status) => status,
            Answer::Delayed(status, delay) => {
                std::thread::sleep(delay);
                status
            }
            Answer::Held(status) => {
                while !state.released.load(Ordering::SeqCst) {
                    if state.stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                status
            }
            Answer::Never => {
                while !state.stopped.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
        };
        state.in_flight.fetch_sub(1, Ordering::SeqCst);
        let response = format!("HTTP/1.1 {status} Whatever\r\ncontent-length: 0\r\n\r\n");
        if reader.get_mut().write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Call> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let len = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Call {
        method,
        target,
        headers,
        body: String::from_utf8(body).unwrap(),
    })
}
