//! The admin server (HTTP/1.1, default :4191): `/live`, `/ready` (true once
//! certificates, contracts and listeners are up; false again while draining;
//! its body says what the Kubernetes API server fails to answer, if anything),
//! `/metrics` (Prometheus), `/config` (the versions in service, the last
//! reload, and every method's effective policy and its sources, as JSON),
//! `GET /tap`, live calls copied and decoded as newline-delimited JSON for
//! `protomesh tap` (`telemetry/tap`), `PUT /log-level`, which changes the log filter, `POST /reload`, which
//! reads the config, contracts and identity files again, and `POST
//! /shutdown`, which drains and exits as SIGTERM does (`protomesh await
//! --shutdown`, `awaiting.rs`). The last five reveal or change state: they
//! are answered only on localhost unless `admin.allow_remote` is set. `/app-probe/...` runs one of the app's probes
//! for the kubelet (`probe.rs`). Connections are capped and must send their
//! request's head in time, so that the admin port never holds the file
//! descriptors the data plane needs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::probe;
use super::reload::{ReloadOutcome, Reloader};
use crate::config::probes::APP_PROBE_PREFIX;
use crate::contract::ContractMode;
use crate::effective;
use crate::policy::authz::MethodPattern;
use crate::proxy::open::OpenConnections;
use crate::telemetry::tap::{self, TapFilter};
use crate::telemetry::{Metrics, Taps};

/// Every admin answer's body: most are whole, a tap's is a stream.
type AdminBody = BoxBody<Bytes, Infallible>;

/// A tap with no event for this long sends an empty line, so that a reader
/// gone away is noticed and its tap ends.
const TAP_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);

/// Changes the log filter at runtime (e.g. `info,protomesh=debug`).
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

pub struct Admin {
    pub ready: AtomicBool,
    /// Told by `POST /shutdown`: the sidecar drains and exits, as on SIGTERM.
    pub shutdown: tokio::sync::Notify,
    metrics: Arc<Metrics>,
    reloader: Arc<Reloader>,
    set_log_level: Option<SetLogLevel>,
    taps: Arc<Taps>,
}

impl Admin {
    pub fn new(
        metrics: Arc<Metrics>,
        reloader: Arc<Reloader>,
        set_log_level: Option<SetLogLevel>,
        taps: Arc<Taps>,
    ) -> Admin {
        let shutdown = tokio::sync::Notify::new();
        Admin { ready: AtomicBool::new(false), shutdown, metrics, reloader, set_log_level, taps }
    }

    /// `ready`, and what the Kubernetes API server fails to answer, if
    /// anything: calls go on meanwhile, so the sidecar stays ready.
    fn ready_body(&self) -> String {
        let failing = self.metrics.discovery.trouble.failing();
        if failing.is_empty() {
            return "ready\n".into();
        }
        let mut body =
            "ready; the Kubernetes API server is failing (calls go on with the endpoints last known):\n".to_string();
        for (what, since, error) in failing {
            body.push_str(&format!("  {what}, for {}s: {error}\n", since.as_secs()));
        }
        body
    }

    async fn handle(&self, peer: SocketAddr, request: Request<Incoming>) -> Response<AdminBody> {
        let path = request.uri().path().to_string();
        match (request.method().clone(), path.as_str()) {
            (Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (Method::GET, "/ready") if self.ready.load(Ordering::Acquire) => text(StatusCode::OK, &self.ready_body()),
            (Method::GET, "/ready") => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            (Method::GET, "/metrics") => {
                let mut response = text(StatusCode::OK, &self.metrics.encode());
                let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
                response
            }
            (Method::GET, "/config") => {
                if let Some(refusal) = self.refuse_remote(peer, "the effective config") {
                    return refusal;
                }
                let config = serde_json::to_string_pretty(&self.config()).expect("JSON values serialize");
                let mut response = text(StatusCode::OK, &config);
                let kind = header::HeaderValue::from_static("application/json");
                response.headers_mut().insert(header::CONTENT_TYPE, kind);
                response
            }
            (Method::GET, "/tap") => match self.refuse_remote(peer, "tapped calls") {
                Some(refusal) => refusal,
                None => self.tap(request.uri().query().unwrap_or_default()),
            },
            (Method::PUT, "/log-level") => match self.refuse_remote(peer, "log level changes") {
                Some(refusal) => refusal,
                None => self.set_log_level(request).await,
            },
            (Method::POST, "/reload") => match self.refuse_remote(peer, "reloads") {
                Some(refusal) => refusal,
                None => match self.reloader.reload().await {
                    ReloadOutcome::Applied => text(StatusCode::OK, "reloaded\n"),
                    ReloadOutcome::Unchanged => text(StatusCode::OK, "unchanged\n"),
                    ReloadOutcome::Failed(error) => text(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        &format!("the running version stays in service: {error}\n"),
                    ),
                },
            },
            (Method::POST, "/shutdown") => match self.refuse_remote(peer, "shutdowns") {
                Some(refusal) => refusal,
                None => {
                    tracing::info!("POST /shutdown: draining and exiting");
                    self.shutdown.notify_one();
                    text(StatusCode::ACCEPTED, "shutting down\n")
                }
            },
            (Method::GET, path) if path.starts_with(APP_PROBE_PREFIX) => self.app_probe(path).await,
            (_, "/live" | "/ready" | "/metrics" | "/config" | "/tap" | "/log-level" | "/reload" | "/shutdown") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /live, /ready, /metrics, /config, /tap, PUT /log-level, POST /reload or POST /shutdown\n",
            ),
        }
    }

    /// Runs the app's probe at `path` for the kubelet: 200 when it passes, 503 when not.
    async fn app_probe(&self, path: &str) -> Response<AdminBody> {
        let routes = self.reloader.routes();
        let Some(app_probe) = routes.config.admin.app_probes.get(path) else {
            return text(StatusCode::NOT_FOUND, &format!("no app probe at {path} (admin.app_probes)\n"));
        };
        match probe::perform(app_probe).await {
            Ok(passed) => text(StatusCode::OK, &format!("{passed}\n")),
            Err(failed) => {
                tracing::debug!(path, %failed, "app probe failed");
                text(StatusCode::SERVICE_UNAVAILABLE, &format!("{failed}\n"))
            }
        }
    }

    /// What reveals or changes state is for localhost only, unless the config allows others.
    fn refuse_remote(&self, peer: SocketAddr, what: &str) -> Option<Response<AdminBody>> {
        let allowed = peer.ip().is_loopback() || self.reloader.routes().config.admin.allow_remote;
        let why = format!("{what}: only from localhost (set admin.allow_remote to serve other hosts)\n");
        (!allowed).then(|| text(StatusCode::FORBIDDEN, &why))
    }

    /// Starts a tap, and streams its events as JSON lines until the reader goes.
    fn tap(&self, query: &str) -> Response<AdminBody> {
        let filter = match TapFilter::parse(query) {
            Ok(filter) => filter,
            Err(problem) => return text(StatusCode::BAD_REQUEST, &format!("{problem}\n")),
        };
        let routes = self.reloader.routes();
        if routes.config.contracts.mode == ContractMode::Strict
            && let Some(unknown) = filter.methods.iter().find(|pattern| !declared(&routes.contracts, pattern))
        {
            let services: Vec<&str> = routes.contracts.services().into_keys().collect();
            let problem = format!(
                "tap: method={unknown}: no contract declares it, so no call of it passes this sidecar; the contracts \
                 declare {}\n",
                services.join(", ")
            );
            return text(StatusCode::BAD_REQUEST, &problem);
        }
        let subscription = match self.taps.subscribe(filter) {
            Ok(subscription) => subscription,
            Err(problem) => return text(StatusCode::SERVICE_UNAVAILABLE, &format!("tap: {problem}\n")),
        };
        let reloader = self.reloader.clone();
        let events = futures_util::stream::unfold(subscription, move |mut subscription| {
            let reloader = reloader.clone();
            async move {
                let line = match tokio::time::timeout(TAP_KEEPALIVE, subscription.events.recv()).await {
                    Err(_) => "\n".to_string(),
                    Ok(None) => return None,
                    Ok(Some(event)) => {
                        let types = reloader.routes().contracts.method_types(&event.path);
                        let (filter, lost) = (subscription.filter().clone(), subscription.lost());
                        // Decoded away from the worker, whose thread carries calls.
                        let rendered = tokio::task::spawn_blocking(move || tap::render(&event, types, &filter, lost));
                        format!("{}\n", rendered.await.ok()?)
                    }
                };
                Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), subscription))
            }
        });
        let mut response = Response::new(StreamBody::new(events).boxed());
        response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/x-ndjson"));
        response
    }

    /// The versions in service, the last reload, and every method's effective policy.
    fn config(&self) -> Value {
        let routes = self.reloader.routes();
        let methods: Vec<Value> = effective::describe(&routes.contracts, &routes.config.policy)
            .into_iter()
            .flat_map(|(_, methods)| methods)
            .map(|method| method.to_json())
            .collect();
        let mut config = self.reloader.status();
        config["methods"] = json!(methods);
        config["outbound"] = routes.outbound.describe();
        config
    }

    async fn set_log_level(&self, request: Request<Incoming>) -> Response<AdminBody> {
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

/// Whether the contracts declare a method `pattern` matches.
fn declared(contracts: &crate::contract::Contracts, pattern: &MethodPattern) -> bool {
    contracts.methods().any(|method| pattern.matches(&method.service, &method.method))
}

fn text(status: StatusCode, body: &str) -> Response<AdminBody> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Serves the admin endpoints for as long as it runs.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let open = OpenConnections::default();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let settings = admin.reloader.routes().config.admin.clone();
        let per_source = settings.max_connections_per_source;
        let Ok(admitted) = open.admit(peer.ip(), settings.max_connections, per_source) else {
            tracing::debug!(%peer, "admin connections at admin.max_connections or max_connections_per_source; closed");
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let service = hyper::service::service_fn(move |request| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(peer, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(settings.header_read_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
}
