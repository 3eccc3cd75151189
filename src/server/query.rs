//! The query string of `/api/verve/accept`: `id=<i64>[&endpoint=<url>]`.
//!
//! Names and values are percent-decoded as RFC 3986 says (`+` stays `+`: the query
//! is not a form). Parsing borrows from the request buffer and copies only when a
//! value actually contains `%`-escapes, into a scratch buffer the caller reuses, so
//! the common request costs no allocation. Unknown parameters are ignored; a
//! repeated `id` or `endpoint` is refused, because which one was meant is a guess.

use std::fmt;

/// Longest endpoint URL accepted, in bytes after decoding.
pub const MAX_ENDPOINT_LEN: usize = 2048;

/// Longest decoded parameter name or id we ever need to look at: `endpoint` is 8
/// bytes, and `-9223372036854775808` with leading zeros beyond this is not an id
/// anyone sends.
const SMALL: usize = 32;

/// A valid accept query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptQuery<'a> {
    pub id: i64,
    /// The decoded, validated callback URL, when one was given.
    pub endpoint: Option<Endpoint<'a>>,
}

/// A callback URL that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint<'a> {
    pub url: &'a str,
    /// The host part of `url`, as written (IPv6 literals keep their brackets).
    pub host: &'a str,
}

/// Why a query was refused; every variant is answered `400 failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryError {
    MissingId,
    EmptyId,
    /// Not a decimal integer: letters, a fraction, spaces, and so on.
    InvalidId,
    /// Outside `i64::MIN..=i64::MAX`.
    IdOutOfRange,
    /// The same parameter twice.
    Repeated(&'static str),
    /// `%` not followed by two hex digits.
    BadPercentEncoding,
    InvalidEndpoint(EndpointError),
}

/// Why an `endpoint` value is not a URL the service would call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointError {
    TooLong,
    /// Not `http://` or `https://`.
    UnsupportedScheme,
    MissingHost,
    /// Spaces, control characters or non-ASCII bytes, which a URL must escape.
    IllegalCharacter,
    InvalidPort,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::MissingId => f.write_str("missing id"),
            QueryError::EmptyId => f.write_str("empty id"),
            QueryError::InvalidId => f.write_str("id is not a decimal integer"),
            QueryError::IdOutOfRange => f.write_str("id does not fit a signed 64-bit integer"),
            QueryError::Repeated(name) => write!(f, "parameter {name} given more than once"),
            QueryError::BadPercentEncoding => f.write_str("bad percent-encoding"),
            QueryError::InvalidEndpoint(e) => write!(f, "invalid endpoint: {e}"),
        }
    }
}

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EndpointError::TooLong => "longer than 2048 bytes",
            EndpointError::UnsupportedScheme => "not an http:// or https:// URL",
            EndpointError::MissingHost => "no host",
            EndpointError::IllegalCharacter => "unescaped space, control or non-ASCII character",
            EndpointError::InvalidPort => "invalid port",
        })
    }
}

/// Parses the raw query (the part after `?`, without it).
///
/// `scratch` holds the decoded endpoint when it had to be unescaped; it is cleared
/// and reused, so after the first such request it no longer allocates.
pub fn parse_accept_query<'a>(
    query: &'a [u8],
    scratch: &'a mut Vec<u8>,
) -> Result<AcceptQuery<'a>, QueryError> {
    // The usual query, `id=<integer>` alone, needs no walk over its pairs: a `&` or
    // a second `=` would not parse as an integer.
    if let Some(Ok(id)) = query.strip_prefix(b"id=").map(parse_decimal) {
        return Ok(AcceptQuery { id, endpoint: None });
    }
    let mut id = None;
    let mut endpoint_raw: Option<&[u8]> = None;
    for pair in query.split(|&b| b == b'&') {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        let mut name_buf = [0u8; SMALL];
        let name = match name {
            // The names as clients send them: nothing to decode.
            b"id" | b"endpoint" => name,
            _ => match decode_small(name, &mut name_buf)? {
                Some(name) => name,
                None => continue, // longer than any name we know
            },
        };
        match name {
            b"id" if id.is_some() => return Err(QueryError::Repeated("id")),
            b"id" => id = Some(parse_id(value)?),
            b"endpoint" if endpoint_raw.is_some() => return Err(QueryError::Repeated("endpoint")),
            b"endpoint" => endpoint_raw = Some(value),
            _ => {}
        }
    }
    let id = id.ok_or(QueryError::MissingId)?;
    let endpoint = match endpoint_raw {
        None => None,
        Some(raw) => Some(decode_endpoint(raw, scratch)?),
    };
    Ok(AcceptQuery { id, endpoint })
}

/// Decodes and parses an id value. Ids come unescaped, so the bytes are parsed as
/// they are and decoded only if that fails and they hold an escape.
fn parse_id(raw: &[u8]) -> Result<i64, QueryError> {
    match parse_decimal(raw) {
        Err(_) if raw.contains(&b'%') => {
            let mut buf = [0u8; SMALL];
            let digits = decode_small(raw, &mut buf)?.ok_or(QueryError::IdOutOfRange)?;
            parse_decimal(digits)
        }
        parsed => parsed,
    }
}

/// Digits that cannot overflow a `u64` whatever they are (below 10^19): the usual
/// id, snowflake-style ones included, is read without a check per digit, and its
/// sign's range is checked once at the end. Longer ids only come with leading
/// zeros, and take the loop that checks every digit.
const UNCHECKED_DIGITS: usize = 19;

/// A decimal `i64` exactly as `str::parse::<i64>` reads one (an optional sign, then
/// ASCII digits; each digit is checked before the overflow it would cause), straight
/// from the bytes: every request carries an id, and the UTF-8 check and the generic
/// parser cost more than the digits do. A property test holds it to `str::parse`.
fn parse_decimal(text: &[u8]) -> Result<i64, QueryError> {
    let (negative, digits) = match text {
        [] => return Err(QueryError::EmptyId),
        [b'+' | b'-'] => return Err(QueryError::InvalidId),
        [b'-', digits @ ..] => (true, digits),
        [b'+', digits @ ..] => (false, digits),
        digits => (false, digits),
    };
    if digits.len() > UNCHECKED_DIGITS {
        return parse_long_decimal(negative, digits);
    }
    let mut magnitude: u64 = 0;
    for &byte in digits {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return Err(QueryError::InvalidId);
        }
        magnitude = magnitude * 10 + u64::from(digit);
    }
    match negative {
        false => i64::try_from(magnitude).map_err(|_| QueryError::IdOutOfRange),
        true if magnitude <= i64::MIN.unsigned_abs() => Ok(0i64.wrapping_sub_unsigned(magnitude)),
        true => Err(QueryError::IdOutOfRange),
    }
}

/// An id of more than 19 digits: leading zeros, or out of range. Each digit is
/// checked before the overflow it would cause, as `str::parse` does.
#[cold]
fn parse_long_decimal(negative: bool, digits: &[u8]) -> Result<i64, QueryError> {
    let mut value: i64 = 0;
    for &byte in digits {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return Err(QueryError::InvalidId);
        }
        let digit = i64::from(digit);
        // Negative ids accumulate downwards, so that i64::MIN is reachable.
        value = value
            .checked_mul(10)
            .and_then(|v| match negative {
                true => v.checked_sub(digit),
                false => v.checked_add(digit),
            })
            .ok_or(QueryError::IdOutOfRange)?;
    }
    Ok(value)
}

/// Decodes `raw` into `buf` when it has escapes; `Ok(None)` when it does not fit.
fn decode_small<'a>(
    raw: &'a [u8],
    buf: &'a mut [u8; SMALL],
) -> Result<Option<&'a [u8]>, QueryError> {
    if !raw.contains(&b'%') {
        return Ok(Some(raw));
    }
    let mut len = 0;
    for byte in Unescape::new(raw) {
        let byte = byte?;
        if len == SMALL {
            return Ok(None);
        }
        buf[len] = byte;
        len += 1;
    }
    Ok(Some(&buf[..len]))
}

/// Decodes and validates an endpoint value.
fn decode_endpoint<'a>(
    raw: &'a [u8],
    scratch: &'a mut Vec<u8>,
) -> Result<Endpoint<'a>, QueryError> {
    let decoded: &[u8] = if raw.contains(&b'%') {
        scratch.clear();
        for byte in Unescape::new(raw) {
            scratch.push(byte?);
        }
        scratch
    } else {
        raw
    };
    validate_endpoint(decoded).map_err(QueryError::InvalidEndpoint)
}

/// Checks that `url` is an absolute `http://` or `https://` URL with a host.
///
/// This is the request-time check only; resolving and calling the URL is the
/// callback dispatcher's business.
fn validate_endpoint(url: &[u8]) -> Result<Endpoint<'_>, EndpointError> {
    if url.len() > MAX_ENDPOINT_LEN {
        return Err(EndpointError::TooLong);
    }
    if !url.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(EndpointError::IllegalCharacter);
    }
    let rest = strip_prefix_ignore_case(url, b"http://")
        .or_else(|| strip_prefix_ignore_case(url, b"https://"))
        .ok_or(EndpointError::UnsupportedScheme)?;
    let authority_end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let host_port = match authority.iter().rposition(|&b| b == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    let (host, port) = split_host_port(host_port);
    if host.is_empty() || host == b"[]" {
        return Err(EndpointError::MissingHost);
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(port)
                .ok()
                .and_then(|p| p.parse::<u16>().ok())
                .is_some();
        if !valid {
            return Err(EndpointError::InvalidPort);
        }
    }
    // Checked above: every byte is printable ASCII.
    let ascii = |bytes| std::str::from_utf8(bytes).expect("ASCII is UTF-8");
    Ok(Endpoint {
        url: ascii(url),
        host: ascii(host),
    })
}

/// Splits `host[:port]`, keeping IPv6 literals such as `[::1]:80` whole.
fn split_host_port(host_port: &[u8]) -> (&[u8], Option<&[u8]>) {
    let host_end = if host_port.first() == Some(&b'[') {
        match host_port.iter().position(|&b| b == b']') {
            Some(close) => close + 1,
            None => return (&host_port[..0], None),
        }
    } else {
        host_port
            .iter()
            .position(|&b| b == b':')
            .unwrap_or(host_port.len())
    };
    let (host, after) = host_port.split_at(host_end);
    match after.split_first() {
        Some((b':', port)) => (host, Some(port)),
        Some(_) => (&host_port[..0], None),
        None => (host, None),
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

/// Iterates the bytes of a percent-encoded string.
struct Unescape<'a> {
    raw: std::slice::Iter<'a, u8>,
}

impl<'a> Unescape<'a> {
    fn new(raw: &'a [u8]) -> Self {
        Unescape { raw: raw.iter() }
    }
}

impl Iterator for Unescape<'_> {
    type Item = Result<u8, QueryError>;

    fn next(&mut self) -> Option<Self::Item> {
        let &byte = self.raw.next()?;
        if byte != b'%' {
            return Some(Ok(byte));
        }
        let hi = self.raw.next().and_then(|&b| hex_value(b));
        let lo = self.raw.next().and_then(|&b| hex_value(b));
        Some(match (hi, lo) {
            (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
            _ => Err(QueryError::BadPercentEncoding),
        })
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &str) -> Result<(i64, Option<String>), QueryError> {
        let mut scratch = Vec::new();
        parse_accept_query(q.as_bytes(), &mut scratch)
            .map(|q| (q.id, q.endpoint.map(|e| e.url.to_owned())))
    }

    fn id(q: &str) -> Result<i64, QueryError> {
        parse(q).map(|(id, _)| id)
    }

    #[test]
    fn plain_ids() {
        assert_eq!(id("id=42"), Ok(42));
        assert_eq!(id("id=-7"), Ok(-7));
        assert_eq!(id("id=+7"), Ok(7));
        assert_eq!(id("id=007"), Ok(7));
        assert_eq!(id("id=0"), Ok(0));
    }

    #[test]
    fn ids_either_side_of_nineteen_digits() {
        assert_eq!(id("id=999999999999999999"), Ok(999_999_999_999_999_999));
        assert_eq!(id("id=-999999999999999999"), Ok(-999_999_999_999_999_999));
        assert_eq!(id("id=1000000000000000000"), Ok(1_000_000_000_000_000_000));
        assert_eq!(id("id=0000000000000000001"), Ok(1));
        assert_eq!(id("id=-9223372036854775808"), Ok(i64::MIN));
        assert_eq!(id("id=99999999999999999x"), Err(QueryError::InvalidId));
        assert_eq!(id("id=9999999999999999999"), Err(QueryError::IdOutOfRange));
        assert_eq!(id("id=-9999999999999999999"), Err(QueryError::IdOutOfRange));
        assert_eq!(id("id=00000000000000000001"), Ok(1));
        assert_eq!(id("id=-00000000000000000001"), Ok(-1));
    }

    #[test]
    fn ids_of_every_length_up_to_twenty_digits() {
        let mut text = String::new();
        for digit in "1234567890123456789".chars() {
            text.push(digit);
            assert_eq!(
                parse_decimal(text.as_bytes()),
                Ok(text.parse().unwrap()),
                "{text}"
            );
            let negative = format!("-{text}");
            assert_eq!(
                parse_decimal(negative.as_bytes()),
                Ok(negative.parse().unwrap())
            );
            let last_not_a_digit = format!("{}:", &text[..text.len() - 1]);
            assert_eq!(
                parse_decimal(last_not_a_digit.as_bytes()),
                Err(QueryError::InvalidId)
            );
        }
        text.push('0');
        assert_eq!(
            parse_decimal(text.as_bytes()),
            Err(QueryError::IdOutOfRange)
        );
    }

    #[test]
    fn bytes_next_to_the_digits_are_not_digits() {
        for byte in [b'/', b':', b'?', 0x20, 0xB0, 0x00, 0x40] {
            for at in 0..12 {
                let mut text = *b"123456789012";
                text[at] = byte;
                assert_eq!(parse_decimal(&text), Err(QueryError::InvalidId), "{text:?}");
            }
        }
    }

    #[test]
    fn extreme_ids() {
        assert_eq!(id("id=9223372036854775807"), Ok(i64::MAX));
        assert_eq!(id("id=-9223372036854775808"), Ok(i64::MIN));
        assert_eq!(id("id=9223372036854775808"), Err(QueryError::IdOutOfRange));
        assert_eq!(id("id=-9223372036854775809"), Err(QueryError::IdOutOfRange));
        assert_eq!(
            id("id=99999999999999999999999"),
            Err(QueryError::IdOutOfRange)
        );
    }

    #[test]
    fn bad_ids() {
        assert_eq!(id(""), Err(QueryError::MissingId));
        assert_eq!(id("endpoint=http://h/"), Err(QueryError::MissingId));
        assert_eq!(id("ID=1"), Err(QueryError::MissingId));
        assert_eq!(id("id="), Err(QueryError::EmptyId));
        assert_eq!(id("id"), Err(QueryError::EmptyId));
        assert_eq!(id("id=abc"), Err(QueryError::InvalidId));
        assert_eq!(id("id=1.5"), Err(QueryError::InvalidId));
        assert_eq!(id("id=1e3"), Err(QueryError::InvalidId));
        assert_eq!(id("id=0x10"), Err(QueryError::InvalidId));
        assert_eq!(id("id=%201"), Err(QueryError::InvalidId));
        assert_eq!(id("id=1+"), Err(QueryError::InvalidId));
        assert_eq!(id("id=-"), Err(QueryError::InvalidId));
        assert_eq!(id("id=%FF"), Err(QueryError::InvalidId));
    }

    #[test]
    fn percent_encoded_ids_and_names() {
        assert_eq!(id("id=%34%32"), Ok(42));
        assert_eq!(id("id=%2D5"), Ok(-5));
        assert_eq!(id("%69%64=9"), Ok(9));
        assert_eq!(id("id=%2d9223372036854775808"), Ok(i64::MIN));
    }

    #[test]
    fn bad_percent_encoding_is_refused_wherever_it_is() {
        assert_eq!(id("id=%"), Err(QueryError::BadPercentEncoding));
        assert_eq!(id("id=%4"), Err(QueryError::BadPercentEncoding));
        assert_eq!(id("id=%G1"), Err(QueryError::BadPercentEncoding));
        assert_eq!(id("i%d=1"), Err(QueryError::BadPercentEncoding));
        assert_eq!(
            parse("id=1&endpoint=http%3A%2F%2Fh%2"),
            Err(QueryError::BadPercentEncoding)
        );
    }

    #[test]
    fn repeated_parameters_are_refused() {
        assert_eq!(id("id=1&id=2"), Err(QueryError::Repeated("id")));
        assert_eq!(id("id=1&id=1"), Err(QueryError::Repeated("id")));
        assert_eq!(
            parse("id=1&endpoint=http://a/&endpoint=http://b/"),
            Err(QueryError::Repeated("endpoint"))
        );
    }

    #[test]
    fn unknown_parameters_and_empty_pairs_are_ignored() {
        assert_eq!(id("x=1&id=5&y"), Ok(5));
        assert_eq!(id("&&id=5&"), Ok(5));
        assert_eq!(
            id("averyveryveryverylongparameternamethatisunknown=1&id=3"),
            Ok(3)
        );
    }

    #[test]
    fn endpoints_are_decoded() {
        assert_eq!(
            parse("id=1&endpoint=http%3A%2F%2F127.0.0.1%3A9000%2Fhook%3Fx%3D1"),
            Ok((1, Some("http://127.0.0.1:9000/hook?x=1".to_owned())))
        );
        assert_eq!(
            parse("endpoint=https://example.com&id=2"),
            Ok((2, Some("https://example.com".to_owned())))
        );
        assert_eq!(
            parse("id=3&endpoint=HTTP://[::1]:8080/p"),
            Ok((3, Some("HTTP://[::1]:8080/p".to_owned())))
        );
        assert_eq!(
            parse("id=3&endpoint=http://user:pw@host/p"),
            Ok((3, Some("http://user:pw@host/p".to_owned())))
        );
    }

    #[test]
    fn the_host_is_picked_out() {
        let host = |q: &str| {
            let mut scratch = Vec::new();
            parse_accept_query(q.as_bytes(), &mut scratch)
                .unwrap()
                .endpoint
                .unwrap()
                .host
                .to_owned()
        };
        assert_eq!(
            host("id=1&endpoint=http://Example.com:80/p?q"),
            "Example.com"
        );
        assert_eq!(host("id=1&endpoint=https://u:p@10.0.0.1"), "10.0.0.1");
        assert_eq!(
            host("id=1&endpoint=http%3A%2F%2F%5B%3A%3A1%5D%3A9%2F"),
            "[::1]"
        );
    }

    #[test]
    fn invalid_endpoints() {
        let bad = |q: &str| match parse(q) {
            Err(QueryError::InvalidEndpoint(e)) => e,
            other => panic!("{q}: {other:?}"),
        };
        use EndpointError::*;
        assert_eq!(bad("id=1&endpoint="), UnsupportedScheme);
        assert_eq!(bad("id=1&endpoint=ftp://h/"), UnsupportedScheme);
        assert_eq!(bad("id=1&endpoint=/relative"), UnsupportedScheme);
        assert_eq!(bad("id=1&endpoint=http:/h"), UnsupportedScheme);
        assert_eq!(bad("id=1&endpoint=http://"), MissingHost);
        assert_eq!(bad("id=1&endpoint=http:///path"), MissingHost);
        assert_eq!(bad("id=1&endpoint=http://u@/p"), MissingHost);
        assert_eq!(bad("id=1&endpoint=http://[]:80/"), MissingHost);
        assert_eq!(bad("id=1&endpoint=http://h:/p"), InvalidPort);
        assert_eq!(bad("id=1&endpoint=http://h:99999/p"), InvalidPort);
        assert_eq!(bad("id=1&endpoint=http://h:8x/p"), InvalidPort);
        assert_eq!(bad("id=1&endpoint=http://h%20x/"), IllegalCharacter);
        assert_eq!(bad("id=1&endpoint=http://h/%0A"), IllegalCharacter);
        assert_eq!(bad("id=1&endpoint=http://h/%C3%A9"), IllegalCharacter);
    }

    #[test]
    fn endpoint_length_limit_applies_after_decoding() {
        let path = "a".repeat(MAX_ENDPOINT_LEN - "http://h/".len());
        let at_limit = format!("id=1&endpoint=http://h/{path}");
        assert_eq!(parse(&at_limit).unwrap().1.unwrap().len(), MAX_ENDPOINT_LEN);
        let over = format!("id=1&endpoint=http://h/{path}b");
        assert_eq!(
            parse(&over),
            Err(QueryError::InvalidEndpoint(EndpointError::TooLong))
        );
        // Escapes shrink when decoded: 2048 decoded bytes written with escapes still fit.
        let escaped = format!("id=1&endpoint=http%3A%2F%2Fh%2F{path}");
        assert_eq!(parse(&escaped).unwrap().1.unwrap().len(), MAX_ENDPOINT_LEN);
    }

    proptest::proptest! {
        #[test]
        fn ids_parse_exactly_as_str_parse_does(
            text in "[-+]?[0-9]{0,22}|[-+]?0{0,4}[1-9][0-9]{14,19}|[-+0-9a ]{0,24}|[-+]?[0-9/:?@`p\u{b0}]{1,20}"
        ) {
            let expected = text.parse::<i64>().map_err(|e| match e.kind() {
                std::num::IntErrorKind::Empty => QueryError::EmptyId,
                std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
                    QueryError::IdOutOfRange
                }
                _ => QueryError::InvalidId,
            });
            proptest::prop_assert_eq!(parse_decimal(text.as_bytes()), expected);
        }
    }

    #[test]
    fn scratch_is_reused_without_growing() {
        let mut scratch = Vec::new();
        let q = b"id=1&endpoint=http%3A%2F%2Fh%2Fp";
        parse_accept_query(q, &mut scratch).unwrap();
        let capacity = scratch.capacity();
        for _ in 0..100 {
            parse_accept_query(q, &mut scratch).unwrap();
        }
        assert_eq!(scratch.capacity(), capacity);
    }
}
