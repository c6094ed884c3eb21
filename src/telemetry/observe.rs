//! The layer that records every admitted call: its final gRPC status and how
//! long it took, counted against its method. The status comes from a
//! trailers-only response, from the trailers at the end of the stream, or
//! from the sidecar's own error; a call the caller abandons counts as
//! CANCELLED.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use tokio::time::Instant;
use tower::Service;

use crate::grpc::{self, Code};
use crate::policy::{CallContext, CallPolicy};
use crate::proxy::body::ResponseBody;
use crate::proxy::error::ProxyError;

/// One call being recorded; dropped unfinished, it counts as CANCELLED.
#[derive(Debug)]
pub struct CallRecord {
    policy: Arc<CallPolicy>,
    started: Instant,
    finished: bool,
}

impl CallRecord {
    pub fn finish(mut self, status: Code) {
        self.record(status);
    }

    fn record(&mut self, status: Code) {
        self.finished = true;
        self.policy.metrics.record(status, self.started.elapsed());
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if !self.finished {
            self.record(Code::Cancelled);
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S> Observe<S> {
    pub fn new(inner: S) -> Self {
        Observe { inner }
    }
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<ResponseBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<ResponseBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let record =
            CallRecord { policy: CallContext::of(&request).policy.clone(), started: Instant::now(), finished: false };
        let call = self.inner.call(request);
        Box::pin(async move {
            match call.await {
                Ok(mut response) => {
                    match grpc::status_in(response.headers()) {
                        Some(status) => record.finish(status),
                        None => response.body_mut().record_to(record),
                    }
                    Ok(response)
                }
                Err(error) => {
                    record.finish(error.code());
                    Err(error)
                }
            }
        })
    }
}
