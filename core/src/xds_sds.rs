//! The two SDS secrets every mesh TLS context names (`xds_tls`), as the control plane serves
//! them to an Envoy:
//!
//! - `ROOTCA`: the trust bundle, inline (it is public), so a CA rotation reaches every Envoy.
//! - `default`: the workload's certificate and key, as files on the workload's own disk. The
//!   key is made and kept there (by `outrigger-proxy certs`, which also renews both); the
//!   control plane never holds it. Envoy watches the directory and takes a renewal at once.

use envoy_types::pb::envoy::config::core::v3::{DataSource, WatchedDirectory, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};

use crate::xds_tls::{BUNDLE_SECRET, WORKLOAD_SECRET};

/// Where a workload keeps its certificate, its key and the bundle it was issued with.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const BUNDLE_FILE: &str = "bundle.pem";
/// The node metadata field that names the directory; the default is where the injector
/// mounts it.
pub const CERT_DIR_METADATA: &str = "OUTRIGGER_CERT_DIR";
pub const DEFAULT_CERT_DIR: &str = "/var/run/outrigger/certs";

pub fn bundle_secret(bundle_pem: &str) -> Secret {
    Secret {
        name: BUNDLE_SECRET.into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineString(bundle_pem.into())),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )),
    }
}

pub fn workload_secret(dir: &str) -> Secret {
    let file = |name: &str| DataSource {
        specifier: Some(data_source::Specifier::Filename(format!("{dir}/{name}"))),
        ..Default::default()
    };
    Secret {
        name: WORKLOAD_SECRET.into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(file(CERT_FILE)),
            private_key: Some(file(KEY_FILE)),
            watched_directory: Some(WatchedDirectory {
                path: dir.into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

/// A directory a node may name: absolute, without `..`, and of a bounded length.
pub fn valid_cert_dir(dir: &str) -> bool {
    dir.starts_with('/')
        && dir.len() <= 512
        && !dir.split('/').any(|s| s == "..")
        && !dir.chars().any(char::is_control)
}
