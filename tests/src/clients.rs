//! Small clients for tests: HTTP/1.1 and HTTP/2 through the proxy, and raw bytes.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub async fn collect(resp: Response<Incoming>) -> Result<Reply, String> {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A client as an app would have one: pooled keep-alive HTTP/1.1, or one multiplexed
/// HTTP/2 (prior knowledge) connection, always to the proxy.
#[derive(Clone)]
pub enum TestClient {
    Http1 {
        pool: Box<Client<HttpConnector, Full<Bytes>>>,
        proxy: SocketAddr,
    },
    Http2 {
        sender: http2::SendRequest<Full<Bytes>>,
    },
}

impl TestClient {
    pub fn http1(proxy: SocketAddr) -> Self {
        TestClient::Http1 {
            pool: Box::new(Client::builder(TokioExecutor::new()).build_http()),
            proxy,
        }
    }

    pub async fn http2(proxy: SocketAddr) -> Self {
        let stream = TcpStream::connect(proxy).await.unwrap();
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        TestClient::Http2 { sender }
    }

    /// Sends with `host` as the Host header (HTTP/1.1) or `:authority` (HTTP/2).
    pub async fn send(
        &self,
        method: Method,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Reply, String> {
        let uri = match self {
            TestClient::Http1 { proxy, .. } => format!("http://{proxy}{path}"),
            TestClient::Http2 { .. } => format!("http://{host}{path}"),
        };
        let mut b = Request::builder().method(method).uri(uri);
        if let TestClient::Http1 { .. } = self {
            b = b.header("host", host);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let resp = match self {
            TestClient::Http1 { pool, .. } => {
                pool.request(req).await.map_err(|e| format!("{e:?}"))?
            }
            TestClient::Http2 { sender } => sender
                .clone()
                .send_request(req)
                .await
                .map_err(|e| format!("{e:?}"))?,
        };
        collect(resp).await
    }

    pub async fn get(&self, host: &str, path: &str) -> Result<Reply, String> {
        self.send(Method::GET, host, path, &[], "").await
    }
}

/// A plain GET, e.g. to the admin listener.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    TestClient::http1(addr)
        .get(&addr.to_string(), path)
        .await
        .expect("GET succeeds")
}

/// Writes raw bytes, half-closes, and reads everything the peer sends until it closes.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
