//! Opaque TCP: a captured connection that is not gRPC, forwarded byte for
//! byte to where it was going. Each direction copies through a fixed buffer,
//! so a fast sender waits for a slow receiver (back-pressure) and a transfer
//! of any size holds the same memory; when one side finishes sending, the
//! other is told (half-close) and the rest still flows the other way.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

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
pub async fn forward<IO>(mut client: IO, target: SocketAddr, connect_timeout: Duration) -> Forwarded
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut server = match tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await {
        Ok(Ok(server)) => server,
        Ok(Err(error)) => {
            tracing::debug!(%target, %error, "opaque connection: connect failed");
            return Forwarded::ConnectFailed;
        }
        Err(_) => {
            tracing::debug!(%target, ?connect_timeout, "opaque connection: connect timed out");
            return Forwarded::ConnectFailed;
        }
    };
    let _ = server.set_nodelay(true);
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
