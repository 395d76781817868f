//! Upstream servers for tests, each on its own ephemeral loopback port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type Body = BoxBody<Bytes, Infallible>;

/// A running upstream; stopped when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Upstream {
    pub fn from_task(addr: SocketAddr, task: JoinHandle<()>) -> Self {
        Upstream { addr, task }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<F, Fut>(handler: F) -> Upstream
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    serve_on("127.0.0.1:0".parse().unwrap(), handler).await
}

async fn serve_on<F, Fut>(addr: SocketAddr, handler: F) -> Upstream
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    Upstream {
        addr,
        task: tokio::spawn(handler(listener)),
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// An HTTP server (HTTP/1.1 and HTTP/2, by detection) that tells what it received.
///
/// - Response headers: `x-upstream` (its name), `x-method`, `x-path`, `x-version`, and
///   `x-echo-<name>` for every request header whose name starts with `x-`, plus `host`
///   (from `:authority` for HTTP/2) and the trace context headers.
/// - `POST`/`PUT` bodies are echoed back; other methods get the upstream's name.
/// - `/slow/<ms>` answers after that many milliseconds; `/status/<code>` with that status.
pub async fn http(name: &'static str) -> Upstream {
    http_at(name, "127.0.0.1:0".parse().unwrap()).await
}

/// `http`, on a given address: an endpoint that comes back where it was.
pub async fn http_at(name: &'static str, addr: SocketAddr) -> Upstream {
    serve_on(addr, move |listener| async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req| echo(name, req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
    .await
}

async fn echo(name: &'static str, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let mut status = StatusCode::OK;
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        status = StatusCode::from_u16(code.parse().unwrap_or(500))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let body = match parts.method.as_str() {
        "POST" | "PUT" => body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default(),
        _ => Bytes::from(name),
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert("x-upstream", HeaderValue::from_static(name));
    h.insert(
        "x-method",
        HeaderValue::from_str(parts.method.as_str()).unwrap(),
    );
    h.insert("x-path", HeaderValue::from_str(&path).unwrap());
    h.insert(
        "x-version",
        HeaderValue::from_str(&format!("{:?}", parts.version)).unwrap(),
    );
    // HTTP/2 carries the host in :authority; report it the same way as an HTTP/1.1 Host.
    if let (None, Some(authority)) = (parts.headers.get(http::header::HOST), parts.uri.authority())
    {
        h.insert(
            "x-echo-host",
            HeaderValue::from_str(authority.as_str()).unwrap(),
        );
    }
    for (k, v) in &parts.headers {
        let traced = matches!(k.as_str(), "traceparent" | "tracestate" | "b3");
        // `x_` too: the spelling some apps fold into `x-`.
        let ours = k.as_str().starts_with("x-") || k.as_str().starts_with("x_");
        if ours || k == http::header::HOST || traced {
            let echoed =
                HeaderName::from_bytes(format!("x-echo-{}", k.as_str()).as_bytes()).unwrap();
            h.append(echoed, v.clone());
        }
    }
    Ok(resp)
}

/// A gRPC-over-HTTP/2 echo server speaking the real wire format: every length-prefixed
/// message is echoed back as soon as it arrives (so bidirectional streaming is visible),
/// then trailers `grpc-status: 0`, `grpc-message: ok` and a custom `x-trailer: kept`.
/// The method `/test.Echo/Fail` ends with `grpc-status: 5` instead, and
/// `/test.Echo/UnavailableOnce` answers the first call for each `x-key` with a trailers-only
/// `grpc-status: 14` (UNAVAILABLE), as a server that is shedding load would.
pub async fn grpc() -> Upstream {
    serve(|listener| async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(grpc_echo);
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
    .await
}

async fn grpc_echo(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    if req.uri().path() == "/test.Echo/UnavailableOnce" {
        let key = req
            .headers()
            .get("x-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let mut seen = SEEN.lock().unwrap();
        if !seen.contains(&key) {
            seen.push(key);
            let mut resp = Response::new(full(Bytes::new()));
            let h = resp.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from_static("14"));
            h.insert("grpc-message", HeaderValue::from_static("shedding load"));
            return Ok(resp);
        }
    }
    let fail = req.uri().path() == "/test.Echo/Fail";
    let mut body = req.into_body();
    let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(16);
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
                for msg in grpc_messages(&mut buf) {
                    if tx.send(Frame::data(grpc_frame(&msg))).await.is_err() {
                        return;
                    }
                }
            }
        }
        let mut trailers = http::HeaderMap::new();
        if fail {
            trailers.insert("grpc-status", HeaderValue::from_static("5"));
            trailers.insert("grpc-message", HeaderValue::from_static("no such thing"));
        } else {
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("grpc-message", HeaderValue::from_static("ok"));
        }
        trailers.insert("x-trailer", HeaderValue::from_static("kept"));
        let _ = tx.send(Frame::trailers(trailers)).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, Infallible>(f), rx))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    Ok(resp)
}

/// One gRPC message on the wire: uncompressed flag, big-endian length, payload.
pub fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.freeze()
}

/// Splits complete gRPC messages off the front of `buf`.
pub fn grpc_messages(buf: &mut BytesMut) -> Vec<Bytes> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        let mut msg = buf.split_to(5 + len);
        msg.advance(5);
        out.push(msg.freeze());
    }
    out
}

/// A WebSocket server that echoes every text and binary message.
pub async fn websocket() -> Upstream {
    serve(|listener| async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
    .await
}

/// A raw TCP echo server.
pub async fn tcp_echo() -> Upstream {
    serve(|listener| async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
    .await
}

/// A server-speaks-first protocol in the style of SMTP: a banner on connect, then one
/// `250 <line>` reply per line received.
pub async fn server_first() -> Upstream {
    serve(|listener| async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                if w.write_all(b"220 outrigger-test ready\r\n").await.is_err() {
                    return;
                }
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("250 {line}\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    })
    .await
}

/// Requests seen per path by a `fail_first` upstream.
pub type Seen = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>;

/// An upstream that fails the first request for each `/fail-once/...` path with 503, fails
/// every `/always-503/...` request, and otherwise answers 200 with the attempt number the
/// proxy sent (`x-outrigger-attempt`) as the body.
pub async fn fail_first() -> (Upstream, Seen) {
    let seen: Seen = Default::default();
    let shared = seen.clone();
    let upstream = serve(move |listener| async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let seen = shared.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let attempt = req
                            .headers()
                            .get("x-outrigger-attempt")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("none")
                            .to_string();
                        let _ = req.into_body().collect().await;
                        let count = {
                            let mut seen = seen.lock().unwrap();
                            let c = seen.entry(path.clone()).or_default();
                            *c += 1;
                            *c
                        };
                        let fail = path.starts_with("/always-503/")
                            || (path.starts_with("/fail-once/") && count == 1);
                        let mut resp = Response::new(full(attempt));
                        if fail {
                            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
    .await;
    (upstream, seen)
}

/// What a `canned` upstream received: each request's head, as text.
pub type Heads = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// An HTTP/1.1 upstream that answers every request head with the same raw bytes, whatever
/// they say (a huge `Retry-After`, a made-up `grpc-status`, a `101`), and keeps each head it
/// read. Request bodies are not expected.
pub async fn canned(response: &'static str) -> (Upstream, Heads) {
    let heads: Heads = Default::default();
    let shared = heads.clone();
    let upstream = serve(move |listener| async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let heads = shared.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                let mut head = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    if !line.is_empty() {
                        head += &line;
                        head += "\n";
                        continue;
                    }
                    heads.lock().unwrap().push(std::mem::take(&mut head));
                    if w.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
    .await;
    (upstream, heads)
}

/// A gRPC server (HTTP/2, plaintext) that answers every unary call with the same message,
/// whatever was asked: a stand-in for a CA that lies.
pub async fn grpc_canned(answer: Bytes) -> Upstream {
    serve(move |listener| async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let answer = answer.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        let frames = vec![
                            Ok::<_, Infallible>(Frame::data(grpc_frame(&answer))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(
                            futures_util::stream::iter(frames),
                        )));
                        resp.headers_mut()
                            .insert("content-type", HeaderValue::from_static("application/grpc"));
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
    .await
}
