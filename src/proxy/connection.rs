//! One HTTP/2 connection from a caller, served on the h2 crate: the preface
//! within `limits.first_frame_timeout`, each stream given to the
//! connection's service and answered on a task of its own ([`respond`]),
//! keepalive pings, a GOAWAY once no call has used it for
//! `limits.idle_timeout`, and a graceful GOAWAY when the sidecar drains.
//!
//! Hyper's server would do most of this, but it reads a response body only
//! while the caller's window has room, so the timers of a call whose caller
//! stopped reading would never fire; served here, they do.
//!
//! [`respond`]: super::respond

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::Request;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tower::Service;

use super::keepalive::keep_alive;
use super::respond;
use crate::call::{ProxyError, RecvBody, ResponseBody};
use crate::config::{CONNECTION_WINDOW, LimitsConfig};

/// How a connection ended.
#[derive(Debug)]
pub enum Ended {
    /// The caller closed it, or it closed after a GOAWAY (a drain, or idle).
    Closed,
    /// No HTTP/2 preface within `limits.first_frame_timeout`.
    NoPreface,
    /// A keepalive ping went unanswered.
    NoPingAnswer,
    /// Closed after `limits.idle_timeout` without a call.
    Idle,
    Failed(h2::Error),
}

/// Serves HTTP/2 on `io` until the connection ends, each request going to
/// `service`. The connection holds `drain` until its last call has ended.
pub async fn serve<IO, S>(io: IO, mut service: S, limits: &LimitsConfig, drain: drain::Watch) -> Ended
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: Service<Request<RecvBody>, Response = http::Response<ResponseBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(limits.stream_window())
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size())
        .handshake::<_, Bytes>(io);
    let mut connection = match tokio::time::timeout(limits.first_frame_timeout, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => return Ended::Failed(error),
        Err(_) => return Ended::NoPreface,
    };
    let keepalive = keep_alive(connection.ping_pong(), limits.keepalive_interval, limits.keepalive_timeout);
    let mut keepalive = std::pin::pin!(keepalive);
    let mut draining = std::pin::pin!(drain.signaled());
    let mut released = None;
    // How the connection ends once its last stream has: set when the
    // sidecar sends GOAWAY; streams the caller opened before it saw it are
    // still served.
    let mut ending = None;
    let activity = Arc::new(Activity::default());
    let started = Instant::now();
    let mut idle = std::pin::pin!(tokio::time::sleep(limits.idle_timeout));
    loop {
        tokio::select! {
            biased;
            accepted = connection.accept() => match accepted {
                Some(Ok((request, mut respond))) => {
                    // The edges of both stacks are always ready: they route a
                    // call or refuse it in `call`. Were one not, the caller may retry.
                    if !matches!(service.poll_ready(&mut Context::from_waker(Waker::noop())), Poll::Ready(Ok(()))) {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let (head, body) = request.into_parts();
                    let call = service.call(Request::from_parts(head, RecvBody::new(body, None)));
                    let open = activity.opened(started);
                    tokio::spawn(async move {
                        respond::answer(call, respond).await;
                        drop(open);
                    });
                }
                Some(Err(error)) => return Ended::Failed(error),
                None => return ending.unwrap_or(Ended::Closed),
            },
            release = &mut draining, if released.is_none() => {
                connection.graceful_shutdown();
                released = Some(release);
                ending.get_or_insert(Ended::Closed);
            }
            () = &mut keepalive => return Ended::NoPingAnswer,
            () = &mut idle, if ending.is_none() => match activity.quiet_since(started) {
                Some(since) if since.elapsed() >= limits.idle_timeout => {
                    connection.graceful_shutdown();
                    ending = Some(Ended::Idle);
                }
                since => idle.as_mut().reset(since.unwrap_or_else(Instant::now) + limits.idle_timeout),
            },
        }
    }
}

/// The calls a connection carries, and when the last one ended, for the idle timeout.
#[derive(Default)]
struct Activity {
    open: AtomicUsize,
    /// Milliseconds from the connection's start to the end of its last call.
    last_end: AtomicU64,
}

impl Activity {
    fn opened(self: &Arc<Self>, started: Instant) -> OpenCall {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenCall { activity: self.clone(), started }
    }

    /// `None` while a call is open; otherwise since when none has been.
    fn quiet_since(&self, started: Instant) -> Option<Instant> {
        (self.open.load(Ordering::Relaxed) == 0)
            .then(|| started + std::time::Duration::from_millis(self.last_end.load(Ordering::Relaxed)))
    }
}

struct OpenCall {
    activity: Arc<Activity>,
    started: Instant,
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        let ended = self.started.elapsed().as_millis() as u64;
        self.activity.last_end.fetch_max(ended, Ordering::Relaxed);
        self.activity.open.fetch_sub(1, Ordering::Relaxed);
    }
}
