//! Why the workers could not start, each as one line that says what to do.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use super::Driver;

#[derive(Debug)]
pub enum ServerError {
    Bind {
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
    Thread(io::Error),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Bind { addr, source } if source.kind() == io::ErrorKind::AddrInUse => {
                write!(
                    f,
                    "cannot listen on {addr}: address already in use by another process \
                     (stop it or set VERVE_ADDR to a free port)"
                )
            }
            ServerError::Bind { addr, source } => {
                write!(f, "cannot listen on {addr}: {source} (check VERVE_ADDR)")
            }
            ServerError::UringUnavailable => f.write_str(
                "io_uring is not available here (kernel too old, or blocked by seccomp); \
                 set VERVE_IO_DRIVER=auto or epoll",
            ),
            ServerError::Runtime { driver, source } => write!(
                f,
                "cannot start a worker runtime on {driver}: {source} \
                 (for io_uring, raise `ulimit -l` or set VERVE_IO_DRIVER=epoll)"
            ),
            ServerError::Thread(source) => write!(f, "cannot start a thread: {source}"),
        }
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServerError::Bind { source, .. }
            | ServerError::Runtime { source, .. }
            | ServerError::Thread(source) => Some(source),
            ServerError::UringUnavailable => None,
        }
    }
}
