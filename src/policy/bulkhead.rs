//! Bulkheads: at most `max_in_flight` calls at once, up to `max_queue` more
//! waiting at most `queue_timeout`, and every other call refused at once with
//! RESOURCE_EXHAUSTED and `grpc-retry-pushback-ms`. Each method has its own,
//! so one saturated method cannot starve the others; upstreams (outbound) and
//! caller identities (inbound) can have one across all their methods. A
//! place is held until the response stream ends. A bulkhead is kept across
//! reloads while its limits stay, its calls in flight holding their places.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Service, ServiceExt};

use super::fields::PolicyValue;
use super::kept::{Families, KeptState, Labelled, NamedFamilies};
use crate::call::{CallEnd, CallFuture, CallService, EndOfCall, PolicyError, ProxyError, ResponseBody};
use crate::duration;
use crate::grpc::Code;
use crate::identity::SpiffeId;

/// A bulkhead's limits: calls in flight at once, and how many may wait, for how long.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyPolicy {
    pub max_in_flight: u32,
    #[serde(default)]
    pub max_queue: u32,
    #[serde(default = "default_queue_timeout", deserialize_with = "duration::deserialize")]
    pub queue_timeout: Duration,
}

fn default_queue_timeout() -> Duration {
    Duration::from_millis(100)
}

impl ConcurrencyPolicy {
    /// No queue by default: a full bulkhead refuses at once.
    pub fn new(max_in_flight: u32) -> ConcurrencyPolicy {
        ConcurrencyPolicy { max_in_flight, max_queue: 0, queue_timeout: default_queue_timeout() }
    }
}

impl PolicyValue for ConcurrencyPolicy {
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::deserialize(d)
    }

    fn validate(&self) -> Result<(), String> {
        if self.max_in_flight == 0 {
            return Err("max_in_flight: must be at least 1".into());
        }
        Ok(())
    }

    fn show(&self) -> (Value, String) {
        let json = json!({
            "max_in_flight": self.max_in_flight,
            "max_queue": self.max_queue,
            "queue_timeout": format!("{:?}", self.queue_timeout),
        });
        let text = format!("{} in flight, queue {} for {:?}", self.max_in_flight, self.max_queue, self.queue_timeout);
        (json, text)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BulkheadLabels {
    bulkhead: String,
}

/// The bulkheads' metric families.
#[derive(Default)]
pub struct BulkheadFamilies {
    rejections: Family<BulkheadLabels, Counter>,
    queue_depth: Family<BulkheadLabels, Gauge>,
}

impl Families for BulkheadFamilies {
    fn register(&self, registry: &mut Registry) {
        let help = "Calls a full bulkhead refused with RESOURCE_EXHAUSTED";
        registry.register("bulkhead_rejections", help, self.rejections.clone());
        registry.register("bulkhead_queue_depth", "Calls waiting for a bulkhead place", self.queue_depth.clone());
    }
}

impl NamedFamilies for BulkheadFamilies {
    type Handles = BulkheadMetrics;

    fn handles(&self, label: &str) -> BulkheadMetrics {
        let labels = BulkheadLabels { bulkhead: label.to_string() };
        BulkheadMetrics {
            rejected: self.rejections.get_or_create_owned(&labels),
            queue_depth: self.queue_depth.get_or_create_owned(&labels),
        }
    }
}

/// How a bulkhead reports what it does.
#[derive(Clone, Debug, Default)]
pub struct BulkheadMetrics {
    pub rejected: Counter,
    pub queue_depth: Gauge,
}

#[derive(Debug)]
pub struct Bulkhead {
    /// Names the bulkhead in refusals, e.g. `method /pkg.S/M (config policy.defaults)`.
    label: Labelled<BulkheadFamilies>,
    pub limits: ConcurrencyPolicy,
    places: Arc<Semaphore>,
    queued: AtomicUsize,
}

/// Counts a waiting call, and uncounts it however the wait ends.
struct Waiting<'a>(&'a Bulkhead, Gauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
        self.1.dec();
    }
}

impl KeptState for Bulkhead {
    type Settings = ConcurrencyPolicy;
    type Families = BulkheadFamilies;

    fn new(limits: &ConcurrencyPolicy, label: Labelled<BulkheadFamilies>) -> Bulkhead {
        Bulkhead {
            label,
            places: Arc::new(Semaphore::new(limits.max_in_flight as usize)),
            limits: limits.clone(),
            queued: AtomicUsize::new(0),
        }
    }

    fn label(&self) -> &Labelled<BulkheadFamilies> {
        &self.label
    }
}

impl Bulkhead {
    /// Calls waiting for a place now.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Calls holding a place now.
    pub fn in_flight(&self) -> usize {
        self.limits.max_in_flight as usize - self.places.available_permits()
    }

    pub async fn enter(&self) -> Result<Place, BulkheadFull> {
        if let Ok(place) = self.places.clone().try_acquire_owned() {
            return Ok(Place { _permit: place });
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.limits.max_queue as usize {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            let (in_flight, queue) = (self.limits.max_in_flight, self.limits.max_queue);
            return Err(self.refuse(format!("{in_flight} calls in flight and {queue} waiting")));
        }
        let queue_depth = self.label.get().metrics.queue_depth.clone();
        queue_depth.inc();
        let _waiting = Waiting(self, queue_depth);
        match tokio::time::timeout(self.limits.queue_timeout, self.places.clone().acquire_owned()).await {
            Ok(Ok(place)) => Ok(Place { _permit: place }),
            _ => Err(self.refuse(format!("no place freed within queue_timeout {:?}", self.limits.queue_timeout))),
        }
    }

    fn refuse(&self, why: String) -> BulkheadFull {
        let label = self.label.get();
        label.metrics.rejected.inc();
        BulkheadFull { bulkhead: label.name.to_string(), why, pushback: self.limits.queue_timeout }
    }
}

/// One bulkhead per caller identity, made on the caller's first call.
#[derive(Debug)]
pub struct CallerBulkheads {
    label: Labelled<BulkheadFamilies>,
    limits: ConcurrencyPolicy,
    by_caller: Mutex<HashMap<SpiffeId, Arc<Bulkhead>>>,
}

impl KeptState for CallerBulkheads {
    type Settings = ConcurrencyPolicy;
    type Families = BulkheadFamilies;

    fn new(limits: &ConcurrencyPolicy, label: Labelled<BulkheadFamilies>) -> CallerBulkheads {
        CallerBulkheads { label, limits: limits.clone(), by_caller: Mutex::default() }
    }

    fn label(&self) -> &Labelled<BulkheadFamilies> {
        &self.label
    }
}

impl CallerBulkheads {
    pub fn of(&self, caller: &SpiffeId) -> Arc<Bulkhead> {
        let mut bulkheads = self.by_caller.lock().expect("caller bulkheads lock");
        bulkheads
            .entry(caller.clone())
            .or_insert_with(|| {
                let name = format!("caller {caller} (config policy.caller_concurrency)");
                let families = self.label.families().clone();
                Arc::new(Bulkhead::new(&self.limits, Labelled::new(families, name.into())))
            })
            .clone()
    }
}

/// A place in a bulkhead, given back when the call ends (or is abandoned).
#[derive(Debug)]
pub struct Place {
    _permit: OwnedSemaphorePermit,
}

impl EndOfCall for Place {
    fn ended(self: Box<Self>, _: CallEnd) {}
}

/// A bulkhead refused the call; `pushback` is the advice to the client.
#[derive(Debug, PartialEq, Eq)]
pub struct BulkheadFull {
    pub bulkhead: String,
    pub why: String,
    pub pushback: Duration,
}

impl fmt::Display for BulkheadFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bulkhead {} is full: {}", self.bulkhead, self.why)
    }
}

impl std::error::Error for BulkheadFull {}

impl PolicyError for BulkheadFull {
    fn code(&self) -> Code {
        Code::ResourceExhausted
    }

    fn reason(&self) -> &'static str {
        "overloaded"
    }

    fn pushback(&self) -> Option<Duration> {
        Some(self.pushback)
    }
}

/// The bulkhead of the caller of an inbound call, put on the request by the
/// inbound edge: one caller's calls share it across methods.
#[derive(Clone, Debug)]
pub struct CallerBulkhead(pub Arc<Bulkhead>);

/// Takes a place in the method's bulkhead and in the one shared beyond it
/// (the upstream's, or the caller's from the request), in that order.
#[derive(Clone)]
pub struct Bulkheads<S> {
    inner: S,
    method: Option<Arc<Bulkhead>>,
    shared: Option<Arc<Bulkhead>>,
}

impl<S> Bulkheads<S> {
    pub fn new(method: Option<Arc<Bulkhead>>, shared: Option<Arc<Bulkhead>>, inner: S) -> Self {
        Bulkheads { inner, method, shared }
    }
}

impl<S, B> Service<Request<B>> for Bulkheads<S>
where
    B: Send + 'static,
    S: CallService<B> + Clone + Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let caller = request.extensions().get::<CallerBulkhead>().map(|c| c.0.clone());
        let bulkheads = [self.method.clone(), self.shared.clone().or(caller)];
        if bulkheads.iter().all(Option::is_none) {
            return Box::pin(self.inner.call(request));
        }
        // The ready clone serves this call once the places are held.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(async move {
            let mut places = Vec::with_capacity(2);
            for bulkhead in bulkheads.iter().flatten() {
                places.push(bulkhead.enter().await?);
            }
            let mut response = inner.ready().await?.call(request).await?;
            for place in places {
                response.body_mut().on_end(Box::new(place));
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    fn bulkhead(max_in_flight: u32, max_queue: u32, queue_timeout_ms: u64) -> Bulkhead {
        let limits =
            ConcurrencyPolicy { max_in_flight, max_queue, queue_timeout: Duration::from_millis(queue_timeout_ms) };
        Bulkhead::new(&limits, Labelled::new(Arc::default(), "method /t.T/M".into()))
    }

    #[tokio::test]
    async fn a_renamed_bulkhead_keeps_its_places_and_refuses_and_counts_under_its_new_name() {
        let bulkhead = bulkhead(1, 0, 50);
        let _held = bulkhead.enter().await.unwrap();
        assert!(bulkhead.label().rename("method /t.T/M (contract)".into()));
        assert!(!bulkhead.label().rename("method /t.T/M (contract)".into()), "the same name is no change");
        let refused = bulkhead.enter().await.unwrap_err();
        assert_eq!(refused.bulkhead, "method /t.T/M (contract)");
        let families = bulkhead.label().families();
        assert_eq!(families.handles("method /t.T/M (contract)").rejected.get(), 1);
        assert_eq!(families.handles("method /t.T/M").rejected.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bulkhead_without_a_queue_refuses_at_once() {
        let bulkhead = bulkhead(2, 0, 50);
        let _a = bulkhead.enter().await.unwrap();
        let _b = bulkhead.enter().await.unwrap();
        let started = Instant::now();
        let refused = bulkhead.enter().await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(refused.bulkhead, "method /t.T/M");
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(refused.pushback(), Some(Duration::from_millis(50)));
        assert_eq!(bulkhead.label.get().metrics.rejected.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_takes_the_next_free_place() {
        let bulkhead = Arc::new(bulkhead(1, 1, 1000));
        let held = bulkhead.enter().await.unwrap();
        let waiter = tokio::spawn({
            let bulkhead = bulkhead.clone();
            async move { bulkhead.enter().await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!((bulkhead.queue_depth(), bulkhead.label.get().metrics.queue_depth.get()), (1, 1));
        drop(held);
        waiter.await.unwrap().unwrap();
        assert_eq!((bulkhead.queue_depth(), bulkhead.label.get().metrics.queue_depth.get()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_gives_up_after_the_queue_timeout() {
        let bulkhead = bulkhead(1, 4, 50);
        let _held = bulkhead.enter().await.unwrap();
        let started = Instant::now();
        let refused = bulkhead.enter().await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        assert!(refused.to_string().contains("queue_timeout"), "{refused}");
        assert_eq!(bulkhead.queue_depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_leaves_the_queue() {
        let bulkhead = bulkhead(1, 1, 1000);
        let _held = bulkhead.enter().await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(5), bulkhead.enter()).await;
        assert!(waiting.is_err());
        assert_eq!(bulkhead.queue_depth(), 0);
    }

    #[tokio::test]
    async fn the_layer_holds_its_places_until_the_response_body_ends() {
        let method = Arc::new(bulkhead(1, 0, 10));
        let caller = Arc::new(bulkhead(5, 0, 10));
        let service = tower::service_fn(|_: Request<()>| async { Ok(Response::new(ResponseBody::empty())) });
        let layer = Bulkheads::new(Some(method.clone()), None, service);
        let mut request = Request::new(());
        request.extensions_mut().insert(CallerBulkhead(caller.clone()));
        let response = layer.clone().oneshot(request).await.unwrap();
        assert_eq!((method.in_flight(), caller.in_flight()), (1, 1), "the caller's bulkhead comes from the request");
        let refused = layer.clone().oneshot(Request::new(())).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.to_string().starts_with("bulkhead method /t.T/M is full"), "{refused}");
        drop(response);
        assert_eq!((method.in_flight(), caller.in_flight()), (0, 0));
        layer.oneshot(Request::new(())).await.unwrap();
    }
}
