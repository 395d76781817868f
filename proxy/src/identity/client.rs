//! Getting and renewing the workload certificate from the control plane's CA.
//!
//! The key is made here and never leaves the process: only a CSR goes out. A certificate is
//! renewed at about half its lifetime, with jitter so that a fleet started together does not
//! renew together. A failed renewal keeps the certificate in use (it is still valid) and is
//! retried with backoff.
//!
//! The CA is reached over TLS and must prove itself against a trust anchor the proxy got out
//! of band (a file mounted into the pod), not against anything the CA sends. What it returns
//! is checked before it is installed: the chain must reach that anchor, and the leaf must
//! carry exactly the requested ID and this proxy's key.

use outrigger_core::backoff::Backoff;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

use crate::identity::api::{self, SignRequest};
use crate::identity::mtls;
use crate::identity::store::{IdentityError, IdentityStore};
use outrigger_core::spiffe::{SpiffeError, SpiffeId};

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Waits between failed renewals: from 200 ms, doubling, to 30 s.
const RENEWAL_RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));

/// The bootstrap credential sent with every CSR.
#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    /// A per-workload token from the mesh file.
    Inline(String),
    /// A projected Kubernetes service-account token: the kubelet rotates the file, so it is
    /// read again for every request.
    File(std::path::PathBuf),
}

impl Token {
    fn current(&self) -> Result<String, IdentityError> {
        match self {
            Token::Inline(t) => Ok(t.clone()),
            Token::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| {
                    IdentityError::new(format!("cannot read the token file {}", path.display()), e)
                }),
        }
    }
}

/// How the CA proves itself.
#[derive(Debug, Clone, PartialEq)]
pub enum CaTrust {
    /// TLS, with the CA's certificate and the chains it signs checked against the roots in
    /// this file, and the CA's SPIFFE ID matched.
    Anchor {
        file: std::path::PathBuf,
        server_id: SpiffeId,
    },
    /// Plaintext, trusting whoever answers: for local development only.
    Plaintext,
}

/// A certificate the CA signed, the key made for it here, and the bundle it came with.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
    pub bundle_pem: String,
}

#[derive(Debug)]
pub struct CaClient {
    pub address: std::net::SocketAddr,
    pub trust: CaTrust,
    pub token: Token,
    pub id: SpiffeId,
    pub lifetime: Duration,
    /// Set once the renewal task for this client runs.
    pub started: AtomicBool,
}

impl CaClient {
    pub fn same_settings(&self, other: &CaClient) -> bool {
        (
            &self.address,
            &self.trust,
            &self.token,
            &self.id,
            self.lifetime,
        ) == (
            &other.address,
            &other.trust,
            &other.token,
            &other.id,
            other.lifetime,
        )
    }

    /// One round: a fresh key, a CSR, the CA's answer installed. Returns the new expiry.
    pub async fn renew(&self, store: &IdentityStore) -> Result<SystemTime, IdentityError> {
        let issued = self.issue().await?;
        store.set_bundle(issued.bundle_pem.as_bytes())?;
        store.set_certificate(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())?;
        Ok(store.workload().map_or(SystemTime::now(), |w| w.not_after))
    }

    /// A fresh key and the certificate the CA signed for it, checked.
    pub async fn issue(&self) -> Result<Issued, IdentityError> {
        let csr_error = |e: rcgen::Error| IdentityError::new("the CSR", e);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(csr_error)?;
        let mut params = CertificateParams::default();
        let uri = self.id.to_string().try_into().map_err(csr_error)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params.serialize_request(&key).map_err(csr_error)?;
        let token = self.token.current()?;
        // The anchor is read for every call: a rotated root is a new file.
        let anchor = match &self.trust {
            CaTrust::Plaintext => None,
            CaTrust::Anchor { file, server_id } => {
                let anchor_error = |e: &dyn std::fmt::Display| {
                    IdentityError::new(format!("the CA trust anchor {}", file.display()), e)
                };
                let pem = std::fs::read(file).map_err(|e| anchor_error(&e))?;
                let roots = Arc::new(IdentityStore::default());
                roots.set_bundle(&pem).map_err(|e| anchor_error(&e))?;
                let tls =
                    mtls::client_config(roots.clone(), vec![server_id.clone()], mtls::ALPN_H2);
                Some((roots, tls))
            }
        };
        let response = api::sign(
            self.address,
            anchor.as_ref().map(|(_, tls)| tls),
            &token,
            SignRequest {
                csr: csr.der().to_vec(),
                lifetime_seconds: self.lifetime.as_secs(),
            },
            CALL_TIMEOUT,
        )
        .await
        .map_err(|s| IdentityError::new("the CA call failed", s.message()))?;
        check_issued(
            &response.chain_pem,
            &self.id,
            &key,
            anchor.as_ref().map(|(roots, _)| roots.as_ref()),
        )
        .map_err(|e| IdentityError::new("the CA's answer was rejected", e))?;
        Ok(Issued {
            chain_pem: response.chain_pem,
            key_pem: key.serialize_pem(),
            bundle_pem: response.bundle_pem,
        })
    }

    /// Keeps the store's certificate fresh while `still_wanted` says so.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<IdentityStore>,
        still_wanted: impl Fn() -> bool + Send + 'static,
    ) {
        let mut failures = 0u32;
        while still_wanted() {
            let wait = match self.renew(&store).await {
                Ok(not_after) => {
                    failures = 0;
                    store.set_last_error(None);
                    let left = not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    tracing::info!(identity = %self.id, ?left, "certificate renewed");
                    left.mul_f64(0.5 * (0.9 + 0.2 * fastrand::f64()))
                }
                Err(e) => {
                    failures += 1;
                    store.set_last_error(Some(e.to_string()));
                    tracing::warn!(identity = %self.id, error = %e, failures, "certificate renewal failed; keeping the current one");
                    RENEWAL_RETRY.equal_jitter(failures)
                }
            };
            tokio::time::sleep(wait.max(Duration::from_millis(50))).await;
        }
    }
}

/// Why a chain the CA returned is not installed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IssuedError {
    #[error("the chain is not PEM: {0}")]
    NotPem(String),
    #[error("the chain is empty")]
    Empty,
    #[error(transparent)]
    Spiffe(#[from] SpiffeError),
    #[error("the certificate is for {got}, not the requested {want}")]
    OtherIdentity { got: String, want: String },
    #[error("the certificate is not valid now (from {from} to {to})")]
    NotValidNow { from: String, to: String },
    #[error("the certificate is not for this proxy's key")]
    OtherKey,
    #[error("the trust anchor holds no root")]
    NoAnchorRoot,
    #[error("the chain does not reach the trust anchor: {0}")]
    OutsideAnchor(String),
}

/// Checks a chain the CA returned before it is installed: the leaf carries exactly `want`
/// and the public half of `key`, it is valid now, and (with an anchor) the chain reaches one
/// of the anchor's roots.
pub fn check_issued(
    chain_pem: &str,
    want: &SpiffeId,
    key: &KeyPair,
    anchor: Option<&IdentityStore>,
) -> Result<(), IssuedError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, X509Certificate};

    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IssuedError::NotPem(e.to_string()))?;
    let leaf = chain.first().ok_or(IssuedError::Empty)?;
    let id = SpiffeId::from_certificate(leaf)?;
    if &id != want {
        return Err(IssuedError::OtherIdentity {
            got: id.to_string(),
            want: want.to_string(),
        });
    }
    let (_, parsed) =
        X509Certificate::from_der(leaf).map_err(|e| IssuedError::NotPem(e.to_string()))?;
    if !parsed.validity().is_valid() {
        return Err(IssuedError::NotValidNow {
            from: parsed.validity().not_before.to_string(),
            to: parsed.validity().not_after.to_string(),
        });
    }
    if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice() {
        return Err(IssuedError::OtherKey);
    }
    if let Some(anchor) = anchor {
        let verifier = anchor.client_verifier().ok_or(IssuedError::NoAnchorRoot)?;
        let now = rustls_pki_types::UnixTime::now();
        verifier
            .verify_client_cert(leaf, &chain[1..], now)
            .map_err(|e| IssuedError::OutsideAnchor(e.to_string()))?;
    }
    Ok(())
}
