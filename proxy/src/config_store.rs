//! The live config: the `ArcSwap` that the data path reads, and how it gets replaced.
//!
//! A new file is read on change (polled) and on SIGHUP. It replaces the snapshot only if it
//! validates completely; otherwise the old snapshot keeps serving and the error is kept for
//! `/config`, logged, and counted.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::config_error::ConfigError;
use crate::metrics::Metrics;
use crate::runtime_config::RuntimeConfig;

pub const DEFAULT_POLL: Duration = Duration::from_millis(200);

pub struct Rejection {
    pub error: ConfigError,
    pub at_unix: u64,
}

pub struct ConfigStore {
    pub path: PathBuf,
    pub current: Arc<ArcSwap<RuntimeConfig>>,
    pub last_rejection: ArcSwapOption<Rejection>,
    pub loaded_at_unix: std::sync::atomic::AtomicU64,
    /// The text last looked at, accepted or not; the poller compares against it. Holding
    /// the lock for a whole reload also serialises reloads, so a slow one can never store an
    /// older file over a newer one. Only the reload path takes it, never a request.
    last_seen: Mutex<String>,
    metrics: Arc<Metrics>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ConfigStore {
    pub fn load(path: PathBuf, metrics: Arc<Metrics>) -> Result<Self, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::io(&source, &e))?;
        let config = RuntimeConfig::build(&source, &text, 1, None)?;
        metrics.config_reload(true, 1);
        Ok(ConfigStore {
            path,
            current: Arc::new(ArcSwap::from_pointee(config)),
            last_rejection: ArcSwapOption::empty(),
            loaded_at_unix: unix_now().into(),
            last_seen: Mutex::new(text),
            metrics,
        })
    }

    /// Reads the file again and swaps it in if it is valid. Returns the version serving.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        let source = self.path.display().to_string();
        let mut seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        let text = std::fs::read_to_string(&self.path).map_err(|e| ConfigError::io(&source, &e));
        let result = text.and_then(|text| {
            seen.clone_from(&text);
            let old = self.current.load();
            let new = RuntimeConfig::build(&source, &text, old.version + 1, Some(&old))?;
            same_listeners(&source, &old, &new)?;
            Ok(new)
        });
        match result {
            Ok(new) => {
                let version = new.version;
                self.current.store(Arc::new(new));
                self.last_rejection.store(None);
                self.loaded_at_unix
                    .store(unix_now(), std::sync::atomic::Ordering::Relaxed);
                self.metrics.config_reload(true, version);
                tracing::info!(version, file = %source, "config accepted");
                Ok(version)
            }
            Err(error) => {
                tracing::error!(%error, "config rejected; the previous config keeps serving");
                self.metrics.config_reload(false, 0);
                self.last_rejection.store(Some(Arc::new(Rejection {
                    error: error.clone(),
                    at_unix: unix_now(),
                })));
                Err(error)
            }
        }
    }

    fn changed_on_disk(&self) -> bool {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => *self.last_seen.lock().unwrap_or_else(|p| p.into_inner()) != text,
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
