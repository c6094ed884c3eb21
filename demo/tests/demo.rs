//! The demo as users run it: a whole mesh that makes calls of every shape,
//! shows the identities each sidecar vouched for and the refusals, exports
//! one trace per order across every workload, and stops by itself.

use std::time::Duration;

use protomesh_samples::collector::{Collector, hex};
use tokio::process::Command;

const DEMO: &str = env!("CARGO_BIN_EXE_protomesh-demo");

async fn demo(args: &[&str]) -> String {
    let run = Command::new(DEMO).args(args).kill_on_drop(true).output();
    let output = tokio::time::timeout(Duration::from_secs(60), run).await.expect("the demo stops by itself").unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

#[tokio::test]
async fn the_demo_runs_a_whole_mesh_and_stops_by_itself() {
    let stdout = demo(&[]).await;
    assert!(stdout.contains("shop.v1.Checkout/PlaceOrder for ada: OK"), "{stdout}");
    for shape in ["(unary)", "(server-streaming)", "(client-streaming)", "(bidi-streaming)"] {
        assert!(stdout.contains(shape), "{shape} missing:\n{stdout}");
    }
    assert!(stdout.contains("served for spiffe://demo.protomesh.local/ns/shop/sa/checkout"), "{stdout}");
    assert!(stdout.contains("shop.v1.Inventory/GetStock: PermissionDenied: protomesh inbound"), "{stdout}");
    assert!(
        stdout.contains(r#"GET /v1/stock/apple (JSON): 200 {"sku":"apple","available":"#),
        "an HTTP client's JSON call: {stdout}"
    );
    assert!(stdout.contains("shop.v1.Checkout/CancelOrder: Unimplemented: protomesh outbound"), "{stdout}");
}

#[tokio::test]
async fn the_demo_exports_one_trace_per_order_across_every_workload() {
    let (collector, endpoint) = Collector::start().await.unwrap();
    let stdout = demo(&["--otlp", &endpoint]).await;
    let traces: Vec<&str> = stdout.lines().filter_map(|l| l.trim().strip_prefix("trace ")).collect();
    assert_eq!(traces.len(), 2, "{stdout}");
    // Each sidecar flushes its spans before the demo exits.
    let spans = collector.spans.lock().unwrap().clone();
    for trace in traces {
        let mut services: Vec<&str> = spans
            .iter()
            .filter(|(_, span)| hex(&span.trace_id) == trace)
            .map(|(service, _)| service.as_str())
            .collect();
        services.sort();
        services.dedup();
        assert_eq!(services, ["checkout", "frontend", "inventory", "pricing"], "trace {trace}");
    }
}
