//! `RuntimeConfig`: the validated, compiled snapshot that the data path reads.
//!
//! A snapshot is immutable. The data path loads it once per connection or request from an
//! `ArcSwap` and keeps it to the end, so a swap never tears a request. Building one either
//! succeeds completely or returns the first problem with its file, line and field; a bad file
//! never produces half a config.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::balance::Cluster;
use crate::config::build::Builder;
use crate::config::file::{ConfigFile, Direction, ListenerProtocol, TlsMode};
use crate::identity::client::CaClient;
use crate::identity::store::{IdentityFiles, IdentityStore};
use crate::route::destinations::Destinations;
use crate::telemetry::metrics::{ListenerSeries, Metrics};

pub use crate::cluster::balance::WeightedBackend;
use crate::route::router::DomainTable;
pub use crate::route::table::{HeaderChanges, Route, VirtualHost};
use crate::telemetry::span_export::Tracer;
pub use outrigger_core::authz::Authorization;
use outrigger_core::config_error::ConfigError;
use outrigger_core::token_bucket::RateLimiter;

pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

pub struct RuntimeConfig {
    /// Increases by one with every accepted config.
    pub version: u64,
    pub source: String,
    pub admin_address: Option<SocketAddr>,
    /// Who may watch live requests on the admin port's `/tap`.
    pub tap_from: Vec<outrigger_core::cidr::Cidr>,
    pub workers: usize,
    pub listeners: Vec<Listener>,
    pub clusters: HashMap<String, Arc<Cluster>>,
    pub identity: Option<Identity>,
    pub tracing: Option<Arc<Tracer>>,
    pub access_log: bool,
}

/// The workload identity, and where it is kept fresh from.
pub struct Identity {
    pub source: IdentitySource,
    pub store: Arc<IdentityStore>,
}

pub enum IdentitySource {
    Files(Arc<IdentityFiles>),
    Ca(Arc<CaClient>),
}

pub struct ListenerTls {
    pub mode: TlsMode,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

pub struct Listener {
    pub name: String,
    /// As written, so a reload can tell whether the socket would have to change.
    pub address_text: String,
    pub address: SocketAddr,
    pub direction: Direction,
    pub protocol: ListenerProtocol,
    pub detect_timeout: Duration,
    pub domains: DomainTable,
    pub virtual_hosts: Vec<VirtualHost>,
    pub tcp: Option<TcpRoute>,
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// Downstream HTTP connections with nothing in flight this long are closed.
    pub idle_timeout: Duration,
    pub tls: Option<ListenerTls>,
    /// Each must let a request in: the file's rules, then the control plane's.
    pub authorization: Vec<Authorization>,
    /// `Some` on a listener that takes redirected connections.
    pub destinations: Option<Destinations>,
}

pub struct TcpRoute {
    pub cluster: Arc<Cluster>,
    pub idle_timeout: Duration,
}

impl RuntimeConfig {
    /// Hands each route the series its requests write to, before the config serves one.
    pub fn resolve_series(&self, metrics: &Metrics) {
        for l in &self.listeners {
            let direction = match l.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            };
            for route in l.virtual_hosts.iter().flat_map(|vh| &vh.routes) {
                let _ = route
                    .series
                    .set(metrics.route_series(direction, &route.name));
            }
        }
    }

    /// Makes the series this config implies exist at zero (see `Metrics::declare`).
    pub fn declare_series(&self, metrics: &Metrics) {
        let listeners = self.listeners.iter().map(|l| ListenerSeries {
            name: &l.name,
            direction: match l.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            },
            tls: l.tls.is_some(),
            authorization: !l.authorization.is_empty(),
            routes: l
                .virtual_hosts
                .iter()
                .flat_map(|vh| &vh.routes)
                .map(|r| (&*r.name, r.rate_limit.is_some() || l.rate_limit.is_some()))
                .collect(),
        });
        metrics.declare(
            self.clusters.keys().map(String::as_str),
            listeners,
            self.tracing.is_some(),
        );
    }

    /// Parses and validates `text`, read from `source`. Endpoints (with their connection
    /// pools and load statistics) are carried over from `previous` where they remain, so that
    /// a reload keeps warm connections and latency estimates.
    pub fn build(
        source: &str,
        text: &str,
        version: u64,
        previous: Option<&RuntimeConfig>,
    ) -> Result<RuntimeConfig, ConfigError> {
        Self::from_model(source, parse(source, text)?, version, previous)
    }

    /// Validates an already-parsed model: a file's, or one with routes and clusters from
    /// xDS merged in.
    pub fn from_model(
        source: &str,
        file: ConfigFile,
        version: u64,
        previous: Option<&RuntimeConfig>,
    ) -> Result<RuntimeConfig, ConfigError> {
        Builder {
            source,
            previous,
            identity: None,
        }
        .build(file, version)
    }
}

/// The `workers` of a config file, read before the runtime exists: the rest of the file is
/// skipped, not built (a mesh-sized file would otherwise be built twice at start, and the
/// first build's peak would stay in RSS). 0 (one per core) when the file does not parse;
/// the load proper then says why.
pub fn peek_workers(text: &str) -> usize {
    #[derive(serde::Deserialize)]
    struct WorkersOnly {
        #[serde(default)]
        workers: usize,
    }
    serde_saphyr::from_str::<WorkersOnly>(text).map_or(0, |w| w.workers)
}

pub fn parse(source: &str, text: &str) -> Result<ConfigFile, ConfigError> {
    serde_saphyr::from_str(text).map_err(|e| ConfigError::from_yaml(source, &e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_worker_count_is_read_without_the_rest_of_the_file() {
        let file = "workers: 3\nlisteners: [{name: x, not_a_field: 1}]\n";
        assert_eq!(super::peek_workers(file), 3);
        assert_eq!(super::peek_workers("listeners: []\n"), 0);
        assert_eq!(super::peek_workers("workers: [\n"), 0);
    }
}
