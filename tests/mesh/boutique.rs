//! An app shaped like Online Boutique (`tests/boutique/`), injected with
//! `protomesh inject --all` as the README tells a user, nothing edited by
//! hand, and run by the suite's kubelet (`kubelet.rs`) on one node: every
//! pod ready; the load generator (outside the mesh) and a client outside the
//! cluster, through the LoadBalancer, served; every gRPC call between pods
//! made over mTLS with the caller's identity checked at the server; the cart
//! reaching its Redis-protocol store through both sidecars; the Job
//! completing; and nothing of the calls in plaintext on the wire.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protomesh_samples::caller_of;
use protomesh_samples::pb::shop::v1::checkout_client::CheckoutClient;
use protomesh_samples::pb::shop::v1::checkout_server::{Checkout, CheckoutServer};
use protomesh_samples::pb::shop::v1::inventory_client::InventoryClient;
use protomesh_samples::pb::shop::v1::inventory_server::InventoryServer;
use protomesh_samples::pb::shop::v1::pricing_client::PricingClient;
use protomesh_samples::pb::shop::v1::pricing_server::PricingServer;
use protomesh_samples::pb::shop::v1::{OrderReply, OrderRequest, QuoteRequest, StockRequest};
use protomesh_samples::shop::{InventoryService, PricingService};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

use crate::cluster::{INBOUND_OPAQUE, contains, sniff};
use crate::kubelet::{App, Kubelet, Started, TRUST_DOMAIN, http_get};
use crate::pods;

const NAMESPACE: &str = "boutique";
/// What the frontend sends its backends; never to be seen on the wire.
const CANARY: &str = "secret-boutique";

/// The boutique's plain manifests.
const BOUTIQUE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/boutique");

/// `protomesh inject --all --namespace boutique` of `input`, with `more`
/// flags, as the README tells a user: the objects it wrote and its report.
fn inject_all(input: &str, more: &[&str]) -> (Vec<Value>, String) {
    let injected = std::process::Command::new(env!("CARGO_BIN_EXE_protomesh"))
        .args(["inject", "--all", "--namespace", NAMESPACE])
        .args(more)
        .arg(input)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&injected.stderr).into_owned();
    assert!(injected.status.success(), "{report}");
    let written = String::from_utf8(injected.stdout).unwrap();
    (protomesh::kube::manifest::parse(&written, "injected").unwrap().documents, report)
}

fn id(account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{account}")
}

/// What the apps saw, for the test to check.
#[derive(Default)]
struct Seen {
    /// Each page the load generator was served, or why not.
    load: Vec<Result<String, String>>,
    /// What the Job's call to the cart came back with.
    warmup: Option<Result<String, String>>,
    /// Values the store was given.
    stored: Vec<String>,
}

#[test]
fn online_boutique_injected_with_no_edit_runs_meshed() {
    if let Some(why) = pods::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let (objects, report) = inject_all(BOUTIQUE, &[]);
    assert!(
        report.contains("deployment/frontend: injected; plaintext: 8080 (LoadBalancer service/frontend-external)"),
        "{report}"
    );
    assert!(report.contains("deployment/redis-cart: injected; plaintext: none"), "{report}");
    assert!(report.contains("deployment/loadgenerator: skipped: opted out"), "{report}");

    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut kubelet = Kubelet::start(apps(&seen));
    let (stop, wire) = sniff(&kubelet.node);
    if let Err(not_started) = kubelet.apply(NAMESPACE, objects) {
        panic!("{not_started:?}");
    }
    for pod in &kubelet.pods {
        assert!(pod.ready || pod.name == "cart-warmup-0", "{} is not ready", pod.name);
    }

    // The load generator, outside the mesh, waits for the frontend, then loads it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().load.len() < LOAD_REQUESTS {
        assert!(Instant::now() < deadline, "the load generator did not finish: {:?}", seen.lock().unwrap().load);
        std::thread::sleep(Duration::from_millis(20));
    }
    let load = std::mem::take(&mut seen.lock().unwrap().load);
    for page in &load {
        let page = page.as_ref().unwrap_or_else(|why| {
            panic!("the load generator was not served: {why}\nthe sidecars' logs:\n{}", sidecar_logs(&kubelet))
        });
        assert_page(page);
    }

    // A client outside the cluster, through the LoadBalancer's address.
    let (_, external) = kubelet.service(NAMESPACE, "frontend-external");
    let external = SocketAddr::new(external.unwrap().into(), 80);
    let (status, page) = kubelet.node.run(move || http_get(external, "/")).join().unwrap().unwrap();
    assert_eq!(status, 200, "{page}");
    assert_page(&page);

    // The Job completed: its call went through, and its sidecar exited 0.
    let warmup = seen.lock().unwrap().warmup.clone().expect("the Job's app ran");
    assert_eq!(warmup.unwrap(), format!("served for {}", id("default")));

    // The store was reached through the cart's sidecar and its own, over mTLS.
    assert!(seen.lock().unwrap().stored.iter().any(|value| value.starts_with(CANARY)));
    let redis = kubelet.pod("redis-cart-0").pod.address;
    let metrics = kubelet.node.run(move || http_get(SocketAddr::new(redis.into(), 4191), "/metrics")).join();
    let metrics = metrics.unwrap().unwrap().1;
    let opaque = metrics.lines().find(|l| l.starts_with(INBOUND_OPAQUE)).unwrap_or_default();
    assert!(opaque.split(' ').nth(1).is_some_and(|n| n.parse::<f64>().unwrap() >= 1.0), "{metrics}");

    stop.store(true, Ordering::Release);
    let wire = wire.join().unwrap();
    assert!(!contains(&wire, CANARY.as_bytes()), "a call between pods crossed the node in plaintext");
    assert!(contains(&wire, b"GET / HTTP/1.1"), "the sniffer saw the plaintext load, so it would have seen a leak");
}

/// The end of each pod's sidecar log.
fn sidecar_logs(kubelet: &Kubelet) -> String {
    let mut logs = String::new();
    for pod in &kubelet.pods {
        let log = pod.log("protomesh-proxy");
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        logs += &format!("--- {}:\n{tail}\n", pod.name);
    }
    logs
}

/// The frontend's page: each backend served it, the frontend's sidecar vouched for.
fn assert_page(page: &str) {
    let page: Value = serde_json::from_str(page).unwrap_or_else(|_| panic!("not the frontend's page: {page}"));
    for backend in ["catalog", "currency", "cart"] {
        assert_eq!(page[backend], id("frontend"), "{backend}: {page}");
    }
    assert!(page["cart_items"].as_u64().unwrap() >= 1, "{page}");
}

const LOAD_REQUESTS: usize = 10;

/// The apps of the boutique's images.
fn apps(seen: &Arc<Mutex<Seen>>) -> BTreeMap<String, App> {
    let mut apps: BTreeMap<String, App> = BTreeMap::new();
    apps.insert("boutique/frontend".into(), Arc::new(|started| Box::pin(frontend(started))));
    apps.insert(
        "boutique/productcatalogservice".into(),
        Arc::new(|started| {
            Box::pin(grpc(started, |router| router.add_service(InventoryServer::new(InventoryService))))
        }),
    );
    apps.insert(
        "boutique/currencyservice".into(),
        Arc::new(|started| Box::pin(grpc(started, |router| router.add_service(PricingServer::new(PricingService))))),
    );
    apps.insert(
        "boutique/cartservice".into(),
        Arc::new(|started| {
            let store = started.dns.resolve(&started.env["REDIS_ADDR"], NAMESPACE);
            Box::pin(grpc(started, move |router| router.add_service(CheckoutServer::new(Cart { store }))))
        }),
    );
    let stored = seen.clone();
    apps.insert("redis".into(), Arc::new(move |_| Box::pin(redis(stored.clone()))));
    let load = seen.clone();
    apps.insert(
        "boutique/loadgenerator".into(),
        Arc::new(move |started| Box::pin(load_generator(started, load.clone()))),
    );
    let warmup = seen.clone();
    apps.insert(
        "boutique/cart-warmup".into(),
        Arc::new(move |started| {
            let seen = warmup.clone();
            Box::pin(async move {
                let cart = started.dns.resolve(&started.env["CART_SERVICE_ADDR"], NAMESPACE);
                let order = OrderRequest { customer: format!("{CANARY}-warmup"), skus: vec!["warmup".into()] };
                let reply = CheckoutClient::new(channel(cart)).place_order(order).await;
                let reply = reply.map(|r| r.into_inner().trail.join(",")).map_err(|s| s.to_string());
                seen.lock().unwrap().warmup = Some(reply);
            })
        }),
    );
    apps
}

fn channel(address: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{address}")).unwrap().connect_lazy()
}

/// A gRPC server on `PORT`, with gRPC health for its probes.
async fn grpc(started: Started, add: impl FnOnce(&mut Server) -> tonic::transport::server::Router) {
    let port = &started.env["PORT"];
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).await.unwrap();
    let (_, health) = tonic_health::server::health_reporter();
    let router = add(&mut Server::builder()).add_service(health);
    protomesh_samples::serve(router, listener).await;
    std::future::pending::<()>().await
}

/// The cart: each order's items pushed onto the customer's list in the store.
struct Cart {
    store: SocketAddr,
}

#[tonic::async_trait]
impl Checkout for Cart {
    async fn place_order(&self, request: Request<OrderRequest>) -> Result<Response<OrderReply>, Status> {
        let caller = caller_of(&request);
        let order = request.into_inner();
        let unavailable = |e: std::io::Error| Status::unavailable(format!("redis-cart: {e}"));
        let mut store = TcpStream::connect(self.store).await.map_err(unavailable)?;
        let mut command = vec!["RPUSH".to_string(), format!("cart:{}", order.customer)];
        command.extend(order.skus.iter().map(|sku| format!("{}:{sku}", order.customer)));
        store.write_all(&resp(&command)).await.map_err(unavailable)?;
        let mut line = String::new();
        BufReader::new(&mut store).read_line(&mut line).await.map_err(unavailable)?;
        let items: u64 = line
            .trim()
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Status::internal(format!("redis-cart answered {line:?}")))?;
        Ok(Response::new(OrderReply {
            order_id: order.customer,
            total_cents: items,
            trail: vec![format!("served for {caller}")],
        }))
    }
}

/// A command in the Redis protocol: an array of bulk strings.
fn resp(command: &[String]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", command.len()).into_bytes();
    for part in command {
        out.extend(format!("${}\r\n{part}\r\n", part.len()).into_bytes());
    }
    out
}

/// A store that speaks enough of the Redis protocol for the cart: `RPUSH`
/// and `PING`, on port 6379.
async fn redis(seen: Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("0.0.0.0:6379").await.unwrap();
    let lists: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        let (seen, lists) = (seen.clone(), lists.clone());
        tokio::spawn(async move {
            let (read, mut write) = tcp.into_split();
            let mut read = BufReader::new(read);
            loop {
                let mut header = String::new();
                if read.read_line(&mut header).await.unwrap_or(0) == 0 {
                    return;
                }
                let count: usize = header.trim().trim_start_matches('*').parse().unwrap_or(0);
                let mut parts = Vec::new();
                for _ in 0..count {
                    let mut length = String::new();
                    read.read_line(&mut length).await.unwrap();
                    let length: usize = length.trim().trim_start_matches('$').parse().unwrap();
                    let mut part = vec![0; length + 2];
                    read.read_exact(&mut part).await.unwrap();
                    parts.push(String::from_utf8_lossy(&part[..length]).into_owned());
                }
                let answer = match parts.first().map(String::as_str) {
                    Some("PING") => "+PONG\r\n".to_string(),
                    Some("RPUSH") if parts.len() > 2 => {
                        seen.lock().unwrap().stored.extend(parts[2..].iter().cloned());
                        let mut lists = lists.lock().unwrap();
                        let length = lists.entry(parts[1].clone()).or_default();
                        *length += parts.len() as u64 - 2;
                        format!(":{length}\r\n")
                    }
                    _ => "-ERR unknown command\r\n".to_string(),
                };
                if write.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The frontend: HTTP/1.1 on `PORT`; `/` calls the catalog, the currency
/// service and the cart, and shows whom each served.
async fn frontend(started: Started) {
    let listener = TcpListener::bind(format!("0.0.0.0:{}", started.env["PORT"])).await.unwrap();
    let backend = |name: &str| channel(started.dns.resolve(&started.env[name], NAMESPACE));
    let backends = Arc::new((
        InventoryClient::new(backend("PRODUCT_CATALOG_SERVICE_ADDR")),
        PricingClient::new(backend("CURRENCY_SERVICE_ADDR")),
        CheckoutClient::new(backend("CART_SERVICE_ADDR")),
    ));
    let visits = Arc::new(AtomicU32::new(0));
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        let (backends, visits) = (backends.clone(), visits.clone());
        let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let (backends, visits) = (backends.clone(), visits.clone());
            async move {
                let (status, body) = match request.uri().path() {
                    "/_healthz" => (200, "ok".to_string()),
                    "/" => match home(&backends, visits.fetch_add(1, Ordering::Relaxed)).await {
                        Ok(page) => (200, page.to_string()),
                        Err(status) => (500, format!("{status:?}")),
                    },
                    _ => (404, "not found".to_string()),
                };
                let mut response = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
        );
    }
}

type Backends = (InventoryClient<Channel>, PricingClient<Channel>, CheckoutClient<Channel>);

/// The home page: a product, its price, the visitor's cart; whom each backend served.
async fn home((catalog, currency, cart): &Backends, visit: u32) -> Result<Value, Status> {
    let visitor = format!("{CANARY}-{visit}");
    let product = catalog.clone().get_stock(StockRequest { sku: visitor.clone(), updates: 0 }).await?.into_inner();
    let quotes = tokio_stream::iter([QuoteRequest { sku: visitor.clone(), quantity: 1 }]);
    let mut prices = currency.clone().quote(quotes).await?.into_inner();
    let price = prices.message().await?.ok_or_else(|| Status::internal("no quote"))?;
    let order = OrderRequest { customer: visitor, skus: vec!["OLJCESPC7Z".into()] };
    let cart = cart.clone().place_order(order).await?.into_inner();
    Ok(json!({
        "catalog": product.served_for,
        "currency": price.served_for,
        "cart": cart.trail.first().and_then(|t| t.strip_prefix("served for ")),
        "cart_items": cart.total_cents,
    }))
}

/// The load generator: waits until the frontend serves its page (as Online
/// Boutique's does in an init container), then asks for it `LOAD_REQUESTS` times.
async fn load_generator(started: Started, seen: Arc<Mutex<Seen>>) {
    let frontend = started.dns.resolve(&started.env["FRONTEND_ADDR"], NAMESPACE);
    let get = move || http_get(frontend, "/");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(tokio::task::spawn_blocking(get).await.unwrap(), Ok((200, _))) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..LOAD_REQUESTS {
        let page = match tokio::task::spawn_blocking(get).await.unwrap() {
            Ok((200, page)) => Ok(page),
            Ok((status, body)) => Err(format!("HTTP {status}: {body}")),
            Err(why) => Err(why),
        };
        seen.lock().unwrap().load.push(page);
    }
}

#[test]
fn a_pod_whose_account_may_not_request_its_certificate_waits_and_says_which_permission_it_lacks() {
    if let Some(why) = pods::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let (objects, _) = inject_all(&format!("{BOUTIQUE}/redis.yaml"), &["--no-rbac"]);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut kubelet = Kubelet::start(apps(&seen));
    let waiting = kubelet.apply(NAMESPACE, objects).unwrap_err();
    assert_eq!((waiting.pod.as_str(), waiting.status), ("redis-cart-0", "ContainerCreating"), "{waiting:?}");
    assert!(
        waiting.message.starts_with("MountVolume.SetUp failed for volume \"protomesh-identity\"")
            && waiting.message.contains(
                "User \"system:serviceaccount:boutique:default\" cannot create resource \"certificaterequests\" \
                 in API group \"cert-manager.io\" in the namespace \"boutique\""
            ),
        "{waiting:?}"
    );
}

/// The boutique's namespace at Pod Security's `restricted` level.
fn restricted_namespace() -> Value {
    json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": NAMESPACE,
        "labels": { "pod-security.kubernetes.io/enforce": "restricted" } } })
}

#[test]
fn with_the_cni_plugin_the_boutique_runs_meshed_in_a_restricted_namespace() {
    if let Some(why) = crate::cni::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let inject = |capture_by: &str| {
        let (mut objects, _) = inject_all(BOUTIQUE, &["--capture-by", capture_by]);
        objects.insert(0, restricted_namespace());
        objects
    };

    // Captured by an init container, the pods need NET_ADMIN and root: refused.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let refused = Kubelet::start(apps(&seen)).apply(NAMESPACE, inject("init")).unwrap_err();
    assert_eq!(refused.status, "Forbidden", "{refused:?}");
    assert!(refused.message.contains("container \"protomesh-init\" must not include [\"NET_ADMIN\"]"), "{refused:?}");

    // Captured by the node's plugin, every pod passes, starts and is meshed.
    let mut kubelet = Kubelet::with_cni(apps(&seen), NAMESPACE);
    if let Err(not_started) = kubelet.apply(NAMESPACE, inject("cni")) {
        panic!("{not_started:?}");
    }
    let redis = kubelet.pod("redis-cart-0").pod.name.clone();
    let rules = std::process::Command::new("ip")
        .args(["netns", "exec", &redis, "nft", "list", "table", "inet", "protomesh"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rules.stdout).contains("redirect to :4143"),
        "the plugin installed the pod's rules"
    );
    let (_, external) = kubelet.service(NAMESPACE, "frontend-external");
    let external = SocketAddr::new(external.unwrap().into(), 80);
    let (status, page) = kubelet.node.run(move || http_get(external, "/")).join().unwrap().unwrap();
    assert_eq!(status, 200, "{page}\n{}", sidecar_logs(&kubelet));
    assert_page(&page);
    let warmup = seen.lock().unwrap().warmup.clone().expect("the Job's app ran");
    assert_eq!(warmup.unwrap(), format!("served for {}", id("default")));
}
