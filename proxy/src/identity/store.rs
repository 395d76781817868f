//! The proxy's workload identity: its certificate chain and key, and the trust bundle it
//! checks peers against. Both are swapped atomically, so a rotated certificate or a new root
//! takes effect for the next handshake while established connections carry on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use outrigger_core::spiffe::SpiffeId;

use outrigger_core::tls::provider;

pub struct Workload {
    pub id: SpiffeId,
    pub key: Arc<CertifiedKey>,
    pub not_after: SystemTime,
}

pub struct IdentityStore {
    workload: ArcSwapOption<Workload>,
    roots: ArcSwap<RootCertStore>,
    /// Rebuilt with each trust bundle: rustls's client-certificate chain check.
    client_verifier: ArcSwapOption<Arc<dyn ClientCertVerifier>>,
    /// Why the last attempt to get a certificate failed; cleared by a success.
    last_error: ArcSwapOption<String>,
}

impl Default for IdentityStore {
    fn default() -> Self {
        IdentityStore {
            workload: ArcSwapOption::empty(),
            roots: ArcSwap::from_pointee(RootCertStore::empty()),
            client_verifier: ArcSwapOption::empty(),
            last_error: ArcSwapOption::empty(),
        }
    }
}

/// Why an identity could not be loaded or installed: what was wrong (a file, the trust bundle,
/// the certificate, the key, the CA's answer), and how.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct IdentityError {
    pub what: String,
    pub reason: String,
}

impl IdentityError {
    pub fn new(what: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        IdentityError {
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::new(what, e))?;
    if certs.is_empty() {
        return Err(IdentityError::new(what, "no PEM certificate"));
    }
    Ok(certs)
}

impl IdentityStore {
    pub fn workload(&self) -> Option<Arc<Workload>> {
        self.workload.load_full()
    }

    pub fn last_error(&self) -> Option<Arc<String>> {
        self.last_error.load_full()
    }

    pub fn set_last_error(&self, error: Option<String>) {
        self.last_error.store(error.map(Arc::new));
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.load_full()
    }

    pub fn client_verifier(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.client_verifier.load_full().map(|v| (*v).clone())
    }

    /// Replaces the trust bundle: every root in it is trusted (during a root rotation, the
    /// old and the new).
    pub fn set_bundle(&self, bundle_pem: &[u8]) -> Result<(), IdentityError> {
        let bad = |e: &dyn std::fmt::Display| IdentityError::new("trust bundle", e);
        let mut roots = RootCertStore::empty();
        for cert in certificates(bundle_pem, "trust bundle")? {
            roots.add(cert).map_err(|e| bad(&e))?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| bad(&e))?;
        self.roots.store(roots);
        self.client_verifier.store(Some(Arc::new(verifier)));
        Ok(())
    }

    /// Installs a certificate chain (leaf first) and its key, after checking that they belong
    /// together and that the leaf carries a SPIFFE ID.
    pub fn set_certificate(
        &self,
        chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<SpiffeId, IdentityError> {
        let chain = certificates(chain_pem, "certificate")?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| IdentityError::new("key", e))?;
        let id = SpiffeId::from_certificate(&chain[0])
            .map_err(|e| IdentityError::new("certificate", e))?;
        let (_, leaf) = X509Certificate::from_der(&chain[0])
            .map_err(|e| IdentityError::new("certificate", e))?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(leaf.validity().not_after.timestamp().max(0) as u64);
        let key = CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| IdentityError::new("certificate and key", e))?;
        self.workload.store(Some(Arc::new(Workload {
            id: id.clone(),
            key: Arc::new(key),
            not_after,
        })));
        Ok(id)
    }
}

// Only the file check takes this lock, on its own timer; the handshakes read the store.
#[allow(clippy::disallowed_types)]
/// Where a file-based identity lives: what `outrigger-control-plane issue` writes, or what
/// a Kubernetes secret mounts.
#[derive(Debug)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    /// The files' modification times when last loaded.
    loaded: std::sync::Mutex<Option<Vec<SystemTime>>>,
}

#[allow(clippy::disallowed_types)]
impl IdentityFiles {
    pub fn new(cert: PathBuf, key: PathBuf, bundle: PathBuf) -> Self {
        IdentityFiles {
            cert,
            key,
            bundle,
            loaded: std::sync::Mutex::new(None),
        }
    }

    pub fn same_paths(&self, other: &IdentityFiles) -> bool {
        (&self.cert, &self.key, &self.bundle) == (&other.cert, &other.key, &other.bundle)
    }

    pub fn load_into(&self, store: &IdentityStore) -> Result<SpiffeId, IdentityError> {
        let stamp = self.stamp();
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| IdentityError::new(p.display(), e));
        store
            .set_bundle(&read(&self.bundle)?)
            .map_err(|e| IdentityError::new(self.bundle.display(), e))?;
        let id = store
            .set_certificate(&read(&self.cert)?, &read(&self.key)?)
            .map_err(|e| IdentityError::new(self.cert.display(), e))?;
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        Ok(id)
    }

    fn stamp(&self) -> Option<Vec<SystemTime>> {
        [&self.cert, &self.key, &self.bundle]
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// Reloads the files if they changed since the last load. A bad set is logged and the
    /// identity in use stays: a half-written rotation must not take traffic down.
    pub fn refresh(&self, store: &IdentityStore) {
        let now = self.stamp();
        if now.is_none() || *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) == now {
            return;
        }
        match self.load_into(store) {
            Ok(id) => tracing::info!(identity = %id, "identity reloaded"),
            Err(e) => tracing::warn!(error = %e, "identity not reloaded; keeping the old one"),
        }
    }
}
