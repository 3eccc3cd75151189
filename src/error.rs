//! Why the service could not start, each as one line that says what to do.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::server::Driver;
use crate::sink::log::OpenError;

#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    /// Another process listens on the address.
    AddressInUse(SocketAddr),
    Bind {
        addr: SocketAddr,
        source: io::Error,
    },
    /// Another process listens on the operations address.
    AdminAddressInUse(SocketAddr),
    AdminBind {
        addr: SocketAddr,
        source: io::Error,
    },
    /// `VERVE_IO_DRIVER=uring` on a kernel or in a sandbox without io_uring.
    UringUnavailable,
    /// The worker runtime could not be built (io_uring limits, usually).
    Runtime {
        driver: Driver,
        source: io::Error,
    },
    CountLog(OpenError),
    /// The Redis store could not be set up (a bad URL, usually).
    Redis(String),
    /// The Kafka producer could not be created (bad settings).
    Kafka(String),
    /// The Redis stream sink could not be set up (a bad URL, usually).
    RedisStream(String),
    Thread(io::Error),
}

impl StartError {
    /// Classifies a bind failure, singling out the common "port taken" case.
    pub(crate) fn bind(addr: SocketAddr, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::AddrInUse => StartError::AddressInUse(addr),
            _ => StartError::Bind { addr, source },
        }
    }

    /// As [`StartError::bind`], for the operations listener.
    pub(crate) fn admin_bind(addr: SocketAddr, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::AddrInUse => StartError::AdminAddressInUse(addr),
            _ => StartError::AdminBind { addr, source },
        }
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(err) => err.fmt(f),
            StartError::AddressInUse(addr) => write!(
                f,
                "cannot listen on {addr}: address already in use by another process \
                 (stop it or set VERVE_ADDR to a free port)"
            ),
            StartError::Bind { addr, source } => {
                write!(f, "cannot listen on {addr}: {source} (check VERVE_ADDR)")
            }
            StartError::AdminAddressInUse(addr) => write!(
                f,
                "cannot listen on {addr} for /metrics and /healthz: address already in use \
                 (set VERVE_ADMIN_ADDR to a free address, or to an empty value to turn it off)"
            ),
            StartError::AdminBind { addr, source } => write!(
                f,
                "cannot listen on {addr} for /metrics and /healthz: {source} (check VERVE_ADMIN_ADDR)"
            ),
            StartError::UringUnavailable => f.write_str(
                "io_uring is not available here (kernel too old, or blocked by seccomp); \
                 set VERVE_IO_DRIVER=auto or epoll",
            ),
            StartError::Runtime { driver, source } => write!(
                f,
                "cannot start a worker runtime on {driver}: {source} \
                 (for io_uring, raise `ulimit -l` or set VERVE_IO_DRIVER=epoll)"
            ),
            StartError::CountLog(err) => err.fmt(f),
            StartError::Redis(message)
            | StartError::Kafka(message)
            | StartError::RedisStream(message) => f.write_str(message),
            StartError::Thread(source) => write!(f, "cannot start a thread: {source}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Bind { source, .. }
            | StartError::AdminBind { source, .. }
            | StartError::Runtime { source, .. }
            | StartError::Thread(source) => Some(source),
            _ => None,
        }
    }
}

impl From<ConfigError> for StartError {
    fn from(err: ConfigError) -> Self {
        StartError::Config(err)
    }
}

impl From<OpenError> for StartError {
    fn from(err: OpenError) -> Self {
        StartError::CountLog(err)
    }
}
