//! A gRPC channel to the control plane, in plaintext or over TLS with a verifier of the
//! caller's choosing: the xDS stream (mTLS with the workload certificate) and the CA's
//! `Sign` (TLS checked against the mounted trust anchor) both dial through here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Dials `addr` over TLS for tonic's channel. The certificate check is the config's
/// verifier, which matches SPIFFE IDs, so the name sent is only the address.
#[derive(Clone)]
struct TlsConnect {
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
}

type Dialed = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for TlsConnect {
    type Response = Dialed;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Dialed, std::io::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::codegen::http::Uri) -> Self::Future {
        let (addr, config) = (self.addr, self.config.clone());
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// An endpoint for `addr` with the settings every control-plane call shares: a connect
/// timeout, and HTTP/2 keepalive so that a black-holed control plane is noticed.
pub fn endpoint(addr: SocketAddr, connect_timeout: Duration) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("an IP:port is a valid URI authority")
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
}

/// A PING every 10 s, answered within 10 s: a dead peer is noticed within 20 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects `endpoint`, over TLS when `tls` is given.
pub async fn connect(
    endpoint: Endpoint,
    addr: SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        None => endpoint.connect().await,
        Some(config) => {
            endpoint
                .connect_with_connector(TlsConnect {
                    addr,
                    config: config.clone(),
                })
                .await
        }
    }
}
