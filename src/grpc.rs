//! The small part of gRPC-over-HTTP/2 the sidecar speaks itself: the path
//! `/pkg.Service/Method`, status codes, and the trailers-only responses it
//! answers with when a policy acts.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

// Header names as constants: a `&str` name is parsed and validated on every
// lookup, which on the hot path costs more than the lookup itself.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");
pub const GRPC_PREVIOUS_RPC_ATTEMPTS: HeaderName = HeaderName::from_static("grpc-previous-rpc-attempts");
pub const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
pub const GRPC_STATUS_DETAILS_BIN: HeaderName = HeaderName::from_static("grpc-status-details-bin");

/// The canonical gRPC status codes. Our own rather than `tonic::Code`: the
/// config and contracts name codes by their canonical names ("UNAVAILABLE"),
/// which tonic does not parse or print, and a foreign type could not take
/// this crate's serde impl; a `u8` repr also keeps it one byte in the hot
/// path's per-status caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

const NAMES: [(&str, Code); 17] = [
    ("OK", Code::Ok),
    ("CANCELLED", Code::Cancelled),
    ("UNKNOWN", Code::Unknown),
    ("INVALID_ARGUMENT", Code::InvalidArgument),
    ("DEADLINE_EXCEEDED", Code::DeadlineExceeded),
    ("NOT_FOUND", Code::NotFound),
    ("ALREADY_EXISTS", Code::AlreadyExists),
    ("PERMISSION_DENIED", Code::PermissionDenied),
    ("RESOURCE_EXHAUSTED", Code::ResourceExhausted),
    ("FAILED_PRECONDITION", Code::FailedPrecondition),
    ("ABORTED", Code::Aborted),
    ("OUT_OF_RANGE", Code::OutOfRange),
    ("UNIMPLEMENTED", Code::Unimplemented),
    ("INTERNAL", Code::Internal),
    ("UNAVAILABLE", Code::Unavailable),
    ("DATA_LOSS", Code::DataLoss),
    ("UNAUTHENTICATED", Code::Unauthenticated),
];

impl Code {
    /// Parses a canonical name such as `UNAVAILABLE`.
    pub fn from_name(name: &str) -> Option<Code> {
        NAMES.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
    }

    pub fn from_number(number: u8) -> Option<Code> {
        NAMES.get(usize::from(number)).map(|(_, code)| *code)
    }

    /// A canonical name, or an error listing the valid ones.
    pub fn parse(name: &str) -> Result<Code, String> {
        Code::from_name(name).ok_or_else(|| {
            format!("`{name}` is not a gRPC status code; use one of {}", Code::names().collect::<Vec<_>>().join(", "))
        })
    }

    pub fn name(self) -> &'static str {
        NAMES[self as usize].0
    }

    /// All canonical names, for error messages that list what is valid.
    pub fn names() -> impl Iterator<Item = &'static str> {
        NAMES.iter().map(|(n, _)| *n)
    }

    fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(
            ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"][self as usize],
        )
    }
}

impl<'de> serde::Deserialize<'de> for Code {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Code, D::Error> {
        Code::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The status among response headers: present in a trailers-only response
/// (and in trailers).
pub fn status_in(headers: &HeaderMap) -> Option<Code> {
    Code::from_number(headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()?)
}

/// A gRPC call's service and method, split out of a `:path` of the form
/// `/pkg.Service/Method`.
pub fn split_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some((service, method))
}

/// Parses `grpc-timeout`: 1 to 8 ASCII digits and a unit (`H M S m u n`).
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(amount * 3600),
        b"M" => Duration::from_secs(amount * 60),
        b"S" => Duration::from_secs(amount),
        b"m" => Duration::from_millis(amount),
        b"u" => Duration::from_micros(amount),
        b"n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Encodes a timeout rounded up to three significant digits, as gRPC core
/// does: a hop never shortens a budget, and calls made moments apart share a
/// value, which HPACK sends as a one-byte index. At full precision every call
/// would add an entry to both ends' header tables and evict the headers that
/// do repeat. The unit is the coarsest that holds the rounded value exactly.
pub fn encode_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u64 = 99_999_999;
    const UNITS: [(u64, u8); 6] = [
        (3_600_000_000_000, b'H'),
        (60_000_000_000, b'M'),
        (1_000_000_000, b'S'),
        (1_000_000, b'm'),
        (1_000, b'u'),
        (1, b'n'),
    ];
    let (mut amount, unit) = match u64::try_from(timeout.as_nanos()) {
        Ok(nanos) => {
            let nanos = round_up_to_three_digits(nanos);
            UNITS
                .iter()
                .find(|&&(per, _)| nanos.is_multiple_of(per) && nanos / per <= MAX)
                .map_or((nanos.div_ceil(UNITS[0].0), b'H'), |&(per, unit)| (nanos / per, unit))
        }
        Err(_) => (MAX, b'H'),
    };
    // Written by hand: this runs on every call with a deadline.
    let mut text = [0u8; 9];
    let mut start = text.len() - 1;
    text[start] = unit;
    loop {
        start -= 1;
        text[start] = b'0' + (amount % 10) as u8;
        amount /= 10;
        if amount == 0 {
            break;
        }
    }
    HeaderValue::from_bytes(&text[start..]).expect("digits and a unit letter are a valid header")
}

fn round_up_to_three_digits(value: u64) -> u64 {
    match value.checked_ilog10().and_then(|digits| digits.checked_sub(2)) {
        Some(dropped) => {
            let step = 10u64.pow(dropped);
            value.div_ceil(step).saturating_mul(step)
        }
        None => value,
    }
}

/// What a response's `grpc-retry-pushback-ms` asks: `None` without one;
/// `Some(Some(wait))` to wait that long; `Some(None)`, for a negative or
/// unreadable value, not to retry at all.
pub fn retry_pushback(headers: &HeaderMap) -> Option<Option<Duration>> {
    let value = headers.get(GRPC_RETRY_PUSHBACK_MS)?;
    let millis = value.to_str().ok().and_then(|v| v.parse::<i64>().ok());
    Some(millis.and_then(|ms| u64::try_from(ms).ok()).map(Duration::from_millis))
}

/// The headers of a gRPC status: `grpc-status` and a percent-encoded
/// `grpc-message`. Sent alone with HTTP 200 they are a trailers-only
/// response, which every gRPC client reads as the call's final status; at the
/// end of a stream they are its trailers.
pub fn status_headers(code: Code, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(3);
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS, code.header_value());
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert(GRPC_MESSAGE, value);
    }
    headers
}

/// `message` as one uncompressed gRPC frame: its flag, its length, itself.
pub fn framed(message: &impl prost::Message) -> bytes::Bytes {
    use bytes::BufMut;
    let mut framed = bytes::BytesMut::with_capacity(5 + message.encoded_len());
    framed.put_u8(0);
    framed.put_u32(message.encoded_len() as u32);
    message.encode(&mut framed).expect("room reserved");
    framed.freeze()
}

/// `google.rpc.Status`, the message `grpc-status-details-bin` carries.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

/// The value of `grpc-status-details-bin`: the status with its details,
/// base64 without padding, as binary metadata is sent.
pub fn status_details(code: Code, message: &str, details: Vec<prost_types::Any>) -> HeaderValue {
    use base64::Engine;
    let status = RpcStatus { code: code as i32, message: message.to_string(), details };
    let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(prost::Message::encode_to_vec(&status));
    HeaderValue::try_from(encoded).expect("base64 is a valid header value")
}

/// The `grpc-message` of a status, decoded; empty when there is none.
pub fn message_in(headers: &HeaderMap) -> String {
    headers.get(GRPC_MESSAGE).map_or_else(String::new, |value| {
        percent_encoding::percent_decode(value.as_bytes()).decode_utf8_lossy().into_owned()
    })
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The gRPC status a client derives from an HTTP/2 `RST_STREAM` error code
/// (the table in the gRPC HTTP/2 protocol document).
pub fn code_for_reset(reason: h2::Reason) -> Code {
    match reason {
        h2::Reason::REFUSED_STREAM => Code::Unavailable,
        h2::Reason::CANCEL => Code::Cancelled,
        h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_well_formed_paths_only() {
        assert_eq!(split_path("/shop.v1.Inventory/GetStock"), Some(("shop.v1.Inventory", "GetStock")));
        for bad in ["", "/", "//M", "/Svc/", "Svc/M", "/Svc", "/Svc/M/extra"] {
            assert_eq!(split_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parses_grpc_timeout_in_every_unit() {
        assert_eq!(parse_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout(b"10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout(b"99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_timeout(b"0n"), Some(Duration::ZERO));
        for bad in [&b""[..], b"m", b"10", b"123456789m", b"-1S", b"1.5S", b"10s", b"1 S", b"\xff\xfeS"] {
            assert_eq!(parse_timeout(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn encodes_grpc_timeout_to_three_digits_and_never_shorter() {
        assert_eq!(encode_timeout(Duration::ZERO), "0H");
        assert_eq!(encode_timeout(Duration::from_nanos(999)), "999n");
        assert_eq!(encode_timeout(Duration::from_nanos(1_001)), "1010n");
        assert_eq!(encode_timeout(Duration::from_millis(250)), "250m");
        assert_eq!(encode_timeout(Duration::from_micros(1_234_567)), "1240m");
        assert_eq!(encode_timeout(Duration::from_secs(90)), "90S");
        assert_eq!(encode_timeout(Duration::from_secs(3600)), "1H");
        assert_eq!(encode_timeout(Duration::from_secs(1_000_000)), "1000000S");
        assert_eq!(encode_timeout(Duration::from_secs(u64::MAX / 4)), "99999999H");
        for nanos in [1, 7, 999, 1_001, 12_345_678, 999_999_999, 86_400_000_000_001, u64::MAX] {
            let timeout = Duration::from_nanos(nanos);
            let round_trip = parse_timeout(encode_timeout(timeout).as_bytes()).unwrap();
            assert!(round_trip >= timeout, "{timeout:?} became {round_trip:?}");
            assert!(round_trip.as_secs_f64() <= timeout.as_secs_f64() * 1.01, "{timeout:?} became {round_trip:?}");
        }
    }

    #[test]
    fn budgets_a_moment_apart_share_one_encoding() {
        let full = Duration::from_secs(30);
        for elapsed in [Duration::from_nanos(1), Duration::from_micros(37), Duration::from_millis(99)] {
            assert_eq!(encode_timeout(full - elapsed), "30S", "{elapsed:?} into the budget");
        }
    }

    #[test]
    fn code_names_round_trip() {
        for name in Code::names() {
            assert_eq!(Code::from_name(name).unwrap().name(), name);
        }
        assert_eq!(Code::from_name("unavailable"), None);
        assert_eq!(Code::from_number(14), Some(Code::Unavailable));
        assert_eq!(Code::from_number(17), None);
        assert_eq!(Code::Unauthenticated as u8, 16);
    }

    #[test]
    fn status_headers_encode_the_message() {
        let headers = status_headers(Code::PermissionDenied, "rule \"x\" denies 100%\n");
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers["grpc-status"], "7");
        assert_eq!(headers["grpc-message"], "rule \"x\" denies 100%25%0A");
    }
}
