//! The whole proxy process, assembled in one place: config → listeners → per-connection
//! stages, the admin port, the xDS client and the identity's renewal.
//!
//! ```text
//! config::store (ArcSwap<RuntimeConfig>, file watch + SIGHUP, xDS overlay)
//!   └─ listener::accept::accept_loop  (one per configured listener)
//!        └─ detect → TLS → stack::handle (the HTTP request stack) | listener::tcp::proxy
//! admin::serve (/live /ready /metrics /config)
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// How often the identity files are checked for a rotated certificate or bundle.
const IDENTITY_POLL: Duration = Duration::from_millis(500);

/// Rereads changed identity files, and starts one CA renewal task per identity store, which
/// ends once a config with another identity replaces it.
async fn keep_identity_fresh(current: Arc<arc_swap::ArcSwap<RuntimeConfig>>) {
    loop {
        if let Some(identity) = &current.load().identity {
            match &identity.source {
                IdentitySource::Files(files) => files.refresh(&identity.store),
                IdentitySource::Ca(client) if !client.started.swap(true, Ordering::AcqRel) => {
                    let (watched, store) = (current.clone(), identity.store.clone());
                    let still_wanted = move || {
                        watched
                            .load()
                            .identity
                            .as_ref()
                            .is_some_and(|i| Arc::ptr_eq(&i.store, &store))
                    };
                    tokio::spawn(client.clone().run(identity.store.clone(), still_wanted));
                }
                IdentitySource::Ca(_) => {}
            }
        }
        tokio::time::sleep(IDENTITY_POLL).await;
    }
}

use crate::admin::{self, AdminState};
use crate::config::file::Direction;
use crate::config::snapshot::{IdentitySource, RuntimeConfig};
use crate::config::store::ConfigStore;
use crate::listener::accept::{self, Shutdown};
use crate::stack::exchange::HttpContext;
use crate::telemetry::metrics::Metrics;
use outrigger_core::config_error::ConfigError;
use outrigger_core::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot bind listener `{name}` on {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running proxy. Tests and the demo drive it through this; the binary waits on signals.
pub struct ProxyHandle {
    pub admin_addr: Option<SocketAddr>,
    listener_addrs: Vec<(String, SocketAddr)>,
    store: Arc<ConfigStore>,
    admin: Arc<AdminState>,
    inbound_shutdown: watch::Sender<bool>,
    outbound_shutdown: watch::Sender<bool>,
    outbound_open: Arc<AtomicUsize>,
    drained: mpsc::Receiver<()>,
}

/// How long the app must have had no outbound connection before the outbound side closes:
/// an app that is shutting down may still call out, and its closed connections are the
/// sign that it has exited.
const OUTBOUND_QUIET: Duration = Duration::from_secs(1);

impl ProxyHandle {
    /// The bound address of a listener (useful when the config asked for port 0).
    pub fn listener_addr(&self, name: &str) -> SocketAddr {
        self.listener_addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .expect("no such listener")
    }

    pub fn config(&self) -> Arc<RuntimeConfig> {
        self.store.current.load_full()
    }

    /// Re-reads the config file now, as SIGHUP does.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        self.store.reload()
    }

    /// What `/ready` says: listeners up and, with a control plane, a complete config.
    pub fn is_ready(&self) -> bool {
        self.admin.ready.load(Ordering::Relaxed) && self.store.is_synced()
    }

    /// Drains inbound first: `/ready` goes false, inbound listeners stop accepting and their
    /// requests in flight finish. Outbound stays open while the app still uses it, until it
    /// has had no outbound connection for a moment (it has exited, or is done calling out);
    /// then outbound drains the same way. Returns whether everything finished by `deadline`.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        self.admin.ready.store(false, Ordering::Relaxed);
        let _ = self.inbound_shutdown.send(true);
        tracing::info!(
            ?deadline,
            "draining inbound; outbound stays open while the app uses it"
        );
        let mut quiet_since = None;
        while tokio::time::Instant::now() < until {
            let now = tokio::time::Instant::now();
            if self.outbound_open.load(Ordering::Acquire) > 0 {
                quiet_since = None;
            } else if now.duration_since(*quiet_since.get_or_insert(now)) >= OUTBOUND_QUIET {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!("draining outbound");
        let _ = self.outbound_shutdown.send(true);
        tokio::time::timeout_at(until, self.drained.recv())
            .await
            .is_ok()
    }
}

pub struct Options {
    pub config_path: PathBuf,
    /// How often to look for a changed config file; `None` means only on SIGHUP.
    pub watch_interval: Option<Duration>,
}

impl Options {
    pub fn new(config_path: impl Into<PathBuf>) -> Self {
        Options {
            config_path: config_path.into(),
            watch_interval: Some(crate::config::store::DEFAULT_POLL),
        }
    }
}

pub async fn start(options: Options) -> Result<ProxyHandle, StartError> {
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(ConfigStore::load(options.config_path, metrics.clone())?);
    let config = store.current.load_full();
    tracing::info!(
        version = config.version,
        file = %config.source,
        listeners = config.listeners.len(),
        clusters = config.clusters.len(),
        "config loaded"
    );

    let (inbound_shutdown, inbound_signal) = watch::channel(false);
    let (outbound_shutdown, outbound_signal) = watch::channel(false);
    let (tracker, drained) = mpsc::channel(1);
    let inbound = Shutdown {
        signal: inbound_signal,
        tracker: tracker.clone(),
        open: Default::default(),
    };
    let outbound = Shutdown {
        signal: outbound_signal,
        tracker,
        open: Default::default(),
    };
    let outbound_open = outbound.open.clone();

    let mut listener_addrs = Vec::new();
    for (index, l) in config.listeners.iter().enumerate() {
        let socket = accept::bind(l.address).map_err(|source| StartError::Bind {
            name: l.name.clone(),
            addr: l.address,
            source,
        })?;
        let bound = socket.local_addr().unwrap_or(l.address);
        tracing::info!(listener = %l.name, address = %bound, protocol = ?l.protocol, "listening");
        listener_addrs.push((l.name.clone(), bound));
        let ctx = Arc::new(HttpContext {
            config: store.current.clone(),
            listener: index,
            direction: match l.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            },
            metrics: metrics.clone(),
            connections: metrics.connection_series(&l.name),
        });
        let shutdown = match l.direction {
            Direction::Inbound => inbound.clone(),
            Direction::Outbound => outbound.clone(),
        };
        tokio::spawn(accept::accept_loop(socket, ctx, shutdown));
    }
    // Only connections hold the tracker from here on, so `drained` ends when they do.
    drop((inbound, outbound));

    let admin = Arc::new(AdminState {
        store: store.clone(),
        metrics: metrics.clone(),
        ready: false.into(),
        gate: outrigger_core::bounded_server::Gate::new(
            outrigger_core::bounded_server::Limits::ADMIN,
        ),
    });
    let admin_addr = match config.admin_address {
        Some(addr) => {
            let socket = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    name: "admin".into(),
                    addr,
                    source,
                })?;
            let bound = socket.local_addr().unwrap_or(addr);
            tracing::info!(address = %bound, "admin listening");
            tokio::spawn(admin::serve(socket, admin.clone()));
            Some(bound)
        }
        None => None,
    };
    if let Some(xds) = &store.xds {
        let parse = |field: &'static str, a: &serde_saphyr::Spanned<String>| {
            a.value.parse::<std::net::SocketAddr>().map_err(|_| {
                ConfigError::at(
                    &config.source,
                    Some(a.referenced),
                    field,
                    format!("`{}` is not an IP:port address", a.value),
                )
            })
        };
        let mut addresses = vec![parse("xds.address", &xds.address)?];
        for a in &xds.alternates {
            addresses.push(parse("xds.alternates", a)?);
        }
        let tls = match &xds.identity {
            None => None,
            Some(id) => {
                let expected = SpiffeId::parse(&id.value).map_err(|e| {
                    ConfigError::at(&config.source, Some(id.referenced), "xds.identity", e)
                })?;
                let store = config
                    .identity
                    .as_ref()
                    .map(|i| i.store.clone())
                    .ok_or_else(|| {
                        ConfigError::at(
                            &config.source,
                            Some(id.referenced),
                            "xds.identity",
                            "mTLS to the control plane needs this proxy's `identity`",
                        )
                    })?;
                Some(crate::identity::mtls::client_config(
                    store,
                    vec![expected],
                    crate::identity::mtls::ALPN_H2,
                ))
            }
        };
        let settings = crate::xds::client::XdsSettings {
            tls,
            addresses,
            node: xds
                .node
                .clone()
                .unwrap_or_else(|| format!("outrigger-{}", std::process::id())),
            service: xds.service.clone().unwrap_or_default(),
            route_tables: store.rds_names(),
            listeners: store.lds_names(),
            cache: xds.cache.as_ref().map(std::path::PathBuf::from),
        };
        tracing::info!(addresses = ?settings.addresses, node = %settings.node, "taking routes and clusters from the control plane");
        crate::xds::client::spawn(store.clone(), settings);
    }
    tokio::spawn(store.clone().watch(options.watch_interval));
    // Certificates rotate on their own schedule, not the config file's.
    tokio::spawn(keep_identity_fresh(store.current.clone()));
    admin.ready.store(true, Ordering::Relaxed);

    Ok(ProxyHandle {
        admin_addr,
        listener_addrs,
        store,
        admin,
        inbound_shutdown,
        outbound_shutdown,
        outbound_open,
        drained,
    })
}
