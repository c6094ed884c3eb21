//! gRPC's length-prefixed messages, measured against a limit as they
//! stream in: the input's first byte is the limit, the rest the stream, cut
//! into frames after every byte equal to the limit. The message found too
//! large is the first whose prefix says so, wherever the frames are cut, and
//! what precedes its prefix is let through.
#![no_main]

use std::sync::Arc;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use protomesh::call::{Carrier, Cut, Framing, MessageLimit, PolicyError};
use protomesh::grpc::Code;

/// What the limit cuts the call with.
#[derive(Debug)]
struct TooLarge;

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("too large")
    }
}

impl std::error::Error for TooLarge {}

impl PolicyError for TooLarge {
    fn code(&self) -> Code {
        Code::ResourceExhausted
    }
    fn reason(&self) -> &'static str {
        "too_large"
    }
}

fn first_too_large(stream: &[u8], max: u64) -> Option<usize> {
    let mut at = 0;
    while at + 5 <= stream.len() {
        let size = u32::from_be_bytes(stream[at + 1..at + 5].try_into().unwrap()) as u64;
        if size > max {
            return Some(at);
        }
        at += 5 + size as usize;
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let Some((&max, stream)) = data.split_first() else { return };
    let too_large = Arc::new(|_, _| Arc::new(TooLarge) as Arc<dyn PolicyError>);
    let cut = Cut::default();
    let mut framing = Framing::new(MessageLimit::new(u64::from(max), too_large, cut.clone()), Carrier::Request);
    let mut offset = 0;
    let mut found = None;
    for frame in stream.split_inclusive(|&b| b == max) {
        if let Err(at) = framing.scan(&Bytes::copy_from_slice(frame)) {
            found = Some((offset, at));
            break;
        }
        offset += frame.len();
    }
    match (first_too_large(stream, u64::from(max)), found) {
        (None, None) => {}
        // The frame is cut where the prefix began, or at its start when the prefix began earlier.
        (Some(prefix), Some((frame_start, 0))) => assert!(prefix <= frame_start, "{prefix} > {frame_start}"),
        (Some(prefix), Some((frame_start, at))) => assert_eq!(prefix, frame_start + at),
        (expected, found) => panic!("expected a message too large at {expected:?}, found {found:?}"),
    }
    assert_eq!(cut.is_cut(), found.is_some(), "the call is cut when, and only when, a message is too large");
});
