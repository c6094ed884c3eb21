//! Hedging: a hedged method with one slow endpoint of two answers in about
//! the hedging delay, its hedges go to the other endpoint, and the slow
//! server sees its losing attempts cancelled.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use protomesh_samples::pb::echo::v1::EchoRequest;

use crate::harness::{Mesh, MeshOptions, within};
use crate::telemetry::{admin, sample};

/// Unary is marked free of side effects in its contract, so it may be hedged.
const HEDGE_UNARY: &str = "{methods: {echo.v1.Echo/Unary: {hedging: {max_attempts: 2, hedging_delay: 50ms}}}}";
const SLOW: Duration = Duration::from_secs(5);

#[tokio::test]
async fn one_slow_endpoint_costs_a_hedged_call_about_the_hedging_delay() {
    let mesh = Mesh::start_with(MeshOptions { servers: 2, client_policy: HEDGE_UNARY, ..Default::default() }).await;
    let slow = &mesh.backends[0];
    slow.slow_ms.store(SLOW.as_millis() as u32, Ordering::Relaxed);
    let cancelled = slow.cancelled_signal.notified();
    tokio::pin!(cancelled);
    cancelled.as_mut().enable();

    // Calls at once load both endpoints, so the balancer sends some to the slow one first.
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let calls = (0..8).map(|_| {
            let mut client = mesh.client();
            async move {
                let started = Instant::now();
                client.unary(EchoRequest::default()).await.expect("a hedged call succeeds");
                started.elapsed()
            }
        });
        latencies.extend(within("a round of calls", futures_util::future::join_all(calls)).await);
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    assert!(p99 < SLOW / 5, "p99 {p99:?}: no call waited for the slow endpoint");

    within("the slow server sees the losing attempt cancelled", cancelled).await;
    let metrics = admin(mesh.client_sidecar.admin_addr, "GET", "/metrics", "").await.1;
    let unary = r#"{direction="outbound",service="echo.v1.Echo",method="Unary"}"#;
    let hedges = sample(&metrics, &format!("protomesh_hedges_total{unary}")).unwrap_or(0.0);
    assert!(hedges >= 1.0, "{metrics}");
    assert_eq!(mesh.backends[1].calls.load(Ordering::Relaxed), 40, "every call was answered by the fast endpoint");
    assert_eq!(slow.calls.load(Ordering::Relaxed) as f64, hedges, "each hedge left the slow endpoint for the other");
}

#[tokio::test]
async fn a_method_not_marked_idempotent_is_not_hedged() {
    // ServerStream has no idempotency level in its contract.
    let policy = "{methods: {echo.v1.Echo/ServerStream: {hedging: {max_attempts: 2, hedging_delay: 10ms}}}}";
    let mesh = Mesh::start_with(MeshOptions { client_policy: policy, ..Default::default() }).await;
    let request = EchoRequest { reply_count: 1, delay_ms: 200, ..Default::default() };
    let mut stream = within("call", mesh.client().server_stream(request)).await.unwrap().into_inner();
    while within("stream", stream.message()).await.unwrap().is_some() {}
    assert_eq!(mesh.calls(), 1, "one attempt");
    let (_, check) = admin(mesh.client_sidecar.admin_addr, "GET", "/config", "").await;
    let config: serde_json::Value = serde_json::from_str(&check).unwrap();
    let methods = config.to_string();
    assert!(!methods.contains("hedging_delay"), "no method shows hedging: {methods}");
}
