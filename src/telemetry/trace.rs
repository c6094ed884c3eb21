//! Distributed tracing. Each sidecar records one span per call: CLIENT
//! outbound, SERVER inbound, named `pkg.Service/Method`, with the OTel RPC
//! attributes. A call continues the trace of its `traceparent` (W3C) or B3
//! headers, or starts one, and goes on carrying the new span as its parent,
//! so the apps' spans and both sidecars' spans form one trace. Spans leave
//! through a bounded queue to an OTLP/gRPC exporter; a full queue drops and
//! counts, and export never delays a call.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer, TracerProvider,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::duration;

/// Span export over OTLP/gRPC. Off unless an endpoint is set here or in
/// `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// e.g. `http://jaeger-collector.observability:4317`.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// For traces the caller did not start: the share sampled (parent-based).
    #[serde(default = "defaults::sample_ratio")]
    pub sample_ratio: f64,
    /// Sent with every export, e.g. an authorization header.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "defaults::export_timeout", deserialize_with = "duration::deserialize")]
    pub timeout: Duration,
    /// Spans waiting for export; beyond it spans are dropped (and counted).
    #[serde(default = "defaults::span_queue")]
    pub queue_size: usize,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            sample_ratio: defaults::sample_ratio(),
            headers: BTreeMap::new(),
            timeout: defaults::export_timeout(),
            queue_size: defaults::span_queue(),
        }
    }
}

impl TracingConfig {
    /// Each error is (field path, problem).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(("tracing.sample_ratio".into(), "a share between 0 and 1, e.g. 0.1 for 10%".into()));
        }
        Ok(())
    }
}

mod defaults {
    use std::time::Duration;

    pub fn sample_ratio() -> f64 {
        1.0
    }
    pub fn export_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn span_queue() -> usize {
        4096
    }
}

/// The span of a traced call, on its request for the layers below: each
/// attempt's span is its child.
#[derive(Clone, Debug)]
pub struct CallSpan(pub SpanContext);

/// Spans exported in one request at most.
const BATCH: usize = 512;

pub struct Tracing {
    /// Keeps its provider (and so the span queue) alive.
    tracer: SdkTracer,
    counts: Arc<SpanCounts>,
}

/// What became of the spans, for the metrics.
#[derive(Debug, Default)]
pub struct SpanCounts {
    /// Queued or being exported.
    pending: AtomicU64,
    dropped: AtomicU64,
    export_failures: AtomicU64,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracing")
    }
}

impl Tracing {
    /// `None` when no OTLP endpoint is configured. Must run inside a tokio runtime.
    pub fn start(config: &TracingConfig, service_name: Option<&str>) -> Result<Option<Tracing>, String> {
        let from_env = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
            .iter()
            .any(|name| std::env::var(name).is_ok_and(|v| !v.is_empty()));
        if config.otlp_endpoint.is_none() && !from_env {
            return Ok(None);
        }
        let mut metadata = tonic::metadata::MetadataMap::new();
        for (name, value) in &config.headers {
            let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes())
                .map_err(|_| format!("tracing.headers: `{name}` is not a header name"))?;
            let value = value.parse().map_err(|_| format!("tracing.headers.{name}: not a header value"))?;
            metadata.insert(key, value);
        }
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_timeout(config.timeout)
            .with_metadata(metadata);
        if let Some(endpoint) = &config.otlp_endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let mut exporter = builder.build().map_err(|e| format!("tracing.otlp_endpoint: {e}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        // OTEL_SERVICE_NAME, read by the builder, wins over the config.
        if let Some(name) = service_name.filter(|_| std::env::var_os("OTEL_SERVICE_NAME").is_none()) {
            resource = resource.with_service_name(name.to_string());
        }
        let resource = resource.build();
        exporter.set_resource(&resource);

        let (queue, spans) = mpsc::channel(config.queue_size.max(1));
        let counts = Arc::new(SpanCounts::default());
        tokio::spawn(export(spans, exporter, counts.clone()));
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))))
            .with_span_processor(Queue { queue, counts: counts.clone() })
            .build();
        let tracer = provider.tracer("protomesh");
        Ok(Some(Tracing { tracer, counts }))
    }

    /// The span counts, to register with the metrics.
    pub fn counts(&self) -> Arc<SpanCounts> {
        self.counts.clone()
    }

    /// Waits, at most `timeout`, until every finished span has been exported (or failed to).
    pub async fn flush(&self, timeout: Duration) {
        let flushed = async {
            while self.counts.pending.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let _ = tokio::time::timeout(timeout, flushed).await;
    }

    /// Starts the span of a call named `pkg.Service/Method`, continuing the
    /// trace in `headers`, and rewrites the headers to carry the new span.
    pub fn start_call(&self, headers: &mut HeaderMap, name: &str, kind: SpanKind, attributes: Vec<KeyValue>) -> Span {
        let parent =
            extract(headers).map_or_else(Context::new, |remote| Context::new().with_remote_span_context(remote));
        let span = self
            .tracer
            .span_builder(name.to_string())
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        inject(headers, opentelemetry::trace::Span::span_context(&span));
        span
    }

    /// A child of `parent` (e.g. one attempt of a retried call), carried by `headers`.
    pub fn start_child(
        &self,
        headers: &mut HeaderMap,
        parent: &SpanContext,
        name: String,
        attributes: Vec<KeyValue>,
    ) -> Span {
        let parent = Context::new().with_remote_span_context(parent.clone());
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        inject(headers, opentelemetry::trace::Span::span_context(&span));
        span
    }
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");

/// The W3C `traceparent`, or else B3 (single `b3` or multi `x-b3-*` headers).
pub fn extract(headers: &HeaderMap) -> Option<SpanContext> {
    let text = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(parent) = text(TRACEPARENT).and_then(parse_traceparent) {
        let state = text(TRACESTATE).and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
        return Some(SpanContext::new(parent.0, parent.1, parent.2, true, state));
    }
    let (trace, span, sampled) = match text(B3) {
        Some(single) => {
            let mut parts = single.split('-');
            (parts.next()?, parts.next()?, parts.next())
        }
        None => (text(X_B3_TRACEID)?, text(X_B3_SPANID)?, text(X_B3_SAMPLED)),
    };
    let trace = TraceId::from_hex(&format!("{trace:0>32}")).ok().filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = if matches!(sampled, Some("1" | "d")) { TraceFlags::SAMPLED } else { TraceFlags::default() };
    Some(SpanContext::new(trace, span, flags, true, TraceState::default()))
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`; other versions are read by the same fields.
fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace, span, TraceFlags::new(flags) & TraceFlags::SAMPLED))
}

/// Writes `context` as the new parent: `traceparent`, and B3 if the call came with B3.
fn inject(headers: &mut HeaderMap, context: &SpanContext) {
    let sampled = if context.is_sampled() { "01" } else { "00" };
    let traceparent = format!("00-{}-{}-{sampled}", context.trace_id(), context.span_id());
    headers.insert(TRACEPARENT, HeaderValue::from_str(&traceparent).expect("hex and dashes"));
    if headers.contains_key(B3) {
        let b3 = format!("{}-{}-{}", context.trace_id(), context.span_id(), &sampled[1..]);
        headers.insert(B3, HeaderValue::from_str(&b3).expect("hex and dashes"));
    }
    if headers.contains_key(X_B3_SPANID) {
        let span = HeaderValue::from_str(&context.span_id().to_string()).expect("hex");
        headers.insert(X_B3_SPANID, span);
    }
}

/// The span processor: a bounded queue to the exporter task.
#[derive(Debug)]
struct Queue {
    queue: mpsc::Sender<SpanData>,
    counts: Arc<SpanCounts>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _: &mut Span, _: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.counts.pending.fetch_add(1, Ordering::AcqRel);
        if self.queue.try_send(span).is_err() {
            self.counts.pending.fetch_sub(1, Ordering::AcqRel);
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Exports queued spans in batches until the queue closes.
async fn export(
    mut spans: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    counts: Arc<SpanCounts>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while spans.recv_many(&mut batch, BATCH).await > 0 {
        let size = batch.len() as u64;
        if let Err(error) = exporter.export(std::mem::take(&mut batch)).await {
            counts.export_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%error, "span export failed");
        }
        counts.pending.fetch_sub(size, Ordering::AcqRel);
    }
}

impl prometheus_client::collector::Collector for SpanCounts {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::{MetricType, counter::ConstCounter};
        let counters = [
            ("spans_dropped", "Spans dropped because the export queue was full", &self.dropped),
            ("span_export_failures", "Span batches the OTLP endpoint did not take", &self.export_failures),
        ];
        for (name, help, value) in counters {
            let metric = ConstCounter::new(value.load(Ordering::Relaxed));
            metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap())).collect()
    }

    #[test]
    fn reads_w3c_traceparent_and_keeps_tracestate() {
        let context = extract(&headers(&[
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]))
        .unwrap();
        assert_eq!(context.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled() && context.is_remote());
        assert_eq!(context.trace_state().get("congo"), Some("t61rcWkgMzE"));
    }

    #[test]
    fn refuses_malformed_traceparents() {
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(extract(&headers(&[("traceparent", bad)])).is_none(), "{bad}");
        }
    }

    #[test]
    fn reads_b3_single_and_multi_headers() {
        let single = extract(&headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")])).unwrap();
        assert_eq!(single.span_id().to_string(), "e457b5a2e4d86bd1");
        assert!(single.is_sampled());
        let multi = extract(&headers(&[
            ("x-b3-traceid", "64fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "0"),
        ]))
        .unwrap();
        assert_eq!(multi.trace_id().to_string(), "000000000000000064fe8b2a57d3eff7", "64-bit IDs are left-padded");
        assert!(!multi.is_sampled());
    }

    #[test]
    fn injects_the_new_parent_in_the_formats_that_came_in() {
        let mut carried = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        let context = SpanContext::new(
            TraceId::from_hex("80f198ee56343ba864fe8b2a57d3eff7").unwrap(),
            SpanId::from_hex("1111111111111111").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        inject(&mut carried, &context);
        assert_eq!(carried["traceparent"], "00-80f198ee56343ba864fe8b2a57d3eff7-1111111111111111-01");
        assert_eq!(carried["b3"], "80f198ee56343ba864fe8b2a57d3eff7-1111111111111111-1");
    }
}
