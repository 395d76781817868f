//! The control plane's TLS port: ADS over mTLS and the CA's `Sign`.
//!
//! The control plane presents a certificate from its own CA and tells the ADS server who the
//! caller proved to be, so that a node is served the config of the service its certificate
//! names, whatever its node metadata claims. A caller may come without a certificate: a
//! proxy asking for its first one has none, and proves itself to `Sign` with its bootstrap
//! token instead. ADS refuses such a caller. A certificate that is presented must chain to
//! the mesh's roots and carry a SPIFFE ID in the mesh's trust domain, or the handshake ends.

use std::sync::Arc;
use std::time::Duration;

use outrigger_core::spiffe::SpiffeId;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::ca::{Ca, CaError};
use crate::grpc_limits::Admitted;
pub use crate::grpc_limits::Caller;

/// A server config with a fresh certificate for the control plane, valid for a year; a
/// client certificate, if any, is checked against the CA's roots.
pub fn server_config(ca: &Ca, names: &[String]) -> Result<Arc<ServerConfig>, CaError> {
    let tls = |e: &dyn std::fmt::Display| CaError::Tls(e.to_string());
    let id = SpiffeId::control_plane(&ca.trust_domain);
    let (chain, key) = ca.issue_named(&id, names, Duration::from_secs(365 * 24 * 3600))?;
    let (chain, key) = crate::ca::rustls_pair(&chain, &key)?;
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(ca.bundle_pem().as_bytes()) {
        roots
            .add(root.map_err(|e| CaError::Pem(e.to_string()))?)
            .map_err(|e| tls(&e))?;
    }
    let provider = outrigger_core::tls::provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls(&e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    outrigger_core::tls::no_server_resumption(&mut config);
    Ok(Arc::new(config))
}

/// One accepted TLS connection and the identity its client proved, if it sent a certificate.
pub type SecureConn = Admitted<TlsStream<TcpStream>, Caller>;

/// TLS connections on `listener`, admitted under `gate`, each with the identity its client
/// proved (if it sent a certificate). A certificate without a SPIFFE ID in `trust_domain`
/// ends the handshake.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    trust_domain: String,
    gate: Arc<crate::grpc_limits::Gate>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<SecureConn>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let trust_domain = Arc::new(trust_domain);
    crate::grpc_limits::incoming(listener, gate, move |tcp: TcpStream| {
        let (acceptor, trust_domain) = (acceptor.clone(), trust_domain.clone());
        async move {
            let addr = tcp.peer_addr().ok();
            let inner = match acceptor.accept(tcp).await {
                Ok(inner) => inner,
                Err(e) => {
                    tracing::debug!(error = %e, "xDS TLS handshake failed");
                    return None;
                }
            };
            let leaf = inner
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first());
            let peer = match leaf.map(|l| SpiffeId::from_certificate(l)) {
                None => None,
                Some(Ok(id)) if id.trust_domain == *trust_domain => Some(id),
                Some(Ok(id)) => {
                    tracing::debug!(%id, "xDS client certificate from another trust domain");
                    return None;
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "xDS client certificate without a SPIFFE ID");
                    return None;
                }
            };
            let caller = Caller {
                addr,
                tls: true,
                identity: peer,
            };
            Some((inner, caller))
        }
    })
}
