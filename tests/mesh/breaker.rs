//! Outlier detection and balancing across several servers: an endpoint that
//! fails is ejected, traffic flows to the healthy ones, and the endpoint
//! returns after recovery. Statuses count against an endpoint only where a
//! method or the upstream says so, and an upstream is never cut off for
//! statuses alone; with every endpoint unreachable, calls fail fast. A
//! method's own circuit breaker cuts that method off, and only it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use protomesh_samples::pb::echo::v1::EchoRequest;
use tonic::Code;

use crate::harness::{Mesh, MeshOptions, within};
use crate::telemetry::{admin, sample};

/// Ejections outlast the calls that count failures, even on a loaded machine;
/// UNAVAILABLE counts against the endpoint that answers it.
const EJECT_AFTER_3: &str =
    "{outlier_detection: {consecutive_failures: 3, base_ejection: 2s, failure_codes: [UNAVAILABLE]}}";

fn served(mesh: &Mesh, server: usize) -> u64 {
    mesh.backends[server].calls.load(Ordering::Relaxed)
}

#[tokio::test]
async fn calls_spread_over_every_endpoint() {
    let mesh = Mesh::start_with(MeshOptions { servers: 3, ..Default::default() }).await;
    // Calls in flight at once weigh on each endpoint's load, so all take some.
    for _ in 0..8 {
        assert_eq!(within("round", round(&mesh, 8)).await, 0);
    }
    for server in 0..3 {
        assert!(
            served(&mesh, server) > 0,
            "server {server} got no call: {:?}",
            (0..3).map(|s| served(&mesh, s)).collect::<Vec<_>>()
        );
    }
}

/// Makes `count` calls at once; returns how many failed.
async fn round(mesh: &Mesh, count: usize) -> usize {
    let calls = (0..count).map(|_| {
        let mut client = mesh.client();
        async move { client.unary(EchoRequest::default()).await.is_err() }
    });
    futures_util::future::join_all(calls).await.into_iter().filter(|failed| *failed).count()
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_returns_after_recovery() {
    let mesh = Mesh::start_with(MeshOptions { servers: 2, client_policy: EJECT_AFTER_3, ..Default::default() }).await;
    mesh.backends[0].failing.store(true, Ordering::Relaxed);
    // Concurrent calls spread over both endpoints until the failing one has failed three times.
    within("the failing endpoint is ejected", async {
        let mut failures = 0;
        while failures < 3 {
            failures += round(&mesh, 8).await;
        }
    })
    .await;
    let seen_by_failing = served(&mesh, 0);
    assert_eq!(within("calls while ejected", round(&mesh, 20)).await, 0, "every call goes to the healthy endpoint");
    assert_eq!(served(&mesh, 0), seen_by_failing, "the ejected endpoint gets no call");

    // Recovered: after the ejection a probe finds it healthy, and it takes calls again.
    mesh.backends[0].failing.store(false, Ordering::Relaxed);
    within("the endpoint returns", async {
        while served(&mesh, 0) == seen_by_failing {
            assert_eq!(round(&mesh, 4).await, 0);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn one_failing_method_leaves_its_neighbours_answering() {
    let mesh = Mesh::start().await;
    let failing = EchoRequest { status_code: Code::Unavailable as i32, ..Default::default() };
    for _ in 0..20 {
        let status = within("failing", mesh.client().unary(failing.clone())).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let healthy = within("healthy", mesh.client().server_stream(EchoRequest::default())).await;
        assert!(healthy.is_ok(), "the healthy method answers: {healthy:?}");
    }
    let metrics = admin(mesh.client_sidecar.admin_addr, "GET", "/metrics", "").await.1;
    assert_eq!(
        sample(&metrics, "protomesh_endpoint_ejections_total"),
        Some(0.0),
        "the app's answers blame no endpoint"
    );
}

#[tokio::test]
async fn an_upstream_is_not_cut_off_for_statuses_alone() {
    // Unary counts UNAVAILABLE against the endpoint; with one endpoint, ejecting it would cut the service off.
    let policy = "{methods: {echo.v1.Echo/Unary: {endpoint_failure_codes: [UNAVAILABLE]}}, \
                  outlier_detection: {consecutive_failures: 3, base_ejection: 10s}}";
    let mesh = Mesh::start_with(MeshOptions { client_policy: policy, ..Default::default() }).await;
    mesh.backend.failing.store(true, Ordering::Relaxed);
    for _ in 0..6 {
        let status = within("unary", mesh.client().unary(EchoRequest::default())).await.unwrap_err();
        assert_eq!(status.message(), "backend failing", "the endpoint is still called");
    }
    assert_eq!(mesh.calls(), 6);
    let healthy = within("stream", mesh.client().server_stream(EchoRequest::default())).await;
    assert!(healthy.is_ok(), "the other method answers: {healthy:?}");
    let metrics = admin(mesh.client_sidecar.admin_addr, "GET", "/metrics", "").await.1;
    assert_eq!(sample(&metrics, "protomesh_endpoint_ejections_total"), Some(1.0), "{metrics}");
    let panicked = sample(&metrics, "protomesh_upstream_panic_calls_total").unwrap_or(0.0);
    assert!(panicked >= 4.0, "calls past the ejection went out in panic: {panicked}");
}

#[tokio::test]
async fn with_every_endpoint_unreachable_calls_fail_fast_naming_the_breaker() {
    // The server sidecar's app is gone: it answers UNAVAILABLE, marked as its app being unreachable.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let options = MeshOptions { app: Some(gone), client_policy: EJECT_AFTER_3, ..Default::default() };
    let mesh = Mesh::start_with(options).await;
    for _ in 0..3 {
        let status = within("unary", mesh.client().unary(EchoRequest::default())).await.unwrap_err();
        assert!(status.message().contains("local app at"), "{status:?}");
    }
    let status = within("unary", mesh.client().unary(EchoRequest::default())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("all endpoints ejected: outlier detection"), "{status:?}");
    let server = admin(mesh.server_sidecar.admin_addr, "GET", "/metrics", "").await.1;
    let calls: f64 = server
        .lines()
        .filter(|line| line.starts_with("protomesh_requests_total{direction=\"inbound\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(calls, 3.0, "the ejected endpoint is not called: {server}");
}

#[tokio::test]
async fn an_endpoint_resetting_connections_is_ejected_and_probed_back_while_calls_succeed() {
    let flaky = Flaky::start().await;
    let options = MeshOptions {
        servers: 2,
        upstream_endpoint: Some(format!("{{every_server}},{}", flaky.addr)),
        client_policy: "{outlier_detection: {consecutive_failures: 2, base_ejection: 1s}}",
        ..Default::default()
    };
    let mesh = Mesh::start_with(options).await;
    flaky.forward_to(mesh.server_sidecar.inbound_addr.unwrap());
    // Each round's calls share one connection attempt per endpoint: left in,
    // the resetting endpoint would be tried about once a round.
    for _ in 0..20 {
        assert_eq!(within("calls while it resets", round(&mesh, 6)).await, 0);
    }
    let metrics = admin(mesh.client_sidecar.admin_addr, "GET", "/metrics", "").await.1;
    assert!(sample(&metrics, "protomesh_endpoint_ejections_total").unwrap_or(0.0) >= 1.0, "{metrics}");
    let reset = flaky.accepted.load(Ordering::Relaxed);
    assert!(reset < 10, "ejected, it was left alone but for probes: {reset} connections");

    flaky.resetting.store(false, Ordering::Relaxed);
    within("probed back", async {
        while flaky.forwarded.load(Ordering::Relaxed) == 0 {
            assert_eq!(round(&mesh, 4).await, 0);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// An endpoint that resets every connection while `resetting`, and
/// otherwise forwards it to a real one.
struct Flaky {
    addr: std::net::SocketAddr,
    target: Arc<std::sync::OnceLock<std::net::SocketAddr>>,
    resetting: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
}

impl Flaky {
    async fn start() -> Flaky {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let flaky = Flaky {
            addr: listener.local_addr().unwrap(),
            target: Arc::default(),
            resetting: Arc::new(AtomicBool::new(true)),
            accepted: Arc::default(),
            forwarded: Arc::default(),
        };
        let (target, resetting) = (flaky.target.clone(), flaky.resetting.clone());
        let (accepted, forwarded) = (flaky.accepted.clone(), flaky.forwarded.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else { continue };
                if resetting.load(Ordering::Relaxed) {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    // Closed with linger 0: a reset, not an orderly close.
                    let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
                    continue;
                }
                forwarded.fetch_add(1, Ordering::Relaxed);
                let target = *target.get().unwrap();
                tokio::spawn(async move {
                    let mut server = tokio::net::TcpStream::connect(target).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut server).await;
                });
            }
        });
        flaky
    }

    fn forward_to(&self, target: std::net::SocketAddr) {
        self.target.set(target).unwrap();
    }
}

#[tokio::test]
async fn a_method_that_keeps_failing_is_cut_off_by_its_breaker_while_its_neighbours_answer() {
    let policy = "{methods: {echo.v1.Echo/Unary: {circuit_breaker: {consecutive_failures: 3, open_for: 300ms}}}}";
    let mesh = Mesh::start_with(MeshOptions { client_policy: policy, ..Default::default() }).await;
    mesh.backend.failing.store(true, Ordering::Relaxed);
    for _ in 0..3 {
        let status = within("unary", mesh.client().unary(EchoRequest::default())).await.unwrap_err();
        assert_eq!(status.message(), "backend failing");
    }
    let refused = within("unary", mesh.client().unary(EchoRequest::default())).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        refused.message().starts_with(
            "protomesh outbound: circuit breaker of method /echo.v1.Echo/Unary \
             (config policy.methods[\"echo.v1.Echo/Unary\"]) is open after 3 failed calls in a row"
        ),
        "{refused:?}"
    );
    assert!(refused.metadata().get("grpc-retry-pushback-ms").is_some(), "{refused:?}");
    assert_eq!(mesh.calls(), 3, "the refused call never left the client's sidecar");
    let metrics = admin(mesh.client_sidecar.admin_addr, "GET", "/metrics", "").await.1;
    assert!(metrics.contains("protomesh_circuit_breaker_open{breaker=\"method /echo.v1.Echo/Unary"), "{metrics}");
    let healthy = within("stream", mesh.client().server_stream(EchoRequest::default())).await;
    assert!(healthy.is_ok(), "the other method answers: {healthy:?}");
    assert_eq!(sample(&metrics, "protomesh_endpoint_ejections_total"), Some(0.0), "no endpoint was blamed");

    // Healed: once the breaker half-opens, a probe call closes it.
    mesh.backend.failing.store(false, Ordering::Relaxed);
    within("the breaker closes", async {
        while mesh.client().unary(EchoRequest::default()).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    for _ in 0..5 {
        within("unary", mesh.client().unary(EchoRequest::default())).await.expect("closed again");
    }
}

#[tokio::test]
async fn a_failing_endpoint_weighs_less_before_anything_ejects_it() {
    // No status counts against endpoints here, so outlier detection never acts: only the balancer's bias does.
    let mesh = Mesh::start_with(MeshOptions { servers: 2, ..Default::default() }).await;
    mesh.backends[0].failing.store(true, Ordering::Relaxed);
    let mut failed = 0;
    for _ in 0..25 {
        failed += within("round", round(&mesh, 8)).await;
    }
    // Unbiased, two equal endpoints would each take about half of the 200 calls.
    assert!(failed < 60, "{failed} of 200 calls went to the failing endpoint");
    assert!(failed > 0, "it is still tried, so it is seen when it is well again");
    let metrics = admin(mesh.client_sidecar.admin_addr, "GET", "/metrics", "").await.1;
    assert_eq!(sample(&metrics, "protomesh_endpoint_ejections_total"), Some(0.0));
}

#[tokio::test]
async fn an_endpoint_pushing_back_gets_no_calls_meanwhile() {
    let mesh = Mesh::start_with(MeshOptions { servers: 2, ..Default::default() }).await;
    let busy = EchoRequest {
        message: "busy".into(),
        status_code: Code::ResourceExhausted as i32,
        pushback_ms: 60_000,
        fail_first: 1,
        ..Default::default()
    };
    let status = within("busy", mesh.client().unary(busy)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let pushed = if served(&mesh, 0) == 1 { 0 } else { 1 };
    for _ in 0..20 {
        within("unary", mesh.client().unary(EchoRequest::default())).await.unwrap();
    }
    assert_eq!(served(&mesh, pushed), 1, "the endpoint that pushed back took no further call");
    assert_eq!(served(&mesh, 1 - pushed), 20);
}
