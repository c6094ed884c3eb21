//! A span for each attempt of a traced call that may be sent more than once:
//! a child of the call's span, numbered, carried by the attempt's
//! `traceparent`, and ended with the status the attempt got. It sits below
//! the retries, which mark each attempt with its number.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use opentelemetry::KeyValue;
use opentelemetry::trace::Span as _;
use tower::Service;

use super::trace::{CallSpan, Tracing};
use crate::call::{Attempt, CallFuture, CallService, ProxyError, ResponseBody};
use crate::grpc::{self, Code};

#[derive(Clone)]
pub struct TraceAttempts<S> {
    inner: S,
    tracing: Option<Arc<Tracing>>,
}

impl<S> TraceAttempts<S> {
    pub fn new(tracing: Option<Arc<Tracing>>, inner: S) -> Self {
        TraceAttempts { inner, tracing }
    }
}

impl<S, B> Service<Request<B>> for TraceAttempts<S>
where
    S: CallService<B>,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = Either<S::Future, CallFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let traced =
            match (&self.tracing, request.extensions().get::<CallSpan>(), request.extensions().get::<Attempt>()) {
                (Some(tracing), Some(CallSpan(parent)), Some(Attempt(number))) => {
                    Some((tracing, parent.clone(), *number))
                }
                _ => None,
            };
        let Some((tracing, parent, number)) = traced else {
            return Either::Left(self.inner.call(request));
        };
        let name = format!("{} attempt", request.uri().path().trim_start_matches('/'));
        let number = KeyValue::new("protomesh.attempt", i64::from(number));
        let mut span = tracing.start_child(request.headers_mut(), &parent, name, vec![number]);
        let call = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let result = call.await;
            let status = match &result {
                Ok(response) => grpc::status_in(response.headers()).unwrap_or(Code::Ok),
                Err(error) => error.code(),
            };
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", status as i64));
            span.end();
            result
        }))
    }
}
