//! The process's limit on open files, and the connection cap it allows.
//!
//! Each connection is a file descriptor, so a soft limit below the connection cap
//! (often 1024 by default) would make `accept` fail with EMFILE long before the cap
//! applies. Start-up raises the soft limit to the hard one, as far as the operator
//! allows without privileges; without a cap set by the operator, the cap is what
//! that limit allows, and a cap the operator set that the limit cannot meet is
//! reported.

use std::io;

/// Connections per worker when the operator sets no cap and the open-file limit
/// allows more: enough for a busy host, and a bound on memory (each connection
/// keeps its buffers and a task).
pub const DEFAULT_CONNECTIONS_PER_WORKER: u64 = 25_000;

/// Descriptors kept aside for everything but client connections (listeners, logs,
/// Redis, Kafka, callbacks), or a quarter of the limit if that is smaller.
const SPARE_FILES: u64 = 1024;

/// The connection cap start-up settles on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCap {
    pub per_worker: usize,
    /// The operator's cap needs more descriptors than the limit allows.
    pub short_of_files: bool,
}

/// The cap per worker: the operator's, or else the most the open-file limit allows
/// across `workers` after the spare descriptors, up to the default. An unknown
/// limit (`None`) leaves the default.
pub fn connection_cap(
    configured: Option<u32>,
    workers: usize,
    open_files: Option<u64>,
) -> ConnectionCap {
    let workers = workers.max(1) as u64;
    let spare = |limit: u64| SPARE_FILES.min(limit / 4);
    match (configured, open_files) {
        (Some(cap), limit) => ConnectionCap {
            per_worker: cap as usize,
            short_of_files: limit.is_some_and(|l| workers * u64::from(cap) + spare(l) > l),
        },
        (None, Some(limit)) => ConnectionCap {
            per_worker: ((limit - spare(limit)) / workers).clamp(1, DEFAULT_CONNECTIONS_PER_WORKER)
                as usize,
            short_of_files: false,
        },
        (None, None) => ConnectionCap {
            per_worker: DEFAULT_CONNECTIONS_PER_WORKER as usize,
            short_of_files: false,
        },
    }
}

/// Raises the soft limit on open files to the hard limit; returns the new soft limit.
pub fn raise_to_hard_limit() -> io::Result<u64> {
    // SAFETY: rlimit is plain data, fully written by getrlimit before it is read.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: a valid rlimit, read by the kernel only.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(configured: Option<u32>, workers: usize, open_files: Option<u64>) -> (usize, bool) {
        let cap = connection_cap(configured, workers, open_files);
        (cap.per_worker, cap.short_of_files)
    }

    #[test]
    fn without_a_cap_the_limit_decides_up_to_the_default() {
        // 1,024 spare, the rest shared by the workers.
        assert_eq!(cap(None, 2, Some(20_000)), (9_488, false));
        assert_eq!(cap(None, 2, Some(1_048_576)), (25_000, false));
        // A low limit keeps a quarter spare.
        assert_eq!(cap(None, 2, Some(256)), (96, false));
        assert_eq!(cap(None, 4, Some(2)), (1, false));
        assert_eq!(cap(None, 2, None), (25_000, false));
    }

    #[test]
    fn a_cap_the_operator_set_is_kept_and_checked() {
        assert_eq!(cap(Some(9_488), 2, Some(20_000)), (9_488, false));
        assert_eq!(cap(Some(9_489), 2, Some(20_000)), (9_489, true));
        assert_eq!(cap(Some(50_000), 2, None), (50_000, false));
    }
}
