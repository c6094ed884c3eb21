//! Message size: `max_message_size` bounds each gRPC message of a method,
//! both ways. A request message over it resets the stream it was going on
//! and the call is answered RESOURCE_EXHAUSTED; a response message over it
//! ends the response with that status in its trailers. Messages are measured
//! as they stream through, so the limit costs no buffering.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytesize::ByteSize;
use futures_util::future::Either;
use http::{Request, Response};
use tower::Service;

use super::source::Sourced;
use crate::call::{CallFuture, CallService, Carrier, Cut, MessageLimit, PolicyError, ProxyError, RecvBody, TooLarge};
use crate::grpc::Code;

#[derive(Debug)]
pub struct MessageTooLarge {
    pub size: u64,
    pub carrier: Carrier,
    pub limit: Sourced<ByteSize>,
}

impl fmt::Display for MessageTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let carrier = match self.carrier {
            Carrier::Request => "request",
            Carrier::Response => "response",
        };
        let Sourced { value, source } = &self.limit;
        write!(f, "a {carrier} message of {} bytes exceeds max_message_size {value} ({source})", self.size)
    }
}

impl std::error::Error for MessageTooLarge {}

impl PolicyError for MessageTooLarge {
    fn code(&self) -> Code {
        Code::ResourceExhausted
    }

    fn reason(&self) -> &'static str {
        "message_too_large"
    }
}

/// The layer: with no `max_message_size` for the method, calls pass as they are.
#[derive(Clone)]
pub struct MessageSizes<S> {
    inner: S,
    limit: Option<(u64, TooLarge)>,
}

impl<S> MessageSizes<S> {
    pub fn new(limit: Option<Sourced<ByteSize>>, inner: S) -> Self {
        let limit = limit.map(|limit| {
            let max = limit.value.as_u64();
            let too_large: TooLarge =
                Arc::new(move |size, carrier| Arc::new(MessageTooLarge { size, carrier, limit: limit.clone() }));
            (max, too_large)
        });
        MessageSizes { inner, limit }
    }
}

impl<S> Service<Request<RecvBody>> for MessageSizes<S>
where
    S: CallService<RecvBody>,
{
    type Response = Response<crate::call::ResponseBody>;
    type Error = ProxyError;
    type Future = Either<S::Future, CallFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RecvBody>) -> Self::Future {
        let Some((max, too_large)) = &self.limit else { return Either::Left(self.inner.call(request)) };
        let cut = Cut::of(&mut request);
        let limit = MessageLimit::new(*max, too_large.clone(), cut.clone());
        request.body_mut().limit_messages(limit.clone(), Carrier::Request);
        let call = self.inner.call(request);
        Either::Right(Box::pin(async move {
            // A request message too large cut the call short: say so, whatever came back.
            let mut response = cut.answer(call.await)?;
            response.body_mut().limit_messages(limit);
            Ok(response)
        }))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::call::ResponseBody;
    use crate::call::testing::{answered, message, received};
    use crate::policy::source::Source;

    fn limit(bytes: u64) -> Option<Sourced<ByteSize>> {
        Some(Sourced { value: ByteSize::b(bytes), source: Source::MethodOption })
    }

    /// An app that reads the whole request, then answers `answer`, a gRPC
    /// message, over HTTP/2.
    fn app(answer: Bytes) -> impl CallService<RecvBody> + Clone {
        tower::service_fn(move |request: Request<RecvBody>| -> CallFuture {
            let answer = answer.clone();
            Box::pin(async move {
                if request.into_body().collect().await.is_err() {
                    return Err(ProxyError::NoApp);
                }
                Ok(Response::new(answered(answer).await))
            })
        })
    }

    async fn response_status(response: Response<ResponseBody>) -> Option<Code> {
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(trailers) = frame.unwrap().into_trailers() {
                return crate::grpc::status_in(&trailers);
            }
        }
        None
    }

    #[tokio::test]
    async fn a_request_message_over_the_limit_ends_the_call_naming_the_limit_and_its_source() {
        let (request, _peer) = received("/t.T/M", message(65)).await;
        let error = MessageSizes::new(limit(64), app(message(1))).oneshot(request).await.unwrap_err();
        assert_eq!(error.code(), Code::ResourceExhausted);
        let too_large = error.policy::<MessageTooLarge>().expect("the message size policy acted");
        assert_eq!((too_large.size, too_large.carrier), (65, Carrier::Request));
        assert_eq!(
            error.to_string(),
            "a request message of 65 bytes exceeds max_message_size 64 B ((protomesh.v1.method))"
        );
    }

    #[tokio::test]
    async fn a_response_message_over_the_limit_ends_the_response_with_resource_exhausted() {
        let (request, _peer) = received("/t.T/M", message(64)).await;
        let response = MessageSizes::new(limit(64), app(message(100))).oneshot(request).await.unwrap();
        assert_eq!(response_status(response).await, Some(Code::ResourceExhausted));
    }

    #[tokio::test]
    async fn messages_at_the_limit_or_without_one_pass() {
        let (request, _peer) = received("/t.T/M", message(64)).await;
        let response = MessageSizes::new(limit(64), app(message(64))).oneshot(request).await.unwrap();
        assert_eq!(response_status(response).await, Some(Code::Ok));
        let (request, _peer) = received("/t.T/M", message(100_000)).await;
        let response = MessageSizes::new(None, app(message(100_000))).oneshot(request).await.unwrap();
        assert_eq!(response_status(response).await, Some(Code::Ok));
    }
}
