//! The count log: one line per closed window, written through `tracing`.
//!
//! The sink owns its own `tracing` dispatcher writing to the count log file, apart
//! from the process-wide subscriber that sends operational logs to stderr. Each
//! service instance therefore has its own count log, even several in one process
//! (as in the tests), and `RUST_LOG` can never filter counts away.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::Dispatch;

use super::{CountSink, WindowReport};

/// Appends one `INFO` line per window to a file, e.g.
/// `2026-11-21T10:06:00.501234Z  INFO window closed window_start=2026-11-21T10:05:00Z unique_requests=42 window_seconds=60 scope=instance partial=false late=false reporter=true`.
pub struct LogSink {
    dispatch: Dispatch,
}

impl LogSink {
    /// Opens (creating it and its directory if needed) the count log for appending.
    pub fn open(path: &Path) -> Result<LogSink, OpenError> {
        let fail = |source| OpenError {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(fail)?;
        let subscriber = tracing_subscriber::fmt()
            .with_writer(Arc::new(file))
            .with_ansi(false)
            .with_target(false)
            .finish();
        Ok(LogSink {
            dispatch: Dispatch::new(subscriber),
        })
    }
}

impl CountSink for LogSink {
    fn publish(&mut self, report: &WindowReport) {
        tracing::dispatcher::with_default(&self.dispatch, || {
            tracing::info!(
                window_start = %report.window_start,
                unique_requests = report.unique_requests,
                window_seconds = report.window_secs,
                scope = %report.scope.as_str(),
                partial = report.partial,
                late = report.late,
                reporter = report.reporter,
                "window closed"
            );
        });
    }
}

/// The count log could not be opened.
#[derive(Debug)]
pub struct OpenError {
    pub path: PathBuf,
    pub source: io::Error,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot open count log {}: {} (set VERVE_COUNT_LOG to a writable path)",
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for OpenError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Scope;
    use crate::window::WindowStart;

    #[test]
    fn one_line_per_report_with_the_documented_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/counts.log");
        let mut sink = LogSink::open(&path).unwrap();
        for (start, n, partial) in [(1_795_255_500, 42, false), (1_795_255_560, 0, true)] {
            sink.publish(&WindowReport {
                window_start: WindowStart::from_unix_secs(start),
                window_secs: 60,
                unique_requests: n,
                scope: if partial {
                    Scope::Global
                } else {
                    Scope::Instance
                },
                partial,
                late: partial,
                reporter: !partial,
            });
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].ends_with(
            " INFO window closed window_start=2026-11-21T10:05:00Z unique_requests=42 window_seconds=60 scope=instance partial=false late=false reporter=true"
        ), "{}", lines[0]);
        assert!(lines[1].ends_with(
            " INFO window closed window_start=2026-11-21T10:06:00Z unique_requests=0 window_seconds=60 scope=global partial=true late=true reporter=false"
        ), "{}", lines[1]);
    }

    #[test]
    fn an_unwritable_path_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let err = LogSink::open(&file.join("counts.log"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("cannot open count log "), "{err}");
        assert!(
            err.ends_with("(set VERVE_COUNT_LOG to a writable path)"),
            "{err}"
        );
    }
}
