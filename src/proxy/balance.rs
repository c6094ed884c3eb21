//! Choosing an endpoint: the power of two choices over peak-EWMA load (the
//! recent round-trip time, jumping up at once and decaying slowly, times the
//! calls in flight), among the endpoints that outlier detection admits.
//! Hand-written rather than tower::balance: that one needs `&mut` access and
//! so a buffer task per upstream, an extra hop on every call.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::endpoint::Endpoint;
use crate::call::EndOfCall;
use crate::grpc::Code;
use crate::policy::outlier::{Admission, Health, Outcome, Outliers};

/// One endpoint of an upstream, as the balancer sees it: its connections,
/// outlier detection's view of it, and its load.
pub struct Member {
    pub endpoint: Endpoint,
    pub health: Health,
    load: Load,
}

impl Member {
    pub fn new(endpoint: Endpoint) -> Member {
        Member { endpoint, health: Health::default(), load: Load::default() }
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }
}

/// How long the round-trip average takes to forget (its time constant).
const DECAY: Duration = Duration::from_secs(10);
/// The round-trip time assumed of an endpoint not yet measured.
const DEFAULT_RTT: Duration = Duration::from_millis(5);

#[derive(Debug)]
struct Load {
    in_flight: AtomicU32,
    /// Peak-EWMA round-trip time in nanoseconds, and when it was last updated.
    rtt: Mutex<(f64, Instant)>,
}

impl Default for Load {
    fn default() -> Self {
        Load { in_flight: AtomicU32::new(0), rtt: Mutex::new((DEFAULT_RTT.as_nanos() as f64, Instant::now())) }
    }
}

impl Load {
    fn cost(&self) -> f64 {
        let rtt = self.rtt.lock().expect("load lock").0;
        rtt * f64::from(self.in_flight.load(Ordering::Relaxed) + 1)
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let mut average = self.rtt.lock().expect("load lock");
        let (ewma, updated) = *average;
        let next = if rtt > ewma {
            rtt
        } else {
            let kept = (-now.duration_since(updated).as_secs_f64() / DECAY.as_secs_f64()).exp();
            ewma * kept + rtt * (1.0 - kept)
        };
        *average = (next, now);
    }
}

/// Picks an endpoint for one call: two at random, the lighter one that is
/// admitted, leaving out the `unreachable`. `None` when none is left.
pub fn choose(endpoints: &[Arc<Member>], unreachable: &[SocketAddr], now: Instant) -> Option<(Arc<Member>, Admission)> {
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
    if order[0] != order[1] && endpoints[order[1]].load.cost() < endpoints[order[0]].load.cost() {
        order.swap(0, 1);
    }
    // The two chosen first, then every endpoint, as a last resort.
    let scan = order.into_iter().chain((0..count).map(|i| (i + order[0]) % count));
    let reachable = |member: &&Arc<Member>| !unreachable.contains(&member.addr());
    scan.map(|i| &endpoints[i]).filter(reachable).filter(|e| e.health.is_available(now)).find_map(|endpoint| {
        match endpoint.health.admit(now) {
            Admission::Closed => None,
            admission => Some((endpoint.clone(), admission)),
        }
    })
}

/// One call on its way to an endpoint: counts it in flight, and reports its
/// outcome to outlier detection once known. Dropped without an outcome (the
/// caller went away), it reports nothing and frees a probe's turn.
pub struct Report {
    endpoint: Arc<Member>,
    outliers: Arc<Outliers>,
    probe: bool,
    started: Instant,
    reported: bool,
}

impl Report {
    pub fn start(endpoint: Arc<Member>, outliers: Arc<Outliers>, admission: Admission) -> Report {
        endpoint.load.in_flight.fetch_add(1, Ordering::Relaxed);
        Report { endpoint, outliers, probe: admission == Admission::Probe, started: Instant::now(), reported: false }
    }

    /// The response headers arrived: the round trip is measured here.
    pub fn responded(&self) {
        self.endpoint.load.observe(self.started.elapsed(), Instant::now());
    }

    pub fn finish(mut self, outcome: Outcome) {
        self.endpoint.health.record(outcome, Instant::now(), &self.outliers);
        self.reported = true;
    }

    pub fn finish_with_status(self, code: Code) {
        let outcome = self.outliers.config().outcome_of(code);
        self.finish(outcome);
    }
}

/// A streamed response reports when it ends: its status, or a failure.
impl EndOfCall for Report {
    fn ended(self: Box<Self>, status: Option<Code>) {
        match status {
            Some(code) => (*self).finish_with_status(code),
            None => (*self).finish(Outcome::Failure),
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
        if self.probe && !self.reported {
            self.endpoint.health.abandon_probe();
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
        assert_eq!(load.cost(), 100e6);
        load.observe(Duration::from_millis(1), now + DECAY);
        let decayed = load.cost();
        assert!(decayed < 100e6 && decayed > 30e6, "one time constant keeps about 37%: {decayed}");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_raise_the_cost() {
        let load = Load::default();
        let idle = load.cost();
        load.in_flight.fetch_add(3, Ordering::Relaxed);
        assert_eq!(load.cost(), idle * 4.0);
    }
}
