//! A limit on the size of a call's gRPC messages, checked as the bodies
//! stream through: each message's 5-byte prefix is read on the way, and
//! nothing is buffered. A call's request and response share one
//! [`MessageLimit`], so that whichever body meets a message too large, the
//! call ends with the policy's error.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body::Frame;

use super::{Direction, ProxyError};
use crate::grpc::{self, Code};

/// Which body carried a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carrier {
    Request,
    Response,
}

/// Makes the error a message too large ends a call with, from its size and carrier.
pub type TooLarge = Arc<dyn Fn(u64, Carrier) -> ProxyError + Send + Sync>;

/// One call's message limit.
#[derive(Clone)]
pub struct MessageLimit {
    max: u64,
    too_large: TooLarge,
    /// The first message over the limit: its size and carrier.
    exceeded: Arc<OnceLock<(u64, Carrier)>>,
}

impl std::fmt::Debug for MessageLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageLimit").field("max", &self.max).field("exceeded", &self.exceeded.get()).finish()
    }
}

impl MessageLimit {
    pub fn new(max: u64, too_large: TooLarge) -> MessageLimit {
        MessageLimit { max, too_large, exceeded: Arc::default() }
    }

    /// The error the call ends with, once a message was too large.
    pub fn error(&self) -> Option<ProxyError> {
        self.exceeded.get().map(|&(size, carrier)| (self.too_large)(size, carrier))
    }

    /// The error as the status and trailers that end a response already
    /// under way, as the sidecar of `direction` answers.
    pub(super) fn trailers(&self, direction: Direction) -> Option<(Code, Frame<Bytes>)> {
        let error = self.error()?;
        let trailers = grpc::status_headers(error.code(), &error.message(direction));
        Some((error.code(), Frame::trailers(trailers)))
    }
}

/// Where one body is in its stream of length-prefixed messages.
#[derive(Debug)]
pub struct Framing {
    pub(super) limit: MessageLimit,
    carrier: Carrier,
    prefix: [u8; 5],
    /// Bytes of the current prefix read so far.
    have: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
}

impl Framing {
    pub fn new(limit: MessageLimit, carrier: Carrier) -> Framing {
        Framing { limit, carrier, prefix: [0; 5], have: 0, remaining: 0 }
    }

    /// Reads `data` on. `Err(at)` when the message whose prefix ends in it is
    /// too large: `at` is where that prefix began in `data` (0 if earlier),
    /// so that what comes before it can still go on.
    pub fn scan(&mut self, data: &Bytes) -> Result<(), usize> {
        let mut at = 0;
        while at < data.len() {
            if self.remaining > 0 {
                let skip = self.remaining.min((data.len() - at) as u64);
                self.remaining -= skip;
                at += skip as usize;
                continue;
            }
            let prefix_start = at;
            let take = (5 - self.have).min(data.len() - at);
            self.prefix[self.have..self.have + take].copy_from_slice(&data[at..at + take]);
            let began = if self.have == 0 { prefix_start } else { 0 };
            self.have += take;
            at += take;
            if self.have == 5 {
                self.have = 0;
                let size =
                    u64::from(u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]));
                if size > self.limit.max {
                    let _ = self.limit.exceeded.set((size, self.carrier));
                    return Err(began);
                }
                self.remaining = size;
            }
        }
        Ok(())
    }

    /// Whether this call has met a message too large, in either body.
    pub(super) fn exceeded(&self) -> bool {
        self.limit.exceeded.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max: u64) -> MessageLimit {
        MessageLimit::new(max, Arc::new(|size, _| ProxyError::NoRoute { service: format!("{size}") }))
    }

    fn message(size: usize) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(size as u32).to_be_bytes());
        framed.extend(std::iter::repeat_n(7u8, size));
        framed
    }

    #[test]
    fn messages_are_measured_across_any_split_into_frames() {
        let mut stream = message(10);
        stream.extend(message(3));
        stream.extend(message(11));
        for split in 1..stream.len() {
            let mut framing = Framing::new(limit(10), Carrier::Response);
            let chunks: Vec<Bytes> = stream.chunks(split).map(Bytes::copy_from_slice).collect();
            let failed = chunks.iter().enumerate().find_map(|(i, chunk)| framing.scan(chunk).err().map(|at| (i, at)));
            let (chunk, at) = failed.expect("the third message is over the limit");
            // The third message's prefix is bytes 23 to 27 of the stream.
            assert_eq!(chunk, 27 / split, "split {split}");
            let began_here = 23 / split == chunk;
            assert_eq!(at, if began_here { 23 % split } else { 0 }, "split {split}");
            assert_eq!(limit_error(&framing), "11");
        }
    }

    fn limit_error(framing: &Framing) -> String {
        match framing.limit.error() {
            Some(ProxyError::NoRoute { service }) => service,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn messages_at_the_limit_pass_and_the_first_over_it_is_kept() {
        let shared = limit(4);
        let mut request = Framing::new(shared.clone(), Carrier::Request);
        assert_eq!(request.scan(&Bytes::from(message(4))), Ok(()));
        assert!(shared.error().is_none());
        let mut response = Framing::new(shared.clone(), Carrier::Response);
        assert_eq!(response.scan(&Bytes::from(message(9))), Err(0));
        assert!(request.exceeded(), "the request's side sees it too");
        assert_eq!(shared.exceeded.get(), Some(&(9, Carrier::Response)));
    }
}
