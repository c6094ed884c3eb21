//! Retries with gRFC A6 semantics. A call is retried only if its method is
//! eligible (a retry policy applies to it), only on the policy's codes read
//! from a trailers-only response or from a failure before any response, only
//! up to `max_attempts`, and only while the upstream's retry budget allows.
//! Backoff is exponential with full jitter; `grpc-retry-pushback-ms` from the
//! server replaces it (a negative value stops retrying). No retry starts past
//! the call's [`Deadline`], and none once response headers have gone to the
//! caller.
//!
//! Whatever the method, a call the peer refused without processing
//! (REFUSED_STREAM, as after GOAWAY) is sent once more.
//!
//! Calls with one request message (unary, server-streaming) are kept whole,
//! up to `policy.max_replay_bytes`, so that they can be sent again; larger
//! ones and request streams go out as they come and are not retried. Each
//! attempt is marked with its number ([`Attempt`]). A method may hedge
//! instead (`hedge.rs`): the same layer, the same kept request and budget.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::deadline::Deadline;
use super::fields::{PolicyValue, code_names};
use super::hedge::{HedgingPolicy, hedge};
use super::replay::{RetryBudget, RetryMetrics, Verdict, attempt, verdict};
use crate::call::{CallFuture, CallService, ProxyError, RequestBody, ResponseBody};
use crate::duration;
use crate::grpc::Code;

/// Retries, as gRFC A6 describes them.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 turns retries off.
    pub max_attempts: u32,
    #[serde(default)]
    pub retryable_codes: Vec<Code>,
    #[serde(default = "defaults::initial_backoff", deserialize_with = "duration::deserialize")]
    pub initial_backoff: Duration,
    #[serde(default = "defaults::max_backoff", deserialize_with = "duration::deserialize")]
    pub max_backoff: Duration,
    #[serde(default = "defaults::backoff_multiplier")]
    pub backoff_multiplier: f64,
}

impl RetryPolicy {
    /// A policy with the default backoff: 25ms initial, ×2, at most 1s.
    pub fn new(max_attempts: u32, retryable_codes: Vec<Code>) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            retryable_codes,
            initial_backoff: defaults::initial_backoff(),
            max_backoff: defaults::max_backoff(),
            backoff_multiplier: defaults::backoff_multiplier(),
        }
    }

    pub fn retries(&self) -> bool {
        self.max_attempts > 1
    }
}

impl PolicyValue for RetryPolicy {
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::deserialize(d)
    }

    fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts: 0 is not a number of attempts; 1 turns retries off".into());
        }
        if self.max_attempts > 1 && self.retryable_codes.is_empty() {
            return Err("retryable_codes: list at least one status code, e.g. \"UNAVAILABLE\"".into());
        }
        if self.backoff_multiplier.is_nan() || self.backoff_multiplier < 1.0 {
            return Err(format!("backoff_multiplier: {} must be 1 or more", self.backoff_multiplier));
        }
        if self.max_backoff < self.initial_backoff {
            return Err("max_backoff: must not be shorter than initial_backoff".into());
        }
        Ok(())
    }

    fn show(&self) -> (Value, String) {
        let codes = code_names(&self.retryable_codes);
        let text = format!(
            "{} attempts on {}, backoff {:?}..{:?} x{}",
            self.max_attempts,
            codes.join(", "),
            self.initial_backoff,
            self.max_backoff,
            self.backoff_multiplier
        );
        let json = json!({
            "max_attempts": self.max_attempts,
            "retryable_codes": codes,
            "initial_backoff": format!("{:?}", self.initial_backoff),
            "max_backoff": format!("{:?}", self.max_backoff),
            "backoff_multiplier": self.backoff_multiplier,
        });
        (json, text)
    }
}

/// A method's retry settings, resolved once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetrySettings {
    /// `None`: only refused calls are sent again.
    pub policy: Option<RetryPolicy>,
    /// In place of retries: attempts sent side by side (never with `policy`).
    pub hedging: Option<HedgingPolicy>,
    /// The method takes one request message (unary, server-streaming), so a
    /// call can be kept and sent again.
    pub replayable: bool,
    pub max_replay_bytes: usize,
}

#[derive(Clone)]
pub struct Retries<S> {
    inner: S,
    settings: Arc<RetrySettings>,
    budget: Option<RetryBudget>,
    metrics: RetryMetrics,
}

impl<S> Retries<S> {
    pub fn new(settings: Arc<RetrySettings>, budget: Option<RetryBudget>, metrics: RetryMetrics, inner: S) -> Self {
        Retries { inner, settings, budget, metrics }
    }
}

/// Reads a request whole, up to `limit` bytes. Past the limit, gives back
/// what it read and the rest of the stream.
/// A request read whole usually came in one frame: kept as it came, uncopied.
async fn keep<B>(mut body: B, limit: usize) -> Result<Bytes, RequestBody<B>>
where
    B: Body<Data = Bytes> + Unpin,
{
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

/// Full jitter: a random delay up to the current backoff.
fn jittered(backoff: Duration) -> Duration {
    backoff.mul_f64(fastrand::f64())
}

fn next_backoff(backoff: Duration, policy: &RetryPolicy) -> Duration {
    backoff.mul_f64(policy.backoff_multiplier).min(policy.max_backoff)
}

impl<S, B> Service<Request<B>> for Retries<S>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    S: CallService<RequestBody<B>> + Clone + Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !self.settings.replayable {
            return Box::pin(self.inner.call(request.map(RequestBody::Streamed)));
        }
        if let Some(budget) = &self.budget {
            budget.deposit();
        }
        let (settings, budget, metrics) = (self.settings.clone(), self.budget.clone(), self.metrics.clone());
        let deadline = request.extensions().get::<Deadline>().map(|d| d.0);
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        // What the future holds across its awaits is allocated and moved with
        // every call: the request is split here, an attempt is built only once
        // the service is ready, and a failed attempt is dropped before the backoff.
        let (parts, body) = request.into_parts();
        Box::pin(async move {
            let kept = match keep(body, settings.max_replay_bytes).await {
                Ok(kept) => kept,
                Err(unkept) => return inner.ready().await?.call(Request::from_parts(parts, unkept)).await,
            };
            if let Some(hedging) = &settings.hedging {
                // Boxed: the future every kept call allocates stays its size.
                return Box::pin(hedge(inner, parts, kept, hedging, (budget, metrics), deadline)).await;
            }
            let policy = settings.policy.as_ref();
            let retryable = policy.map_or(&[][..], |p| &p.retryable_codes);
            let mut backoff = policy.map_or(Duration::ZERO, |p| p.initial_backoff);
            let (mut retries, mut refusal_resent) = (0u32, false);
            loop {
                let number = 1 + retries + u32::from(refusal_resent);
                let result = inner.ready().await?.call(attempt(&parts, kept.clone(), number)).await;
                let delay = match verdict(&result, retryable) {
                    Verdict::Final => return result,
                    Verdict::Refused if !refusal_resent => {
                        refusal_resent = true;
                        continue;
                    }
                    Verdict::Refused => return result,
                    Verdict::Retryable { pushback } => {
                        retries += 1;
                        let Some(policy) = policy.filter(|p| retries < p.max_attempts) else {
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
                if !budget.as_ref().is_some_and(RetryBudget::withdraw) {
                    metrics.budget_exhausted.inc();
                    return result;
                }
                metrics.retries.inc();
                drop(result);
                // Boxed: only retried calls need it.
                Box::pin(tokio::time::sleep(delay)).await;
            }
        })
    }
}

mod defaults {
    use std::time::Duration;

    pub fn initial_backoff() -> Duration {
        Duration::from_millis(25)
    }
    pub fn max_backoff() -> Duration {
        Duration::from_secs(1)
    }
    pub fn backoff_multiplier() -> f64 {
        2.0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::Full;

    use super::*;
    use crate::call::Attempt;
    use crate::grpc;
    use crate::policy::bulkhead::BulkheadFull;
    use crate::policy::replay::RetryBudgetConfig;

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
        let overloaded = BulkheadFull { bulkhead: "b".into(), why: "full".into(), pushback: Duration::from_millis(5) };
        assert!(matches!(verdict(&Err(overloaded.into()), &codes), Verdict::Final));
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
    fn validation_names_the_field() {
        assert!(RetryPolicy::new(0, vec![]).validate().unwrap_err().starts_with("max_attempts"));
        assert!(RetryPolicy::new(3, vec![]).validate().unwrap_err().starts_with("retryable_codes"));
        assert!(RetryPolicy::new(1, vec![]).validate().is_ok());
    }

    type Seen = Arc<Mutex<Vec<(Attempt, Option<String>, Bytes)>>>;

    /// A backend answering each attempt with the next of `statuses` (then OK),
    /// and recording what each attempt carried.
    fn backend(
        statuses: Vec<Code>,
        seen: Seen,
    ) -> impl CallService<RequestBody<Full<Bytes>>, Future: Send> + Clone + Send + 'static {
        let statuses = Arc::new(Mutex::new(statuses.into_iter()));
        tower::service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
            let (statuses, seen) = (statuses.clone(), seen.clone());
            async move {
                let attempt = *request.extensions().get::<Attempt>().unwrap();
                let previous = request.headers().get("grpc-previous-rpc-attempts").map(|v| v.to_str().unwrap().into());
                let body = request.into_body().collect().await.unwrap().to_bytes();
                seen.lock().unwrap().push((attempt, previous, body));
                let code = statuses.lock().unwrap().next().unwrap_or(Code::Ok);
                trailers_only(code, None)
            }
        })
    }

    fn settings(max_attempts: u32) -> Arc<RetrySettings> {
        let mut policy = RetryPolicy::new(max_attempts, vec![Code::Unavailable]);
        policy.initial_backoff = Duration::from_millis(10);
        Arc::new(RetrySettings { policy: Some(policy), replayable: true, max_replay_bytes: 1024, hedging: None })
    }

    fn budget() -> Option<RetryBudget> {
        Some(RetryBudget::new(&RetryBudgetConfig::default()))
    }

    fn request(body: &'static str) -> Request<Full<Bytes>> {
        Request::new(Full::new(Bytes::from_static(body.as_bytes())))
    }

    #[tokio::test(start_paused = true)]
    async fn a_retryable_status_is_retried_with_the_same_body_and_numbered() {
        let seen = Seen::default();
        let metrics = RetryMetrics::default();
        let retries =
            Retries::new(settings(3), budget(), metrics.clone(), backend(vec![Code::Unavailable; 2], seen.clone()));
        let response = retries.oneshot(request("hello")).await.unwrap();
        assert_eq!(grpc::status_in(response.headers()), Some(Code::Ok));
        let seen = seen.lock().unwrap();
        let numbers: Vec<_> = seen.iter().map(|(a, previous, _)| (a.0, previous.clone())).collect();
        assert_eq!(numbers, [(1, None), (2, Some("1".into())), (3, Some("2".into()))]);
        assert!(seen.iter().all(|(_, _, body)| body == "hello"));
        assert_eq!(metrics.retries.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_stop_at_max_attempts_and_the_last_answer_stands() {
        let seen = Seen::default();
        let retries = Retries::new(
            settings(2),
            budget(),
            RetryMetrics::default(),
            backend(vec![Code::Unavailable; 5], seen.clone()),
        );
        let response = retries.oneshot(request("x")).await.unwrap();
        assert_eq!(grpc::status_in(response.headers()), Some(Code::Unavailable));
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_would_end_past_the_deadline() {
        let seen = Seen::default();
        let mut settings = (*settings(5)).clone();
        settings.policy.as_mut().unwrap().initial_backoff = Duration::from_secs(1);
        settings.policy.as_mut().unwrap().max_backoff = Duration::from_secs(1);
        let retries = Retries::new(
            Arc::new(settings),
            budget(),
            RetryMetrics::default(),
            backend(vec![Code::Unavailable; 5], seen.clone()),
        );
        let mut call = request("x");
        call.extensions_mut().insert(Deadline(Instant::now() + Duration::from_millis(1)));
        let response = retries.oneshot(call).await.unwrap();
        assert_eq!(grpc::status_in(response.headers()), Some(Code::Unavailable));
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_budget_stops_retries_and_is_counted() {
        let seen = Seen::default();
        let metrics = RetryMetrics::default();
        let empty = RetryBudget::new(&RetryBudgetConfig { ratio: 0.0, min_per_second: 0 });
        let retries =
            Retries::new(settings(3), Some(empty), metrics.clone(), backend(vec![Code::Unavailable], seen.clone()));
        let response = retries.oneshot(request("x")).await.unwrap();
        assert_eq!(grpc::status_in(response.headers()), Some(Code::Unavailable));
        assert_eq!((seen.lock().unwrap().len() as u64, metrics.budget_exhausted.get()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_replay_limit_goes_out_once_whole() {
        let seen = Seen::default();
        let small = Arc::new(RetrySettings { max_replay_bytes: 3, ..(*settings(3)).clone() });
        let retries = Retries::new(small, budget(), RetryMetrics::default(), streamed_backend(seen.clone()));
        retries.oneshot(request("too long")).await.unwrap();
        assert_eq!(seen.lock().unwrap()[0].2, "too long");
    }

    /// Records the body of a call sent as it came (no attempt number).
    fn streamed_backend(
        seen: Seen,
    ) -> impl CallService<RequestBody<Full<Bytes>>, Future: Send> + Clone + Send + 'static {
        tower::service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
            let seen = seen.clone();
            async move {
                let attempt = request.extensions().get::<Attempt>().copied().unwrap_or(Attempt(0));
                let body = request.into_body().collect().await.unwrap().to_bytes();
                seen.lock().unwrap().push((attempt, None, body));
                trailers_only(Code::Unavailable, None)
            }
        })
    }
}
