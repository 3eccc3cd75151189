//! The journal's file format: one file per window, a versioned header, then
//! length- and CRC-framed entries, so that a crash in the middle of a write is
//! told apart from a damaged or foreign file.
//!
//! ```text
//! header  magic "VERVEJNL" | version u32 | window_start u64 (unix s) | window_secs u64
//!         | flags u32 (bit 0: covers the window's start) | crc32 of the 32 bytes before
//! entry   length u32 (kind and body) | crc32 of kind and body | kind u8 | body
//!   kind 1  ids:       the ids new to this instance, i64 each
//!   kind 2  published: revision u64 | unique_requests u64 (a record went out)
//! ```
//!
//! Every integer is little-endian. An id costs 8 bytes plus its share of its
//! entry's 9 (a batch of 512 new ids: 8.02 bytes each).
//!
//! Invariants: [`read`] accepts a file only if its header is whole and valid and
//! every entry but possibly the last is; a last entry cut short, or whole but
//! failing its check, is a write the crash interrupted (a torn tail), reported
//! as bytes to drop. Anything else wrong is [`FormatError`]: the file is not
//! ours to guess about.

use std::fmt;

use crate::window::WindowStart;

const MAGIC: [u8; 8] = *b"VERVEJNL";
const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 36;
/// Length and checksum before each entry's kind and body.
const FRAME_LEN: usize = 8;
/// The largest entry a writer makes: a batch of `VERVE_BATCH_IDS` (at most a
/// million) ids. A length field above it is damage, not a torn write.
const MAX_ENTRY: usize = 1 + 8 * 1_000_000;
const IDS: u8 = 1;
const PUBLISHED: u8 = 2;
const COVERS_START: u32 = 1;

/// What a journal file says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub window: WindowStart,
    pub window_secs: u64,
    /// The process that created the file was running when the window began.
    pub covers_start: bool,
}

impl Header {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.window.unix_secs().to_le_bytes());
        out.extend_from_slice(&self.window_secs.to_le_bytes());
        let flags = if self.covers_start { COVERS_START } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Result<Header, FormatError> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(FormatError::NotAJournal);
        }
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::Damaged { offset: 0 });
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(FormatError::UnknownVersion(version));
        }
        if crc32fast::hash(&bytes[..32]) != u32_at(bytes, 32) {
            return Err(FormatError::Damaged { offset: 0 });
        }
        Ok(Header {
            window: WindowStart::from_unix_secs(u64_at(bytes, 12)),
            window_secs: u64_at(bytes, 20),
            covers_start: u32_at(bytes, 28) & COVERS_START != 0,
        })
    }
}

/// Appends an entry of `ids` to `out`.
pub fn encode_ids(out: &mut Vec<u8>, ids: &[i64]) {
    encode_entry(out, IDS, ids.len() * 8, |body| {
        for id in ids {
            body.extend_from_slice(&id.to_le_bytes());
        }
    });
}

/// Appends an entry saying record `revision` of the window went out with
/// `unique_requests`.
pub fn encode_published(out: &mut Vec<u8>, revision: u64, unique_requests: u64) {
    encode_entry(out, PUBLISHED, 16, |body| {
        body.extend_from_slice(&revision.to_le_bytes());
        body.extend_from_slice(&unique_requests.to_le_bytes());
    });
}

fn encode_entry(out: &mut Vec<u8>, kind: u8, body_len: usize, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.reserve(FRAME_LEN + 1 + body_len);
    out.extend_from_slice(&((1 + body_len) as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    body(out);
    let crc = crc32fast::hash(&out[start + FRAME_LEN..]);
    out[start + 4..start + FRAME_LEN].copy_from_slice(&crc.to_le_bytes());
}

/// A journal file as read back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Contents {
    pub header: Option<Header>,
    /// Every id of every whole ids entry, in the order written.
    pub ids: Vec<i64>,
    /// The last record that went out for the window (0: none).
    pub published_revision: u64,
    /// Ids were written after that record (or there was none).
    pub ids_since_published: bool,
    /// Bytes of the header and the whole entries: where the next entry goes.
    pub whole_len: u64,
    /// Bytes of a torn last entry, to cut off.
    pub torn_bytes: u64,
}

/// Why a file cannot be read as a journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatError {
    NotAJournal,
    UnknownVersion(u32),
    /// A header or an entry fails its check, and more follows it.
    Damaged {
        offset: u64,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::NotAJournal => f.write_str("not a verve journal"),
            FormatError::UnknownVersion(v) => {
                write!(f, "a journal of version {v}, which this build cannot read")
            }
            FormatError::Damaged { offset } => write!(f, "damaged at byte {offset}"),
        }
    }
}

/// Reads a whole journal file. An empty file (the process died before its
/// header was written) has no header and nothing to drop.
pub fn read(bytes: &[u8]) -> Result<Contents, FormatError> {
    let mut contents = Contents::default();
    if bytes.is_empty() {
        return Ok(contents);
    }
    if bytes.len() < HEADER_LEN && MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())]) {
        // The header itself was torn: nothing was journalled yet.
        contents.torn_bytes = bytes.len() as u64;
        return Ok(contents);
    }
    contents.header = Some(Header::decode(bytes)?);
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        let Some(entry) = entry_at(bytes, at) else {
            let rest = &bytes[at..];
            let torn = tail_is_torn(bytes, at) || rest.iter().all(|&b| b == 0);
            if !torn {
                return Err(FormatError::Damaged { offset: at as u64 });
            }
            contents.torn_bytes = rest.len() as u64;
            break;
        };
        match entry {
            (IDS, body) if body.len() % 8 == 0 => {
                let ids = body
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()));
                contents.ids.extend(ids);
                contents.ids_since_published |= !body.is_empty();
            }
            (PUBLISHED, body) if body.len() == 16 => {
                contents.published_revision = u64_at(body, 0);
                contents.ids_since_published = false;
            }
            _ => return Err(FormatError::Damaged { offset: at as u64 }),
        }
        at += FRAME_LEN + 1 + entry.1.len();
    }
    contents.whole_len = at as u64;
    Ok(contents)
}

/// The entry at `at` (kind and body), if it is whole and passes its check.
fn entry_at(bytes: &[u8], at: usize) -> Option<(u8, &[u8])> {
    let frame = bytes.get(at..at + FRAME_LEN)?;
    let len = u32_at(frame, 0) as usize;
    if len == 0 || len > MAX_ENTRY {
        return None;
    }
    let entry = bytes.get(at + FRAME_LEN..at + FRAME_LEN + len)?;
    (crc32fast::hash(entry) == u32_at(frame, 4)).then(|| (entry[0], &entry[1..]))
}

/// Whether the bad entry at `at` is the last thing in the file: cut short, or
/// exactly filling the rest (its bytes only partly written when the crash came).
fn tail_is_torn(bytes: &[u8], at: usize) -> bool {
    let Some(frame) = bytes.get(at..at + FRAME_LEN) else {
        return true;
    };
    let len = u32_at(frame, 0) as usize;
    len != 0 && len <= MAX_ENTRY && at + FRAME_LEN + len >= bytes.len()
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            window: WindowStart::from_unix_secs(1_795_255_500),
            window_secs: 60,
            covers_start: true,
        }
    }

    fn file(entries: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        header().encode(&mut out);
        entries(&mut out);
        out
    }

    #[test]
    fn reads_back_what_was_written() {
        let bytes = file(|out| {
            encode_ids(out, &[1, -2, i64::MAX]);
            encode_published(out, 1, 3);
            encode_ids(out, &[i64::MIN]);
        });
        assert_eq!(bytes.len(), HEADER_LEN + (9 + 24) + (9 + 16) + (9 + 8));
        let contents = read(&bytes).unwrap();
        assert_eq!(contents.header, Some(header()));
        assert_eq!(contents.ids, vec![1, -2, i64::MAX, i64::MIN]);
        assert_eq!(contents.published_revision, 1);
        assert!(contents.ids_since_published);
        assert_eq!(contents.whole_len, bytes.len() as u64);
        assert_eq!(contents.torn_bytes, 0);
    }

    #[test]
    fn a_published_window_without_later_ids_needs_no_new_record() {
        let bytes = file(|out| {
            encode_ids(out, &[1]);
            encode_published(out, 2, 1);
        });
        let contents = read(&bytes).unwrap();
        assert_eq!(contents.published_revision, 2);
        assert!(!contents.ids_since_published);
    }

    #[test]
    fn a_torn_last_entry_is_cut_off_at_every_length() {
        let whole = file(|out| encode_ids(out, &[1, 2]));
        let full = file(|out| {
            encode_ids(out, &[1, 2]);
            encode_ids(out, &[3, 4, 5]);
        });
        for cut in whole.len() + 1..full.len() {
            let contents = read(&full[..cut]).unwrap();
            assert_eq!(contents.ids, vec![1, 2], "cut at {cut}");
            assert_eq!(contents.whole_len, whole.len() as u64);
            assert_eq!(contents.torn_bytes, (cut - whole.len()) as u64);
        }
        // Written whole in length but not in content (zeros where bytes were due).
        let mut garbled = full.clone();
        let last = garbled.len() - 3;
        garbled[last] ^= 0xff;
        assert_eq!(read(&garbled).unwrap().ids, vec![1, 2]);
        // A torn header: nothing journalled.
        let contents = read(&full[..20]).unwrap();
        assert_eq!((contents.header, contents.torn_bytes), (None, 20));
    }

    #[test]
    fn damage_before_the_tail_and_foreign_files_are_refused() {
        let mut bytes = file(|out| {
            encode_ids(out, &[1, 2]);
            encode_ids(out, &[3]);
        });
        bytes[HEADER_LEN + 10] ^= 1;
        let offset = HEADER_LEN as u64;
        assert_eq!(read(&bytes), Err(FormatError::Damaged { offset }));
        assert_eq!(
            read(b"id,window\n1,2\n3,4\n5,6\n7,8\n9,10\n11,12\n"),
            Err(FormatError::NotAJournal)
        );
        let mut newer = file(|_| {});
        newer[8] = 2;
        assert_eq!(read(&newer), Err(FormatError::UnknownVersion(2)));
        let mut bad_header = file(|_| {});
        bad_header[14] ^= 1;
        assert_eq!(read(&bad_header), Err(FormatError::Damaged { offset: 0 }));
    }
}
