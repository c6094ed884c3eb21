//! What a captured connection speaks, told from its first bytes: the HTTP/2
//! preface, or anything else. Bytes read to tell are kept and given back
//! first ([`Prefixed`]), so whichever path takes the connection sees it whole.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The first bytes every HTTP/2 client sends (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http2,
    /// Anything else, including a client that sent nothing in time.
    Opaque,
}

/// Reads from `io` until its bytes are the HTTP/2 preface or cannot be, the
/// peer closes its side, or `timeout` passes; returns what it found and the
/// connection with the bytes read put back.
pub async fn detect<IO: AsyncRead + Unpin>(mut io: IO, timeout: Duration) -> io::Result<(Protocol, Prefixed<IO>)> {
    let mut read = BytesMut::with_capacity(PREFACE.len());
    let reading = async {
        while read.len() < PREFACE.len() && PREFACE.starts_with(&read) {
            let wanted = PREFACE.len() - read.len();
            if io.read_buf(&mut (&mut read).limit(wanted)).await? == 0 {
                break;
            }
        }
        io::Result::Ok(())
    };
    // Out of time: a protocol whose server speaks first, or an idle client.
    if let Ok(read) = tokio::time::timeout(timeout, reading).await {
        read?;
    }
    let protocol = if read[..] == *PREFACE { Protocol::Http2 } else { Protocol::Opaque };
    Ok((protocol, Prefixed { prefix: read.freeze(), io }))
}

/// A connection whose first bytes were already read: they are read again
/// first. (hyper has the same type, but private.)
pub struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> From<IO> for Prefixed<IO> {
    fn from(io: IO) -> Self {
        Prefixed { prefix: Bytes::new(), io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    async fn detected(sent: &'static [&'static [u8]], close: bool) -> (Protocol, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::spawn(async move {
            for part in sent {
                client.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            if close {
                client.shutdown().await.unwrap();
            } else {
                std::future::pending::<()>().await;
            }
        });
        let (protocol, mut io) = detect(server, Duration::from_millis(100)).await.unwrap();
        let mut first = vec![0; sent.iter().map(|part| part.len()).sum()];
        io.read_exact(&mut first).await.unwrap();
        (protocol, first)
    }

    #[tokio::test]
    async fn the_preface_in_pieces_is_http2_and_is_read_again_whole() {
        let (protocol, first) = detected(&[b"PRI * HTTP", b"/2.0\r\n\r\nSM\r\n\r\n", b"\0\0\0\x04"], false).await;
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(first, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04");
    }

    #[tokio::test]
    async fn http1_tls_and_short_or_silent_clients_are_opaque() {
        assert_eq!(detected(&[b"GET / HTTP/1.1\r\n\r\n"], false).await.0, Protocol::Opaque);
        assert_eq!(detected(&[b"\x16\x03\x01\x02\x00"], false).await.0, Protocol::Opaque);
        assert_eq!(detected(&[b"PRI * HT"], true).await, (Protocol::Opaque, b"PRI * HT".to_vec()));
        assert_eq!(detected(&[b"PRI"], false).await, (Protocol::Opaque, b"PRI".to_vec()));
        assert_eq!(detected(&[], false).await.0, Protocol::Opaque);
    }
}
