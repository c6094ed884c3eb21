//! An OTLP/gRPC trace collector that keeps every span it receives with the
//! service name of its resource: enough to see a mesh's traces without
//! running Jaeger, and for tests to assert on them.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
pub struct Collector {
    /// Every span so far, with its service name.
    pub spans: Arc<Mutex<Vec<(String, Span)>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(show)
                .unwrap_or_default();
            let spans = resource_spans.scope_spans.into_iter().flat_map(|s| s.spans);
            self.spans.lock().expect("spans lock").extend(spans.map(|span| (service.clone(), span)));
        }
        self.arrived.notify_waiters();
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Listens on 127.0.0.1; returns the collector and its endpoint URL.
    pub async fn start() -> std::io::Result<(Collector, String)> {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tonic::transport::Server::builder().add_service(TraceServiceServer::new(collector.clone()));
        tokio::spawn(server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
        Ok((collector, format!("http://{addr}")))
    }

    /// Waits until at least `count` spans have arrived, and returns them all.
    pub async fn spans(&self, count: usize) -> Vec<(String, Span)> {
        loop {
            let arrived = self.arrived.notified();
            if self.spans.lock().expect("spans lock").len() >= count {
                return self.spans.lock().expect("spans lock").clone();
            }
            arrived.await;
        }
    }

    /// Waits for the next export.
    pub async fn next_export(&self) {
        self.arrived.notified().await;
    }
}

/// A trace or span ID as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A span attribute's value as text.
pub fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|a| a.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(show(value))
}

fn show(value: &Value) -> String {
    match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}
