//! What retries and hedging share: the retry budget both draw on, what one
//! attempt's outcome says about sending another, and each attempt's request,
//! built from a call kept whole and numbered.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tower::retry::budget::{Budget, TpsBudget};

use super::kept::{Families, MethodLabels};
use crate::call::{Attempt, Direction, ProxyError, RequestBody, ResponseBody};
use crate::grpc::{self, Code};

/// Retries may add at most `ratio` of the calls, plus `min_per_second`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetConfig {
    #[serde(default = "defaults::retry_ratio")]
    pub ratio: f64,
    #[serde(default = "defaults::min_retries_per_second")]
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig { ratio: defaults::retry_ratio(), min_per_second: defaults::min_retries_per_second() }
    }
}

impl RetryBudgetConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=10.0).contains(&self.ratio) {
            return Err("ratio: must be between 0 and 10, e.g. 0.2 for 20%".into());
        }
        Ok(())
    }
}

/// What the retries of an upstream's calls draw from, over a 10 s window.
#[derive(Clone, Debug)]
pub struct RetryBudget(Arc<TpsBudget>);

impl RetryBudget {
    pub fn new(config: &RetryBudgetConfig) -> RetryBudget {
        RetryBudget(Arc::new(TpsBudget::new(Duration::from_secs(10), config.min_per_second, config.ratio as f32)))
    }

    /// Counts a call, which earns its share of retries.
    pub fn deposit(&self) {
        self.0.deposit();
    }

    /// Takes one retry or hedge from the budget, if it has one.
    pub fn withdraw(&self) -> bool {
        self.0.withdraw()
    }
}

/// What the retries of one method did.
#[derive(Clone, Debug, Default)]
pub struct RetryMetrics {
    pub retries: Counter,
    pub hedges: Counter,
    pub budget_exhausted: Counter,
}

/// Retries' and hedges' metric families, by method.
#[derive(Default)]
pub struct RetryFamilies {
    retries: Family<MethodLabels, Counter>,
    hedges: Family<MethodLabels, Counter>,
    budget_exhausted: Family<MethodLabels, Counter>,
}

impl Families for RetryFamilies {
    fn register(&self, registry: &mut Registry) {
        registry.register("retries", "Retries sent, after the first attempt", self.retries.clone());
        registry.register("hedges", "Hedged attempts sent, after the first attempt", self.hedges.clone());
        let help = "Retries and hedges not sent because the upstream's retry budget was spent";
        registry.register("retry_budget_exhausted", help, self.budget_exhausted.clone());
    }
}

impl RetryFamilies {
    pub fn of(&self, direction: Direction, service: &str, method: &str) -> RetryMetrics {
        let labels = MethodLabels::new(direction, service, method);
        RetryMetrics {
            retries: self.retries.get_or_create_owned(&labels),
            hedges: self.hedges.get_or_create_owned(&labels),
            budget_exhausted: self.budget_exhausted.get_or_create_owned(&labels),
        }
    }
}

/// What one attempt's outcome says about another.
pub enum Verdict {
    Final,
    /// Retry if the policy and budget allow, after the backoff or the server's pushback.
    Retryable {
        pushback: Option<Duration>,
    },
    /// The peer did not process the call: send it again, whatever the method.
    Refused,
}

pub fn verdict(result: &Result<Response<ResponseBody>, ProxyError>, retryable: &[Code]) -> Verdict {
    match result {
        Ok(response) => {
            let Some(code) = grpc::status_in(response.headers()) else {
                return Verdict::Final;
            };
            if !retryable.contains(&code) {
                return Verdict::Final;
            }
            match grpc::retry_pushback(response.headers()) {
                None => Verdict::Retryable { pushback: None },
                Some(Some(wait)) => Verdict::Retryable { pushback: Some(wait) },
                // Negative or unreadable: the server asks for no retry.
                Some(None) => Verdict::Final,
            }
        }
        Err(error) if error.refused_unprocessed() => Verdict::Refused,
        Err(error @ (ProxyError::Connect { .. } | ProxyError::Upstream { .. } | ProxyError::NoEndpoints { .. }))
            if retryable.contains(&error.code()) =>
        {
            Verdict::Retryable { pushback: None }
        }
        Err(_) => Verdict::Final,
    }
}

/// The request of attempt `number` (1 for the first).
pub fn attempt<B>(parts: &http::request::Parts, body: Bytes, number: u32) -> Request<RequestBody<B>> {
    let mut request = Request::new(RequestBody::Replayed(Some(body)));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    request.extensions_mut().insert(Attempt(number));
    if number > 1 {
        request.headers_mut().insert(grpc::GRPC_PREVIOUS_RPC_ATTEMPTS, HeaderValue::from(number - 1));
    }
    request
}

mod defaults {
    pub fn retry_ratio() -> f64 {
        0.2
    }
    pub fn min_retries_per_second() -> u32 {
        10
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::Target;

    fn answered(code: Code, pushback: Option<&str>) -> Result<Response<ResponseBody>, ProxyError> {
        let mut response = Response::new(ResponseBody::empty());
        *response.headers_mut() = grpc::status_headers(code, "");
        if let Some(millis) = pushback {
            response.headers_mut().insert(grpc::GRPC_RETRY_PUSHBACK_MS, HeaderValue::from_str(millis).unwrap());
        }
        Ok(response)
    }

    fn upstream_failed(reason: h2::Reason) -> Result<Response<ResponseBody>, ProxyError> {
        let target = Target::App("127.0.0.1:1".parse().unwrap());
        Err(ProxyError::Upstream { target, error: h2::Error::from(reason) })
    }

    #[test]
    fn an_attempts_outcome_says_whether_another_may_follow() {
        let retryable = [Code::Unavailable];
        let verdict = |result| match verdict(&result, &retryable) {
            Verdict::Final => "final".to_string(),
            Verdict::Retryable { pushback } => format!("retryable after {pushback:?}"),
            Verdict::Refused => "refused".to_string(),
        };
        let headers_only = Ok(Response::new(ResponseBody::empty()));
        assert_eq!(verdict(headers_only), "final", "no status in the head: the response streams");
        assert_eq!(verdict(answered(Code::Ok, None)), "final");
        assert_eq!(verdict(answered(Code::Internal, None)), "final", "not a retryable code");
        assert_eq!(verdict(answered(Code::Unavailable, None)), "retryable after None");
        assert_eq!(verdict(answered(Code::Unavailable, Some("250"))), "retryable after Some(250ms)");
        assert_eq!(verdict(answered(Code::Unavailable, Some("-1"))), "final", "the server asks for no retry");
        assert_eq!(verdict(upstream_failed(h2::Reason::REFUSED_STREAM)), "refused", "unprocessed: whatever the method");
        assert_eq!(verdict(upstream_failed(h2::Reason::PROTOCOL_ERROR)), "final", "INTERNAL is not retryable here");
        let no_endpoints = Err(ProxyError::NoEndpoints { upstream: "u".into() });
        assert_eq!(verdict(no_endpoints), "retryable after None");
        assert_eq!(verdict(Err(ProxyError::NoApp)), "final", "only failures reaching the peer are retried");
    }

    #[test]
    fn each_attempt_is_the_same_request_numbered() {
        let mut original = Request::post("http://t/p.S/M").body(()).unwrap();
        original.headers_mut().insert("x-request-id", HeaderValue::from_static("abc"));
        let (parts, ()) = original.into_parts();
        let first: Request<RequestBody<()>> = attempt(&parts, Bytes::from_static(b"call"), 1);
        assert_eq!(first.extensions().get::<Attempt>().map(|a| a.0), Some(1));
        assert!(!first.headers().contains_key(grpc::GRPC_PREVIOUS_RPC_ATTEMPTS));
        let third: Request<RequestBody<()>> = attempt(&parts, Bytes::from_static(b"call"), 3);
        assert_eq!(third.headers()[grpc::GRPC_PREVIOUS_RPC_ATTEMPTS], "2");
        assert_eq!(third.headers()["x-request-id"], "abc");
        assert_eq!((third.method(), third.uri()), (&parts.method, &parts.uri));
        assert!(matches!(third.body(), RequestBody::Replayed(Some(body)) if body == "call"));
    }

    #[test]
    fn the_budget_gives_its_floor_then_its_share_of_calls() {
        let budget = RetryBudget::new(&RetryBudgetConfig { ratio: 0.5, min_per_second: 1 });
        let floor = (0..100).take_while(|_| budget.withdraw()).count();
        assert_eq!(floor, 10, "the floor: 1 per second over the 10 s window");
        assert!(!budget.withdraw());
        for _ in 0..10 {
            budget.deposit();
        }
        let earned = (0..100).take_while(|_| budget.withdraw()).count();
        assert_eq!(earned, 5, "half of ten calls");
    }
}
