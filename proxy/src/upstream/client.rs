//! Upstream HTTP connections.
//!
//! - HTTP/1.1: a keep-alive pool per endpoint (`http1_pool`); the request goes in origin
//!   form, and the original `Host` header travels as is.
//! - HTTP/2: one multiplexed connection per endpoint (`H2Connection`, owned by the endpoint so
//!   it survives config swaps). The request URI carries the original authority, so
//!   `:authority` is the name the app asked for, not the endpoint address (RFC 9113 §8.3.1).
//! - Upgrades (WebSocket) get an HTTP/1.1 connection of their own, since an upgraded
//!   connection can never go back to a pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::client::conn::http2;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::upstream::error::ProxyError;

pub type Body = BoxBody<Bytes, hyper::Error>;

pub(super) async fn connect(
    cluster: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ProxyError> {
    let failed = |reason: String| ProxyError::UpstreamConnect {
        cluster: cluster.to_string(),
        reason,
    };
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| failed(format!("connect to {addr} timed out after {timeout:?}")))?
        .map_err(|e| failed(format!("{addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Sends an HTTP/1.1 upgrade request on a fresh connection of its own.
pub async fn send_upgrade(
    cluster: &str,
    addr: SocketAddr,
    connect_timeout: Duration,
    req: Request<Body>,
) -> Result<Response<Incoming>, ProxyError> {
    let stream = connect(cluster, addr, connect_timeout).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProxyError::UpstreamConnect {
            cluster: cluster.to_string(),
            reason: e.to_string(),
        })?;
    tokio::spawn(conn.with_upgrades());
    sender.send_request(req).await.map_err(|e| failed(&e))
}

/// One multiplexed HTTP/2 connection to one endpoint, made on first use and made again
/// when it closes. Requests clone the sender without any lock; only connecting takes one,
/// so that a burst of requests to a cold endpoint opens one connection, not a hundred.
// Taken only to make a connection (a request finds the live one without it), so that a
// burst to a cold endpoint opens one connection.
#[allow(clippy::disallowed_types)]
#[derive(Default)]
pub struct H2Connection {
    sender: ArcSwapOption<http2::SendRequest<Body>>,
    connecting: tokio::sync::Mutex<()>,
}

impl H2Connection {
    fn live(&self) -> Option<http2::SendRequest<Body>> {
        self.sender
            .load()
            .as_ref()
            .filter(|s| !s.is_closed())
            .map(|s| (**s).clone())
    }

    /// Sends on the endpoint's connection, making it first if there is none: over mTLS when
    /// `tls` is given, with the peer's identity checked during the handshake.
    pub async fn send(
        &self,
        cluster: &str,
        addr: SocketAddr,
        connect_timeout: Duration,
        tls: Option<&Arc<rustls::ClientConfig>>,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut sender = match self.live() {
            Some(s) => s,
            // Connecting is rare and its futures are large (a TLS handshake): boxed, so that
            // every request's future does not carry them.
            None => Box::pin(self.connect(cluster, addr, connect_timeout, tls)).await?,
        };
        sender.send_request(req).await.map_err(|e| failed(&e))
    }

    async fn connect(
        &self,
        cluster: &str,
        addr: SocketAddr,
        connect_timeout: Duration,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<http2::SendRequest<Body>, ProxyError> {
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(live) = self.live() {
            return Ok(live);
        }
        let stream = connect(cluster, addr, connect_timeout).await?;
        let sender = match tls {
            None => handshake(cluster, addr, stream).await?,
            Some(config) => {
                let tls = tokio::time::timeout(
                    connect_timeout,
                    tokio_rustls::TlsConnector::from(config.clone())
                        .connect(ServerName::IpAddress(addr.ip().into()), stream),
                )
                .await
                .map_err(|_| ProxyError::UpstreamConnect {
                    cluster: cluster.to_string(),
                    reason: format!("{addr}: TLS handshake timed out"),
                })?
                .map_err(|e| ProxyError::UpstreamConnect {
                    cluster: cluster.to_string(),
                    reason: format!("{addr}: TLS handshake: {e}"),
                })?;
                handshake(cluster, addr, tls).await?
            }
        };
        self.sender.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }
}

async fn handshake<S>(
    cluster: &str,
    addr: SocketAddr,
    stream: S,
) -> Result<http2::SendRequest<Body>, ProxyError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // A PING every 10 s, answered within 10 s, even while idle: an upstream that vanished
    // without a FIN (a dead node, a black hole) is dropped and redialled, not waited on.
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(crate::net::grpc_channel::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(crate::net::grpc_channel::KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProxyError::UpstreamConnect {
            cluster: cluster.to_string(),
            reason: format!("{addr}: HTTP/2 handshake: {e}"),
        })?;
    tokio::spawn(conn);
    Ok(sender)
}

/// An exchange that broke after the connection was made. HTTP/2's REFUSED_STREAM is told
/// apart: it promises the upstream did not process the request, so any method may be retried.
pub(super) fn failed(e: &(dyn std::error::Error + 'static)) -> ProxyError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut refused = false;
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            refused |= h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cur = err.source();
    }
    ProxyError::UpstreamFailed {
        reason: source_chain(e),
        refused,
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
