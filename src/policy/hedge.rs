//! Hedging, gRFC A6's `hedgingPolicy`: a call kept whole is sent again each
//! `hedging_delay` while no attempt has answered, up to `max_attempts` in all,
//! the attempts running side by side. The first answer that is not a
//! non-fatal status wins; the other attempts are dropped, which resets their
//! streams (CANCEL), so their servers stop. A non-fatal status sends the next
//! attempt at once, or after the server's `grpc-retry-pushback-ms`. Hedges
//! draw on the upstream's retry budget, none starts past the deadline, and
//! each goes to an endpoint the others have not used where there is one
//! ([`Spread`]). Only idempotent methods are hedged (see `effective.rs`).

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::Response;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::ServiceExt;

use super::fields::{PolicyValue, code_names};
use super::replay::{RetryBudget, RetryMetrics, Verdict, attempt, verdict};
use crate::call::{CallService, ProxyError, RequestBody, ResponseBody, Spread};
use crate::duration;
use crate::grpc::Code;

/// gRFC A6 caps attempts at 5, for retries and hedges alike.
const MOST_ATTEMPTS: u32 = 5;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HedgingPolicy {
    /// Attempts in all, the first included: 2 to 5.
    pub max_attempts: u32,
    /// How long the attempts so far have to answer before the next goes
    /// out; 0 sends them all at once.
    #[serde(default, deserialize_with = "duration::deserialize")]
    pub hedging_delay: Duration,
    /// Statuses that leave the other attempts running (and send the next at
    /// once); any other status is the call's answer.
    #[serde(default)]
    pub non_fatal_codes: Vec<Code>,
}

impl PolicyValue for HedgingPolicy {
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::deserialize(d)
    }

    fn validate(&self) -> Result<(), String> {
        if !(2..=MOST_ATTEMPTS).contains(&self.max_attempts) {
            return Err(format!("max_attempts: {} is not 2 to {MOST_ATTEMPTS}", self.max_attempts));
        }
        Ok(())
    }

    fn show(&self) -> (Value, String) {
        let codes = code_names(&self.non_fatal_codes);
        let text =
            format!("{} attempts {:?} apart, non-fatal: {}", self.max_attempts, self.hedging_delay, codes.join(", "));
        let json = json!({
            "max_attempts": self.max_attempts,
            "hedging_delay": format!("{:?}", self.hedging_delay),
            "non_fatal_codes": codes,
        });
        (json, text)
    }
}

/// Runs one hedged call of `kept`, a request read whole.
pub(super) async fn hedge<S, B>(
    inner: S,
    parts: http::request::Parts,
    kept: Bytes,
    policy: &HedgingPolicy,
    (budget, metrics): (Option<RetryBudget>, RetryMetrics),
    deadline: Option<Instant>,
) -> Result<Response<ResponseBody>, ProxyError>
where
    S: CallService<RequestBody<B>> + Clone + Send + 'static,
    B: Send + 'static,
{
    let spread = Spread::default();
    let mut running = FuturesUnordered::new();
    let (mut sent, mut last) = (0, None);
    // When the next attempt goes out; `None` once no more will.
    let mut next = Some(Instant::now());
    loop {
        let now = Instant::now();
        if let Some(at) = next.filter(|at| *at <= now) {
            let hedge = sent > 0;
            next = if hedge && (sent == policy.max_attempts || deadline.is_some_and(|deadline| at >= deadline)) {
                None
            } else if hedge && !budget.as_ref().is_some_and(RetryBudget::withdraw) {
                metrics.budget_exhausted.inc();
                None
            } else {
                sent += 1;
                if hedge {
                    metrics.hedges.inc();
                }
                let mut request = attempt(&parts, kept.clone(), sent);
                request.extensions_mut().insert(spread.clone());
                let mut service = inner.clone();
                running.push(async move { service.ready().await?.call(request).await });
                Some(now + policy.hedging_delay)
            };
            continue;
        }
        let Some(at) = next.filter(|_| sent < policy.max_attempts) else {
            // Nothing more goes out: the attempts still running decide.
            match running.next().await {
                Some(result) => match verdict(&result, &policy.non_fatal_codes) {
                    Verdict::Final if result.is_ok() || running.is_empty() => return result,
                    _ => last = Some(result),
                },
                None => return last.expect("an attempt was sent"),
            }
            continue;
        };
        tokio::select! {
            Some(result) = running.next() => match verdict(&result, &policy.non_fatal_codes) {
                Verdict::Final if result.is_ok() || running.is_empty() => return result,
                // This sidecar's own refusal of a hedge (a full bulkhead):
                // the attempts under way go on, and no more are sent.
                Verdict::Final => {
                    next = None;
                    last = Some(result);
                }
                Verdict::Retryable { pushback } => {
                    next = Some(Instant::now() + pushback.unwrap_or_default());
                    last = Some(result);
                }
                Verdict::Refused => {
                    next = Some(Instant::now());
                    last = Some(result);
                }
            },
            () = tokio::time::sleep_until(at) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::Request;
    use http_body_util::Full;

    use super::*;
    use crate::call::Attempt;
    use crate::grpc;
    use crate::policy::replay::RetryBudgetConfig;
    use crate::policy::retry::{Retries, RetrySettings};

    /// Each attempt answers after its delay with its status (then OK);
    /// records which attempts started and which were dropped unanswered.
    #[derive(Clone, Default)]
    struct Backend {
        answers: Arc<Vec<(Duration, Code)>>,
        started: Arc<Mutex<Vec<u32>>>,
        cancelled: Arc<Mutex<Vec<u32>>>,
    }

    struct Cancelled(u32, Arc<Mutex<Vec<u32>>>, bool);
    impl Drop for Cancelled {
        fn drop(&mut self) {
            if !self.2 {
                self.1.lock().unwrap().push(self.0);
            }
        }
    }

    impl Backend {
        fn new(answers: Vec<(u64, Code)>) -> Backend {
            let answers = answers.into_iter().map(|(ms, code)| (Duration::from_millis(ms), code)).collect();
            Backend { answers: Arc::new(answers), ..Default::default() }
        }

        fn service(&self) -> impl CallService<RequestBody<Full<Bytes>>, Future: Send> + Clone + Send + 'static {
            let backend = self.clone();
            tower::service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
                let backend = backend.clone();
                async move {
                    let number = request.extensions().get::<Attempt>().unwrap().0;
                    assert!(request.extensions().get::<Spread>().is_some(), "every attempt carries the spread");
                    backend.started.lock().unwrap().push(number);
                    let (delay, code) =
                        backend.answers.get(number as usize - 1).copied().unwrap_or((Duration::ZERO, Code::Ok));
                    let mut guard = Cancelled(number, backend.cancelled.clone(), false);
                    tokio::time::sleep(delay).await;
                    guard.2 = true;
                    let mut response = Response::new(ResponseBody::empty());
                    *response.headers_mut() = grpc::status_headers(code, &format!("attempt {number}"));
                    Ok(response)
                }
            })
        }
    }

    fn hedged(
        backend: &Backend,
        max_attempts: u32,
        delay_ms: u64,
    ) -> Retries<impl CallService<RequestBody<Full<Bytes>>, Future: Send> + Clone + Send + 'static> {
        let policy = HedgingPolicy {
            max_attempts,
            hedging_delay: Duration::from_millis(delay_ms),
            non_fatal_codes: vec![Code::Unavailable],
        };
        let settings =
            RetrySettings { hedging: Some(policy), replayable: true, max_replay_bytes: 1024, ..Default::default() };
        let budget = RetryBudget::new(&RetryBudgetConfig::default());
        Retries::new(Arc::new(settings), Some(budget), RetryMetrics::default(), backend.service())
    }

    fn call() -> Request<Full<Bytes>> {
        Request::new(Full::new(Bytes::from_static(b"x")))
    }

    fn message(response: &Response<ResponseBody>) -> String {
        response.headers()["grpc-message"].to_str().unwrap().to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_is_hedged_after_the_delay_and_the_first_answer_wins() {
        let backend = Backend::new(vec![(1000, Code::Ok), (10, Code::Ok)]);
        let started = Instant::now();
        let response = hedged(&backend, 3, 50).oneshot(call()).await.unwrap();
        assert_eq!(message(&response), "attempt 2");
        assert_eq!(started.elapsed(), Duration::from_millis(60), "the hedge after 50ms answered in 10ms");
        assert_eq!(*backend.started.lock().unwrap(), [1, 2], "the third was not due yet");
        assert_eq!(*backend.cancelled.lock().unwrap(), [1], "the slow attempt is dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_non_fatal_status_sends_the_next_attempt_at_once() {
        let backend = Backend::new(vec![(5, Code::Unavailable), (5, Code::Ok)]);
        let started = Instant::now();
        let response = hedged(&backend, 3, 1000).oneshot(call()).await.unwrap();
        assert_eq!((grpc::status_in(response.headers()), message(&response)), (Some(Code::Ok), "attempt 2".into()));
        assert_eq!(started.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_status_is_the_answer_and_cancels_the_others() {
        let backend = Backend::new(vec![(1000, Code::Ok), (10, Code::InvalidArgument)]);
        let response = hedged(&backend, 2, 50).oneshot(call()).await.unwrap();
        assert_eq!(grpc::status_in(response.headers()), Some(Code::InvalidArgument));
        assert_eq!(*backend.cancelled.lock().unwrap(), [1]);
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_attempt_fails_non_fatally_the_last_answer_stands() {
        let backend = Backend::new(vec![(5, Code::Unavailable); 3]);
        let response = hedged(&backend, 3, 50).oneshot(call()).await.unwrap();
        assert_eq!(
            (grpc::status_in(response.headers()), message(&response)),
            (Some(Code::Unavailable), "attempt 3".into())
        );
        assert_eq!(backend.started.lock().unwrap().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn no_hedge_starts_past_the_deadline() {
        let backend = Backend::new(vec![(100, Code::DeadlineExceeded)]);
        let mut request = call();
        request.extensions_mut().insert(crate::policy::deadline::Deadline(Instant::now() + Duration::from_millis(30)));
        hedged(&backend, 3, 50).oneshot(request).await.unwrap();
        assert_eq!(*backend.started.lock().unwrap(), [1]);
    }

    #[test]
    fn validation_names_the_field() {
        let policy = HedgingPolicy { max_attempts: 6, hedging_delay: Duration::ZERO, non_fatal_codes: vec![] };
        assert!(policy.validate().unwrap_err().starts_with("max_attempts"));
        assert!(HedgingPolicy { max_attempts: 2, ..policy }.validate().is_ok());
    }
}
