//! The idle timeout of a downstream HTTP connection: closed (gracefully) once it has had no
//! request in flight for that long, as Envoy's connection manager does by default after an hour.
//!
//! A request counts as in flight from its arrival until its response body has been sent,
//! so a long download or a slow upstream never looks idle.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;

use crate::net::alarm::Alarm;
use crate::upstream::client::Body;

pub struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `started` of the last time the connection went quiet.
    quiet_since: AtomicU64,
    /// Whether the last request left the HTTP/1 parser between messages (see
    /// `listener::rest`): set as each request is dispatched.
    restable: AtomicBool,
    /// Whether all the connection has written has been flushed to its socket since the last
    /// response ended (its writer's to keep).
    flushed: AtomicBool,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            quiet_since: AtomicU64::new(0),
            restable: AtomicBool::new(false),
            flushed: AtomicBool::new(true),
        }
    }
}

/// What a connection's quiet came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Quiet {
    /// Nothing in flight for the whole idle timeout: close.
    Idle,
    /// Nothing in flight for the rest delay, and the connection may give back its buffers.
    Rest,
}

impl Activity {
    /// Marks a request in flight until the returned guard (carried by its response body) drops.
    /// `restable` says whether, once this request's response is written, the connection
    /// is between messages (an HTTP/1.1 request with no body that did not ask to close).
    pub fn request(self: &Arc<Self>, restable: bool) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.restable.store(restable, Ordering::Release);
        InFlight(self.clone())
    }

    /// Resolves once the connection has been idle for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        self.quiet_for(timeout, None).await;
    }

    /// Resolves with `Idle` once nothing has been in flight for `idle`, or, given a rest
    /// delay, with `Rest` once nothing has been in flight for that long and the connection
    /// may rest. One timer, re-armed at most once per rest delay while requests come and go.
    pub async fn quiet_for(&self, idle: Duration, rest_after: Option<Duration>) -> Quiet {
        let period = rest_after.map_or(idle, |rest| rest.min(idle));
        let mut wait = period;
        loop {
            // An `Alarm`: the connection's task polls this on every wake.
            Alarm::after(wait).await;
            if self.in_flight.load(Ordering::Acquire) > 0 {
                wait = period;
                continue;
            }
            let since = Duration::from_millis(self.quiet_since.load(Ordering::Acquire));
            let quiet = self.started.elapsed().saturating_sub(since);
            if quiet >= idle {
                return Quiet::Idle;
            }
            wait = idle - quiet;
            if let Some(rest) = rest_after {
                if quiet < rest {
                    wait = wait.min(rest - quiet);
                } else if self.may_rest() {
                    return Quiet::Rest;
                } else {
                    wait = wait.min(rest);
                }
            }
        }
    }

    /// When the connection will have been idle for `idle`, if nothing comes before.
    pub fn idle_deadline(&self, idle: Duration) -> Instant {
        let since = Duration::from_millis(self.quiet_since.load(Ordering::Acquire));
        self.started + since + idle
    }

    fn may_rest(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.restable.load(Ordering::Acquire)
            && self.flushed.load(Ordering::Acquire)
    }

    /// A rest found part of the next request already read: no rest again until that
    /// request is dispatched, so the header timeout of a slow request is not started over.
    pub fn hold_rest(&self) {
        self.restable.store(false, Ordering::Release);
    }

    /// Something was handed to the socket's writer.
    pub fn wrote(&self) {
        self.flushed.store(false, Ordering::Release);
    }

    /// The socket's writer has flushed everything handed to it.
    pub fn flushed(&self) {
        self.flushed.store(true, Ordering::Release);
    }
}

pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.started.elapsed().as_millis() as u64;
        self.0.quiet_since.store(now, Ordering::Release);
        // The response's last bytes may still be on their way to the writer.
        self.0.wrote();
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
        let request = activity.request(false);
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
