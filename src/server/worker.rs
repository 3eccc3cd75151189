//! A worker: one thread, one monoio runtime, one SO_REUSEPORT listener.
//!
//! Everything a worker owns lives on its thread and is shared between its
//! connection tasks through `Rc`, with `Cell`/`RefCell` instead of locks: the tasks
//! never run at the same time. The only thing that crosses threads on the request
//! path is a sealed batch of ids, sent to the aggregator over the bounded channel.
//!
//! Connections beyond the worker's cap are closed as soon as they are accepted; the
//! others are registered in its [`Registry`], whose sweep checks them against their
//! deadlines.
//!
//! The runtime has no timer: the worker's main task takes the ticks of the
//! server's [`ticker`](super::ticker) and, on the ticks that find them due, flushes
//! the batch (partial batches and the watermark, which close windows) and sweeps
//! the registry, from start to finish, shutdown included. A failed accept is
//! retried on the next tick. No other task waits for ticks: a task still waiting
//! when the runtime ends is never dropped (the channel holds its waker), and it
//! would keep the channel, and so the ticker, alive; the main task's receiver goes
//! when the worker ends.
//!
//! Shutdown: the accept loop stops, open connections are told to close (their read
//! side is shut down, so idle keep-alive clients see end-of-stream at once while
//! buffered requests are still answered), the worker waits for them up to a
//! deadline, looking again on each tick, then flushes its batch to the aggregator
//! and returns.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use monoio::net::{ListenerOpts, TcpListener, TcpStream};
use monoio::{FusionRuntime, IoUringDriver, LegacyDriver, RuntimeBuilder};

use super::connection::Connection;
use super::context::RequestContext;
use super::counters::ServerCounters;
use super::registry::{AtCapacity, Registration, Registry};
use super::ticker::Every;
use super::{ClientLimits, Driver, ServerError};
use crate::admission::Admission;
use crate::batch::{Batcher, Handoff};
use crate::callback::CallbackPolicy;
use crate::window::{WindowLength, WindowStart};

/// What a worker needs to know, copied into its thread.
#[derive(Debug, Clone)]
pub(crate) struct WorkerSettings {
    pub index: usize,
    pub addr: SocketAddr,
    pub driver: Driver,
    pub window_length: WindowLength,
    /// The window the service started in: the first one ids are stamped with.
    pub first_window: WindowStart,
    pub callback_policy: CallbackPolicy,
    pub client_limits: ClientLimits,
    pub admission: Admission,
    pub counters: ServerCounters,
    pub batch_ids: usize,
    pub flush_interval: Duration,
    pub drain: Duration,
    /// The CPU to pin this thread to, if pinning.
    pub cpu: Option<usize>,
}

/// A worker's loop state: what its connections share to answer requests, and
/// the registry its accept loop and sweep keep.
struct Worker {
    context: Rc<RequestContext>,
    connections: Rc<Registry>,
}

/// Runs a worker on the current thread until `shutdown` is dropped by its sender,
/// on the `ticks` of the server's ticker.
///
/// `ready` receives the outcome of building the runtime and binding the listener,
/// so start-up can fail with a clear error instead of a thread dying quietly.
pub(crate) fn run(
    settings: WorkerSettings,
    handoffs: flume::Sender<Handoff>,
    ticks: flume::Receiver<Instant>,
    shutdown: flume::Receiver<()>,
    ready: mpsc::Sender<Result<(), ServerError>>,
) {
    if let Some(cpu) = settings.cpu {
        if let Err(err) = super::affinity::pin_current_thread(cpu) {
            tracing::warn!(worker = settings.index, cpu, error = %err, "could not pin worker");
        }
    }
    let runtime = match build_runtime(settings.driver) {
        Ok(runtime) => runtime,
        Err(source) => {
            let _ = ready.send(Err(ServerError::Runtime {
                driver: settings.driver,
                source,
            }));
            return;
        }
    };
    let serve = serve(settings, handoffs, ticks, shutdown, ready);
    match runtime {
        FusionRuntime::Uring(mut rt) => rt.block_on(serve),
        FusionRuntime::Legacy(mut rt) => rt.block_on(serve),
    }
}

type WorkerRuntime = FusionRuntime<IoUringDriver, LegacyDriver>;

/// A runtime without a timer driver, which would cost every park two clock reads
/// and a walk of its wheel: the ticker keeps time instead.
fn build_runtime(driver: Driver) -> io::Result<WorkerRuntime> {
    Ok(match driver {
        Driver::Uring => RuntimeBuilder::<IoUringDriver>::new().build()?.into(),
        Driver::Epoll => RuntimeBuilder::<LegacyDriver>::new().build()?.into(),
    })
}

async fn serve(
    settings: WorkerSettings,
    handoffs: flume::Sender<Handoff>,
    ticks: flume::Receiver<Instant>,
    shutdown: flume::Receiver<()>,
    ready: mpsc::Sender<Result<(), ServerError>>,
) {
    let options = ListenerOpts::new().reuse_port(true).reuse_addr(true);
    let listener = match TcpListener::bind_with_config(settings.addr, &options) {
        Ok(listener) => listener,
        Err(source) => {
            let _ = ready.send(Err(ServerError::Bind {
                addr: settings.addr,
                source,
            }));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut chores = Chores::new(
        settings.flush_interval,
        settings.client_limits.timeouts.sweep_interval(),
        Instant::now(),
    );
    let counters = settings.counters.register();
    let limits = settings.client_limits;
    let worker = Worker {
        context: Rc::new(RequestContext::new(
            settings.window_length,
            settings.callback_policy,
            limits.request,
            Batcher::new(
                handoffs,
                settings.batch_ids,
                settings.admission,
                settings.index,
                settings.first_window,
            ),
            counters.clone(),
        )),
        connections: Rc::new(Registry::new(
            limits.timeouts,
            limits.connections_per_worker,
            counters.connections.clone(),
        )),
    };

    accept_until_shutdown(&listener, &worker, &ticks, &mut chores, shutdown).await;
    drop(listener);
    drain(&worker, &ticks, &mut chores, settings.drain).await;
    worker.context.finish();
    tracing::debug!(worker = settings.index, "worker stopped");
}

/// What a worker does on the ticks that find it due.
struct Chores {
    /// Flushing sends partly filled batches and this worker's watermark: a window
    /// closes on the flush after its end once every worker has had one, and a
    /// worker that sends nothing still lets windows close. It goes on while
    /// connections drain at shutdown, until the final flush.
    flush: Every,
    /// The registry's sweep, which closes connections past their deadlines.
    sweep: Every,
}

impl Chores {
    fn new(flush_interval: Duration, sweep_interval: Duration, start: Instant) -> Chores {
        Chores {
            flush: Every::new(flush_interval, start),
            sweep: Every::new(sweep_interval, start),
        }
    }

    /// Does what is due on the tick due at `tick`.
    fn on_tick(&mut self, worker: &Worker, tick: Instant) {
        // Every tick moves the registry's clock, so that it lags by a tick at most
        // (ticks are at least as frequent as sweeps) wherever the sweeps fall.
        worker.connections.set_clock(Instant::now());
        if self.flush.due(tick) {
            worker.context.flush();
        }
        if self.sweep.due(tick) {
            worker.connections.sweep();
        }
    }
}

async fn accept_until_shutdown(
    listener: &TcpListener,
    worker: &Worker,
    ticks: &flume::Receiver<Instant>,
    chores: &mut Chores,
    shutdown: flume::Receiver<()>,
) {
    let mut stop = std::pin::pin!(shutdown.recv_async());
    let mut next_tick = std::pin::pin!(ticks.recv_async());
    // Kept across ticks: dropping an accept in flight cancels it, and with io_uring
    // loses a connection it accepted in the meantime.
    let mut accept = std::pin::pin!(listener.accept());
    // Set by a failed accept, cleared by the next tick.
    let mut backing_off = false;
    loop {
        monoio::select! {
            _ = &mut stop => return,
            Ok(tick) = &mut next_tick => {
                next_tick.set(ticks.recv_async());
                chores.on_tick(worker, tick);
                backing_off = false;
            }
            accepted = &mut accept, if !backing_off => {
                accept.set(listener.accept());
                match accepted {
                    Ok((stream, _peer)) => match worker.connections.register(stream.as_raw_fd()) {
                        Ok(registration) => {
                            let context = worker.context.clone();
                            monoio::spawn(serve_connection(stream, registration, context));
                        }
                        // Dropping the stream closes it at once: the client sees the end.
                        Err(AtCapacity) => drop(stream),
                    },
                    Err(err) => {
                        // Usually EMFILE/ENFILE: back off instead of spinning on the error.
                        tracing::warn!(error = %err, "accept failed");
                        backing_off = true;
                    }
                }
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    registration: Registration,
    context: Rc<RequestContext>,
) {
    // Responses go out in one write per read; Nagle would only add latency.
    let _ = stream.set_nodelay(true);
    if let Err(err) = Connection::new(stream, registration).run(context).await {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

/// Lets open connections finish, closing idle ones, for at most `limit`, looking
/// again on each tick (and doing its chores).
async fn drain(
    worker: &Worker,
    ticks: &flume::Receiver<Instant>,
    chores: &mut Chores,
    limit: Duration,
) {
    worker.context.start_draining();
    worker.connections.shut_reads();
    let deadline = Instant::now() + limit;
    while worker.connections.len() > 0 && Instant::now() < deadline {
        // Disconnected only if the ticker died: then no tick will come to wait for.
        let Ok(tick) = ticks.recv_async().await else {
            break;
        };
        chores.on_tick(worker, tick);
    }
    let left = worker.connections.len();
    if left > 0 {
        tracing::warn!(
            connections = left,
            "closing connections still open after the drain deadline"
        );
    }
}
