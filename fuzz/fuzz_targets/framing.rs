//! Request framing and query parsing over arbitrary bytes, split at arbitrary
//! points: must never panic, never hang, never buffer more than one request may
//! take, and must make of the input exactly what it makes of it in one piece.
//!
//! Input layout: byte 0 picks the limits (high bit: the defaults; else small ones
//! from bytes 1 to 4, so that every limit's edge is in reach), byte 5 the number
//! of cuts, then two bytes per cut (an offset into the payload), then the payload.

#![no_main]

use libfuzzer_sys::fuzz_target;
use verve::http::{Limits, MAX_HEADERS_CEILING};

#[path = "../../tests/common/framing.rs"]
mod framing;

/// Payloads up to this long are also fed one byte per read (quadratic, so bounded).
const BYTE_BY_BYTE_MAX: usize = 512;

fn limits(params: &[u8]) -> Limits {
    if params[0] & 0x80 != 0 {
        return Limits::DEFAULT;
    }
    let head_bytes = 16 + usize::from(params[1]) * 4;
    Limits {
        head_bytes,
        request_line_bytes: (8 + usize::from(params[2]) * 4).min(head_bytes - 4),
        headers: 1 + usize::from(params[3]) % MAX_HEADERS_CEILING,
        body_bytes: usize::from(params[4]) * 2,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((params, rest)) = data.split_first_chunk::<6>() else {
        return;
    };
    let limits = limits(params);
    let cut_bytes = (usize::from(params[5]) % 16 * 2).min(rest.len());
    let (cuts, payload) = rest.split_at(cut_bytes);
    let cuts: Vec<usize> = cuts
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();

    let whole = framing::transcript(payload, &[], &limits);
    assert_eq!(
        framing::transcript(payload, &cuts, &limits),
        whole,
        "cuts {cuts:?}"
    );
    if payload.len() <= BYTE_BY_BYTE_MAX {
        let every: Vec<usize> = (1..payload.len()).collect();
        assert_eq!(
            framing::transcript(payload, &every, &limits),
            whole,
            "byte by byte"
        );
    }
});
