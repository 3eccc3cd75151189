//! Framing does not depend on how the input is split into reads: the property the
//! fuzz target (fuzz/, scripts/fuzz.sh) explores without bounds, checked here on
//! every test run over inputs built from the pieces real requests are made of.

mod common;

use common::framing::transcript;
use proptest::prelude::*;
use verve::http::Limits;

/// Pieces of requests, valid and not, that concatenate into plausible input.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    let fixed: &[&[u8]] = &[
        b"GET /api/verve/accept?id=1 HTTP/1.1\r\n",
        b"GET /api/verve/accept?id=-9&endpoint=http%3A%2F%2Fh%2Fp HTTP/1.1\r\n",
        b"HEAD /healthz HTTP/1.0\r\n",
        b"POST /api/verve/accept?id=2 HTTP/1.1\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"Host: h\r\n",
        b"Connection: keep-alive\r\n",
        b"Connection: close\r\n",
        b"Content-Length: 3\r\n",
        b"Content-Length: 40\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"\r\n",
        b"\n",
        b"abc",
    ];
    prop_oneof![
        4 => prop::sample::select(fixed).prop_map(<[u8]>::to_vec),
        1 => prop::collection::vec(any::<u8>(), 0..8),
        1 => (any::<u8>(), 1..300usize).prop_map(|(b, n)| vec![b; n]),
    ]
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(piece(), 0..16).prop_map(|pieces| pieces.concat())
}

/// The defaults, or small limits so that every edge is within reach.
fn limits() -> impl Strategy<Value = Limits> {
    let small = (16..400usize, 8..200usize, 1..6usize, 0..64usize).prop_map(
        |(head_bytes, line, headers, body_bytes)| Limits {
            head_bytes,
            request_line_bytes: line.min(head_bytes - 4),
            headers,
            body_bytes,
        },
    );
    prop_oneof![Just(Limits::DEFAULT), small]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn framing_does_not_depend_on_how_the_input_is_split(
        input in input(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        limits in limits(),
    ) {
        let whole = transcript(&input, &[], &limits);
        let cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        prop_assert_eq!(&transcript(&input, &cuts, &limits), &whole);
        let every_byte: Vec<usize> = (1..input.len()).collect();
        prop_assert_eq!(&transcript(&input, &every_byte, &limits), &whole);
    }
}
