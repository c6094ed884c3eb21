//! The layer that records every admitted call: its final gRPC status and how
//! long it took, counted against its method, and, when tracing is on, its
//! span. The status comes from a trailers-only response, from the trailers at
//! the end of the stream, or from the sidecar's own error (which the span
//! also records as an event); a call the caller abandons counts as CANCELLED.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanKind, Status};
use opentelemetry_sdk::trace::Span;
use tokio::time::Instant;
use tower::Service;

use super::trace::Tracing;
use crate::grpc::{self, Code};
use crate::policy::{CallContext, CallPolicy, Peer};
use crate::proxy::body::ResponseBody;
use crate::proxy::error::{CallFuture, CallService, Direction, ProxyError};
use crate::proxy::upstream::Answered;

/// One call being recorded; dropped unfinished, it counts as CANCELLED.
#[derive(Debug)]
pub struct CallRecord {
    policy: Arc<CallPolicy>,
    started: Instant,
    /// Boxed: it is large, and only traced calls have one.
    span: Option<Box<Span>>,
    /// Set when the access log is on.
    access: Option<Access>,
    finished: bool,
}

/// What an access log line tells besides the method and status.
#[derive(Debug)]
struct Access {
    direction: Direction,
    peer: Peer,
}

impl CallRecord {
    pub fn finish(mut self, status: Code) {
        self.record(status);
    }

    fn record(&mut self, status: Code) {
        self.finished = true;
        let elapsed = self.started.elapsed();
        self.policy.metrics.record(status, elapsed);
        if let Some(access) = &self.access {
            let trace_id = self.span.as_ref().map(|s| s.span_context().trace_id().to_string());
            tracing::info!(
                target: "protomesh::access",
                direction = %access.direction,
                method = %self.policy.path,
                grpc_status = status.name(),
                duration_ms = elapsed.as_secs_f64() * 1e3,
                peer = access.peer.address.as_deref().unwrap_or(""),
                peer_identity = access.peer.identity.as_ref().map_or("", |id| id.as_str()),
                trace_id = trace_id.as_deref().unwrap_or(""),
            );
        }
        if let Some(span) = &mut self.span {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", status as i64));
            if status != Code::Ok {
                span.set_status(Status::error(status.name()));
            }
            span.end();
        }
    }

    /// The endpoint that answered, on the span.
    fn answered_by(&mut self, endpoint: Option<&Answered>) {
        if let (Some(span), Some(Answered(addr))) = (&mut self.span, endpoint) {
            span.set_attribute(KeyValue::new("server.address", addr.ip().to_string()));
            span.set_attribute(KeyValue::new("server.port", i64::from(addr.port())));
        }
    }

    /// A policy or peer failure, as an event on the span.
    fn failed(&mut self, error: &ProxyError) {
        if let Some(span) = &mut self.span {
            span.add_event(error.reason(), vec![KeyValue::new("message", error.to_string())]);
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if !self.finished {
            self.record(Code::Cancelled);
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    direction: Direction,
    tracing: Option<Arc<Tracing>>,
    access_log: bool,
}

impl<S> Observe<S> {
    pub fn new(direction: Direction, tracing: Option<Arc<Tracing>>, access_log: bool, inner: S) -> Self {
        Observe { inner, direction, tracing, access_log }
    }
}

/// Starts the call's span, continuing the caller's trace, and hands it on.
fn start_span<B>(tracing: &Tracing, direction: Direction, request: &mut Request<B>) -> Span {
    let context = CallContext::of(request);
    let name = context.policy.path.trim_start_matches('/').to_string();
    let (service, method) = grpc::split_path(&context.policy.path).unwrap_or(("", ""));
    let mut attributes = vec![
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", service.to_string()),
        KeyValue::new("rpc.method", method.to_string()),
    ];
    if let Some(identity) = &context.peer.identity {
        attributes.push(KeyValue::new("protomesh.peer.identity", identity.to_string()));
    }
    if let Some(address) = &context.peer.address {
        let key = if direction == Direction::Outbound { "protomesh.upstream" } else { "network.peer.address" };
        attributes.push(KeyValue::new(key, address.to_string()));
    }
    if let Some(timeout) = request.headers().get(grpc::GRPC_TIMEOUT).and_then(|v| grpc::parse_timeout(v.as_bytes())) {
        attributes.push(KeyValue::new("rpc.grpc.timeout_ms", timeout.as_millis() as i64));
    }
    let kind = if direction == Direction::Outbound { SpanKind::Client } else { SpanKind::Server };
    let span = tracing.start_call(request.headers_mut(), &name, kind, attributes);
    if let Some(context) = request.extensions_mut().get_mut::<CallContext>() {
        context.span = Some(span.span_context().clone());
    }
    span
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: CallService<B>,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let span = self.tracing.as_ref().map(|tracing| Box::new(start_span(tracing, self.direction, &mut request)));
        let context = CallContext::of(&request);
        let access = self.access_log.then(|| Access { direction: self.direction, peer: context.peer.clone() });
        let policy = context.policy.clone();
        let mut record = CallRecord { policy, started: Instant::now(), span, access, finished: false };
        let call = self.inner.call(request);
        Box::pin(async move {
            match call.await {
                Ok(mut response) => {
                    record.answered_by(response.extensions().get::<Answered>());
                    match grpc::status_in(response.headers()) {
                        Some(status) => record.finish(status),
                        None => response.body_mut().record_to(record),
                    }
                    Ok(response)
                }
                Err(error) => {
                    record.failed(&error);
                    record.finish(error.code());
                    Err(error)
                }
            }
        })
    }
}
