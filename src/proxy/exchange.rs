//! One call on an HTTP/2 connection to a peer, on the h2 crate directly: the
//! request head goes out at once, its body as the peer's flow control allows,
//! and the response body comes back as a [`RecvBody`]. A body already in hand
//! (a kept unary request) is sent within the call; only a body still arriving
//! gets a task of its own, which ends when the call does.
//!
//! The request is consumed when the call starts, so the future that waits
//! for the response holds only the stream: the futures of every layer above
//! embed it, and are allocated and moved on every call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::SendStream;
use h2::client::{ResponseFuture, SendRequest};
use http::{Request, Response};
use http_body::Body;

use crate::call::{RecvBody, RequestBody, h2_reason};

/// Starts the call on a connection that is ready for a new stream: the head
/// goes out now, and the returned future sends the body and resolves to the
/// peer's response.
pub fn start(sender: &mut SendRequest<Bytes>, request: Request<RequestBody>) -> Result<Exchange, h2::Error> {
    let (head, body) = request.into_parts();
    let end_of_stream = body.is_end_stream();
    let (response, stream) = sender.send_request(Request::from_parts(head, ()), end_of_stream)?;
    let body = (!end_of_stream).then_some(SendBody { body, stream, waiting: None, sent_data: false });
    Ok(Exchange { response, body, sending: None })
}

/// A started call, waiting for the peer's response.
pub struct Exchange {
    response: ResponseFuture,
    /// The request body, until the first poll sends what it can of it.
    body: Option<SendBody>,
    /// The task sending the rest, which the response body carries: it is
    /// aborted when the call ends.
    sending: Option<tokio::task::AbortHandle>,
}

impl Future for Exchange {
    type Output = Result<Response<RecvBody>, h2::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(mut send) = this.body.take()
            && Pin::new(&mut send).poll(cx).is_pending()
        {
            this.sending = Some(tokio::spawn(send).abort_handle());
        }
        let response = ready!(Pin::new(&mut this.response).poll(cx))?;
        Poll::Ready(Ok(response.map(|stream| RecvBody::new(stream, this.sending.take()))))
    }
}

/// A call given up before its response arrived stops sending its body.
impl Drop for Exchange {
    fn drop(&mut self) {
        if let Some(sending) = self.sending.take() {
            sending.abort();
        }
    }
}

/// A request body on its way to the peer. A failed body (the caller's stream
/// reset) resets the peer's stream with the same reason.
struct SendBody {
    body: RequestBody,
    stream: SendStream<Bytes>,
    /// Data in hand, waiting for flow-control capacity, and whether it ends the stream.
    waiting: Option<(Bytes, bool)>,
    /// Whether a data frame has been handed to h2 yet.
    sent_data: bool,
}

impl Future for SendBody {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            // The peer reset the stream: nothing more to send.
            if this.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            if let Some((data, _)) = &this.waiting {
                // The first frame goes at once, without capacity: a new stream
                // gets none until the connection task opens it, and h2 holds
                // the frame until then, so it leaves with the head in one
                // write rather than in a second one after a round through
                // that task. Later frames wait for the window to open.
                while this.sent_data && !data.is_empty() && this.stream.capacity() == 0 {
                    match ready!(this.stream.poll_capacity(cx)) {
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return Poll::Ready(()),
                    }
                }
                let (data, end) = this.waiting.take().expect("checked above");
                this.sent_data = true;
                if this.stream.send_data(data, end).is_err() || end {
                    return Poll::Ready(());
                }
                continue;
            }
            // The next frame is read before any capacity is claimed: a claim
            // for a body that sends nothing could starve other streams.
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if this.sent_data {
                            // h2 buffers beyond the claim; one byte waits for the window to open.
                            this.stream.reserve_capacity(1);
                        }
                        this.waiting = Some((data, this.body.is_end_stream()));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = this.stream.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(error)) => {
                    this.stream.send_reset(h2_reason(&error).unwrap_or(h2::Reason::CANCEL));
                    return Poll::Ready(());
                }
                None => {
                    let _ = this.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connection that keeps a copy of every write, to see which frames
    /// leave together.
    struct Recorded {
        stream: TcpStream,
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl AsyncRead for Recorded {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Recorded {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let written = ready!(Pin::new(&mut self.stream).poll_write(cx, buf))?;
            self.writes.lock().unwrap().push(buf[..written].to_vec());
            Poll::Ready(Ok(written))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_shutdown(cx)
        }
    }

    /// The (type, stream) of each HTTP/2 frame in one write.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u32)> {
        let mut frames = Vec::new();
        while bytes.len() >= 9 {
            let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
            frames.push((bytes[3], stream));
            bytes = &bytes[(9 + length).min(bytes.len())..];
        }
        frames
    }

    #[tokio::test]
    async fn a_body_in_hand_leaves_in_the_same_write_as_the_head() {
        const HEADERS: u8 = 1;
        const DATA: u8 = 0;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(listener.accept().await.unwrap().0).await.unwrap();
            // Polling `accept` drives the connection; each call is answered apart.
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                tokio::spawn(async move {
                    let mut body = request.into_body();
                    while body.data().await.is_some() {}
                    respond.send_response(Response::new(()), true).unwrap();
                });
            }
        });
        let writes = Arc::new(Mutex::new(Vec::new()));
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = h2::client::handshake(Recorded { stream, writes: writes.clone() }).await.unwrap();
        tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();

        let request = Request::post("http://peer/echo.v1.Echo/Unary")
            .body(RequestBody::Replayed(Some(Bytes::from_static(b"\0\0\0\0\x07\n\x05hello"))))
            .unwrap();
        let call = start(&mut sender, request).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), call).await.expect("the peer answers").unwrap();
        assert_eq!(response.status(), 200);

        let writes = writes.lock().unwrap();
        let with_head = writes.iter().map(|write| frames(write)).find(|frames| frames.contains(&(HEADERS, 1)));
        let with_head = with_head.expect("the request's head was written");
        assert!(with_head.contains(&(DATA, 1)), "the body left apart from the head: {writes:?}");
    }
}
