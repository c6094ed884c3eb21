//! The bodies every connection carries. Responses: the peer's body streamed
//! frame by frame, or nothing after the sidecar's own trailers-only status;
//! policy layers attach to it what must last as long as the call (a deadline
//! or idle timer that ends the stream with a gRPC status, bulkhead places, and
//! the report of the call's outcome to outlier detection). Requests: the
//! caller's stream, or a request kept whole so that a retry can send it again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

use super::balance::Report;
use super::error::{Direction, ProxyError};
use super::exchange::PeerBody;
use crate::grpc::{self, Code};
use crate::policy::CallPolicy;
use crate::policy::outlier::Outcome;
use crate::telemetry::CallRecord;

#[derive(Debug)]
pub struct ResponseBody {
    /// `None` once the call ended, or when the sidecar answered itself.
    inner: Option<PeerBody>,
    // Timers are boxed: a response moves through every layer, and most calls
    // have at most a deadline.
    deadline: Option<Pin<Box<Timer>>>,
    idle: Option<(Pin<Box<Timer>>, Duration)>,
    /// Bulkhead places, released when the call ends.
    permits: Vec<OwnedSemaphorePermit>,
    /// Reports the call's final status to the endpoint's outlier detection.
    report: Option<Report>,
    /// Records the call's final status in the metrics.
    record: Option<CallRecord>,
}

pin_project_lite::pin_project! {
    /// A timer, and the error that ends the call when it fires.
    #[derive(Debug)]
    struct Timer {
        #[pin]
        sleep: Sleep,
        error: ProxyError,
        direction: Direction,
        // Counts the expiry against the call's method.
        policy: Arc<CallPolicy>,
    }
}

impl Timer {
    fn start(sleep: Sleep, error: ProxyError, direction: Direction, policy: Arc<CallPolicy>) -> Pin<Box<Timer>> {
        Box::pin(Timer { sleep, error, direction, policy })
    }

    fn trailers(&self) -> Frame<Bytes> {
        self.policy.counters.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
        let message = format!("protomesh {}: {}", self.direction, self.error);
        Frame::trailers(grpc::status_headers(self.error.code(), &message))
    }
}

impl ResponseBody {
    pub fn empty() -> ResponseBody {
        ResponseBody { inner: None, deadline: None, idle: None, permits: Vec::new(), report: None, record: None }
    }

    pub fn streamed(body: PeerBody) -> ResponseBody {
        ResponseBody { inner: Some(body), ..ResponseBody::empty() }
    }

    /// At `at`, the stream ends with `error`'s status in its trailers and the
    /// peer's stream is reset.
    pub fn end_at(&mut self, at: Instant, error: ProxyError, direction: Direction, policy: Arc<CallPolicy>) {
        self.deadline = Some(Timer::start(tokio::time::sleep_until(at), error, direction, policy));
    }

    /// Ends the stream with `error` when no data arrives for `after`.
    pub fn end_when_idle(&mut self, after: Duration, error: ProxyError, direction: Direction, policy: Arc<CallPolicy>) {
        self.idle = Some((Timer::start(tokio::time::sleep(after), error, direction, policy), after));
    }

    pub fn hold(&mut self, permit: OwnedSemaphorePermit) {
        self.permits.push(permit);
    }

    /// Reports the status in the trailers, or a failure if the stream fails.
    pub fn report_to(&mut self, report: Report) {
        self.report = Some(report);
    }

    /// Records the status in the trailers, or UNKNOWN if the stream fails.
    pub fn record_to(&mut self, record: CallRecord) {
        self.record = Some(record);
    }

    /// Ends the call with `status` (`None`: the peer's stream failed). The
    /// peer's stream is dropped, and so reset if still open, and the bulkhead
    /// places are released.
    fn end(&mut self, status: Option<Code>) {
        if let Some(report) = self.report.take() {
            match status {
                Some(code) => report.finish_with_status(code),
                None => report.finish(Outcome::Failure),
            }
        }
        if let Some(record) = self.record.take() {
            record.finish(status.unwrap_or(Code::Unknown));
        }
        self.inner = None;
        self.deadline = None;
        self.idle = None;
        self.permits.clear();
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_data()
                    && let Some((timer, after)) = this.idle.as_mut()
                {
                    timer.as_mut().project().sleep.reset(Instant::now() + *after);
                }
                if let Some(trailers) = frame.trailers_ref() {
                    // Trailers without grpc-status break the protocol: the peer failed.
                    this.end(Some(grpc::status_in(trailers).unwrap_or(Code::Internal)));
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            // The end without trailers, or a failed stream: the peer failed.
            Poll::Ready(end) => {
                this.end(None);
                return Poll::Ready(end);
            }
            Poll::Pending => {}
        }
        // Nothing from the peer yet: has a timer run out?
        let expired = [this.deadline.as_mut(), this.idle.as_mut().map(|(timer, _)| timer)]
            .into_iter()
            .flatten()
            .find_map(|timer| {
                timer.as_mut().project().sleep.poll(cx).is_ready().then(|| (timer.trailers(), timer.error.code()))
            });
        match expired {
            Some((trailers, code)) => {
                this.end(Some(code));
                Poll::Ready(Some(Ok(trailers)))
            }
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// The request body every connection sends: the caller's stream as it comes,
/// or a request kept whole so that a retry can send it again.
#[derive(Debug)]
pub enum RequestBody {
    Streamed(Incoming),
    /// A whole request, kept; `None` once sent.
    Replayed(Option<Bytes>),
    /// A request too large to keep: what was read while trying, then the rest.
    Resumed {
        read: Option<Bytes>,
        rest: Incoming,
    },
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
