//! Each protocol the proxy carries, end to end over real sockets.

use std::convert::Infallible;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrigger_tests::clients::TestClient;
use outrigger_tests::upstreams::{self, grpc_frame, grpc_messages};
use outrigger_tests::{TestProxy, cluster, config};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(10);

async fn one_cluster_proxy(
    host: &str,
    protocol: &str,
    upstream: std::net::SocketAddr,
) -> TestProxy {
    let vhosts = format!(
        r#"- name: app
  domains: ["{host}"]
  routes:
    - backends: [{{cluster: app}}]
"#
    );
    TestProxy::start(&config(&vhosts, &cluster("app", protocol, &[upstream]))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_get_and_chunked_post_keep_alive() {
    let up = upstreams::http("app").await;
    let proxy = one_cluster_proxy("app.test", "http1", up.addr).await;
    let client = TestClient::http1(proxy.addr("outbound"));

    let reply = client.get("app.test", "/hello?x=1").await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "app");
    assert_eq!(reply.header("x-path"), Some("/hello?x=1"));
    assert_eq!(
        reply.header("x-echo-host"),
        Some("app.test"),
        "Host reaches the app unchanged"
    );

    // A chunked body: raw HTTP/1.1 on one connection, with keep-alive for a second request.
    let mut s = TcpStream::connect(proxy.addr("outbound")).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut reader = BufReader::new(s);
    let head = read_head(&mut reader).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let body = read_body(&mut reader, &head).await;
    assert_eq!(body, "hello, world");
    reader
        .get_mut()
        .write_all(b"GET /again HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut reader).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "second request on the same connection: {head}"
    );
}

/// An HTTP/1 head may carry 100 headers, as Envoy's and hyper's defaults allow. One more is
/// answered 431 by the proxy itself and never reaches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_head_over_100_headers_is_refused_at_the_proxy() {
    // An app that answers every head it reads with an empty 200, and counts the heads.
    let heads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let counted = heads.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if r.get_mut().write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let proxy = one_cluster_proxy("app.test", "http1", app).await;
    for (count, status, reached) in [(90, "HTTP/1.1 200", 1), (101, "HTTP/1.1 431", 1)] {
        let mut head = "GET / HTTP/1.1\r\nhost: app.test\r\n".to_string();
        for i in 1..count {
            head.push_str(&format!("x-h{i}: v\r\n"));
        }
        head.push_str("\r\n");
        let mut s = BufReader::new(TcpStream::connect(proxy.addr("outbound")).await.unwrap());
        s.get_mut().write_all(head.as_bytes()).await.unwrap();
        let reply = read_head(&mut s).await;
        assert!(reply.starts_with(status), "{count} headers: {reply}");
        assert_eq!(
            heads.load(std::sync::atomic::Ordering::SeqCst),
            reached,
            "{count} headers: heads the app read"
        );
    }
}

async fn read_head(r: &mut BufReader<TcpStream>) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(DEADLINE, r.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection closed in the middle of a response head: {head}"
        );
        head.push_str(&line);
        if line == "\r\n" {
            return head;
        }
    }
}

async fn read_body(r: &mut BufReader<TcpStream>, head: &str) -> String {
    let lower = head.to_ascii_lowercase();
    if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        let mut buf = vec![0; len.trim().parse().unwrap()];
        r.read_exact(&mut buf).await.unwrap();
        return String::from_utf8(buf).unwrap();
    }
    assert!(lower.contains("transfer-encoding: chunked"), "{head}");
    let mut body = String::new();
    loop {
        let mut size = String::new();
        r.read_line(&mut size).await.unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        let mut chunk = vec![0; n + 2];
        r.read_exact(&mut chunk).await.unwrap();
        if n == 0 {
            return body;
        }
        body.push_str(std::str::from_utf8(&chunk[..n]).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_to_http2_and_http1_upstreams() {
    let up = upstreams::http("app").await;
    for upstream_protocol in ["http2", "http1"] {
        let proxy = one_cluster_proxy("app.test", upstream_protocol, up.addr).await;
        let client = TestClient::http2(proxy.addr("outbound")).await;
        let replies = futures_util::future::join_all((0..20).map(|i| {
            let client = client.clone();
            async move {
                client
                    .send(Method::POST, "app.test", "/h2", &[], &format!("body-{i}"))
                    .await
                    .unwrap()
            }
        }))
        .await;
        for (i, r) in replies.iter().enumerate() {
            assert_eq!(r.status, 200);
            assert_eq!(r.body, format!("body-{i}"));
            let expected = if upstream_protocol == "http2" {
                "HTTP/2.0"
            } else {
                "HTTP/1.1"
            };
            assert_eq!(r.header("x-version"), Some(expected));
        }
        assert_eq!(
            replies[0].header("x-echo-host"),
            Some("app.test"),
            "the authority reaches the app as Host"
        );
    }
}

type GrpcBody = BoxBody<Bytes, Infallible>;

async fn grpc_call(
    proxy: std::net::SocketAddr,
    path: &str,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    hyper::Response<hyper::body::Incoming>,
) {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, GrpcBody>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://grpc.test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap();
    // The first message is queued before the call starts, as a client stub would send it.
    tx.send(grpc_frame(b"first")).await.unwrap();
    let resp = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    (tx, resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bidirectional_stream_with_trailers() {
    let up = upstreams::grpc().await;
    let proxy = one_cluster_proxy("grpc.test", "http2", up.addr).await;
    let (tx, resp) = grpc_call(proxy.addr("outbound"), "/test.Echo/Stream").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();

    // Each echo arrives before the next message is sent: real interleaved streaming, not a
    // request buffered whole and answered whole.
    assert_eq!(next_message(&mut body, &mut buf).await, "first");
    for next in ["second", "third"] {
        tx.send(grpc_frame(next.as_bytes())).await.unwrap();
        assert_eq!(next_message(&mut body, &mut buf).await, next);
    }
    drop(tx);
    let trailers = loop {
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(t) = frame.into_trailers() {
            break t;
        }
    };
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert_eq!(trailers["x-trailer"], "kept");
}

async fn next_message(body: &mut hyper::body::Incoming, buf: &mut BytesMut) -> Bytes {
    loop {
        if let Some(m) = grpc_messages(buf).into_iter().next() {
            return m;
        }
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(d) = frame.into_data() {
            buf.extend_from_slice(&d);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_status_and_error_status() {
    let up = upstreams::grpc().await;
    let proxy = one_cluster_proxy("grpc.test", "http2", up.addr).await;
    for (path, status) in [("/test.Echo/Unary", "0"), ("/test.Echo/Fail", "5")] {
        let (tx, resp) = grpc_call(proxy.addr("outbound"), path).await;
        drop(tx);
        let collected = tokio::time::timeout(DEADLINE, resp.into_body().collect())
            .await
            .unwrap()
            .unwrap();
        let trailers = collected
            .trailers()
            .cloned()
            .expect("trailers survive the proxy");
        let mut data = BytesMut::from(&collected.to_bytes()[..]);
        assert_eq!(grpc_messages(&mut data), vec![Bytes::from_static(b"first")]);
        assert_eq!(trailers["grpc-status"], status, "{path}");
        assert_eq!(trailers["x-trailer"], "kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_upgrade() {
    let up = upstreams::websocket().await;
    let proxy = one_cluster_proxy("ws.test", "http1", up.addr).await;
    let stream = TcpStream::connect(proxy.addr("outbound")).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://ws.test/chat", stream)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    for text in ["hello", "through", "the mesh"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::binary(vec![0u8, 1, 2, 255]));
}

fn tcp_config(protocol: &str, upstream: std::net::SocketAddr) -> String {
    format!(
        r#"listeners:
  - name: tcp
    address: 127.0.0.1:0
    direction: outbound
    protocol: {protocol}
    detect_timeout: 10s
    tcp: {{cluster: backend}}
clusters:
  - name: backend
    endpoints: [{{address: "{upstream}"}}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_echo_on_detecting_listener() {
    let up = upstreams::tcp_echo().await;
    let proxy = TestProxy::start(&tcp_config("detect", up.addr)).await;
    let mut s = TcpStream::connect(proxy.addr("tcp")).await.unwrap();
    // Binary that is neither HTTP nor TLS: detected as opaque at once, not after the timeout.
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_on_opaque_port() {
    let up = upstreams::server_first().await;
    let proxy = TestProxy::start(&tcp_config("opaque", up.addr)).await;
    let s = TcpStream::connect(proxy.addr("tcp")).await.unwrap();
    let mut r = BufReader::new(s);
    let mut banner = String::new();
    // The detect timeout is 10 s; an opaque port must not wait for it.
    tokio::time::timeout(Duration::from_secs(2), r.read_line(&mut banner))
        .await
        .expect("banner arrives at once")
        .unwrap();
    assert_eq!(banner, "220 outrigger-test ready\r\n");
    r.get_mut().write_all(b"HELO mesh\r\n").await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(DEADLINE, r.read_line(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "250 HELO mesh\r\n");
}
