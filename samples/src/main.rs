//! `protomesh-samples`: one sample service per process, as the benchmark and
//! the Kubernetes sample run them. Each listens on plaintext HTTP/2 (its
//! sidecar adds mTLS) and calls other services through the sidecar's
//! outbound port.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Parser, Subcommand};
use protomesh_samples::echo::EchoService;
use protomesh_samples::pb::shop::v1::checkout_client::CheckoutClient;
use protomesh_samples::pb::shop::v1::checkout_server::CheckoutServer;
use protomesh_samples::pb::shop::v1::inventory_client::InventoryClient;
use protomesh_samples::pb::shop::v1::inventory_server::InventoryServer;
use protomesh_samples::pb::shop::v1::pricing_client::PricingClient;
use protomesh_samples::pb::shop::v1::pricing_server::PricingServer;
use protomesh_samples::shop::{self, CheckoutService, InventoryService, PricingService};
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::{Channel, Server};

#[derive(Parser)]
#[command(version, about = "Sample gRPC services for protomesh")]
struct Cli {
    #[command(subcommand)]
    service: Service,
}

#[derive(Subcommand)]
enum Service {
    /// echo.v1.Echo, the benchmark's backend. On SIGUSR1 it prints `served N`,
    /// the calls it has answered.
    Echo {
        #[arg(default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
    },
    /// shop.v1.Inventory.
    Inventory {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// shop.v1.Pricing.
    Pricing {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// shop.v1.Checkout, which calls Inventory and Pricing through `--outbound`.
    Checkout {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The sidecar's outbound address.
        #[arg(long, default_value = "http://127.0.0.1:4140")]
        outbound: String,
    },
    /// A shopper placing an order through `--outbound` every `--every`,
    /// starting a trace for each and printing its ID.
    Shopper {
        #[arg(long, default_value = "http://127.0.0.1:4140")]
        outbound: String,
        #[arg(long, default_value = "5s", value_parser = seconds)]
        every: Duration,
    },
}

fn seconds(text: &str) -> Result<Duration, String> {
    let number = text.strip_suffix('s').ok_or("write seconds, e.g. 5s")?;
    number.parse::<f64>().map(Duration::from_secs_f64).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    match Cli::parse().service {
        Service::Echo { listen } => {
            let echo = EchoService::default();
            let stats = echo.stats.clone();
            let mut report = signal(SignalKind::user_defined1())?;
            tokio::spawn(async move {
                while report.recv().await.is_some() {
                    println!("served {}", stats.calls.load(Ordering::Relaxed));
                }
            });
            eprintln!("echo.v1.Echo listening on {listen}");
            Server::builder().add_service(echo.into_server()).serve(listen).await?;
        }
        Service::Inventory { listen } => {
            eprintln!("shop.v1.Inventory listening on {listen}");
            Server::builder().add_service(InventoryServer::new(InventoryService)).serve(listen).await?;
        }
        Service::Pricing { listen } => {
            eprintln!("shop.v1.Pricing listening on {listen}");
            Server::builder().add_service(PricingServer::new(PricingService)).serve(listen).await?;
        }
        Service::Checkout { listen, outbound } => {
            let sidecar = Channel::from_shared(outbound)?.connect_lazy();
            let checkout = CheckoutService {
                inventory: InventoryClient::new(sidecar.clone()),
                pricing: PricingClient::new(sidecar),
            };
            eprintln!("shop.v1.Checkout listening on {listen}");
            Server::builder().add_service(CheckoutServer::new(checkout)).serve(listen).await?;
        }
        Service::Shopper { outbound, every } => {
            let mut checkout = CheckoutClient::new(Channel::from_shared(outbound)?.connect_lazy());
            let mut ticks = tokio::time::interval(every);
            for order in 0u64.. {
                ticks.tick().await;
                let (request, trace_id) = shop::traced_order(&format!("shopper-{order}"), &["apple", "pear"]);
                match checkout.place_order(request).await {
                    Ok(reply) => {
                        println!("order {} OK, {} cents, trace {trace_id}", order, reply.get_ref().total_cents)
                    }
                    Err(status) => {
                        println!("order {order} failed: {:?}: {}, trace {trace_id}", status.code(), status.message())
                    }
                }
            }
        }
    }
    Ok(())
}
