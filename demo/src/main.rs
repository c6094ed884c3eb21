//! `protomesh-demo`: a whole mesh on loopback. A frontend client calls
//! checkout, which calls inventory and pricing; every workload has its own
//! sidecar, started from a config file as `protomesh run` starts one, every
//! hop between sidecars is mTLS with SPIFFE identities, and the summary shows
//! each call, its shape, and the caller identity that the callee's sidecar
//! vouched for.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use clap::Parser;
use protomesh::app::{ConfigSource, Options, Sidecar};
use protomesh::identity::SpiffeId;
use protomesh::identity::certs::write_dev_certs;
use protomesh_samples::pb::shop::v1::checkout_client::CheckoutClient;
use protomesh_samples::pb::shop::v1::checkout_server::CheckoutServer;
use protomesh_samples::pb::shop::v1::inventory_client::InventoryClient;
use protomesh_samples::pb::shop::v1::inventory_server::InventoryServer;
use protomesh_samples::pb::shop::v1::pricing_client::PricingClient;
use protomesh_samples::pb::shop::v1::pricing_server::PricingServer;
use protomesh_samples::pb::shop::v1::{OrderReply, OrderRequest, StockRequest};
use protomesh_samples::serve;
use protomesh_samples::shop::{CheckoutService, InventoryService, PricingService, traced_order};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Server};
use tracing_subscriber::EnvFilter;

const TRUST_DOMAIN: &str = "demo.protomesh.local";
const WORKLOADS: [&str; 4] = ["frontend", "checkout", "inventory", "pricing"];
const SHOP_PROTO: &str = include_str!("../../proto/examples/shop.proto");
/// Inventory's stock, open to browsers by gRPC-Web and to HTTP clients by
/// the JSON routes of its `google.api.http` options.
const STOCK_FOR_BROWSERS: &str = ", web: {listen: '127.0.0.1:0', allowed_origins: ['*'], \
    methods: ['shop.v1.Inventory/GetStock', 'shop.v1.Inventory/WatchStock']}";

/// A whole protomesh mesh on loopback: four workloads, each behind its own sidecar.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Export spans to this OTLP/gRPC endpoint, e.g. http://127.0.0.1:4317 (Jaeger).
    #[arg(long)]
    otlp: Option<String>,
    /// After the calls, keep the mesh up until Ctrl-C: for grpcurl, curl and
    /// browsers (the inventory sidecar serves gRPC-Web).
    #[arg(long)]
    keep_running: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Quiet: the demo prints what crosses the mesh; warnings still show.
    let filter = EnvFilter::try_from_env("PROTOMESH_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli.otlp, cli.keep_running)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn identity(workload: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{workload}")).expect("demo IDs are valid")
}

/// Runs the demo in a scratch directory, removed afterwards; with `otlp`,
/// every sidecar exports its spans there.
pub async fn run(otlp: Option<String>, keep_running: bool) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("protomesh-demo-{}", std::process::id()));
    let result = run_in(&dir, otlp, keep_running).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

struct Workload {
    name: &'static str,
    sidecar: Sidecar,
    app: Option<SocketAddr>,
}

async fn run_in(dir: &Path, otlp: Option<String>, keep_running: bool) -> Result<(), String> {
    let certs = dir.join("certs");
    let named: Vec<(String, SpiffeId)> = WORKLOADS.iter().map(|w| (w.to_string(), identity(w))).collect();
    write_dev_certs(&certs, "protomesh demo CA", &named)?;
    let proto_dir = dir.join("proto");
    let shop_proto = proto_dir.join("examples/shop.proto");
    let written =
        std::fs::create_dir_all(proto_dir.join("examples")).and_then(|()| std::fs::write(&shop_proto, SHOP_PROTO));
    written.map_err(|e| format!("{}: cannot write the demo contract: {e}", shop_proto.display()))?;
    let tracing = otlp.as_ref().map_or_else(|| "{}".to_string(), |endpoint| format!("{{otlp_endpoint: '{endpoint}'}}"));
    // `inbound` is more of the workload's inbound section, if any.
    let start = |name: &'static str, app: Option<SocketAddr>, inbound: &'static str, upstreams: Vec<String>| {
        let c = certs.display();
        let mut yaml = format!(
            "service_name: {name}\n\
             identity: {{cert: '{c}/{name}.pem', key: '{c}/{name}-key.pem', trust_bundle: '{c}/ca.pem'}}\n\
             contracts: {{protos: [examples/shop.proto], include: ['{}']}}\n\
             outbound: {{listen: '127.0.0.1:0', upstreams: [{}]}}\n\
             admin: {{listen: '127.0.0.1:0'}}\n\
             tracing: {tracing}\n\
             drain_timeout: 1s\n",
            proto_dir.display(),
            upstreams.join(", "),
        );
        if let Some(app) = app {
            yaml.push_str(&format!("inbound: {{listen: '127.0.0.1:0', app: '{app}'{inbound}}}\n"));
        }
        let path = dir.join(format!("{name}.yaml"));
        async move {
            std::fs::write(&path, yaml).map_err(|e| format!("{}: {e}", path.display()))?;
            let sidecar = Sidecar::start(ConfigSource::file(path), Options::default()).await?;
            Ok::<_, String>(Workload { name, sidecar, app })
        }
    };
    let route = |service: &str, to: &Workload| {
        let endpoint = to.sidecar.inbound_addr.expect("callee has inbound");
        format!("{{services: [{service}], endpoints: ['{endpoint}'], identity: '{}'}}", identity(to.name))
    };

    let inventory_app =
        serve(Server::builder().add_service(InventoryServer::new(InventoryService)), bind().await?).await;
    let pricing_app = serve(Server::builder().add_service(PricingServer::new(PricingService)), bind().await?).await;
    let inventory = start("inventory", Some(inventory_app), STOCK_FOR_BROWSERS, vec![]).await?;
    let pricing = start("pricing", Some(pricing_app), "", vec![]).await?;
    let checkout_listener = bind().await?;
    let checkout_app = checkout_listener.local_addr().map_err(|e| e.to_string())?;
    let checkout = start(
        "checkout",
        Some(checkout_app),
        "",
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
        start("frontend", None, "", vec![route("shop.v1.Checkout", &checkout), route("shop.v1.Inventory", &inventory)])
            .await?;

    let workloads = [frontend, checkout, inventory, pricing];
    print_mesh(&workloads);
    let via_frontend_sidecar = channel(workloads[0].sidecar.outbound_addr);
    let web = workloads[2].sidecar.web_addr;
    let outcome = tokio::select! {
        outcome = make_calls(via_frontend_sidecar, web, otlp.is_some()) => outcome,
        _ = tokio::signal::ctrl_c() => { println!("\ninterrupted"); Ok(()) }
    };
    if keep_running && outcome.is_ok() {
        println!("\nthe mesh stays up until Ctrl-C");
        let _ = tokio::signal::ctrl_c().await;
    }
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
    if let Some(web) = workloads.iter().find_map(|w| w.sidecar.web_addr) {
        println!("\ninventory's web listener: http://{web} (shop.v1.Inventory/GetStock and WatchStock, any origin)");
        println!("  gRPC-Web for browsers, and JSON: curl http://{web}/v1/stock/apple");
    }
    println!();
}

async fn make_calls(via_frontend_sidecar: Channel, web: Option<SocketAddr>, traced: bool) -> Result<(), String> {
    let mut checkout = CheckoutClient::new(via_frontend_sidecar.clone());
    let orders = [("ada", vec!["apple", "pear"]), ("grace", vec!["fig", "kiwi", "plum"])];
    for (customer, skus) in orders {
        let started = Instant::now();
        // The frontend starts each order's trace, as an instrumented app would.
        let (request, trace_id) = traced_order(customer, &skus);
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

    if let Some(web) = web {
        let (status, body) = json_get(web, "/v1/stock/apple").await?;
        println!("\nan HTTP client, no certificate -> GET /v1/stock/apple (JSON): {status} {body}");
        println!("  the inventory sidecar made it shop.v1.Inventory/GetStock by the contract's google.api.http option");
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

/// A JSON call as any HTTP client makes it: (status line's code, body).
async fn json_get(addr: SocketAddr, path: &str) -> Result<(String, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let failed = |e: std::io::Error| format!("GET {path} on the web listener {addr}: {e}");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.map_err(failed)?;
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: shop.test\r\naccept: application/json\r\nconnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.map_err(failed)?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.map_err(failed)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split(' ').nth(1).unwrap_or("?").to_string();
    Ok((status, body.to_string()))
}

fn print_refusal(method: &str, result: Result<(), tonic::Status>) {
    match result {
        Ok(()) => println!("  frontend -> {method}: unexpectedly OK"),
        Err(status) => println!("  frontend -> {method}: {:?}: {}", status.code(), status.message()),
    }
}
