//! A fixed stream of accept requests, the same on every run, for instruction counts
//! (`loadtest/instructions.py`): the server's work per request can then be compared
//! between builds and against the baseline without the noise of a shared machine.
//!
//!     request_stream <addr> <requests> <depth> [first] [gap_us]
//!
//! One connection; requests go out `depth` at a time in one write, and each group's
//! answers are read before the next is sent, so every read the server makes holds
//! the same requests on every run. After each group's answers the client waits
//! `gap_us` microseconds (default 0), so that the server, having answered, finds
//! nothing to read and waits for the next group as it does under a steady load
//! below its capacity: without the gap, whether it waits or finds the next group
//! already there depends on how fast each side runs, and so does its count (a
//! wait is a trip through the event loop, some hundreds of instructions). Ids are drawn from a fixed sequence over
//! 1,000,000 values (numbered from `first`, default 0, so that a warm-up and the
//! measured stream can differ), so repeats are as in a real stream. Every answer
//! must be `200 ok`; anything else ends the run with an error.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";

/// The id of the `n`th request: a fixed permutation-like walk over 1,000,000 ids.
fn id_of(n: u64) -> u64 {
    n.wrapping_mul(6_364_136_223_846_793_005).rotate_left(17) % 1_000_000
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [addr, requests, depth, rest @ ..] if rest.len() <= 2 => (|| {
            let first = rest.first().map_or(Ok(0), |f| f.parse::<u64>())?;
            let gap_us = rest.get(1).map_or(Ok(0), |g| g.parse::<u64>())?;
            Ok::<_, std::num::ParseIntError>((
                addr.clone(),
                requests.parse::<u64>()?,
                depth.parse::<u64>()?.max(1),
                first,
                Duration::from_micros(gap_us),
            ))
        })()
        .ok(),
        _ => None,
    };
    let Some((addr, requests, depth, first, gap)) = parsed else {
        eprintln!("usage: request_stream <addr> <requests> <depth> [first] [gap_us]");
        return ExitCode::from(2);
    };
    match run(&addr, requests, depth, first, gap) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("request_stream: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(addr: &str, requests: u64, depth: u64, first: u64, gap: Duration) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut out = Vec::new();
    let mut answers = vec![0; OK.len() * depth as usize];
    let mut sent = 0;
    while sent < requests {
        let group = depth.min(requests - sent);
        out.clear();
        for n in first + sent..first + sent + group {
            write!(
                out,
                "GET /api/verve/accept?id={} HTTP/1.1\r\nhost: verve\r\n\r\n",
                id_of(n)
            )?;
        }
        stream.write_all(&out)?;
        let answers = &mut answers[..OK.len() * group as usize];
        stream.read_exact(answers)?;
        if answers.chunks(OK.len()).any(|answer| answer != OK) {
            return Err(std::io::Error::other(format!(
                "an answer other than 200 ok: {:?}",
                String::from_utf8_lossy(answers)
            )));
        }
        sent += group;
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    Ok(())
}
