//! The journal: the ids new to this instance, per window, on disk, so that a
//! `kill -9` or a restart loses none that was answered `ok`.
//!
//! The aggregator appends each batch's new ids (the ones its sets found new, in
//! its own thread or reported by the partition owners) to an in-memory buffer
//! per window, and writes the buffers with one `write(2)` per window file
//! whenever the workers' channel runs empty or a buffer passes
//! [`WRITE_AT_BYTES`]: never a system call per request, nor on a worker. Each
//! window has a file of its own, `window-<unix secs>.journal` in
//! `VERVE_DATA_DIR` (format in [`format`]); it is created with the window's
//! first new id and deleted once the window's record is out for good, so the
//! directory holds the open windows and those a stop left unfinished.
//!
//! `VERVE_JOURNAL_FSYNC` says when written bytes are forced to the disk:
//! `batch` after each write (in the aggregator's thread), `second` once a
//! second from a thread of its own (the default), `never` (the kernel's own
//! flush). A `kill -9` loses nothing written under any of them; a host crash
//! may lose the last fsync interval.
//!
//! A write that fails (the disk full, a file-size limit) is cut back to the last
//! whole entry and retried a second later (not with every batch: the buffer it
//! rewrites grows meanwhile); meanwhile the ids are counted in memory, `/healthz`
//! says the journal is failing and `verve_journal_write_errors_total` counts the
//! failures.
//!
//! Invariants: a file holds whole entries only, as far as this process knows
//! (a failed write is cut back before anything else is written); one process
//! at a time uses a data directory (an exclusive `flock` on its `LOCK`).

mod format;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::JournalFsync;
use crate::window::{WindowLength, WindowStart};
use format::Header;

/// A window's buffer is written once it holds this much, even while batches
/// keep coming, so that a busy aggregator writes at least every few batches.
const WRITE_AT_BYTES: usize = 256 * 1024;

/// How often `second` forces written bytes to the disk.
const FSYNC_EVERY: Duration = Duration::from_secs(1);

/// After a failed write, the next is tried this much later.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the journal publishes for `/metrics` and `/healthz`; only it writes.
#[derive(Debug, Default)]
pub struct JournalGauges {
    /// 1 while the journal is on.
    pub enabled: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Ids written to the journal (each new to this instance in its window).
    pub ids_written: AtomicU64,
    pub write_errors: AtomicU64,
    /// Ids counted in memory but not yet in the journal because writes fail.
    pub unwritten_ids: AtomicU64,
    /// The last write failed: the promise is weakened until one succeeds.
    pub failing: AtomicBool,
}

/// Files written since the `second` thread last forced them to the disk.
type Unsynced = Arc<Mutex<Vec<Arc<File>>>>;

/// Why the journal cannot be used, as one line saying what to do.
#[derive(Debug)]
pub enum JournalError {
    /// The data directory cannot be created, locked or read.
    Directory { dir: PathBuf, source: io::Error },
    /// Another process holds the directory's lock.
    Locked { dir: PathBuf },
    /// A file in the directory is not a journal this build can read.
    Unreadable { path: PathBuf, why: String },
    /// A journal of another window length.
    OtherLength { path: PathBuf, secs: u64 },
}

impl fmt::Display for JournalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JournalError::Directory { dir, source } => write!(
                f,
                "cannot use VERVE_DATA_DIR {}: {source} (make it a directory this user may \
                 write, point VERVE_DATA_DIR elsewhere, or set VERVE_JOURNAL=false)",
                dir.display()
            ),
            JournalError::Locked { dir } => write!(
                f,
                "VERVE_DATA_DIR {} is in use by another verve process (it holds {}): give \
                 each instance a data directory of its own",
                dir.display(),
                dir.join("LOCK").display()
            ),
            JournalError::Unreadable { path, why } => write!(
                f,
                "journal file {} is {why}: move it out of VERVE_DATA_DIR and start again \
                 (the ids in it will not be counted)",
                path.display()
            ),
            JournalError::OtherLength { path, secs } => write!(
                f,
                "journal file {} holds a window of {secs} s, not VERVE_WINDOW_SECS: start \
                 with VERVE_WINDOW_SECS={secs} until it is published, or move it out of \
                 VERVE_DATA_DIR (its ids will not be counted)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for JournalError {}

/// A window found in the journal at start: not yet published, or published
/// before more ids came in.
#[derive(Debug, PartialEq, Eq)]
pub struct RecoveredWindow {
    pub window: WindowStart,
    /// Every id journalled for it (each new to its process when written).
    pub ids: Vec<i64>,
    /// The last record that went out for it (0: none).
    pub published_revision: u64,
    /// Ids came in after that record, or there was none: it needs one.
    pub needs_record: bool,
    /// The process that created its file was running when it began.
    pub covers_start: bool,
}

/// One window's file and what waits to be written to it.
struct WindowFile {
    path: PathBuf,
    /// Opened at the first write, so that a window with no new id has no file.
    file: Option<Arc<File>>,
    /// Bytes of whole entries in the file.
    len: u64,
    /// Encoded entries (after the header, for a new file) not yet written.
    pending: Vec<u8>,
    /// Ids in `pending`.
    pending_ids: u64,
}

/// The journal of one instance, in the aggregator's hands.
pub struct Journal {
    dir: PathBuf,
    length: WindowLength,
    fsync: JournalFsync,
    /// Windows at or after this one are covered from their start by this process.
    covered_from: WindowStart,
    windows: BTreeMap<WindowStart, WindowFile>,
    gauges: Arc<JournalGauges>,
    /// A write failed: none is tried before this.
    retry_at: Option<Instant>,
    unsynced: Unsynced,
    /// The `second` policy's thread, stopped when the journal is dropped.
    syncer: Option<(flume::Sender<()>, JoinHandle<()>)>,
    /// Held for the life of the journal: its `flock` keeps other processes out.
    _lock: File,
}

impl Journal {
    /// Opens (creating if need be) the journal in `dir` for windows of
    /// `length`, locks it, and reads back the windows it holds, cutting
    /// torn tails off with a warning each.
    pub fn open(
        dir: &Path,
        length: WindowLength,
        fsync: JournalFsync,
        gauges: Arc<JournalGauges>,
    ) -> Result<(Journal, Vec<RecoveredWindow>), JournalError> {
        let in_dir = |source| JournalError::Directory {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(in_dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(in_dir)?;
        // SAFETY: flock on a descriptor we own; it touches no memory.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return Err(match err.kind() {
                io::ErrorKind::WouldBlock => JournalError::Locked {
                    dir: dir.to_owned(),
                },
                _ => in_dir(err),
            });
        }
        let mut journal = Journal {
            dir: dir.to_owned(),
            length,
            fsync,
            covered_from: WindowStart::from_unix_secs(0),
            windows: BTreeMap::new(),
            gauges,
            retry_at: None,
            unsynced: Unsynced::default(),
            syncer: None,
            _lock: lock,
        };
        let recovered = journal.recover().map_err(|err| match err {
            Recovery::Io(source) => in_dir(source),
            Recovery::Refused(err) => err,
        })?;
        if fsync == JournalFsync::Second {
            journal.syncer = Some(start_syncer(journal.unsynced.clone()).map_err(in_dir)?);
        }
        journal.gauges.enabled.store(1, Ordering::Relaxed);
        Ok((journal, recovered))
    }

    /// Windows at or after `window` are covered from their start by this process
    /// (it was running when they began); earlier ones are not.
    pub fn covered_from(&mut self, window: WindowStart) {
        self.covered_from = window;
    }

    /// Queues `ids`, new to this instance in `window`, for the next write.
    pub fn append(&mut self, window: WindowStart, ids: &[i64]) {
        let file = self.file_of(window);
        format::encode_ids(&mut file.pending, ids);
        file.pending_ids += ids.len() as u64;
        if file.pending.len() >= WRITE_AT_BYTES {
            self.write();
        }
    }

    /// Writes what is queued, one write per window with something queued
    /// (nothing within [`RETRY_AFTER`] of a failed write).
    pub fn write(&mut self) {
        let waiting = self.retry_at.is_some_and(|at| Instant::now() < at);
        if !waiting {
            self.retry_at = None;
        }
        let mut wrote = false;
        for window in self.windows.values_mut() {
            if waiting || window.pending.is_empty() {
                continue;
            }
            let (bytes, ids) = (window.pending.len() as u64, window.pending_ids);
            match write_pending(window, self.fsync) {
                Ok(file) => {
                    wrote = true;
                    self.gauges
                        .bytes_written
                        .fetch_add(bytes, Ordering::Relaxed);
                    self.gauges.ids_written.fetch_add(ids, Ordering::Relaxed);
                    if self.fsync == JournalFsync::Second {
                        let mut unsynced = self.unsynced.lock().unwrap_or_else(|e| e.into_inner());
                        if !unsynced.iter().any(|f| Arc::ptr_eq(f, &file)) {
                            unsynced.push(file);
                        }
                    }
                }
                Err(err) => {
                    self.retry_at = Some(Instant::now() + RETRY_AFTER);
                    self.gauges.write_errors.fetch_add(1, Ordering::Relaxed);
                    if !self.gauges.failing.swap(true, Ordering::Relaxed) {
                        tracing::error!(
                            file = %window.path.display(),
                            error = %err,
                            "cannot write the journal: new ids are counted in memory only, \
                             and a crash now would lose them, until a write succeeds (retried \
                             every second)"
                        );
                    }
                }
            }
        }
        let unwritten: u64 = self.windows.values().map(|w| w.pending_ids).sum();
        self.gauges
            .unwritten_ids
            .store(unwritten, Ordering::Relaxed);
        if wrote && unwritten == 0 && self.gauges.failing.swap(false, Ordering::Relaxed) {
            tracing::warn!("the journal is written again: every id counted is in it");
        }
    }

    /// `window`'s record is out for good: its file goes.
    pub fn settled(&mut self, window: WindowStart) {
        self.windows.remove(&window);
        remove_window_file(&self.dir, window);
    }

    /// Record `revision` of `window` went out with `unique_requests`, and more
    /// may come (a stop within it): noted in its file, for a restart to revise.
    pub fn published_partial(&mut self, window: WindowStart, revision: u64, unique_requests: u64) {
        let file = self.file_of(window);
        format::encode_published(&mut file.pending, revision, unique_requests);
        self.write();
    }

    /// `window` is closed here and its file written; the store removes the file
    /// once the window needs it no more ([`remove_window_file`]).
    pub fn handed_over(&mut self, window: WindowStart) {
        self.write();
        self.windows.remove(&window);
    }

    /// The file of `window`, set up (not yet created) if it has none.
    fn file_of(&mut self, window: WindowStart) -> &mut WindowFile {
        let (dir, window_secs) = (&self.dir, self.length.as_secs());
        let covers_start = window >= self.covered_from;
        self.windows.entry(window).or_insert_with(|| {
            let mut pending = Vec::new();
            let header = Header {
                window,
                window_secs,
                covers_start,
            };
            header.encode(&mut pending);
            WindowFile {
                path: dir.join(file_name(window)),
                file: None,
                len: 0,
                pending,
                pending_ids: 0,
            }
        })
    }

    /// Reads every journal file of the directory, keeping each open for more.
    fn recover(&mut self) -> Result<Vec<RecoveredWindow>, Recovery> {
        let mut recovered = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(window) = window_of_file(&path) else {
                continue;
            };
            let bytes = std::fs::read(&path)?;
            let refused = |why: String| JournalError::Unreadable {
                path: path.clone(),
                why,
            };
            let contents = format::read(&bytes).map_err(|err| refused(err.to_string()))?;
            let Some(header) = contents.header else {
                // Died before its header was whole: nothing was journalled.
                std::fs::remove_file(&path)?;
                continue;
            };
            if header.window != window {
                let why = format!("the journal of window {}, not of its name's", header.window);
                return Err(refused(why).into());
            }
            if header.window_secs != self.length.as_secs() {
                let secs = header.window_secs;
                return Err(JournalError::OtherLength { path, secs }.into());
            }
            if contents.torn_bytes > 0 {
                tracing::warn!(
                    file = %path.display(),
                    dropped_bytes = contents.torn_bytes,
                    kept_ids = contents.ids.len(),
                    "the journal's last entry was cut short by a crash (its ids were never \
                     answered ok): dropped it, kept every whole entry"
                );
            }
            let file = OpenOptions::new().append(true).open(&path)?;
            file.set_len(contents.whole_len)?;
            self.windows.insert(
                window,
                WindowFile {
                    path,
                    file: Some(Arc::new(file)),
                    len: contents.whole_len,
                    pending: Vec::new(),
                    pending_ids: 0,
                },
            );
            recovered.push(RecoveredWindow {
                window,
                ids: contents.ids,
                published_revision: contents.published_revision,
                needs_record: contents.ids_since_published,
                covers_start: header.covers_start,
            });
        }
        recovered.sort_by_key(|w| w.window);
        Ok(recovered)
    }
}

/// At a stop: what was queued is written and forced to the disk.
impl Drop for Journal {
    fn drop(&mut self) {
        self.retry_at = None;
        self.write();
        if self.fsync != JournalFsync::Never {
            for file in self.windows.values().filter_map(|w| w.file.as_ref()) {
                let _ = file.sync_data();
            }
        }
        if let Some((stop, thread)) = self.syncer.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

enum Recovery {
    Io(io::Error),
    Refused(JournalError),
}

impl From<io::Error> for Recovery {
    fn from(err: io::Error) -> Self {
        Recovery::Io(err)
    }
}

impl From<JournalError> for Recovery {
    fn from(err: JournalError) -> Self {
        Recovery::Refused(err)
    }
}

/// Writes a window's pending bytes in one call (creating its file first if
/// need be) and returns the file; on failure cuts the file back to its whole
/// entries and keeps the bytes for the next try.
fn write_pending(window: &mut WindowFile, fsync: JournalFsync) -> io::Result<Arc<File>> {
    let file = match &window.file {
        Some(file) => file.clone(),
        None => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&window.path)?;
            let file = Arc::new(file);
            window.file = Some(file.clone());
            file
        }
    };
    if let Err(err) = (&*file).write_all(&window.pending) {
        // Whatever part went in would stand between whole entries: take it out.
        let _ = file.set_len(window.len);
        return Err(err);
    }
    window.len += window.pending.len() as u64;
    window.pending.clear();
    window.pending_ids = 0;
    if fsync == JournalFsync::Batch {
        file.sync_data()?;
    }
    Ok(file)
}

/// The `second` policy's thread: forces the files written in the last second
/// to the disk, until the returned sender is dropped.
fn start_syncer(unsynced: Unsynced) -> io::Result<(flume::Sender<()>, JoinHandle<()>)> {
    let (stop, stopped) = flume::bounded::<()>(0);
    let thread = std::thread::Builder::new()
        .name("verve-journal-sync".into())
        .spawn(move || {
            while let Err(flume::RecvTimeoutError::Timeout) = stopped.recv_timeout(FSYNC_EVERY) {
                let files =
                    std::mem::take(&mut *unsynced.lock().unwrap_or_else(|e| e.into_inner()));
                for file in files {
                    if let Err(err) = file.sync_data() {
                        tracing::warn!(error = %err, "cannot force the journal to the disk");
                    }
                }
            }
        })?;
    Ok((stop, thread))
}

/// Deletes the journal file of `window` in `dir`, if there is one: its ids
/// are counted where they will not be lost (a record out for good, or the
/// fleet's complete record).
pub fn remove_window_file(dir: &Path, window: WindowStart) {
    let path = dir.join(file_name(window));
    if let Err(err) = std::fs::remove_file(&path) {
        if err.kind() != io::ErrorKind::NotFound {
            tracing::warn!(file = %path.display(), error = %err,
                "cannot delete a settled window's journal file; the next start counts it again");
        }
    }
}

fn file_name(window: WindowStart) -> String {
    format!("window-{}.journal", window.unix_secs())
}

/// The window a journal file is named for; `None` for any other file.
fn window_of_file(path: &Path) -> Option<WindowStart> {
    let name = path.file_name()?.to_str()?;
    let secs = name.strip_prefix("window-")?.strip_suffix(".journal")?;
    secs.parse().ok().map(WindowStart::from_unix_secs)
}
