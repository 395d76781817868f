//! The mesh's certificate authority: it signs X.509-SVIDs, ECDSA P-256 with one
//! `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` URI SAN, for 24 hours by default.
//!
//! It signs only what the caller has proved: a CSR is checked to ask for exactly the identity
//! the caller's credential stands for, and nothing else from the CSR (subject, extensions)
//! makes it into the certificate. The CA is a generated root, or an operator's intermediate
//! with the roots above it as the trust bundle. During a root rotation the bundle holds both
//! roots, so certificates from either verify.

use std::path::Path;
use std::time::Duration;

use outrigger_core::spiffe::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use time::OffsetDateTime;

pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CSR is not valid: {0}")]
    BadCsr(String),
    #[error("the CSR asks for {asked}, but the credential proves {proved}")]
    WrongIdentity { asked: String, proved: String },
    #[error("{0}")]
    Files(String),
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
    #[error("not a PEM chain and key: {0}")]
    Pem(String),
    #[error("the TLS config: {0}")]
    Tls(String),
}

pub struct Ca {
    pub trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate; part of every issued chain when it is an intermediate.
    cert_pem: String,
    intermediate: bool,
    bundle_pem: String,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl Ca {
    /// A new self-signed root, valid for ten years.
    pub fn generate(trust_domain: &str) -> Result<Ca, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("outrigger root {trust_domain}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now() - time::Duration::minutes(5);
        params.not_after = now() + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            issuer: Issuer::new(params, key),
            cert_pem: pem.clone(),
            intermediate: false,
            bundle_pem: pem,
        })
    }

    /// `ca.crt` and `ca.key` from `dir`; with a `bundle.crt` beside them, the CA is an
    /// intermediate and that file holds the roots to trust.
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Ca, CaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .map_err(|e| CaError::Files(format!("{}: {e}", path.display())))
        };
        let cert_pem = read("ca.crt")?;
        let key = KeyPair::from_pem(&read("ca.key")?)
            .map_err(|e| CaError::Files(format!("{}: {e}", dir.join("ca.key").display())))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| CaError::Files(format!("{}: {e}", dir.join("ca.crt").display())))?;
        let (intermediate, bundle_pem) = match read("bundle.crt") {
            Ok(bundle) => (true, bundle),
            Err(_) => (false, cert_pem.clone()),
        };
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            issuer,
            cert_pem,
            intermediate,
            bundle_pem,
        })
    }

    /// Writes `ca.crt` and `ca.key` (readable by the owner only).
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        let files = |e: std::io::Error| CaError::Files(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(files)?;
        std::fs::write(dir.join("ca.crt"), &self.cert_pem).map_err(files)?;
        write_private(
            &dir.join("ca.key"),
            self.issuer.key().serialize_pem().as_bytes(),
        )
        .map_err(files)
    }

    /// When the CA's own certificate ends.
    pub fn not_after(&self) -> Option<std::time::SystemTime> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes()).ok()?;
        let cert = pem.parse_x509().ok()?;
        let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
    }

    /// The roots a workload should trust.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// Adds roots to the bundle (the next root, during a rotation).
    pub fn trust_also(&mut self, roots_pem: &str) {
        self.bundle_pem.push_str(roots_pem);
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a CSR for `proved`, the identity the caller's credential stands for. Returns the
    /// chain, leaf first.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        proved: &SpiffeId,
        lifetime: Duration,
    ) -> Result<String, CaError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [proved.to_string()] {
            return Err(CaError::WrongIdentity {
                asked: if asked.is_empty() {
                    "no identity".into()
                } else {
                    asked.join(", ")
                },
                proved: proved.to_string(),
            });
        }
        let now = now();
        // Backdated a minute: a peer whose clock runs a little behind must not see a
        // certificate from the future.
        let leaf = svid_params(proved, now - time::Duration::minutes(1), now + lifetime)?
            .signed_by(&csr.public_key, &self.issuer)?;
        Ok(self.chain(leaf.pem()))
    }

    /// A key and certificate made here, for workloads outside the mesh and for tests: the
    /// mesh's own proxies make their keys themselves and send a CSR.
    pub fn issue(&self, id: &SpiffeId, lifetime: Duration) -> Result<(String, String), CaError> {
        let now = now();
        self.issue_between(id, now - time::Duration::minutes(1), now + lifetime)
    }

    /// As `issue`, the certificate also naming `names` (DNS names, or IP addresses): for the
    /// control plane's own port, whose gRPC clients check the host they dial.
    pub fn issue_named(
        &self,
        id: &SpiffeId,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(String, String), CaError> {
        let now = now();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = svid_params(id, now - time::Duration::minutes(1), now + lifetime)?;
        for name in names {
            params
                .subject_alt_names
                .push(match name.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(name.clone().try_into()?),
                });
        }
        let leaf = params.signed_by(&key, &self.issuer)?;
        Ok((self.chain(leaf.pem()), key.serialize_pem()))
    }

    /// As `issue`, valid between two times (an expired one, for a test).
    pub fn issue_between(
        &self,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = svid_params(id, not_before, not_after)?.signed_by(&key, &self.issuer)?;
        Ok((self.chain(leaf.pem()), key.serialize_pem()))
    }

    /// A serving certificate for DNS names (the admission webhook's Service): the API
    /// server checks a host name, not a SPIFFE ID.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        lifetime: Duration,
    ) -> Result<(String, String), CaError> {
        let now = now();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + lifetime;
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&key, &self.issuer)?;
        Ok((self.chain(leaf.pem()), key.serialize_pem()))
    }

    fn chain(&self, leaf_pem: String) -> String {
        if self.intermediate {
            leaf_pem + &self.cert_pem
        } else {
            leaf_pem
        }
    }
}

/// A certificate chain and key as `issue` or `issue_server` wrote them, in rustls' form.
pub fn rustls_pair(
    chain_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
    let pem = |e: rustls_pki_types::pem::Error| CaError::Pem(e.to_string());
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem)?;
    Ok((chain, key))
}

fn svid_params(
    id: &SpiffeId,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyAgreement,
    ];
    // Every workload is both a client and a server.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Writes a file only its owner may read, with that mode from its first byte: a key must
/// never exist, even briefly, with wider permissions. A new file is written beside it and
/// renamed over it, so a reader never sees half a key either.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    fn csr_for(uri: &str) -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.to_string().try_into().unwrap())];
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn signs_only_the_proved_identity() {
        let ca = Ca::generate("cluster.local").unwrap();
        let web = SpiffeId::new("cluster.local", "shop", "web");
        let chain = ca
            .sign_csr(&csr_for(&web.to_string()), &web, DEFAULT_LIFETIME)
            .unwrap();
        let leaf = rustls_pki_types::CertificateDer::from_pem_slice(chain.as_bytes()).unwrap();
        assert_eq!(SpiffeId::from_certificate(&leaf).unwrap(), web);

        let other = csr_for("spiffe://cluster.local/ns/pay/sa/admin");
        let err = ca.sign_csr(&other, &web, DEFAULT_LIFETIME).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the CSR asks for spiffe://cluster.local/ns/pay/sa/admin, but the credential proves spiffe://cluster.local/ns/shop/sa/web"
        );
        assert!(matches!(
            ca.sign_csr(b"garbage", &web, DEFAULT_LIFETIME),
            Err(CaError::BadCsr(_))
        ));
    }

    #[test]
    fn an_operators_intermediate_signs_chains_that_reach_the_root() {
        // The operator's root, kept offline, and an intermediate it signed for the mesh.
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut root_params = CertificateParams::default();
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root = root_params.self_signed(&root_key).unwrap();
        let inter_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut inter_params = CertificateParams::default();
        inter_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        inter_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let inter = inter_params
            .signed_by(&inter_key, &Issuer::new(root_params, &root_key))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("outrigger-ica-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.crt"), inter.pem()).unwrap();
        std::fs::write(dir.join("ca.key"), inter_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("bundle.crt"), root.pem()).unwrap();

        let ca = Ca::load(&dir, "cluster.local").unwrap();
        assert_eq!(ca.bundle_pem(), root.pem(), "workloads trust the root only");
        let id = SpiffeId::new("cluster.local", "shop", "web");
        let (chain, _) = ca.issue(&id, DEFAULT_LIFETIME).unwrap();
        let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(chain.len(), 2, "leaf and intermediate");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.der().clone()).unwrap();
        let leaf = rustls::server::ParsedCertificate::try_from(&chain[0]).unwrap();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &roots,
            &chain[1..],
            rustls_pki_types::UnixTime::now(),
            outrigger_core::tls::provider()
                .signature_verification_algorithms
                .all,
        )
        .expect("the chain reaches the operator's root");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn saves_and_loads() {
        let dir = std::env::temp_dir().join(format!("outrigger-ca-{}", std::process::id()));
        let ca = Ca::generate("cluster.local").unwrap();
        ca.save(&dir).unwrap();
        let loaded = Ca::load(&dir, "cluster.local").unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let mode = std::fs::metadata(dir.join("ca.key")).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let id = SpiffeId::new("cluster.local", "a", "b");
        assert!(loaded.issue(&id, DEFAULT_LIFETIME).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }
}
