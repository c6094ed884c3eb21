//! Checks that read whole request messages: each message is held back until
//! it has all arrived and passed, so the app never receives one that fails.
//! A failure cuts the call ([`Cut`]); what passed before it has gone on.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::PolicyError;

/// What a policy checks of each request message.
pub trait MessageCheck: Send + std::fmt::Debug + 'static {
    /// Before a message of `size` bytes is held: whether it may be.
    fn admit(&mut self, size: u32) -> Result<(), Arc<dyn PolicyError>>;
    /// One whole message, without its prefix; `compressed` is its flag.
    fn check(&mut self, compressed: bool, message: &[u8]) -> Result<(), Arc<dyn PolicyError>>;
}

/// A body's messages as they arrive: held while partial, then checked.
#[derive(Debug)]
pub struct Checking {
    check: Box<dyn MessageCheck>,
    /// Received, not yet whole.
    partial: BytesMut,
    /// The current message's size, once its prefix was read and admitted.
    admitted: Option<u32>,
    /// Checked, not yet passed on.
    passed: BytesMut,
}

impl Checking {
    pub fn new(check: Box<dyn MessageCheck>) -> Checking {
        Checking { check, partial: BytesMut::new(), admitted: None, passed: BytesMut::new() }
    }

    /// Takes `data` in; every message it completes is checked.
    pub fn take(&mut self, data: &[u8]) -> Result<(), Arc<dyn PolicyError>> {
        self.partial.extend_from_slice(data);
        loop {
            if self.partial.len() < 5 {
                return Ok(());
            }
            let size = u32::from_be_bytes([self.partial[1], self.partial[2], self.partial[3], self.partial[4]]);
            if self.admitted.is_none() {
                self.check.admit(size)?;
                self.admitted = Some(size);
            }
            let whole = 5 + size as usize;
            if self.partial.len() < whole {
                self.partial.reserve(whole - self.partial.len());
                return Ok(());
            }
            let message = self.partial.split_to(whole);
            self.admitted = None;
            self.check.check(message[0] & 1 == 1, &message[5..])?;
            // Taken over whole when nothing waits before it, as is usual.
            self.passed.unsplit(message);
        }
    }

    /// Whether a checked message waits to go on.
    pub fn has_passed(&self) -> bool {
        !self.passed.is_empty()
    }

    /// Whether it holds anything, checked or not.
    pub fn holds(&self) -> bool {
        !self.passed.is_empty() || !self.partial.is_empty()
    }

    /// What passed, to go on now, if anything.
    pub fn take_passed(&mut self) -> Option<Bytes> {
        Some(self.passed.split().freeze()).filter(|passed| !passed.is_empty())
    }

    /// At the end of the body: what was held of a message cut short goes on
    /// as it came, for the app to fail as it would without the sidecar.
    pub fn rest(&mut self) -> Bytes {
        let mut rest = self.passed.split();
        rest.extend_from_slice(&self.partial.split());
        rest.freeze()
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use super::*;
    use crate::grpc::Code;

    #[derive(Debug)]
    struct Refused(&'static str);

    impl fmt::Display for Refused {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Refused {}

    impl PolicyError for Refused {
        fn code(&self) -> Code {
            Code::InvalidArgument
        }
        fn reason(&self) -> &'static str {
            "refused"
        }
    }

    /// Passes messages that do not start with `x`, admits up to 8 bytes, and
    /// records what it saw.
    #[derive(Debug, Default)]
    struct NoX(Vec<Vec<u8>>);

    impl MessageCheck for NoX {
        fn admit(&mut self, size: u32) -> Result<(), Arc<dyn PolicyError>> {
            if size > 8 { Err(Arc::new(Refused("too large"))) } else { Ok(()) }
        }
        fn check(&mut self, _: bool, message: &[u8]) -> Result<(), Arc<dyn PolicyError>> {
            if message.first() == Some(&b'x') {
                return Err(Arc::new(Refused("x")));
            }
            self.0.push(message.to_vec());
            Ok(())
        }
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(message);
        framed
    }

    #[test]
    fn messages_pass_whole_however_the_data_is_split() {
        let stream: Vec<u8> = [framed(b"ab"), framed(b""), framed(b"cdefgh")].concat();
        for split in 0..=stream.len() {
            for second in split..=stream.len() {
                let mut checking = Checking::new(Box::<NoX>::default());
                let mut out = Vec::new();
                for part in [&stream[..split], &stream[split..second], &stream[second..]] {
                    checking.take(part).unwrap();
                    if let Some(passed) = checking.take_passed() {
                        assert!(out.len() + passed.len() <= stream.len());
                        out.extend_from_slice(&passed);
                    }
                }
                assert_eq!(out, stream, "split at {split} and {second}");
                assert!(checking.rest().is_empty());
            }
        }
    }

    #[test]
    fn a_failing_message_is_held_and_what_came_before_it_passed() {
        let mut checking = Checking::new(Box::<NoX>::default());
        let stream = [framed(b"ok"), framed(b"xy")].concat();
        let error = checking.take(&stream).unwrap_err();
        assert_eq!(error.to_string(), "x");
        assert_eq!(&checking.take_passed().unwrap()[..], &framed(b"ok")[..]);
    }

    #[test]
    fn a_message_too_large_is_refused_at_its_prefix_before_it_is_held() {
        let mut checking = Checking::new(Box::<NoX>::default());
        let error = checking.take(&[0, 0, 0, 1, 0]).unwrap_err();
        assert_eq!(error.to_string(), "too large");
    }

    #[test]
    fn a_message_cut_short_goes_on_as_it_came_at_the_end() {
        let mut checking = Checking::new(Box::<NoX>::default());
        checking.take(&framed(b"abcd")[..6]).unwrap();
        assert!(!checking.has_passed());
        assert_eq!(&checking.rest()[..], &framed(b"abcd")[..6]);
    }
}
