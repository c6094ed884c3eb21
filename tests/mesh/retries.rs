//! Retries across the pair against a backend that fails on demand: only
//! eligible methods, only their codes, within the budget, honouring pushback
//! and the deadline; and transparent retries of calls no peer processed.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use protomesh_samples::pb::echo::v1::EchoRequest;
use tonic::{Code, Request};

use crate::harness::{Mesh, MeshOptions, within};

/// Default retries apply to `Unary` (NO_SIDE_EFFECTS in echo.proto), not to `ServerStream`.
const RETRY_UNAVAILABLE: &str =
    "{defaults: {retry: {max_attempts: 3, retryable_codes: [UNAVAILABLE], initial_backoff: 5ms}}}";

fn flaky(key: &str, fail_first: u32, code: Code) -> EchoRequest {
    EchoRequest {
        message: key.into(),
        fail_first,
        status_code: code as i32,
        status_message: "flaky".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_flaky_idempotent_method_succeeds_through_retries() {
    let mesh = Mesh::start_with(MeshOptions { client_policy: RETRY_UNAVAILABLE, ..Default::default() }).await;
    let reply = within("unary", mesh.client().unary(flaky("a", 2, Code::Unavailable))).await;
    assert!(reply.is_ok(), "{reply:?}");
    assert_eq!(mesh.calls(), 3);
    assert_eq!(mesh.backend.last_header("grpc-previous-rpc-attempts").as_deref(), Some("2"));
}

#[tokio::test]
async fn attempts_stop_at_max_attempts_and_the_last_status_is_returned() {
    let mesh = Mesh::start_with(MeshOptions { client_policy: RETRY_UNAVAILABLE, ..Default::default() }).await;
    let status = within("unary", mesh.client().unary(flaky("b", 10, Code::Unavailable))).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::Unavailable, "flaky"));
    assert_eq!(mesh.calls(), 3);
}

#[tokio::test]
async fn only_the_policys_codes_are_retried() {
    let mesh = Mesh::start_with(MeshOptions { client_policy: RETRY_UNAVAILABLE, ..Default::default() }).await;
    let status = within("unary", mesh.client().unary(flaky("c", 2, Code::Internal))).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(mesh.calls(), 1);
}

#[tokio::test]
async fn a_method_that_is_not_idempotent_is_never_retried_after_it_was_sent() {
    let mesh = Mesh::start_with(MeshOptions { client_policy: RETRY_UNAVAILABLE, ..Default::default() }).await;
    // No reply before the failure: a trailers-only UNAVAILABLE, which would be retried if eligible.
    let request = EchoRequest { reply_count: 0, ..flaky("d", 1, Code::Unavailable) };
    let status = within("stream", mesh.client().server_stream(request)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(mesh.calls(), 1);
}

#[tokio::test]
async fn the_budget_caps_how_much_retries_add() {
    let mesh = Mesh::start_with(MeshOptions {
        client_policy: "{defaults: {retry: {max_attempts: 5, retryable_codes: [UNAVAILABLE], initial_backoff: 1ms, max_backoff: 2ms}},
                         retry_budget: {ratio: 0.2, min_per_second: 1},
                         outlier_detection: {consecutive_failures: 0}}",
        ..Default::default()
    })
    .await;
    const CALLS: u64 = 100;
    for _ in 0..CALLS {
        let status =
            within("unary", mesh.client().unary(flaky("always", u32::MAX, Code::Unavailable))).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    let seen = mesh.calls();
    // Without a budget every call would be tried 5 times.
    assert!(seen > CALLS, "some retries happen: {seen}");
    assert!(seen <= CALLS * 12 / 10 + 12, "the upstream saw {seen} calls for {CALLS}");
}

#[tokio::test]
async fn pushback_is_honoured_and_a_negative_one_stops_retries() {
    let mesh = Mesh::start_with(MeshOptions { client_policy: RETRY_UNAVAILABLE, ..Default::default() }).await;
    let stop = EchoRequest { pushback_ms: -1, ..flaky("e", 1, Code::Unavailable) };
    let status = within("unary", mesh.client().unary(stop)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(mesh.calls(), 1);

    let wait = EchoRequest { pushback_ms: 300, ..flaky("f", 1, Code::Unavailable) };
    let started = Instant::now();
    within("unary", mesh.client().unary(wait)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300), "retried after {:?}", started.elapsed());
    assert_eq!(mesh.calls(), 3);
}

#[tokio::test]
async fn no_retry_starts_past_the_deadline() {
    let mesh = Mesh::start_with(MeshOptions { client_policy: RETRY_UNAVAILABLE, ..Default::default() }).await;
    let mut request = Request::new(EchoRequest { pushback_ms: 2_000, ..flaky("g", 1, Code::Unavailable) });
    request.set_timeout(Duration::from_millis(500));
    let status = within("unary", mesh.client().unary(request)).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::Unavailable, "flaky"));
    assert_eq!(mesh.calls(), 1);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_passed_over_for_any_method() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mesh = Mesh::start_with(MeshOptions {
        upstream_endpoint: Some(format!("{closed},127.0.0.1:{{server}}")),
        ..Default::default()
    })
    .await;
    for _ in 0..6 {
        let request = EchoRequest { reply_count: 1, ..Default::default() };
        let mut stream = within("stream", mesh.client().server_stream(request)).await.unwrap().into_inner();
        assert!(within("reply", stream.message()).await.unwrap().is_some());
    }
    assert_eq!(mesh.backend.calls.load(Ordering::Relaxed), 6);
}

#[tokio::test]
async fn a_request_larger_than_the_replay_buffer_is_not_retried() {
    let mesh = Mesh::start_with(MeshOptions {
        client_policy: "{max_replay_bytes: 1024, defaults: {retry: {max_attempts: 3, retryable_codes: [UNAVAILABLE]}}}",
        ..Default::default()
    })
    .await;
    let large = EchoRequest { payload: vec![1; 4096].into(), ..flaky("large", 1, Code::Unavailable) };
    let status = within("unary", mesh.client().unary(large)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(mesh.calls(), 1);

    let small = EchoRequest { payload: vec![1; 512].into(), ..flaky("small", 1, Code::Unavailable) };
    within("unary", mesh.client().unary(small)).await.unwrap();
    assert_eq!(mesh.calls(), 3);
}
