//! `protomesh webhook`: the mutating admission webhook. The API server sends
//! each new pod (AdmissionReview v1 over HTTPS); the webhook runs the same
//! mutation as `protomesh inject` and answers with the difference as a JSON
//! Patch. Anything it cannot read gets a plain 400, and a pod it cannot
//! inject is allowed unchanged with a warning: the webhook never blocks a
//! pod's creation, nor hangs a request. Its certificate is read again when
//! its files change (a Secret volume swaps its `..data` link).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::inject::{self, Context, Verdict};
use super::settings::Defaults;
use crate::watch::DirWatch;

/// The largest review read; Kubernetes objects are at most about 1.5 MiB.
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;
/// How long a client has to send its request head, or finish its TLS handshake.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The webhook's settings, from `protomesh webhook`'s flags.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub defaults: Defaults,
    /// Read the certificate files again this often, besides on change.
    pub reload_interval: Duration,
    /// Keep the bindings of namespaces labelled for injection ([`super::grants`]).
    pub grant_namespaces: bool,
}

/// Answers one AdmissionReview. `namespace_enabled`: the pod's namespace is
/// labelled `protomesh.io/inject=enabled` (the API server calls the path that
/// says so). `Err` is the HTTP status and reason for a body that is not a review.
pub fn review(body: &[u8], namespace_enabled: bool, defaults: &Defaults) -> Result<Value, (StatusCode, String)> {
    let bad = |why: String| (StatusCode::BAD_REQUEST, why);
    let review: Value = serde_json::from_slice(body).map_err(|e| bad(format!("not JSON: {e}")))?;
    if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return Err(bad("not an AdmissionReview of admission.k8s.io/v1".into()));
    }
    let request = &review["request"];
    let Some(uid) = request["uid"].as_str() else {
        return Err(bad("request.uid: missing; an AdmissionReview request has one".into()));
    };
    let answer = |response: Value| {
        let mut response = response;
        response["uid"] = json!(uid);
        response["allowed"] = json!(true);
        json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response })
    };
    let warn = |why: String| answer(json!({ "warnings": [format!("protomesh: {why}")] }));
    let kind = &request["kind"];
    if kind["group"] != "" || kind["kind"] != "Pod" {
        return Ok(warn(format!("only pods are injected, not {}", kind["kind"].as_str().unwrap_or("this object"))));
    }
    if request["operation"] != "CREATE" {
        return Ok(answer(json!({})));
    }
    let pod = &request["object"];
    // A pod made by a controller has only generateName, and may carry no namespace.
    let namespace = request["namespace"].as_str().or(pod["metadata"]["namespace"].as_str());
    let context = Context {
        namespace,
        namespace_injection: namespace_enabled.then_some("enabled"),
        inject_all: false,
        workload: &inject::workload_of_pod(pod),
        defaults: defaults.clone(),
        // A review carries the pod alone, not the Services that select it.
        exposed_ports: Vec::new(),
    };
    match inject::inject(pod, &context) {
        Ok(Verdict::Injected(injected, _)) => {
            let patch = json_patch::diff(pod, &injected);
            let patch = serde_json::to_vec(&patch).expect("a patch serializes");
            let patch = base64::engine::general_purpose::STANDARD.encode(patch);
            Ok(answer(json!({ "patchType": "JSONPatch", "patch": patch })))
        }
        Ok(Verdict::Unchanged | Verdict::Skipped(_)) => Ok(answer(json!({}))),
        Err(why) => Ok(warn(format!("the sidecar was not added: {why}"))),
    }
}

/// The webhook's serving certificate, replaced when its files change.
#[derive(Debug)]
struct ServingCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn read_cert(config: &WebhookConfig) -> Result<CertifiedKey, String> {
    let provider = rustls::crypto::ring::default_provider();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("--cert {}: {e}", config.cert.display()))?;
    if chain.is_empty() {
        return Err(format!("--cert {}: holds no certificate", config.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| format!("--key {}: {e}", config.key.display()))?;
    let key =
        provider.key_provider.load_private_key(key).map_err(|e| format!("--key {}: {e}", config.key.display()))?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(|e| format!("--key {}: does not match --cert: {e}", config.key.display()))?;
    Ok(certified)
}

/// Listens on `config.listen` and serves the webhook until the process ends.
pub async fn run(config: WebhookConfig) -> Result<(), String> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("--listen: cannot listen on {}: {e}", config.listen))?;
    if config.grant_namespaces {
        let found = kube::Config::infer()
            .await
            .map_err(|e| format!("--grant-namespaces: no Kubernetes API server found: {e}"))?;
        let client = kube::Client::try_from(found).map_err(|e| format!("--grant-namespaces: {e}"))?;
        tokio::spawn(super::grants::run(client));
    }
    serve(listener, config).await
}

/// Serves the webhook on `listener` until the process ends.
pub async fn serve(listener: TcpListener, config: WebhookConfig) -> Result<(), String> {
    let cert = Arc::new(ServingCert(ArcSwap::from_pointee(read_cert(&config)?)));
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tokio::spawn(renew_cert(config.clone(), cert));
    tracing::info!(listen = ?listener.local_addr(), "webhook serving");
    let defaults = Arc::new(config.defaults);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, defaults) = (acceptor.clone(), defaults.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                _ => return tracing::debug!(%peer, "TLS handshake failed or timed out"),
            };
            let service = hyper::service::service_fn(move |request| {
                let defaults = defaults.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(request, &defaults).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

async fn handle(request: Request<Incoming>, defaults: &Defaults) -> Response<Full<Bytes>> {
    let namespace_enabled = match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz" | "/readyz") => return reply(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::POST, "/inject") => false,
        (&Method::POST, "/inject-namespace") => true,
        (_, "/inject" | "/inject-namespace" | "/healthz" | "/readyz") => {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n".into());
        }
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; POST an AdmissionReview to /inject\n".into(),
            );
        }
    };
    let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            return reply(StatusCode::BAD_REQUEST, "text/plain", format!("cannot read the review: {error}\n"));
        }
    };
    match review(&body, namespace_enabled, defaults) {
        Ok(response) => reply(StatusCode::OK, "application/json", response.to_string()),
        Err((status, why)) => {
            tracing::warn!(%why, "refused a request that is not a review");
            reply(status, "text/plain", format!("{why}\n"))
        }
    }
}

fn reply(status: StatusCode, kind: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    response
}

/// Reads the certificate again when its directory changes, and on the interval.
async fn renew_cert(config: WebhookConfig, cert: Arc<ServingCert>) {
    let mut watch = DirWatch::default();
    let dirs = [&config.cert, &config.key].map(|f| f.parent().map_or_else(|| ".".into(), |p| p.to_path_buf()));
    loop {
        watch.set(dirs.clone());
        tokio::select! {
            () = watch.changed(Duration::from_millis(200)) => {}
            () = tokio::time::sleep(config.reload_interval) => {}
        }
        match read_cert(&config) {
            Ok(renewed) if renewed.cert != cert.0.load().cert => {
                cert.0.store(Arc::new(renewed));
                tracing::info!(cert = %config.cert.display(), "serving certificate renewed");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "keeping the serving certificate: the files do not load"),
        }
    }
}
