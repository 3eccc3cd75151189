//! A worker: one thread, one monoio runtime, one SO_REUSEPORT listener.
//!
//! Everything a worker owns lives on its thread and is shared between its
//! connection tasks through `Rc`, with `Cell`/`RefCell` instead of locks: the tasks
//! never run at the same time. The only thing that crosses threads on the request
//! path is a sealed batch of ids, sent to the aggregator over the bounded channel.
//!
//! Connections beyond the worker's cap are closed as soon as they are accepted; the
//! others are registered in its [`Registry`], which a sweep task checks against
//! their deadlines.
//!
//! Shutdown: the accept loop stops, open connections are told to close (their read
//! side is shut down, so idle keep-alive clients see end-of-stream at once while
//! buffered requests are still answered), the worker waits for them up to a
//! deadline, then flushes its batch to the aggregator and returns.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use monoio::net::{ListenerOpts, TcpListener, TcpStream};
use monoio::time::TimeDriver;
use monoio::{FusionRuntime, IoUringDriver, LegacyDriver, RuntimeBuilder};

use super::connection::Connection;
use super::counters::{ServerCounters, WorkerCounters};
use super::registry::{AtCapacity, Registration, Registry};
use super::request::Limits;
use super::{ClientLimits, Driver, ServerError};
use crate::admission::Admission;
use crate::batch::{Batcher, Handoff, Overloaded};
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

/// State shared by the tasks of one worker thread.
pub(crate) struct Worker {
    window_length: WindowLength,
    /// This worker's request counters, summed into `/metrics`.
    counters: Arc<WorkerCounters>,
    callback_policy: CallbackPolicy,
    limits: Limits,
    batcher: RefCell<Batcher>,
    connections: Rc<Registry>,
    draining: Cell<bool>,
}

impl Worker {
    pub(crate) fn new(
        window_length: WindowLength,
        callback_policy: CallbackPolicy,
        client_limits: ClientLimits,
        batcher: Batcher,
        counters: &ServerCounters,
    ) -> Self {
        let counters = counters.register();
        let connections = Registry::new(
            client_limits.timeouts,
            client_limits.connections_per_worker,
            counters.clone(),
        );
        Worker {
            window_length,
            counters,
            callback_policy,
            limits: client_limits.request,
            batcher: RefCell::new(batcher),
            connections: Rc::new(connections),
            draining: Cell::new(false),
        }
    }

    #[inline]
    pub(crate) fn window_of(&self, t: SystemTime) -> WindowStart {
        self.window_length.window_of(t)
    }

    /// Accepts an id (and its request's endpoint) into its window's batch, or
    /// refuses it under overload.
    #[inline]
    pub(crate) fn accept(
        &self,
        window: WindowStart,
        id: i64,
        endpoint: Option<&str>,
    ) -> Result<(), Overloaded> {
        self.batcher.borrow_mut().push(window, id, endpoint)
    }

    pub(crate) fn counters(&self) -> &WorkerCounters {
        &self.counters
    }

    /// How large a request may be.
    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The operator's rules for callback targets.
    pub(crate) fn callback_policy(&self) -> &CallbackPolicy {
        &self.callback_policy
    }

    /// Whether the worker is shutting down, so connections close once what they
    /// have received is answered.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// Sends the batch in progress, if there is one, and passes the windows before
    /// the current one (see [`Batcher::flush`]).
    pub(crate) fn flush(&self) {
        let now = self.window_of(SystemTime::now());
        self.batcher.borrow_mut().flush(now);
    }

    pub(crate) fn start_draining(&self) {
        self.draining.set(true);
    }
}

/// Runs a worker on the current thread until `shutdown` is dropped by its sender.
///
/// `ready` receives the outcome of building the runtime and binding the listener,
/// so start-up can fail with a clear error instead of a thread dying quietly.
pub(crate) fn run(
    settings: WorkerSettings,
    handoffs: flume::Sender<Handoff>,
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
    match runtime {
        FusionRuntime::Uring(mut rt) => rt.block_on(serve(settings, handoffs, shutdown, ready)),
        FusionRuntime::Legacy(mut rt) => rt.block_on(serve(settings, handoffs, shutdown, ready)),
    }
}

type WorkerRuntime = FusionRuntime<TimeDriver<IoUringDriver>, TimeDriver<LegacyDriver>>;

fn build_runtime(driver: Driver) -> io::Result<WorkerRuntime> {
    Ok(match driver {
        Driver::Uring => RuntimeBuilder::<IoUringDriver>::new()
            .enable_timer()
            .build()?
            .into(),
        Driver::Epoll => RuntimeBuilder::<LegacyDriver>::new()
            .enable_timer()
            .build()?
            .into(),
    })
}

async fn serve(
    settings: WorkerSettings,
    handoffs: flume::Sender<Handoff>,
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
    let sweep_interval = settings.client_limits.timeouts.sweep_interval();
    let worker = Rc::new(Worker::new(
        settings.window_length,
        settings.callback_policy,
        settings.client_limits,
        Batcher::new(
            handoffs,
            settings.batch_ids,
            settings.admission,
            settings.index,
            settings.first_window,
        ),
        &settings.counters,
    ));
    // Flushing sends partly filled batches and this worker's watermark: a window
    // closes on the flush tick after its end once every worker has had one, and a
    // worker that sends nothing still lets windows close. Both go on while
    // connections drain at shutdown, until the final flush.
    monoio::spawn(every(
        worker.clone(),
        settings.flush_interval,
        Worker::flush,
    ));
    monoio::spawn(every(worker.clone(), sweep_interval, |worker| {
        worker.connections.sweep(Instant::now())
    }));

    accept_until_shutdown(&listener, &worker, shutdown).await;
    drop(listener);
    drain(&worker, settings.drain).await;
    worker.batcher.borrow_mut().finish();
    tracing::debug!(worker = settings.index, "worker stopped");
}

async fn accept_until_shutdown(
    listener: &TcpListener,
    worker: &Rc<Worker>,
    shutdown: flume::Receiver<()>,
) {
    let stop = shutdown.recv_async();
    let mut stop = std::pin::pin!(stop);
    loop {
        monoio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => match worker.connections.register(stream.as_raw_fd()) {
                    Ok(registration) => {
                        monoio::spawn(serve_connection(stream, registration, worker.clone()));
                    }
                    // Dropping the stream closes it at once: the client sees the end.
                    Err(AtCapacity) => drop(stream),
                },
                Err(err) => {
                    // Usually EMFILE/ENFILE: back off instead of spinning on the error.
                    tracing::warn!(error = %err, "accept failed");
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, registration: Registration, worker: Rc<Worker>) {
    // Responses go out in one write per read; Nagle would only add latency.
    let _ = stream.set_nodelay(true);
    if let Err(err) = Connection::new(stream, registration).run(worker).await {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

/// Runs `tick` every `interval` until the worker's batcher has sent its last batch.
async fn every(worker: Rc<Worker>, interval: Duration, tick: fn(&Worker)) {
    while !worker.batcher.borrow().is_finished() {
        monoio::time::sleep(interval).await;
        tick(&worker);
    }
}

/// Lets open connections finish, closing idle ones, for at most `limit`.
async fn drain(worker: &Rc<Worker>, limit: Duration) {
    worker.start_draining();
    worker.connections.shut_reads();
    let deadline = Instant::now() + limit;
    while worker.connections.len() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    let left = worker.connections.len();
    if left > 0 {
        tracing::warn!(
            connections = left,
            "closing connections still open after the drain deadline"
        );
    }
}
