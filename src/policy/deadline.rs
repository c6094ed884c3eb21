//! Deadlines: the caller's `grpc-timeout` and the method's timeout, whichever
//! ends first. A budget below the floor fails at once; a call still running at
//! its deadline is cancelled upstream and answered DEADLINE_EXCEEDED, before
//! or after its response headers. Each hop forwards the remaining budget
//! (the forwarders write it just before sending). Streaming responses can
//! also end after `idle_timeout` without a message.

use std::fmt;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::Service;

use super::CallContext;
use super::method::{MethodPolicy, Source};
use crate::grpc;
use crate::proxy::body::ResponseBody;
use crate::proxy::error::{CallFuture, CallService, Direction, ProxyError};

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

/// The call's budget: the shorter of the caller's and the policy's, if any.
pub fn budget<B>(
    request: &Request<B>,
    policy: &MethodPolicy,
) -> Result<Option<(Duration, DeadlineOrigin)>, ProxyError> {
    let caller = match request.headers().get(grpc::GRPC_TIMEOUT) {
        None => None,
        Some(value) => Some(grpc::parse_timeout(value.as_bytes()).ok_or_else(|| ProxyError::MalformedTimeout {
            value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        })?),
    };
    let own = [("timeout", &policy.timeout), ("stream_timeout", &policy.stream_timeout)].into_iter().find_map(
        |(field, value)| value.as_ref().map(|v| (v.value, DeadlineOrigin::Policy { field, source: v.source.clone() })),
    );
    Ok(match (caller, own) {
        (Some(caller), Some((own, origin))) if own < caller => Some((own, origin)),
        (Some(caller), _) => Some((caller, DeadlineOrigin::Caller)),
        (None, own) => own,
    })
}

#[derive(Clone)]
pub struct Deadlines<S> {
    inner: S,
    min_budget: Duration,
    direction: Direction,
}

impl<S> Deadlines<S> {
    pub fn new(min_budget: Duration, direction: Direction, inner: S) -> Self {
        Deadlines { inner, min_budget, direction }
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
        let direction = self.direction;
        let policy = CallContext::of(&request).policy.clone();
        let idle = policy.policy.idle_timeout.clone();
        let budget = match budget(&request, &policy.policy) {
            Ok(budget) => budget,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        let deadline = match budget {
            Some((budget, origin)) if budget < self.min_budget => {
                let error = ProxyError::BudgetTooSmall { budget, floor: self.min_budget, origin };
                return Box::pin(std::future::ready(Err(error)));
            }
            Some((budget, origin)) => {
                let at = Instant::now() + budget;
                request.extensions_mut().get_mut::<CallContext>().expect("admission sets the call context").deadline =
                    Some(at);
                Some((at, budget, origin))
            }
            None => None,
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let mut response = match &deadline {
                Some((at, budget, origin)) => match tokio::time::timeout_at(*at, call).await {
                    Ok(response) => response?,
                    Err(_) => {
                        policy.counters.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
                        return Err(ProxyError::DeadlineExceeded { budget: *budget, origin: origin.clone() });
                    }
                },
                None => call.await?,
            };
            if let Some((at, budget, origin)) = deadline {
                let exceeded = ProxyError::DeadlineExceeded { budget, origin };
                response.body_mut().end_at(at, exceeded, direction, policy.clone());
            }
            if let Some(idle) = idle {
                let error = ProxyError::IdleTimeout { after: idle.value, source: idle.source };
                response.body_mut().end_when_idle(idle.value, error, direction, policy);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyConfig;
    use crate::policy::CallPolicy;
    use crate::policy::method::PolicyFields;
    use std::sync::Arc;
    use tower::ServiceExt;

    /// A call to `s.S/M` whose policy has `timeout`, with `grpc-timeout` if given.
    fn call(timeout: Option<u64>, grpc_timeout: Option<&str>) -> Request<()> {
        let mut config = PolicyConfig::default();
        let fields = PolicyFields { timeout: timeout.map(Duration::from_millis), ..Default::default() };
        config.methods.insert("s.S/M".into(), fields);
        let info = crate::contract::MethodInfo {
            service: "s.S".into(),
            method: "M".into(),
            path: "/s.S/M".into(),
            shape: crate::contract::CallShape::Unary,
            idempotency: crate::contract::Idempotency::Unknown,
            contract: Default::default(),
            file: "s.proto".into(),
        };
        let metrics = Arc::new(crate::telemetry::Metrics::default());
        let policy = Arc::new(CallPolicy::new("s.S", "M", Some(&info), &config, &metrics, Direction::Outbound));
        let mut request = Request::new(());
        if let Some(value) = grpc_timeout {
            request.headers_mut().insert("grpc-timeout", value.parse().unwrap());
        }
        request.extensions_mut().insert(CallContext::new(policy, None, Default::default()));
        request
    }

    /// A backend that answers after `delay` and reports the deadline it was given.
    fn backend(
        delay: Duration,
    ) -> impl Service<Request<()>, Response = Response<ResponseBody>, Error = ProxyError, Future: Send + 'static> + Clone
    {
        tower::service_fn(move |request: Request<()>| async move {
            let deadline = CallContext::of(&request).deadline;
            tokio::time::sleep(delay).await;
            let mut response = Response::new(ResponseBody::empty());
            response.extensions_mut().insert(deadline);
            Ok(response)
        })
    }

    #[test]
    fn the_shorter_budget_wins_and_says_where_it_came_from() {
        let policy = |request: &Request<()>| CallContext::of(request).policy.policy.clone();
        let request = call(Some(300), Some("10S"));
        let (budget_, origin) = budget(&request, &policy(&request)).unwrap().unwrap();
        assert_eq!(budget_, Duration::from_millis(300));
        assert!(matches!(origin, DeadlineOrigin::Policy { field: "timeout", .. }));
        let request = call(Some(300), Some("100m"));
        assert_eq!(
            budget(&request, &policy(&request)).unwrap(),
            Some((Duration::from_millis(100), DeadlineOrigin::Caller))
        );
        let request = call(None, None);
        assert_eq!(budget(&request, &policy(&request)).unwrap(), None);
        let request = call(None, Some("1.5S"));
        assert!(matches!(budget(&request, &policy(&request)), Err(ProxyError::MalformedTimeout { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_is_cut_at_the_deadline() {
        let layer = Deadlines::new(Duration::from_millis(1), Direction::Outbound, backend(Duration::from_secs(5)));
        let started = Instant::now();
        let request = call(Some(250), Some("10S"));
        let policy = CallContext::of(&request).policy.clone();
        let error = layer.oneshot(request).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        assert_eq!(policy.counters.deadline_exceeded.load(Ordering::Relaxed), 1);
        assert_eq!(error.code(), grpc::Code::DeadlineExceeded);
        assert_eq!(error.to_string(), "deadline of 250ms (timeout from config policy.methods[\"s.S/M\"]) exceeded");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_within_its_deadline_passes_the_deadline_down() {
        let layer = Deadlines::new(Duration::from_millis(1), Direction::Outbound, backend(Duration::from_millis(10)));
        let started = Instant::now();
        let response = layer.oneshot(call(None, Some("2S"))).await.unwrap();
        let deadline = response.extensions().get::<Option<Instant>>().copied().flatten();
        assert_eq!(deadline, Some(started + Duration::from_secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_below_the_floor_fails_without_calling() {
        let layer = Deadlines::new(Duration::from_millis(50), Direction::Inbound, backend(Duration::ZERO));
        let error = layer.oneshot(call(None, Some("20m"))).await.unwrap_err();
        assert!(matches!(error, ProxyError::BudgetTooSmall { .. }), "{error}");
    }
}
