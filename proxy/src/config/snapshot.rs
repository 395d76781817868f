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

use http::Method;
use http::header::{HeaderName, HeaderValue};
use regex::Regex;
use serde_saphyr::Spanned;

use crate::cluster::balance::{Cluster, ClusterTls, Endpoint};
use crate::config::file::OutlierFile;
use crate::config::file::{
    ConfigFile, Direction, HeaderChangesFile, IdentityFile, ListenerFile, ListenerProtocol,
    RateLimitFile, RetryFile, RouteFile, TlsMode, TracingFile, UpstreamProtocol,
};
use crate::identity::client::Token;
use crate::identity::client::{CaClient, CaTrust};
use crate::identity::mtls;
use crate::identity::store::{IdentityFiles, IdentityStore};
use crate::policy::circuit_breaker::CircuitBreaker;
use crate::route::destinations::Destinations;
use crate::telemetry::metrics::{ListenerSeries, Metrics};

pub use crate::cluster::balance::WeightedBackend;
pub use crate::policy::authz::Authorization;
use crate::policy::outlier::OutlierPolicy;
use crate::policy::retry::RetryPolicy;
use crate::policy::retry_budget::RetryBudget;
use crate::route::router::{DomainTable, HeaderMatch, PathMatch};
pub use crate::route::table::{HeaderChanges, Route, VirtualHost};
use crate::telemetry::span_export::{Collector, Tracer};
use crate::upstream::client::UpstreamClient;
use outrigger_core::config_error::ConfigError;
pub use outrigger_core::duration::parse_duration;
use outrigger_core::policy;
use outrigger_core::spiffe::{Principal, SpiffeId};
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

impl IdentitySource {
    fn same(&self, other: &IdentitySource) -> bool {
        match (self, other) {
            (IdentitySource::Files(a), IdentitySource::Files(b)) => a.same_paths(b),
            (IdentitySource::Ca(a), IdentitySource::Ca(b)) => a.same_settings(b),
            _ => false,
        }
    }
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
    pub authorization: Option<Authorization>,
    /// `Some` on a listener that takes redirected connections.
    pub destinations: Option<Destinations>,
}

pub struct TcpRoute {
    pub cluster: Arc<Cluster>,
    pub idle_timeout: Duration,
}

impl RuntimeConfig {
    /// Makes the series this config implies exist at zero (see `Metrics::declare`).
    pub fn declare_series(&self, metrics: &Metrics) {
        let listeners = self.listeners.iter().map(|l| ListenerSeries {
            name: &l.name,
            direction: match l.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            },
            tls: l.tls.is_some(),
            authorization: l.authorization.is_some(),
            routes: l
                .virtual_hosts
                .iter()
                .flat_map(|vh| &vh.routes)
                .map(|r| {
                    (
                        r.name.as_str(),
                        r.rate_limit.is_some() || l.rate_limit.is_some(),
                    )
                })
                .collect(),
        });
        metrics.declare(
            self.clusters.keys().map(String::as_str),
            listeners,
            self.tracing.is_some(),
        );
    }

    /// Parses and validates `text`, read from `source`. Cluster clients and endpoint load
    /// statistics are carried over from `previous` where a cluster is unchanged, so that a
    /// reload keeps warm connection pools and latency estimates.
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

pub fn parse(source: &str, text: &str) -> Result<ConfigFile, ConfigError> {
    serde_saphyr::from_str(text).map_err(|e| ConfigError::from_yaml(source, &e))
}

#[derive(Clone)]
struct Builder<'a> {
    source: &'a str,
    previous: Option<&'a RuntimeConfig>,
    identity: Option<Arc<IdentityStore>>,
}

impl Builder<'_> {
    fn err<T>(&self, at: &Spanned<T>, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.source, Some(at.referenced), field, message)
    }

    fn duration(
        &self,
        value: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => parse_duration(&v.value).ok_or_else(|| {
                self.err(
                    v,
                    field,
                    format!("`{}` is not a duration (try `250ms`, `2s`, `1m`)", v.value),
                )
            }),
        }
    }

    /// A bucket keeps its tokens across reloads that leave its limits alone; otherwise every
    /// config push would hand out a fresh burst.
    fn rate_limiter(
        &self,
        limit: &Option<RateLimitFile>,
        field: &str,
        listener: &str,
        route: Option<&str>,
    ) -> Result<Option<Arc<RateLimiter>>, ConfigError> {
        let Some(limit) = limit else {
            return Ok(None);
        };
        let policy::RateLimit {
            requests_per_second: rate,
            burst,
        } = policy::check_rate_limit(self.source, limit, field)?;
        let old = self.previous.and_then(|p| {
            let l = p.listeners.iter().find(|l| l.name == listener)?;
            match route {
                None => l.rate_limit.clone(),
                Some(name) => l
                    .virtual_hosts
                    .iter()
                    .flat_map(|vh| &vh.routes)
                    .find(|r| r.name == name)?
                    .rate_limit
                    .clone(),
            }
        });
        Ok(Some(match old {
            Some(old) if old.same_limits(rate, burst) => old,
            _ => Arc::new(RateLimiter::new(rate, burst)),
        }))
    }

    fn address(&self, value: &Spanned<String>, field: &str) -> Result<SocketAddr, ConfigError> {
        value.value.parse().map_err(|_| {
            self.err(
                value,
                field,
                format!("`{}` is not an IP:port socket address", value.value),
            )
        })
    }

    /// The identity first: listeners and clusters with `tls` need it.
    fn build(&self, file: ConfigFile, version: u64) -> Result<RuntimeConfig, ConfigError> {
        let identity = match &file.identity {
            None => None,
            Some(f) => {
                let source = self.identity_source(f)?;
                let kept = self
                    .previous
                    .and_then(|p| p.identity.as_ref())
                    .filter(|old| old.source.same(&source));
                Some(match kept {
                    Some(old) => Identity {
                        source: match &old.source {
                            IdentitySource::Files(f) => IdentitySource::Files(f.clone()),
                            IdentitySource::Ca(c) => IdentitySource::Ca(c.clone()),
                        },
                        store: old.store.clone(),
                    },
                    None => {
                        let store = Arc::new(IdentityStore::default());
                        // Files are read now, so a bad path is a config error. A CA-signed
                        // identity arrives later; until then the proxy is not ready.
                        if let (IdentitySource::Files(files), Some(cert)) = (&source, &f.cert) {
                            files
                                .load_into(&store)
                                .map_err(|e| self.err(cert, "identity", e))?;
                        }
                        Identity { source, store }
                    }
                })
            }
        };
        let with_identity = Builder {
            identity: identity.as_ref().map(|i| i.store.clone()),
            ..self.clone()
        };
        let tracing = match &file.tracing {
            None => None,
            Some(t) => Some(self.tracer(t)?),
        };
        let mut config = with_identity.build_config(file, version)?;
        config.identity = identity;
        config.tracing = tracing;
        Ok(config)
    }

    fn build_config(&self, file: ConfigFile, version: u64) -> Result<RuntimeConfig, ConfigError> {
        let admin_address = match &file.admin {
            Some(admin) => Some(self.address(&admin.address, "admin.address")?),
            None => None,
        };
        let mut clusters = HashMap::new();
        for (i, c) in file.clusters.iter().enumerate() {
            let field = format!("clusters[{i}]");
            if clusters.contains_key(&c.name.value) {
                return Err(self.err(
                    &c.name,
                    &format!("{field}.name"),
                    format!("duplicate cluster `{}`", c.name.value),
                ));
            }
            let connect_timeout = self.duration(
                &c.connect_timeout,
                &format!("{field}.connect_timeout"),
                DEFAULT_CONNECT_TIMEOUT,
            )?;
            let mut addrs = Vec::with_capacity(c.endpoints.len());
            for (j, e) in c.endpoints.iter().enumerate() {
                addrs.push(self.address(&e.address, &format!("{field}.endpoints[{j}].address"))?);
            }
            let tls = match &c.tls {
                None => None,
                Some(t) => {
                    let store = self.identity_for(&format!("{field}.tls"))?;
                    let mut identities = Vec::with_capacity(t.identities.len());
                    for (k, id) in t.identities.iter().enumerate() {
                        identities.push(SpiffeId::parse(&id.value).map_err(|e| {
                            self.err(id, &format!("{field}.tls.identities[{k}]"), e)
                        })?);
                    }
                    if identities.is_empty() {
                        return Err(self.err(
                            &c.name,
                            &format!("{field}.tls.identities"),
                            "name at least one identity the endpoints may have",
                        ));
                    }
                    Some(ClusterTls {
                        config: mtls::client_config(
                            store.clone(),
                            identities.clone(),
                            mtls::ALPN_H2,
                        ),
                        tcp_config: mtls::client_config(store, identities.clone(), mtls::ALPN_TCP),
                        identities,
                    })
                }
            };
            // A connection made with other security settings must not be reused.
            let old = self
                .previous
                .and_then(|p| p.clusters.get(&c.name.value))
                .filter(|o| {
                    o.tls.as_ref().map(|t| &t.identities) == tls.as_ref().map(|t| &t.identities)
                });
            let client = match old {
                Some(old) if old.connect_timeout == connect_timeout => old.client.clone(),
                _ => UpstreamClient::new(connect_timeout),
            };
            let endpoints = addrs
                .into_iter()
                .map(|addr| {
                    old.and_then(|o| o.endpoints.iter().find(|e| e.addr == addr).cloned())
                        .unwrap_or_else(|| Arc::new(Endpoint::new(addr)))
                })
                .collect();
            let mut cluster = Cluster::new(
                c.name.value.clone(),
                // Proxies talk HTTP/2 to each other over mTLS, whatever the app spoke.
                if tls.is_some() {
                    UpstreamProtocol::Http2
                } else {
                    c.protocol
                },
                c.lb,
                connect_timeout,
                endpoints,
                client,
            );
            cluster.tls = tls;
            let budget = policy::check_retry_budget(
                self.source,
                c.retry_budget.as_ref(),
                &format!("{field}.retry_budget"),
            )?;
            let (percent, min) = (budget.percent, u64::from(budget.min_retries));
            cluster.retry_budget = match old {
                // Keep counting requests already in flight against the same budget.
                Some(o) if o.retry_budget.percent == percent && o.retry_budget.min == min => {
                    o.retry_budget.clone()
                }
                _ => Arc::new(RetryBudget::new(percent, min)),
            };
            let limits = c.circuit_breaker.clone().unwrap_or_default();
            let max_requests =
                u64::from(limits.max_requests.unwrap_or(policy::DEFAULT_MAX_REQUESTS));
            let max_retries = limits.max_retries.map(u64::from);
            let max_connections = limits
                .max_connections
                .unwrap_or(policy::DEFAULT_MAX_CONNECTIONS);
            let max_pending = u64::from(limits.max_pending.unwrap_or(policy::DEFAULT_MAX_PENDING));
            cluster.breaker = match old {
                // The same limits keep counting the requests already in flight.
                Some(o)
                    if o.breaker.max_requests == max_requests
                        && o.breaker.max_retries == max_retries
                        && o.breaker.max_connections == max_connections
                        && o.breaker.max_pending == max_pending =>
                {
                    o.breaker.clone()
                }
                _ => Arc::new(
                    CircuitBreaker::new(max_requests, max_retries)
                        .with_connections(max_connections, max_pending),
                ),
            };
            // On unless turned off: a cluster without a word about it still hides a sick
            // endpoint.
            cluster.outlier = match &c.outlier {
                Some(o) if o.enabled == Some(false) => None,
                Some(o) => Some(self.outlier(o, &format!("{field}.outlier"))?),
                None => Some(OutlierPolicy::default()),
            };
            clusters.insert(c.name.value.clone(), Arc::new(cluster));
        }

        let mut listeners: Vec<Listener> = Vec::with_capacity(file.listeners.len());
        for (i, l) in file.listeners.iter().enumerate() {
            let field = format!("listeners[{i}]");
            if listeners.iter().any(|other| other.name == l.name) {
                return Err(self.err(
                    &l.address,
                    &format!("{field}.name"),
                    format!("duplicate listener `{}`", l.name),
                ));
            }
            listeners.push(self.listener(l, &field, &clusters)?);
        }

        Ok(RuntimeConfig {
            version,
            source: self.source.to_string(),
            admin_address,
            workers: file.workers,
            listeners,
            clusters,
            identity: None,
            tracing: None,
            access_log: file.access_log,
        })
    }

    /// A reload with the same tracing settings keeps the exporter (and its queue).
    fn tracer(&self, t: &TracingFile) -> Result<Arc<Tracer>, ConfigError> {
        let ratio = t.sampling.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&ratio) {
            return Err(ConfigError::at(
                self.source,
                None,
                "tracing.sampling",
                "must be between 0 and 1",
            ));
        }
        let collector = match (&t.otlp_grpc, &t.otlp_http) {
            (Some(addr), None) => Collector::Grpc(format!("http://{}", addr.value)),
            (None, Some(url)) => {
                url.value
                    .parse::<http::Uri>()
                    .ok()
                    .filter(|u| u.scheme_str() == Some("http"))
                    .ok_or_else(|| self.err(url, "tracing.otlp_http", "not an http:// URL"))?;
                Collector::Http(url.value.clone())
            }
            _ => {
                return Err(ConfigError::at(
                    self.source,
                    None,
                    "tracing",
                    "set one of `otlp_grpc` and `otlp_http`",
                ));
            }
        };
        let queue = t.queue.unwrap_or(2048);
        let old = self.previous.and_then(|p| p.tracing.clone());
        Ok(match old {
            Some(old) if old.same_settings(&t.service_name, ratio, &collector, queue) => old,
            _ => Arc::new(Tracer::start(
                t.service_name.clone(),
                ratio,
                collector,
                queue,
            )),
        })
    }

    fn identity_source(&self, f: &IdentityFile) -> Result<IdentitySource, ConfigError> {
        match (&f.cert, &f.key, &f.bundle, &f.ca) {
            (Some(cert), Some(key), Some(bundle), None) => {
                Ok(IdentitySource::Files(Arc::new(IdentityFiles::new(
                    cert.value.clone().into(),
                    key.value.clone().into(),
                    bundle.value.clone().into(),
                ))))
            }
            (None, None, None, Some(ca)) => {
                let address = self.address(&ca.address, "identity.ca.address")?;
                let id = SpiffeId::parse(&ca.id.value)
                    .map_err(|e| self.err(&ca.id, "identity.ca.id", e))?;
                let trust = match (&ca.trust_anchor, ca.plaintext) {
                    (Some(file), false) => CaTrust::Anchor {
                        file: file.value.clone().into(),
                        server_id: match &ca.server_id {
                            Some(s) => SpiffeId::parse(&s.value)
                                .map_err(|e| self.err(s, "identity.ca.server_id", e))?,
                            None => SpiffeId::control_plane(&id.trust_domain),
                        },
                    },
                    (None, true) => CaTrust::Plaintext,
                    _ => {
                        return Err(self.err(
                            &ca.address,
                            "identity.ca",
                            "set `trust_anchor` (the CA's root, mounted out of band), or, for local development only, `plaintext: true`",
                        ));
                    }
                };
                Ok(IdentitySource::Ca(Arc::new(CaClient {
                    address,
                    trust,
                    token: match (&ca.token, &ca.token_file) {
                        (Some(t), None) => Token::Inline(t.clone()),
                        (None, Some(f)) => Token::File(f.into()),
                        _ => {
                            return Err(self.err(
                                &ca.address,
                                "identity.ca",
                                "set exactly one of `token` and `token_file`",
                            ));
                        }
                    },
                    id,
                    lifetime: self.duration(
                        &ca.lifetime,
                        "identity.ca.lifetime",
                        Duration::from_secs(24 * 3600),
                    )?,
                    started: Default::default(),
                })))
            }
            _ => Err(ConfigError::at(
                self.source,
                None,
                "identity",
                "set either `cert`, `key` and `bundle`, or `ca`",
            )),
        }
    }

    fn identity_for(&self, field: &str) -> Result<Arc<IdentityStore>, ConfigError> {
        self.identity.clone().ok_or_else(|| {
            ConfigError::at(
                self.source,
                None,
                field,
                "mTLS needs this proxy's `identity` (cert, key and bundle)",
            )
        })
    }

    fn listener_tls(
        &self,
        l: &ListenerFile,
        field: &str,
    ) -> Result<(Option<ListenerTls>, Option<Authorization>), ConfigError> {
        let tls = match &l.tls {
            None => None,
            Some(t) => Some(ListenerTls {
                mode: t.mode,
                acceptor: tokio_rustls::TlsAcceptor::from(mtls::server_config(
                    self.identity_for(&format!("{field}.tls"))?,
                )),
            }),
        };
        let authorization = match &l.authorization {
            None => None,
            Some(a) => {
                let default_allow = match a.default.as_ref().map(|d| d.value.as_str()) {
                    None | Some("deny") => false,
                    Some("allow") => true,
                    Some(other) => {
                        return Err(self.err(
                            a.default.as_ref().expect("matched Some"),
                            &format!("{field}.authorization.default"),
                            format!("`{other}` is neither `allow` nor `deny`"),
                        ));
                    }
                };
                let mut allow = Vec::with_capacity(a.allow.len());
                for (i, p) in a.allow.iter().enumerate() {
                    allow.push(Principal::parse(&p.value).map_err(|e| {
                        self.err(p, &format!("{field}.authorization.allow[{i}]"), e)
                    })?);
                }
                Some(Authorization {
                    default_allow,
                    allow,
                })
            }
        };
        Ok((tls, authorization))
    }

    fn cluster_ref(
        &self,
        name: &Spanned<String>,
        field: &str,
        clusters: &HashMap<String, Arc<Cluster>>,
    ) -> Result<Arc<Cluster>, ConfigError> {
        clusters
            .get(&name.value)
            .cloned()
            .ok_or_else(|| self.err(name, field, format!("no cluster named `{}`", name.value)))
    }

    fn listener(
        &self,
        l: &ListenerFile,
        field: &str,
        clusters: &HashMap<String, Arc<Cluster>>,
    ) -> Result<Listener, ConfigError> {
        let address = self.address(&l.address, &format!("{field}.address"))?;
        let detect_timeout = self.duration(
            &l.detect_timeout,
            &format!("{field}.detect_timeout"),
            DEFAULT_DETECT_TIMEOUT,
        )?;
        let tcp = match &l.tcp {
            Some(t) => Some(TcpRoute {
                cluster: self.cluster_ref(&t.cluster, &format!("{field}.tcp.cluster"), clusters)?,
                idle_timeout: self.duration(
                    &t.idle_timeout,
                    &format!("{field}.tcp.idle_timeout"),
                    DEFAULT_TCP_IDLE_TIMEOUT,
                )?,
            }),
            None => None,
        };
        if l.protocol == ListenerProtocol::Opaque && tcp.is_none() {
            return Err(self.err(
                &l.address,
                &format!("{field}.tcp"),
                "an opaque listener needs a `tcp` cluster",
            ));
        }
        let mut virtual_hosts = Vec::with_capacity(l.virtual_hosts.len());
        for (v, vh) in l.virtual_hosts.iter().enumerate() {
            let vfield = format!("{field}.virtual_hosts[{v}]");
            let mut routes = Vec::with_capacity(vh.routes.len());
            for (r, route) in vh.routes.iter().enumerate() {
                routes.push(self.route(
                    route,
                    &format!("{vfield}.routes[{r}]"),
                    (&l.name, &vh.name),
                    r,
                    clusters,
                )?);
            }
            virtual_hosts.push(VirtualHost {
                name: vh.name.clone(),
                domains: vh.domains.clone(),
                routes,
            });
        }
        let domains = DomainTable::new(&virtual_hosts)
            .map_err(|msg| self.err(&l.address, &format!("{field}.virtual_hosts"), msg))?;
        let (tls, authorization) = self.listener_tls(l, field)?;
        let destinations = l
            .original_destination
            .then(|| Destinations::new(&virtual_hosts, clusters));
        Ok(Listener {
            destinations,
            name: l.name.clone(),
            address_text: l.address.value.clone(),
            address,
            direction: l.direction,
            protocol: l.protocol,
            detect_timeout,
            domains,
            virtual_hosts,
            tcp,
            tls,
            authorization,
            idle_timeout: self.duration(
                &l.idle_timeout,
                &format!("{field}.idle_timeout"),
                DEFAULT_HTTP_IDLE_TIMEOUT,
            )?,
            rate_limit: self.rate_limiter(
                &l.rate_limit,
                &format!("{field}.rate_limit"),
                &l.name,
                None,
            )?,
        })
    }

    fn route(
        &self,
        r: &RouteFile,
        field: &str,
        (listener, vhost): (&str, &str),
        index: usize,
        clusters: &HashMap<String, Arc<Cluster>>,
    ) -> Result<Route, ConfigError> {
        let name = r.name.clone().unwrap_or_else(|| format!("{vhost}/{index}"));
        let m = &r.matches;
        let path = match (&m.exact, &m.prefix, &m.regex) {
            (Some(p), None, None) => PathMatch::Exact(p.clone()),
            (None, Some(p), None) => PathMatch::Prefix(p.clone()),
            (None, None, Some(re)) => {
                PathMatch::Regex(self.regex(re, &format!("{field}.match.regex"))?)
            }
            (None, None, None) => PathMatch::Prefix("/".into()),
            _ => {
                return Err(ConfigError::at(
                    self.source,
                    None,
                    &format!("{field}.match"),
                    "set at most one of `exact`, `prefix` and `regex`",
                ));
            }
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for (h, hm) in m.headers.iter().enumerate() {
            let hfield = format!("{field}.match.headers[{h}]");
            let name = self.header_name(&hm.name, &format!("{hfield}.name"))?;
            let matcher = match (&hm.exact, &hm.regex, hm.present) {
                (Some(v), None, None) => HeaderMatch::Exact(name, v.clone()),
                (None, Some(re), None) => {
                    HeaderMatch::Regex(name, self.regex(re, &format!("{hfield}.regex"))?)
                }
                (None, None, Some(p)) => HeaderMatch::Present(name, p),
                _ => {
                    return Err(self.err(
                        &hm.name,
                        &hfield,
                        "set exactly one of `exact`, `regex` and `present`",
                    ));
                }
            };
            headers.push(matcher);
        }
        let mut methods = Vec::with_capacity(m.methods.len());
        for (k, method) in m.methods.iter().enumerate() {
            let parsed =
                Method::from_bytes(method.value.to_ascii_uppercase().as_bytes()).map_err(|_| {
                    self.err(
                        method,
                        &format!("{field}.match.methods[{k}]"),
                        "not an HTTP method",
                    )
                })?;
            methods.push(parsed);
        }
        if r.backends.is_empty() {
            return Err(ConfigError::at(
                self.source,
                None,
                &format!("{field}.backends"),
                "a route needs at least one backend",
            ));
        }
        let mut backends = Vec::with_capacity(r.backends.len());
        for (b, backend) in r.backends.iter().enumerate() {
            let cluster = self.cluster_ref(
                &backend.cluster,
                &format!("{field}.backends[{b}].cluster"),
                clusters,
            )?;
            backends.push(WeightedBackend {
                cluster,
                weight: backend.weight,
            });
        }
        let total_weight: u32 = backends.iter().map(|b| b.weight).sum();
        if total_weight == 0 {
            return Err(self.err(
                &r.backends[0].cluster,
                &format!("{field}.backends"),
                "backend weights add up to 0",
            ));
        }
        if let Some(ratio) = r.sampling.filter(|r| !(0.0..=1.0).contains(r)) {
            return Err(ConfigError::at(
                self.source,
                None,
                &format!("{field}.sampling"),
                format!("{ratio} is not between 0 and 1"),
            ));
        }
        let mut websocket = r.upgrades.is_none();
        for u in r.upgrades.iter().flatten() {
            match u.value.to_ascii_lowercase().as_str() {
                "websocket" => websocket = true,
                "h2c" => {
                    return Err(self.err(
                        u,
                        &format!("{field}.upgrades"),
                        "`h2c` is never honoured: it would hand the connection to the app unrouted",
                    ));
                }
                other => {
                    return Err(self.err(
                        u,
                        &format!("{field}.upgrades"),
                        format!("`{other}` is not an upgrade the proxy honours (only `websocket`)"),
                    ));
                }
            }
        }
        Ok(Route {
            websocket,
            sampling: r.sampling,
            rate_limit: self.rate_limiter(
                &r.rate_limit,
                &format!("{field}.rate_limit"),
                listener,
                Some(&name),
            )?,
            name,
            path,
            headers,
            methods,
            backends,
            total_weight,
            timeout: self.duration(
                &r.timeout,
                &format!("{field}.timeout"),
                DEFAULT_ROUTE_TIMEOUT,
            )?,
            request_headers: self
                .header_changes(&r.request_headers, &format!("{field}.request_headers"))?,
            response_headers: self
                .header_changes(&r.response_headers, &format!("{field}.response_headers"))?,
            // On unless turned off (`attempts: 0`): the defaults retry only what never reached
            // the app or what it said it could not take, idempotent requests only.
            retry: Some(match &r.retry {
                Some(retry) => self.retry(retry, &format!("{field}.retry"))?,
                None => RetryPolicy::from_model(&policy::default_retry()),
            }),
        })
    }

    fn outlier(&self, o: &OutlierFile, field: &str) -> Result<OutlierPolicy, ConfigError> {
        let o = policy::check_outlier(self.source, o, field)?;
        let d = OutlierPolicy::default();
        Ok(OutlierPolicy {
            consecutive_5xx: o.consecutive_5xx.or(d.consecutive_5xx),
            consecutive_gateway_failure: o
                .consecutive_gateway_failure
                .or(d.consecutive_gateway_failure),
            base_ejection: o.base_ejection.unwrap_or(d.base_ejection),
            max_ejection: o.max_ejection.unwrap_or(d.max_ejection),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(d.max_ejection_percent),
        })
    }

    fn retry(&self, r: &RetryFile, field: &str) -> Result<RetryPolicy, ConfigError> {
        Ok(RetryPolicy::from_model(&policy::check_retry(
            self.source,
            r,
            field,
        )?))
    }

    fn regex(&self, re: &Spanned<String>, field: &str) -> Result<Regex, ConfigError> {
        // Anchored: a path regex must match the whole path, as in Envoy's safe_regex.
        Regex::new(&format!("^(?:{})$", re.value))
            .map_err(|e| self.err(re, field, format!("invalid regex: {e}")))
    }

    fn header_name(&self, name: &Spanned<String>, field: &str) -> Result<HeaderName, ConfigError> {
        HeaderName::from_bytes(name.value.to_ascii_lowercase().as_bytes()).map_err(|_| {
            self.err(
                name,
                field,
                format!("`{}` is not a valid header name", name.value),
            )
        })
    }

    fn header_changes(
        &self,
        h: &HeaderChangesFile,
        field: &str,
    ) -> Result<HeaderChanges, ConfigError> {
        let mut out = HeaderChanges::default();
        for (i, kv) in h.set.iter().enumerate() {
            let name = self.header_name(&kv.name, &format!("{field}.set[{i}].name"))?;
            let value = HeaderValue::from_str(&kv.value.value).map_err(|_| {
                self.err(
                    &kv.value,
                    &format!("{field}.set[{i}].value"),
                    "not a valid header value",
                )
            })?;
            out.set.push((name, value));
        }
        for (i, name) in h.remove.iter().enumerate() {
            out.remove
                .push(self.header_name(name, &format!("{field}.remove[{i}]"))?);
        }
        Ok(out)
    }
}
