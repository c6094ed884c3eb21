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
use crate::call::{CallFuture, CallService, Carrier, MessageLimit, PolicyError, ProxyError, RecvBody, TooLarge};
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
            let too_large: TooLarge = Arc::new(move |size, carrier| {
                ProxyError::from(MessageTooLarge { size, carrier, limit: limit.clone() })
            });
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
        let limit = MessageLimit::new(*max, too_large.clone());
        request.body_mut().limit_messages(limit.clone(), Carrier::Request);
        let call = self.inner.call(request);
        Either::Right(Box::pin(async move {
            let result = call.await;
            // A request message too large cut the call short: say so, whatever came back.
            if let Some(error) = limit.error() {
                return Err(error);
            }
            let mut response = result?;
            response.body_mut().limit_messages(limit);
            Ok(response)
        }))
    }
}
