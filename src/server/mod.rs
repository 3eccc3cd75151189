//! The HTTP front: listeners, worker threads, connections, request parsing, responses.
//!
//! `Workers::start` claims the address, then starts one thread per worker, each
//! with its own monoio runtime and its own SO_REUSEPORT listener on that address:
//! the kernel spreads incoming connections over the listeners, and a connection
//! stays on the worker that accepted it for its whole life. One more thread, the
//! ticker (`ticker.rs`), keeps time for all the workers, whose runtimes have no
//! timer.

pub mod affinity;
mod buffers;
mod connection;
mod context;
mod counter;
pub mod counters;
mod error;
pub mod file_limit;
mod handler;
pub mod query;
pub mod registry;
pub mod response;
mod ticker;
mod worker;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use crate::admission::Admission;
use crate::batch::Handoff;
use crate::callback::CallbackPolicy;
use crate::config::{Config, IoDriver};
use crate::http;
use crate::window::WindowStart;
use counters::ServerCounters;
use ticker::Ticker;
use worker::WorkerSettings;

pub use error::ServerError;
pub use handler::ACCEPT_PATH;

/// How much a client may ask of the server before it is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    pub request: http::Limits,
    pub timeouts: registry::Timeouts,
    /// Connections one worker holds at most; more are closed as they arrive.
    pub connections_per_worker: usize,
}

impl ClientLimits {
    /// The limits `config` sets, with `connections_per_worker`, the cap start-up
    /// settled on.
    pub fn from_config(config: &Config, connections_per_worker: usize) -> Self {
        ClientLimits {
            request: http::Limits {
                head_bytes: config.max_head_bytes as usize,
                request_line_bytes: config.max_request_line_bytes as usize,
                headers: usize::from(config.max_headers),
                body_bytes: config.max_body_bytes as usize,
            },
            timeouts: registry::Timeouts {
                head: Duration::from_millis(config.head_timeout_ms),
                idle: Duration::from_millis(config.idle_timeout_ms),
                write: Duration::from_millis(config.write_timeout_ms),
            },
            connections_per_worker,
        }
    }
}

/// The I/O driver the workers actually run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Uring,
    Epoll,
}

impl Driver {
    /// Turns the configured choice into a driver this kernel can run.
    pub fn resolve(choice: IoDriver) -> Result<Driver, ServerError> {
        let uring = monoio::utils::detect_uring();
        match choice {
            IoDriver::Auto if uring => Ok(Driver::Uring),
            IoDriver::Auto | IoDriver::Epoll => Ok(Driver::Epoll),
            IoDriver::Uring if uring => Ok(Driver::Uring),
            IoDriver::Uring => Err(ServerError::UringUnavailable),
        }
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::Uring => "io_uring",
            Driver::Epoll => "epoll",
        })
    }
}

/// The address the workers will listen on, held for them from the check until
/// they have bound it themselves (drop it then).
pub struct ClaimedAddress {
    pub addr: SocketAddr,
    /// Bound with SO_REUSEPORT and never listening: the workers' SO_REUSEPORT
    /// binds share the port with it, no connection is ever routed to it, and
    /// nothing else can take the port meanwhile. Start-up talks to Redis and
    /// Kafka between the check and the workers' binds, which can take seconds,
    /// and a port the kernel chose (port 0) would be anyone's in that time.
    _hold: Socket,
}

/// Makes sure no other process listens on `addr`, resolves port 0 to a real
/// port, and holds the port until the workers bind it.
///
/// SO_REUSEPORT would let a second process bind the same port and silently take
/// half the connections. A socket bound *without* SO_REUSEPORT conflicts with any
/// listener on the port, so binding one (and closing it again) is the check.
pub fn claim_address(addr: SocketAddr) -> Result<ClaimedAddress, ServerError> {
    let probe = || -> io::Result<SocketAddr> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        // Lets a restart bind while old connections linger in TIME_WAIT; still
        // conflicts with a listening socket.
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("bound address is not an IP address"))
    };
    let claimed = probe().map_err(|source| ServerError::Bind { addr, source })?;
    let hold = || -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(claimed), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&claimed.into())?;
        Ok(socket)
    };
    let hold = hold().map_err(|source| ServerError::Bind {
        addr: claimed,
        source,
    })?;
    Ok(ClaimedAddress {
        addr: claimed,
        _hold: hold,
    })
}

/// Where workers hand the ids they accept.
pub(crate) struct Intake {
    /// The channel to the aggregator.
    pub handoffs: flume::Sender<Handoff>,
    /// The window the service started in: no id is stamped with an earlier one.
    pub first_window: WindowStart,
    /// Closed by the store when it cannot take more ids.
    pub admission: Admission,
}

/// The running worker threads, and the ticker that keeps their time.
pub(crate) struct Workers {
    threads: Vec<JoinHandle<()>>,
    /// Dropping it tells every worker to stop.
    shutdown: flume::Sender<()>,
    ticker: Ticker,
}

impl Workers {
    /// Starts the workers on `addr` (already claimed) and waits until each listens.
    pub(crate) fn start(
        config: &Config,
        addr: SocketAddr,
        driver: Driver,
        client_limits: ClientLimits,
        callback_policy: &CallbackPolicy,
        counters: &ServerCounters,
        intake: &Intake,
    ) -> Result<Workers, ServerError> {
        let count = config.worker_count();
        let cpus = match config.pin_workers {
            true => affinity::allowed_cpus().unwrap_or_default(),
            false => Vec::new(),
        };
        // Ticks as often as the more frequent of the flush and the sweep.
        let period = config
            .flush_interval()
            .min(client_limits.timeouts.sweep_interval());
        let (ticker, ticks) = Ticker::start(period, count).map_err(ServerError::Thread)?;
        let (shutdown, stop) = flume::bounded::<()>(0);
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut workers = Workers {
            threads: Vec::with_capacity(count),
            shutdown,
            ticker,
        };
        for (index, ticks) in ticks.into_iter().enumerate() {
            let settings = WorkerSettings {
                index,
                addr,
                driver,
                window_length: config.window_length(),
                first_window: intake.first_window,
                callback_policy: callback_policy.clone(),
                client_limits,
                admission: intake.admission.clone(),
                counters: counters.clone(),
                batch_ids: config.batch_ids as usize,
                flush_interval: config.flush_interval(),
                drain: config.shutdown_drain(),
                cpu: (!cpus.is_empty()).then(|| cpus[index % cpus.len()]),
            };
            let (handoffs, stop, ready) = (intake.handoffs.clone(), stop.clone(), ready_tx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("verve-worker-{index}"))
                .spawn(move || worker::run(settings, handoffs, ticks, stop, ready))
                .map_err(ServerError::Thread)?;
            workers.threads.push(thread);
        }
        drop(ready_tx);
        for _ in 0..count {
            let outcome = ready_rx.recv().unwrap_or_else(|_| {
                Err(ServerError::Thread(io::Error::other(
                    "a worker died while starting",
                )))
            });
            if let Err(err) = outcome {
                workers.stop();
                return Err(err);
            }
        }
        Ok(workers)
    }

    /// Stops accepting, lets connections drain, flushes, and waits for every worker,
    /// then for the ticker, which the workers needed until their end.
    pub(crate) fn stop(self) {
        drop(self.shutdown);
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
        self.ticker.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_defaults_are_the_servers_own() {
        let config = Config::load_from(["verve"]).unwrap();
        let limits = ClientLimits::from_config(&config, 7);
        assert_eq!(limits.request, crate::http::Limits::DEFAULT);
        assert_eq!(limits.timeouts, registry::Timeouts::DEFAULT);
        assert_eq!(limits.connections_per_worker, 7);
    }
}
