//! Deadlines: the caller's `grpc-timeout` and the method's timeout, whichever
//! ends first. A budget below the floor fails at once; a call still running at
//! its deadline is cancelled upstream and answered DEADLINE_EXCEEDED, before
//! or after its response headers. Each hop forwards the remaining budget
//! (the forwarders write it just before sending). Streaming responses can
//! also end after `idle_timeout` without a message.

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::Service;

use super::CallContext;
use super::method::{MethodPolicy, Source};
use crate::grpc;
use crate::proxy::body::ResponseBody;
use crate::proxy::error::{Direction, ProxyError};

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
pub fn budget(
    request: &Request<Incoming>,
    policy: &MethodPolicy,
) -> Result<Option<(Duration, DeadlineOrigin)>, ProxyError> {
    let caller = match request.headers().get("grpc-timeout") {
        None => None,
        Some(value) => Some(
            grpc::parse_timeout(value.as_bytes()).ok_or_else(|| ProxyError::MalformedTimeout {
                value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
            })?,
        ),
    };
    let own = [("timeout", &policy.timeout), ("stream_timeout", &policy.stream_timeout)]
        .into_iter()
        .find_map(|(field, value)| {
            value.as_ref().map(|v| {
                (
                    v.value,
                    DeadlineOrigin::Policy {
                        field,
                        source: v.source.clone(),
                    },
                )
            })
        });
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
        Deadlines {
            inner,
            min_budget,
            direction,
        }
    }
}

impl<S> Service<Request<Incoming>> for Deadlines<S>
where
    S: Service<Request<Incoming>, Response = Response<ResponseBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<ResponseBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let direction = self.direction;
        let policy = CallContext::of(&request).policy.clone();
        let idle = policy.policy.idle_timeout.clone();
        let budget = match budget(&request, &policy.policy) {
            Ok(budget) => budget,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        let deadline = match budget {
            Some((budget, origin)) if budget < self.min_budget => {
                let error = ProxyError::BudgetTooSmall {
                    budget,
                    floor: self.min_budget,
                    origin,
                };
                return Box::pin(std::future::ready(Err(error)));
            }
            Some((budget, origin)) => {
                let at = Instant::now() + budget;
                request
                    .extensions_mut()
                    .get_mut::<CallContext>()
                    .expect("admission sets the call context")
                    .deadline = Some(at);
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
                        return Err(ProxyError::DeadlineExceeded {
                            budget: *budget,
                            origin: origin.clone(),
                        });
                    }
                },
                None => call.await?,
            };
            if let Some((at, budget, origin)) = deadline {
                response
                    .body_mut()
                    .end_at(at, ProxyError::DeadlineExceeded { budget, origin }, direction);
            }
            if let Some(idle) = idle {
                let error = ProxyError::IdleTimeout {
                    after: idle.value,
                    source: idle.source,
                };
                response.body_mut().end_when_idle(idle.value, error, direction);
            }
            Ok(response)
        })
    }
}
