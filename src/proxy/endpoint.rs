//! One peer address and a multiplexed HTTP/2 connection to it per worker:
//! connected on first use, shared by every call of that worker, replaced when
//! it closes. Concurrent callers share one connect attempt; no lock is held
//! across an await.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use h2::client::SendRequest;
use http::{Request, Response};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::exchange;
use super::keepalive::keep_alive;
use crate::call::{ConnectError, ProxyError, RecvBody, RequestBody, Target};
use crate::config::{CONNECTION_WINDOW, Config};
use crate::identity::IdentityMismatch;
use crate::workers;

/// How to reach peers: plaintext (the local app) or mTLS (peer sidecars).
#[derive(Debug)]
pub enum Transport {
    Plaintext,
    Mtls(Arc<ClientConfig>),
}

/// An open HTTP/2 connection: the handle to start streams on it, and whether
/// its task has ended.
#[derive(Clone)]
struct Connection {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Connection {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

type Connecting = Shared<BoxFuture<'static, Result<Connection, Arc<ConnectError>>>>;

enum State {
    Idle,
    Connecting(Connecting),
    Ready(Connection),
}

/// How connections to peers and to the app are opened and kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectSettings {
    pub timeout: Duration,
    /// Each stream's receive window; see `limits.stream_window`.
    pub stream_window: u32,
    /// The largest response head or trailers taken.
    pub max_header_list_size: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl ConnectSettings {
    pub fn of(config: &Config) -> ConnectSettings {
        ConnectSettings {
            timeout: config.outbound.connect_timeout,
            stream_window: config.limits.stream_window(),
            max_header_list_size: config.limits.max_header_list_size(),
            keepalive_interval: config.limits.keepalive_interval,
            keepalive_timeout: config.limits.keepalive_timeout,
        }
    }
}

pub struct Endpoint {
    pub addr: SocketAddr,
    target: Target,
    transport: Arc<Transport>,
    settings: ConnectSettings,
    /// One connection per worker, so that a call stays on its worker's thread.
    state: Box<[Mutex<State>]>,
}

impl Endpoint {
    pub fn is_mtls(&self) -> bool {
        matches!(*self.transport, Transport::Mtls(_))
    }

    pub fn new(
        addr: SocketAddr,
        target: Target,
        transport: Arc<Transport>,
        settings: ConnectSettings,
        workers: usize,
    ) -> Endpoint {
        Endpoint {
            addr,
            target,
            transport,
            settings,
            state: (0..workers.max(1)).map(|_| Mutex::new(State::Idle)).collect(),
        }
    }

    /// The connection slot of the worker running this call.
    fn state(&self) -> &Mutex<State> {
        &self.state[workers::current() % self.state.len()]
    }

    /// A handle on this endpoint's connection that can start a stream,
    /// connecting first if need be. When the connection can take no new
    /// stream (closing, or told to go away), a fresh one is opened.
    pub async fn ready(&self) -> Result<SendRequest<Bytes>, ProxyError> {
        let Connection { sender, closed } = self.connection().await?;
        match sender.ready().await {
            Ok(sender) => Ok(sender),
            Err(_) => {
                self.forget(&closed);
                let fresh = self.connection().await?;
                fresh.sender.ready().await.map_err(|error| self.failed(error))
            }
        }
    }

    /// Starts one call on a handle from [`Endpoint::ready`]: the request is
    /// sent (or on its way) when this returns, and the future resolves to the
    /// peer's response.
    pub fn start(
        &self,
        sender: &mut SendRequest<Bytes>,
        request: Request<RequestBody>,
    ) -> Result<impl Future<Output = Result<Response<RecvBody>, ProxyError>> + Send + use<>, ProxyError> {
        let exchange = exchange::start(sender, request).map_err(|error| self.failed(error))?;
        let target = self.target.clone();
        Ok(exchange.map(move |result| match result {
            Ok(response) => Ok(response.map(|body| body.from_peer(target))),
            Err(error) => Err(ProxyError::Upstream { target, error }),
        }))
    }

    fn failed(&self, error: h2::Error) -> ProxyError {
        ProxyError::Upstream { target: self.target.clone(), error }
    }

    /// The endpoint's connection, opened if there is none; concurrent callers
    /// share one attempt.
    async fn connection(&self) -> Result<Connection, ProxyError> {
        let connecting = {
            let mut state = self.state().lock().expect("endpoint state lock");
            match &*state {
                State::Ready(connection) if !connection.is_closed() => return Ok(connection.clone()),
                State::Connecting(connecting) => connecting.clone(),
                State::Ready(_) | State::Idle => {
                    let connecting = connect(self.addr, self.transport.clone(), self.settings)
                        .map(|result| result.map_err(Arc::new))
                        .boxed()
                        .shared();
                    *state = State::Connecting(connecting.clone());
                    connecting
                }
            }
        };
        let result = connecting.await;
        let mut state = self.state().lock().expect("endpoint state lock");
        if matches!(*state, State::Connecting(_)) {
            *state = match &result {
                Ok(connection) => State::Ready(connection.clone()),
                Err(_) => State::Idle,
            };
        }
        result.map_err(|error| ProxyError::Connect { target: self.target.clone(), error })
    }

    /// Drops a connection seen to be closing, unless a newer one replaced it.
    fn forget(&self, closing: &Arc<AtomicBool>) {
        let mut state = self.state().lock().expect("endpoint state lock");
        if let State::Ready(current) = &*state
            && Arc::ptr_eq(&current.closed, closing)
        {
            *state = State::Idle;
        }
    }
}

async fn connect(
    addr: SocketAddr,
    transport: Arc<Transport>,
    settings: ConnectSettings,
) -> Result<Connection, ConnectError> {
    let connecting = async {
        let tcp = TcpStream::connect(addr).await.map_err(ConnectError::Io)?;
        tcp.set_nodelay(true).map_err(ConnectError::Io)?;
        match &*transport {
            Transport::Plaintext => Ok(Box::new(tcp) as Box<dyn Io>),
            Transport::Mtls(config) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                    .await
                    .map_err(tls_error)?;
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(ConnectError::NoH2Alpn);
                }
                Ok(Box::new(tls) as Box<dyn Io>)
            }
        }
    };
    let io = tokio::time::timeout(settings.timeout, connecting).await.map_err(|_| ConnectError::Timeout)??;
    let (sender, mut connection) = h2::client::Builder::new()
        // Until the peer's SETTINGS say otherwise, as many streams as RFC 9113 says any peer allows.
        .initial_max_send_streams(100)
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(settings.max_header_list_size)
        .enable_push(false)
        .handshake(io)
        .await
        .map_err(ConnectError::Http2)?;
    let closed = Arc::new(AtomicBool::new(false));
    let closing = closed.clone();
    let pings = connection.ping_pong();
    tokio::spawn(async move {
        tokio::select! {
            biased;
            result = &mut connection => if let Err(error) = result {
                tracing::debug!(%addr, %error, "connection closed");
            },
            () = keep_alive(pings, settings.keepalive_interval, settings.keepalive_timeout) => {
                tracing::debug!(%addr, timeout = ?settings.keepalive_timeout, "no answer to a keepalive ping; closing the connection");
            }
        }
        closing.store(true, Ordering::Release);
    });
    Ok(Connection { sender, closed })
}

/// Data buffered per stream before a request body waits for the peer.
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// A connection's byte stream, plaintext or TLS.
trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Picks the identity mismatch out of a failed handshake, so the caller is told
/// which identity was expected and which one was presented.
fn tls_error(error: std::io::Error) -> ConnectError {
    let mismatch = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).and_then(|e| match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<IdentityMismatch>().cloned()
        }
        _ => None,
    });
    match mismatch {
        Some(mismatch) => ConnectError::IdentityMismatch(mismatch),
        None => ConnectError::Tls(error),
    }
}
