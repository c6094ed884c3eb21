//! Sample gRPC services built on the example contracts in `proto/examples/`:
//! an echo backend for tests and benchmarks, and the shop services of the demo.

pub mod echo;
pub mod shop;

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// The authenticated caller the inbound sidecar reported, or "" without one.
pub fn caller_of<T>(request: &tonic::Request<T>) -> String {
    request
        .metadata()
        .get(crate::proxy::inbound::CALLER_ID_HEADER.as_str())
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Serves a tonic router on an already-bound listener until the task is dropped.
pub async fn serve(router: tonic::transport::server::Router, listener: TcpListener) -> SocketAddr {
    let addr = listener.local_addr().expect("bound listener has an address");
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    addr
}
