//! Outlier detection and balancing across several servers: a failing
//! endpoint is ejected, traffic flows to the healthy ones, and the endpoint
//! returns after recovery; with every endpoint out, calls fail fast.

use std::sync::atomic::Ordering;

use protomesh_samples::pb::echo::v1::EchoRequest;
use tonic::Code;

use crate::harness::{Mesh, MeshOptions, within};

/// Ejections outlast the calls that count failures, even on a loaded machine.
const EJECT_AFTER_3: &str = "{outlier_detection: {consecutive_failures: 3, base_ejection: 2s}}";

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
async fn with_every_endpoint_out_calls_fail_fast_naming_the_breaker() {
    let mesh = Mesh::start_with(MeshOptions { client_policy: EJECT_AFTER_3, ..Default::default() }).await;
    mesh.backend.failing.store(true, Ordering::Relaxed);
    for _ in 0..3 {
        let status = within("unary", mesh.client().unary(EchoRequest::default())).await.unwrap_err();
        assert_eq!(status.message(), "backend failing");
    }
    let status = within("unary", mesh.client().unary(EchoRequest::default())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("circuit open: outlier detection"), "{status:?}");
    assert_eq!(mesh.calls(), 3, "the ejected endpoint is not called");
}
