//! The admin server (HTTP/1.1, default :4191): `/live`, `/ready` (true once
//! certificates, contracts and listeners are up; false again while draining),
//! `/metrics` (Prometheus), `/config` (every method's effective policy and its
//! sources, as JSON), and `PUT /log-level`, which changes the log filter and
//! is answered only on localhost unless `admin.allow_remote_changes` is set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::contract::{Contracts, Idempotency};
use crate::policy::method::{MethodPolicy, Sourced};
use crate::telemetry::Metrics;

/// Changes the log filter at runtime (e.g. `info,protomesh=debug`).
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

pub struct Admin {
    pub ready: AtomicBool,
    metrics: Arc<Metrics>,
    config: String,
    set_log_level: Option<SetLogLevel>,
    allow_remote_changes: bool,
}

impl Admin {
    pub fn new(
        config: &Config,
        contracts: &Contracts,
        metrics: Arc<Metrics>,
        set_log_level: Option<SetLogLevel>,
    ) -> Admin {
        Admin {
            ready: AtomicBool::new(false),
            metrics,
            config: serde_json::to_string_pretty(&effective_policy(config, contracts)).expect("JSON values serialize"),
            set_log_level,
            allow_remote_changes: config.admin.allow_remote_changes,
        }
    }

    async fn handle(&self, peer: SocketAddr, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_string();
        match (request.method().clone(), path.as_str()) {
            (Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (Method::GET, "/ready") if self.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
            (Method::GET, "/ready") => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            (Method::GET, "/metrics") => {
                let mut response = text(StatusCode::OK, &self.metrics.encode());
                let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
                response
            }
            (Method::GET, "/config") => {
                let mut response = text(StatusCode::OK, &self.config);
                let kind = header::HeaderValue::from_static("application/json");
                response.headers_mut().insert(header::CONTENT_TYPE, kind);
                response
            }
            (Method::PUT, "/log-level") => self.set_log_level(peer, request).await,
            (_, "/live" | "/ready" | "/metrics" | "/config" | "/log-level") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found; try /live, /ready, /metrics, /config or PUT /log-level\n"),
        }
    }

    async fn set_log_level(&self, peer: SocketAddr, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if !peer.ip().is_loopback() && !self.allow_remote_changes {
            let why =
                "log level changes are accepted only from localhost (set admin.allow_remote_changes to allow others)\n";
            return text(StatusCode::FORBIDDEN, why);
        }
        let Some(set_log_level) = &self.set_log_level else {
            return text(StatusCode::NOT_IMPLEMENTED, "this process does not manage its log filter\n");
        };
        let body = match Limited::new(request.into_body(), 1024).collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => return text(StatusCode::BAD_REQUEST, "send the filter (at most 1 KiB) as the body\n"),
        };
        let filter = String::from_utf8_lossy(&body).trim().to_string();
        match set_log_level(&filter) {
            Ok(()) => text(StatusCode::OK, &format!("log filter is now {filter}\n")),
            Err(problem) => text(StatusCode::BAD_REQUEST, &format!("{problem}\n")),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Every method of the contracts with its effective policy, each field with its source.
pub fn effective_policy(config: &Config, contracts: &Contracts) -> Value {
    fn field<T>(value: &Option<Sourced<T>>, show: impl Fn(&T) -> Value) -> Value {
        value.as_ref().map_or(Value::Null, |v| json!({ "value": show(&v.value), "source": v.source.to_string() }))
    }
    let duration = |d: &std::time::Duration| json!(format!("{d:?}"));
    let methods: Vec<Value> = contracts
        .services()
        .into_values()
        .flatten()
        .map(|method| {
            let policy = MethodPolicy::resolve(&method.service, &method.method, Some(method), &config.policy);
            json!({
                "path": method.path,
                "shape": method.shape.to_string(),
                "idempotency": match method.idempotency {
                    Idempotency::Unknown => "unknown",
                    Idempotency::NoSideEffects => "no-side-effects",
                    Idempotency::Idempotent => "idempotent",
                },
                "timeout": field(&policy.timeout, duration),
                "stream_timeout": field(&policy.stream_timeout, duration),
                "idle_timeout": field(&policy.idle_timeout, duration),
                "retry": field(&policy.retry, |r| json!({
                    "max_attempts": r.max_attempts,
                    "retryable_codes": r.retryable_codes.iter().map(|c| c.name()).collect::<Vec<_>>(),
                    "initial_backoff": format!("{:?}", r.initial_backoff),
                    "max_backoff": format!("{:?}", r.max_backoff),
                    "backoff_multiplier": r.backoff_multiplier,
                })),
                "concurrency": field(&policy.concurrency, |c| json!({
                    "max_in_flight": c.max_in_flight,
                    "max_queue": c.max_queue,
                    "queue_timeout": format!("{:?}", c.queue_timeout),
                })),
                "allowed_callers": field(&method.contract.allowed_callers, |callers| {
                    json!(callers.iter().map(ToString::to_string).collect::<Vec<_>>())
                }),
            })
        })
        .collect();
    json!({ "identity": config.identity.cert.display().to_string(), "methods": methods })
}

/// Serves the admin endpoints until `shutdown` turns true.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::proxy::stopped(&mut shutdown) => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(peer, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
}
