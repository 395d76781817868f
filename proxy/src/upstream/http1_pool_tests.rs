//! Tests of the HTTP/1.1 pool against real upstream sockets.

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
        .body(StreamBody::new(tokio_stream::wrappers::UnboundedReceiverStream::new(chunks)).boxed())
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

/// An idle pooled connection has no task reading it, so the sweep must notice an
/// upstream's close; otherwise the socket sits half-closed until a request finds it.
#[tokio::test(start_paused = true)]
async fn an_idle_connection_the_upstream_closes_is_closed_by_the_sweep() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (eof_tx, mut eof) = mpsc::unbounded_channel();
    let (close_tx, close) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            head.extend_from_slice(&buf[..n]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        // The upstream's keep-alive timeout: it closes its side, then waits for ours.
        close.await.unwrap();
        stream.shutdown().await.unwrap();
        while stream.read(&mut buf).await.unwrap_or(0) > 0 {}
        let _ = eof_tx.send(());
    });
    let pool = Arc::new(Http1Pool::default());
    let resp = pool
        .send("c", addr, Duration::from_secs(5), get("/"))
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(pool.idle(), 1);
    close_tx.send(()).unwrap();
    tokio::time::timeout(IDLE_TIMEOUT / 2, eof.recv())
        .await
        .expect("the sweep closed our side well before the idle timeout");
    assert_eq!(pool.idle(), 0);
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
