//! Opaque TCP: copy bytes both ways until both sides are done or the stream goes idle.
//!
//! Half-close is kept: when one side finishes sending, the other side's write half is shut
//! down and the opposite direction keeps flowing.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::cluster::balance::Cluster;
use crate::config::snapshot::DEFAULT_CONNECT_TIMEOUT;
use crate::net::splice::copy_with_idle_timeout;
use std::net::SocketAddr;

/// Connects to an endpoint of `cluster` and copies until done. Returns bytes copied.
pub async fn proxy<D>(downstream: D, cluster: &Cluster, idle_timeout: Duration) -> io::Result<u64>
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let endpoint = cluster.pick().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no endpoint in cluster `{}`", cluster.name),
        )
    })?;
    let upstream = tokio::time::timeout(cluster.connect_timeout, TcpStream::connect(endpoint.addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    upstream.set_nodelay(true)?;
    // In load reports, a connection counts as a request, and its life as its latency.
    let in_flight = endpoint.start();
    let copied = match &cluster.tls {
        None => copy_with_idle_timeout(downstream, upstream, idle_timeout).await,
        // To another proxy: mTLS, with the ALPN that tells its inbound side this is opaque TCP.
        Some(tls) => {
            let name = rustls_pki_types::ServerName::IpAddress(endpoint.addr.ip().into());
            let upstream = tokio::time::timeout(
                cluster.connect_timeout,
                tokio_rustls::TlsConnector::from(tls.tcp_config.clone()).connect(name, upstream),
            )
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
            copy_with_idle_timeout(downstream, upstream, idle_timeout).await
        }
    };
    in_flight.finished(copied.is_ok(), in_flight.answered());
    copied
}

/// Connects to exactly `to`, outside any cluster: traffic the mesh does not own.
pub async fn passthrough<D>(
    downstream: D,
    to: SocketAddr,
    idle_timeout: Duration,
) -> io::Result<u64>
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let upstream = tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, TcpStream::connect(to))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    upstream.set_nodelay(true)?;
    copy_with_idle_timeout(downstream, upstream, idle_timeout).await
}
