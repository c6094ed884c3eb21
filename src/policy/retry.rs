//! Retries with gRFC A6 semantics. A call is retried only if its method is
//! eligible (a retry policy applies to it), only on the policy's codes read
//! from a trailers-only response or from a failure before any response, only
//! up to `max_attempts`, and only while the upstream's retry budget allows.
//! Backoff is exponential with full jitter; `grpc-retry-pushback-ms` from the
//! server replaces it (a negative value stops retrying). No retry starts past
//! the deadline, and none once response headers have gone to the caller.
//!
//! Whatever the method, a call the peer refused without processing
//! (REFUSED_STREAM, as after GOAWAY) is sent once more.
//!
//! Calls with one request message (unary, server-streaming) are kept whole,
//! up to `policy.max_replay_bytes`, so that they can be sent again; larger
//! ones and request streams go out as they come and are not retried.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Service, ServiceExt};

use super::CallContext;
use super::method::RetryPolicy;
use crate::contract::CallShape;
use crate::grpc::{self, Code};
use crate::proxy::body::{RequestBody, ResponseBody};
use crate::proxy::error::{CallFuture, CallService, ProxyError};
use crate::telemetry::trace::Tracing;
use opentelemetry::KeyValue;
use opentelemetry::trace::Span as _;

/// Retries may add `ratio` of the calls plus `min_per_second`, over a 10 s window.
pub fn budget(ratio: f64, min_per_second: u32) -> TpsBudget {
    TpsBudget::new(Duration::from_secs(10), min_per_second, ratio as f32)
}

/// Where a call's retries draw from: the budget of the upstream it goes to.
#[derive(Clone, Debug)]
pub struct RetryBudget(pub Arc<TpsBudget>);

#[derive(Clone)]
pub struct Retries<S> {
    inner: S,
    max_replay_bytes: usize,
    /// Each attempt of a traced call gets a child span.
    tracing: Option<Arc<Tracing>>,
}

impl<S> Retries<S> {
    pub fn new(max_replay_bytes: usize, tracing: Option<Arc<Tracing>>, inner: S) -> Self {
        Retries { inner, max_replay_bytes, tracing }
    }
}

/// What one attempt's outcome says about another.
enum Verdict {
    Final,
    /// Retry if the policy and budget allow, after the backoff or the server's pushback.
    Retryable {
        pushback: Option<Duration>,
    },
    /// The peer did not process the call: send it again, whatever the method.
    Refused,
}

fn verdict(result: &Result<Response<ResponseBody>, ProxyError>, retryable: &[Code]) -> Verdict {
    match result {
        Ok(response) => {
            let Some(code) = grpc::status_in(response.headers()) else {
                return Verdict::Final;
            };
            if !retryable.contains(&code) {
                return Verdict::Final;
            }
            match response
                .headers()
                .get(grpc::GRPC_RETRY_PUSHBACK_MS)
                .map(|v| v.to_str().ok().and_then(|v| v.parse::<i64>().ok()))
            {
                None => Verdict::Retryable { pushback: None },
                Some(Some(ms)) if ms >= 0 => Verdict::Retryable { pushback: Some(Duration::from_millis(ms as u64)) },
                // Negative or unreadable: the server asks for no retry.
                Some(_) => Verdict::Final,
            }
        }
        Err(error) if error.refused_unprocessed() => Verdict::Refused,
        Err(error @ (ProxyError::Connect { .. } | ProxyError::Upstream { .. } | ProxyError::NoEndpoints { .. }))
            if retryable.contains(&error.code()) =>
        {
            Verdict::Retryable { pushback: None }
        }
        Err(_) => Verdict::Final,
    }
}

/// Reads a request whole, up to `limit` bytes. Past the limit, gives back
/// what it read and the rest of the stream.
/// A request read whole usually came in one frame: kept as it came, uncopied.
async fn keep(mut body: Incoming, limit: usize) -> Result<Bytes, RequestBody> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut size = 0;
    loop {
        match body.frame().await {
            None => return Ok(joined(chunks)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    size += data.len();
                    chunks.push(data);
                    if size > limit {
                        return Err(RequestBody::Resumed { read: Some(joined(chunks)), rest: body });
                    }
                }
            }
            // The caller's stream failed; what follows fails the same way.
            Some(Err(_)) => return Err(RequestBody::Resumed { read: Some(joined(chunks)), rest: body }),
        }
    }
}

fn joined(mut chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().expect("one chunk"),
        _ => chunks.concat().into(),
    }
}

fn attempt(parts: &http::request::Parts, body: Bytes, previous: u32) -> Request<RequestBody> {
    let mut request = Request::new(RequestBody::Replayed(Some(body)));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    if previous > 0 {
        request.headers_mut().insert(grpc::GRPC_PREVIOUS_RPC_ATTEMPTS, HeaderValue::from(previous));
    }
    request
}

/// Full jitter: a random delay up to the current backoff.
fn jittered(backoff: Duration) -> Duration {
    backoff.mul_f64(fastrand::f64())
}

impl<S> Service<Request<Incoming>> for Retries<S>
where
    S: CallService<RequestBody> + Clone + Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let context = CallContext::of(&request);
        let one_request_message = matches!(context.policy.shape, Some(CallShape::Unary | CallShape::ServerStreaming));
        if !one_request_message {
            return Box::pin(self.inner.call(request.map(RequestBody::Streamed)));
        }
        // Only what the attempts need, not the whole context: it stays on the request.
        let (call, deadline, parent) = (context.policy.clone(), context.deadline, context.span.clone());
        let budget = context.retry_budget.clone();
        if let Some(budget) = &budget {
            budget.0.deposit();
        }
        let limit = self.max_replay_bytes;
        let tracing = self.tracing.clone();
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        // What the future holds across its awaits is allocated and moved with
        // every call: the request is split here, an attempt is built only once
        // the service is ready, and a failed attempt is dropped before the backoff.
        let (parts, body) = request.into_parts();
        Box::pin(async move {
            let kept = match keep(body, limit).await {
                Ok(kept) => kept,
                Err(unkept) => return inner.ready().await?.call(Request::from_parts(parts, unkept)).await,
            };
            let policy = call.policy.retry.as_ref().map(|r| &r.value);
            let no_codes = [];
            let retryable = policy.map_or(&no_codes[..], |p| &p.retryable_codes);
            let mut backoff = policy.map_or(Duration::ZERO, |p| p.initial_backoff);
            let (mut attempts, mut refusals_resent) = (0u32, false);
            loop {
                let previous = attempts + u32::from(refusals_resent);
                let service = inner.ready().await?;
                let mut request = attempt(&parts, kept.clone(), previous);
                let mut span = match (&tracing, &parent) {
                    (Some(tracing), Some(parent)) => {
                        let name = format!("{} attempt", call.path.trim_start_matches('/'));
                        let number = KeyValue::new("protomesh.attempt", i64::from(previous) + 1);
                        Some(Box::new(tracing.start_child(request.headers_mut(), parent, name, vec![number])))
                    }
                    _ => None,
                };
                let result = service.call(request).await;
                if let Some(span) = &mut span {
                    let status = match &result {
                        Ok(response) => grpc::status_in(response.headers()).unwrap_or(Code::Ok),
                        Err(error) => error.code(),
                    };
                    span.set_attribute(KeyValue::new("rpc.grpc.status_code", status as i64));
                    span.end();
                }
                let delay = match verdict(&result, retryable) {
                    Verdict::Final => return result,
                    Verdict::Refused if !refusals_resent => {
                        refusals_resent = true;
                        continue;
                    }
                    Verdict::Refused => return result,
                    Verdict::Retryable { pushback } => {
                        attempts += 1;
                        let Some(policy) = policy.filter(|p| attempts < p.max_attempts) else {
                            return result;
                        };
                        let delay = pushback.unwrap_or_else(|| jittered(backoff));
                        backoff = next_backoff(backoff, policy);
                        delay
                    }
                };
                if deadline.is_some_and(|deadline| Instant::now() + delay >= deadline) {
                    return result;
                }
                if !budget.as_ref().is_some_and(|b| b.0.withdraw()) {
                    call.counters.retry_budget_exhausted.fetch_add(1, Ordering::Relaxed);
                    return result;
                }
                call.counters.retries.fetch_add(1, Ordering::Relaxed);
                drop(result);
                // Boxed, like the span: only retried calls need it.
                Box::pin(tokio::time::sleep(delay)).await;
            }
        })
    }
}

fn next_backoff(backoff: Duration, policy: &RetryPolicy) -> Duration {
    backoff.mul_f64(policy.backoff_multiplier).min(policy.max_backoff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailers_only(code: Code, pushback: Option<&str>) -> Result<Response<ResponseBody>, ProxyError> {
        let mut response = Response::new(ResponseBody::empty());
        *response.headers_mut() = grpc::status_headers(code, "failed");
        if let Some(pushback) = pushback {
            response.headers_mut().insert("grpc-retry-pushback-ms", pushback.parse().unwrap());
        }
        Ok(response)
    }

    #[test]
    fn trailers_only_statuses_on_the_list_are_retryable() {
        let codes = [Code::Unavailable];
        assert!(matches!(
            verdict(&trailers_only(Code::Unavailable, None), &codes),
            Verdict::Retryable { pushback: None }
        ));
        assert!(matches!(verdict(&trailers_only(Code::Internal, None), &codes), Verdict::Final));
        assert!(matches!(verdict(&trailers_only(Code::Unavailable, None), &[]), Verdict::Final));
        // A response with headers of its own is committed: its status comes later, in trailers.
        assert!(matches!(verdict(&Ok(Response::new(ResponseBody::empty())), &codes), Verdict::Final));
    }

    #[test]
    fn pushback_sets_the_delay_and_a_negative_or_unreadable_one_stops() {
        let codes = [Code::Unavailable];
        let wait = verdict(&trailers_only(Code::Unavailable, Some("250")), &codes);
        assert!(matches!(wait, Verdict::Retryable { pushback: Some(d) } if d == Duration::from_millis(250)));
        assert!(matches!(verdict(&trailers_only(Code::Unavailable, Some("-1")), &codes), Verdict::Final));
        assert!(matches!(verdict(&trailers_only(Code::Unavailable, Some("soon")), &codes), Verdict::Final));
    }

    #[test]
    fn the_sidecars_own_refusals_are_never_retried() {
        let codes = [Code::ResourceExhausted, Code::Unavailable];
        let overloaded =
            ProxyError::Overloaded { bulkhead: "b".into(), why: "full".into(), pushback: Duration::from_millis(5) };
        assert!(matches!(verdict(&Err(overloaded), &codes), Verdict::Final));
        let no_endpoints = ProxyError::NoEndpoints { upstream: "u".into() };
        assert!(matches!(verdict(&Err(no_endpoints), &codes), Verdict::Retryable { .. }));
    }

    #[test]
    fn backoff_grows_by_the_multiplier_up_to_the_maximum_and_jitter_stays_below_it() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            backoff_multiplier: 2.0,
            ..RetryPolicy::new(5, vec![Code::Unavailable])
        };
        let steps: Vec<_> = std::iter::successors(Some(policy.initial_backoff), |b| Some(next_backoff(*b, &policy)))
            .take(4)
            .map(|b| b.as_millis())
            .collect();
        assert_eq!(steps, [100, 200, 350, 350]);
        for _ in 0..100 {
            assert!(jittered(Duration::from_millis(100)) <= Duration::from_millis(100));
        }
    }

    #[test]
    fn retries_say_how_many_attempts_came_before() {
        let (parts, _) = Request::builder().uri("/s.S/M").header("x", "y").body(()).unwrap().into_parts();
        let first = attempt(&parts, Bytes::from_static(b"m"), 0);
        assert!(first.headers().get("grpc-previous-rpc-attempts").is_none());
        let third = attempt(&parts, Bytes::from_static(b"m"), 2);
        assert_eq!(third.headers()["grpc-previous-rpc-attempts"], "2");
        assert_eq!(third.headers()["x"], "y");
        assert_eq!(third.uri().path(), "/s.S/M");
    }
}
