//! The process's limit on open files, which bounds how many connections it can hold.
//!
//! Each connection is a file descriptor, so a soft limit below the connection cap
//! (often 1024 by default) would make `accept` fail with EMFILE long before the cap
//! applies. Start-up raises the soft limit to the hard one, as far as the operator
//! allows without privileges, and says so when even that is too low.

use std::io;

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
