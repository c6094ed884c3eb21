//! gRPC-Web's text bodies, as a browser (or anyone) sends them: whatever
//! arrives, cut into chunks after every byte b'=', decodes or is refused
//! saying why, and never panics; and any bytes, encoded as the sidecar
//! encodes a response in chunks cut the same way, decode back to themselves.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protomesh::proxy::web::codec::{TextDecoder, TextEncoder};

fuzz_target!(|data: &[u8]| {
    let mut decoder = TextDecoder::default();
    for chunk in data.split_inclusive(|&b| b == b'=') {
        if let Err(error) = decoder.decode(chunk) {
            assert!(error.to_string().contains("not base64"), "{error}");
            break;
        }
    }

    let mut encoder = TextEncoder::default();
    let mut encoded = Vec::new();
    for chunk in data.split_inclusive(|&b| b == b'=') {
        encoded.extend_from_slice(&encoder.encode(chunk));
    }
    encoded.extend_from_slice(&encoder.finish());
    let mut decoder = TextDecoder::default();
    let decoded = decoder.decode(&encoded).expect("what the sidecar encodes decodes");
    decoder.finish().expect("one whole run");
    assert_eq!(&decoded[..], data);
});
