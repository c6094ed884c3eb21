//! Answering one stream of a served connection: wait for the call's
//! response (given up if the caller resets the stream), send its head, then
//! its body as the caller's window allows. While that window is closed the
//! body is not read, so a call holds at most its own stream's window of the
//! peer's data; its timers are polled all the same, so a caller that stops
//! reading cannot keep a call (its bulkhead places, the peer's stream) past
//! its deadline.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, SendStream};
use http::Response;
use http_body::Body;

use crate::call::{ProxyError, ResponseBody, h2_reason};

/// Answers the stream `respond` with what `call` resolves to.
pub async fn answer<F>(call: F, mut respond: SendResponse<Bytes>)
where
    F: Future<Output = Result<Response<ResponseBody>, ProxyError>>,
{
    let (head, mut body) = match response_of(call, &mut respond).await {
        Some(Ok(response)) => response.into_parts(),
        // Only a refusal that should reach the caller as a reset is left as an error.
        Some(Err(error)) => return respond.send_reset(h2_reason(&error).unwrap_or(Reason::INTERNAL_ERROR)),
        None => return,
    };
    let end = body.is_end_stream();
    let Ok(mut stream) = respond.send_response(Response::from_parts(head, ()), end) else { return };
    if !end {
        let mut held = false;
        poll_fn(|cx| send_body(&mut body, &mut stream, &mut held, cx)).await;
    }
}

/// The call's response, or `None` if the caller reset the stream first.
/// The call's future ends here, so what it allocated (each layer's boxed
/// future) is freed before the body streams, however long that takes.
async fn response_of<F>(
    call: F,
    respond: &mut SendResponse<Bytes>,
) -> Option<Result<Response<ResponseBody>, ProxyError>>
where
    F: Future<Output = Result<Response<ResponseBody>, ProxyError>>,
{
    let mut call = std::pin::pin!(call);
    poll_fn(|cx| {
        if let Poll::Ready(result) = call.as_mut().poll(cx) {
            return Poll::Ready(Some(result));
        }
        // A reset stream is a call given up: dropping it cancels it below.
        respond.poll_reset(cx).map(|_| None)
    })
    .await
}

/// Sends `body` on `stream` until it ends, the caller resets the stream or a
/// timer of the call runs out. `held` says whether h2 holds data of ours
/// that waits for the caller's window.
fn send_body(
    body: &mut ResponseBody,
    stream: &mut SendStream<Bytes>,
    held: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        // The caller gave the call up: dropping the body resets the peer's stream.
        if stream.poll_reset(cx).is_ready() {
            return Poll::Ready(());
        }
        // Room for a byte is enough to read the next frame: h2 holds what a
        // frame has beyond the window, and sends it as the window opens.
        stream.reserve_capacity(1);
        if stream.capacity() == 0 {
            match stream.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                Poll::Pending => {
                    let trailers = ready!(body.poll_expiry(cx));
                    // Trailers would wait behind the held data; a reset does not.
                    match (*held, trailers.into_trailers()) {
                        (false, Ok(trailers)) => drop(stream.send_trailers(trailers)),
                        _ => stream.send_reset(Reason::CANCEL),
                    }
                    return Poll::Ready(());
                }
            }
        }
        let Some(frame) = ready!(Pin::new(&mut *body).poll_frame(cx)) else {
            let _ = stream.send_data(Bytes::new(), true);
            return Poll::Ready(());
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                stream.send_reset(h2_reason(&error).unwrap_or(Reason::INTERNAL_ERROR));
                return Poll::Ready(());
            }
        };
        match frame.into_data() {
            Ok(data) => {
                *held = data.len() > stream.capacity();
                let end = body.is_end_stream();
                if stream.send_data(data, end).is_err() || end {
                    return Poll::Ready(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    return Poll::Ready(());
                }
            }
        }
    }
}
