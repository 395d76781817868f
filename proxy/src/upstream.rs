//! Upstream HTTP connections: a keep-alive pool for HTTP/1.1 and one multiplexed
//! connection per endpoint for HTTP/2, both from hyper-util's pooled client, keyed by the
//! endpoint address. Upgrades (WebSocket) get a connection of their own, since an upgraded
//! connection can never go back to a pool.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::config::UpstreamProtocol;
use crate::error::ProxyError;

pub type Body = BoxBody<Bytes, hyper::Error>;

#[derive(Clone)]
pub struct UpstreamClient {
    inner: Client<HttpConnector, Body>,
    connect_timeout: Duration,
}

impl UpstreamClient {
    pub fn new(protocol: UpstreamProtocol, connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256);
        if protocol == UpstreamProtocol::Http2 {
            builder.http2_only(true);
        }
        UpstreamClient {
            inner: builder.build(connector),
            connect_timeout,
        }
    }

    pub async fn send(
        &self,
        cluster: &str,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        self.inner.request(req).await.map_err(|e| {
            if e.is_connect() {
                ProxyError::UpstreamConnect {
                    cluster: cluster.to_string(),
                    reason: source_chain(&e),
                }
            } else {
                ProxyError::UpstreamFailed {
                    reason: source_chain(&e),
                }
            }
        })
    }

    /// Sends an HTTP/1.1 upgrade request on a fresh connection of its own.
    pub async fn send_upgrade(
        &self,
        cluster: &str,
        addr: std::net::SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let connect_failed = |reason: String| ProxyError::UpstreamConnect {
            cluster: cluster.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_failed("connect timed out".into()))?
            .map_err(|e| connect_failed(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_failed(e.to_string()))?;
        tokio::spawn(conn.with_upgrades());
        sender
            .send_request(req)
            .await
            .map_err(|e| ProxyError::UpstreamFailed {
                reason: source_chain(&e),
            })
    }
}

/// The innermost cause is usually the informative one ("connection refused").
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
