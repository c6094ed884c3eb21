//! Listeners: accept TCP, complete TLS when the direction needs it, and serve
//! HTTP/2 on each connection with a service built for that connection. When
//! the drain starts, a listener stops accepting and every connection sends
//! GOAWAY and ends once its calls have; the drain waits for all of them.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::call::{AnswerErrors, CallService, Direction};
use crate::identity::{SpiffeId, spiffe_id_of};
use crate::telemetry::Metrics;
use crate::workers::Workers;

/// Streams one HTTP/2 connection may carry at once. gRPC clients queue
/// beyond it, and it also bounds the pooled upstream connection peers open to us.
const MAX_CONCURRENT_STREAMS: u32 = 10_000;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the listener learned about the connection before the first request.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub addr: std::net::SocketAddr,
    /// The SPIFFE ID of a verified client certificate, or why there is none.
    pub identity: Result<SpiffeId, String>,
}

/// What every listener of a sidecar shares.
#[derive(Clone)]
pub struct Serving {
    /// Where accepted connections are served, each on one worker.
    pub workers: Arc<Workers>,
    pub metrics: Arc<Metrics>,
    /// Signalled when the sidecar drains; each connection holds it until it ends.
    pub drain: drain::Watch,
}

/// Serves `listener` until the drain starts. Each connection's calls go to
/// the service `new_service` makes for it, whose errors become statuses.
pub async fn serve<F, S>(
    listener: TcpListener,
    direction: Direction,
    tls: Option<Arc<ServerConfig>>,
    new_service: F,
    serving: Serving,
) where
    F: Fn(PeerInfo) -> S + Send + Sync + 'static,
    S: CallService<Incoming> + Clone + Send + 'static,
{
    let Serving { workers, metrics, drain } = serving;
    let new_service = Arc::new(move |peer| AnswerErrors::new(direction, new_service(peer)));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let draining = drain.clone().signaled();
    tokio::pin!(draining);
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%direction, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut draining => break,
        };
        let _ = tcp.set_nodelay(true);
        let drain = drain.clone();
        let new_service = new_service.clone();
        let acceptor = acceptor.clone();
        let metrics = metrics.clone();
        workers.spawn(async move {
            let _open = metrics.connection_opened(direction);
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20));
            let result = match acceptor {
                None => {
                    let service = TowerToHyperService::new(new_service(PeerInfo {
                        addr,
                        identity: Err("a plaintext connection".into()),
                    }));
                    let connection = builder.serve_connection(TokioIo::new(tcp), service);
                    tokio::pin!(connection);
                    drain.watch(connection, |c| c.as_mut().graceful_shutdown()).await
                }
                Some(acceptor) => {
                    let tls = match accept_tls(&acceptor, tcp, addr).await {
                        Ok(tls) => {
                            metrics.tls_handshake(direction, "ok".into());
                            tls
                        }
                        Err(result) => return metrics.tls_handshake(direction, result),
                    };
                    let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                        Some(leaf) => spiffe_id_of(leaf),
                        None => Err("no client certificate".into()),
                    };
                    let service = TowerToHyperService::new(new_service(PeerInfo { addr, identity }));
                    let connection = builder.serve_connection(TokioIo::new(tls), service);
                    tokio::pin!(connection);
                    drain.watch(connection, |c| c.as_mut().graceful_shutdown()).await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%direction, %addr, %error, "connection ended with an error");
            }
        });
    }
}

/// Completes a TLS handshake, or says why it failed in a few words fit for a
/// metric label: `plaintext_http2`, `timeout`, or the kind of TLS error.
async fn accept_tls(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    addr: std::net::SocketAddr,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
    if sent_plaintext_http2(&tcp).await {
        tracing::warn!(%addr, "refused plaintext HTTP/2 on the mTLS listener");
        refuse_plaintext(tcp).await;
        return Err("plaintext_http2".into());
    }
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(error)) => {
            tracing::warn!(%addr, %error, "TLS handshake failed");
            Err(handshake_failure(&error))
        }
        Err(_) => {
            tracing::warn!(%addr, "TLS handshake timed out");
            Err("timeout".into())
        }
    }
}

/// The rustls error's kind (its variant name), or `io` for other failures.
fn handshake_failure(error: &std::io::Error) -> String {
    match error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(tls) => format!("{tls:?}").split(['(', ' ', '{']).next().unwrap_or("tls").to_string(),
        None => "io".into(),
    }
}

/// A TLS connection opens with a handshake record (0x16); the HTTP/2 preface opens with `PRI`.
async fn sent_plaintext_http2(tcp: &TcpStream) -> bool {
    let mut first = [0u8; 3];
    matches!(tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await, Ok(Ok(3))) && &first == b"PRI"
}

/// Answers a plaintext HTTP/2 client in its own protocol, so that it reports a
/// readable reason: an empty SETTINGS frame, then GOAWAY(INADEQUATE_SECURITY).
async fn refuse_plaintext(mut tcp: TcpStream) {
    const DEBUG: &[u8] = b"protomesh inbound accepts only mTLS connections";
    let mut frames = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    let length = (8 + DEBUG.len()) as u32;
    frames.extend_from_slice(&length.to_be_bytes()[1..]);
    frames.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
    frames.extend_from_slice(&0u32.to_be_bytes());
    frames.extend_from_slice(&u32::from(h2::Reason::INADEQUATE_SECURITY).to_be_bytes());
    frames.extend_from_slice(DEBUG);
    let _ = tcp.write_all(&frames).await;
    let _ = tcp.shutdown().await;
}
