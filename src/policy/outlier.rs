//! Outlier detection, the circuit breaker of each endpoint. An endpoint
//! fails a call when it cannot be reached (connect errors, resets, no answer
//! by the deadline, or its sidecar reporting its app unreachable), and when
//! it answers with a status that the method (or the upstream) counts against
//! endpoints. By default none does: a status is the app's answer, the same
//! from every replica, so blaming the endpoint for it would cut off healthy
//! methods with the failing one. An endpoint is ejected after
//! `consecutive_failures` in a row, or when its failure rate over a window
//! reaches the threshold. It stays out for `base_ejection` × times ejected
//! (at most `max_ejection`), then takes one probe call at a time (half-open):
//! a success brings it back, a failure ejects it for longer. No more than
//! `max_ejected_percent` of an upstream's endpoints are out at once, though
//! one always may be. When fewer than `panic_threshold` percent are left,
//! calls spread over all of them again but for those that cannot be reached.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::time::Instant;

use super::kept::{Families, NamedFamilies};
use crate::call::PolicyError;
use crate::duration;
use crate::grpc::Code;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Failures in a row that eject an endpoint; 0 turns this trigger off.
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// Statuses counted against the endpoint that answered them, for
    /// methods that choose none (`endpoint_failure_codes`); none by default.
    #[serde(default)]
    pub failure_codes: Vec<Code>,
    #[serde(default)]
    pub failure_rate: Option<FailureRate>,
    #[serde(default = "defaults::base_ejection", deserialize_with = "duration::deserialize")]
    pub base_ejection: Duration,
    #[serde(default = "defaults::max_ejection", deserialize_with = "duration::deserialize")]
    pub max_ejection: Duration,
    #[serde(default = "defaults::max_ejected_percent")]
    pub max_ejected_percent: u32,
    /// Below this percentage of endpoints admitted, balancing ignores
    /// ejections (of endpoints that answer): an upstream is not cut off for
    /// statuses alone. 0 turns it off.
    #[serde(default = "defaults::panic_threshold")]
    pub panic_threshold: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: defaults::consecutive_failures(),
            failure_codes: Vec::new(),
            failure_rate: None,
            base_ejection: defaults::base_ejection(),
            max_ejection: defaults::max_ejection(),
            max_ejected_percent: defaults::max_ejected_percent(),
            panic_threshold: defaults::panic_threshold(),
        }
    }
}

/// Eject when at least `threshold` of the calls in a `window` failed, once
/// the window holds `min_calls`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureRate {
    pub threshold: f64,
    #[serde(default = "defaults::min_calls")]
    pub min_calls: u32,
    #[serde(default = "defaults::window", deserialize_with = "duration::deserialize")]
    pub window: Duration,
}

impl OutlierConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_ejected_percent > 100 {
            return Err("max_ejected_percent: at most 100".into());
        }
        if self.panic_threshold > 100 {
            return Err("panic_threshold: a percentage, at most 100".into());
        }
        if self.max_ejection < self.base_ejection {
            return Err("max_ejection: must not be shorter than base_ejection".into());
        }
        if let Some(rate) = &self.failure_rate
            && !(rate.threshold > 0.0 && rate.threshold <= 1.0)
        {
            return Err("failure_rate.threshold: a fraction above 0 and at most 1, e.g. 0.5".into());
        }
        Ok(())
    }
}

/// How one call to an endpoint went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// It answered with a status counted against it.
    Failure,
    /// It could not be reached, or did not answer in time.
    Unreachable,
}

impl OutlierConfig {
    /// The outcome of a call answered with `code`, counted against the
    /// endpoint when it is among `method_codes` (the method's choice) or,
    /// when the method makes none, among `failure_codes`.
    pub fn outcome_of(&self, code: Code, method_codes: Option<&[Code]>) -> Outcome {
        let counted = method_codes.unwrap_or(&self.failure_codes);
        if counted.contains(&code) { Outcome::Failure } else { Outcome::Success }
    }
}

/// How an upstream's outlier detection reports what it does.
#[derive(Clone, Debug, Default)]
pub struct OutlierMetrics {
    pub ejections: Counter,
    pub ejected: Gauge,
    /// Calls sent while below the panic threshold.
    pub panics: Counter,
    pub not_serving: Gauge,
    /// Connections refused because the endpoint presented another identity
    /// than expected: counted by the upstream, which checks identities.
    pub identity_mismatches: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

/// Outlier detection's metric families, by upstream.
#[derive(Default)]
pub struct OutlierFamilies {
    ejections: Family<UpstreamLabels, Counter>,
    ejected: Family<UpstreamLabels, Gauge>,
    not_serving: Family<UpstreamLabels, Gauge>,
    panics: Family<UpstreamLabels, Counter>,
    identity_mismatches: Family<UpstreamLabels, Counter>,
}

impl Families for OutlierFamilies {
    fn register(&self, registry: &mut Registry) {
        registry.register("endpoint_ejections", "Times outlier detection ejected an endpoint", self.ejections.clone());
        registry.register("endpoints_ejected", "Endpoints out now (the circuit is open)", self.ejected.clone());
        let help = "Endpoints out of balancing now because their health checks failed";
        registry.register("endpoints_not_serving", help, self.not_serving.clone());
        let help = "Calls sent to any answering endpoint, ejected or not, while fewer than \
                    policy.outlier_detection.panic_threshold percent were admitted";
        registry.register("upstream_panic_calls", help, self.panics.clone());
        let help = "Connections to an endpoint that presented another identity than it must (its upstream's, or \
                    its pod's service account's): it gets no call";
        registry.register("endpoint_identity_mismatches", help, self.identity_mismatches.clone());
    }
}

impl NamedFamilies for OutlierFamilies {
    type Handles = OutlierMetrics;

    fn handles(&self, upstream: &str) -> OutlierMetrics {
        let labels = UpstreamLabels { upstream: upstream.to_string() };
        OutlierMetrics {
            ejections: self.ejections.get_or_create_owned(&labels),
            ejected: self.ejected.get_or_create_owned(&labels),
            panics: self.panics.get_or_create_owned(&labels),
            not_serving: self.not_serving.get_or_create_owned(&labels),
            identity_mismatches: self.identity_mismatches.get_or_create_owned(&labels),
        }
    }
}

/// What an upstream's endpoints share: the config (replaced on reload, the
/// endpoints' state kept) and how many are out.
#[derive(Debug)]
pub struct Outliers {
    config: ArcSwap<OutlierConfig>,
    metrics: OutlierMetrics,
    ejected: AtomicUsize,
    endpoints: AtomicUsize,
    /// Endpoints that active health checks took out of balancing.
    not_serving: AtomicUsize,
}

impl Outliers {
    pub fn new(config: OutlierConfig, metrics: OutlierMetrics) -> Outliers {
        Outliers {
            config: ArcSwap::from_pointee(config),
            metrics,
            ejected: AtomicUsize::new(0),
            endpoints: AtomicUsize::new(0),
            not_serving: AtomicUsize::new(0),
        }
    }

    pub fn config(&self) -> Arc<OutlierConfig> {
        self.config.load_full()
    }

    /// Applies to the next outcomes; ejections in force run their course.
    pub fn set_config(&self, config: OutlierConfig) {
        if *self.config.load_full() != config {
            self.config.store(Arc::new(config));
        }
    }

    fn ejected_one_more(&self) {
        self.ejected.fetch_add(1, Ordering::AcqRel);
        self.metrics.ejected.inc();
    }

    fn returned_one(&self) {
        self.ejected.fetch_sub(1, Ordering::AcqRel);
        self.metrics.ejected.dec();
    }

    pub fn set_endpoint_count(&self, count: usize) {
        self.endpoints.store(count, Ordering::Release);
    }

    /// One more ejection keeps within `max_ejected_percent`, or none is out yet.
    fn may_eject(&self) -> bool {
        let ejected = self.ejected.load(Ordering::Acquire);
        let endpoints = self.endpoints.load(Ordering::Acquire).max(1);
        ejected == 0 || (ejected + 1) * 100 <= endpoints * self.config.load().max_ejected_percent as usize
    }

    pub fn ejected(&self) -> usize {
        self.ejected.load(Ordering::Acquire)
    }

    /// How many endpoints health checks find not serving.
    pub fn not_serving(&self) -> usize {
        self.not_serving.load(Ordering::Acquire)
    }

    pub fn set_not_serving(&self, count: usize) {
        self.not_serving.store(count, Ordering::Release);
        self.metrics.not_serving.set(count as i64);
    }

    /// Whether `admitted` of `endpoints` is below the panic threshold.
    pub fn panics(&self, admitted: usize, endpoints: usize) -> bool {
        admitted * 100 < endpoints * self.config.load().panic_threshold as usize
    }

    /// Counts a call sent in panic.
    pub fn panicked(&self) {
        self.metrics.panics.inc();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Admitted,
    Ejected {
        until: Instant,
    },
    /// Back from ejection; `probing` while its one probe call is in flight.
    HalfOpen {
        probing: bool,
    },
}

/// One endpoint's breaker. Its lock is held only for a few arithmetic steps.
#[derive(Debug)]
pub struct Ejection {
    inner: Mutex<EjectionState>,
}

#[derive(Debug)]
struct EjectionState {
    state: State,
    /// The last failure was a failure to reach it: then it stays out even in panic.
    unreachable: bool,
    consecutive_failures: u32,
    times_ejected: u32,
    window_start: Instant,
    window_calls: u32,
    window_failures: u32,
}

/// Whether an endpoint may take a call now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Admitted as the half-open probe.
    Probe,
    Ejected,
}

impl Default for Ejection {
    fn default() -> Self {
        Ejection {
            inner: Mutex::new(EjectionState {
                state: State::Admitted,
                unreachable: false,
                consecutive_failures: 0,
                times_ejected: 0,
                window_start: Instant::now(),
                window_calls: 0,
                window_failures: 0,
            }),
        }
    }
}

impl Ejection {
    pub fn state(&self) -> State {
        self.lock().state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EjectionState> {
        self.inner.lock().expect("endpoint ejection lock")
    }

    /// Whether a call may go here now; an expired ejection turns half-open
    /// and the first call to ask becomes its probe.
    pub fn admit(&self, now: Instant) -> Admission {
        let mut ejection = self.lock();
        match ejection.state {
            State::Admitted => Admission::Admitted,
            State::Ejected { until } if now < until => Admission::Ejected,
            State::Ejected { .. } | State::HalfOpen { probing: false } => {
                ejection.state = State::HalfOpen { probing: true };
                Admission::Probe
            }
            State::HalfOpen { probing: true } => Admission::Ejected,
        }
    }

    /// Whether the ejection is over and no probe is under way: the next call may probe.
    pub fn ready_to_probe(&self, now: Instant) -> bool {
        match self.lock().state {
            State::Ejected { until } => now >= until,
            State::HalfOpen { probing } => !probing,
            State::Admitted => false,
        }
    }

    /// Whether `admit` would let a call through, without claiming a probe.
    pub fn is_available(&self, now: Instant) -> bool {
        match self.lock().state {
            State::Admitted | State::HalfOpen { probing: false } => true,
            State::Ejected { until } => now >= until,
            State::HalfOpen { probing: true } => false,
        }
    }

    /// Whether a call may go here in panic: it answers, even if ejected.
    pub fn answers(&self) -> bool {
        let ejection = self.lock();
        ejection.state == State::Admitted || !ejection.unreachable
    }

    /// A probe that never reported (the call was cancelled) frees its turn.
    pub fn abandon_probe(&self) {
        let mut ejection = self.lock();
        if ejection.state == (State::HalfOpen { probing: true }) {
            ejection.state = State::HalfOpen { probing: false };
        }
    }

    pub fn record(&self, outcome: Outcome, now: Instant, outliers: &Outliers) {
        let config = outliers.config.load();
        let mut ejection = self.lock();
        if let Some(rate) = &config.failure_rate
            && now.duration_since(ejection.window_start) >= rate.window
        {
            ejection.window_start = now;
            ejection.window_calls = 0;
            ejection.window_failures = 0;
        }
        ejection.window_calls += 1;
        match outcome {
            Outcome::Success => {
                ejection.consecutive_failures = 0;
                ejection.unreachable = false;
                if matches!(ejection.state, State::HalfOpen { .. }) {
                    ejection.state = State::Admitted;
                    outliers.returned_one();
                }
            }
            Outcome::Failure | Outcome::Unreachable => {
                ejection.unreachable = outcome == Outcome::Unreachable;
                ejection.consecutive_failures += 1;
                ejection.window_failures += 1;
                match ejection.state {
                    State::HalfOpen { .. } => {}
                    State::Admitted if ejection.tripped(&config) && outliers.may_eject() => outliers.ejected_one_more(),
                    _ => return,
                }
                outliers.metrics.ejections.inc();
                ejection.eject(now, &config);
            }
        }
    }
}

impl EjectionState {
    fn tripped(&self, config: &OutlierConfig) -> bool {
        let consecutive = config.consecutive_failures > 0 && self.consecutive_failures >= config.consecutive_failures;
        let rate = config.failure_rate.as_ref().is_some_and(|rate| {
            self.window_calls >= rate.min_calls
                && f64::from(self.window_failures) >= rate.threshold * f64::from(self.window_calls)
        });
        consecutive || rate
    }

    fn eject(&mut self, now: Instant, config: &OutlierConfig) {
        self.times_ejected += 1;
        let length = config.base_ejection.saturating_mul(self.times_ejected).min(config.max_ejection);
        self.state = State::Ejected { until: now + length };
        self.consecutive_failures = 0;
        self.window_start = now;
        self.window_calls = 0;
        self.window_failures = 0;
    }
}

/// Outlier detection has every endpoint of an upstream out.
#[derive(Debug, PartialEq, Eq)]
pub struct AllEjected {
    pub upstream: Arc<str>,
    pub endpoints: usize,
}

impl fmt::Display for AllEjected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "all endpoints ejected: outlier detection (policy.outlier_detection) has ejected all {} endpoint(s) of upstream {}",
            self.endpoints, self.upstream
        )
    }
}

impl std::error::Error for AllEjected {}

impl PolicyError for AllEjected {
    fn code(&self) -> Code {
        Code::Unavailable
    }

    fn reason(&self) -> &'static str {
        "all_endpoints_ejected"
    }
}

mod defaults {
    use std::time::Duration;

    pub fn consecutive_failures() -> u32 {
        5
    }
    pub fn base_ejection() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_ejection() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_ejected_percent() -> u32 {
        50
    }
    /// As Envoy's `healthy_panic_threshold`.
    pub fn panic_threshold() -> u32 {
        50
    }
    pub fn min_calls() -> u32 {
        20
    }
    pub fn window() -> Duration {
        Duration::from_secs(10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outliers(endpoints: usize) -> Outliers {
        let config =
            OutlierConfig { consecutive_failures: 3, base_ejection: Duration::from_secs(10), ..Default::default() };
        let outliers = Outliers::new(config, OutlierMetrics::default());
        outliers.set_endpoint_count(endpoints);
        outliers
    }

    fn fail(ejection: &Ejection, times: u32, outliers: &Outliers) {
        for _ in 0..times {
            ejection.record(Outcome::Failure, Instant::now(), outliers);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_and_a_success_in_between_resets_the_count() {
        let outliers = outliers(4);
        let ejection = Ejection::default();
        fail(&ejection, 2, &outliers);
        ejection.record(Outcome::Success, Instant::now(), &outliers);
        fail(&ejection, 2, &outliers);
        assert_eq!(ejection.state(), State::Admitted);
        fail(&ejection, 1, &outliers);
        assert!(matches!(ejection.state(), State::Ejected { .. }));
        assert_eq!(ejection.admit(Instant::now()), Admission::Ejected);
        assert_eq!(outliers.ejected(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn after_ejection_one_probe_decides_and_failures_eject_for_longer() {
        let outliers = outliers(4);
        let ejection = Ejection::default();
        fail(&ejection, 3, &outliers);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(ejection.admit(Instant::now()), Admission::Probe);
        assert_eq!(ejection.admit(Instant::now()), Admission::Ejected, "one probe at a time");
        ejection.record(Outcome::Failure, Instant::now(), &outliers);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(ejection.admit(Instant::now()), Admission::Ejected, "ejected twice: 20 s");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(ejection.admit(Instant::now()), Admission::Probe);
        ejection.record(Outcome::Success, Instant::now(), &outliers);
        assert_eq!(ejection.state(), State::Admitted);
        assert_eq!(outliers.ejected(), 0);
        assert_eq!((outliers.metrics.ejections.get(), outliers.metrics.ejected.get()), (2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_the_turn() {
        let outliers = outliers(4);
        let ejection = Ejection::default();
        fail(&ejection, 3, &outliers);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(ejection.admit(Instant::now()), Admission::Probe);
        ejection.abandon_probe();
        assert_eq!(ejection.admit(Instant::now()), Admission::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_maximum_share_is_ejected_but_one_always_may_be() {
        let outliers = outliers(4);
        let endpoints: Vec<Ejection> = (0..4).map(|_| Ejection::default()).collect();
        for ejection in &endpoints {
            fail(ejection, 3, &outliers);
        }
        assert_eq!(outliers.ejected(), 2, "50% of 4");

        let single = self::outliers(1);
        let ejection = Ejection::default();
        fail(&ejection, 3, &single);
        assert!(matches!(ejection.state(), State::Ejected { .. }), "a lone endpoint can still be ejected");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_rate_over_the_window_ejects() {
        let config = OutlierConfig {
            consecutive_failures: 0,
            failure_rate: Some(FailureRate { threshold: 0.5, min_calls: 10, window: Duration::from_secs(10) }),
            ..Default::default()
        };
        let outliers = Outliers::new(config, OutlierMetrics::default());
        outliers.set_endpoint_count(2);
        let ejection = Ejection::default();
        for i in 0..9 {
            let outcome = if i % 2 == 0 { Outcome::Failure } else { Outcome::Success };
            ejection.record(outcome, Instant::now(), &outliers);
        }
        assert_eq!(ejection.state(), State::Admitted, "fewer than min_calls");
        ejection.record(Outcome::Failure, Instant::now(), &outliers);
        assert!(matches!(ejection.state(), State::Ejected { .. }), "6 of 10 failed");
    }

    #[test]
    fn statuses_count_against_an_endpoint_only_where_the_method_or_upstream_says() {
        let quiet = OutlierConfig::default();
        assert_eq!(quiet.outcome_of(Code::Unavailable, None), Outcome::Success, "by default the app's answer");
        let method = [Code::Unavailable];
        assert_eq!(quiet.outcome_of(Code::Unavailable, Some(&method)), Outcome::Failure);
        assert_eq!(quiet.outcome_of(Code::Internal, Some(&method)), Outcome::Success);
        let upstream = OutlierConfig { failure_codes: vec![Code::Internal], ..Default::default() };
        assert_eq!(upstream.outcome_of(Code::Internal, None), Outcome::Failure);
        assert_eq!(upstream.outcome_of(Code::Internal, Some(&method)), Outcome::Success, "the method's choice wins");
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_answers_unless_its_last_failure_was_unreachability() {
        let outliers = outliers(4);
        let ejection = Ejection::default();
        fail(&ejection, 3, &outliers);
        assert!(ejection.answers(), "ejected for statuses, it still answers");
        let unreachable = Ejection::default();
        for _ in 0..3 {
            unreachable.record(Outcome::Unreachable, Instant::now(), &outliers);
        }
        assert!(!unreachable.answers());
        assert!(outliers.panics(1, 4) && !outliers.panics(2, 4), "below half admitted");
    }
}
