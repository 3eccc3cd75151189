//! The count log: one line per count record, written through `tracing`.
//!
//! The sink owns its own `tracing` dispatcher writing to the count log file, apart
//! from the process-wide subscriber that sends operational logs to stderr. Each
//! service instance therefore has its own count log, even several in one process
//! (as in the tests), and `RUST_LOG` can never filter counts away.
//!
//! Two formats (`VERVE_COUNT_LOG_FORMAT`): `text`, a `tracing` line with the
//! record's fields as `key=value`, and `json`, each line exactly the record's JSON,
//! the same document as a Kafka record's value.

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::field::{Field, Visit};
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::CountSink;
pub use crate::config::CountLogFormat;
use crate::record::CountRecord;

/// Appends one `INFO` line per record to a file, e.g.
/// `2026-11-21T10:06:00.501234Z  INFO window_start=2026-11-21T10:05:00Z window_seconds=60 unique_requests=42 scope=instance revision=1 complete=true partial=false instances=1 published_at=2026-11-21T10:06:00.501Z`.
pub struct LogSink {
    dispatch: Dispatch,
    format: CountLogFormat,
}

impl LogSink {
    /// Opens (creating it and its directory if needed) the count log for appending.
    pub fn open(path: &Path, format: CountLogFormat) -> Result<LogSink, OpenError> {
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
        let lines = tracing_subscriber::fmt()
            .with_writer(Arc::new(file))
            .with_ansi(false)
            .with_target(false);
        let dispatch = match format {
            CountLogFormat::Text => Dispatch::new(lines.finish()),
            CountLogFormat::Json => Dispatch::new(lines.event_format(RecordOnly).finish()),
        };
        Ok(LogSink { dispatch, format })
    }
}

impl CountSink for LogSink {
    fn publish(&mut self, record: &CountRecord) {
        tracing::dispatcher::with_default(&self.dispatch, || match self.format {
            CountLogFormat::Text => tracing::info!(
                window_start = %record.window_start,
                window_seconds = record.window_seconds,
                unique_requests = record.unique_requests,
                scope = %record.scope.as_str(),
                revision = record.revision,
                complete = record.complete,
                partial = record.partial,
                instances = record.instances,
                published_at = %record.published_at,
            ),
            CountLogFormat::Json => tracing::info!(record = record.to_json().as_str()),
        });
    }
}

/// Writes an event's `record` field and nothing else: a JSON line.
struct RecordOnly;

impl<S, N> FormatEvent<S, N> for RecordOnly
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut record = RecordField(&mut writer, Ok(()));
        event.record(&mut record);
        record.1?;
        writeln!(writer)
    }
}

struct RecordField<'w, 'a>(&'w mut Writer<'a>, fmt::Result);

impl Visit for RecordField<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "record" {
            self.1 = self.0.write_str(value);
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn fmt::Debug) {}
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
    use crate::record::{Scope, Timestamp};
    use crate::window::WindowStart;

    fn records() -> [CountRecord; 2] {
        let record = CountRecord {
            window_start: WindowStart::from_unix_secs(1_795_255_500),
            window_seconds: 60,
            unique_requests: 42,
            scope: Scope::Instance,
            revision: 1,
            complete: true,
            partial: false,
            instances: 1,
            published_at: Timestamp::from_unix_millis(1_795_255_560_501),
        };
        let revised = CountRecord {
            window_start: WindowStart::from_unix_secs(1_795_255_560),
            unique_requests: 0,
            scope: Scope::Global,
            revision: 2,
            complete: false,
            partial: true,
            instances: 3,
            ..record
        };
        [record, revised]
    }

    fn written(format: CountLogFormat) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/counts.log");
        let mut sink = LogSink::open(&path, format).unwrap();
        for record in records() {
            sink.publish(&record);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn text_lines_carry_every_field_of_the_record() {
        let lines = written(CountLogFormat::Text);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].ends_with(
            " INFO window_start=2026-11-21T10:05:00Z window_seconds=60 unique_requests=42 scope=instance revision=1 complete=true partial=false instances=1 published_at=2026-11-21T10:06:00.501Z"
        ), "{}", lines[0]);
        assert!(lines[1].ends_with(
            " INFO window_start=2026-11-21T10:06:00Z window_seconds=60 unique_requests=0 scope=global revision=2 complete=false partial=true instances=3 published_at=2026-11-21T10:06:00.501Z"
        ), "{}", lines[1]);
    }

    #[test]
    fn json_lines_are_the_records_themselves() {
        let lines = written(CountLogFormat::Json);
        let parsed: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let expected: Vec<serde_json::Value> = records()
            .iter()
            .map(|r| serde_json::to_value(r).unwrap())
            .collect();
        assert_eq!(parsed, expected);
    }

    #[test]
    fn an_unwritable_path_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let err = LogSink::open(&file.join("counts.log"), CountLogFormat::Text)
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
