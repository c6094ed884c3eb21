//! Traces: both sidecars' spans reach an in-process OTLP collector as one
//! trace that continues the app's, with the RPC attributes and retried or
//! hedged attempts; with the collector gone, calls go on unaffected.

use protomesh_samples::collector::{Collector, Span, attribute, hex};
use protomesh_samples::pb::echo::v1::EchoRequest;
use tonic::{Code, Request};

use crate::harness::{Mesh, MeshOptions, within};

const APP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN: &str = "00f067aa0ba902b7";

async fn collector() -> (Collector, String) {
    Collector::start().await.unwrap()
}

/// Waits, bounded, until `count` spans have arrived.
async fn spans(collector: &Collector, count: usize) -> Vec<(String, Span)> {
    within("spans arrive", collector.spans(count)).await
}

fn traced(request: EchoRequest) -> Request<EchoRequest> {
    let mut request = Request::new(request);
    let traceparent = format!("00-{APP_TRACE}-{APP_SPAN}-01");
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    request
}

#[tokio::test]
async fn both_sidecars_spans_form_one_trace_under_the_apps_span() {
    let (collector, endpoint) = collector().await;
    let mesh =
        Mesh::start_with(MeshOptions { tracing: format!("{{otlp_endpoint: '{endpoint}'}}"), ..Default::default() })
            .await;
    within("call", mesh.client().unary(traced(EchoRequest::default()))).await.unwrap();
    // Outbound CLIENT span, its attempt, and the inbound SERVER span.
    let spans = spans(&collector, 3).await;
    let find = |service: &str, kind: i32| {
        let call = |span: &Span| span.kind == kind && span.name == "echo.v1.Echo/Unary";
        spans.iter().find(|(s, span)| s == service && call(span)).map(|(_, span)| span.clone()).unwrap()
    };
    let (client, server) = (find("client", 3), find("server", 2));
    let attempt = spans.iter().map(|(_, s)| s).find(|s| s.name.ends_with("attempt")).unwrap();
    for span in [&client, attempt, &server] {
        assert_eq!(hex(&span.trace_id), APP_TRACE, "{}", span.name);
    }
    assert_eq!(hex(&client.parent_span_id), APP_SPAN, "the outbound span continues the app's");
    assert_eq!(attempt.parent_span_id, client.span_id);
    assert_eq!(server.parent_span_id, attempt.span_id, "the inbound span is a child of the attempt");
    let app_saw = mesh.backend.last_header("traceparent").unwrap();
    assert_eq!(app_saw, format!("00-{APP_TRACE}-{}-01", hex(&server.span_id)), "the app continues the inbound span");

    assert_eq!(client.name, "echo.v1.Echo/Unary");
    assert_eq!(attribute(&client, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(attribute(&client, "rpc.service").as_deref(), Some("echo.v1.Echo"));
    assert_eq!(attribute(&client, "rpc.method").as_deref(), Some("Unary"));
    assert_eq!(attribute(&client, "rpc.grpc.status_code").as_deref(), Some("0"));
    let server_inbound = mesh.server_sidecar.inbound_addr.unwrap();
    assert_eq!(attribute(&client, "server.address"), Some(server_inbound.ip().to_string()));
    assert_eq!(attribute(&client, "server.port"), Some(server_inbound.port().to_string()));
    assert_eq!(attribute(&client, "protomesh.peer.identity").as_deref(), Some(crate::harness::id("server").as_str()));
    assert_eq!(attribute(&server, "protomesh.peer.identity").as_deref(), Some(crate::harness::id("client").as_str()));
    assert!(attribute(&server, "network.peer.address").is_some_and(|a| a.starts_with("127.0.0.1:")));
    // The request ID the client sidecar made follows the call to the app.
    let request_id = attribute(&client, "protomesh.request_id").expect("the client span carries the request ID");
    assert_eq!(attribute(&server, "protomesh.request_id"), Some(request_id.clone()));
    assert_eq!(mesh.backend.last_header("x-request-id"), Some(request_id));
}

#[tokio::test]
async fn retries_show_as_numbered_attempts_and_refusals_as_events() {
    let (collector, endpoint) = collector().await;
    let mesh = Mesh::start_with(MeshOptions {
        tracing: format!("{{otlp_endpoint: '{endpoint}'}}"),
        client_policy: "{defaults: {retry: {max_attempts: 3, retryable_codes: [UNAVAILABLE], initial_backoff: 1ms}}}",
        authorization: "{rules: [{name: nobody, methods: ['echo.v1.Echo/ClientStream'], callers: ['spiffe://x/y']}]}",
        ..Default::default()
    })
    .await;
    let flaky =
        EchoRequest { message: "m".into(), fail_first: 1, status_code: Code::Unavailable as i32, ..Default::default() };
    within("retried", mesh.client().unary(traced(flaky))).await.unwrap();
    let spans = spans(&collector, 5).await;
    let mut attempts: Vec<String> = spans
        .iter()
        .filter(|(_, s)| s.name.ends_with("attempt"))
        .filter_map(|(_, s)| attribute(s, "protomesh.attempt"))
        .collect();
    attempts.sort();
    assert_eq!(attempts, ["1", "2"]);

    within("denied", mesh.client().client_stream(tokio_stream::empty())).await.unwrap_err();
    let denied = within("the denial's span", async {
        for count in 1.. {
            let spans = collector.spans(count).await;
            if let Some((_, span)) = spans.iter().find(|(_, s)| s.name == "echo.v1.Echo/ClientStream" && s.kind == 2) {
                return span.clone();
            }
        }
        unreachable!("spans keep arriving")
    })
    .await;
    assert!(denied.events.iter().any(|e| e.name == "denied"), "{:?}", denied.events);
    assert_eq!(attribute(&denied, "rpc.grpc.status_code").as_deref(), Some("7"));
}

#[tokio::test]
async fn hedged_attempts_are_child_spans_of_their_call() {
    let (collector, endpoint) = collector().await;
    let mesh = Mesh::start_with(MeshOptions {
        tracing: format!("{{otlp_endpoint: '{endpoint}'}}"),
        client_policy: "{methods: {echo.v1.Echo/Unary: {hedging: {max_attempts: 2, hedging_delay: 20ms}}}}",
        servers: 2,
        ..Default::default()
    })
    .await;
    mesh.backends[0].slow_ms.store(3_000, std::sync::atomic::Ordering::Relaxed);
    // Calls at once load both endpoints, so some go to the slow one first and are hedged.
    let unary = r#"protomesh_hedges_total{direction="outbound",service="echo.v1.Echo",method="Unary"}"#;
    for _ in 0..10 {
        let calls = (0..8).map(|_| {
            let mut client = mesh.client();
            async move { client.unary(traced(EchoRequest::default())).await.unwrap() }
        });
        within("calls", futures_util::future::join_all(calls)).await;
        let metrics = crate::telemetry::admin(mesh.client_sidecar.admin_addr, "GET", "/metrics", "").await.1;
        if crate::telemetry::sample(&metrics, unary).unwrap_or(0.0) > 0.0 {
            break;
        }
    }
    let (first, second) = within("a hedged call's spans", async {
        for count in 1.. {
            let spans = collector.spans(count).await;
            let attempt = |number: &str, parent: Option<&[u8]>| {
                spans.iter().map(|(_, s)| s).find(|s| {
                    s.name.ends_with("attempt")
                        && attribute(s, "protomesh.attempt").as_deref() == Some(number)
                        && parent.is_none_or(|parent| s.parent_span_id == parent)
                })
            };
            if let Some(second) = attempt("2", None)
                && let Some(first) = attempt("1", Some(&second.parent_span_id))
            {
                return (first.clone(), second.clone());
            }
        }
        unreachable!("spans keep arriving")
    })
    .await;
    let spans = collector.spans(0).await;
    let call = spans.iter().map(|(_, s)| s).find(|s| s.span_id == first.parent_span_id).expect("the call's span");
    assert_eq!(call.kind, 3, "both attempts are children of the call's CLIENT span");
    assert_ne!(first.span_id, second.span_id);
}

#[tokio::test]
async fn with_the_collector_down_calls_are_unaffected() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mesh = Mesh::start_with(MeshOptions {
        tracing: format!("{{otlp_endpoint: 'http://{closed}'}}"),
        ..Default::default()
    })
    .await;
    for _ in 0..20 {
        within("call", mesh.client().unary(traced(EchoRequest::default()))).await.unwrap();
    }
    assert_eq!(mesh.calls(), 20);
}
