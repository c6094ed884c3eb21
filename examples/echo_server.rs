//! The echo backend (`echo.v1.Echo`) as a standalone server, for benchmarks
//! and manual testing: `cargo run --release --example echo_server -- 127.0.0.1:50051`.

use protomesh::sample::echo::EchoService;
use tonic::transport::Server;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:50051".into()).parse()?;
    eprintln!("echo.v1.Echo listening on {addr}");
    Server::builder().add_service(EchoService::default().into_server()).serve(addr).await?;
    Ok(())
}
