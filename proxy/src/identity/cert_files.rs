//! `outrigger-proxy certs`: a workload's certificate, key and trust bundle kept fresh as files,
//! for what reads them there rather than asking our CA itself: an Envoy (the control plane's
//! SDS secret `default` names these files) and a proxyless gRPC app (gRFC A29's file-watcher
//! certificate provider).
//!
//! The key is made here and never leaves the workload. Each renewal is written whole into a
//! new directory beside the last, then made current by renaming one symlink (`..data`), the
//! way Kubernetes updates a mounted Secret: a reader sees the old three files or the new
//! three, never a new certificate with the old key. `cert.pem`, `key.pem` and `bundle.pem`
//! are symlinks through `..data`, so their paths never change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outrigger_core::backoff::Backoff;
use outrigger_core::xds_sds::{BUNDLE_FILE, CERT_FILE, KEY_FILE};

use crate::identity::client::{CaClient, Issued};
use crate::identity::store::IdentityStore;

const RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
const CURRENT: &str = "..data";

/// Writes `issued` into `dir` as the current files.
pub fn write(dir: &Path, issued: &Issued) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, symlink};
    std::fs::create_dir_all(dir)?;
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let version = format!("..{stamp}");
    let fresh = dir.join(&version);
    std::fs::create_dir(&fresh)?;
    for (name, text, mode) in [
        (CERT_FILE, &issued.chain_pem, 0o644),
        (KEY_FILE, &issued.key_pem, 0o600),
        (BUNDLE_FILE, &issued.bundle_pem, 0o644),
    ] {
        // The key is private from its first byte.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(fresh.join(name))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
    }
    let staged = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&staged);
    symlink(&version, &staged)?;
    let previous = std::fs::read_link(dir.join(CURRENT)).ok();
    std::fs::rename(&staged, dir.join(CURRENT))?;
    for name in [CERT_FILE, KEY_FILE, BUNDLE_FILE] {
        let link = dir.join(name);
        if std::fs::read_link(&link).is_err() {
            let _ = std::fs::remove_file(&link);
            symlink(Path::new(CURRENT).join(name), &link)?;
        }
    }
    if let Some(old) = previous.filter(|old| *old != Path::new(&version)) {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// A gRPC xDS bootstrap (gRFC A27, A29, A36, A65) for an app whose files `dir` holds: ADS
/// over mTLS to `xds` with those files, the node, the certificate provider instance
/// `default` reading them, and the name its server Listeners are asked by.
pub fn grpc_bootstrap(xds: &str, node: &str, service: &str, dir: &Path) -> String {
    let file = |name: &str| dir.join(name).display().to_string();
    let files = serde_json::json!({
        "certificate_file": file(CERT_FILE),
        "private_key_file": file(KEY_FILE),
        "ca_certificate_file": file(BUNDLE_FILE),
    });
    let mut provider = files.clone();
    provider["refresh_interval"] = "10s".into();
    serde_json::json!({
        "xds_servers": [{
            "server_uri": xds,
            "channel_creds": [{"type": "tls", "config": files}],
            "server_features": ["xds_v3"],
        }],
        "node": {"id": node, "cluster": service, "locality": {}},
        "certificate_providers": {
            outrigger_core::xds_grpc::PROVIDER_INSTANCE: {
                "plugin_name": "file_watcher",
                "config": provider,
            },
        },
        "server_listener_resource_name_template":
            format!("{}%s", outrigger_core::xds_grpc::SERVER_LISTENER_PREFIX),
    })
    .to_string()
}

/// Keeps `dir` fresh for as long as the process runs: renews at about half the certificate's
/// life, and on failure keeps the current files (still valid) and tries again with backoff.
/// With `once`, returns after the first certificate is written.
pub async fn run(client: Arc<CaClient>, dir: PathBuf, once: bool) -> Result<(), String> {
    let mut failures = 0u32;
    loop {
        let outcome = match client.issue().await {
            Ok(issued) => write(&dir, &issued)
                .map_err(|e| format!("cannot write {}: {e}", dir.display()))
                .map(|()| issued),
            Err(e) => Err(e.to_string()),
        };
        let wait = match outcome {
            Ok(issued) => {
                failures = 0;
                let store = IdentityStore::default();
                let left = store
                    .set_certificate(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())
                    .ok()
                    .and_then(|_| store.workload())
                    .and_then(|w| w.not_after.duration_since(SystemTime::now()).ok())
                    .unwrap_or_default();
                tracing::info!(identity = %client.id, dir = %dir.display(), ?left, "certificate written");
                if once {
                    return Ok(());
                }
                left.mul_f64(0.5 * (0.9 + 0.2 * fastrand::f64()))
            }
            Err(e) if once => return Err(e),
            Err(e) => {
                failures += 1;
                tracing::warn!(identity = %client.id, error = %e, failures, "renewal failed; the current files stay");
                RETRY.equal_jitter(failures)
            }
        };
        tokio::time::sleep(wait.max(Duration::from_millis(50))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_replaces_all_three_files_at_once_and_leaves_one_version() {
        let dir = std::env::temp_dir().join(format!("cert-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let issued = |n: &str| Issued {
            chain_pem: format!("chain {n}"),
            key_pem: format!("key {n}"),
            bundle_pem: format!("bundle {n}"),
        };
        write(&dir, &issued("1")).unwrap();
        write(&dir, &issued("2")).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(
            (read(CERT_FILE), read(KEY_FILE), read(BUNDLE_FILE)),
            ("chain 2".into(), "key 2".into(), "bundle 2".into())
        );
        let versions = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.starts_with("..") && name != CURRENT
            })
            .count();
        assert_eq!(versions, 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
