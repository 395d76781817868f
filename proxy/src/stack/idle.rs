//! The idle timeout of a downstream HTTP connection: closed (gracefully) once it has had no
//! request in flight for that long, as Envoy's connection manager does by default after an hour.
//!
//! A request counts as in flight from its arrival until its response body has been sent,
//! so a long download or a slow upstream never looks idle.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;

use crate::upstream::client::Body;

pub struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `started` of the last time the connection went quiet.
    quiet_since: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            quiet_since: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// Marks a request in flight until the returned guard (carried by its response body) drops.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Resolves once the connection has been idle for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        let mut wait = timeout;
        loop {
            tokio::time::sleep(wait).await;
            if self.in_flight.load(Ordering::Acquire) > 0 {
                wait = timeout;
                continue;
            }
            let quiet = Duration::from_millis(self.quiet_since.load(Ordering::Acquire));
            let idle = self.started.elapsed().saturating_sub(quiet);
            if idle >= timeout {
                return;
            }
            wait = timeout - idle;
        }
    }
}

pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.started.elapsed().as_millis() as u64;
        self.0.quiet_since.store(now, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it ends or is dropped.
pub struct Tracked {
    inner: Body,
    guard: Option<InFlight>,
}

impl Tracked {
    pub fn new(inner: Body, guard: InFlight) -> Self {
        Tracked {
            inner,
            guard: Some(guard),
        }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_when_nothing_is_in_flight_for_the_whole_timeout() {
        let activity = Arc::new(Activity::default());
        let request = activity.request();
        let idle = tokio::spawn({
            let a = activity.clone();
            async move {
                a.idle_for(Duration::from_secs(10)).await;
                Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(!idle.is_finished(), "a request in flight is never idle");
        drop(request);
        let quiet_at = Instant::now();
        let fired = idle.await.unwrap();
        assert!(fired - quiet_at >= Duration::from_secs(10));
        assert!(fired - quiet_at <= Duration::from_secs(11));
    }
}
