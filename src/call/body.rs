//! The bodies every connection carries. Responses: the peer's body streamed
//! frame by frame, or nothing after the sidecar's own trailers-only status.
//! Layers hang on a response what must last as long as the call: timers that
//! end the stream with a gRPC status, and guards told how the call ended
//! (bulkhead places, the report to outlier detection, the metrics record),
//! which do their part when dropped unfinished too. Requests: the caller's
//! stream, or a request kept whole so that it can be sent again. Both
//! directions receive over HTTP/2 as a [`RecvBody`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::task::AbortHandle;
use tokio::time::{Instant, Sleep};

use super::check::Checking;
use super::cut::Cut;
use super::limit::{Carrier, Framing, MessageLimit};
use super::{Direction, ProxyError, Target};
use crate::grpc::{self, Code};

/// Work to do once a call is over, told how it ended. Dropped without being
/// told, the call was abandoned by its caller.
pub trait EndOfCall: Send + 'static {
    fn ended(self: Box<Self>, end: CallEnd);
}

/// Sees a body's frames as they pass, without holding them up: what the
/// tap copies from a call it was asked for.
pub trait Watcher: Send + std::fmt::Debug + 'static {
    fn data(&mut self, data: &Bytes);
    fn trailers(&mut self, trailers: &HeaderMap);
}

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallEnd {
    /// With the peer's status, from its trailers (or trailers-only response).
    Answered(Code),
    /// The sidecar ended it with this status: a timer ran out, or a message
    /// was too large.
    Cut(Code),
    /// The peer's stream or connection failed; the status the caller got
    /// for it, if the stream was not reset on.
    Broken(Option<Code>),
}

impl CallEnd {
    /// The status the caller got, if any.
    pub fn status(self) -> Option<Code> {
        match self {
            CallEnd::Answered(code) | CallEnd::Cut(code) => Some(code),
            CallEnd::Broken(code) => code,
        }
    }
}

/// What a timer does when it fires: end the stream with `error`'s status in
/// its trailers (the peer's stream is reset), counted in `counter`.
#[derive(Debug)]
pub struct Expiry {
    pub error: ProxyError,
    pub counter: Counter,
}

pin_project_lite::pin_project! {
    #[derive(Debug)]
    struct Timer {
        #[pin]
        sleep: Sleep,
        expiry: Expiry,
    }
}

impl Timer {
    fn start(sleep: Sleep, expiry: Expiry) -> Pin<Box<Timer>> {
        Box::pin(Timer { sleep, expiry })
    }

    fn trailers(&self, direction: Direction) -> Frame<Bytes> {
        self.expiry.counter.inc();
        let message = self.expiry.error.message(direction);
        Frame::trailers(grpc::status_headers(self.expiry.error.code(), &message))
    }
}

pub struct ResponseBody {
    /// `None` once the call ended, or when the sidecar answered itself.
    inner: Option<RecvBody>,
    /// Which sidecar passes the response on: the statuses the body ends the
    /// call with (timers, message sizes, a broken connection) say so.
    direction: Direction,
    // Timers are boxed: a response moves through every layer, and most calls
    // have at most a deadline.
    deadline: Option<Pin<Box<Timer>>>,
    idle: Option<(Pin<Box<Timer>>, Duration)>,
    guards: Vec<Box<dyn EndOfCall>>,
    /// The sidecar's own answer with a message: what is left of it.
    answer: Option<Box<Answer>>,
}

/// What the sidecar sends itself.
enum Answer {
    /// A message and the trailers after it.
    One { message: Option<Bytes>, trailers: HeaderMap },
    /// Frames as a task of the sidecar makes them (a stream it answers),
    /// ending with trailers.
    Frames(tokio::sync::mpsc::Receiver<Frame<Bytes>>),
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").field("inner", &self.inner).field("guards", &self.guards.len()).finish()
    }
}

impl ResponseBody {
    /// No body: the sidecar's own trailers-only answer, or a test's. It ends
    /// at once, so no status of its own, nor its direction, is ever sent.
    pub fn empty() -> ResponseBody {
        ResponseBody {
            inner: None,
            direction: Direction::Outbound,
            deadline: None,
            idle: None,
            guards: Vec::new(),
            answer: None,
        }
    }

    /// The sidecar's own answer: one message (framed), then `trailers`.
    pub fn answer(message: Bytes, trailers: HeaderMap) -> ResponseBody {
        ResponseBody {
            answer: Some(Box::new(Answer::One { message: Some(message), trailers })),
            ..ResponseBody::empty()
        }
    }

    /// The sidecar's own answer, streamed: the frames `frames` receives, the
    /// last of them trailers; if its sender goes without them, the call ends
    /// broken off.
    pub fn frames(frames: tokio::sync::mpsc::Receiver<Frame<Bytes>>) -> ResponseBody {
        ResponseBody { answer: Some(Box::new(Answer::Frames(frames))), ..ResponseBody::empty() }
    }

    /// The peer's response as the sidecar of `direction` passes it on.
    pub fn streamed(body: RecvBody, direction: Direction) -> ResponseBody {
        ResponseBody { inner: Some(body), direction, ..ResponseBody::empty() }
    }

    /// At `at`, the stream ends as `expiry` says.
    pub fn end_at(&mut self, at: Instant, expiry: Expiry) {
        self.deadline = Some(Timer::start(tokio::time::sleep_until(at), expiry));
    }

    /// The stream ends as `expiry` says when no data arrives for `after`.
    pub fn end_when_idle(&mut self, after: Duration, expiry: Expiry) {
        self.idle = Some((Timer::start(tokio::time::sleep(after), expiry), after));
    }

    /// Ends the call with the limit's error at the first message, either way,
    /// larger than `limit` allows.
    pub fn limit_messages(&mut self, limit: MessageLimit) {
        if let Some(inner) = &mut self.inner {
            inner.limit_messages(limit, Carrier::Response);
        }
    }

    /// Ends the call with the cut's error once a policy cuts it.
    pub(super) fn cut_by(&mut self, cut: Cut) {
        if let Some(inner) = &mut self.inner {
            inner.cut.get_or_insert(cut);
        }
    }

    /// `watcher` sees the peer's data and trailers as they pass.
    pub fn watch(&mut self, watcher: Box<dyn Watcher>) {
        if let Some(inner) = &mut self.inner {
            inner.watch(watcher);
        }
    }

    /// `guard` learns how the call ended.
    pub fn on_end(&mut self, guard: Box<dyn EndOfCall>) {
        self.guards.push(guard);
    }

    /// Ends the call as `end` says: the guards learn it, the peer's stream is
    /// dropped (and so reset if still open) and the timers stop.
    fn end(&mut self, end: CallEnd) {
        for guard in self.guards.drain(..) {
            guard.ended(end);
        }
        self.inner = None;
        self.deadline = None;
        self.idle = None;
    }

    /// Ready with the trailers that end the call when one of its timers has
    /// run out, the call then over. A connection whose caller reads nothing
    /// polls this rather than the body, so the timers fire all the same.
    pub fn poll_expiry(&mut self, cx: &mut Context<'_>) -> Poll<Frame<Bytes>> {
        let direction = self.direction;
        let expired = [self.deadline.as_mut(), self.idle.as_mut().map(|(timer, _)| timer)]
            .into_iter()
            .flatten()
            .find_map(|timer| {
                timer
                    .as_mut()
                    .project()
                    .sleep
                    .poll(cx)
                    .is_ready()
                    .then(|| (timer.trailers(direction), timer.expiry.error.code()))
            });
        match expired {
            Some((trailers, code)) => {
                self.end(CallEnd::Cut(code));
                Poll::Ready(trailers)
            }
            None => Poll::Pending,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            let Some(answer) = this.answer.as_deref_mut() else { return Poll::Ready(None) };
            let frame = match answer {
                Answer::One { message, trailers } => match message.take() {
                    Some(message) => return Poll::Ready(Some(Ok(Frame::data(message)))),
                    None => Frame::trailers(std::mem::take(trailers)),
                },
                Answer::Frames(frames) => match std::task::ready!(frames.poll_recv(cx)) {
                    Some(frame) if frame.is_data() => return Poll::Ready(Some(Ok(frame))),
                    Some(trailers) => trailers,
                    None => {
                        this.answer = None;
                        this.end(CallEnd::Broken(None));
                        return Poll::Ready(None);
                    }
                },
            };
            this.answer = None;
            let status = frame.trailers_ref().and_then(grpc::status_in).unwrap_or(Code::Unknown);
            this.end(CallEnd::Answered(status));
            return Poll::Ready(Some(Ok(frame)));
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_data()
                    && let Some((timer, after)) = this.idle.as_mut()
                {
                    timer.as_mut().project().sleep.reset(Instant::now() + *after);
                }
                if let Some(trailers) = frame.trailers_ref() {
                    // Trailers without grpc-status break the protocol: the peer failed.
                    this.end(match grpc::status_in(trailers) {
                        Some(code) => CallEnd::Answered(code),
                        None => CallEnd::Broken(Some(Code::Internal)),
                    });
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            // The end without trailers, or a failed stream: the peer failed,
            // unless a policy cut the call.
            Poll::Ready(end) => {
                let inner = this.inner.as_ref().expect("polled above");
                let ending = match (inner.cut_short(this.direction), end) {
                    (Some((code, trailers)), _) => Ok((CallEnd::Cut(code), trailers)),
                    (None, Some(Err(error))) => match inner.broken_off(error, this.direction) {
                        Ok((code, trailers)) => Ok((CallEnd::Broken(Some(code)), trailers)),
                        Err(error) => Err(Some(Err(error))),
                    },
                    (None, end) => Err(end),
                };
                return match ending {
                    Ok((end, trailers)) => {
                        this.end(end);
                        Poll::Ready(Some(Ok(trailers)))
                    }
                    Err(end) => {
                        this.end(CallEnd::Broken(None));
                        Poll::Ready(end)
                    }
                };
            }
            Poll::Pending => {}
        }
        // Nothing from the peer yet: has a timer run out?
        this.poll_expiry(cx).map(|trailers| Some(Ok(trailers)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream) && self.answer.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// A body received over HTTP/2, the caller's request or the peer's response:
/// data (its flow-control window given back as it is read), then trailers.
/// A response owns the task still sending its request's body, if any, which
/// stops when the call ends.
#[derive(Debug)]
pub struct RecvBody {
    stream: RecvStream,
    data_done: bool,
    sending: Option<AbortHandle>,
    /// Set when a policy may cut the call: once it has, nothing more goes on.
    cut: Option<Cut>,
    /// Set when the call's messages have a size limit.
    framing: Option<Box<Framing>>,
    /// Set when a policy checks each whole message before it goes on.
    checking: Option<Box<Checking>>,
    /// Who sent a response, for the status that says its connection broke.
    peer: Option<Target>,
    /// Set when the call is tapped.
    watcher: Option<Box<dyn Watcher>>,
}

impl RecvBody {
    pub fn new(stream: RecvStream, sending: Option<AbortHandle>) -> RecvBody {
        RecvBody {
            stream,
            data_done: false,
            sending,
            cut: None,
            framing: None,
            checking: None,
            peer: None,
            watcher: None,
        }
    }

    /// A response from `peer`.
    pub fn from_peer(mut self, peer: Target) -> RecvBody {
        self.peer = Some(peer);
        self
    }

    /// How a response ends when its stream fails with `error`: a stream the
    /// peer reset goes on as the same reset, but one whose connection broke
    /// (the peer gone, GOAWAY) ends with the status gRPC gives a lost
    /// connection, UNAVAILABLE, naming the peer.
    fn broken_off(&self, error: h2::Error, direction: Direction) -> Result<(Code, Frame<Bytes>), h2::Error> {
        let Some(target) = self.peer.clone().filter(|_| !(error.is_reset() && error.is_remote())) else {
            return Err(error);
        };
        let error = ProxyError::Upstream { target, error };
        Ok((error.code(), Frame::trailers(grpc::status_headers(error.code(), &error.message(direction)))))
    }

    /// Fails the body at the first message larger than `limit` allows; the
    /// call's other body learns of it through `limit`.
    pub fn limit_messages(&mut self, limit: MessageLimit, carrier: Carrier) {
        self.cut.get_or_insert_with(|| limit.cut.clone());
        self.framing = Some(Box::new(Framing::new(limit, carrier)));
    }

    /// Holds each message until `checking` has passed it whole; one that
    /// fails cuts the call with `cut`.
    pub fn check_messages(&mut self, checking: Checking, cut: Cut) {
        self.cut.get_or_insert(cut);
        self.checking = Some(Box::new(checking));
    }

    /// `watcher` sees the data and trailers as they pass.
    pub fn watch(&mut self, watcher: Box<dyn Watcher>) {
        self.watcher = Some(watcher);
    }

    fn is_cut(&self) -> bool {
        self.cut.as_ref().is_some_and(Cut::is_cut)
    }

    /// The status and trailers the call ends with once a policy cut it.
    fn cut_short(&self, direction: Direction) -> Option<(Code, Frame<Bytes>)> {
        self.cut.as_ref()?.trailers(direction)
    }

    /// A cut call fails the body as a reset stream would, which resets the
    /// stream it is forwarded to.
    fn failed() -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        Poll::Ready(Some(Err(h2::Error::from(h2::Reason::CANCEL))))
    }

    /// Takes data received: cut before a message too large, and held when a
    /// check holds messages until whole. What goes on at once, if anything.
    fn receive(&mut self, mut data: Bytes) -> Option<Bytes> {
        let _ = self.stream.flow_control().release_capacity(data.len());
        // What came before a message too large still goes on; the failure follows.
        if let Some(framing) = &mut self.framing
            && let Err(at) = framing.scan(&data)
        {
            data.truncate(at);
        }
        match &mut self.checking {
            None => Some(data).filter(|data| !data.is_empty()),
            Some(checking) => {
                if let Err(error) = checking.take(&data)
                    && let Some(cut) = &self.cut
                {
                    cut.set(error);
                }
                None
            }
        }
    }

    /// Reads ahead until the first message has been checked whole, held for
    /// `poll_frame`, or the body ended or was cut: so that a call with one
    /// request message is refused before it goes anywhere.
    pub fn poll_first_checked(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let checked = self.checking.as_ref().is_none_or(|checking| checking.has_passed());
            if checked || self.data_done || self.is_cut() {
                return Poll::Ready(());
            }
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    self.receive(data);
                }
                // The caller's failure shows when the body is read on.
                Some(Err(_)) => return Poll::Ready(()),
                None => self.data_done = true,
            }
        }
    }

    fn pass_on(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if let Some(watcher) = &mut self.watcher {
            watcher.data(&data);
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        if let Some(sending) = &self.sending {
            sending.abort();
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if let Some(passed) = this.checking.as_mut().and_then(|checking| checking.take_passed()) {
            return this.pass_on(passed);
        }
        // Once a policy cut the call, nothing more goes on.
        if this.is_cut() {
            return RecvBody::failed();
        }
        while !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let now = this.receive(data).or_else(|| this.checking.as_mut()?.take_passed());
                    if let Some(data) = now {
                        return this.pass_on(data);
                    }
                    if this.is_cut() {
                        return RecvBody::failed();
                    }
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        let rest = this.checking.as_mut().map(|checking| checking.rest()).filter(|rest| !rest.is_empty());
        if let Some(rest) = rest {
            return this.pass_on(rest);
        }
        match ready!(this.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => {
                if let Some(watcher) = &mut this.watcher {
                    watcher.trailers(&trailers);
                }
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream() && self.checking.as_ref().is_none_or(|checking| !checking.holds())
    }
}

/// The request body every connection sends: the caller's stream as it comes,
/// or a request kept whole so that a retry can send it again. `B` is the
/// caller's body (a connection's [`RecvBody`]; any body in tests).
#[derive(Debug)]
pub enum RequestBody<B = RecvBody> {
    Streamed(B),
    /// A whole request, kept; `None` once sent.
    Replayed(Option<Bytes>),
    /// A request too large to keep: what was read while trying, then the rest.
    Resumed {
        read: Option<Bytes>,
        rest: B,
    },
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.get_mut() {
            RequestBody::Streamed(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Replayed(kept) => Poll::Ready(kept.take().map(|bytes| Ok(Frame::data(bytes)))),
            RequestBody::Resumed { read, rest } => match read.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(body) => body.is_end_stream(),
            RequestBody::Replayed(kept) => kept.is_none(),
            RequestBody::Resumed { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(body) => body.size_hint(),
            RequestBody::Replayed(kept) => SizeHint::with_exact(kept.as_ref().map_or(0, |b| b.len() as u64)),
            RequestBody::Resumed { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    type Log = Arc<Mutex<Vec<Option<Option<Code>>>>>;

    /// Records the status it was told, or that it was dropped untold.
    struct Told {
        log: Log,
        told: bool,
    }

    fn told(log: &Log) -> Box<Told> {
        Box::new(Told { log: log.clone(), told: false })
    }

    impl EndOfCall for Told {
        fn ended(mut self: Box<Self>, end: CallEnd) {
            self.log.lock().unwrap().push(Some(end.status()));
            self.told = true;
        }
    }

    impl Drop for Told {
        fn drop(&mut self) {
            if !self.told {
                self.log.lock().unwrap().push(None);
            }
        }
    }

    #[tokio::test]
    async fn a_timer_ends_the_stream_with_its_status_and_tells_every_guard() {
        use http_body_util::BodyExt;
        let log = Log::default();
        // A stream that never ends by itself: an HTTP/2 pair whose server never answers the body.
        let (mut body, _peer) = open_stream().await;
        body.on_end(told(&log));
        body.on_end(told(&log));
        let counter = Counter::default();
        let error = ProxyError::NoCallerIdentity { why: "none".into() };
        let expiry = Expiry { error, counter: counter.clone() };
        body.end_at(Instant::now() + Duration::from_millis(50), expiry);
        let frame = body.frame().await.unwrap().unwrap();
        let trailers = frame.into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "16");
        assert!(trailers["grpc-message"].to_str().unwrap().starts_with("protomesh outbound: "), "the body's direction");
        assert_eq!(*log.lock().unwrap(), [Some(Some(Code::Unauthenticated)); 2]);
        assert_eq!(counter.get(), 1);
        assert!(body.frame().await.is_none(), "nothing follows the trailers");
    }

    #[tokio::test]
    async fn guards_of_an_abandoned_call_are_dropped_untold() {
        let log = Log::default();
        let mut body = ResponseBody::empty();
        body.on_end(told(&log));
        drop(body);
        assert_eq!(*log.lock().unwrap(), [None]);
    }

    /// A response body from a real HTTP/2 stream whose server sends headers and then nothing.
    async fn open_stream() -> (ResponseBody, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let mut connection = h2::server::handshake(listener.accept().await.unwrap().0).await.unwrap();
            let (_, mut respond) = connection.accept().await.unwrap().unwrap();
            let _stream = respond.send_response(http::Response::new(()), false).unwrap();
            std::future::poll_fn(|cx| connection.poll_closed(cx)).await.ok();
        });
        let (sender, connection) =
            h2::client::handshake(tokio::net::TcpStream::connect(addr).await.unwrap()).await.unwrap();
        tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();
        let (response, _) = sender.send_request(http::Request::new(()), true).unwrap();
        let response = response.await.unwrap();
        (ResponseBody::streamed(RecvBody::new(response.into_body(), None), Direction::Outbound), peer)
    }
}
