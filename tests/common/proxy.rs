//! A TCP proxy on a free loopback port that can hold traffic: while held, bytes
//! read from either side wait in the proxy, as on a stalled network link; released,
//! they flow on, in order. Connections stay open throughout.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

pub struct Proxy {
    pub port: u16,
    gate: Arc<Gate>,
    stopped: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
}

/// Open or held; pumps wait on it before each write.
#[derive(Default)]
struct Gate {
    held: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    fn set(&self, held: bool) {
        *self.held.lock().unwrap() = held;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.changed.wait(held).unwrap();
        }
    }
}

impl Proxy {
    /// Forwards connections to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = Proxy {
            port: listener.local_addr().unwrap().port(),
            gate: Arc::default(),
            stopped: Arc::default(),
            connections: Arc::default(),
        };
        let (gate, stopped, connections) = (
            proxy.gate.clone(),
            proxy.stopped.clone(),
            proxy.connections.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let mut open = connections.lock().unwrap();
                open.push(client.try_clone().unwrap());
                open.push(server.try_clone().unwrap());
                drop(open);
                pump(&client, &server, &gate);
                pump(&server, &client, &gate);
            }
        });
        proxy
    }

    /// From now on, nothing passes.
    pub fn hold(&self) {
        self.gate.set(true);
    }

    /// What waited flows on, and everything after it.
    pub fn release(&self) {
        self.gate.set(false);
    }
}

/// Copies `from` to `to` on a thread of its own, waiting at the gate before each write.
fn pump(from: &TcpStream, to: &TcpStream, gate: &Arc<Gate>) {
    let (mut from, mut to, gate) = (
        from.try_clone().unwrap(),
        to.try_clone().unwrap(),
        gate.clone(),
    );
    std::thread::spawn(move || {
        let mut buf = vec![0; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    gate.pass();
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.release();
        for stream in self.connections.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        // Wakes the accept loop so that it sees `stopped`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
