//! One tapped call as it passes: its metadata (sensitive values redacted),
//! its messages copied from both bodies up to the tap's caps, and, at its end,
//! the status and timings, handed to the taps that asked for it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Response};
use tokio::time::Instant;

use super::Subscriber;
use crate::call::{CallEnd, Direction, EndOfCall, ProxyError, ResponseBody, Watcher};
use crate::grpc::{self, Code};
use crate::identity::SpiffeId;

/// One message of a call, as copied.
#[derive(Clone, Debug, PartialEq)]
pub struct Copied {
    /// Its size, from its length prefix.
    pub size: u32,
    /// Sent compressed (`grpc-encoding`); not decoded.
    pub compressed: bool,
    /// Its bytes; `None` past the tap's `max_bytes`, or when the copies in
    /// flight already hold all the taps may.
    pub bytes: Option<Bytes>,
}

/// A finished call, as every tap that wants it receives it.
#[derive(Debug)]
pub struct Tapped {
    pub direction: Direction,
    /// `/pkg.Service/Method`.
    pub path: String,
    /// Who made the call: inbound, the peer's identity; outbound, this workload's.
    pub caller: Option<SpiffeId>,
    /// Inbound, the caller's address; outbound, the endpoint that answered.
    pub peer: Option<String>,
    pub started: SystemTime,
    /// When the response's headers came, after the start.
    pub headers_after: Option<Duration>,
    pub duration: Duration,
    pub status: Code,
    pub status_message: String,
    /// Metadata as sent: redacted as it is shown.
    pub request_metadata: HeaderMap,
    pub response_metadata: HeaderMap,
    pub trailers: HeaderMap,
    pub requests: Vec<Copied>,
    pub responses: Vec<Copied>,
    /// Messages past `messages` each way, counted, not copied.
    pub requests_skipped: u32,
    pub responses_skipped: u32,
    /// Let go of when the last tap drops the event.
    pub(super) _held: Held,
}

/// Bytes copied for taps that no reader has let go of yet, counted against
/// all taps' budget until the event is dropped.
#[derive(Debug, Default)]
pub(super) struct Held {
    budget: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The most bytes all tapped calls may hold copied at once, so that a tap of
/// many large or long calls cannot take the memory the calls need.
pub const COPY_BUDGET: usize = 16 * 1024 * 1024;

/// The messages of one body, reassembled from its frames.
#[derive(Debug, Default)]
struct Messages {
    copied: Vec<Copied>,
    skipped: u32,
    prefix: [u8; 5],
    have: usize,
    current: Option<Current>,
}

/// The message under way.
#[derive(Debug)]
struct Current {
    size: u32,
    compressed: bool,
    /// What is copied of it; `None` when it is not copied.
    bytes: Option<Vec<u8>>,
    remaining: usize,
    /// Past the cap on messages: counted only.
    skipped: bool,
}

/// What a call may copy, from the taps that want it.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub max_bytes: usize,
    pub max_messages: usize,
}

impl Messages {
    fn read(&mut self, mut data: &[u8], caps: Caps, held: &mut Held) {
        loop {
            if let Some(current) = &mut self.current {
                let take = current.remaining.min(data.len());
                if let Some(bytes) = &mut current.bytes {
                    bytes.extend_from_slice(&data[..take]);
                }
                current.remaining -= take;
                data = &data[take..];
                if current.remaining > 0 {
                    return;
                }
                self.finish();
            }
            if data.is_empty() {
                return;
            }
            let take = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have < 5 {
                return;
            }
            self.have = 0;
            let size = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]);
            let skipped = self.copied.len() >= caps.max_messages;
            let wanted = size as usize;
            let copy = !skipped && wanted <= caps.max_bytes && held.reserve(wanted);
            self.current = Some(Current {
                size,
                compressed: self.prefix[0] & 1 == 1,
                bytes: copy.then(|| Vec::with_capacity(wanted)),
                remaining: wanted,
                skipped,
            });
        }
    }

    fn finish(&mut self) {
        let Some(current) = self.current.take() else { return };
        if current.skipped {
            self.skipped += 1;
        } else {
            let bytes = current.bytes.map(Bytes::from);
            self.copied.push(Copied { size: current.size, compressed: current.compressed, bytes });
        }
    }
}

impl Held {
    /// Counts `bytes` against the budget, if it has room.
    fn reserve(&mut self, bytes: usize) -> bool {
        let reserved = self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            (held + bytes <= COPY_BUDGET).then_some(held + bytes)
        });
        if reserved.is_ok() {
            self.bytes += bytes;
        }
        reserved.is_ok()
    }
}

/// One call under way; its watchers and its end share it.
#[derive(Debug)]
pub struct Capture {
    direction: Direction,
    recording: Mutex<Recording>,
}

#[derive(Debug)]
struct Recording {
    subscribers: Vec<Arc<Subscriber>>,
    caps: Caps,
    started_at: Instant,
    started: SystemTime,
    path: String,
    caller: Option<SpiffeId>,
    peer: Option<String>,
    headers_after: Option<Duration>,
    request_metadata: HeaderMap,
    response_metadata: HeaderMap,
    trailers: HeaderMap,
    status_message: String,
    requests: Messages,
    responses: Messages,
    held: Held,
    /// Set once the event is sent: what comes after is not copied.
    done: bool,
}

/// What a tapped call starts with.
pub struct Start {
    pub subscribers: Vec<Arc<Subscriber>>,
    pub caps: Caps,
    pub direction: Direction,
    pub path: String,
    pub caller: Option<SpiffeId>,
    pub peer: Option<String>,
    pub request_metadata: HeaderMap,
    pub budget: Arc<AtomicUsize>,
}

impl Capture {
    pub fn new(start: Start) -> Arc<Capture> {
        let recording = Recording {
            subscribers: start.subscribers,
            caps: start.caps,
            started_at: Instant::now(),
            started: SystemTime::now(),
            path: start.path,
            caller: start.caller,
            peer: start.peer,
            headers_after: None,
            request_metadata: start.request_metadata,
            response_metadata: HeaderMap::new(),
            trailers: HeaderMap::new(),
            status_message: String::new(),
            requests: Messages::default(),
            responses: Messages::default(),
            held: Held { budget: start.budget, bytes: 0 },
            done: false,
        };
        Arc::new(Capture { direction: start.direction, recording: Mutex::new(recording) })
    }

    fn with(&self, f: impl FnOnce(&mut Recording)) {
        let mut recording = self.recording.lock().expect("tap capture lock");
        if !recording.done {
            f(&mut recording);
        }
    }

    /// Watches the request's body.
    pub fn request_watcher(self: &Arc<Self>) -> Box<dyn Watcher> {
        Box::new(BodyWatcher { capture: self.clone(), response: false })
    }

    /// Takes the response (or the sidecar's refusal) and, once the call
    /// ends, sends the event.
    pub fn answered(self: &Arc<Self>, result: &mut Result<Response<ResponseBody>, ProxyError>) {
        match result {
            Ok(response) => {
                self.with(|recording| {
                    recording.headers_after = Some(recording.started_at.elapsed());
                    recording.response_metadata = response.headers().clone();
                    if let Some(endpoint) = response.extensions().get::<crate::call::Answered>() {
                        recording.peer =
                            Some(endpoint.pod.as_deref().map_or_else(
                                || endpoint.addr.to_string(),
                                |pod| format!("{} (pod {pod})", endpoint.addr),
                            ));
                    }
                });
                match grpc::status_in(response.headers()) {
                    Some(status) => self.end(status, grpc::message_in(response.headers())),
                    None => {
                        response.body_mut().watch(Box::new(BodyWatcher { capture: self.clone(), response: true }));
                        response.body_mut().on_end(Box::new(Ending(self.clone())));
                    }
                }
            }
            Err(error) => self.end(error.code(), error.message(self.direction)),
        }
    }

    /// The call is over: the event goes to each tap that wants its status.
    fn end(&self, status: Code, status_message: String) {
        let mut recording = self.recording.lock().expect("tap capture lock");
        if recording.done {
            return;
        }
        recording.done = true;
        let message =
            if status_message.is_empty() { std::mem::take(&mut recording.status_message) } else { status_message };
        let requests = std::mem::take(&mut recording.requests);
        let responses = std::mem::take(&mut recording.responses);
        let event = Arc::new(Tapped {
            direction: self.direction,
            path: std::mem::take(&mut recording.path),
            caller: recording.caller.take(),
            peer: recording.peer.take(),
            started: recording.started,
            headers_after: recording.headers_after,
            duration: recording.started_at.elapsed(),
            status,
            status_message: message,
            request_metadata: std::mem::take(&mut recording.request_metadata),
            response_metadata: std::mem::take(&mut recording.response_metadata),
            trailers: std::mem::take(&mut recording.trailers),
            requests: requests.copied,
            responses: responses.copied,
            requests_skipped: requests.skipped,
            responses_skipped: responses.skipped,
            _held: std::mem::take(&mut recording.held),
        });
        for subscriber in recording.subscribers.drain(..) {
            subscriber.deliver(&event);
        }
    }
}

#[derive(Debug)]
struct BodyWatcher {
    capture: Arc<Capture>,
    response: bool,
}

impl Watcher for BodyWatcher {
    fn data(&mut self, data: &Bytes) {
        let response = self.response;
        self.capture.with(|recording| {
            let caps = recording.caps;
            let Recording { requests, responses, held, .. } = recording;
            let messages = if response { responses } else { requests };
            messages.read(data, caps, held);
        });
    }

    fn trailers(&mut self, trailers: &HeaderMap) {
        if self.response {
            self.capture.with(|recording| {
                recording.trailers = trailers.clone();
                recording.status_message = grpc::message_in(trailers);
            });
        }
    }
}

/// Sends the event when the response ends; dropped untold, the caller went away.
struct Ending(Arc<Capture>);

impl EndOfCall for Ending {
    fn ended(self: Box<Self>, end: CallEnd) {
        self.0.end(end.status().unwrap_or(Code::Unknown), String::new());
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.0.end(Code::Cancelled, String::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        framed.extend_from_slice(payload);
        framed
    }

    #[test]
    fn messages_are_reassembled_across_frames_within_their_caps() {
        let mut stream = framed(b"hello");
        stream.extend(framed(b""));
        stream.extend(framed(&[7; 100]));
        stream.extend(framed(b"four"));
        let caps = Caps { max_bytes: 10, max_messages: 3 };
        for split in 1..stream.len() {
            let budget = Arc::new(AtomicUsize::new(0));
            let mut held = Held { budget: budget.clone(), bytes: 0 };
            let mut messages = Messages::default();
            for chunk in stream.chunks(split) {
                messages.read(chunk, caps, &mut held);
            }
            let shown: Vec<(u32, Option<&[u8]>)> =
                messages.copied.iter().map(|c| (c.size, c.bytes.as_deref())).collect();
            assert_eq!(shown, [(5, Some(&b"hello"[..])), (0, Some(&b""[..])), (100, None)], "split {split}");
            assert_eq!(messages.skipped, 1, "the fourth is past the cap");
            assert_eq!(budget.load(Ordering::Relaxed), 5, "what is held counts against the budget");
            drop(held);
            assert_eq!(budget.load(Ordering::Relaxed), 0);
        }
    }
}
