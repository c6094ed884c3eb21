//! One peer address and the single multiplexed HTTP/2 connection to it:
//! connected on first use, shared by every call, replaced when it closes.
//! Concurrent callers share one connect attempt; no lock is held across an await.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use http::{Request, Response};
use hyper::body::Incoming;

use super::balance::Load;
use super::body::RequestBody;
use crate::policy::outlier::Health;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::error::{ConnectError, ProxyError, Target};
use crate::identity::IdentityMismatch;

/// How to reach peers: plaintext (the local app) or mTLS (peer sidecars).
#[derive(Debug)]
pub enum Transport {
    Plaintext,
    Mtls(Arc<ClientConfig>),
}

type Connecting = Shared<BoxFuture<'static, Result<SendRequest<RequestBody>, Arc<ConnectError>>>>;

enum State {
    Idle,
    Connecting(Connecting),
    Ready(SendRequest<RequestBody>),
}

pub struct Endpoint {
    pub addr: SocketAddr,
    /// Outlier detection's view of it.
    pub health: Health,
    /// What the balancer weighs it by.
    pub load: Load,
    target: Target,
    transport: Arc<Transport>,
    connect_timeout: Duration,
    state: Mutex<State>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, target: Target, transport: Arc<Transport>, connect_timeout: Duration) -> Endpoint {
        Endpoint {
            addr,
            health: Health::default(),
            load: Load::default(),
            target,
            transport,
            connect_timeout,
            state: Mutex::new(State::Idle),
        }
    }

    /// Sends one call on this endpoint's connection.
    pub async fn send(&self, request: Request<RequestBody>) -> Result<Response<Incoming>, ProxyError> {
        let connection = self.connection().await?;
        self.send_on(connection, request).await
    }

    /// Sends one call on a connection of this endpoint. A request that a
    /// closing connection never sent goes out once more on a fresh connection:
    /// the peer cannot have seen it.
    pub async fn send_on(
        &self,
        mut sender: SendRequest<RequestBody>,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        match sender.try_send_request(request).await {
            Ok(response) => Ok(response),
            Err(mut error) => match error.take_message() {
                Some(unsent) => {
                    self.forget(&sender);
                    let mut sender = self.connection().await?;
                    sender.send_request(unsent).await.map_err(|error| self.failed(error))
                }
                None => Err(self.failed(error.into_error())),
            },
        }
    }

    fn failed(&self, error: hyper::Error) -> ProxyError {
        ProxyError::Upstream { target: self.target.clone(), error }
    }

    /// The endpoint's connection, opened if there is none; concurrent callers
    /// share one attempt.
    pub async fn connection(&self) -> Result<SendRequest<RequestBody>, ProxyError> {
        let connecting = {
            let mut state = self.state.lock().expect("endpoint state lock");
            match &*state {
                State::Ready(sender) if !sender.is_closed() => return Ok(sender.clone()),
                State::Connecting(connecting) => connecting.clone(),
                State::Ready(_) | State::Idle => {
                    let connecting = connect(self.addr, self.transport.clone(), self.connect_timeout)
                        .map(|result| result.map_err(Arc::new))
                        .boxed()
                        .shared();
                    *state = State::Connecting(connecting.clone());
                    connecting
                }
            }
        };
        let result = connecting.await;
        let mut state = self.state.lock().expect("endpoint state lock");
        if matches!(*state, State::Connecting(_)) {
            *state = match &result {
                Ok(sender) => State::Ready(sender.clone()),
                Err(_) => State::Idle,
            };
        }
        result.map_err(|error| ProxyError::Connect { target: self.target.clone(), error })
    }

    /// Drops a connection seen to be closing, unless a newer one replaced it.
    fn forget(&self, closing: &SendRequest<RequestBody>) {
        let mut state = self.state.lock().expect("endpoint state lock");
        if let State::Ready(current) = &*state
            && (current.is_closed() || closing.is_closed())
        {
            *state = State::Idle;
        }
    }
}

async fn connect(
    addr: SocketAddr,
    transport: Arc<Transport>,
    timeout: Duration,
) -> Result<SendRequest<RequestBody>, ConnectError> {
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
    let io = tokio::time::timeout(timeout, connecting).await.map_err(|_| ConnectError::Timeout)??;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .handshake(TokioIo::new(io))
        .await
        .map_err(ConnectError::Http2)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%addr, %error, "connection closed");
        }
    });
    Ok(sender)
}

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
