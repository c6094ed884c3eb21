//! The policy error that cut a call short, shared by the call's two bodies
//! and the layers that watch them: the request body that meets it stops and
//! resets the stream it feeds, the response ends with its status, and the
//! layer that set it answers with it. One per call, made by the first layer
//! that needs it, so that whichever policy acts first is the one named.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;

use super::{Direction, PolicyError, ProxyError, ResponseBody};
use crate::grpc::Code;

#[derive(Clone, Default)]
pub struct Cut(Arc<OnceLock<Arc<dyn PolicyError>>>);

impl std::fmt::Debug for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Cut").field(&self.0.get().map(|error| error.to_string())).finish()
    }
}

impl Cut {
    /// The call's cut, kept among the request's extensions.
    pub fn of<B>(request: &mut Request<B>) -> Cut {
        request.extensions_mut().get_or_insert_default::<Cut>().clone()
    }

    /// Cuts the call with `error`, unless it was cut already.
    pub fn set(&self, error: Arc<dyn PolicyError>) {
        let _ = self.0.set(error);
    }

    pub fn is_cut(&self) -> bool {
        self.0.get().is_some()
    }

    /// The error the call ends with, once cut.
    pub fn error(&self) -> Option<ProxyError> {
        self.0.get().map(|error| ProxyError::Policy(error.clone()))
    }

    /// What a layer that may cut its call answers with, once the layers below
    /// have: the cut's error if the call was cut by then, whatever came
    /// back; else the response, which ends with the cut's status should the
    /// call be cut later.
    pub fn answer(
        &self,
        result: Result<Response<ResponseBody>, ProxyError>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        if let Some(error) = self.error() {
            return Err(error);
        }
        let mut response = result?;
        response.body_mut().cut_by(self.clone());
        Ok(response)
    }

    /// The error as the status and trailers that end a response already
    /// under way, as the sidecar of `direction` answers.
    pub(super) fn trailers(&self, direction: Direction) -> Option<(Code, Frame<Bytes>)> {
        let error = self.error()?;
        Some((error.code(), Frame::trailers(error.status_headers(direction))))
    }
}
