//! The live config: the `ArcSwap` that the data path reads, and how it gets replaced.
//!
//! Two sources feed it: the config file (re-read on change and on SIGHUP) and, when the file
//! has an `xds` section, routes and clusters from the control plane (the overlay). Every
//! rebuild merges the current file with the current overlay and validates the whole result;
//! only a complete, valid config replaces the snapshot. Otherwise the old snapshot keeps
//! serving and the error is kept for `/config`, logged, and counted.

// The one lock here serialises rebuilds on the reload paths (file, SIGHUP, xDS); a request
// only loads the ArcSwap.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::config::file::{ClusterFile, ConfigFile, VirtualHostFile, XdsFile};
use crate::config::snapshot::{self, RuntimeConfig};
use crate::telemetry::metrics::Metrics;
use outrigger_core::config_error::ConfigError;
use outrigger_core::inbound::Inbound;

pub const DEFAULT_POLL: Duration = Duration::from_millis(200);

/// Configs accepted since the process started, counting the first.
static ACCEPTED: AtomicU64 = AtomicU64::new(0);

/// How many configs this process has accepted. Building one allocates far more than the
/// result keeps (the file's parsed form, the old snapshot), so a change here tells the
/// memory releaser that free pages are likely to be found.
pub fn accepted_configs() -> u64 {
    ACCEPTED.load(Ordering::Relaxed)
}

pub struct Rejection {
    pub error: ConfigError,
    pub at_unix: u64,
}

/// Routes and clusters received from the control plane.
#[derive(Debug, Clone, Default)]
pub struct XdsOverlay {
    /// RouteConfiguration name → its virtual hosts.
    pub route_tables: HashMap<String, Vec<VirtualHostFile>>,
    pub clusters: Vec<ClusterFile>,
    /// Listener name → the inbound policy it says (`lds`).
    pub inbound: HashMap<String, Inbound>,
}

struct Inputs {
    /// The file text last looked at, accepted or not; the poller compares against it.
    seen: Fingerprint,
    /// What the file system said of the file just before that text was read.
    stamp: Option<Stamp>,
    overlay: Option<XdsOverlay>,
}

/// What is kept of a file's text to tell whether it changed: its length and a hash. The
/// text itself is not kept, as a file of 10,000 virtual hosts is 1.2 MB; whoever could
/// forge a collision can write the file, and so already sets the config.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: usize,
    hash: u64,
}

impl Fingerprint {
    fn of(text: &str) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        text.hash(&mut hasher);
        Fingerprint {
            len: text.len(),
            hash: hasher.finish(),
        }
    }
}

/// What the file system says of a file, to poll it without reading it: a file of 10,000
/// virtual hosts is 1.2 MB, and reading and hashing it five times a second cost an idle
/// proxy 0.5 % of a core.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: SystemTime,
    inode: u64,
    device: u64,
}

/// A file changed this recently may change again within its timestamp's granularity without
/// its stamp changing, so it is read at every poll until its stamp is older than this.
const RACY: Duration = Duration::from_secs(2);

impl Stamp {
    fn of(path: &std::path::Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(Stamp {
            len: meta.len(),
            modified: meta.modified().ok()?,
            inode: meta.ino(),
            device: meta.dev(),
        })
    }

    /// The file is as it was when `self` was taken, as far as its stamp can tell.
    fn still(self, now: Option<Stamp>) -> bool {
        let settled = SystemTime::now()
            .duration_since(self.modified)
            .is_ok_and(|age| age >= RACY);
        now == Some(self) && settled
    }
}

pub struct ConfigStore {
    pub path: PathBuf,
    pub current: Arc<ArcSwap<RuntimeConfig>>,
    pub last_rejection: ArcSwapOption<Rejection>,
    pub loaded_at_unix: AtomicU64,
    /// The file's `xds` section as it was at start; the client is started once.
    pub xds: Option<XdsFile>,
    /// The route tables the listeners name (`rds`), as at start.
    rds_names: Vec<String>,
    /// The Listeners they take their policy from (`lds`), as at start.
    lds_names: Vec<String>,
    /// False while an `xds` section is set and no complete xDS config has been applied.
    xds_synced: AtomicBool,
    /// Holding the lock for a whole rebuild serialises rebuilds, so a slow one can never
    /// store older inputs over newer ones. Only the reload paths take it, never a request.
    inputs: Mutex<Inputs>,
    pub metrics: Arc<Metrics>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The file with the overlay's virtual hosts added to every listener that names a route
/// table, the control plane's inbound policy on every listener that names one, and the overlay's clusters added to the file's (the file wins on a name clash).
fn merge(mut file: ConfigFile, overlay: Option<&XdsOverlay>) -> ConfigFile {
    let Some(overlay) = overlay else { return file };
    for listener in &mut file.listeners {
        if let Some(table) = listener
            .rds
            .as_ref()
            .and_then(|name| overlay.route_tables.get(name))
        {
            listener.virtual_hosts.extend(table.iter().cloned());
        }
        listener.from_control_plane = listener
            .lds
            .as_ref()
            .and_then(|name| overlay.inbound.get(name))
            .cloned();
    }
    for cluster in &overlay.clusters {
        if !file
            .clusters
            .iter()
            .any(|c| c.name.value == cluster.name.value)
        {
            file.clusters.push(cluster.clone());
        }
    }
    file
}

impl ConfigStore {
    pub fn load(path: PathBuf, metrics: Arc<Metrics>) -> Result<Self, ConfigError> {
        let source = path.display().to_string();
        let stamp = Stamp::of(&path);
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::io(&source, &e))?;
        let file = snapshot::parse(&source, &text)?;
        let xds = file.xds.clone();
        let rds_names = file
            .listeners
            .iter()
            .filter_map(|l| l.rds.clone())
            .collect();
        let lds_names = file
            .listeners
            .iter()
            .filter_map(|l| l.lds.clone())
            .collect();
        let config = RuntimeConfig::from_model(&source, file, 1, None)?;
        config.resolve_series(&metrics);
        metrics.config_reload(true, 1);
        ACCEPTED.fetch_add(1, Ordering::Relaxed);
        Ok(ConfigStore {
            path,
            current: Arc::new(ArcSwap::from_pointee(config)),
            last_rejection: ArcSwapOption::empty(),
            loaded_at_unix: unix_now().into(),
            xds_synced: AtomicBool::new(xds.is_none()),
            xds,
            rds_names,
            lds_names,
            inputs: Mutex::new(Inputs {
                seen: Fingerprint::of(&text),
                stamp,
                overlay: None,
            }),
            metrics,
        })
    }

    pub fn rds_names(&self) -> Vec<String> {
        self.rds_names.clone()
    }

    pub fn lds_names(&self) -> Vec<String> {
        self.lds_names.clone()
    }

    /// True once the config is complete: always without xDS, after the first full xDS
    /// config with it.
    pub fn is_synced(&self) -> bool {
        self.xds_synced.load(Ordering::Relaxed)
    }

    /// Reads the file again and swaps it in (with the current overlay) if it is valid.
    /// Returns the version serving.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        let source = self.path.display().to_string();
        let mut inputs = self.inputs.lock().unwrap_or_else(|p| p.into_inner());
        let text = self.look_at_file(&source, &mut inputs)?;
        let overlay = inputs.overlay.clone();
        self.rebuild(&source, &text, overlay.as_ref())
    }

    /// Applies routes and clusters from the control plane, merged with the file as it is
    /// now. On error (the file unreadable or invalid, or the merge invalid) nothing changes,
    /// and the caller NACKs with the message.
    pub fn apply_xds(&self, overlay: XdsOverlay) -> Result<u64, ConfigError> {
        let source = self.path.display().to_string();
        let mut inputs = self.inputs.lock().unwrap_or_else(|p| p.into_inner());
        let text = self.look_at_file(&source, &mut inputs)?;
        let version = self.rebuild(&source, &text, Some(&overlay))?;
        inputs.overlay = Some(overlay);
        self.xds_synced.store(true, Ordering::Relaxed);
        Ok(version)
    }

    /// The file's text as it is now, which the poller then compares against; a file that
    /// cannot be read is a rejected config. Callers hold the `inputs` lock.
    fn look_at_file(&self, source: &str, inputs: &mut Inputs) -> Result<String, ConfigError> {
        // Stamped before it is read: a change in between is then seen at the next poll.
        let stamp = Stamp::of(&self.path);
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                inputs.seen = Fingerprint::of(&text);
                inputs.stamp = stamp;
                Ok(text)
            }
            Err(e) => Err(self.reject(ConfigError::io(source, &e))),
        }
    }

    /// Callers hold the `inputs` lock.
    fn rebuild(
        &self,
        source: &str,
        text: &str,
        overlay: Option<&XdsOverlay>,
    ) -> Result<u64, ConfigError> {
        let old = self.current.load();
        let built = snapshot::parse(source, text)
            .and_then(|file| {
                RuntimeConfig::from_model(source, merge(file, overlay), old.version + 1, Some(&old))
            })
            .and_then(|new| same_listeners(source, &old, &new).map(|()| new));
        match built {
            Ok(new) => {
                let version = new.version;
                new.resolve_series(&self.metrics);
                self.current.store(Arc::new(new));
                self.last_rejection.store(None);
                self.loaded_at_unix.store(unix_now(), Ordering::Relaxed);
                self.metrics.config_reload(true, version);
                ACCEPTED.fetch_add(1, Ordering::Relaxed);
                tracing::info!(version, file = %source, xds = overlay.is_some(), "config accepted");
                Ok(version)
            }
            Err(error) => Err(self.reject(error)),
        }
    }

    /// Records a refused config and hands its error back.
    fn reject(&self, error: ConfigError) -> ConfigError {
        tracing::error!(%error, "config rejected; the previous config keeps serving");
        self.metrics.config_reload(false, 0);
        self.last_rejection.store(Some(Arc::new(Rejection {
            error: error.clone(),
            at_unix: unix_now(),
        })));
        error
    }

    /// The file's content differs from what was last looked at. Its text is read only when
    /// its stamp moved or is too recent to trust; a file touched but not changed is not a
    /// change.
    fn changed_on_disk(&self) -> bool {
        let stamp = Stamp::of(&self.path);
        let last = self.inputs.lock().unwrap_or_else(|p| p.into_inner()).stamp;
        if last.is_some_and(|last| last.still(stamp)) {
            return false;
        }
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                let mut inputs = self.inputs.lock().unwrap_or_else(|p| p.into_inner());
                let changed = inputs.seen != Fingerprint::of(&text);
                if !changed {
                    inputs.stamp = stamp;
                }
                changed
            }
            Err(_) => false,
        }
    }

    /// Reloads on SIGHUP, and whenever the file's content changes if `poll` is set, until
    /// the process ends.
    pub async fn watch(self: Arc<Self>, poll: Option<Duration>) {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let hup_recv = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hup_recv => {
                    tracing::info!("SIGHUP: reloading config");
                    let _ = self.reload();
                }
                _ = sleep_or_forever(poll) => {
                    if self.changed_on_disk() {
                        let _ = self.reload();
                    }
                }
            }
        }
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Sockets are bound once at start; a file that moves them cannot be honoured by a reload.
fn same_listeners(
    source: &str,
    old: &RuntimeConfig,
    new: &RuntimeConfig,
) -> Result<(), ConfigError> {
    let key = |c: &RuntimeConfig| {
        c.listeners
            .iter()
            .map(|l| (l.name.clone(), l.address_text.clone()))
            .collect::<Vec<_>>()
    };
    if key(old) != key(new) {
        return Err(ConfigError::at(
            source,
            None,
            "listeners",
            "listener names and addresses cannot change while running; restart the proxy to apply",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "listeners:\n  - name: out\n    address: 127.0.0.1:0\n    direction: outbound\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes:\n          - backends: [{cluster: web}]\nclusters:\n  - name: web\n    endpoints: [{address: \"127.0.0.1:1\"}]\n";

    fn store_on(name: &str, text: &str) -> (ConfigStore, PathBuf) {
        let path = std::env::temp_dir().join(format!("store-{name}-{}.yaml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let store = ConfigStore::load(path.clone(), Arc::new(Metrics::new())).unwrap();
        (store, path)
    }

    #[test]
    fn a_change_on_disk_is_seen_without_the_text_being_kept() {
        let (store, path) = store_on("seen", CONFIG);
        assert!(!store.changed_on_disk());
        // Same length, other content: the hash, not the length, tells.
        std::fs::write(&path, CONFIG.replace("web", "api")).unwrap();
        assert!(store.changed_on_disk());
        assert_eq!(store.reload().unwrap(), 2);
        assert!(!store.changed_on_disk());
        std::fs::remove_file(&path).unwrap();
    }

    /// Sets the file's modification time `ago` in the past.
    fn age(path: &std::path::Path, ago: Duration) {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - ago).unwrap();
    }

    #[test]
    fn a_settled_file_is_not_read_until_its_stamp_moves() {
        let (store, path) = store_on("stamp", CONFIG);
        age(&path, Duration::from_secs(60));
        // Touched without a change: read once, and no reload.
        assert!(!store.changed_on_disk());
        let settled = std::fs::metadata(&path).unwrap().modified().unwrap();

        // Rewritten in place with the same length and its old time put back: its stamp is
        // all the poller looks at, so this one change goes unseen...
        std::fs::write(&path, CONFIG.replace("web", "api")).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(settled)
            .unwrap();
        assert!(!store.changed_on_disk());
        // ... until the stamp moves, as any later write moves it.
        age(&path, Duration::from_secs(30));
        assert!(store.changed_on_disk());
        assert_eq!(store.reload().unwrap(), 2);
        assert!(!store.changed_on_disk());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn control_plane_config_merges_with_the_file_as_it_is_now() {
        let (store, path) = store_on("merge", CONFIG);
        let before = accepted_configs();
        assert_eq!(store.apply_xds(XdsOverlay::default()).unwrap(), 2);
        assert!(accepted_configs() > before);

        // A file that cannot be read refuses the update, names the file, and keeps the
        // config serving.
        std::fs::remove_file(&path).unwrap();
        let error = store.apply_xds(XdsOverlay::default()).unwrap_err();
        assert!(
            error.to_string().contains(&*path.display().to_string()),
            "{error}"
        );
        assert_eq!(store.current.load().version, 2);
        assert!(store.last_rejection.load().is_some());

        // A file that no longer parses refuses it too.
        std::fs::write(&path, "listeners: [").unwrap();
        assert!(store.apply_xds(XdsOverlay::default()).is_err());
        assert_eq!(store.current.load().version, 2);
        std::fs::remove_file(&path).unwrap();
    }
}
