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

use futures_util::future::BoxFuture;
use http::{Request, Response};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tower::Service;

use super::connection::{self, Ended};
use super::detect::{Prefixed, Protocol, detect};
use super::opaque::{self, Bounds, Target};
use super::open::{Admitted, OpenConnections, Past};
use super::routes::CurrentRoutes;
use super::shed::MemoryBudget;
use crate::call::{AnswerErrors, CallService, Direction, ProxyError, RecvBody, ResponseBody};
use crate::capture;
use crate::config::{Config, MtlsMode};
use crate::identity::ALPN_OPAQUE;
use crate::identity::{SpiffeId, spiffe_id_of};
use crate::policy::authz::DefaultAuthorization;
use crate::telemetry::{LogThrottle, Metrics};
use crate::workers::Workers;

/// What the listener learned about the connection before the first request.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub identity: PeerIdentity,
    /// Where the connection was made to, when the capture rules redirected it here.
    pub original_destination: Option<SocketAddr>,
}

/// Who is calling, as far as the connection proves it.
#[derive(Clone, Debug)]
pub enum PeerIdentity {
    /// The SPIFFE ID of a verified client certificate.
    Proven(SpiffeId),
    /// None, and why: the connection's calls are refused.
    Missing(String),
    /// None, as expected of a browser's gRPC-Web connection: its calls reach
    /// only the methods opened to callers without a certificate.
    Unauthenticated,
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
    /// Over it, no new opaque TCP is forwarded (calls are shed at the edges).
    pub memory: Arc<MemoryBudget>,
    /// Warnings that peers can cause, one line per source and reason per interval.
    pub warnings: Arc<LogThrottle>,
}

/// The listener's next connection, or `None` once the drain starts. A
/// failed accept (out of file descriptors and the like) backs off rather
/// than spins, and is logged as the `listener`'s.
pub(super) async fn next_connection<D: std::future::Future + Unpin>(
    listener: &TcpListener,
    draining: &mut D,
    warnings: &LogThrottle,
    name: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(error) => {
                    if let Some(unlogged) = warnings.note(std::net::Ipv6Addr::UNSPECIFIED.into(), "accept_failed") {
                        tracing::warn!(listener = name, %error, unlogged, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut *draining => return None,
        }
    }
}

/// Admits a connection from `addr` within `(max_connections, per source)`,
/// or counts it closed at the limit that refused it.
pub(super) fn admit(
    open: &OpenConnections,
    addr: SocketAddr,
    (max, per_source): (usize, usize),
    direction: Direction,
    metrics: &Metrics,
) -> Option<Admitted> {
    let past = match open.admit(addr.ip(), max, per_source) {
        Ok(admitted) => return Some(admitted),
        Err(past) => past,
    };
    let limit = match past {
        Past::Total => "max_connections",
        Past::PerKey => "max_connections_per_source",
    };
    tracing::debug!(%direction, %addr, limit, "connection closed at a limit");
    metrics.closed_at_limit(direction, limit);
    None
}

/// Serves a captured plaintext HTTP/1.1 connection to one of
/// `inbound.web.ports` (the web listener's front, given here so that this
/// file does not import it).
pub type WebFront = Arc<dyn Fn(TcpStream, PeerInfo) -> BoxFuture<'static, ()> + Send + Sync>;

/// Serves `listener` until the drain starts. Each connection's calls go to
/// the service `new_service` makes for it, whose errors become statuses.
/// `inbound` is the inbound listener's TLS, and its front for web ports.
pub async fn serve<F, S>(
    listener: TcpListener,
    direction: Direction,
    inbound: Option<(Arc<ServerConfig>, WebFront)>,
    new_service: F,
    serving: Serving,
) where
    F: Fn(PeerInfo) -> S + Send + Sync + 'static,
    S: CallService<RecvBody> + Send + 'static,
    S::Future: Send + 'static,
{
    let Serving { workers, metrics, routes, drain, memory, warnings } = serving;
    let new_service = Arc::new(move |peer| AnswerErrors::new(direction, new_service(peer)));
    let (acceptor, web) = inbound.map(|(tls, web)| (tokio_rustls::TlsAcceptor::from(tls), web)).unzip();
    let open = OpenConnections::default();
    let opaque = OpenConnections::default();
    let draining = drain.clone().signaled();
    tokio::pin!(draining);
    while let Some((tcp, addr)) = next_connection(&listener, &mut draining, &warnings, direction.as_str()).await {
        if direction == Direction::Outbound && !from_this_pod(&tcp, addr) {
            if let Some(unlogged) = warnings.note(addr.ip(), "not_from_this_pod") {
                tracing::warn!(%addr, unlogged, "refused a connection to the outbound listener from outside the pod: it calls with this workload's identity");
            }
            metrics.connection_refused(direction, "not_from_this_pod");
            continue;
        }
        let config = routes.load().config.clone();
        let limits = &config.limits;
        // Every outbound connection comes from the pod itself: a limit per
        // source would be one on everything the app sends.
        let per_source = match direction {
            Direction::Inbound => limits.max_connections_per_source,
            Direction::Outbound => usize::MAX,
        };
        let Some(admitted) = admit(&open, addr, (limits.max_connections, per_source), direction, &metrics) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let new_service = new_service.clone();
        let acceptor = acceptor.clone();
        let mut connection = Connection {
            peer: PeerInfo {
                addr,
                identity: PeerIdentity::Missing("a plaintext connection".into()),
                original_destination: None,
            },
            config,
            routes: routes.clone(),
            metrics: metrics.clone(),
            drain: drain.clone(),
            opaque: opaque.clone(),
            memory: memory.clone(),
            warnings: warnings.clone(),
            web: web.clone(),
        };
        workers.spawn(async move {
            let _admitted = admitted;
            let metrics = connection.metrics.clone();
            let _open = metrics.connection_opened(direction);
            connection.peer.original_destination = capture::original_destination(&tcp);
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

/// Whether a connection to the outbound listener was made inside the pod:
/// to a loopback address (only the pod reaches those, and the capture rules
/// redirect the app's connections there), or from one of the pod's own
/// addresses to itself. The kernel drops packets from outside that claim a
/// local source address, so no peer passes for the pod.
fn from_this_pod(tcp: &TcpStream, peer: SocketAddr) -> bool {
    let Ok(local) = tcp.local_addr() else { return false };
    let (local, peer) = (local.ip().to_canonical(), peer.ip().to_canonical());
    local.is_loopback() || local == peer
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
    /// The listener's opaque TCP connections, by destination.
    opaque: OpenConnections<SocketAddr>,
    memory: Arc<MemoryBudget>,
    warnings: Arc<LogThrottle>,
    /// Inbound: the front for captured connections to web ports.
    web: Option<WebFront>,
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
        let Some(original) = self.peer.original_destination else {
            return Some(connection::serve(tcp, new_service(self.peer), &self.config.limits, self.drain).await);
        };
        let outbound = &self.config.outbound;
        let protocol = if outbound.opaque_ports.contains(&original.port()) {
            (Protocol::Opaque, Prefixed::from(tcp))
        } else {
            match detect(tcp, outbound.detect_timeout).await {
                Ok(detected) => detected,
                Err(error) => {
                    let addr = self.peer.addr;
                    tracing::debug!(%addr, %original, %error, "captured connection failed before it was detected");
                    return None;
                }
            }
        };
        match protocol {
            (Protocol::Http2, io) => {
                Some(connection::serve(io, new_service(self.peer), &self.config.limits, self.drain).await)
            }
            (Protocol::Opaque, io) => {
                let originals = self.routes.load().outbound.original_destinations();
                let targets = match originals {
                    Some(originals) => originals.opaque_targets(original).await,
                    None => vec![Target { addr: original, tls: None }],
                };
                self.forward(Direction::Outbound, io, original, &targets).await;
                None
            }
        }
    }

    /// From a peer sidecar: mTLS, then gRPC, or opaque TCP for the app when
    /// the peer asked for it by ALPN. A plaintext client is refused, unless
    /// the capture rules brought it from an app port in permissive mode: then
    /// it is forwarded to the app as opaque TCP. A connection captured on its
    /// way to one of the sidecar's own ports is refused whatever it speaks.
    async fn inbound<S>(
        mut self,
        tcp: TcpStream,
        acceptor: &tokio_rustls::TlsAcceptor,
        new_service: &impl Fn(PeerInfo) -> S,
    ) -> Option<Ended>
    where
        S: Service<Request<RecvBody>, Response = Response<ResponseBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        let addr = self.peer.addr;
        let inbound = self.config.inbound.as_ref()?;
        if let Some(port) = self.peer.original_destination.map(|original| original.port()) {
            let app = SocketAddr::from(([127, 0, 0, 1], port));
            if let Some(listener) = self.config.own_listener_at(app) {
                if let Some(unlogged) = self.warnings.note(addr.ip(), "sidecar_port") {
                    tracing::warn!(%addr, port, listener, unlogged, "refused a connection to the sidecar's own port: it would act with this workload's identity");
                }
                self.metrics.connection_refused(Direction::Inbound, "sidecar_port");
                return None;
            }
            let permissive = inbound.mtls.mode_for(port) == MtlsMode::Permissive;
            let web = self.web.clone().filter(|_| inbound.web.as_ref().is_some_and(|web| web.ports.contains(&port)));
            if permissive || web.is_some() {
                let opened = match web {
                    None if inbound.opaque_ports.contains(&port) => Opening::Other,
                    _ => match opening(&tcp, web.is_some(), inbound.detect_timeout).await {
                        Heard::Said(opening) => opening,
                        Heard::Closed => return None,
                        Heard::Silent => {
                            tracing::debug!(%addr, port, "closed a silent connection (inbound.detect_timeout)");
                            self.metrics.closed_at_limit(Direction::Inbound, "detect_timeout");
                            return None;
                        }
                    },
                };
                if let (Some(web), Opening::Http1) = (web, opened) {
                    web(tcp, self.peer).await;
                    return None;
                }
                if permissive && opened != Opening::Tls {
                    if let Some(unlogged) = self.warnings.note(addr.ip(), "plaintext_forwarded") {
                        tracing::info!(%addr, %app, unlogged, "plaintext connection forwarded to the app (inbound.mtls: permissive)");
                    }
                    self.forward(Direction::Inbound, tcp, app, &[Target { addr: app, tls: None }]).await;
                    return None;
                }
            }
        }
        let timeout = self.config.limits.tls_handshake_timeout;
        let tls = match accept_tls(acceptor, tcp, addr, timeout, &self.warnings).await {
            Ok(tls) => {
                self.metrics.tls_handshake(Direction::Inbound, "ok".into());
                tls
            }
            Err(NotTls::Plaintext(tcp)) => {
                // Counted before the answer, so that a client told why has been counted.
                self.metrics.tls_handshake(Direction::Inbound, "plaintext_http2".into());
                let port = self.peer.original_destination.map(|original| original.port());
                refuse_plaintext(tcp, port).await;
                return None;
            }
            Err(NotTls::Failed(result)) => {
                self.metrics.tls_handshake(Direction::Inbound, result);
                return None;
            }
        };
        self.peer.identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(spiffe_id_of) {
            Some(Ok(id)) => PeerIdentity::Proven(id),
            Some(Err(why)) => PeerIdentity::Missing(why),
            None => PeerIdentity::Missing("no client certificate".into()),
        };
        if tls.get_ref().1.alpn_protocol() == Some(ALPN_OPAQUE) {
            let app = self.opaque_app(&self.peer)?;
            self.forward(Direction::Inbound, tls, app, &[Target { addr: app, tls: None }]).await;
            return None;
        }
        Some(connection::serve(tls, new_service(self.peer), &self.config.limits, self.drain).await)
    }

    /// Forwards `io`, made to `target`, as opaque TCP to the first of
    /// `targets` that answers, within the listener's limits on opaque TCP
    /// (counted by `target`) and the memory budget.
    async fn forward<IO>(&self, direction: Direction, io: IO, target: SocketAddr, targets: &[Target])
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let limits = &self.config.limits;
        let per_destination = limits.max_opaque_connections_per_destination;
        let admitted = match self.opaque.admit(target, limits.max_opaque_connections, per_destination) {
            Ok(admitted) => admitted,
            Err(past) => {
                let limit = match past {
                    Past::Total => "max_opaque_connections",
                    Past::PerKey => "max_opaque_connections_per_destination",
                };
                if let Some(unlogged) = self.warnings.note(target.ip(), limit) {
                    tracing::warn!(%direction, %target, limit, unlogged, "opaque TCP refused at a limit");
                }
                return self.metrics.closed_at_limit(direction, limit);
            }
        };
        if let Err(over) = self.memory.admit() {
            if let Some(unlogged) = self.warnings.note(target.ip(), "memory_budget") {
                tracing::warn!(%direction, %target, unlogged, "opaque TCP refused: {over}");
            }
            return self.metrics.closed_at_limit(direction, "memory_budget");
        }
        let bounds = Bounds::of(limits, self.config.outbound.connect_timeout);
        let forwarded = opaque::forward(io, targets, bounds).await;
        drop(admitted);
        self.metrics.opaque_connection(direction, forwarded.as_str());
        if let Some(limit) = forwarded.limit() {
            self.metrics.closed_at_limit(direction, limit);
        }
    }

    /// Where opaque TCP from a peer sidecar goes: the app port it was made
    /// to, or `inbound.app`; `None` (and logged) when the caller may not send
    /// it. Authorization rules name gRPC methods, so opaque TCP takes
    /// `authorization.default`: any authenticated caller, or none.
    fn opaque_app(&self, peer: &PeerInfo) -> Option<SocketAddr> {
        let inbound = self.config.inbound.as_ref()?;
        let addr = peer.addr;
        let refused = |reason: &'static str, why: &dyn std::fmt::Display| {
            if let Some(unlogged) = self.warnings.note(addr.ip(), reason) {
                tracing::warn!(%addr, unlogged, "opaque TCP refused: {why}");
            }
            None
        };
        let caller = match &peer.identity {
            PeerIdentity::Proven(caller) => caller,
            PeerIdentity::Missing(why) => {
                return refused("opaque_no_identity", &format!("the caller's certificate proves no SPIFFE ID: {why}"));
            }
            PeerIdentity::Unauthenticated => {
                return refused("opaque_no_identity", &"the caller has no certificate");
            }
        };
        if inbound.authorization.default == DefaultAuthorization::Deny {
            return refused("opaque_denied", &format!("{caller} by inbound.authorization.default: deny"));
        }
        match peer.original_destination {
            Some(original) => Some(SocketAddr::from(([127, 0, 0, 1], original.port()))),
            None => inbound
                .app
                .or_else(|| refused("opaque_no_app", &"made to inbound.listen itself, and inbound.app is not set")),
        }
    }
}

/// What a captured client on a permissive or web port sent first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opening {
    /// A TLS handshake record (0x16).
    Tls,
    /// An HTTP/1.x request line: a browser's or an HTTP client's.
    Http1,
    /// Anything else, HTTP/2's preface included.
    Other,
}

/// The methods an HTTP/1.x request line starts with, as far as the first
/// four bytes tell them from HTTP/2's preface (`PRI `).
const HTTP1_METHODS: [&[u8; 4]; 7] = [b"GET ", b"POST", b"PUT ", b"DELE", b"PATC", b"HEAD", b"OPTI"];

/// What the client's first bytes said, if anything.
enum Heard {
    Said(Opening),
    Closed,
    /// Too little in time.
    Silent,
}

/// Reads, without taking them, as many of the client's first bytes as tell
/// what it speaks, waiting at most `timeout`: on a web port, enough to tell
/// an HTTP/1.x request line; elsewhere only the first, so that a client
/// that sends one byte and waits is forwarded as before.
async fn opening(tcp: &TcpStream, web_port: bool, timeout: Duration) -> Heard {
    let read = async {
        let mut first = [0u8; 4];
        loop {
            let read = match tcp.peek(&mut first).await {
                Ok(0) | Err(_) => return Heard::Closed,
                Ok(read) => read,
            };
            if first[0] == 0x16 {
                return Heard::Said(Opening::Tls);
            }
            if !web_port {
                return Heard::Said(Opening::Other);
            }
            if read == first.len() {
                let http1 = HTTP1_METHODS.contains(&&first);
                return Heard::Said(if http1 { Opening::Http1 } else { Opening::Other });
            }
            if !HTTP1_METHODS.iter().any(|method| method.starts_with(&first[..read])) {
                return Heard::Said(Opening::Other);
            }
            // A request line cut short: peek again once more may have come.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(timeout, read).await.unwrap_or(Heard::Silent)
}

/// Why an inbound connection did not become a TLS stream.
enum NotTls {
    /// The client spoke plaintext HTTP/2: it is answered in kind (`refuse_plaintext`).
    Plaintext(TcpStream),
    /// The handshake failed, in a few words fit for a metric label:
    /// `timeout`, or the kind of TLS error.
    Failed(String),
}

/// Completes a TLS handshake within `timeout`, or says why not.
async fn accept_tls(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    timeout: Duration,
    warnings: &LogThrottle,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, NotTls> {
    let handshake = async {
        if sent_plaintext_http2(&tcp).await {
            if let Some(unlogged) = warnings.note(addr.ip(), "plaintext_http2") {
                tracing::warn!(%addr, unlogged, "refused plaintext HTTP/2 on the mTLS listener");
            }
            return Err(NotTls::Plaintext(tcp));
        }
        acceptor.accept(tcp).await.map_err(|error| {
            if let Some(unlogged) = warnings.note(addr.ip(), "tls_failed") {
                tracing::warn!(%addr, %error, unlogged, "TLS handshake failed");
            }
            NotTls::Failed(handshake_failure(&error))
        })
    };
    tokio::time::timeout(timeout, handshake).await.unwrap_or_else(|_| {
        if let Some(unlogged) = warnings.note(addr.ip(), "tls_timeout") {
            tracing::warn!(%addr, ?timeout, unlogged, "TLS handshake timed out (limits.tls_handshake_timeout)");
        }
        Err(NotTls::Failed("timeout".into()))
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

/// Streams a refused plaintext client may open before its connection closes.
const REFUSED_STREAMS: usize = 8;

/// Answers a plaintext HTTP/2 client in its own protocol, so that its calls
/// fail at once with a status that says why: each stream it opens gets a
/// trailers-only PERMISSION_DENIED naming the setting, and the connection is
/// closed (GOAWAY) after the first answer, within a second in all. A GOAWAY
/// before any stream would read to a gRPC client as "try again", and it
/// would reconnect until its deadline.
async fn refuse_plaintext(tcp: TcpStream, port: Option<u16>) {
    let message = match port {
        Some(port) => format!(
            "protomesh inbound: port {port} takes only mTLS from meshed workloads (inbound.mtls: strict); plaintext refused"
        ),
        None => {
            "protomesh inbound: the inbound listener takes only mTLS from meshed workloads; plaintext refused".into()
        }
    };
    let refusing = async {
        let mut connection = h2::server::Builder::new()
            .max_concurrent_streams(REFUSED_STREAMS as u32)
            .handshake::<_, bytes::Bytes>(tcp)
            .await?;
        let mut answered = 0;
        while answered < REFUSED_STREAMS {
            let Some(stream) = connection.accept().await else { return Ok(()) };
            let (_, mut respond) = stream?;
            let mut response = Response::new(());
            *response.headers_mut() = crate::grpc::status_headers(crate::grpc::Code::PermissionDenied, &message);
            respond.send_response(response, true)?;
            answered += 1;
            connection.graceful_shutdown();
        }
        std::future::poll_fn(|cx| connection.poll_closed(cx)).await
    };
    let _: Result<Result<(), h2::Error>, _> = tokio::time::timeout(Duration::from_secs(1), refusing).await;
}
