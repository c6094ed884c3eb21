//! A layer that decides at once whether a call may proceed, and may annotate
//! it for the layers below (routing, authorization). A refusal never reaches
//! the inner service.

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};
use hyper::body::Incoming;
use tower::Service;

use std::sync::Arc;

use super::error::{CallService, Direction, ProxyError, ResponseBody};
use crate::telemetry::Metrics;

pub trait Admission {
    /// `Err` refuses the call; `Ok` may have added extensions or headers.
    fn admit(&self, request: &mut Request<Incoming>) -> Result<(), ProxyError>;
}

#[derive(Clone)]
pub struct Admit<A, S> {
    admission: A,
    inner: S,
    /// Where refusals are counted, when no layer below will count the call.
    refusals: Option<(Arc<Metrics>, Direction)>,
}

impl<A, S> Admit<A, S> {
    pub fn new(admission: A, inner: S) -> Self {
        Admit { admission, inner, refusals: None }
    }

    /// Counts refusals in `protomesh_refused_total` by reason.
    pub fn counted(admission: A, metrics: Arc<Metrics>, direction: Direction, inner: S) -> Self {
        Admit { admission, inner, refusals: Some((metrics, direction)) }
    }
}

impl<A, S> Service<Request<Incoming>> for Admit<A, S>
where
    A: Admission,
    S: CallService<Incoming>,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = Either<Ready<Result<Self::Response, ProxyError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        match self.admission.admit(&mut request) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(error) => {
                if let Some((metrics, direction)) = &self.refusals {
                    metrics.refused(*direction, error.reason());
                }
                Either::Left(ready(Err(error)))
            }
        }
    }
}
