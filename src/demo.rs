//! `protomesh demo`: a whole mesh on loopback. A frontend client calls
//! checkout, which calls inventory and pricing; every workload has its own
//! sidecar, every hop between sidecars is mTLS with SPIFFE identities, and
//! the summary shows each call, its shape, and the caller identity that the
//! callee's sidecar vouched for.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::transport::{Channel, Server};

use crate::config::{
    AdminConfig, AuthorizationConfig, Config, ContractMode, ContractsConfig, IdentityConfig, InboundConfig,
    OutboundConfig, PolicyConfig, TracingConfig, UpstreamConfig,
};
use crate::contract::Contracts;
use crate::identity::SpiffeId;
use crate::identity::certs::write_dev_certs;
use crate::pb::shop::v1::checkout_client::CheckoutClient;
use crate::pb::shop::v1::checkout_server::CheckoutServer;
use crate::pb::shop::v1::inventory_client::InventoryClient;
use crate::pb::shop::v1::inventory_server::InventoryServer;
use crate::pb::shop::v1::pricing_client::PricingClient;
use crate::pb::shop::v1::pricing_server::PricingServer;
use crate::pb::shop::v1::{OrderReply, OrderRequest, StockRequest};
use crate::proxy::{Options, Sidecar};
use crate::sample::serve;
use crate::sample::shop::{CheckoutService, InventoryService, PricingService};

const TRUST_DOMAIN: &str = "demo.protomesh.local";
const WORKLOADS: [&str; 4] = ["frontend", "checkout", "inventory", "pricing"];
const SHOP_PROTO: &str = include_str!("../proto/examples/shop.proto");

fn identity(workload: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{workload}")).expect("demo IDs are valid")
}

/// Runs the demo in a scratch directory, removed afterwards; with `otlp`,
/// every sidecar exports its spans there.
pub async fn run(otlp: Option<String>) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("protomesh-demo-{}", std::process::id()));
    let result = run_in(&dir, otlp).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

struct Workload {
    name: &'static str,
    sidecar: Sidecar,
    app: Option<SocketAddr>,
}

async fn run_in(dir: &Path, otlp: Option<String>) -> Result<(), String> {
    let certs = dir.join("certs");
    let named: Vec<(String, SpiffeId)> = WORKLOADS.iter().map(|w| (w.to_string(), identity(w))).collect();
    write_dev_certs(&certs, "protomesh demo CA", &named)?;
    let proto_dir = dir.join("proto");
    let shop_proto = proto_dir.join("examples/shop.proto");
    let written =
        std::fs::create_dir_all(proto_dir.join("examples")).and_then(|()| std::fs::write(&shop_proto, SHOP_PROTO));
    written.map_err(|e| format!("{}: cannot write the demo contract: {e}", shop_proto.display()))?;
    let contracts_config = ContractsConfig {
        protos: vec![PathBuf::from("examples/shop.proto")],
        include: vec![proto_dir],
        descriptor_sets: vec![],
        mode: ContractMode::Strict,
    };
    let contracts = Arc::new(Contracts::load(&contracts_config).map_err(|e| e.to_string())?);
    let start = |name: &'static str, app: Option<SocketAddr>, upstreams: Vec<UpstreamConfig>| {
        let config = Config {
            service_name: Some(name.to_string()),
            identity: IdentityConfig {
                cert: certs.join(format!("{name}.pem")),
                key: certs.join(format!("{name}-key.pem")),
                trust_bundle: certs.join("ca.pem"),
                reload_interval: Duration::from_secs(10),
            },
            contracts: contracts_config.clone(),
            outbound: OutboundConfig { listen: loopback(), upstreams, ..OutboundConfig::default() },
            inbound: app.map(|app| InboundConfig {
                listen: loopback(),
                app,
                authorization: AuthorizationConfig::default(),
            }),
            admin: AdminConfig { listen: loopback(), allow_remote_changes: false },
            tracing: TracingConfig { otlp_endpoint: otlp.clone(), ..TracingConfig::default() },
            access_log: false,
            policy: PolicyConfig::default(),
            drain_timeout: Duration::from_secs(1),
            worker_threads: std::num::NonZeroUsize::MIN,
        };
        let contracts = contracts.clone();
        async move {
            let sidecar = Sidecar::start(&config, contracts, Options::default()).await?;
            Ok::<_, String>(Workload { name, sidecar, app })
        }
    };
    let route = |service: &str, to: &Workload| UpstreamConfig {
        services: vec![service.to_string()],
        endpoints: vec![to.sidecar.inbound_addr.expect("callee has inbound").to_string()],
        identity: identity(to.name),
        resolve_interval: Duration::from_secs(5),
    };

    let inventory_app =
        serve(Server::builder().add_service(InventoryServer::new(InventoryService)), bind().await?).await;
    let pricing_app = serve(Server::builder().add_service(PricingServer::new(PricingService)), bind().await?).await;
    let inventory = start("inventory", Some(inventory_app), vec![]).await?;
    let pricing = start("pricing", Some(pricing_app), vec![]).await?;
    let checkout_listener = bind().await?;
    let checkout_app = checkout_listener.local_addr().map_err(|e| e.to_string())?;
    let checkout = start(
        "checkout",
        Some(checkout_app),
        vec![route("shop.v1.Inventory", &inventory), route("shop.v1.Pricing", &pricing)],
    )
    .await?;
    let via_checkout_sidecar = channel(checkout.sidecar.outbound_addr);
    let service = CheckoutService {
        inventory: InventoryClient::new(via_checkout_sidecar.clone()),
        pricing: PricingClient::new(via_checkout_sidecar),
    };
    serve(Server::builder().add_service(CheckoutServer::new(service)), checkout_listener).await;
    let frontend =
        start("frontend", None, vec![route("shop.v1.Checkout", &checkout), route("shop.v1.Inventory", &inventory)])
            .await?;

    let workloads = [frontend, checkout, inventory, pricing];
    print_mesh(&workloads);
    let via_frontend_sidecar = channel(workloads[0].sidecar.outbound_addr);
    let outcome = tokio::select! {
        outcome = make_calls(via_frontend_sidecar, otlp.is_some()) => outcome,
        _ = tokio::signal::ctrl_c() => { println!("\ninterrupted"); Ok(()) }
    };
    for workload in workloads {
        workload.sidecar.shutdown().await;
    }
    outcome
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn bind() -> Result<TcpListener, String> {
    TcpListener::bind(loopback()).await.map_err(|e| format!("cannot listen on 127.0.0.1 for a demo app: {e}"))
}

fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).expect("socket addresses are valid URIs").connect_lazy()
}

fn print_mesh(workloads: &[Workload]) {
    println!("protomesh demo: {} workloads on loopback, each behind its own sidecar;", workloads.len());
    println!("sidecars talk mTLS (TLS 1.3, h2) and check SPIFFE identities in trust domain {TRUST_DOMAIN}\n");
    println!("  {:<10} {:<50} {:<22} {:<22} app", "workload", "identity", "sidecar outbound", "sidecar inbound");
    for w in workloads {
        let inbound = w.sidecar.inbound_addr.map_or("-".to_string(), |a| a.to_string());
        let app = w.app.map_or("(demo client)".to_string(), |a| a.to_string());
        println!(
            "  {:<10} {:<50} {:<22} {inbound:<22} {app}",
            w.name,
            w.sidecar.identity.as_str(),
            w.sidecar.outbound_addr.to_string()
        );
    }
    println!();
}

async fn make_calls(via_frontend_sidecar: Channel, traced: bool) -> Result<(), String> {
    let mut checkout = CheckoutClient::new(via_frontend_sidecar.clone());
    let orders = [("ada", vec!["apple", "pear"]), ("grace", vec!["fig", "kiwi", "plum"])];
    for (customer, skus) in orders {
        let started = Instant::now();
        let order = OrderRequest { customer: customer.into(), skus: skus.iter().map(|s| s.to_string()).collect() };
        let mut request = tonic::Request::new(order);
        // The frontend starts each order's trace, as an instrumented app would.
        let trace_id = format!("{:032x}", fastrand::u128(1..));
        let traceparent = format!("00-{trace_id}-{:016x}-01", fastrand::u64(1..));
        request.metadata_mut().insert("traceparent", traceparent.parse().expect("hex and dashes"));
        let reply = checkout.place_order(request).await.map_err(|s| format!("PlaceOrder failed: {s}"))?.into_inner();
        println!(
            "frontend -> shop.v1.Checkout/PlaceOrder for {customer}: OK, {} cents, {:.1} ms",
            reply.total_cents,
            started.elapsed().as_secs_f64() * 1e3
        );
        if traced {
            println!("  trace {trace_id}");
        }
        println!("  path: frontend --h2c--> sidecar --mTLS--> sidecar --h2c--> checkout, which called on:");
        for hop in &reply.trail {
            println!("    {hop}");
        }
    }

    println!("\nrefused by policy, answered by the sidecars themselves:");
    let denied = InventoryClient::new(via_frontend_sidecar.clone())
        .get_stock(StockRequest { sku: "apple".into(), updates: 0 })
        .await;
    print_refusal("shop.v1.Inventory/GetStock", denied.map(|_| ()));
    let mut raw = tonic::client::Grpc::new(via_frontend_sidecar);
    raw.ready().await.map_err(|e| e.to_string())?;
    let unknown = raw
        .unary::<OrderRequest, OrderReply, _>(
            tonic::Request::new(OrderRequest::default()),
            http::uri::PathAndQuery::from_static("/shop.v1.Checkout/CancelOrder"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    print_refusal("shop.v1.Checkout/CancelOrder", unknown.map(|_| ()));
    if traced {
        println!(
            "\nspans exported over OTLP; in Jaeger (http://localhost:16686) open /trace/<id> for the traces above"
        );
    }
    Ok(())
}

fn print_refusal(method: &str, result: Result<(), tonic::Status>) {
    match result {
        Ok(()) => println!("  frontend -> {method}: unexpectedly OK"),
        Err(status) => println!("  frontend -> {method}: {:?}: {}", status.code(), status.message()),
    }
}
