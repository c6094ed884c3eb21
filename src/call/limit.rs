//! A limit on the size of a call's gRPC messages, checked as the bodies
//! stream through: each message's 5-byte prefix is read on the way, and
//! nothing is buffered. A call's request and response share one
//! [`MessageLimit`], so that whichever body meets a message too large, the
//! call is cut with the policy's error.

use std::sync::Arc;

use bytes::Bytes;

use super::{Cut, PolicyError};

/// Which body carried a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carrier {
    Request,
    Response,
}

/// Makes the error a message too large cuts a call with, from its size and carrier.
pub type TooLarge = Arc<dyn Fn(u64, Carrier) -> Arc<dyn PolicyError> + Send + Sync>;

/// One call's message limit.
#[derive(Clone)]
pub struct MessageLimit {
    max: u64,
    too_large: TooLarge,
    pub(super) cut: Cut,
}

impl std::fmt::Debug for MessageLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageLimit").field("max", &self.max).field("cut", &self.cut).finish()
    }
}

impl MessageLimit {
    pub fn new(max: u64, too_large: TooLarge, cut: Cut) -> MessageLimit {
        MessageLimit { max, too_large, cut }
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
                    self.limit.cut.set((self.limit.too_large)(size, self.carrier));
                    return Err(began);
                }
                self.remaining = size;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::Code;

    /// A message over the limit: its size and carrier.
    #[derive(Debug, PartialEq)]
    struct Over(u64, Carrier);

    impl std::fmt::Display for Over {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} bytes", self.0)
        }
    }

    impl std::error::Error for Over {}

    impl PolicyError for Over {
        fn code(&self) -> Code {
            Code::ResourceExhausted
        }
        fn reason(&self) -> &'static str {
            "over"
        }
    }

    fn limit(max: u64) -> MessageLimit {
        MessageLimit::new(max, Arc::new(|size, carrier| Arc::new(Over(size, carrier))), Cut::default())
    }

    fn message(size: usize) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(size as u32).to_be_bytes());
        framed.extend(std::iter::repeat_n(7u8, size));
        framed
    }

    fn over(limit: &MessageLimit) -> Option<(u64, Carrier)> {
        let error = limit.cut.error()?;
        let over = error.policy::<Over>().expect("the limit's error");
        Some((over.0, over.1))
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
            assert_eq!(over(&framing.limit), Some((11, Carrier::Response)));
        }
    }

    #[test]
    fn messages_at_the_limit_pass_and_the_first_over_it_cuts_the_call() {
        let shared = limit(4);
        let mut request = Framing::new(shared.clone(), Carrier::Request);
        assert_eq!(request.scan(&Bytes::from(message(4))), Ok(()));
        assert!(!shared.cut.is_cut());
        let mut response = Framing::new(shared.clone(), Carrier::Response);
        assert_eq!(response.scan(&Bytes::from(message(9))), Err(0));
        assert!(request.limit.cut.is_cut(), "the request's side sees it too");
        assert_eq!(over(&shared), Some((9, Carrier::Response)));
        let _ = response.scan(&Bytes::from(message(10)));
        assert_eq!(over(&shared), Some((9, Carrier::Response)), "the first is kept");
    }
}
