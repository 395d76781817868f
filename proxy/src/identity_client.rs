//! Getting and renewing the workload certificate from the control plane's CA.
//!
//! The key is made here and never leaves the process: only a CSR goes out. A certificate is
//! renewed at about half its lifetime, with jitter so that a fleet started together does not
//! renew together. A failed renewal keeps the certificate in use (it is still valid) and is
//! retried with backoff.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

use crate::identity::IdentityStore;
use crate::identity_api::{self, SignRequest};
use crate::spiffe::SpiffeId;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

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
    fn current(&self) -> Result<String, String> {
        match self {
            Token::Inline(t) => Ok(t.clone()),
            Token::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("cannot read the token file {}: {e}", path.display())),
        }
    }
}

#[derive(Debug)]
pub struct CaClient {
    pub endpoint: String,
    pub token: Token,
    pub id: SpiffeId,
    pub lifetime: Duration,
    /// Set once the renewal task for this client runs.
    pub started: AtomicBool,
}

impl CaClient {
    pub fn same_settings(&self, other: &CaClient) -> bool {
        (&self.endpoint, &self.token, &self.id, self.lifetime)
            == (&other.endpoint, &other.token, &other.id, other.lifetime)
    }

    /// One round: a fresh key, a CSR, the CA's answer installed. Returns the new expiry.
    pub async fn renew(&self, store: &IdentityStore) -> Result<SystemTime, String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        let uri = self
            .id
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| e.to_string())?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
        let token = self.token.current()?;
        let response = identity_api::sign(
            &self.endpoint,
            &token,
            SignRequest {
                csr: csr.der().to_vec(),
                lifetime_seconds: self.lifetime.as_secs(),
            },
            CALL_TIMEOUT,
        )
        .await
        .map_err(|s| format!("the CA refused: {}", s.message()))?;
        store.set_bundle(response.bundle_pem.as_bytes())?;
        store.set_certificate(
            response.chain_pem.as_bytes(),
            key.serialize_pem().as_bytes(),
        )?;
        Ok(store.workload().map_or(SystemTime::now(), |w| w.not_after))
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
                    let left = not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    tracing::info!(identity = %self.id, ?left, "certificate renewed");
                    left.mul_f64(0.5 * (0.9 + 0.2 * fastrand::f64()))
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(identity = %self.id, error = %e, failures, "certificate renewal failed; keeping the current one");
                    RETRY_MIN
                        .saturating_mul(1 << failures.min(8))
                        .min(RETRY_MAX)
                        .mul_f64(0.5 + 0.5 * fastrand::f64())
                }
            };
            tokio::time::sleep(wait.max(Duration::from_millis(50))).await;
        }
    }
}
