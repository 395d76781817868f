//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! carried as the only URI subject alternative name of an X.509-SVID.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// The control plane's own identity: `spiffe://<td>/ns/outrigger/sa/control-plane`.
    pub fn control_plane(trust_domain: &str) -> SpiffeId {
        SpiffeId::new(trust_domain, "outrigger", "control-plane")
    }

    /// Parses the mesh's form of ID; anything else is an error that says what was expected.
    pub fn parse(text: &str) -> Result<SpiffeId, SpiffeError> {
        let bad = || SpiffeError::NotAnId(text.to_string());
        let rest = text.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa]
                if [td, ns, sa].iter().all(|p| {
                    !p.is_empty()
                        && p.chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
                }) =>
            {
                Ok(SpiffeId::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }

    /// The identity in a certificate: its one `spiffe://` URI SAN.
    pub fn from_certificate(der: &[u8]) -> Result<SpiffeId, SpiffeError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| SpiffeError::NotACertificate(e.to_string()))?;
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| SpiffeError::BadSan(e.to_string()))?
            .ok_or(SpiffeError::NoSan)?;
        let uris: Vec<&str> = sans
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [one] => SpiffeId::parse(one),
            [] => Err(SpiffeError::NoSpiffeSan),
            _ => Err(SpiffeError::SeveralSpiffeSans),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Why a text or a certificate names no SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("`{0}` is not spiffe://<trust-domain>/ns/<namespace>/sa/<account>")]
    NotAnId(String),
    #[error("`{0}` is not spiffe://<trust-domain>/ns/<namespace>/*")]
    NotAPrincipal(String),
    #[error("not an X.509 certificate: {0}")]
    NotACertificate(String),
    #[error("bad subjectAltName: {0}")]
    BadSan(String),
    #[error("the certificate has no subjectAltName")]
    NoSan,
    #[error("the certificate has no spiffe:// URI SAN")]
    NoSpiffeSan,
    #[error("the certificate has more than one spiffe:// URI SAN")]
    SeveralSpiffeSans,
}

/// Who may call: an exact identity, or every identity in a namespace
/// (`spiffe://<td>/ns/<ns>/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Exact(SpiffeId),
    Namespace {
        trust_domain: String,
        namespace: String,
    },
}

impl Principal {
    pub fn parse(text: &str) -> Result<Principal, SpiffeError> {
        if let Some(prefix) = text.strip_suffix("/*") {
            // Reuse the ID grammar with a placeholder account.
            let id = SpiffeId::parse(&format!("{prefix}/sa/x"))
                .map_err(|_| SpiffeError::NotAPrincipal(text.to_string()))?;
            return Ok(Principal::Namespace {
                trust_domain: id.trust_domain,
                namespace: id.namespace,
            });
        }
        SpiffeId::parse(text).map(Principal::Exact)
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Principal::Exact(want) => want == id,
            Principal::Namespace {
                trust_domain,
                namespace,
            } => &id.trust_domain == trust_domain && &id.namespace == namespace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_principals() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        for bad in [
            "https://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/shop/web",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
        let ns = Principal::parse("spiffe://cluster.local/ns/shop/*").unwrap();
        assert!(ns.matches(&id));
        assert!(!ns.matches(&SpiffeId::new("cluster.local", "pay", "web")));
        assert!(!ns.matches(&SpiffeId::new("other.td", "shop", "web")));
        let exact = Principal::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap();
        assert!(!exact.matches(&id));
    }
}
