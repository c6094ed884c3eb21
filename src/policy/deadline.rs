//! Deadlines: the caller's `grpc-timeout` and the method's timeout, whichever
//! ends first. A budget below the floor fails at once; a call still running at
//! its deadline is cancelled upstream and answered DEADLINE_EXCEEDED, before
//! or after its response headers. Streaming responses can also end after
//! `idle_timeout` without a message. Each hop forwards the remaining budget:
//! [`ForwardBudget`] writes it just before the call leaves, so that time spent
//! queued or between attempts is not given away twice.

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tower::Service;

use super::kept::{Families, MethodLabels};
use super::source::{Source, Sourced};
use crate::call::{CallFuture, CallService, Direction, Expiry, PolicyError, ProxyError, ResponseBody};
use crate::grpc::{self, Code};

/// Calls ended at their deadline, by method.
#[derive(Default)]
pub struct DeadlineFamilies {
    exceeded: Family<MethodLabels, Counter>,
}

impl Families for DeadlineFamilies {
    fn register(&self, registry: &mut Registry) {
        let help = "Calls the sidecar ended at their deadline or idle timeout";
        registry.register("deadline_exceeded", help, self.exceeded.clone());
    }
}

impl DeadlineFamilies {
    pub fn of(&self, direction: Direction, service: &str, method: &str) -> Counter {
        self.exceeded.get_or_create_owned(&MethodLabels::new(direction, service, method))
    }
}

/// A method's deadline policy, resolved once for one direction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeadlinePolicy {
    /// The method's own limit on the whole call, and the field that set it.
    pub limit: Option<(&'static str, Sourced<Duration>)>,
    /// The longest gap between two response messages.
    pub idle: Option<Sourced<Duration>>,
    /// Less budget than this fails at once.
    pub min_budget: Duration,
}

/// When the call must be over: put on the request by [`Deadlines`] for the
/// layers below (retries stop short of it, [`ForwardBudget`] passes it on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// Where a call's deadline came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeadlineOrigin {
    Caller,
    Policy { field: &'static str, source: Source },
}

impl fmt::Display for DeadlineOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadlineOrigin::Caller => f.write_str("the caller's grpc-timeout"),
            DeadlineOrigin::Policy { field, source } => write!(f, "{field} from {source}"),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum DeadlineError {
    Malformed { value: String },
    BelowFloor { budget: Duration, floor: Duration, origin: DeadlineOrigin },
    Exceeded { budget: Duration, origin: DeadlineOrigin },
    Idle { after: Duration, source: Source },
}

impl fmt::Display for DeadlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadlineError::Malformed { value } => write!(
                f,
                "malformed grpc-timeout header `{value}`: expected 1 to 8 digits and a unit (H, M, S, m, u, n)"
            ),
            DeadlineError::BelowFloor { budget, floor, origin } => {
                write!(f, "deadline budget {budget:?} ({origin}) is below policy.min_budget {floor:?}")
            }
            DeadlineError::Exceeded { budget, origin } => write!(f, "deadline of {budget:?} ({origin}) exceeded"),
            DeadlineError::Idle { after, source } => {
                write!(f, "no response message for {after:?} (idle_timeout from {source})")
            }
        }
    }
}

impl std::error::Error for DeadlineError {}

impl PolicyError for DeadlineError {
    fn code(&self) -> Code {
        match self {
            // As gRPC servers answer a malformed timeout.
            DeadlineError::Malformed { .. } => Code::Internal,
            _ => Code::DeadlineExceeded,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            DeadlineError::Malformed { .. } => "malformed_timeout",
            DeadlineError::BelowFloor { .. } => "budget_too_small",
            DeadlineError::Exceeded { .. } => "deadline_exceeded",
            DeadlineError::Idle { .. } => "idle_timeout",
        }
    }
}

impl DeadlinePolicy {
    /// The call's budget: the shorter of the caller's and the policy's, if any.
    pub fn budget<B>(&self, request: &Request<B>) -> Result<Option<(Duration, DeadlineOrigin)>, DeadlineError> {
        let caller = match request.headers().get(grpc::GRPC_TIMEOUT) {
            None => None,
            Some(value) => Some(grpc::parse_timeout(value.as_bytes()).ok_or_else(|| DeadlineError::Malformed {
                value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
            })?),
        };
        let own = self
            .limit
            .as_ref()
            .map(|(field, limit)| (limit.value, DeadlineOrigin::Policy { field, source: limit.source.clone() }));
        Ok(match (caller, own) {
            (Some(caller), Some((own, origin))) if own < caller => Some((own, origin)),
            (Some(caller), _) => Some((caller, DeadlineOrigin::Caller)),
            (None, own) => own,
        })
    }
}

#[derive(Clone)]
pub struct Deadlines<S> {
    inner: S,
    policy: std::sync::Arc<DeadlinePolicy>,
    /// Calls this layer ended at their deadline or idle timeout.
    exceeded: Counter,
}

impl<S> Deadlines<S> {
    pub fn new(policy: std::sync::Arc<DeadlinePolicy>, exceeded: Counter, inner: S) -> Self {
        Deadlines { inner, policy, exceeded }
    }
}

impl<S, B> Service<Request<B>> for Deadlines<S>
where
    S: CallService<B>,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let deadline = match self.policy.budget(&request) {
            Err(error) => return Box::pin(std::future::ready(Err(error.into()))),
            Ok(Some((budget, origin))) if budget < self.policy.min_budget => {
                let error = DeadlineError::BelowFloor { budget, floor: self.policy.min_budget, origin };
                return Box::pin(std::future::ready(Err(error.into())));
            }
            Ok(Some((budget, origin))) => {
                let at = Instant::now() + budget;
                request.extensions_mut().insert(Deadline(at));
                Some((at, budget, origin))
            }
            Ok(None) => None,
        };
        let (exceeded, idle) = (self.exceeded.clone(), self.policy.idle.clone());
        let call = self.inner.call(request);
        Box::pin(async move {
            let mut response = match &deadline {
                Some((at, budget, origin)) => match tokio::time::timeout_at(*at, call).await {
                    Ok(response) => response?,
                    Err(_) => {
                        exceeded.inc();
                        return Err(DeadlineError::Exceeded { budget: *budget, origin: origin.clone() }.into());
                    }
                },
                None => call.await?,
            };
            if let Some((at, budget, origin)) = deadline {
                let error = DeadlineError::Exceeded { budget, origin }.into();
                response.body_mut().end_at(at, Expiry { error, counter: exceeded.clone() });
            }
            if let Some(idle) = idle {
                let error = DeadlineError::Idle { after: idle.value, source: idle.source }.into();
                response.body_mut().end_when_idle(idle.value, Expiry { error, counter: exceeded });
            }
            Ok(response)
        })
    }
}

/// Writes the call's remaining budget as `grpc-timeout` just before the call
/// leaves this sidecar; sits at the bottom of both stacks.
#[derive(Clone)]
pub struct ForwardBudget<S> {
    inner: S,
}

impl<S> ForwardBudget<S> {
    pub fn new(inner: S) -> Self {
        ForwardBudget { inner }
    }
}

impl<S, B> Service<Request<B>> for ForwardBudget<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        if let Some(Deadline(at)) = request.extensions().get::<Deadline>().copied() {
            let remaining = at.saturating_duration_since(Instant::now());
            request.headers_mut().insert(grpc::GRPC_TIMEOUT, grpc::encode_timeout(remaining));
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tower::ServiceExt;

    use super::*;

    fn policy(timeout_ms: Option<u64>) -> Arc<DeadlinePolicy> {
        let source = Source::ConfigOverride("s.S/M".into());
        let limit = timeout_ms.map(|ms| ("timeout", Sourced { value: Duration::from_millis(ms), source }));
        Arc::new(DeadlinePolicy { limit, idle: None, min_budget: Duration::from_millis(1) })
    }

    fn call(grpc_timeout: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = grpc_timeout {
            request.headers_mut().insert("grpc-timeout", value.parse().unwrap());
        }
        request
    }

    /// A backend that answers after `delay` with the deadline and `grpc-timeout` it was given.
    fn backend(
        delay: Duration,
    ) -> impl Service<Request<()>, Response = Response<ResponseBody>, Error = ProxyError, Future: Send + 'static> + Clone
    {
        tower::service_fn(move |request: Request<()>| async move {
            let deadline = request.extensions().get::<Deadline>().copied();
            let forwarded = request.headers().get("grpc-timeout").cloned();
            tokio::time::sleep(delay).await;
            let mut response = Response::new(ResponseBody::empty());
            response.extensions_mut().insert((deadline, forwarded));
            Ok(response)
        })
    }

    fn layer<S>(policy: Arc<DeadlinePolicy>, inner: S) -> Deadlines<S> {
        Deadlines::new(policy, Counter::default(), inner)
    }

    #[test]
    fn the_shorter_budget_wins_and_says_where_it_came_from() {
        let (budget, origin) = policy(Some(300)).budget(&call(Some("10S"))).unwrap().unwrap();
        assert_eq!(budget, Duration::from_millis(300));
        assert!(matches!(origin, DeadlineOrigin::Policy { field: "timeout", .. }));
        let caller = policy(Some(300)).budget(&call(Some("100m"))).unwrap();
        assert_eq!(caller, Some((Duration::from_millis(100), DeadlineOrigin::Caller)));
        assert_eq!(policy(None).budget(&call(None)).unwrap(), None);
        let malformed = policy(None).budget(&call(Some("1.5S"))).unwrap_err();
        assert_eq!(malformed, DeadlineError::Malformed { value: "1.5S".into() });
        assert_eq!(malformed.code(), Code::Internal);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_is_cut_at_the_deadline_and_counted() {
        let counter = Counter::default();
        let deadlines = Deadlines::new(policy(Some(250)), counter.clone(), backend(Duration::from_secs(5)));
        let started = Instant::now();
        let error = deadlines.oneshot(call(Some("10S"))).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        assert_eq!(counter.get(), 1);
        assert_eq!(error.code(), Code::DeadlineExceeded);
        assert_eq!(error.to_string(), "deadline of 250ms (timeout from config policy.methods[\"s.S/M\"]) exceeded");
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_goes_down_and_the_remaining_budget_goes_on() {
        let started = Instant::now();
        let stack = layer(policy(None), ForwardBudget::new(backend(Duration::from_millis(10))));
        let response = stack.oneshot(call(Some("2S"))).await.unwrap();
        let (deadline, forwarded) =
            response.extensions().get::<(Option<Deadline>, Option<http::HeaderValue>)>().unwrap();
        assert_eq!(*deadline, Some(Deadline(started + Duration::from_secs(2))));
        assert_eq!(forwarded.as_ref().unwrap(), "2S");
    }

    #[tokio::test(start_paused = true)]
    async fn time_spent_above_the_forwarder_is_taken_off_the_budget() {
        let forward = ForwardBudget::new(backend(Duration::ZERO));
        let waits = tower::service_fn(move |request: Request<()>| {
            let forward = forward.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                forward.oneshot(request).await
            }
        });
        let response = layer(policy(None), waits).oneshot(call(Some("2S"))).await.unwrap();
        let (_, forwarded) = response.extensions().get::<(Option<Deadline>, Option<http::HeaderValue>)>().unwrap();
        assert_eq!(forwarded.as_ref().unwrap(), "1500m");
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_below_the_floor_fails_without_calling() {
        let floor = Arc::new(DeadlinePolicy { min_budget: Duration::from_millis(50), ..DeadlinePolicy::default() });
        let called = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = called.clone();
        let inner = tower::service_fn(move |_: Request<()>| {
            seen.store(true, std::sync::atomic::Ordering::Relaxed);
            std::future::ready(Ok::<_, ProxyError>(Response::new(ResponseBody::empty())))
        });
        let error = layer(floor, inner).oneshot(call(Some("20m"))).await.unwrap_err();
        assert!(matches!(error.policy::<DeadlineError>(), Some(DeadlineError::BelowFloor { .. })), "{error}");
        assert!(!called.load(std::sync::atomic::Ordering::Relaxed));
    }
}
