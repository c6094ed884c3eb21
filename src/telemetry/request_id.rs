//! The request ID that follows a call across services (`x-request-id`, as
//! Envoy and most gateways name it): kept when the caller sent a usable one,
//! made otherwise, and passed on, so that a call can be found in every
//! service's logs without a tracing backend.

use http::{HeaderMap, HeaderName, HeaderValue};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest request ID kept; a longer one is replaced, so that no caller
/// can make every log line of the call long.
const MAX_LEN: usize = 128;

/// The call's request ID, put on the request if it had none.
pub fn ensure(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(REQUEST_ID)
        && usable(id)
    {
        return id.clone();
    }
    let id = generate();
    headers.insert(REQUEST_ID, id.clone());
    id
}

fn usable(id: &HeaderValue) -> bool {
    (1..=MAX_LEN).contains(&id.len()) && id.as_bytes().iter().all(|b| b.is_ascii_graphic())
}

/// A random UUID (version 4). Written out here rather than with the uuid
/// crate: it is one format string over the fastrand the sidecar already has,
/// and a request ID needs to be unique, not unpredictable.
fn generate() -> HeaderValue {
    let bits = fastrand::u128(..) & !(0xf << 76) & !(0x3 << 62) | (0x4 << 76) | (0x2 << 62);
    let text = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        bits >> 96,
        (bits >> 80) & 0xffff,
        (bits >> 64) & 0xffff,
        (bits >> 48) & 0xffff,
        bits & 0xffff_ffff_ffff
    );
    HeaderValue::try_from(text).expect("hex digits and dashes are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usable_id_is_kept_and_a_missing_or_unusable_one_replaced_by_a_uuid() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("order-42"));
        assert_eq!(ensure(&mut headers), "order-42");

        for unusable in [String::new(), "x".repeat(MAX_LEN + 1), "has space".into()] {
            let mut headers = HeaderMap::new();
            headers.insert(REQUEST_ID, HeaderValue::try_from(unusable.as_str()).unwrap());
            let id = ensure(&mut headers);
            assert_ne!(id, unusable.as_str());
            assert_eq!(headers.get(REQUEST_ID), Some(&id), "the new one is passed on");
        }

        let id = ensure(&mut HeaderMap::new());
        let id = id.to_str().unwrap();
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
        assert!(id.as_bytes()[14] == b'4' && b"89ab".contains(&id.as_bytes()[19]), "version 4, RFC 4122 variant: {id}");
        assert_ne!(ensure(&mut HeaderMap::new()), ensure(&mut HeaderMap::new()));
    }
}
