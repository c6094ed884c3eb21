//! `echo.v1.Echo`: answers every call shape with what the request asks for
//! (status, delay, reply count and size) and echoes `x-echo-*` metadata, so
//! that a test can check what crossed the mesh on both sides.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};

use super::caller_of;
use crate::pb::echo::v1::echo_server::{Echo, EchoServer};
use crate::pb::echo::v1::{EchoReply, EchoRequest};

/// What the backend observed, for tests to assert on.
#[derive(Default)]
pub struct EchoStats {
    pub calls: AtomicU64,
    pub cancelled: AtomicU64,
    /// Stream replies handed to the transport.
    pub sent: AtomicU64,
    pub cancelled_signal: Notify,
    /// The metadata of the latest call, as received.
    last_metadata: std::sync::Mutex<MetadataMap>,
    /// While set, every unary call fails with UNAVAILABLE: a backend gone bad.
    pub failing: std::sync::atomic::AtomicBool,
    /// Every unary call waits this many milliseconds first: a slow replica.
    pub slow_ms: std::sync::atomic::AtomicU32,
    /// Calls seen so far per `message`, for `fail_first`.
    seen: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// The metadata of the latest unary call per `message`.
    metadata_by_message: std::sync::Mutex<std::collections::HashMap<String, MetadataMap>>,
}

impl EchoStats {
    /// An ASCII header of the latest call, as received.
    pub fn last_header(&self, name: &str) -> Option<String> {
        let metadata = self.last_metadata.lock().expect("stats lock");
        metadata.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    /// An ASCII header of the latest unary call that carried `message`.
    pub fn header_of(&self, message: &str, name: &str) -> Option<String> {
        let by_message = self.metadata_by_message.lock().expect("stats lock");
        by_message.get(message)?.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    /// Whether this call is one of the first `fail_first` with its message.
    fn fails(&self, request: &EchoRequest) -> bool {
        let mut seen = self.seen.lock().expect("stats lock");
        let count = seen.entry(request.message.clone()).or_default();
        *count += 1;
        request.fail_first == 0 || *count <= request.fail_first
    }
}

#[derive(Clone, Default)]
pub struct EchoService {
    pub stats: Arc<EchoStats>,
}

impl EchoService {
    pub fn into_server(self) -> EchoServer<EchoService> {
        EchoServer::new(self)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .send_compressed(tonic::codec::CompressionEncoding::Gzip)
    }

    fn observe<T>(&self, request: &Request<T>) -> MetadataMap {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        *self.stats.last_metadata.lock().expect("stats lock") = request.metadata().clone();
        echoed_metadata(request.metadata())
    }
}

/// The request's `x-echo-*` entries (ASCII and `-bin`, repeated keys kept).
fn echoed_metadata(request: &MetadataMap) -> MetadataMap {
    let mut echoed = MetadataMap::new();
    for entry in request.iter() {
        match entry {
            tonic::metadata::KeyAndValueRef::Ascii(key, value) if key.as_str().starts_with("x-echo-") => {
                echoed.append(key.clone(), value.clone());
            }
            tonic::metadata::KeyAndValueRef::Binary(key, value) if key.as_str().starts_with("x-echo-") => {
                echoed.append_bin(key.clone(), value.clone());
            }
            _ => {}
        }
    }
    echoed
}

fn requested_status(request: &EchoRequest, metadata: &MetadataMap) -> Option<Status> {
    (request.status_code != 0).then(|| {
        let mut metadata = metadata.clone();
        if request.pushback_ms != 0 {
            metadata.insert("grpc-retry-pushback-ms", request.pushback_ms.to_string().parse().expect("digits"));
        }
        Status::with_details_and_metadata(
            Code::from_i32(request.status_code),
            request.status_message.clone(),
            format!("details of {}", request.status_message).into_bytes().into(),
            metadata,
        )
    })
}

fn reply(request: &EchoRequest, caller: &str, sequence: u32) -> EchoReply {
    EchoReply {
        message: request.message.clone(),
        payload: request.payload.clone(),
        sequence,
        caller: caller.to_string(),
        received_bytes: request.payload.len() as u64,
    }
}

fn with_metadata<T>(message: T, metadata: MetadataMap) -> Response<T> {
    let mut response = Response::new(message);
    *response.metadata_mut() = metadata;
    response
}

/// Waits the delay a request asks for, and not at all when it asks for none:
/// a zero-length tokio sleep still waits for the timer's next millisecond tick.
async fn pause(delay_ms: u32) {
    if delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(delay_ms.into())).await;
    }
}

/// Counts a unary call dropped while it waits: its caller cancelled it.
struct Unanswered<'a> {
    stats: &'a EchoStats,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            self.stats.cancelled_signal.notify_waiters();
        }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let metadata = self.observe(&request);
        let caller = caller_of(&request);
        let received = request.metadata().clone();
        let request = request.into_inner();
        self.stats.metadata_by_message.lock().expect("stats lock").insert(request.message.clone(), received);
        let mut unanswered = Unanswered { stats: &self.stats, answered: false };
        pause(self.stats.slow_ms.load(Ordering::Relaxed)).await;
        pause(request.delay_ms).await;
        unanswered.answered = true;
        if self.stats.failing.load(Ordering::Relaxed) {
            return Err(Status::unavailable("backend failing"));
        }
        if let Some(status) = requested_status(&request, &metadata).filter(|_| self.stats.fails(&request)) {
            return Err(status);
        }
        Ok(with_metadata(reply(&request, &caller, 0), metadata))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(&self, request: Request<EchoRequest>) -> Result<Response<ReplyStream>, Status> {
        let metadata = self.observe(&request);
        let caller = caller_of(&request);
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let stats = self.stats.clone();
        let trailing_status = requested_status(&request, &metadata).filter(|_| self.stats.fails(&request));
        if request.reply_count == 0
            && let Some(status) = trailing_status
        {
            // Failing before any reply: a trailers-only response.
            return Err(status);
        }
        tokio::spawn(async move {
            let payload = bytes::Bytes::from(vec![7u8; request.reply_payload_bytes as usize]);
            for sequence in 0..request.reply_count {
                pause(request.delay_ms).await;
                let message = EchoReply { payload: payload.clone(), ..reply(&request, &caller, sequence) };
                if tx.send(Ok(message)).await.is_err() {
                    stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    stats.cancelled_signal.notify_waiters();
                    return;
                }
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(status) = trailing_status {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(with_metadata(Box::pin(ReceiverStream::new(rx)), metadata))
    }

    async fn client_stream(&self, request: Request<Streaming<EchoRequest>>) -> Result<Response<EchoReply>, Status> {
        let metadata = self.observe(&request);
        let caller = caller_of(&request);
        let mut stream = request.into_inner();
        let (mut count, mut bytes) = (0u32, 0u64);
        while let Some(message) = stream.next().await {
            let message = message?;
            if let Some(status) = requested_status(&message, &metadata) {
                return Err(status);
            }
            count += 1;
            bytes += message.payload.len() as u64;
        }
        let summary = EchoReply {
            message: format!("{count} messages"),
            sequence: count,
            caller,
            received_bytes: bytes,
            ..Default::default()
        };
        Ok(with_metadata(summary, metadata))
    }

    type BidiStreamStream = ReplyStream;

    async fn bidi_stream(&self, request: Request<Streaming<EchoRequest>>) -> Result<Response<ReplyStream>, Status> {
        let metadata = self.observe(&request);
        let caller = caller_of(&request);
        let mut stream = request.into_inner();
        let echoed = metadata.clone();
        let replies = async_stream_of(move |tx| async move {
            let mut sequence = 0;
            while let Some(message) = stream.next().await {
                let message = match message {
                    Ok(message) => message,
                    Err(status) => return drop(tx.send(Err(status)).await),
                };
                if let Some(status) = requested_status(&message, &echoed) {
                    return drop(tx.send(Err(status)).await);
                }
                if tx.send(Ok(reply(&message, &caller, sequence))).await.is_err() {
                    return;
                }
                sequence += 1;
            }
        });
        Ok(with_metadata(replies, metadata))
    }
}

/// A reply stream fed by a task, which ends when the caller goes away.
fn async_stream_of<F, Fut>(produce: F) -> ReplyStream
where
    F: FnOnce(mpsc::Sender<Result<EchoReply, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(produce(tx));
    Box::pin(ReceiverStream::new(rx))
}
