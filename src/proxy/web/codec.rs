//! gRPC-Web's encoding of a call (the protocol's PROTOCOL-WEB.md): the same
//! length-prefixed messages as gRPC, with the trailers sent last in the body
//! as a frame flagged 0x80, and in the `-text` variant the whole body in
//! base64. A text request may be several padded base64 runs one after the
//! other (a client may encode each message apart), so it is decoded group
//! by group as it streams; a text response is one run, padded at its end.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;

/// The frame flag that marks the trailers.
const TRAILERS: u8 = 0x80;

/// How a call's body is sent, from its `content-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `application/grpc-web`, `application/grpc-web+proto`.
    Binary,
    /// `application/grpc-web-text`, `application/grpc-web-text+proto`.
    Text,
}

impl Mode {
    /// The mode of a `content-type`, when it is gRPC-Web's.
    pub fn of(content_type: &str) -> Option<Mode> {
        let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/grpc-web" | "application/grpc-web+proto" => Some(Mode::Binary),
            "application/grpc-web-text" | "application/grpc-web-text+proto" => Some(Mode::Text),
            _ => None,
        }
    }

    /// The response's `content-type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Mode::Binary => "application/grpc-web+proto",
            Mode::Text => "application/grpc-web-text+proto",
        }
    }
}

/// The trailers as gRPC-Web's last frame: `name: value\r\n` lines, names in
/// lower case, after the 0x80 flag and their length.
pub fn trailers_frame(trailers: &HeaderMap) -> Bytes {
    let mut block = BytesMut::new();
    for (name, value) in trailers {
        block.put_slice(name.as_str().as_bytes());
        block.put_slice(b": ");
        block.put_slice(value.as_bytes());
        block.put_slice(b"\r\n");
    }
    let mut frame = BytesMut::with_capacity(5 + block.len());
    frame.put_u8(TRAILERS);
    frame.put_u32(block.len() as u32);
    frame.put_slice(&block);
    frame.freeze()
}

/// A text request's body as it streams in: base64 in groups of four
/// characters, any group ending a padded run.
#[derive(Debug, Default)]
pub struct TextDecoder {
    /// Characters of a group not yet whole.
    carry: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the gRPC-Web text body is not base64: {0}")]
pub struct NotBase64(String);

impl TextDecoder {
    /// Decodes what `chunk` completes; the rest waits for the next chunk.
    pub fn decode(&mut self, chunk: &[u8]) -> Result<Bytes, NotBase64> {
        self.carry.extend(chunk.iter().filter(|b| !b.is_ascii_whitespace()));
        let whole = self.carry.len() / 4 * 4;
        let mut out = Vec::with_capacity(whole / 4 * 3);
        // A run ends with the first group that holds padding.
        let mut start = 0;
        while start < whole {
            let end = (start..whole)
                .step_by(4)
                .find(|&group| self.carry[group..group + 4].contains(&b'='))
                .map_or(whole, |group| group + 4);
            STANDARD.decode_vec(&self.carry[start..end], &mut out).map_err(|e| NotBase64(e.to_string()))?;
            start = end;
        }
        self.carry.drain(..whole);
        Ok(out.into())
    }

    /// At the body's end: what is left must be nothing.
    pub fn finish(&self) -> Result<(), NotBase64> {
        if self.carry.is_empty() {
            Ok(())
        } else {
            Err(NotBase64(format!("it ends in the middle of a group ({} characters)", self.carry.len())))
        }
    }
}

/// A text response's body as it streams out: one base64 run, whose last
/// bytes (fewer than three) wait for more or for the end.
#[derive(Debug, Default)]
pub struct TextEncoder {
    carry: Vec<u8>,
}

impl TextEncoder {
    pub fn encode(&mut self, chunk: &[u8]) -> Bytes {
        self.carry.extend_from_slice(chunk);
        let whole = self.carry.len() / 3 * 3;
        let encoded = STANDARD.encode(&self.carry[..whole]);
        self.carry.drain(..whole);
        encoded.into()
    }

    /// The rest, padded.
    pub fn finish(&mut self) -> Bytes {
        let encoded = STANDARD.encode(&self.carry);
        self.carry.clear();
        encoded.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::{self, Code};

    #[test]
    fn content_types_name_the_mode() {
        assert_eq!(Mode::of("application/grpc-web"), Some(Mode::Binary));
        assert_eq!(Mode::of("application/grpc-web+proto; charset=utf-8"), Some(Mode::Binary));
        assert_eq!(Mode::of("Application/GRPC-Web-Text"), Some(Mode::Text));
        assert_eq!(Mode::of("application/grpc-web-text+proto"), Some(Mode::Text));
        assert_eq!(Mode::of("application/grpc"), None);
        assert_eq!(Mode::of("application/grpc-web+json"), None, "only protobuf messages");
    }

    #[test]
    fn trailers_are_the_last_frame_in_lower_case_lines() {
        let trailers = grpc::status_headers(Code::NotFound, "no such cart");
        let frame = trailers_frame(&trailers);
        assert_eq!(frame[0], 0x80);
        let length = u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(length, frame.len() - 5);
        let block = std::str::from_utf8(&frame[5..]).unwrap();
        assert!(block.contains("grpc-status: 5\r\n"), "{block}");
        assert!(block.contains("grpc-message: no such cart\r\n"), "{block}");
    }

    #[test]
    fn text_is_decoded_across_any_split_and_padded_runs() {
        let messages = [b"first message".to_vec(), b"second".to_vec(), vec![0, 1, 2, 250, 251]];
        // Each message encoded apart, as some clients do: padding mid-body.
        let body: String = messages.iter().map(|m| STANDARD.encode(m)).collect();
        let whole = messages.concat();
        for split in 0..=body.len() {
            let mut decoder = TextDecoder::default();
            let mut out = decoder.decode(&body.as_bytes()[..split]).unwrap().to_vec();
            out.extend_from_slice(&decoder.decode(&body.as_bytes()[split..]).unwrap());
            decoder.finish().unwrap();
            assert_eq!(out, whole, "split at {split}");
        }
    }

    #[test]
    fn bad_text_is_refused_saying_why() {
        let mut decoder = TextDecoder::default();
        assert!(decoder.decode(b"ab!d").unwrap_err().to_string().contains("not base64"));
        let mut decoder = TextDecoder::default();
        decoder.decode(b"QUJD" as &[u8]).unwrap();
        decoder.decode(b"QU").unwrap();
        assert!(decoder.finish().unwrap_err().to_string().contains("middle of a group (2 characters)"));
    }

    #[test]
    fn any_bytes_encoded_in_any_chunks_decode_back_and_any_text_decodes_or_is_refused() {
        let mut random = fastrand::Rng::with_seed(26);
        for _ in 0..2000 {
            let data: Vec<u8> = (0..random.usize(0..64)).map(|_| random.u8(..)).collect();
            let mut encoder = TextEncoder::default();
            let mut encoded = Vec::new();
            for chunk in data.chunks(random.usize(1..8)) {
                encoded.extend_from_slice(&encoder.encode(chunk));
            }
            encoded.extend_from_slice(&encoder.finish());
            let mut decoder = TextDecoder::default();
            assert_eq!(&decoder.decode(&encoded).unwrap()[..], &data[..]);
            decoder.finish().unwrap();
            // Text made of base64's alphabet, padding anywhere: decoded or
            // refused, never a panic.
            let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/== \n";
            let text: Vec<u8> = (0..random.usize(0..64)).map(|_| alphabet[random.usize(..alphabet.len())]).collect();
            let mut decoder = TextDecoder::default();
            for chunk in text.split_inclusive(|&b| b == b'=') {
                if decoder.decode(chunk).is_err() {
                    break;
                }
            }
        }
    }

    #[test]
    fn text_is_encoded_as_one_run_padded_at_its_end() {
        let body = b"a response of some length, then the trailers".to_vec();
        for split in 0..=body.len() {
            let mut encoder = TextEncoder::default();
            let mut out = encoder.encode(&body[..split]).to_vec();
            out.extend_from_slice(&encoder.encode(&body[split..]));
            out.extend_from_slice(&encoder.finish());
            assert_eq!(out, STANDARD.encode(&body).into_bytes(), "split at {split}");
        }
    }
}
