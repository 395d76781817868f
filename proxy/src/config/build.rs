//! Building a snapshot from a file model: the identity first (listeners and clusters with
//! `tls` need it), then clusters, then listeners and their routes. The first problem stops
//! the build with its file, line and field; a bad file never produces half a config.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outrigger_core::authz::{Caller, Rule, TextMatch, method};
use outrigger_core::config_error::ConfigError;
use outrigger_core::duration::parse_duration;
use outrigger_core::spiffe::{Principal, SpiffeId};
use serde_saphyr::Spanned;

use crate::cluster::balance::Cluster;
use crate::config::file::{
    AllowFile, AuthorizationFile, ConfigFile, IdentityFile, ListenerFile, ListenerProtocol,
    TracingFile,
};
use crate::config::snapshot::{
    Authorization, DEFAULT_DETECT_TIMEOUT, DEFAULT_HTTP_IDLE_TIMEOUT, DEFAULT_TCP_IDLE_TIMEOUT,
    Identity, IdentitySource, Listener, ListenerTls, RuntimeConfig, TcpRoute,
};
use crate::identity::client::{CaClient, CaTrust, Token};
use crate::identity::mtls;
use crate::identity::store::{IdentityFiles, IdentityStore};
use crate::route::destinations::Destinations;
use crate::route::router::DomainTable;
use crate::route::table::VirtualHost;
use crate::telemetry::span_export::{Collector, Tracer};

/// Who may tap when the file says nothing: the pod itself.
const DEFAULT_TAP_FROM: [&str; 2] = ["127.0.0.1", "::1"];

#[derive(Clone)]
pub(super) struct Builder<'a> {
    pub(super) source: &'a str,
    pub(super) previous: Option<&'a RuntimeConfig>,
    pub(super) identity: Option<Arc<IdentityStore>>,
}

impl Builder<'_> {
    pub(super) fn err<T>(
        &self,
        at: &Spanned<T>,
        field: &str,
        message: impl std::fmt::Display,
    ) -> ConfigError {
        ConfigError::at(self.source, Some(at.referenced), field, message)
    }

    pub(super) fn duration(
        &self,
        value: Option<&Spanned<String>>,
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

    pub(super) fn address(
        &self,
        value: &Spanned<String>,
        field: &str,
    ) -> Result<SocketAddr, ConfigError> {
        value.value.parse().map_err(|_| {
            self.err(
                value,
                field,
                format!("`{}` is not an IP:port socket address", value.value),
            )
        })
    }

    /// The identity first: listeners and clusters with `tls` need it.
    pub(super) fn build(
        &self,
        file: ConfigFile,
        version: u64,
    ) -> Result<RuntimeConfig, ConfigError> {
        let identity = match &file.identity {
            None => None,
            Some(f) => {
                let source = self.identity_source(f)?;
                Some(match self.previous.and_then(|p| p.same_identity(&source)) {
                    Some(kept) => kept,
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

    pub(super) fn build_config(
        &self,
        mut file: ConfigFile,
        version: u64,
    ) -> Result<RuntimeConfig, ConfigError> {
        let admin_address = match &file.admin {
            Some(admin) => Some(self.address(&admin.address, "admin.address")?),
            None => None,
        };
        let tap_from = match file.admin.as_ref().and_then(|a| a.tap_from.as_ref()) {
            None => DEFAULT_TAP_FROM
                .iter()
                .map(|c| c.parse().expect("a valid address"))
                .collect(),
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    c.value
                        .parse::<outrigger_core::cidr::Cidr>()
                        .map_err(|e| self.err(c, &format!("admin.tap_from[{i}]"), e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?,
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
            clusters.insert(c.name.value.clone(), Arc::new(self.cluster(c, &field)?));
        }

        // Each listener's file form is consumed as it is built, so that a mesh-sized file and
        // its built form are never both whole in memory (that peak would stay in RSS).
        let listener_files = std::mem::take(&mut file.listeners);
        let mut listeners: Vec<Listener> = Vec::with_capacity(listener_files.len());
        for (i, l) in listener_files.into_iter().enumerate() {
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
            tap_from,
            workers: file.workers,
            listeners,
            clusters,
            identity: None,
            tracing: None,
            access_log: file.access_log,
        })
    }

    /// A reload with the same tracing settings keeps the exporter (and its queue).
    pub(super) fn tracer(&self, t: &TracingFile) -> Result<Arc<Tracer>, ConfigError> {
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

    pub(super) fn identity_source(&self, f: &IdentityFile) -> Result<IdentitySource, ConfigError> {
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
                        ca.lifetime.as_ref(),
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

    pub(super) fn identity_for(&self, field: &str) -> Result<Arc<IdentityStore>, ConfigError> {
        self.identity.clone().ok_or_else(|| {
            ConfigError::at(
                self.source,
                None,
                field,
                "mTLS needs this proxy's `identity` (cert, key and bundle)",
            )
        })
    }

    /// The listener's TLS and its authorization layers: the file's, then the control
    /// plane's (`lds`); the stricter of their modes applies.
    pub(super) fn listener_tls(
        &self,
        l: &ListenerFile,
        field: &str,
    ) -> Result<(Option<ListenerTls>, Vec<Authorization>), ConfigError> {
        let central = l.from_control_plane.as_ref();
        let local_mode = l.tls.as_ref().map(|t| t.mode);
        let mode = match (local_mode, central.map(|c| c.mode)) {
            (Some(a), Some(b)) => Some(a.strictest(b)),
            (a, b) => a.or(b),
        };
        let tls = match mode {
            None => None,
            Some(mode) => {
                let at = match &l.lds {
                    Some(name) if l.tls.is_none() => format!("{field} (Listener {name} over xDS)"),
                    _ => format!("{field}.tls"),
                };
                Some(ListenerTls {
                    mode,
                    acceptor: tokio_rustls::TlsAcceptor::from(mtls::server_config(
                        self.identity_for(&at)?,
                    )),
                })
            }
        };
        let mut layers = Vec::new();
        if let Some(a) = &l.authorization {
            layers.push(self.authorization(a, &format!("{field}.authorization"))?);
        }
        if let Some(a) = central.and_then(|c| c.authorization.clone()) {
            layers.push(a);
        }
        Ok((tls, layers))
    }

    fn authorization(
        &self,
        a: &AuthorizationFile,
        field: &str,
    ) -> Result<Authorization, ConfigError> {
        let mut rules = Vec::with_capacity(a.allow.len() + 1);
        let callers = |list: &[Spanned<String>], at: &str| {
            list.iter()
                .enumerate()
                .map(|(i, p)| {
                    Principal::parse(&p.value)
                        .map(|p| Caller::from(&p))
                        .map_err(|e| self.err(p, &format!("{at}[{i}]"), e))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        for (i, allow) in a.allow.iter().enumerate() {
            let at = format!("{field}.allow[{i}]");
            rules.push(match allow {
                AllowFile::Caller(p) => Rule::anything(
                    &format!("allow-{i}"),
                    callers(std::slice::from_ref(p), &at)?,
                ),
                AllowFile::Rule(r) => {
                    let paths = r
                        .paths
                        .iter()
                        .enumerate()
                        .map(|(j, p)| {
                            TextMatch::path(&p.value)
                                .map_err(|e| self.err(p, &format!("{at}.paths[{j}]"), e))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let methods = r
                        .methods
                        .iter()
                        .enumerate()
                        .map(|(j, m)| {
                            method(&m.value)
                                .map_err(|e| self.err(m, &format!("{at}.methods[{j}]"), e))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Rule::from_lists(
                        format!("allow-{i}"),
                        callers(&r.from, &format!("{at}.from"))?,
                        paths,
                        methods,
                    )
                }
            });
        }
        match a.default.as_ref().map(|d| (d, d.value.as_str())) {
            None | Some((_, "deny")) => {}
            Some((_, "allow")) => rules.push(Rule::anything("default", vec![Caller::Any])),
            Some((d, other)) => {
                return Err(self.err(
                    d,
                    &format!("{field}.default"),
                    format!("`{other}` is neither `allow` nor `deny`"),
                ));
            }
        }
        Ok(Authorization { rules })
    }

    pub(super) fn cluster_ref(
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

    pub(super) fn listener(
        &self,
        mut l: ListenerFile,
        field: &str,
        clusters: &HashMap<String, Arc<Cluster>>,
    ) -> Result<Listener, ConfigError> {
        let address = self.address(&l.address, &format!("{field}.address"))?;
        let detect_timeout = self.duration(
            l.detect_timeout.as_ref(),
            &format!("{field}.detect_timeout"),
            DEFAULT_DETECT_TIMEOUT,
        )?;
        let tcp = match &l.tcp {
            Some(t) => Some(TcpRoute {
                cluster: self.cluster_ref(&t.cluster, &format!("{field}.tcp.cluster"), clusters)?,
                idle_timeout: self.duration(
                    t.idle_timeout.as_ref(),
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
        let host_files = std::mem::take(&mut l.virtual_hosts);
        let mut virtual_hosts = Vec::with_capacity(host_files.len());
        for (v, vh) in host_files.into_iter().enumerate() {
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
                name: vh.name,
                domains: vh.domains,
                routes,
            });
        }
        let domains = DomainTable::new(&virtual_hosts)
            .map_err(|msg| self.err(&l.address, &format!("{field}.virtual_hosts"), msg))?;
        let (tls, authorization) = self.listener_tls(&l, field)?;
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
                l.idle_timeout.as_ref(),
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
}

#[cfg(test)]
mod tests {
    use crate::config::snapshot::RuntimeConfig;

    fn listener(authorization: &str) -> String {
        format!(
            r#"listeners:
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
    authorization:
{authorization}
"#
        )
    }

    #[test]
    fn allow_takes_identities_and_rules_and_names_a_bad_entry() {
        let good = listener(
            r#"      allow:
        - "spiffe://cluster.local/ns/pay/*"
        - {from: ["spiffe://cluster.local/ns/shop/sa/web"], paths: ["/api/*"], methods: [GET]}
        - {paths: [/healthz]}"#,
        );
        let built = RuntimeConfig::build("p.yaml", &good, 1, None).unwrap();
        let rules = &built.listeners[0].authorization[0].rules;
        assert_eq!(rules.len(), 3);
        for (bad, field) in [
            ("      allow: [{paths: [api]}]", "allow[0].paths[0]"),
            ("      allow: [{methods: [get]}]", "allow[0].methods[0]"),
            ("      allow: [{from: [web]}]", "allow[0].from[0]"),
            ("      allow: [\"spiffe://x/ns/a\"]", "allow[0]"),
            ("      allow: [{form: []}]", "a rule with only `from`"),
        ] {
            let e = RuntimeConfig::build("p.yaml", &listener(bad), 1, None)
                .err()
                .unwrap_or_else(|| panic!("{bad} was accepted"))
                .to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn a_host_rewrite_must_be_an_authority() {
        let with_rewrite = |host: &str| {
            format!(
                r#"listeners:
  - name: out
    address: 127.0.0.1:0
    direction: outbound
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - backends: [{{cluster: up}}]
            rewrite: {{host: "{host}"}}
clusters:
  - name: up
    endpoints: [{{address: "127.0.0.1:1"}}]
"#
            )
        };
        for good in ["shop", "shop.pay.svc:8080", "[::1]:80"] {
            RuntimeConfig::build("p.yaml", &with_rewrite(good), 1, None)
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["a b", "shop/x", "shop?q"] {
            let e = RuntimeConfig::build("p.yaml", &with_rewrite(bad), 1, None)
                .err()
                .unwrap_or_else(|| panic!("{bad} was accepted"))
                .to_string();
            assert!(e.contains("rewrite.host"), "{bad}: {e}");
        }
    }
}
