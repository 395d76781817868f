//! HTTP/1.1 keep-alive connections to one endpoint.
//!
//! A connection carries one exchange at a time. A request takes one from the endpoint's idle
//! queue (or dials a new one), and the response body gives it back once read to its end. A
//! body dropped before its end takes its connection with it: the rest of that body is still
//! on the wire, so the connection could never carry another exchange.
//!
//! A connection has no task of its own: whoever holds it drives its I/O, first the request
//! waiting for its answer, then the response body being read. An exchange so costs no wake-ups
//! of another task and no trip through the scheduler. While a connection sits idle in the
//! queue, a sweep that runs while any is queued closes those the upstream has closed or that
//! have been idle past `IDLE_TIMEOUT`.
//!
//! The queue is crossbeam's lock-free `SegQueue`, so requests on every core take and return
//! connections without meeting on a lock, and nothing is spawned per request. It allocates
//! nothing until first used: an endpoint nobody calls costs a few words.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_queue::SegQueue;
use http::{Request, Response};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::upstream::client::{Body, connect, failed};
use crate::upstream::error::ProxyError;

/// Idle connections kept per endpoint; one more returned is closed instead.
const MAX_IDLE: usize = 256;
/// An idle connection unused this long is closed, even if no request comes to find it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often idle connections are swept while any is queued: an upstream's close is noticed
/// within this, and an expired connection closed within `IDLE_TIMEOUT` and this.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

#[derive(Default)]
pub struct Http1Pool {
    idle: SegQueue<Connection>,
    /// How many `idle` holds, to keep it within `MAX_IDLE`.
    queued: AtomicUsize,
    /// Whether the sweep of idle connections is running.
    sweeping: AtomicBool,
}

type ConnectionIo = http1::Connection<TokioIo<TcpStream>, Body>;

/// One connection: the handle requests are sent on, and the connection's I/O, which its
/// holder drives.
struct Connection {
    sender: http1::SendRequest<Body>,
    /// `None` once the connection has ended (closed by either side, or failed).
    io: Option<Pin<Box<ConnectionIo>>>,
    /// Whole seconds on the pool's clock at which it went idle.
    idle_since: u64,
}

fn now_secs() -> u64 {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(tokio::time::Instant::now)
        .elapsed()
        .as_secs()
}

impl Connection {
    /// Moves the connection's I/O along as far as it can go; `false` once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(io) = &mut self.io
            && io.as_mut().poll(cx).is_ready()
        {
            self.io = None;
        }
        self.io.is_some()
    }

    fn usable(&self, now: u64) -> bool {
        self.io.is_some()
            && !self.sender.is_closed()
            && now.saturating_sub(self.idle_since) < IDLE_TIMEOUT.as_secs()
    }

    /// Waits until the connection can take a request (the exchange before it may still be
    /// finishing); `false` if it ended instead.
    async fn ready(&mut self) -> bool {
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = self.sender.poll_ready(cx) {
                return Poll::Ready(r.is_ok());
            }
            if !self.drive(cx) {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|r| r.is_ok())
        })
        .await
    }

    /// Polls `exchange` to its end while driving the connection's I/O.
    async fn exchange<F: Future>(&mut self, exchange: F) -> F::Output {
        let mut exchange = std::pin::pin!(exchange);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = exchange.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            // Driving may answer the exchange (or end the connection, which answers it with
            // an error): poll it again rather than wait for a wake-up.
            self.drive(cx);
            exchange.as_mut().poll(cx)
        })
        .await
    }
}

impl Http1Pool {
    /// Sends `req` on an idle connection, or on a new one when none is left.
    pub async fn send(
        self: &Arc<Self>,
        cluster: &str,
        addr: SocketAddr,
        connect_timeout: Duration,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let (mut req, sent) = watch_body(req);
        while let Some(mut conn) = self.take() {
            if !conn.ready().await {
                continue;
            }
            let exchange = conn.sender.try_send_request(req);
            match conn.exchange(exchange).await {
                Ok(resp) => return Ok(self.returning(resp, conn, sent)),
                Err(mut e) => match e.take_message() {
                    // The upstream closed it a moment ago, before a byte of this request was
                    // written: the request goes on the next one, unsent and intact.
                    Some(unsent) => req = unsent,
                    None => return Err(failed(&e.into_error())),
                },
            }
        }
        // Dialling is the rare case: boxed, so that every request's future does not carry it.
        let mut conn = Box::pin(self.dial(cluster, addr, connect_timeout)).await?;
        let exchange = conn.sender.send_request(req);
        let resp = conn.exchange(exchange).await.map_err(|e| failed(&e))?;
        Ok(self.returning(resp, conn, sent))
    }

    /// How many idle connections wait in the pool.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn take(&self) -> Option<Connection> {
        let now = now_secs();
        while let Some(conn) = self.idle.pop() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            // Dropping one closes it.
            if conn.usable(now) {
                return Some(conn);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, mut conn: Connection) {
        conn.idle_since = now_secs();
        if !conn.usable(conn.idle_since) {
            return;
        }
        if self.queued.fetch_add(1, Ordering::Relaxed) >= MAX_IDLE {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.idle.push(conn);
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Closes the idle connections the upstream has closed or that have expired, and puts
    /// the others back; `false` once none is left to watch.
    fn sweep_once(&self) -> bool {
        let now = now_secs();
        // Driven once without a waker that matters: reading the upstream's close ends the
        // connection. The next holder's poll registers a real one.
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..self.queued.load(Ordering::Relaxed) {
            let Some(mut conn) = self.idle.pop() else {
                break;
            };
            self.queued.fetch_sub(1, Ordering::Relaxed);
            if conn.drive(&mut cx) && conn.usable(now) {
                self.queued.fetch_add(1, Ordering::Relaxed);
                self.idle.push(conn);
            }
        }
        if self.queued.load(Ordering::Relaxed) > 0 {
            return true;
        }
        self.sweeping.store(false, Ordering::Release);
        // A connection queued after the count was read, whose `put` saw the sweep running,
        // still needs one.
        self.queued.load(Ordering::Relaxed) > 0 && !self.sweeping.swap(true, Ordering::AcqRel)
    }

    async fn dial(
        &self,
        cluster: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Connection, ProxyError> {
        let stream = connect(cluster, addr, timeout).await?;
        let (sender, io) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| {
            ProxyError::UpstreamConnect {
                cluster: cluster.to_string(),
                reason: format!("{addr}: {e}"),
            }
        })?;
        Ok(Connection {
            sender,
            io: Some(Box::pin(io)),
            idle_since: 0,
        })
    }

    fn returning(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        conn: Connection,
        request_sent: Option<Arc<AtomicBool>>,
    ) -> Response<UpstreamBody> {
        resp.map(|inner| UpstreamBody {
            inner,
            home: Some((self.clone(), conn)),
            request_sent,
        })
    }
}

/// Sweeps a pool's idle connections while it has any and is still in use.
async fn sweep(pool: Weak<Http1Pool>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if !pool.sweep_once() {
            return;
        }
    }
}

/// An upstream response body. One from the HTTP/1.1 pool puts its connection back when it
/// reaches its end.
pub struct UpstreamBody {
    inner: Incoming,
    home: Option<(Arc<Http1Pool>, Connection)>,
    /// Set once the request's body has all been handed to the connection; `None` for a
    /// request without one.
    request_sent: Option<Arc<AtomicBool>>,
}

impl UpstreamBody {
    /// A body whose connection is not the pool's (HTTP/2, an upgrade).
    pub fn unpooled(inner: Incoming) -> Self {
        UpstreamBody {
            inner,
            home: None,
            request_sent: None,
        }
    }

    /// Back to the pool, unless the request's body is still being sent: an upstream may
    /// answer before it has read the whole request, and such a connection is busy until the
    /// client finishes (perhaps never). Pooled, it would hold up the next request; it is
    /// closed once its exchange ends instead.
    fn check_in(&mut self) {
        let Some((pool, conn)) = self.home.take() else {
            return;
        };
        if self
            .request_sent
            .as_ref()
            .is_none_or(|sent| sent.load(Ordering::Acquire))
        {
            pool.put(conn);
        }
    }
}

/// A request body that tells when it has all been sent.
struct SentBody {
    inner: Body,
    sent: Arc<AtomicBool>,
}

/// `req`, with a body that reports its end through the flag returned (when it has a body).
fn watch_body(req: Request<Body>) -> (Request<Body>, Option<Arc<AtomicBool>>) {
    use http_body_util::BodyExt;
    if req.body().is_end_stream() {
        return (req, None);
    }
    let sent = Arc::new(AtomicBool::new(false));
    let flag = sent.clone();
    (
        req.map(|inner| SentBody { inner, sent: flag }.boxed()),
        Some(sent),
    )
}

impl hyper::body::Body for SentBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.sent.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.sent.store(true, Ordering::Release);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_pending()
            && let Some((_, conn)) = &mut this.home
        {
            // The body is read by the connection's I/O, which its holder drives; whatever
            // that read (or its end) is taken at once.
            conn.drive(cx);
            polled = Pin::new(&mut this.inner).poll_frame(cx);
        }
        match &polled {
            Poll::Ready(None) => self.check_in(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.check_in(),
            // A broken body leaves a connection in an unknown state: it goes.
            Poll::Ready(Some(Err(_))) => self.home = None,
            _ => {}
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

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body with nothing to read (a 204, `Content-Length: 0`) is never polled.
        if self.inner.is_end_stream() {
            self.check_in();
        }
    }
}

#[cfg(test)]
#[path = "http1_pool_tests.rs"]
mod tests;
