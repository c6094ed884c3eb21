//! Opaque TCP: a captured connection that is not gRPC, forwarded byte for
//! byte to where it was going. Each direction copies through a fixed buffer,
//! so a fast sender waits for a slow receiver (back-pressure) and a transfer
//! of any size holds the same memory; when one side finishes sending, the
//! other is told (half-close) and the rest still flows the other way.
//! Between sidecars, opaque TCP goes over mTLS, told apart from HTTP/2 by
//! its ALPN protocol.
//!
//! Every forwarded connection ends within [`Bounds`]: once idle both ways,
//! or once half-closed and idle the other way (the far side never closing
//! its half would keep both sockets forever).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::LimitsConfig;
use crate::identity::ALPN_OPAQUE;

/// How an opaque connection ended, for the metric label.
pub enum Forwarded {
    Done,
    ConnectFailed,
    Broken,
    /// Closed by `limits.opaque_idle_timeout`.
    Idle,
    /// Closed by `limits.opaque_half_closed_timeout`.
    HalfClosed,
}

impl Forwarded {
    pub fn as_str(&self) -> &'static str {
        match self {
            Forwarded::Done => "done",
            Forwarded::ConnectFailed => "connect_failed",
            Forwarded::Broken => "broken",
            Forwarded::Idle => "idle_timeout",
            Forwarded::HalfClosed => "half_closed_timeout",
        }
    }

    /// The `limits` setting that closed the connection, if one did.
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            Forwarded::Idle => Some("opaque_idle_timeout"),
            Forwarded::HalfClosed => Some("opaque_half_closed_timeout"),
            _ => None,
        }
    }
}

/// How long a forwarded connection may rest.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub connect: Duration,
    /// No byte either way.
    pub idle: Duration,
    /// One side has finished sending, and no byte comes the other way.
    pub half_closed: Duration,
}

impl Bounds {
    pub fn of(limits: &LimitsConfig, connect: Duration) -> Bounds {
        Bounds { connect, idle: limits.opaque_idle_timeout, half_closed: limits.opaque_half_closed_timeout }
    }
}

/// Where a forwarded connection may go: an address, over mTLS to the
/// sidecar that its capture hands the connection to when `tls` is set.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Targets a connection tries before it fails.
const CONNECT_TRIES: usize = 3;

/// Connects to the first of `targets` that answers (of the first three),
/// and carries bytes between it and `client` until both sides have closed,
/// or it rests past `bounds`.
pub async fn forward<IO>(client: IO, targets: &[Target], bounds: Bounds) -> Forwarded
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    for target in targets.iter().take(CONNECT_TRIES) {
        let addr = target.addr;
        let tcp = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            Ok::<_, String>(tcp)
        };
        match &target.tls {
            None => {
                if let Some(server) = connected(addr, bounds.connect, tcp).await {
                    return carry(client, server, addr, bounds).await;
                }
            }
            Some(tls) => {
                let mtls = async {
                    let server = tokio_rustls::TlsConnector::from(tls.clone())
                        .connect(ServerName::from(addr.ip()), tcp.await?)
                        .await
                        .map_err(|e| format!("TLS handshake failed: {e}"))?;
                    match server.get_ref().1.alpn_protocol() {
                        Some(ALPN_OPAQUE) => Ok(server),
                        _ => Err(
                            "the peer is not a protomesh sidecar that takes opaque TCP (no ALPN protomesh-opaque/1)"
                                .to_string(),
                        ),
                    }
                };
                if let Some(server) = connected(addr, bounds.connect, mtls).await {
                    return carry(client, server, addr, bounds).await;
                }
            }
        }
    }
    Forwarded::ConnectFailed
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

async fn carry<C, S>(client: C, server: S, target: SocketAddr, bounds: Bounds) -> Forwarded
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let (mut client, mut server) =
        (Watched { io: client, activity: &activity }, Watched { io: server, activity: &activity });
    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
    tokio::pin!(copy);
    loop {
        let (rested, bound) = activity.rest(bounds);
        tokio::select! {
            copied = &mut copy => return match copied {
                Ok((sent, received)) => {
                    tracing::debug!(%target, sent, received, "opaque connection closed");
                    Forwarded::Done
                }
                Err(error) => {
                    tracing::debug!(%target, %error, "opaque connection broken");
                    Forwarded::Broken
                }
            },
            // A side finishing sending shortens the bound: take it up now.
            _ = activity.half_closed.notified() => {}
            _ = tokio::time::sleep(bound.saturating_sub(rested)) => {
                let (rested, bound) = activity.rest(bounds);
                if rested >= bound {
                    let half_closed = activity.finished.load(Ordering::Relaxed) > 0;
                    tracing::debug!(%target, ?rested, half_closed, "opaque connection closed at its bound");
                    return if half_closed { Forwarded::HalfClosed } else { Forwarded::Idle };
                }
            }
        }
    }
}

/// When bytes last moved on a forwarded connection, and how many of its
/// sides have finished sending.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last byte read either way.
    last: AtomicU64,
    finished: AtomicU8,
    half_closed: Notify,
}

impl Activity {
    fn new() -> Activity {
        let (last, finished) = (AtomicU64::new(0), AtomicU8::new(0));
        Activity { start: Instant::now(), last, finished, half_closed: Notify::new() }
    }

    fn moved(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long the connection has rested, and the bound it is held to now.
    fn rest(&self, bounds: Bounds) -> (Duration, Duration) {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        let rested = self.start.elapsed().saturating_sub(last);
        let half_closed = self.finished.load(Ordering::Relaxed) > 0;
        (rested, if half_closed { bounds.half_closed.min(bounds.idle) } else { bounds.idle })
    }
}

/// One side of a forwarded connection, noting in its [`Activity`] each read
/// and the end of what it sends.
struct Watched<'a, IO> {
    io: IO,
    activity: &'a Activity,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<'_, IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if buf.filled().len() == before && buf.remaining() > 0 {
                self.activity.finished.fetch_add(1, Ordering::Relaxed);
                self.activity.half_closed.notify_one();
            }
            self.activity.moved();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<'_, IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const BOUNDS: Bounds =
        Bounds { connect: Duration::from_secs(1), idle: Duration::from_secs(60), half_closed: Duration::from_secs(5) };

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_at_the_idle_bound_and_not_before() {
        let (client, mut app) = tokio::io::duplex(64);
        let (server, mut far) = tokio::io::duplex(64);
        let carried = tokio::spawn(carry(client, server, "127.0.0.1:1".parse().unwrap(), BOUNDS));
        tokio::time::sleep(Duration::from_secs(50)).await;
        app.write_all(b"ping").await.unwrap();
        let mut read = [0u8; 4];
        far.read_exact(&mut read).await.unwrap();
        // 50 s idle, then bytes: the bound starts again.
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(!carried.is_finished(), "closed before the idle bound");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(matches!(carried.await.unwrap(), Forwarded::Idle));
        assert_eq!(far.read(&mut read).await.unwrap(), 0, "the far side is closed too");
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_connection_whose_other_side_rests_is_closed_at_its_bound() {
        let (client, mut app) = tokio::io::duplex(64);
        let (server, mut far) = tokio::io::duplex(64);
        let carried = tokio::spawn(carry(client, server, "127.0.0.1:1".parse().unwrap(), BOUNDS));
        app.shutdown().await.unwrap();
        let mut read = [0u8; 4];
        assert_eq!(far.read(&mut read).await.unwrap(), 0, "the half-close is passed on");
        // The far side still answers for a while: the connection stays.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            far.write_all(b"pong").await.unwrap();
            app.read_exact(&mut read).await.unwrap();
        }
        let resting = Instant::now();
        assert!(matches!(carried.await.unwrap(), Forwarded::HalfClosed));
        assert_eq!(resting.elapsed().as_secs(), 5, "closed at the half-closed bound, not the idle one");
    }

    #[tokio::test(start_paused = true)]
    async fn both_sides_closing_ends_the_connection_as_done() {
        let (client, mut app) = tokio::io::duplex(64);
        let (server, mut far) = tokio::io::duplex(64);
        let carried = tokio::spawn(carry(client, server, "127.0.0.1:1".parse().unwrap(), BOUNDS));
        app.write_all(b"bye").await.unwrap();
        app.shutdown().await.unwrap();
        let mut read = Vec::new();
        far.read_to_end(&mut read).await.unwrap();
        far.shutdown().await.unwrap();
        assert!(matches!(carried.await.unwrap(), Forwarded::Done));
        assert_eq!(read, b"bye");
    }
}
