//! Listeners: accept TCP within the connection limits, complete TLS when the
//! direction needs it, and serve HTTP/2 on each connection ([`connection`])
//! with a service built for that connection. When the drain starts, a
//! listener stops accepting and every connection sends GOAWAY and ends once
//! its calls have; the drain waits for all of them.
//!
//! [`connection`]: super::connection

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::Service;

use super::connection::{self, Ended};
use super::detect::{Prefixed, Protocol, detect};
use super::opaque;
use super::open::{OpenConnections, Past};
use super::routes::CurrentRoutes;
use crate::call::{AnswerErrors, CallService, Direction, ProxyError, RecvBody, ResponseBody};
use crate::capture;
use crate::config::{Config, MtlsMode};
use crate::identity::ALPN_OPAQUE;
use crate::identity::{SpiffeId, spiffe_id_of};
use crate::policy::authz::DefaultAuthorization;
use crate::telemetry::Metrics;
use crate::workers::Workers;

/// What the listener learned about the connection before the first request.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// The SPIFFE ID of a verified client certificate, or why there is none.
    pub identity: Result<SpiffeId, String>,
    /// Where the connection was made to, when the capture rules redirected it here.
    pub original_destination: Option<SocketAddr>,
}

/// What every listener of a sidecar shares.
#[derive(Clone)]
pub struct Serving {
    /// Where accepted connections are served, each on one worker.
    pub workers: Arc<Workers>,
    pub metrics: Arc<Metrics>,
    /// The routes in force, whose config has the limits in force.
    pub routes: CurrentRoutes,
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
    S: CallService<RecvBody> + Send + 'static,
    S::Future: Send + 'static,
{
    let Serving { workers, metrics, routes, drain } = serving;
    let new_service = Arc::new(move |peer| AnswerErrors::new(direction, new_service(peer)));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let open = OpenConnections::default();
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
        let limits = routes.load().config.limits;
        let admitted = match open.admit(addr.ip(), limits.max_connections, limits.max_connections_per_source) {
            Ok(admitted) => admitted,
            Err(past) => {
                let limit = match past {
                    Past::Total => "max_connections",
                    Past::PerSource => "max_connections_per_source",
                };
                tracing::debug!(%direction, %addr, limit, "connection closed at a limit");
                metrics.closed_at_limit(direction, limit);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let drain = drain.clone();
        let new_service = new_service.clone();
        let acceptor = acceptor.clone();
        let metrics = metrics.clone();
        let (config, routes) = (routes.load().config.clone(), routes.clone());
        workers.spawn(async move {
            let _admitted = admitted;
            let _open = metrics.connection_opened(direction);
            let original_destination = capture::original_destination(&tcp);
            let peer = PeerInfo { addr, identity: Err("a plaintext connection".into()), original_destination };
            let connection = Connection { peer, config, routes, metrics: metrics.clone(), drain };
            let ended = match acceptor {
                None => connection.outbound(tcp, &*new_service).await,
                Some(acceptor) => connection.inbound(tcp, &acceptor, &*new_service).await,
            };
            let limit = match ended {
                None | Some(Ended::Closed) => return,
                Some(Ended::Failed(error)) => {
                    return tracing::debug!(%direction, %addr, %error, "connection ended with an error");
                }
                Some(Ended::NoPreface) => "first_frame_timeout",
                Some(Ended::NoPingAnswer) => "keepalive_timeout",
                Some(Ended::Idle) => "idle_timeout",
            };
            tracing::debug!(%direction, %addr, limit, "connection closed at a limit");
            metrics.closed_at_limit(direction, limit);
        });
    }
}

/// One accepted connection, and what it is served with.
struct Connection {
    peer: PeerInfo,
    /// The config in force when it was accepted.
    config: Arc<Config>,
    /// The routes, read when the connection needs them; holding a version
    /// for the connection's life would keep its upstreams alive after a reload.
    routes: CurrentRoutes,
    metrics: Arc<Metrics>,
    drain: drain::Watch,
}

impl Connection {
    /// From the app: HTTP/2 made to the listener is served as gRPC. A
    /// connection the capture rules redirected is served as gRPC if it opens
    /// with the HTTP/2 preface, and forwarded to where it was going as opaque
    /// TCP otherwise; `None` then.
    async fn outbound<S>(self, tcp: TcpStream, new_service: &impl Fn(PeerInfo) -> S) -> Option<Ended>
    where
        S: Service<Request<RecvBody>, Response = Response<ResponseBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        let Connection { peer, config, routes, metrics, drain } = self;
        let limits = &config.limits;
        let Some(original) = peer.original_destination else {
            return Some(connection::serve(tcp, new_service(peer), limits, drain).await);
        };
        let outbound = &config.outbound;
        let protocol = if outbound.opaque_ports.contains(&original.port()) {
            (Protocol::Opaque, Prefixed::from(tcp))
        } else {
            match detect(tcp, outbound.detect_timeout).await {
                Ok(detected) => detected,
                Err(error) => {
                    tracing::debug!(addr = %peer.addr, %original, %error, "captured connection failed before it was detected");
                    return None;
                }
            }
        };
        match protocol {
            (Protocol::Http2, io) => Some(connection::serve(io, new_service(peer), limits, drain).await),
            (Protocol::Opaque, io) => {
                let tls = routes.load().outbound.opaque_tls(original);
                let forwarded = match tls {
                    Some(tls) => opaque::forward_over_mtls(io, original, outbound.connect_timeout, tls).await,
                    None => opaque::forward(io, original, outbound.connect_timeout).await,
                };
                metrics.opaque_connection(Direction::Outbound, forwarded.as_str());
                None
            }
        }
    }

    /// From a peer sidecar: mTLS, then gRPC, or opaque TCP for the app when
    /// the peer asked for it by ALPN. A plaintext client is refused, unless
    /// the capture rules brought it from an app port in permissive mode: then
    /// it is forwarded to the app as opaque TCP.
    async fn inbound<S>(
        self,
        tcp: TcpStream,
        acceptor: &tokio_rustls::TlsAcceptor,
        new_service: &impl Fn(PeerInfo) -> S,
    ) -> Option<Ended>
    where
        S: Service<Request<RecvBody>, Response = Response<ResponseBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        let Connection { mut peer, config, metrics, drain, .. } = self;
        let (limits, addr) = (&config.limits, peer.addr);
        let permissive = |port| config.inbound.as_ref().is_some_and(|i| i.mtls.mode_for(port) == MtlsMode::Permissive);
        if let Some(port) = peer.original_destination.map(|original| original.port())
            && permissive(port)
            && !sends_tls(&tcp, limits.tls_handshake_timeout).await
        {
            let app = SocketAddr::from(([127, 0, 0, 1], port));
            tracing::info!(%addr, %app, "plaintext connection forwarded to the app (inbound.mtls: permissive)");
            let forwarded = opaque::forward(tcp, app, config.outbound.connect_timeout).await;
            metrics.opaque_connection(Direction::Inbound, forwarded.as_str());
            return None;
        }
        let tls = match accept_tls(acceptor, tcp, addr, limits.tls_handshake_timeout).await {
            Ok(tls) => {
                metrics.tls_handshake(Direction::Inbound, "ok".into());
                tls
            }
            Err(result) => {
                metrics.tls_handshake(Direction::Inbound, result);
                return None;
            }
        };
        peer.identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            Some(leaf) => spiffe_id_of(leaf),
            None => Err("no client certificate".into()),
        };
        if tls.get_ref().1.alpn_protocol() == Some(ALPN_OPAQUE) {
            let app = opaque_app(&config, &peer)?;
            let forwarded = opaque::forward(tls, app, config.outbound.connect_timeout).await;
            metrics.opaque_connection(Direction::Inbound, forwarded.as_str());
            return None;
        }
        Some(connection::serve(tls, new_service(peer), limits, drain).await)
    }
}

/// Where opaque TCP from a peer sidecar goes: the app port it was made to,
/// or `inbound.app`; `None` (and logged) when the caller may not send it.
/// Authorization rules name gRPC methods, so opaque TCP takes
/// `authorization.default`: any authenticated caller, or none.
fn opaque_app(config: &Config, peer: &PeerInfo) -> Option<SocketAddr> {
    let inbound = config.inbound.as_ref()?;
    let addr = peer.addr;
    let caller = match &peer.identity {
        Ok(caller) => caller,
        Err(why) => {
            tracing::warn!(%addr, %why, "opaque TCP refused: the caller's certificate proves no SPIFFE ID");
            return None;
        }
    };
    if inbound.authorization.default == DefaultAuthorization::Deny {
        tracing::warn!(%addr, %caller, "opaque TCP refused by inbound.authorization.default: deny");
        return None;
    }
    let app = match peer.original_destination {
        Some(original) => Some(SocketAddr::from(([127, 0, 0, 1], original.port()))),
        None => inbound.app,
    };
    if app.is_none() {
        tracing::warn!(%addr, %caller, "opaque TCP refused: made to inbound.listen itself, and inbound.app is not set");
    }
    app
}

/// Whether the client's first byte opens a TLS handshake record (0x16),
/// waiting for it at most `timeout`.
async fn sends_tls(tcp: &TcpStream, timeout: Duration) -> bool {
    let mut first = [0u8; 1];
    matches!(tokio::time::timeout(timeout, tcp.peek(&mut first)).await, Ok(Ok(1))) && first[0] == 0x16
}

/// Completes a TLS handshake, or says why it failed in a few words fit for a
/// metric label: `plaintext_http2`, `timeout`, or the kind of TLS error.
async fn accept_tls(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
    let handshake = async {
        if sent_plaintext_http2(&tcp).await {
            tracing::warn!(%addr, "refused plaintext HTTP/2 on the mTLS listener");
            refuse_plaintext(tcp).await;
            return Err("plaintext_http2".to_string());
        }
        acceptor.accept(tcp).await.map_err(|error| {
            tracing::warn!(%addr, %error, "TLS handshake failed");
            handshake_failure(&error)
        })
    };
    tokio::time::timeout(timeout, handshake).await.unwrap_or_else(|_| {
        tracing::warn!(%addr, ?timeout, "TLS handshake timed out (limits.tls_handshake_timeout)");
        Err("timeout".into())
    })
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
    matches!(tcp.peek(&mut first).await, Ok(3)) && &first == b"PRI"
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
    // Read what the client still sends, for a moment: closing with its bytes
    // unread would reset the connection, and the client could lose the reason.
    let mut sink = [0u8; 4096];
    let lingering = async {
        for _ in 0..16 {
            if matches!(tcp.read(&mut sink).await, Ok(0) | Err(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), lingering).await;
}
