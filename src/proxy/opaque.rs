//! Opaque TCP: a captured connection that is not gRPC, forwarded byte for
//! byte to where it was going. Each direction copies through a fixed buffer,
//! so a fast sender waits for a slow receiver (back-pressure) and a transfer
//! of any size holds the same memory; when one side finishes sending, the
//! other is told (half-close) and the rest still flows the other way.
//! Between sidecars, opaque TCP goes over mTLS, told apart from HTTP/2 by
//! its ALPN protocol.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::identity::ALPN_OPAQUE;

/// How an opaque connection ended, for the metric label.
pub enum Forwarded {
    Done,
    ConnectFailed,
    Broken,
}

impl Forwarded {
    pub fn as_str(&self) -> &'static str {
        match self {
            Forwarded::Done => "done",
            Forwarded::ConnectFailed => "connect_failed",
            Forwarded::Broken => "broken",
        }
    }
}

/// Connects to `target` and carries bytes between it and `client` until both
/// sides have closed.
pub async fn forward<IO>(client: IO, target: SocketAddr, connect_timeout: Duration) -> Forwarded
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let connect = async {
        let tcp = TcpStream::connect(target).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    };
    match connected(target, connect_timeout, connect).await {
        Some(server) => carry(client, server, target).await,
        None => Forwarded::ConnectFailed,
    }
}

/// As [`forward`], over mTLS to the sidecar that `target`'s capture hands
/// the connection to.
pub async fn forward_over_mtls<IO>(
    client: IO,
    target: SocketAddr,
    connect_timeout: Duration,
    tls: Arc<rustls::ClientConfig>,
) -> Forwarded
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let connect = async {
        let tcp = TcpStream::connect(target).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let server = tokio_rustls::TlsConnector::from(tls).connect(ServerName::from(target.ip()), tcp).await;
        let server = server.map_err(|e| format!("TLS handshake failed: {e}"))?;
        match server.get_ref().1.alpn_protocol() {
            Some(ALPN_OPAQUE) => Ok(server),
            _ => Err("the peer is not a protomesh sidecar that takes opaque TCP (no ALPN protomesh-opaque/1)".into()),
        }
    };
    match connected(target, connect_timeout, connect).await {
        Some(server) => carry(client, server, target).await,
        None => Forwarded::ConnectFailed,
    }
}

async fn connected<S>(
    target: SocketAddr,
    timeout: Duration,
    connect: impl Future<Output = Result<S, String>>,
) -> Option<S> {
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(server)) => Some(server),
        Ok(Err(error)) => {
            tracing::debug!(%target, %error, "opaque connection: connect failed");
            None
        }
        Err(_) => {
            tracing::debug!(%target, ?timeout, "opaque connection: connect timed out");
            None
        }
    }
}

async fn carry<C, S>(mut client: C, mut server: S, target: SocketAddr) -> Forwarded
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok((sent, received)) => {
            tracing::debug!(%target, sent, received, "opaque connection closed");
            Forwarded::Done
        }
        Err(error) => {
            tracing::debug!(%target, %error, "opaque connection broken");
            Forwarded::Broken
        }
    }
}
