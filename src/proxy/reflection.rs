//! gRPC server reflection (`grpc.reflection.v1` and `v1alpha`, as grpcurl,
//! Postman and evans ask it) answered by the sidecar from the contracts it
//! loaded, imports and well-known types included. Outbound, on the outbound
//! listener itself, it is the whole mesh's: every service the sidecar routes.
//! Inbound, a peer asks for the contracts this sidecar serves, authorized as
//! any method is. The answers are tonic-reflection's, built at the first call
//! for each version of the contracts, so they follow reloads and say what a tonic server built
//! from the same files would say. Contracts with no service (a permissive pod
//! with none yet) answer nothing here: the call goes on, to where it was sent.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use crate::call::{CallFuture, ProxyError, RecvBody, ResponseBody};
use crate::contract::Contracts;
use crate::grpc::{self, Code};

/// The services reflection is asked through, by version.
pub const V1: &str = "grpc.reflection.v1.ServerReflection";
pub const V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";
/// Their one method, a bidirectional stream.
pub const METHOD: &str = "ServerReflectionInfo";

type Server = BoxCloneSyncService<Request<RecvBody>, Response<tonic::body::Body>, Infallible>;

/// Both versions of the reflection service, for one version of the
/// contracts, made on the first call: most sidecars are never asked.
#[derive(Clone)]
pub struct Reflection {
    contracts: Arc<Contracts>,
    servers: Arc<OnceLock<Option<Servers>>>,
}

#[derive(Clone)]
struct Servers {
    v1: Server,
    v1alpha: Server,
}

/// The versions of the reflection service, in the order of [`SERVICES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1 = 0,
    V1Alpha = 1,
}

/// Each version's service, by [`Version`].
pub const SERVICES: [(Version, &str); 2] = [(Version::V1, V1), (Version::V1Alpha, V1ALPHA)];

/// The version of reflection `path` asks for, if it asks for reflection:
/// one prefix test for every other call.
pub fn asked(path: &str) -> Option<Version> {
    if !path.starts_with("/grpc.reflection.") {
        return None;
    }
    let (service, method) = grpc::split_path(path)?;
    let found = SERVICES.into_iter().find(|(_, known)| *known == service && method == METHOD);
    found.map(|(version, _)| version)
}

impl Reflection {
    /// Reflection over `contracts`; `None` when they declare no service.
    pub fn of(contracts: &Arc<Contracts>) -> Option<Reflection> {
        contracts.descriptors().services().next()?;
        Some(Reflection { contracts: contracts.clone(), servers: Arc::default() })
    }

    /// The servers, made once; `None` (logged) when the contracts'
    /// descriptors do not make a reflection service.
    fn servers(&self) -> Option<&Servers> {
        let made = self.servers.get_or_init(|| {
            let set = self.contracts.descriptors().encode_to_vec();
            let builder = || tonic_reflection::server::Builder::configure().register_encoded_file_descriptor_set(&set);
            let built = builder().build_v1().and_then(|v1| Ok((v1, builder().build_v1alpha()?)));
            match built {
                Ok((v1, v1alpha)) => Some(Servers { v1: Server::new(v1), v1alpha: Server::new(v1alpha) }),
                Err(error) => {
                    tracing::warn!(%error, "no server reflection: the contracts' descriptors do not make one");
                    None
                }
            }
        });
        made.as_ref()
    }
}

/// Passes tonic's response frames on until the call ends or its caller goes.
async fn relay(mut body: tonic::body::Body, frames: tokio::sync::mpsc::Sender<Frame<Bytes>>) {
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap_or_else(|status| {
            let code = Code::from_number(status.code() as u8).unwrap_or(Code::Unknown);
            Frame::trailers(grpc::status_headers(code, status.message()))
        });
        let last = frame.is_trailers();
        if frames.send(frame).await.is_err() || last {
            return;
        }
    }
}

/// Answers a reflection call, streaming each response as it is made.
impl Service<Request<RecvBody>> for Reflection {
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RecvBody>) -> CallFuture {
        let Some(servers) = self.servers() else {
            let error = ProxyError::UnknownMethod { path: request.uri().path().to_string() };
            return Box::pin(std::future::ready(Err(error)));
        };
        let server = match asked(request.uri().path()) {
            Some(Version::V1Alpha) => servers.v1alpha.clone(),
            _ => servers.v1.clone(),
        };
        Box::pin(async move {
            let Ok(response) = server.oneshot(request).await;
            let (parts, body) = response.into_parts();
            // Room for a few responses: reflection answers one per request.
            let (frames, sent) = tokio::sync::mpsc::channel(4);
            tokio::spawn(relay(body, frames));
            Ok(Response::from_parts(parts, ResponseBody::frames(sent)))
        })
    }
}
