//! `protomesh tap`: live calls copied for whoever asks the admin server,
//! decoded there from the contracts. Nothing is copied while no one taps:
//! a call then costs one atomic load more. A tapped call's metadata and
//! messages are copied as they pass, within the tap's caps and a budget for
//! all taps; at its end the event is offered to each tap that wants it. A
//! tap that reads slowly, or asks for more events a second than its `rate`,
//! loses events, counted, and never holds a call up.
//!
//! `filter.rs` reads what a tap asks for, `capture.rs` copies one call,
//! `render.rs` turns its event into JSON with the messages decoded.

mod capture;
pub mod filter;
mod render;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::Service;

pub use capture::{COPY_BUDGET, Caps, Copied, Tapped};
pub use filter::TapFilter;
pub use render::{REDACTED, render};

use super::Metrics;
use super::observe::Logged;
use crate::call::{CallFuture, CallService, Caller, Direction, ProxyError, RecvBody, ResponseBody};
use crate::identity::SpiffeId;
use crate::policy::kept::Families;
use crate::policy::rate_limit::{RateLimitPolicy, TokenBucket};

/// The most taps at once.
pub const MAX_TAPS: usize = 16;
/// Events waiting for a tap's reader; past them, events are lost.
const QUEUE: usize = 64;

/// The taps of one sidecar.
pub struct Taps {
    /// How many taps there are: what every call checks.
    active: AtomicUsize,
    subscribers: Mutex<Vec<Arc<Subscriber>>>,
    /// The identity of this workload, the caller of its outbound calls.
    local: SpiffeId,
    /// Bytes copied and not yet let go of, by all taps.
    held: Arc<AtomicUsize>,
    families: Arc<TapFamilies>,
}

impl std::fmt::Debug for Taps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Taps").field("active", &self.active).finish()
    }
}

/// One tap: what it wants, and where its events go.
#[derive(Debug)]
pub struct Subscriber {
    filter: TapFilter,
    events: mpsc::Sender<Arc<Tapped>>,
    /// Events a second, a second's worth at once.
    bucket: TokenBucket,
    lost_to_rate: AtomicU64,
    lost_to_reader: AtomicU64,
    /// `protomesh_tap_events_dropped_total`, by reason.
    dropped_to_rate: Counter,
    dropped_to_reader: Counter,
}

impl Subscriber {
    /// Offers a finished call's event, if the tap wants its status: it is
    /// sent, or lost to the rate or to a reader behind.
    fn deliver(&self, event: &Arc<Tapped>) {
        if !self.filter.wants_status(event.status) {
            return;
        }
        if self.bucket.take(Instant::now()).is_err() {
            self.lost_to_rate();
        } else if self.events.try_send(event.clone()).is_err() {
            self.lost_to_reader.fetch_add(1, Ordering::Relaxed);
            self.dropped_to_reader.inc();
        }
    }

    /// Whether the tap has room for this call's event. A tap with no room,
    /// and no status to wait for, loses the call at its start, uncopied: at
    /// its rate, most calls of a busy sidecar cost nothing to tap.
    fn may_take(&self) -> bool {
        if !self.filter.statuses.is_empty() || self.bucket.has_token(Instant::now()) {
            return true;
        }
        self.lost_to_rate();
        false
    }

    fn lost_to_rate(&self) {
        self.lost_to_rate.fetch_add(1, Ordering::Relaxed);
        self.dropped_to_rate.inc();
    }
}

/// A tap while its reader keeps it: dropped, the tap ends.
pub struct Subscription {
    taps: Arc<Taps>,
    subscriber: Arc<Subscriber>,
    pub events: mpsc::Receiver<Arc<Tapped>>,
}

impl Subscription {
    pub fn filter(&self) -> &TapFilter {
        &self.subscriber.filter
    }

    /// Events lost since last asked: to the rate, and to a reader behind.
    pub fn lost(&self) -> (u64, u64) {
        (
            self.subscriber.lost_to_rate.swap(0, Ordering::Relaxed),
            self.subscriber.lost_to_reader.swap(0, Ordering::Relaxed),
        )
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subscribers = self.taps.subscribers.lock().expect("taps lock");
        subscribers.retain(|s| !Arc::ptr_eq(s, &self.subscriber));
        self.taps.active.store(subscribers.len(), Ordering::Release);
    }
}

impl Taps {
    pub fn new(local: SpiffeId, metrics: &Metrics) -> Arc<Taps> {
        Arc::new(Taps {
            active: AtomicUsize::new(0),
            subscribers: Mutex::default(),
            local,
            held: Arc::default(),
            families: metrics.families::<TapFamilies>(),
        })
    }

    /// Starts a tap; refused past [`MAX_TAPS`].
    pub fn subscribe(self: &Arc<Self>, filter: TapFilter) -> Result<Subscription, String> {
        let mut subscribers = self.subscribers.lock().expect("taps lock");
        if subscribers.len() >= MAX_TAPS {
            return Err(format!("{MAX_TAPS} taps are running, the most at once; stop one first"));
        }
        let (sender, events) = mpsc::channel(QUEUE);
        let dropped = |reason| self.families.dropped.get_or_create(&Lost { reason }).clone();
        let subscriber = Arc::new(Subscriber {
            bucket: TokenBucket::new(&RateLimitPolicy::new(f64::from(filter.rate), None)),
            filter,
            events: sender,
            lost_to_rate: AtomicU64::new(0),
            lost_to_reader: AtomicU64::new(0),
            dropped_to_rate: dropped("rate"),
            dropped_to_reader: dropped("slow_reader"),
        });
        subscribers.push(subscriber.clone());
        self.active.store(subscribers.len(), Ordering::Release);
        Ok(Subscription { taps: self.clone(), subscriber, events })
    }

    /// The capture of a call that some tap wants, with what it was sent.
    /// A call no tap wants costs the filters' checks, and no allocation.
    fn start(&self, direction: Direction, request: &mut Request<RecvBody>) -> Option<Arc<capture::Capture>> {
        let inbound_caller = request.extensions().get::<Caller>();
        let caller = match direction {
            Direction::Inbound => inbound_caller.and_then(|c| c.id.as_ref()),
            Direction::Outbound => Some(&self.local),
        };
        let path = request.uri().path();
        let wanting: Vec<Arc<Subscriber>> = {
            let subscribers = self.subscribers.lock().expect("taps lock");
            let wanted = subscribers.iter().filter(|s| s.filter.wants(direction, path, caller));
            wanted.filter(|s| s.may_take()).cloned().collect()
        };
        if wanting.is_empty() {
            return None;
        }
        let caps = Caps {
            max_bytes: wanting.iter().map(|s| s.filter.max_bytes).max().unwrap_or(0),
            max_messages: wanting.iter().map(|s| s.filter.max_messages).max().unwrap_or(0),
        };
        let start = capture::Start {
            subscribers: wanting,
            caps,
            direction,
            path: path.to_string(),
            caller: caller.cloned(),
            // Outbound, the endpoint that answers says so on the response.
            peer: inbound_caller.filter(|_| direction == Direction::Inbound).map(|c| c.address.to_string()),
            request_metadata: request.headers().clone(),
            budget: self.held.clone(),
        };
        request.extensions_mut().insert(Logged);
        let capture = capture::Capture::new(start);
        request.body_mut().watch(capture.request_watcher());
        Some(capture)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Lost {
    reason: &'static str,
}

/// What the taps count.
#[derive(Debug, Default)]
struct TapFamilies {
    dropped: Family<Lost, Counter>,
}

impl Families for TapFamilies {
    fn register(&self, registry: &mut Registry) {
        let help = "Tap events lost: past a tap's rate, or while its reader was behind";
        registry.register("tap_events_dropped", help, self.dropped.clone());
    }
}

/// The layer that copies a call for the taps that want it.
#[derive(Clone, Debug)]
pub struct Tap<S> {
    inner: S,
    taps: Arc<Taps>,
    direction: Direction,
}

impl<S> Tap<S> {
    pub fn new(taps: Arc<Taps>, direction: Direction, inner: S) -> Self {
        Tap { inner, taps, direction }
    }
}

impl<S> Service<Request<RecvBody>> for Tap<S>
where
    S: CallService<RecvBody>,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = Either<S::Future, CallFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RecvBody>) -> Self::Future {
        if self.taps.active.load(Ordering::Relaxed) == 0 {
            return Either::Left(self.inner.call(request));
        }
        let Some(capture) = self.taps.start(self.direction, &mut request) else {
            return Either::Left(self.inner.call(request));
        };
        let call = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let mut result = call.await;
            capture.answered(&mut result);
            result
        }))
    }
}
