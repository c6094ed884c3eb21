//! `grpc-timeout`, sent by every caller: parsed, and what the sidecar writes
//! back for the remaining budget parses again to no more than it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protomesh::grpc::{encode_timeout, parse_timeout};

fuzz_target!(|data: &[u8]| {
    if let Some(timeout) = parse_timeout(data) {
        let encoded = encode_timeout(timeout);
        let again = parse_timeout(encoded.as_bytes()).expect("the sidecar's own grpc-timeout parses");
        assert!(again >= timeout, "{timeout:?} written as {encoded:?} reads back shorter: {again:?}");
    }
});
