//! HTTP/1.1 keep-alive connections to one endpoint.
//!
//! A connection carries one exchange at a time. A request takes one from the endpoint's idle
//! queue (or dials a new one), and the response body gives it back once read to its end. A
//! body dropped before its end takes its connection with it: the rest of that body is still
//! on the wire, so the connection could never carry another exchange.
//!
//! The queue is crossbeam's lock-free `SegQueue`, so requests on every core take and return
//! connections without meeting on a lock, and nothing is spawned per request. It allocates
//! nothing until first used: an endpoint nobody calls costs a few words.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_queue::SegQueue;
use http::{Request, Response};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::net::alarm::Alarm;
use crate::upstream::client::{Body, connect, failed};
use crate::upstream::error::ProxyError;

/// Idle connections kept per endpoint; one more returned is closed instead.
const MAX_IDLE: usize = 256;
/// An idle connection unused this long is closed, even if no request comes to find it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Default)]
pub struct Http1Pool {
    idle: SegQueue<Connection>,
    /// How many `idle` holds, to keep it within `MAX_IDLE`.
    queued: AtomicUsize,
}

/// One connection: the handle requests are sent on, and what its driving task reads to
/// close it once idle too long.
struct Connection {
    sender: http1::SendRequest<Body>,
    state: Arc<IdleSince>,
}

/// Whole seconds on the pool's clock at which the connection went idle; `IN_USE` while it
/// carries an exchange.
struct IdleSince(AtomicU64);

const IN_USE: u64 = u64::MAX;

fn now_secs() -> u64 {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(tokio::time::Instant::now)
        .elapsed()
        .as_secs()
}

impl IdleSince {
    fn expired(&self, now: u64) -> bool {
        let since = self.0.load(Ordering::Acquire);
        since != IN_USE && now.saturating_sub(since) >= IDLE_TIMEOUT.as_secs()
    }
}

impl Http1Pool {
    /// Sends `req` on an idle connection, or on a new one when none is left.
    /// A function returning an `async` block rather than an `async fn`, so that its future
    /// keeps one slot for the request rather than two (see `stack::retry::send`).
    #[allow(clippy::manual_async_fn)] // one slot per argument, not two
    pub fn send<'a>(
        self: &'a Arc<Self>,
        cluster: &'a str,
        addr: SocketAddr,
        connect_timeout: Duration,
        mut req: Request<Body>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + 'a {
        async move {
            let sent = watch_body(&mut req);
            while let Some(mut conn) = self.take() {
                // The exchange before may still be finishing on the connection's task.
                if conn.sender.ready().await.is_err() {
                    continue;
                }
                match conn.sender.try_send_request(req).await {
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
            let resp = conn
                .sender
                .send_request(req)
                .await
                .map_err(|e| failed(&e))?;
            Ok(self.returning(resp, conn, sent))
        }
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
            // Dropping one closes it: its task sees its handle go.
            if conn.sender.is_closed() || conn.state.expired(now) {
                continue;
            }
            conn.state.0.store(IN_USE, Ordering::Release);
            return Some(conn);
        }
        None
    }

    fn put(&self, conn: Connection) {
        if conn.sender.is_closed() {
            return;
        }
        if self.queued.fetch_add(1, Ordering::Relaxed) >= MAX_IDLE {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        conn.state.0.store(now_secs(), Ordering::Release);
        self.idle.push(conn);
    }

    async fn dial(
        &self,
        cluster: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Connection, ProxyError> {
        let stream = connect(cluster, addr, timeout).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| {
            ProxyError::UpstreamConnect {
                cluster: cluster.to_string(),
                reason: format!("{addr}: {e}"),
            }
        })?;
        let state = Arc::new(IdleSince(AtomicU64::new(IN_USE)));
        tokio::spawn(drive(conn, state.clone()));
        Ok(Connection { sender, state })
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

/// Runs a connection until the upstream closes it, the pool lets go of it, or it has sat
/// idle past `IDLE_TIMEOUT`.
async fn drive(conn: http1::Connection<TokioIo<TcpStream>, Body>, state: Arc<IdleSince>) {
    tokio::pin!(conn);
    // Polled on each of the connection's wakes, several per request: an `Alarm` skips the
    // timer's full poll until it goes off.
    let idle = Alarm::after(IDLE_TIMEOUT);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            biased;
            _ = conn.as_mut() => return,
            _ = idle.as_mut() => {
                if state.expired(now_secs()) {
                    return;
                }
                idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
            }
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

/// Gives `req` a body that reports its end through the flag returned (when it has a body). In
/// place: the request is moved whole at every stage, and a bodiless one needs nothing here.
fn watch_body(req: &mut Request<Body>) -> Option<Arc<AtomicBool>> {
    use http_body_util::{BodyExt, Empty};
    if req.body().is_end_stream() {
        return None;
    }
    let sent = Arc::new(AtomicBool::new(false));
    let placeholder = Empty::new().map_err(|never| match never {}).boxed();
    let inner = std::mem::replace(req.body_mut(), placeholder);
    *req.body_mut() = SentBody {
        inner,
        sent: sent.clone(),
    }
    .boxed();
    Some(sent)
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
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
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
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::service::service_fn;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    /// What the test upstream did: connections accepted, and one message per connection
    /// closed.
    struct Upstream {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        closed: mpsc::UnboundedReceiver<()>,
    }

    /// An upstream answering `/big` with a body sent in 64 chunks, `/close` with
    /// `Connection: close`, and anything else with "ok".
    async fn upstream() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let resp = match req.uri().path() {
                            "/big" => {
                                let chunks = (0..64).map(|_| {
                                    Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 1024])))
                                });
                                let body = StreamBody::new(tokio_stream::iter(chunks));
                                Response::new(body.boxed())
                            }
                            "/close" => Response::builder()
                                .header(http::header::CONNECTION, "close")
                                .body(Full::new(Bytes::from("ok")).boxed())
                                .unwrap(),
                            _ => Response::new(Full::new(Bytes::from("ok")).boxed()),
                        };
                        Ok::<_, Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    let _ = closed_tx.send(());
                });
            }
        });
        Upstream {
            addr,
            accepted,
            closed,
        }
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path)
            .header(http::header::HOST, "svc")
            .body(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap()
    }

    async fn send(pool: &Arc<Http1Pool>, up: &Upstream, path: &str) -> Response<UpstreamBody> {
        pool.send("c", up.addr, Duration::from_secs(5), get(path))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_connection_goes_back_to_the_pool_once_its_body_is_read() {
        let up = upstream().await;
        let pool = Arc::new(Http1Pool::default());
        for _ in 0..5 {
            let resp = send(&pool, &up, "/big").await;
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 64 * 1024);
        }
        assert_eq!(
            up.accepted.load(Ordering::SeqCst),
            1,
            "one connection, reused"
        );
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_takes_its_connection_with_it() {
        let mut up = upstream().await;
        let pool = Arc::new(Http1Pool::default());
        let mut body = send(&pool, &up, "/big").await.into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(pool.idle(), 0, "a half-read connection is never pooled");
        tokio::time::timeout(Duration::from_secs(5), up.closed.recv())
            .await
            .expect("the half-read connection is closed");
        let resp = send(&pool, &up, "/").await;
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    }

    /// An upstream that answers every request head at once with "ok", never reads a body
    /// to its end, and keeps its connections open: how many it accepted.
    async fn answers_early() -> (SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// The upstream answers while the client is still sending its request body: that
    /// connection is busy until the body ends, so the next request must not wait behind it.
    /// A body sent whole gives its connection back as usual.
    #[tokio::test]
    async fn a_connection_still_sending_its_request_body_is_not_pooled() {
        let (addr, accepted) = answers_early().await;
        let pool = Arc::new(Http1Pool::default());
        let (more, chunks) = mpsc::unbounded_channel::<Result<Frame<Bytes>, hyper::Error>>();
        more.send(Ok(Frame::data(Bytes::from("part")))).unwrap();
        let upload = Request::post("/")
            .header(http::header::HOST, "svc")
            .body(
                StreamBody::new(tokio_stream::wrappers::UnboundedReceiverStream::new(chunks))
                    .boxed(),
            )
            .unwrap();
        let resp = pool
            .send("c", addr, Duration::from_secs(5), upload)
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(pool.idle(), 0, "a connection mid-upload is never pooled");
        let next = tokio::time::timeout(
            Duration::from_secs(5),
            pool.send("c", addr, Duration::from_secs(5), get("/")),
        )
        .await
        .expect("the next request does not wait for the upload")
        .unwrap();
        next.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop(more);

        let whole = Request::post("/")
            .header(http::header::HOST, "svc")
            .body(
                Full::new(Bytes::from("all"))
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap();
        let resp = pool
            .send("c", addr, Duration::from_secs(5), whole)
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(pool.idle(), 1, "a connection whose body was sent goes back");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "and was the pooled one");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closes_is_not_used_again() {
        let mut up = upstream().await;
        let pool = Arc::new(Http1Pool::default());
        for _ in 0..3 {
            let resp = send(&pool, &up, "/close").await;
            assert_eq!(
                &resp.into_body().collect().await.unwrap().to_bytes()[..],
                b"ok"
            );
            tokio::time::timeout(Duration::from_secs(5), up.closed.recv())
                .await
                .expect("the upstream closed it");
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_empty_body_gives_its_connection_back_without_being_read() {
        let up = upstream().await;
        let pool = Arc::new(Http1Pool::default());
        let resp = send(&pool, &up, "/").await;
        drop(resp);
        // "ok" is two bytes, not empty: read it, then check a HEAD-like empty answer.
        assert_eq!(pool.idle(), 0);
        let resp = pool
            .send(
                "c",
                up.addr,
                Duration::from_secs(5),
                Request::head("/")
                    .header(http::header::HOST, "svc")
                    .body(
                        Full::new(Bytes::new())
                            .map_err(|never| match never {})
                            .boxed(),
                    )
                    .unwrap(),
            )
            .await
            .unwrap();
        assert!(resp.body().is_end_stream());
        drop(resp);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_after_the_idle_timeout() {
        let mut up = upstream().await;
        let pool = Arc::new(Http1Pool::default());
        let resp = send(&pool, &up, "/").await;
        resp.into_body().collect().await.unwrap();
        assert_eq!(pool.idle(), 1);
        tokio::time::sleep(IDLE_TIMEOUT / 2).await;
        assert!(up.closed.try_recv().is_err(), "still open, half way");
        tokio::time::timeout(IDLE_TIMEOUT * 2, up.closed.recv())
            .await
            .expect("closed once idle past the timeout");
        // The pool finds it closed, and dials afresh.
        let resp = send(&pool, &up, "/").await;
        resp.into_body().collect().await.unwrap();
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    }
}
