//! The echo backend (`echo.v1.Echo`) as a standalone server, for benchmarks
//! and manual testing: `cargo run --release --example echo_server -- 127.0.0.1:50051`.
//! On SIGUSR1 it prints `served N`, the calls it has answered, so that a
//! load generator's count of HTTP 200s can be checked against real gRPC calls.

use std::sync::atomic::Ordering;

use protomesh::sample::echo::EchoService;
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::Server;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:50051".into()).parse()?;
    let echo = EchoService::default();
    let stats = echo.stats.clone();
    let mut report = signal(SignalKind::user_defined1())?;
    tokio::spawn(async move {
        while report.recv().await.is_some() {
            println!("served {}", stats.calls.load(Ordering::Relaxed));
        }
    });
    eprintln!("echo.v1.Echo listening on {addr}");
    Server::builder().add_service(echo.into_server()).serve(addr).await?;
    Ok(())
}
