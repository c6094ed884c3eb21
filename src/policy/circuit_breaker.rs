//! A method's circuit breaker (outbound, where a method sets one): a method
//! whose calls keep failing is cut off by itself, its neighbours on the same
//! upstream untouched, unlike outlier detection, which judges endpoints.
//! After `consecutive_failures` calls in a row end with one of
//! `failure_codes`, the breaker opens: calls are refused at once with
//! UNAVAILABLE, naming it, and `grpc-retry-pushback-ms` until it half-opens.
//! After `open_for`, one call at a time goes through as a probe: its success
//! closes the breaker, its failure opens it again for twice as long, up to
//! `max_open_for`. It sits above the deadline, so calls that run out of time
//! count too when DEADLINE_EXCEEDED is listed.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use http::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::Service;

use super::fields::{PolicyValue, code_names};
use super::kept::{Families, KeptState, Labelled, NamedFamilies};
use crate::call::{CallEnd, CallService, EndOfCall, PolicyError, ProxyError, ResponseBody};
use crate::duration;
use crate::grpc::{self, Code};

#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerPolicy {
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// The statuses that count as the method failing.
    #[serde(default = "defaults::failure_codes")]
    pub failure_codes: Vec<Code>,
    #[serde(default = "defaults::open_for", deserialize_with = "duration::deserialize")]
    pub open_for: Duration,
    #[serde(default = "defaults::max_open_for", deserialize_with = "duration::deserialize")]
    pub max_open_for: Duration,
}

impl Default for CircuitBreakerPolicy {
    fn default() -> Self {
        CircuitBreakerPolicy {
            consecutive_failures: defaults::consecutive_failures(),
            failure_codes: defaults::failure_codes(),
            open_for: defaults::open_for(),
            max_open_for: defaults::max_open_for(),
        }
    }
}

impl PolicyValue for CircuitBreakerPolicy {
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::deserialize(d)
    }

    fn validate(&self) -> Result<(), String> {
        if self.consecutive_failures == 0 {
            return Err("consecutive_failures: at least 1".into());
        }
        if self.failure_codes.is_empty() {
            return Err("failure_codes: list at least one status code, e.g. \"UNAVAILABLE\"".into());
        }
        if self.open_for.is_zero() {
            return Err("open_for: must be above 0, e.g. 5s".into());
        }
        if self.max_open_for < self.open_for {
            return Err("max_open_for: must not be shorter than open_for".into());
        }
        Ok(())
    }

    fn show(&self) -> (Value, String) {
        let json = json!({
            "consecutive_failures": self.consecutive_failures,
            "failure_codes": code_names(&self.failure_codes),
            "open_for": format!("{:?}", self.open_for),
            "max_open_for": format!("{:?}", self.max_open_for),
        });
        (json, self.to_string())
    }
}

impl fmt::Display for CircuitBreakerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let codes = code_names(&self.failure_codes);
        write!(
            f,
            "{} failures in a row ({}) open it for {:?}..{:?}",
            self.consecutive_failures,
            codes.join(", "),
            self.open_for,
            self.max_open_for
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    breaker: String,
}

/// The circuit breakers' metric families.
#[derive(Default)]
pub struct BreakerFamilies {
    open: Family<BreakerLabels, Gauge>,
    refused: Family<BreakerLabels, Counter>,
}

impl Families for BreakerFamilies {
    fn register(&self, registry: &mut Registry) {
        let help = "Whether a method's circuit breaker is open (1) or not (0)";
        registry.register("circuit_breaker_open", help, self.open.clone());
        let help = "Calls refused by a method's open circuit breaker";
        registry.register("circuit_breaker_refused", help, self.refused.clone());
    }
}

impl NamedFamilies for BreakerFamilies {
    type Handles = BreakerMetrics;

    fn handles(&self, label: &str) -> BreakerMetrics {
        let labels = BreakerLabels { breaker: label.to_string() };
        BreakerMetrics {
            open: self.open.get_or_create_owned(&labels),
            refused: self.refused.get_or_create_owned(&labels),
        }
    }
}

/// What a breaker reports.
#[derive(Clone, Debug, Default)]
pub struct BreakerMetrics {
    pub open: Gauge,
    pub refused: Counter,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    /// `probing` while its one probe call is in flight.
    HalfOpen {
        probing: bool,
    },
}

#[derive(Debug)]
struct State {
    phase: Phase,
    failures: u32,
    /// How long it stayed open last time: the next opening doubles it.
    opened_for: Duration,
}

/// One method's breaker, kept across reloads that leave its policy alone.
#[derive(Debug)]
pub struct Breaker {
    /// The breaker in messages: whose it is and where it was set.
    label: Labelled<BreakerFamilies>,
    policy: CircuitBreakerPolicy,
    state: Mutex<State>,
}

/// A call refused by an open breaker.
#[derive(Debug)]
pub struct CircuitBroken {
    pub breaker: Arc<str>,
    pub failures: u32,
    pub pushback: Duration,
}

impl fmt::Display for CircuitBroken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "circuit breaker of {} is open after {} failed calls in a row; the next call goes through as a probe in {:?}",
            self.breaker, self.failures, self.pushback
        )
    }
}

impl std::error::Error for CircuitBroken {}

impl PolicyError for CircuitBroken {
    fn code(&self) -> Code {
        Code::Unavailable
    }

    fn reason(&self) -> &'static str {
        "circuit_breaker_open"
    }

    fn pushback(&self) -> Option<Duration> {
        Some(self.pushback)
    }
}

impl KeptState for Breaker {
    type Settings = CircuitBreakerPolicy;
    type Families = BreakerFamilies;

    fn new(policy: &CircuitBreakerPolicy, label: Labelled<BreakerFamilies>) -> Breaker {
        let state = State { phase: Phase::Closed, failures: 0, opened_for: Duration::ZERO };
        Breaker { label, policy: policy.clone(), state: Mutex::new(state) }
    }

    fn label(&self) -> &Labelled<BreakerFamilies> {
        &self.label
    }

    fn renamed(&self) {
        let open = self.lock().phase != Phase::Closed;
        self.label.get().metrics.open.set(i64::from(open));
    }
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("circuit breaker lock")
    }

    /// Lets a call through (as the probe, when half-open), or refuses it.
    fn admit(&self, now: Instant) -> Result<bool, CircuitBroken> {
        let mut state = self.lock();
        let refused = |state: &State, until: Instant| {
            let label = self.label.get();
            label.metrics.refused.inc();
            let pushback = until.saturating_duration_since(now);
            CircuitBroken { breaker: label.name.clone(), failures: state.failures, pushback }
        };
        match state.phase {
            Phase::Closed => Ok(false),
            Phase::Open { until } if now < until => Err(refused(&state, until)),
            Phase::Open { .. } | Phase::HalfOpen { probing: false } => {
                state.phase = Phase::HalfOpen { probing: true };
                Ok(true)
            }
            // Another probe is under way: try again once it has had a moment.
            Phase::HalfOpen { probing: true } => Err(refused(&state, now + self.policy.open_for.min(PROBE_WAIT))),
        }
    }

    fn record(&self, failed: bool, now: Instant) {
        let mut state = self.lock();
        if !failed {
            if state.phase != Phase::Closed {
                let label = self.label.get();
                tracing::info!(breaker = %label.name, "circuit breaker closed: the probe call succeeded");
                label.metrics.open.set(0);
            }
            *state = State { phase: Phase::Closed, failures: 0, opened_for: Duration::ZERO };
            return;
        }
        state.failures += 1;
        let reopen = matches!(state.phase, Phase::HalfOpen { .. });
        if reopen || (state.phase == Phase::Closed && state.failures >= self.policy.consecutive_failures) {
            let open_for = match reopen {
                true => (state.opened_for * 2).min(self.policy.max_open_for),
                false => self.policy.open_for,
            };
            let label = self.label.get();
            tracing::warn!(breaker = %label.name, failures = state.failures, ?open_for, "circuit breaker open");
            state.phase = Phase::Open { until: now + open_for };
            state.opened_for = open_for;
            label.metrics.open.set(1);
        }
    }

    /// A probe that ended without an outcome (its caller went away) frees its turn.
    fn abandon_probe(&self) {
        let mut state = self.lock();
        if state.phase == (Phase::HalfOpen { probing: true }) {
            state.phase = Phase::HalfOpen { probing: false };
        }
    }

    fn fails(&self, code: Code) -> bool {
        self.policy.failure_codes.contains(&code)
    }
}

/// How long a call waits to be told to come back while a probe is under way.
const PROBE_WAIT: Duration = Duration::from_millis(100);

/// One call's passage through the breaker: reports how it ended.
struct Passage {
    breaker: Arc<Breaker>,
    probe: bool,
    reported: bool,
}

impl Passage {
    fn finish(mut self, failed: bool) {
        self.breaker.record(failed, Instant::now());
        self.reported = true;
    }

    fn answered(self, code: Code) {
        let failed = self.breaker.fails(code);
        self.finish(failed);
    }
}

impl EndOfCall for Passage {
    fn ended(self: Box<Self>, end: CallEnd) {
        match end {
            CallEnd::Answered(code) | CallEnd::Cut(code) => (*self).answered(code),
            CallEnd::Broken(_) => (*self).finish(true),
        }
    }
}

impl fmt::Debug for Passage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Passage").field("breaker", &self.breaker.label).field("probe", &self.probe).finish()
    }
}

impl Drop for Passage {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            self.breaker.abandon_probe();
        }
    }
}

#[derive(Clone)]
pub struct CircuitBreakers<S> {
    inner: S,
    breaker: Option<Arc<Breaker>>,
}

impl<S> CircuitBreakers<S> {
    pub fn new(breaker: Option<Arc<Breaker>>, inner: S) -> Self {
        CircuitBreakers { inner, breaker }
    }
}

impl<S, B> Service<Request<B>> for CircuitBreakers<S>
where
    S: CallService<B>,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<ResponseBody>, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(breaker) = &self.breaker else {
            return Either::Left(self.inner.call(request));
        };
        let probe = match breaker.admit(Instant::now()) {
            Ok(probe) => probe,
            Err(broken) => return Either::Right(Box::pin(futures_util::future::ready(Err(broken.into())))),
        };
        let passage = Passage { breaker: breaker.clone(), probe, reported: false };
        let call = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let mut result = call.await;
            match &mut result {
                Ok(response) => match grpc::status_in(response.headers()) {
                    Some(code) => passage.answered(code),
                    None => response.body_mut().on_end(Box::new(passage)),
                },
                Err(error) => passage.answered(error.code()),
            }
            result
        }))
    }
}

mod defaults {
    use std::time::Duration;

    use crate::grpc::Code;

    pub fn consecutive_failures() -> u32 {
        5
    }
    /// What a server says when it, not the request, is at fault. Not
    /// DEADLINE_EXCEEDED: one caller's short deadlines would open the
    /// breaker for every caller.
    pub fn failure_codes() -> Vec<Code> {
        vec![Code::Unavailable, Code::Internal, Code::Unknown, Code::DataLoss]
    }
    pub fn open_for() -> Duration {
        Duration::from_secs(5)
    }
    pub fn max_open_for() -> Duration {
        Duration::from_secs(60)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tower::ServiceExt;

    use super::*;

    fn breaker(consecutive_failures: u32) -> Arc<Breaker> {
        let policy = CircuitBreakerPolicy { consecutive_failures, ..Default::default() };
        Arc::new(Breaker::new(&policy, Labelled::new(Arc::default(), "method /t.T/M (config)".into())))
    }

    /// Answers every call with the status in `answer`, counting the calls.
    fn backend(answer: Arc<AtomicU32>, calls: Arc<AtomicU32>) -> impl CallService<()> + Clone {
        tower::service_fn(move |_: Request<()>| {
            let (answer, calls) = (answer.clone(), calls.clone());
            async move {
                calls.fetch_add(1, Ordering::Relaxed);
                let code = Code::from_number(answer.load(Ordering::Relaxed) as u8).unwrap();
                let mut response = Response::new(ResponseBody::empty());
                *response.headers_mut() = grpc::status_headers(code, "answer");
                Ok(response)
            }
        })
    }

    fn pushback_ms(refused: ProxyError) -> String {
        let response = refused.into_response(crate::call::Direction::Outbound);
        response.headers()[grpc::GRPC_RETRY_PUSHBACK_MS].to_str().unwrap().to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_open_it_a_probe_closes_it_and_a_failed_probe_doubles_the_wait() {
        let (answer, calls) = (Arc::new(AtomicU32::new(Code::Unavailable as u32)), Arc::new(AtomicU32::new(0)));
        let breaker = breaker(3);
        let layer = CircuitBreakers::new(Some(breaker.clone()), backend(answer.clone(), calls.clone()));
        for _ in 0..3 {
            layer.clone().oneshot(Request::new(())).await.unwrap();
        }
        let refused = layer.clone().oneshot(Request::new(())).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable);
        assert!(refused.to_string().contains("circuit breaker of method /t.T/M (config) is open"), "{refused}");
        assert_eq!(pushback_ms(refused), "5000");
        assert_eq!(calls.load(Ordering::Relaxed), 3, "the refused call never left");

        // Half-open: the probe fails, and the breaker stays open twice as long.
        tokio::time::advance(Duration::from_secs(5)).await;
        layer.clone().oneshot(Request::new(())).await.unwrap();
        let refused = layer.clone().oneshot(Request::new(())).await.unwrap_err();
        assert_eq!(pushback_ms(refused), "10000");

        // The next probe succeeds: closed, and calls flow.
        tokio::time::advance(Duration::from_secs(10)).await;
        answer.store(Code::Ok as u32, Ordering::Relaxed);
        for _ in 0..5 {
            layer.clone().oneshot(Request::new(())).await.unwrap();
        }
        assert_eq!(calls.load(Ordering::Relaxed), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn statuses_off_the_list_and_successes_break_the_run() {
        let (answer, calls) = (Arc::new(AtomicU32::new(Code::Unavailable as u32)), Arc::new(AtomicU32::new(0)));
        let layer = CircuitBreakers::new(Some(breaker(2)), backend(answer.clone(), calls.clone()));
        layer.clone().oneshot(Request::new(())).await.unwrap();
        answer.store(Code::InvalidArgument as u32, Ordering::Relaxed);
        layer.clone().oneshot(Request::new(())).await.unwrap();
        answer.store(Code::Unavailable as u32, Ordering::Relaxed);
        layer.clone().oneshot(Request::new(())).await.unwrap();
        layer.clone().oneshot(Request::new(())).await.expect("two failures, but not in a row until now");
        assert!(layer.clone().oneshot(Request::new(())).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_at_a_time_and_an_abandoned_probe_frees_its_turn() {
        let breaker = breaker(1);
        breaker.record(true, Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        assert!(breaker.admit(now).unwrap(), "the probe");
        assert!(breaker.admit(now).is_err(), "one at a time");
        drop(Passage { breaker: breaker.clone(), probe: true, reported: false });
        assert!(breaker.admit(now).unwrap(), "the turn is free again");
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_renamed_stays_open_and_shows_it_under_its_new_name() {
        let breaker = breaker(1);
        breaker.record(true, Instant::now());
        assert!(breaker.label().rename("method /t.T/M ((protomesh.v1.method))".into()));
        breaker.renamed();
        let families = breaker.label().families();
        assert_eq!(families.handles("method /t.T/M ((protomesh.v1.method))").open.get(), 1);
        let refused = breaker.admit(Instant::now()).unwrap_err();
        assert_eq!(&*refused.breaker, "method /t.T/M ((protomesh.v1.method))");
    }

    #[test]
    fn validation_names_the_field() {
        let policy = CircuitBreakerPolicy { consecutive_failures: 0, ..Default::default() };
        assert!(policy.validate().unwrap_err().starts_with("consecutive_failures"));
        let policy = CircuitBreakerPolicy { max_open_for: Duration::from_secs(1), ..Default::default() };
        assert!(policy.validate().unwrap_err().starts_with("max_open_for"));
        assert!(CircuitBreakerPolicy::default().validate().is_ok());
    }
}
