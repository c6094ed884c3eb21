//! The layer that records every admitted call: its final gRPC status and how
//! long it took, counted against its method, an access-log line if asked,
//! and, when tracing is on, its span. The status comes from a trailers-only
//! response, from the trailers at the end of the stream, or from the
//! sidecar's own error (which the span also records as an event); a call the
//! caller abandons counts as CANCELLED.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanKind, Status};
use opentelemetry_sdk::trace::Span;
use tokio::time::Instant;
use tower::Service;

use super::metrics::CallMetrics;
use super::request_id;
use super::trace::{CallSpan, Tracing};
use crate::call::{Answered, CallEnd, CallFuture, CallService, Caller, Direction, EndOfCall, ProxyError, ResponseBody};
use crate::grpc::{self, Code};
use crate::identity::SpiffeId;

/// Who is on the other side of the calls a stack carries: for the outbound
/// side, the upstream (its identity and name); inbound, the [`Caller`] of
/// each call, read from the request.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub identity: Option<SpiffeId>,
    pub address: Option<Arc<str>>,
}

/// Marks a call whose access log line is written, or that is tapped: the
/// upstream then says which endpoint answered it ([`Answered`]), as it does
/// for a traced call.
#[derive(Clone, Copy, Debug)]
pub struct Logged;

/// What the layer records for one method in one direction.
#[derive(Debug)]
pub struct Observed {
    pub direction: Direction,
    pub metrics: CallMetrics,
    /// The upstream of outbound calls; `None` inbound, where it is the caller.
    pub upstream: Option<Peer>,
    pub tracing: Option<Arc<Tracing>>,
    pub access_log: bool,
}

/// One call being recorded; dropped unfinished, it counts as CANCELLED.
#[derive(Debug)]
struct CallRecord {
    observed: Arc<Observed>,
    started: Instant,
    /// Boxed: it is large, and only traced calls have one.
    span: Option<Box<Span>>,
    /// The path, the peer and the request ID, when the access log is on.
    access: Option<(Box<str>, Peer, HeaderValue)>,
    /// The endpoint that answered, when the call is logged or traced.
    answered: Option<Answered>,
    finished: bool,
}

impl CallRecord {
    fn finish(mut self, status: Code) {
        self.record(status);
    }

    fn record(&mut self, status: Code) {
        self.finished = true;
        let elapsed = self.started.elapsed();
        self.observed.metrics.record(status, elapsed);
        if let Some((path, peer, request_id)) = &self.access {
            let trace_id = self.span.as_ref().map(|s| s.span_context().trace_id().to_string());
            tracing::info!(
                target: "protomesh::access",
                direction = %self.observed.direction,
                method = %path,
                grpc_status = status.name(),
                duration_ms = elapsed.as_secs_f64() * 1e3,
                peer = peer.address.as_deref().unwrap_or(""),
                peer_identity = peer.identity.as_ref().map_or("", |id| id.as_str()),
                endpoint = self.answered.as_ref().map(|answered| answered.addr.to_string()).unwrap_or_default(),
                endpoint_pod = self.answered.as_ref().and_then(|answered| answered.pod.as_deref()).unwrap_or(""),
                trace_id = trace_id.as_deref().unwrap_or(""),
                request_id = request_id.to_str().unwrap_or(""),
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

    /// The endpoint that answered (and its pod, when known), on the span.
    fn answered_by(&mut self, endpoint: Option<&Answered>) {
        self.answered = endpoint.cloned();
        if let (Some(span), Some(Answered { addr, pod })) = (&mut self.span, endpoint) {
            span.set_attribute(KeyValue::new("server.address", addr.ip().to_string()));
            span.set_attribute(KeyValue::new("server.port", i64::from(addr.port())));
            if let Some(pod) = pod {
                span.set_attribute(KeyValue::new("protomesh.server.pod", pod.to_string()));
            }
        }
    }

    /// A policy or peer failure, as an event on the span.
    fn failed(&mut self, error: &ProxyError) {
        if let Some(span) = &mut self.span {
            span.add_event(error.reason(), vec![KeyValue::new("message", error.to_string())]);
        }
    }
}

impl EndOfCall for CallRecord {
    /// A stream that failed has no status of its own: UNKNOWN, as a client sees it.
    fn ended(self: Box<Self>, end: CallEnd) {
        self.finish(end.status().unwrap_or(Code::Unknown));
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
    observed: Arc<Observed>,
}

impl<S> Observe<S> {
    pub fn new(observed: Arc<Observed>, inner: S) -> Self {
        Observe { inner, observed }
    }
}

impl Observed {
    /// The call's peer: the upstream, or the caller the request carries.
    fn peer<B>(&self, request: &Request<B>) -> Peer {
        match (&self.upstream, request.extensions().get::<Caller>()) {
            (Some(upstream), _) => upstream.clone(),
            (None, Some(caller)) => {
                Peer { identity: caller.id.clone(), address: Some(caller.address.to_string().into()) }
            }
            (None, None) => Peer::default(),
        }
    }

    /// Starts the call's span, continuing the caller's trace, and hands it on.
    fn start_span<B>(&self, tracing: &Tracing, request: &mut Request<B>) -> Span {
        let path = request.uri().path();
        let name = path.trim_start_matches('/').to_string();
        let (service, method) = grpc::split_path(path).unwrap_or(("", ""));
        let mut attributes = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", service.to_string()),
            KeyValue::new("rpc.method", method.to_string()),
        ];
        let peer = self.peer(request);
        if let Some(identity) = &peer.identity {
            attributes.push(KeyValue::new("protomesh.peer.identity", identity.to_string()));
        }
        if let Some(address) = &peer.address {
            let key = if self.direction == Direction::Outbound { "protomesh.upstream" } else { "network.peer.address" };
            attributes.push(KeyValue::new(key, address.to_string()));
        }
        let timeout = request.headers().get(grpc::GRPC_TIMEOUT).and_then(|v| grpc::parse_timeout(v.as_bytes()));
        if let Some(timeout) = timeout {
            attributes.push(KeyValue::new("rpc.grpc.timeout_ms", timeout.as_millis() as i64));
        }
        let kind = if self.direction == Direction::Outbound { SpanKind::Client } else { SpanKind::Server };
        let span = tracing.start_call(request.headers_mut(), &name, kind, attributes);
        request.extensions_mut().insert(CallSpan(span.span_context().clone()));
        span
    }
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
        let observed = &self.observed;
        // Made only where this sidecar logs or traces the call: making one
        // for every call costs more than anything else the sidecar adds to it.
        let request_id =
            (observed.access_log || observed.tracing.is_some()).then(|| request_id::ensure(request.headers_mut()));
        let span = observed.tracing.as_ref().map(|tracing| {
            let mut span = Box::new(observed.start_span(tracing, &mut request));
            if let Some(id) = request_id.as_ref().and_then(|id| id.to_str().ok()) {
                span.set_attribute(KeyValue::new("protomesh.request_id", id.to_string()));
            }
            span
        });
        let mut record = CallRecord {
            observed: observed.clone(),
            started: Instant::now(),
            span,
            access: match (observed.access_log, request_id) {
                (true, Some(id)) => {
                    request.extensions_mut().insert(Logged);
                    Some((request.uri().path().into(), observed.peer(&request), id))
                }
                _ => None,
            },
            answered: None,
            finished: false,
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            match call.await {
                Ok(mut response) => {
                    record.answered_by(response.extensions().get::<Answered>());
                    match grpc::status_in(response.headers()) {
                        Some(status) => record.finish(status),
                        None => response.body_mut().on_end(Box::new(record)),
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

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::telemetry::Metrics;

    fn observed(metrics: &Arc<Metrics>) -> Arc<Observed> {
        Arc::new(Observed {
            direction: Direction::Inbound,
            metrics: metrics.calls(Direction::Inbound, "s.S", "M"),
            upstream: None,
            tracing: None,
            access_log: false,
        })
    }

    fn count(metrics: &Metrics, status: &str) -> Option<String> {
        let series = format!(
            r#"protomesh_requests_total{{direction="inbound",service="s.S",method="M",grpc_status="{status}"}}"#
        );
        metrics.encode().lines().find(|l| l.starts_with(&series)).map(|l| l.rsplit(' ').next().unwrap().to_string())
    }

    #[tokio::test]
    async fn statuses_are_counted_from_trailers_only_responses_errors_and_abandoned_streams() {
        let metrics = Arc::new(Metrics::default());
        let answer = |code: Option<Code>| {
            tower::service_fn(move |_: Request<()>| async move {
                match code {
                    Some(Code::Unauthenticated) => Err(ProxyError::NoCallerIdentity { why: "none".into() }),
                    Some(code) => {
                        let mut response = Response::new(ResponseBody::empty());
                        *response.headers_mut() = grpc::status_headers(code, "m");
                        Ok(response)
                    }
                    None => Ok(Response::new(ResponseBody::empty())),
                }
            })
        };
        Observe::new(observed(&metrics), answer(Some(Code::NotFound))).oneshot(Request::new(())).await.unwrap();
        Observe::new(observed(&metrics), answer(Some(Code::Unauthenticated)))
            .oneshot(Request::new(()))
            .await
            .unwrap_err();
        // Headers without a status: the status comes with the body's end, or never.
        let streaming = Observe::new(observed(&metrics), answer(None)).oneshot(Request::new(())).await.unwrap();
        assert_eq!(count(&metrics, "CANCELLED"), None);
        drop(streaming);
        assert_eq!(count(&metrics, "NOT_FOUND").as_deref(), Some("1"));
        assert_eq!(count(&metrics, "UNAUTHENTICATED").as_deref(), Some("1"));
        assert_eq!(count(&metrics, "CANCELLED").as_deref(), Some("1"));
    }
}
