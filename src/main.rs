//! The `verve` binary: configuration, logging, signals; the rest is the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing_subscriber::EnvFilter;
use verve::{Config, Verve};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A window's set grows by allocating and freeing tables of up to 128 KiB. With
    // transparent huge pages the allocator's memory is faulted in and cleared 2 MiB
    // at a time, in the middle of an insert: growing a set to 30 M ids, 284 batches
    // of 58,600 took over a millisecond, against 5 to 11 without
    // (docs/performance.md). Best effort: a kernel without the call keeps its setting.
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    let config = match Config::load() {
        Ok(config) => config,
        Err(err) => return fail(err),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if std::env::var_os("VERVE_WINDOW_GRACE_MS").is_some() {
        tracing::warn!(
            "VERVE_WINDOW_GRACE_MS is no longer read: a window closes once every worker has \
             handed over its ids, and in Redis mode VERVE_FLEET_WAIT_MS bounds the fleet's wait"
        );
    }
    // Registered before start-up so that a signal during start-up is not lost.
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(err) => return fail(format!("cannot install signal handlers: {err}")),
    };
    let verve = match Verve::start(&config) {
        Ok(verve) => verve,
        Err(err) => return fail(err),
    };
    let signal = signals.forever().next();
    tracing::info!(signal, "shutting down");
    match (verve.shutdown(), config.journal) {
        (0, _) => tracing::info!("stopped"),
        (undelivered_ids, true) => tracing::warn!(
            undelivered_ids,
            data_dir = %config.data_dir.display(),
            "stopped; the ids Redis did not take are kept in the journal, for the next start \
             with this VERVE_INSTANCE and VERVE_DATA_DIR to deliver"
        ),
        (lost_ids, false) => tracing::error!(
            lost_ids,
            "stopped; the ids Redis did not take are lost (VERVE_JOURNAL=false)"
        ),
    }
    ExitCode::SUCCESS
}

fn fail(err: impl std::fmt::Display) -> ExitCode {
    eprintln!("verve: {err}");
    ExitCode::FAILURE
}
