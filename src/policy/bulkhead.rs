//! Bulkheads: at most `max_in_flight` calls at once, up to `max_queue` more
//! waiting at most `queue_timeout`, and every other call refused at once with
//! RESOURCE_EXHAUSTED and `grpc-retry-pushback-ms`. Each method has its own,
//! so one saturated method cannot starve the others; upstreams (outbound) and
//! caller identities (inbound) can have one across all their methods. A
//! place is held until the response stream ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Service, ServiceExt};

use super::CallContext;
use super::method::ConcurrencyPolicy;
use crate::proxy::body::ResponseBody;
use crate::proxy::error::{CallFuture, CallService, ProxyError};

#[derive(Debug)]
pub struct Bulkhead {
    /// Names the bulkhead in refusals, e.g. `method /pkg.S/M (config policy.defaults)`.
    pub name: String,
    places: Arc<Semaphore>,
    max_in_flight: u32,
    max_queue: usize,
    queue_timeout: Duration,
    queued: AtomicUsize,
    pub rejected: AtomicU64,
}

/// Counts a waiting call, and uncounts it however the wait ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Bulkhead {
    pub fn new(name: String, policy: &ConcurrencyPolicy) -> Bulkhead {
        Bulkhead {
            name,
            places: Arc::new(Semaphore::new(policy.max_in_flight as usize)),
            max_in_flight: policy.max_in_flight,
            max_queue: policy.max_queue as usize,
            queue_timeout: policy.queue_timeout,
            queued: AtomicUsize::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    /// Calls waiting for a place now.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, ProxyError> {
        if let Ok(place) = self.places.clone().try_acquire_owned() {
            return Ok(place);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(self.refuse(format!("{} calls in flight and {} waiting", self.max_in_flight, self.max_queue)));
        }
        let _waiting = Waiting(&self.queued);
        match tokio::time::timeout(self.queue_timeout, self.places.clone().acquire_owned()).await {
            Ok(Ok(place)) => Ok(place),
            _ => Err(self.refuse(format!("no place freed within queue_timeout {:?}", self.queue_timeout))),
        }
    }

    fn refuse(&self, why: String) -> ProxyError {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        ProxyError::Overloaded { bulkhead: self.name.clone(), why, pushback: self.queue_timeout }
    }
}

#[derive(Clone)]
pub struct Bulkheads<S> {
    inner: S,
}

impl<S> Bulkheads<S> {
    pub fn new(inner: S) -> Self {
        Bulkheads { inner }
    }
}

impl<S, B> Service<Request<B>> for Bulkheads<S>
where
    B: Send + 'static,
    S: CallService<B> + Clone + Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let context = CallContext::of(&request);
        let bulkheads = [context.policy.bulkhead.clone(), context.shared_bulkhead.clone()];
        if bulkheads.iter().all(Option::is_none) {
            return Box::pin(self.inner.call(request));
        }
        // The ready clone serves this call once the places are held.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(async move {
            let mut places = Vec::with_capacity(2);
            for bulkhead in bulkheads.iter().flatten() {
                places.push(bulkhead.enter().await?);
            }
            let mut response = inner.ready().await?.call(request).await?;
            for place in places {
                response.body_mut().hold(place);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulkhead(max_in_flight: u32, max_queue: u32, queue_timeout_ms: u64) -> Bulkhead {
        let policy =
            ConcurrencyPolicy { max_in_flight, max_queue, queue_timeout: Duration::from_millis(queue_timeout_ms) };
        Bulkhead::new("method /t.T/M".into(), &policy)
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bulkhead_without_a_queue_refuses_at_once() {
        let bulkhead = bulkhead(2, 0, 50);
        let _a = bulkhead.enter().await.unwrap();
        let _b = bulkhead.enter().await.unwrap();
        let started = tokio::time::Instant::now();
        let refused = bulkhead.enter().await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(matches!(&refused, ProxyError::Overloaded { bulkhead, .. } if bulkhead == "method /t.T/M"));
        assert_eq!(refused.code(), crate::grpc::Code::ResourceExhausted);
        assert_eq!(bulkhead.rejected.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_gets_the_next_free_place() {
        let bulkhead = Arc::new(bulkhead(1, 1, 1000));
        let first = bulkhead.enter().await.unwrap();
        let waiter = tokio::spawn({
            let bulkhead = bulkhead.clone();
            async move { bulkhead.enter().await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert_eq!(bulkhead.queue_depth(), 1);
        assert!(bulkhead.enter().await.is_err(), "the queue holds one");
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(bulkhead.queue_depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_gives_up_after_the_queue_timeout() {
        let bulkhead = bulkhead(1, 4, 50);
        let _held = bulkhead.enter().await.unwrap();
        let started = tokio::time::Instant::now();
        let refused = bulkhead.enter().await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        assert!(refused.to_string().contains("queue_timeout"), "{refused}");
        assert_eq!(bulkhead.queue_depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_leaves_the_queue() {
        let bulkhead = bulkhead(1, 1, 1000);
        let _held = bulkhead.enter().await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(5), bulkhead.enter()).await;
        assert!(waiting.is_err());
        assert_eq!(bulkhead.queue_depth(), 0);
    }
}
