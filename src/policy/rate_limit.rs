//! Rate limits, applied by the inbound sidecar, where callers are known: a
//! token bucket per method for all its callers together (`rate_limit`), and
//! one per caller identity (`caller_rate_limit`), so that one busy caller
//! cannot spend the others' share. A call over a limit is refused at once
//! with RESOURCE_EXHAUSTED and `grpc-retry-pushback-ms` (when the next token
//! comes), naming the limit and where it was set.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::Service;

use super::fields::PolicyValue;
use super::kept::{Families, KeptState, Labelled, NamedFamilies};
use crate::call::{CallService, Caller, PolicyError, ProxyError, ResponseBody};
use crate::grpc::Code;
use crate::identity::SpiffeId;

/// Caller buckets kept at once; past it, full ones (the same as new) are let go.
const CALLERS_KEPT: usize = 10_000;

/// A token bucket's size and refill.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicy {
    /// Calls per second, sustained.
    pub per_second: f64,
    /// Calls that may come at once beyond the rate; by default a second's worth.
    #[serde(default)]
    pub burst: Option<u32>,
}

impl RateLimitPolicy {
    pub fn new(per_second: f64, burst: Option<u32>) -> RateLimitPolicy {
        RateLimitPolicy { per_second, burst }
    }

    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or_else(|| self.per_second.ceil() as u32).max(1)
    }

    /// What identifies a bucket's settings, for keeping it across reloads.
    fn key(&self) -> (u64, u32) {
        (self.per_second.to_bits(), self.burst())
    }
}

// Rates compare by their bits: validation leaves no NaN, so equality is an
// equivalence, and a bucket is kept while its rate and effective burst stay.
impl PartialEq for RateLimitPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for RateLimitPolicy {}

impl Hash for RateLimitPolicy {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RateLimitLabels {
    limit: String,
}

/// The rate limits' metric family: refusals by limit.
#[derive(Default)]
pub struct RateLimitFamilies {
    rate_limited: Family<RateLimitLabels, Counter>,
}

impl Families for RateLimitFamilies {
    fn register(&self, registry: &mut Registry) {
        registry.register("rate_limited", "Calls refused by a rate limit, by limit", self.rate_limited.clone());
    }
}

impl NamedFamilies for RateLimitFamilies {
    type Handles = Counter;

    fn handles(&self, label: &str) -> Counter {
        self.rate_limited.get_or_create_owned(&RateLimitLabels { limit: label.to_string() })
    }
}

impl PolicyValue for RateLimitPolicy {
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::deserialize(d)
    }

    fn validate(&self) -> Result<(), String> {
        if !(self.per_second.is_finite() && self.per_second > 0.0) {
            return Err("per_second: a rate above 0, e.g. 100 or 0.5".into());
        }
        if self.burst == Some(0) {
            return Err("burst: at least 1".into());
        }
        Ok(())
    }

    fn show(&self) -> (Value, String) {
        (json!({ "per_second": self.per_second, "burst": self.burst() }), self.to_string())
    }
}

impl fmt::Display for RateLimitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} calls/s, burst {}", self.per_second, self.burst())
    }
}

/// One token bucket: full at first, refilled at the rate up to the burst.
#[derive(Debug)]
pub struct TokenBucket {
    policy: RateLimitPolicy,
    /// Tokens left and when they were counted.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(policy: &RateLimitPolicy) -> TokenBucket {
        let full = f64::from(policy.burst());
        TokenBucket { policy: policy.clone(), state: Mutex::new((full, Instant::now())) }
    }

    /// Takes a token, or says how long until the next one comes.
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.policy.burst());
        let mut state = self.state.lock().expect("token bucket lock");
        let (tokens, counted) = *state;
        let tokens =
            (tokens + now.saturating_duration_since(counted).as_secs_f64() * self.policy.per_second).min(burst);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            return Ok(());
        }
        *state = (tokens, now);
        Err(Duration::from_secs_f64((1.0 - tokens) / self.policy.per_second))
    }

    /// Whether a token is there to take, taking none.
    pub fn has_token(&self, now: Instant) -> bool {
        let (tokens, counted) = *self.state.lock().expect("token bucket lock");
        tokens + now.saturating_duration_since(counted).as_secs_f64() * self.policy.per_second >= 1.0
    }

    fn is_full(&self, now: Instant) -> bool {
        let (tokens, counted) = *self.state.lock().expect("token bucket lock");
        tokens + now.saturating_duration_since(counted).as_secs_f64() * self.policy.per_second
            >= f64::from(self.policy.burst())
    }
}

/// A method's limit for all its callers together: one bucket.
#[derive(Debug)]
pub struct MethodLimit {
    /// The limit in messages: what it limits and where it was set.
    label: Labelled<RateLimitFamilies>,
    bucket: TokenBucket,
}

impl KeptState for MethodLimit {
    type Settings = RateLimitPolicy;
    type Families = RateLimitFamilies;

    fn new(policy: &RateLimitPolicy, label: Labelled<RateLimitFamilies>) -> MethodLimit {
        MethodLimit { label, bucket: TokenBucket::new(policy) }
    }

    fn label(&self) -> &Labelled<RateLimitFamilies> {
        &self.label
    }
}

impl MethodLimit {
    fn take(&self, now: Instant) -> Result<(), RateLimited> {
        self.bucket.take(now).map_err(|wait| {
            let label = self.label.get();
            label.metrics.inc();
            RateLimited { limit: label.name.to_string(), policy: self.bucket.policy.clone(), pushback: wait }
        })
    }
}

/// A method's limit for each caller: a bucket per caller identity, made on
/// the caller's first call.
#[derive(Debug)]
pub struct CallerBuckets {
    label: Labelled<RateLimitFamilies>,
    policy: RateLimitPolicy,
    by_caller: Mutex<HashMap<SpiffeId, Arc<TokenBucket>>>,
}

impl KeptState for CallerBuckets {
    type Settings = RateLimitPolicy;
    type Families = RateLimitFamilies;

    fn new(policy: &RateLimitPolicy, label: Labelled<RateLimitFamilies>) -> CallerBuckets {
        CallerBuckets { label, policy: policy.clone(), by_caller: Mutex::default() }
    }

    fn label(&self) -> &Labelled<RateLimitFamilies> {
        &self.label
    }
}

impl CallerBuckets {
    fn bucket(&self, caller: &SpiffeId, now: Instant) -> Arc<TokenBucket> {
        let mut buckets = self.by_caller.lock().expect("caller buckets lock");
        if let Some(bucket) = buckets.get(caller) {
            return bucket.clone();
        }
        if buckets.len() >= CALLERS_KEPT {
            buckets.retain(|_, bucket| !bucket.is_full(now));
        }
        let bucket = Arc::new(TokenBucket::new(&self.policy));
        buckets.insert(caller.clone(), bucket.clone());
        bucket
    }

    fn take(&self, caller: &SpiffeId, now: Instant) -> Result<(), RateLimited> {
        self.bucket(caller, now).take(now).map_err(|wait| {
            // A caller's refusals count under their method's limit.
            let label = self.label.get();
            label.metrics.inc();
            let limit = format!("{} for caller {caller}", label.name);
            RateLimited { limit, policy: self.policy.clone(), pushback: wait }
        })
    }
}

/// A call over a rate limit.
#[derive(Debug, PartialEq)]
pub struct RateLimited {
    pub limit: String,
    pub policy: RateLimitPolicy,
    pub pushback: Duration,
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rate limit {} exceeded: {}", self.limit, self.policy)
    }
}

impl std::error::Error for RateLimited {}

impl PolicyError for RateLimited {
    fn code(&self) -> Code {
        Code::ResourceExhausted
    }

    fn reason(&self) -> &'static str {
        "rate_limited"
    }

    fn pushback(&self) -> Option<Duration> {
        Some(self.pushback)
    }
}

/// Takes a token from the caller's bucket, then from the method's, before
/// the call goes on.
#[derive(Clone)]
pub struct RateLimits<S> {
    inner: S,
    method: Option<Arc<MethodLimit>>,
    callers: Option<Arc<CallerBuckets>>,
}

impl<S> RateLimits<S> {
    pub fn new(method: Option<Arc<MethodLimit>>, callers: Option<Arc<CallerBuckets>>, inner: S) -> Self {
        RateLimits { inner, method, callers }
    }

    fn admit<B>(&self, request: &Request<B>) -> Result<(), RateLimited> {
        let now = Instant::now();
        // A caller without a certificate (gRPC-Web) has no bucket of its
        // own: the method's limit bounds such callers together.
        if let Some(callers) = &self.callers
            && let Some(id) = request.extensions().get::<Caller>().and_then(|caller| caller.id.as_ref())
        {
            callers.take(id, now)?;
        }
        match &self.method {
            Some(method) => method.take(now),
            None => Ok(()),
        }
    }
}

impl<S, B> Service<Request<B>> for RateLimits<S>
where
    S: CallService<B>,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = Either<Ready<Result<Response<ResponseBody>, ProxyError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.admit(&request) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(limited) => Either::Left(ready(Err(limited.into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::call::CallFuture;

    fn bucket(per_second: f64, burst: Option<u32>) -> Arc<MethodLimit> {
        let label = Labelled::new(Arc::default(), "method /t.T/M (config)".into());
        Arc::new(MethodLimit::new(&RateLimitPolicy::new(per_second, burst), label))
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_gives_its_burst_then_its_rate_and_says_when_to_come_back() {
        let bucket = bucket(10.0, Some(3));
        let now = Instant::now();
        for _ in 0..3 {
            bucket.take(now).unwrap();
        }
        let limited = bucket.take(now).unwrap_err();
        assert_eq!(limited.pushback, Duration::from_millis(100), "one token every 100 ms");
        assert_eq!(limited.to_string(), "rate limit method /t.T/M (config) exceeded: 10 calls/s, burst 3");
        bucket.take(now + Duration::from_millis(100)).unwrap();
        assert!(bucket.take(now + Duration::from_millis(150)).is_err());
        // Ten seconds idle refill it to the burst, no more.
        let later = now + Duration::from_secs(10);
        for _ in 0..3 {
            bucket.take(later).unwrap();
        }
        assert!(bucket.take(later).is_err());
    }

    fn ok() -> impl CallService<()> + Clone {
        tower::service_fn(|_: Request<()>| -> CallFuture {
            Box::pin(async { Ok(Response::new(ResponseBody::empty())) })
        })
    }

    fn from(caller: &str) -> Request<()> {
        let mut request = Request::new(());
        let id = SpiffeId::parse(&format!("spiffe://td/ns/x/sa/{caller}")).unwrap();
        request.extensions_mut().insert(Caller { id: Some(id), address: "127.0.0.1:1".parse().unwrap() });
        request
    }

    #[tokio::test(start_paused = true)]
    async fn each_caller_has_a_bucket_of_its_own_and_the_method_one_for_all() {
        let policy = RateLimitPolicy::new(1.0, Some(2));
        let label = Labelled::new(Arc::default(), "method /t.T/M per caller (config)".into());
        let callers = Arc::new(CallerBuckets::new(&policy, label));
        let layer = RateLimits::new(Some(bucket(1.0, Some(3))), Some(callers), ok());
        for _ in 0..2 {
            layer.clone().oneshot(from("a")).await.unwrap();
        }
        let refused = layer.clone().oneshot(from("a")).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.to_string().contains("for caller spiffe://td/ns/x/sa/a"), "{refused}");
        layer.clone().oneshot(from("b")).await.expect("another caller has its own share");
        let refused = layer.clone().oneshot(from("b")).await.unwrap_err();
        assert!(
            refused.to_string().starts_with("rate limit method /t.T/M (config) exceeded"),
            "the method's is spent: {refused}"
        );
    }

    #[test]
    fn bad_rates_are_named() {
        assert!(RateLimitPolicy::new(0.0, None).validate().unwrap_err().starts_with("per_second"));
        assert!(RateLimitPolicy::new(f64::NAN, None).validate().is_err());
        assert!(RateLimitPolicy::new(5.0, Some(0)).validate().unwrap_err().starts_with("burst"));
        assert_eq!(RateLimitPolicy::new(2.5, None).burst(), 3, "a second's worth, rounded up");
    }
}
