//! Sample gRPC services built on the example contracts in `proto/examples/`:
//! the echo backend of the tests and the benchmark, the shop services of the
//! demo and the Kubernetes sample, and an OTLP trace collector that keeps
//! what it receives. None of it is part of the sidecar.

pub mod collector;
pub mod echo;
pub mod shop;

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// Generated from `proto/examples/`.
pub mod pb {
    pub mod echo {
        pub mod v1 {
            tonic::include_proto!("echo.v1");
        }
    }
    pub mod shop {
        pub mod v1 {
            tonic::include_proto!("shop.v1");
        }
    }
}

/// The header in which an inbound protomesh sidecar tells its app the
/// verified SPIFFE ID of the caller.
pub const CALLER_ID_HEADER: &str = "protomesh-caller-id";

/// The authenticated caller the inbound sidecar reported, or "" without one.
pub fn caller_of<T>(request: &tonic::Request<T>) -> String {
    request.metadata().get(CALLER_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// Serves a tonic router on an already-bound listener until the task is dropped.
pub async fn serve(router: tonic::transport::server::Router, listener: TcpListener) -> SocketAddr {
    let addr = listener.local_addr().expect("bound listener has an address");
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    addr
}
