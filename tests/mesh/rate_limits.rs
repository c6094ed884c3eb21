//! Rate limits at the server's sidecar: a method's limit holds within 10%
//! over seconds of calls from clients that honour the pushback, and one
//! caller spending its own limit leaves another's untouched.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protomesh_samples::pb::echo::v1::EchoRequest;
use protomesh_samples::pb::echo::v1::echo_client::EchoClient;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::harness::{Mesh, MeshOptions, within};

/// Calls `client` from `loops` loops for `length`, each waiting out the
/// pushback of a refusal; returns the calls answered OK, and a refusal.
async fn call_for(client: EchoClient<Channel>, loops: usize, length: Duration) -> (usize, Option<tonic::Status>) {
    let until = Instant::now() + length;
    let refusal = Arc::new(Mutex::new(None));
    let runs = (0..loops).map(|_| {
        let (mut client, refusal) = (client.clone(), refusal.clone());
        async move {
            let mut answered = 0;
            while Instant::now() < until {
                match within("a call", client.unary(EchoRequest::default())).await {
                    Ok(_) => answered += 1,
                    Err(status) => {
                        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                        let pushback = status.metadata().get("grpc-retry-pushback-ms").expect("a pushback");
                        let wait: u64 = pushback.to_str().unwrap().parse().unwrap();
                        refusal.lock().unwrap().replace(status);
                        tokio::time::sleep(Duration::from_millis(wait.clamp(1, 100))).await;
                    }
                }
            }
            answered
        }
    });
    let answered = futures_util::future::join_all(runs).await.into_iter().sum();
    let refusal = refusal.lock().unwrap().take();
    (answered, refusal)
}

/// Within 10% of what a bucket of `burst` refilled at `per_second` gives over `elapsed`.
fn assert_near_the_limit(answered: usize, per_second: f64, burst: f64, elapsed: Duration) {
    let allowed = burst + per_second * elapsed.as_secs_f64();
    let ratio = answered as f64 / allowed;
    assert!((0.9..=1.1).contains(&ratio), "{answered} calls answered, the limit allows {allowed:.0} ({ratio:.2})");
}

#[tokio::test]
async fn a_method_rate_limit_holds_within_ten_percent() {
    let policy = "{methods: {echo.v1.Echo/Unary: {rate_limit: {per_second: 50, burst: 5}}}}";
    let mesh = Mesh::start_with(MeshOptions { server_policy: policy, ..Default::default() }).await;
    let started = Instant::now();
    let (answered, refusal) = call_for(mesh.client(), 4, Duration::from_secs(3)).await;
    assert_near_the_limit(answered, 50.0, 5.0, started.elapsed());
    let refusal = refusal.expect("calls over the limit were refused");
    assert!(
        refusal.message().starts_with(
            "protomesh inbound: rate limit method /echo.v1.Echo/Unary (config policy.methods[\"echo.v1.Echo/Unary\"]) exceeded: 50 calls/s, burst 5"
        ),
        "{refusal:?}"
    );
}

#[tokio::test]
async fn one_caller_spending_its_limit_leaves_another_callers_untouched() {
    let policy = "{methods: {echo.v1.Echo/Unary: {caller_rate_limit: {per_second: 20, burst: 2}}}}";
    let mesh = Mesh::start_with(MeshOptions { server_policy: policy, ..Default::default() }).await;
    // Another workload's sidecar, as far as the server's sidecar can tell.
    let connection = Arc::new(Mutex::new(Some(mesh.connect_inbound("other").await)));
    let other = Endpoint::from_static("http://other.test")
        .connect_with_connector(tower::service_fn(move |_| {
            let stream = connection.lock().unwrap().take().expect("one connection");
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream)) }
        }))
        .await
        .unwrap();
    let mut other = EchoClient::new(other);

    let started = Instant::now();
    let busy = tokio::spawn(call_for(mesh.client(), 4, Duration::from_secs(2)));
    // Ten calls a second, half this caller's own limit: none is refused.
    while started.elapsed() < Duration::from_secs(2) {
        let reply = within("the other caller", other.unary(EchoRequest::default())).await;
        assert!(reply.is_ok(), "the other caller is not limited by the first: {reply:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (answered, refusal) = busy.await.unwrap();
    assert_near_the_limit(answered, 20.0, 2.0, started.elapsed());
    let refusal = refusal.expect("the busy caller was refused");
    assert!(refusal.message().contains("for caller spiffe://test.protomesh.local/ns/test/sa/client"), "{refusal:?}");
}
