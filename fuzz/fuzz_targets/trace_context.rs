//! Trace context headers from callers: W3C `traceparent`/`tracestate` and
//! B3 (single and multi). The input is split at newlines into the values of
//! those headers in turn.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use protomesh::telemetry::trace::extract;

const HEADERS: [&str; 7] = ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"];

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for (name, value) in HEADERS.iter().zip(data.split(|&b| b == b'\n')) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    if let Some(context) = extract(&headers) {
        assert!(context.is_valid(), "an extracted parent is a valid span context");
    }
});
