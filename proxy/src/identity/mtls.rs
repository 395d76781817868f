//! Mutual TLS between proxies: the rustls configurations, with the workload's certificate
//! resolved per handshake from the identity store (so rotation needs no rebuild), and peer
//! verification by SPIFFE ID.
//!
//! Stock WebPKI server verification matches DNS names, and an SVID's only name is a URI, so
//! the outbound side checks the chain against the trust bundle itself and then compares the
//! peer's SPIFFE ID with the one expected for the destination. The inbound side lets rustls
//! check the client's chain (client certificates carry no name to match) and reads the
//! caller's ID afterwards, for authorization and telemetry.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::store::IdentityStore;
use outrigger_core::spiffe::SpiffeId;
use outrigger_core::tls::provider;

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// Opaque TCP between proxies: the inbound side hands it to its `tcp` route.
pub const ALPN_TCP: &[u8] = b"outrigger-tcp";

struct Resolver(Arc<IdentityStore>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.workload().map(|w| w.key.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.workload().map(|w| w.key.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.workload().is_some()
    }
}

/// Inbound: a client certificate is required, chained to the current trust bundle.
struct CallerVerifier(Arc<IdentityStore>);

impl fmt::Debug for CallerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallerVerifier")
    }
}

// Handshake signatures are checked the same way on both sides, with the one provider.
fn tls12_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    let algs = provider().signature_verification_algorithms;
    rustls::crypto::verify_tls12_signature(message, cert, dss, &algs)
}

fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    let algs = provider().signature_verification_algorithms;
    rustls::crypto::verify_tls13_signature(message, cert, dss, &algs)
}

fn schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

fn no_bundle() -> Error {
    Error::General("no trust bundle yet".into())
}

impl ClientCertVerifier for CallerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let inner = self.0.client_verifier().ok_or_else(no_bundle)?;
        inner.verify_client_cert(end_entity, intermediates, now)?;
        // A chain from our CA without a SPIFFE ID is still not a workload.
        SpiffeId::from_certificate(end_entity).map_err(|e| Error::General(e.to_string()))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// Outbound: the server's chain must reach the trust bundle, and its SPIFFE ID must be one
/// of those expected for the destination.
struct PeerVerifier {
    store: Arc<IdentityStore>,
    expected: Vec<SpiffeId>,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerVerifier({:?})", self.expected)
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        let roots = self.store.roots();
        if roots.is_empty() {
            return Err(no_bundle());
        }
        let algs = provider().signature_verification_algorithms;
        verify_server_cert_signed_by_trust_anchor(&cert, &roots, intermediates, now, algs.all)?;
        let id =
            SpiffeId::from_certificate(end_entity).map_err(|e| Error::General(e.to_string()))?;
        if !self.expected.contains(&id) {
            return Err(Error::General(format!(
                "peer is {id}, expected {}",
                self.expected
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// The inbound side: our certificate, and a required client certificate. HTTP/2 is offered
/// first so that HTTP/1 from an app can ride a multiplexed connection between proxies.
pub fn server_config(store: Arc<IdentityStore>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_client_cert_verifier(Arc::new(CallerVerifier(store.clone())))
        .with_cert_resolver(Arc::new(Resolver(store)));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
    outrigger_core::tls::no_server_resumption(&mut config);
    Arc::new(config)
}

/// The outbound side, for a destination whose workloads have one of `expected` identities,
/// offering `alpn` (HTTP/2, or opaque TCP).
pub fn client_config(
    store: Arc<IdentityStore>,
    expected: Vec<SpiffeId>,
    alpn: &[u8],
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier {
            store: store.clone(),
            expected,
        }))
        .with_client_cert_resolver(Arc::new(Resolver(store)));
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = outrigger_core::tls::no_client_resumption();
    Arc::new(config)
}

/// The caller's identity on an accepted connection.
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    SpiffeId::from_certificate(leaf).ok()
}
