//! Choosing an endpoint: the power of two choices over peak-EWMA load (the
//! recent round-trip time, jumping up at once and decaying slowly, times the
//! calls in flight, raised by its share of failed calls and while it asks
//! for a pause with `grpc-retry-pushback-ms`), among the endpoints that
//! outlier detection admits and health checks find serving; or, when fewer
//! than the panic threshold are, among all that answer.
//! Hand-written rather than tower::balance: that one needs `&mut` access and
//! so a buffer task per upstream, an extra hop on every call.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::endpoint::Endpoint;
use crate::call::{CallEnd, EndOfCall};
use crate::grpc::Code;
use crate::identity::SpiffeId;
use crate::policy::outlier::{Admission, Ejection, Outcome, Outliers};

/// One endpoint of an upstream, as the balancer sees it: its connections,
/// outlier detection's view of it, and its load.
pub struct Member {
    pub endpoint: Endpoint,
    /// The identity it must present, when it is its own rather than its upstream's.
    pub expected: Option<SpiffeId>,
    pub ejection: Ejection,
    load: Load,
    /// What its active health checks say (SERVING unless they say otherwise).
    serving: AtomicBool,
    /// Whether it has been logged presenting another identity than expected.
    pub mismatch_logged: AtomicBool,
    /// Its Kubernetes pod's name, when known: access logs and traces name it.
    pub pod: Option<Arc<str>>,
}

impl Member {
    /// A member that must present `expected`.
    pub fn expecting(endpoint: Endpoint, expected: Option<SpiffeId>, pod: Option<Arc<str>>) -> Member {
        let (ejection, load, serving) = (Ejection::default(), Load::default(), AtomicBool::new(true));
        Member { endpoint, expected, ejection, load, serving, mismatch_logged: AtomicBool::new(false), pod }
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }

    /// The endpoint asked for no calls for `wait`: the balancer steers them elsewhere.
    pub fn push_back(&self, wait: Duration) {
        self.load.push_back(wait, Instant::now());
    }

    /// Whether outlier detection and health checks let a call go here now.
    fn admitted(&self, now: Instant) -> bool {
        self.serving() && self.ejection.is_available(now)
    }
}

/// How long the round-trip average takes to forget (its time constant).
const DECAY: Duration = Duration::from_secs(10);
/// The round-trip time assumed of an endpoint not yet measured.
const DEFAULT_RTT: Duration = Duration::from_millis(5);

#[derive(Debug)]
struct Load {
    in_flight: AtomicU32,
    estimate: Mutex<Estimate>,
    /// Whether the failing share is above zero: while it is not, a call
    /// that did not fail changes nothing and takes no lock.
    failing: AtomicBool,
}

/// What the balancer has learnt of an endpoint from its calls.
#[derive(Clone, Copy, Debug)]
struct Estimate {
    /// Peak-EWMA round-trip time in nanoseconds.
    rtt: f64,
    /// When `rtt` was last updated.
    updated: Instant,
    /// The share of recent calls that failed (0 to 1), a moving average,
    /// and when it was last updated.
    failing: f64,
    settled: Instant,
    /// Until when the endpoint asked for no calls (`grpc-retry-pushback-ms`).
    pushed_back: Option<Instant>,
}

impl Default for Load {
    fn default() -> Self {
        let now = Instant::now();
        let rtt = DEFAULT_RTT.as_nanos() as f64;
        let estimate = Estimate { rtt, updated: now, failing: 0.0, settled: now, pushed_back: None };
        Load { in_flight: AtomicU32::new(0), estimate: Mutex::new(estimate), failing: AtomicBool::new(false) }
    }
}

/// How much of a round-trip estimate is kept after `elapsed`.
fn kept_after(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

/// A failing share below this is taken as none.
const FORGOTTEN: f64 = 1e-3;
/// How far one call moves the failing share.
const FAILURE_STEP: f64 = 0.1;
/// An endpoint failing every call costs this many times more than a healthy
/// one: it still takes some calls, and so shows when it is well again.
const FAILURE_WEIGHT: f64 = 9.0;
/// An endpoint that pushed back costs this many times more until the time it
/// named: it is passed over unless every choice pushed back.
const PUSHBACK_WEIGHT: f64 = 1e3;
/// The longest an endpoint's pushback steers calls away.
const MAX_PUSHBACK: Duration = DECAY;

impl Load {
    /// The estimates fade while nothing is measured, so that an endpoint
    /// left alone (after a slow or failing spell, or an ejection) is tried
    /// again and measured anew.
    fn cost(&self, now: Instant) -> f64 {
        let estimate = *self.estimate.lock().expect("load lock");
        let since = |then: Instant| now.saturating_duration_since(then);
        let mut cost =
            estimate.rtt * kept_after(since(estimate.updated)) * f64::from(self.in_flight.load(Ordering::Relaxed) + 1);
        if estimate.failing > 0.0 {
            cost *= 1.0 + FAILURE_WEIGHT * estimate.failing * kept_after(since(estimate.settled));
        }
        if estimate.pushed_back.is_some_and(|until| now < until) {
            cost *= PUSHBACK_WEIGHT;
        }
        cost
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let mut estimate = self.estimate.lock().expect("load lock");
        let kept = kept_after(now.saturating_duration_since(estimate.updated));
        estimate.rtt = if rtt > estimate.rtt { rtt } else { estimate.rtt * kept + rtt * (1.0 - kept) };
        estimate.updated = now;
    }

    /// How a call ended, for the failing share.
    fn settled(&self, failed: bool, now: Instant) {
        if !failed && !self.failing.load(Ordering::Relaxed) {
            return;
        }
        let mut estimate = self.estimate.lock().expect("load lock");
        let kept = kept_after(now.saturating_duration_since(estimate.settled));
        let share = estimate.failing * kept * (1.0 - FAILURE_STEP) + if failed { FAILURE_STEP } else { 0.0 };
        // Below this it weighs nothing worth a lock: forgotten.
        estimate.failing = if share < FORGOTTEN { 0.0 } else { share };
        estimate.settled = now;
        self.failing.store(estimate.failing > 0.0, Ordering::Relaxed);
    }

    fn push_back(&self, wait: Duration, now: Instant) {
        self.estimate.lock().expect("load lock").pushed_back = Some(now + wait.min(MAX_PUSHBACK));
    }
}

/// Whether any of `endpoints`, but the `unreachable`, is admitted now.
pub fn any_admitted(endpoints: &[Arc<Member>], unreachable: &[SocketAddr], now: Instant) -> bool {
    endpoints.iter().any(|e| e.admitted(now) && !unreachable.contains(&e.addr()))
}

/// Picks an endpoint for one call: two at random, the lighter one that is
/// admitted, leaving out the `unreachable`. An endpoint whose ejection is
/// over comes first, as the probe that decides whether it is back: left to
/// the balancer, its stale load could keep it out. `None` when none is left.
pub fn choose(
    endpoints: &[Arc<Member>],
    unreachable: &[SocketAddr],
    now: Instant,
    outliers: &Outliers,
) -> Option<(Arc<Member>, Admission)> {
    let reachable = |member: &&Arc<Member>| !unreachable.contains(&member.addr());
    if outliers.ejected() > 0 {
        let probe = endpoints.iter().filter(reachable).find(|e| e.serving() && e.ejection.ready_to_probe(now));
        if let Some(endpoint) = probe
            && endpoint.ejection.admit(now) == Admission::Probe
        {
            return Some((endpoint.clone(), Admission::Probe));
        }
    }
    // Only when something is out: the usual call does no scan.
    if outliers.ejected() > 0 || outliers.not_serving() > 0 {
        let admitted = endpoints.iter().filter(|e| e.admitted(now)).count();
        if outliers.panics(admitted, endpoints.len()) {
            let answering: Vec<&Arc<Member>> =
                endpoints.iter().filter(reachable).filter(|e| e.ejection.answers()).collect();
            let chosen = lighter(&answering, now)?;
            outliers.panicked();
            return Some((chosen.clone(), Admission::Admitted));
        }
    }
    let count = endpoints.len();
    let mut order: [usize; 2] = match count {
        0 => return None,
        1 => [0, 0],
        _ => {
            let first = fastrand::usize(..count);
            let second = (first + 1 + fastrand::usize(..count - 1)) % count;
            [first, second]
        }
    };
    if order[0] != order[1] && endpoints[order[1]].load.cost(now) < endpoints[order[0]].load.cost(now) {
        order.swap(0, 1);
    }
    // The two chosen first, then every endpoint, as a last resort.
    let scan = order.into_iter().chain((0..count).map(|i| (i + order[0]) % count));
    scan.map(|i| &endpoints[i]).filter(reachable).filter(|e| e.admitted(now)).find_map(|endpoint| {
        match endpoint.ejection.admit(now) {
            Admission::Ejected => None,
            admission => Some((endpoint.clone(), admission)),
        }
    })
}

/// The lighter of two endpoints drawn at random.
fn lighter<'a>(endpoints: &[&'a Arc<Member>], now: Instant) -> Option<&'a Arc<Member>> {
    let count = endpoints.len();
    match count {
        0 => None,
        1 => Some(endpoints[0]),
        _ => {
            let first = fastrand::usize(..count);
            let second = (first + 1 + fastrand::usize(..count - 1)) % count;
            let (a, b) = (endpoints[first], endpoints[second]);
            Some(if b.load.cost(now) < a.load.cost(now) { b } else { a })
        }
    }
}

/// Statuses a server answers when it, not the request, is at fault.
const SERVER_FAULTS: [Code; 4] = [Code::Unavailable, Code::Internal, Code::Unknown, Code::DataLoss];

/// One call on its way to an endpoint: counts it in flight, and reports its
/// outcome to outlier detection once known. Dropped without an outcome at or
/// past the call's deadline, the endpoint kept it waiting until then: that
/// is DEADLINE_EXCEEDED. Dropped earlier (the caller went away), it reports
/// nothing and frees a probe's turn.
pub struct Report {
    endpoint: Arc<Member>,
    outliers: Arc<Outliers>,
    /// The statuses the call's method counts against the endpoint, if it chose.
    failure_codes: Option<Arc<[Code]>>,
    probe: bool,
    started: Instant,
    deadline: Option<Instant>,
    responded: bool,
    reported: bool,
}

impl Report {
    pub fn start(
        endpoint: Arc<Member>,
        (outliers, failure_codes): (Arc<Outliers>, Option<Arc<[Code]>>),
        admission: Admission,
        deadline: Option<Instant>,
    ) -> Report {
        endpoint.load.in_flight.fetch_add(1, Ordering::Relaxed);
        let probe = admission == Admission::Probe;
        let started = Instant::now();
        Report { endpoint, outliers, failure_codes, probe, started, deadline, responded: false, reported: false }
    }

    /// The call's connection is ready: its round trip is measured from here,
    /// so that a new connection's handshakes do not count as the endpoint's
    /// latency (a peak that would keep calls off it for many seconds).
    pub fn connected(&mut self) {
        self.started = Instant::now();
    }

    /// The response headers arrived: the round trip is measured here.
    pub fn responded(&mut self) {
        self.endpoint.load.observe(self.started.elapsed(), Instant::now());
        self.responded = true;
    }

    pub fn finish(self, outcome: Outcome) {
        self.settle(outcome, outcome != Outcome::Success);
    }

    /// Records the outcome for outlier detection and `failed` for the
    /// balancer, which also weighs statuses that blame no endpoint: one
    /// replica answering them more than the others weighs more.
    fn settle(mut self, outcome: Outcome, failed: bool) {
        let now = Instant::now();
        self.endpoint.ejection.record(outcome, now, &self.outliers);
        self.endpoint.load.settled(failed, now);
        self.reported = true;
    }

    /// Reports nothing: the call says nothing about the endpoint. A probe
    /// frees its turn for a call that will.
    fn forget(mut self) {
        if self.probe {
            self.endpoint.ejection.abandon_probe();
        }
        self.reported = true;
    }

    pub fn finish_with_status(self, code: Code) {
        let outcome = self.outliers.config().outcome_of(code, self.failure_codes.as_deref());
        self.settle(outcome, outcome != Outcome::Success || SERVER_FAULTS.contains(&code));
    }
}

/// A streamed response reports when it ends: its status, or a failure.
impl EndOfCall for Report {
    fn ended(self: Box<Self>, end: CallEnd) {
        match end {
            CallEnd::Answered(code) => (*self).finish_with_status(code),
            // A timer or a size limit of this sidecar: nothing about the endpoint.
            CallEnd::Cut(_) => (*self).forget(),
            // A reset, or a lost connection.
            CallEnd::Broken(_) => (*self).finish(Outcome::Unreachable),
        }
    }
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Report").field("endpoint", &self.endpoint.addr()).field("probe", &self.probe).finish()
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        self.endpoint.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        let now = Instant::now();
        // A call given up unanswered (a losing hedge, a caller gone) took at
        // least this long: as tower's peak-EWMA does, the load learns it, or
        // an endpoint whose calls are always given up would look fast.
        if !self.responded {
            self.endpoint.load.observe(now.saturating_duration_since(self.started), now);
        }
        if self.reported {
            return;
        }
        if self.deadline.is_some_and(|deadline| now >= deadline) {
            self.endpoint.ejection.record(Outcome::Unreachable, now, &self.outliers);
        } else if self.probe {
            self.endpoint.ejection.abandon_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_peak_jumps_up_at_once_and_decays_slowly() {
        let load = Load::default();
        let now = Instant::now();
        load.observe(Duration::from_millis(100), now);
        assert_eq!(load.cost(now), 100e6);
        load.observe(Duration::from_millis(1), now + DECAY);
        let decayed = load.cost(now + DECAY);
        assert!(decayed < 100e6 && decayed > 30e6, "one time constant keeps about 37%: {decayed}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_estimate_fades_while_nothing_is_measured() {
        let load = Load::default();
        let now = Instant::now();
        load.observe(Duration::from_millis(100), now);
        let faded = load.cost(now + DECAY * 3);
        assert!(faded < 100e6 * 0.06, "three time constants keep about 5%: {faded}");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_raise_the_cost() {
        let load = Load::default();
        let now = Instant::now();
        let idle = load.cost(now);
        load.in_flight.fetch_add(3, Ordering::Relaxed);
        assert_eq!(load.cost(now), idle * 4.0);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_calls_raise_the_cost_and_it_fades_when_they_stop() {
        let load = Load::default();
        let now = Instant::now();
        let healthy = load.cost(now);
        for _ in 0..30 {
            load.settled(true, now);
        }
        let failing = load.cost(now);
        assert!(failing > healthy * 8.0 && failing <= healthy * 10.0, "{failing} vs {healthy}");
        for _ in 0..30 {
            load.settled(false, now);
        }
        assert!(load.cost(now) < healthy * 1.5, "successes bring it back");
        for _ in 0..30 {
            load.settled(true, now);
        }
        let later = now + DECAY * 3;
        load.observe(DEFAULT_RTT, later);
        assert!(load.cost(later) < healthy * 1.5, "left alone, the failures are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_that_pushed_back_is_passed_over_until_the_time_it_named() {
        use crate::policy::outlier::{OutlierConfig, OutlierMetrics, Outliers};
        let outliers = Outliers::new(OutlierConfig::default(), OutlierMetrics::default());
        let (busy, free) = (member(1), member(2));
        let now = Instant::now();
        busy.push_back(Duration::from_secs(2));
        let endpoints = [busy.clone(), free.clone()];
        for _ in 0..20 {
            assert_eq!(choose(&endpoints, &[], now, &outliers).unwrap().0.addr(), free.addr());
        }
        free.push_back(Duration::from_secs(1));
        let chosen = choose(&endpoints, &[], now, &outliers).expect("every endpoint pushed back: still one is chosen");
        assert!([busy.addr(), free.addr()].contains(&chosen.0.addr()));
        let after = now + Duration::from_secs(2);
        let picks: Vec<_> = (0..20).map(|_| choose(&endpoints, &[], after, &outliers).unwrap().0.addr()).collect();
        assert!(picks.contains(&busy.addr()), "back in rotation after its pushback");
    }

    fn member(port: u16) -> Arc<Member> {
        use super::super::endpoint::{ConnectSettings, Transport};
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let settings = ConnectSettings {
            timeout: Duration::from_secs(1),
            stream_window: 65_535,
            max_header_list_size: 16_384,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        };
        let endpoint = Endpoint::new(addr, crate::call::Target::App(addr), Arc::new(Transport::Plaintext), settings, 1);
        Arc::new(Member::expecting(endpoint, None, None))
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_back_from_ejection_takes_the_next_call_as_its_probe() {
        use crate::policy::outlier::{OutlierConfig, OutlierMetrics, Outliers};
        let config = OutlierConfig { consecutive_failures: 1, ..OutlierConfig::default() };
        let outliers = Outliers::new(config.clone(), OutlierMetrics::default());
        outliers.set_endpoint_count(2);
        let (fast, slow) = (member(1), member(2));
        let now = Instant::now();
        fast.load.observe(Duration::from_millis(1), now);
        slow.load.observe(Duration::from_secs(1), now);
        slow.ejection.record(Outcome::Failure, now, &outliers);
        let endpoints = [fast.clone(), slow.clone()];
        for _ in 0..20 {
            let (chosen, _) = choose(&endpoints, &[], now, &outliers).unwrap();
            assert_eq!(chosen.addr(), fast.addr(), "the ejected endpoint takes no call");
        }
        let back = now + config.base_ejection;
        let (chosen, admission) = choose(&endpoints, &[], back, &outliers).unwrap();
        assert_eq!((chosen.addr(), admission), (slow.addr(), Admission::Probe), "heavier, but probed first");
        let (chosen, _) = choose(&endpoints, &[], back, &outliers).unwrap();
        assert_eq!(chosen.addr(), fast.addr(), "one probe at a time");
    }

    #[tokio::test(start_paused = true)]
    async fn below_the_panic_threshold_calls_go_to_endpoints_that_answer_but_not_to_unreachable_ones() {
        use crate::policy::outlier::{OutlierConfig, OutlierMetrics, Outliers};
        let config = OutlierConfig { consecutive_failures: 1, max_ejected_percent: 100, ..OutlierConfig::default() };
        let outliers = Outliers::new(config, OutlierMetrics::default());
        outliers.set_endpoint_count(2);
        let (answering, unreachable) = (member(1), member(2));
        let now = Instant::now();
        answering.ejection.record(Outcome::Failure, now, &outliers);
        unreachable.ejection.record(Outcome::Unreachable, now, &outliers);
        assert_eq!(outliers.ejected(), 2);
        let endpoints = [answering.clone(), unreachable.clone()];
        for _ in 0..20 {
            let (chosen, admission) = choose(&endpoints, &[], now, &outliers).expect("not cut off");
            assert_eq!((chosen.addr(), admission), (answering.addr(), Admission::Admitted));
        }
        // With the one that answers unreachable as well, nothing is left: the circuit is open.
        answering.ejection.record(Outcome::Unreachable, now, &outliers);
        assert!(choose(&endpoints, &[], now, &outliers).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn above_the_panic_threshold_ejections_hold() {
        use crate::policy::outlier::{OutlierConfig, OutlierMetrics, Outliers};
        let config = OutlierConfig { consecutive_failures: 1, ..OutlierConfig::default() };
        let outliers = Outliers::new(config, OutlierMetrics::default());
        outliers.set_endpoint_count(2);
        let (healthy, ejected) = (member(1), member(2));
        let now = Instant::now();
        ejected.ejection.record(Outcome::Failure, now, &outliers);
        let endpoints = [healthy.clone(), ejected];
        for _ in 0..20 {
            let (chosen, _) = choose(&endpoints, &[], now, &outliers).unwrap();
            assert_eq!(chosen.addr(), healthy.addr(), "one of two admitted is 50%: no panic");
        }
    }
}
