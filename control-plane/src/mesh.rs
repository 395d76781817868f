//! The mesh file: services, their endpoints and their routes, as a user writes them, and the
//! validated `Mesh` the translator reads.
//!
//! Validation is strict and located: every problem names the file, line and field, and an
//! invalid file never replaces the mesh that is serving.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use outrigger_core::config_error::ConfigError;
use outrigger_core::duration::parse_duration;
use serde::Deserialize;
use serde_saphyr::Spanned;

use outrigger_core::spiffe::SpiffeId;
use time::OffsetDateTime;

use crate::authorization::{self, AuthorizationFile};
use crate::policy::{self, Policy, PolicyFile, RateLimit, RateLimitFile, Retry, RetryFile};
use outrigger_core::authz::Authorization;
pub use outrigger_core::inbound::TlsMode;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeshFile {
    #[serde(default)]
    mesh: MeshSettingsFile,
    /// What applies where a service or route says nothing (over the built-in defaults).
    #[serde(default)]
    defaults: Option<policy::PolicyFile>,
    #[serde(default)]
    services: Vec<ServiceFile>,
    /// Settings for every service of a namespace.
    #[serde(default)]
    namespaces: Vec<NamespaceFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceFile {
    name: Spanned<String>,
    /// The mTLS mode of every service in it that sets none.
    #[serde(default)]
    tls_mode: Option<TlsMode>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MeshSettingsFile {
    /// Where every sidecar's outbound listener binds on loopback.
    #[serde(default)]
    outbound_port: Option<u16>,
    /// The SPIFFE trust domain of every workload identity; default `cluster.local`.
    #[serde(default)]
    trust_domain: Option<String>,
    /// Tracing settings every proxy follows.
    #[serde(default)]
    tracing: Option<MeshTracingFile>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MeshTracingFile {
    /// The share of new traces sampled, 0 to 1, on every route.
    sampling: f64,
}

/// A credential a workload presents to get its first certificate, outside Kubernetes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    token: Spanned<String>,
    /// RFC 3339; the token is refused after it.
    #[serde(default)]
    expires: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Http2,
    Grpc,
    /// Opaque TCP: sidecars proxy connections to it without detecting a protocol.
    Tcp,
}

impl Protocol {
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    name: Spanned<String>,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default)]
    endpoints: Vec<EndpointFile>,
    #[serde(default)]
    routes: Vec<RouteFile>,
    /// The services this one may call; its sidecars get only those (and what their routes
    /// lead to). Absent means all: simple, but every proxy then holds the whole mesh.
    #[serde(default)]
    calls: Option<Vec<Spanned<String>>>,
    /// Resilience policy for calls to this service.
    #[serde(default)]
    policy: Option<PolicyFile>,
    /// The identity its workloads run as; default: the service's name.
    #[serde(default)]
    service_account: Option<String>,
    /// Bootstrap tokens that prove this service's identity to the CA.
    #[serde(default)]
    tokens: Vec<TokenFile>,
    /// The service's virtual IPs (a Kubernetes ClusterIP, say). A sidecar that intercepts
    /// an app's connection to `vip:port` routes it as a call to this service.
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
    /// The workloads run a sidecar that takes mTLS: callers' proxies originate mTLS to them
    /// and check that the peer proves this service's identity.
    #[serde(default)]
    mtls: bool,
    /// Whether its sidecars also take plaintext (`permissive`) or only mTLS (`strict`).
    /// Strict implies `mtls`.
    #[serde(default)]
    tls_mode: Option<TlsMode>,
    /// Who may call it, on which paths; absent, every caller the mode lets connect.
    #[serde(default)]
    authorization: Option<AuthorizationFile>,
}

fn default_namespace() -> String {
    "default".into()
}

fn default_port() -> u16 {
    80
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    address: Spanned<String>,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "match")]
    matches: MatchFile,
    /// Where matching requests go; the service itself when empty.
    #[serde(default)]
    backends: Vec<BackendFile>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    /// Overrides the service's retry policy for this route.
    #[serde(default)]
    retry: Option<RetryFile>,
    /// Overrides the service's rate limit for this route.
    #[serde(default)]
    rate_limit: Option<RateLimitFile>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MatchFile {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<Spanned<String>>,
    #[serde(default)]
    headers: Vec<HeaderMatchFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderMatchFile {
    name: String,
    exact: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendFile {
    service: Spanned<String>,
    #[serde(default = "one")]
    weight: u32,
}

/// The validated mesh.
#[derive(Debug, Clone, PartialEq)]
pub struct Mesh {
    /// The policy where a service or route says nothing: the built-in defaults, under the
    /// file's `defaults:`.
    pub defaults: Policy,
    pub outbound_port: u16,
    pub trust_domain: String,
    /// The mesh-wide share of new traces sampled, if set.
    pub sampling: Option<f64>,
    /// Bootstrap token → the identity it proves, and until when.
    pub tokens: BTreeMap<String, (SpiffeId, Option<OffsetDateTime>)>,
    /// Keyed by cluster name (`name.namespace`), so output order is stable.
    pub services: BTreeMap<String, Service>,
    /// The mTLS mode of each namespace that has one (`namespaces:`).
    pub namespace_tls: BTreeMap<String, TlsMode>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub protocol: Protocol,
    pub port: u16,
    pub endpoints: Vec<(SocketAddr, u32)>,
    pub routes: Vec<Route>,
    /// Cluster names this service may call; `None` for all.
    pub calls: Option<Vec<String>>,
    pub policy: Policy,
    pub identity: SpiffeId,
    /// Virtual IPs: `vip:port` is one more host name of the service.
    pub addresses: Vec<std::net::IpAddr>,
    pub mtls: bool,
    /// One more port of a Kubernetes Service whose main port is another mesh service: its
    /// cluster is `name.namespace:port`, and a host name without a port does not lead here.
    pub extra_port: bool,
    /// A request no route matches gets 404 instead of going to the service itself, as with
    /// Gateway API routes.
    pub only_routes: bool,
    /// Consumer routes (GAMMA): by the namespace of the callers they are for, routes that
    /// take the place of these for those callers only.
    pub consumer_routes: BTreeMap<String, Vec<Route>>,
    /// Its workloads' inbound mTLS mode, where set for the service itself.
    pub tls_mode: Option<TlsMode>,
    /// Who may call it; `None`: every caller the mode lets connect.
    pub authorization: Option<Authorization>,
}

impl Service {
    /// The cluster and EDS name: `name.namespace`, or `name.namespace:port` for an extra
    /// port.
    pub fn cluster_name(&self) -> String {
        if self.extra_port {
            format!("{}.{}:{}", self.name, self.namespace, self.port)
        } else {
            format!("{}.{}", self.name, self.namespace)
        }
    }

    /// The port its workloads' app listens on (its endpoints' port), where a sidecar in
    /// front of the app sends what it admits.
    pub fn app_port(&self) -> Option<u16> {
        self.endpoints.first().map(|(addr, _)| addr.port())
    }

    /// The two differ at most in their endpoints, and not in the port their app listens on
    /// (which an inbound Listener routes to): a change that only moves pods.
    pub fn same_but_endpoints(&self, other: &Service) -> bool {
        // Every field named, so that a new one is not forgotten here.
        let Service {
            name,
            namespace,
            protocol,
            port,
            endpoints: _,
            routes,
            calls,
            policy,
            identity,
            addresses,
            mtls,
            extra_port,
            only_routes,
            consumer_routes,
            tls_mode,
            authorization,
        } = self;
        (
            name, namespace, protocol, port, routes, calls, policy, identity,
        ) == (
            &other.name,
            &other.namespace,
            &other.protocol,
            &other.port,
            &other.routes,
            &other.calls,
            &other.policy,
            &other.identity,
        ) && (addresses, mtls, extra_port, only_routes, consumer_routes)
            == (
                &other.addresses,
                &other.mtls,
                &other.extra_port,
                &other.only_routes,
                &other.consumer_routes,
            )
            && (tls_mode, authorization) == (&other.tls_mode, &other.authorization)
            && self.app_port() == other.app_port()
    }

    /// Both are ports of the same Service.
    pub fn same_service(&self, other: &Service) -> bool {
        self.name == other.name && self.namespace == other.namespace
    }

    /// The host names a client may use for this service, as Kubernetes DNS would give them.
    pub fn hostnames(&self) -> Vec<String> {
        let (n, ns) = (&self.name, &self.namespace);
        let names = [
            n.clone(),
            format!("{n}.{ns}"),
            format!("{n}.{ns}.svc"),
            format!("{n}.{ns}.svc.cluster.local"),
        ];
        let vips = self
            .addresses
            .iter()
            .map(|ip| SocketAddr::new(*ip, self.port).to_string());
        let bare = !self.extra_port;
        names
            .iter()
            .flat_map(|h| [bare.then(|| h.clone()), Some(format!("{h}:{}", self.port))])
            .flatten()
            .chain(vips)
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    /// The path itself or anything under it at a `/` (Gateway API's `PathPrefix`).
    SegmentPrefix(String),
    Regex(String),
}

/// A header's or query parameter's value as a route matches it.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueMatch {
    Exact(String),
    /// RE2 syntax, matching the whole value.
    Regex(String),
}

/// Headers a route changes on the request or the response.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderChanges {
    /// Replaces any header of the name.
    pub set: Vec<(String, String)>,
    /// Added beside any of the name.
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

/// A new path, as Gateway API says it: the whole path, or the part the route's prefix
/// matched (only on a route that matches a `SegmentPrefix` or `Prefix`).
#[derive(Debug, Clone, PartialEq)]
pub enum PathModifier {
    Full(String),
    Prefix(String),
}

/// Answer with a redirect: what is not set stays as the request had it.
#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// Rewrite the request before it goes to a backend.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rewrite {
    pub host: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub path: PathMatch,
    /// Lowercase names.
    pub headers: Vec<(String, ValueMatch)>,
    pub method: Option<String>,
    pub query: Vec<(String, ValueMatch)>,
    pub request_headers: HeaderChanges,
    pub response_headers: HeaderChanges,
    /// (cluster name, weight); empty when the route redirects.
    pub backends: Vec<(String, u32)>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    /// (cluster name, percent of requests copied to it).
    pub mirrors: Vec<(String, f64)>,
    pub timeout: Option<Duration>,
    /// The route's own retry policy, else the service's.
    pub retry: Option<Retry>,
    /// The route's own rate limit, else the service's.
    pub rate_limit: Option<RateLimit>,
    /// Each try's timeout, over whichever retry policy applies.
    pub per_try_timeout: Option<Duration>,
}

pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Why a bootstrap token proves nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    Unknown,
    Expired,
}

impl Service {
    /// This service with `defaults` wherever it, or one of its routes, says nothing.
    pub fn with_defaults(&self, defaults: &Policy) -> Service {
        let policy = self.policy.or(defaults);
        let defaulted = |routes: &[Route]| -> Vec<Route> {
            routes
                .iter()
                .map(|r| Route {
                    retry: r
                        .retry
                        .clone()
                        .or_else(|| policy.retry.clone())
                        .map(|mut retry| {
                            if r.per_try_timeout.is_some() {
                                retry.per_try_timeout = r.per_try_timeout;
                            }
                            retry
                        }),
                    rate_limit: r.rate_limit.or(policy.rate_limit),
                    ..r.clone()
                })
                .collect()
        };
        let routes = defaulted(&self.routes);
        let consumer_routes = self
            .consumer_routes
            .iter()
            .map(|(ns, routes)| (ns.clone(), defaulted(routes)))
            .collect();
        Service {
            policy,
            routes,
            consumer_routes,
            ..self.clone()
        }
    }
}

impl Mesh {
    /// The two meshes differ at most in their services' endpoints.
    pub fn same_but_endpoints(&self, other: &Mesh) -> bool {
        let Mesh {
            defaults,
            outbound_port,
            trust_domain,
            sampling,
            tokens,
            services,
            namespace_tls,
        } = self;
        (
            defaults,
            outbound_port,
            trust_domain,
            sampling,
            tokens,
            namespace_tls,
        ) == (
            &other.defaults,
            &other.outbound_port,
            &other.trust_domain,
            &other.sampling,
            &other.tokens,
            &other.namespace_tls,
        ) && services.len() == other.services.len()
            && services
                .iter()
                .zip(&other.services)
                .all(|((ka, a), (kb, b))| ka == kb && a.same_but_endpoints(b))
    }

    /// The identity a bootstrap token proves, at `now`.
    pub fn identity_for_token(
        &self,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<&SpiffeId, TokenError> {
        match self.tokens.get(token) {
            None => Err(TokenError::Unknown),
            Some((_, Some(expires))) if *expires <= now => Err(TokenError::Expired),
            Some((id, _)) => Ok(id),
        }
    }
}

impl Mesh {
    pub fn parse(source: &str, text: &str) -> Result<Mesh, ConfigError> {
        Self::parse_many(&[(source.to_string(), text.to_string())])
    }

    /// Several files (a mesh directory) make one mesh; each error names its own file.
    pub fn parse_many(inputs: &[(String, String)]) -> Result<Mesh, ConfigError> {
        let mut files = Vec::with_capacity(inputs.len());
        for (source, text) in inputs {
            let file: MeshFile =
                serde_saphyr::from_str(text).map_err(|e| ConfigError::from_yaml(source, &e))?;
            files.push((source.as_str(), file));
        }
        let outbound_port = files
            .iter()
            .find_map(|(_, f)| f.mesh.outbound_port)
            .unwrap_or(DEFAULT_OUTBOUND_PORT);
        let trust_domain = files
            .iter()
            .find_map(|(_, f)| f.mesh.trust_domain.clone())
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
        let sampling = files
            .iter()
            .find_map(|(_, f)| f.mesh.tracing.as_ref().map(|t| t.sampling));
        if let Some(ratio) = sampling.filter(|r| !(0.0..=1.0).contains(r)) {
            return Err(ConfigError::at(
                files.first().map_or("", |(s, _)| s),
                None,
                "mesh.tracing.sampling",
                format!("{ratio} is not between 0 and 1"),
            ));
        }
        let mut defaults = policy::builtin_defaults();
        for (source, f) in &files {
            if let Some(d) = &f.defaults {
                defaults = policy::check(source, d, "defaults")?.or(&defaults);
            }
        }
        let mut tokens = BTreeMap::new();
        let entries: Vec<(&str, usize, &ServiceFile)> = files
            .iter()
            .flat_map(|(source, f)| {
                f.services
                    .iter()
                    .enumerate()
                    .map(move |(i, s)| (*source, i, s))
            })
            .collect();

        // Names first, so routes may point at services declared after them.
        let mut names = BTreeMap::new();
        for &(source, i, s) in &entries {
            let err = |at, field: &str, msg: String| ConfigError::at(source, Some(at), field, msg);
            let cluster = format!("{}.{}", s.name.value, s.namespace);
            if names
                .insert(s.name.value.clone(), cluster.clone())
                .is_some()
            {
                return Err(err(
                    s.name.referenced,
                    &format!("services[{i}].name"),
                    format!("duplicate service `{}`", s.name.value),
                ));
            }
        }

        let mut services = BTreeMap::new();
        for &(source, i, s) in &entries {
            let err = |at, field: &str, msg: String| ConfigError::at(source, Some(at), field, msg);
            let field = format!("services[{i}]");
            let mut endpoints = Vec::new();
            for (j, e) in s.endpoints.iter().enumerate() {
                let addr = e.address.value.parse().map_err(|_| {
                    err(
                        e.address.referenced,
                        &format!("{field}.endpoints[{j}].address"),
                        format!("`{}` is not an IP:port address", e.address.value),
                    )
                })?;
                endpoints.push((addr, e.weight.max(1)));
            }
            let policy = match &s.policy {
                Some(p) => policy::check(source, p, &format!("{field}.policy"))?,
                None => Policy::default(),
            };
            let mut routes = Vec::new();
            for (r, route) in s.routes.iter().enumerate() {
                let rfield = format!("{field}.routes[{r}]");
                let m = &route.matches;
                let path = match (&m.exact, &m.prefix, &m.regex) {
                    (Some(p), None, None) => PathMatch::Exact(p.clone()),
                    (None, Some(p), None) => PathMatch::Prefix(p.clone()),
                    (None, None, Some(re)) => {
                        regex_check(&re.value).map_err(|e| {
                            err(
                                re.referenced,
                                &format!("{rfield}.match.regex"),
                                format!("invalid regex: {e}"),
                            )
                        })?;
                        PathMatch::Regex(re.value.clone())
                    }
                    (None, None, None) => PathMatch::Prefix("/".into()),
                    _ => {
                        return Err(ConfigError::at(
                            source,
                            None,
                            &format!("{rfield}.match"),
                            "set at most one of `exact`, `prefix` and `regex`",
                        ));
                    }
                };
                let mut backends = Vec::new();
                for (b, backend) in route.backends.iter().enumerate() {
                    let cluster = names.get(&backend.service.value).ok_or_else(|| {
                        err(
                            backend.service.referenced,
                            &format!("{rfield}.backends[{b}].service"),
                            format!("no service named `{}`", backend.service.value),
                        )
                    })?;
                    backends.push((cluster.clone(), backend.weight));
                }
                if backends.is_empty() {
                    backends.push((names[&s.name.value].clone(), 1));
                }
                if backends.iter().all(|(_, w)| *w == 0) {
                    return Err(err(
                        s.name.referenced,
                        &format!("{rfield}.backends"),
                        "backend weights add up to 0".into(),
                    ));
                }
                let timeout = match &route.timeout {
                    Some(t) => Some(parse_duration(&t.value).ok_or_else(|| {
                        err(
                            t.referenced,
                            &format!("{rfield}.timeout"),
                            format!("`{}` is not a duration (try `250ms`, `2s`)", t.value),
                        )
                    })?),
                    None => None,
                };
                routes.push(Route {
                    name: route
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("{}/{r}", s.name.value)),
                    path,
                    headers: m
                        .headers
                        .iter()
                        .map(|h| {
                            let value = ValueMatch::Exact(h.exact.clone());
                            (h.name.to_ascii_lowercase(), value)
                        })
                        .collect(),
                    method: None,
                    query: Vec::new(),
                    redirect: None,
                    rewrite: None,
                    mirrors: Vec::new(),
                    request_headers: HeaderChanges::default(),
                    response_headers: HeaderChanges::default(),
                    backends,
                    timeout,
                    per_try_timeout: None,
                    retry: match &route.retry {
                        Some(retry) => Some(policy::check_retry(
                            source,
                            retry,
                            &format!("{rfield}.retry"),
                        )?),
                        None => policy.retry.clone(),
                    },
                    rate_limit: match &route.rate_limit {
                        Some(limit) => Some(policy::check_rate_limit(
                            source,
                            limit,
                            &format!("{rfield}.rate_limit"),
                        )?),
                        None => policy.rate_limit,
                    },
                });
            }
            let calls = match &s.calls {
                None => None,
                Some(list) => Some(
                    list.iter()
                        .enumerate()
                        .map(|(c, callee)| {
                            names.get(&callee.value).cloned().ok_or_else(|| {
                                err(
                                    callee.referenced,
                                    &format!("{field}.calls[{c}]"),
                                    format!("no service named `{}`", callee.value),
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            let mut addresses = Vec::with_capacity(s.addresses.len());
            for (a, address) in s.addresses.iter().enumerate() {
                addresses.push(address.value.parse().map_err(|_| {
                    err(
                        address.referenced,
                        &format!("{field}.addresses[{a}]"),
                        format!("`{}` is not an IP address", address.value),
                    )
                })?);
            }
            let authorization = match &s.authorization {
                None => None,
                Some(a) => Some(
                    authorization::check(
                        a,
                        &s.namespace,
                        &trust_domain,
                        &format!("{field}.authorization"),
                        &format!("mesh/{}/", s.name.value),
                    )
                    .map_err(|e| err(s.name.referenced, &format!("{field}.authorization"), e))?,
                ),
            };
            let service = Service {
                addresses,
                mtls: s.mtls || s.tls_mode == Some(TlsMode::Strict),
                tls_mode: s.tls_mode,
                authorization,
                extra_port: false,
                only_routes: false,
                consumer_routes: BTreeMap::new(),
                name: s.name.value.clone(),
                namespace: s.namespace.clone(),
                protocol: s.protocol,
                port: s.port,
                endpoints,
                routes,
                calls,
                policy,
                identity: SpiffeId::new(
                    &trust_domain,
                    &s.namespace,
                    s.service_account.as_deref().unwrap_or(&s.name.value),
                ),
            };
            for (t, token) in s.tokens.iter().enumerate() {
                let tfield = format!("{field}.tokens[{t}]");
                let expires = match &token.expires {
                    None => None,
                    Some(e) => Some(
                        OffsetDateTime::parse(
                            &e.value,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .map_err(|_| {
                            err(
                                e.referenced,
                                &format!("{tfield}.expires"),
                                format!("`{}` is not an RFC 3339 time", e.value),
                            )
                        })?,
                    ),
                };
                if tokens
                    .insert(
                        token.token.value.clone(),
                        (service.identity.clone(), expires),
                    )
                    .is_some()
                {
                    return Err(err(
                        token.token.referenced,
                        &format!("{tfield}.token"),
                        "this token is already given to another workload".into(),
                    ));
                }
            }
            services.insert(service.cluster_name(), service);
        }
        let mut namespace_tls = BTreeMap::new();
        for (source, f) in files {
            for (i, ns) in f.namespaces.iter().enumerate() {
                let Some(mode) = ns.tls_mode else { continue };
                if namespace_tls.insert(ns.name.value.clone(), mode).is_some() {
                    return Err(ConfigError::at(
                        source,
                        Some(ns.name.referenced),
                        &format!("namespaces[{i}].name"),
                        format!("namespace `{}` is listed twice", ns.name.value),
                    ));
                }
            }
        }
        Ok(Mesh {
            defaults,
            outbound_port,
            trust_domain,
            sampling,
            tokens,
            services,
            namespace_tls,
        })
    }
}

impl Mesh {
    /// The service a node names as its own: by its name or its cluster (`name.namespace`).
    pub fn service_named(&self, name: &str) -> Option<&Service> {
        self.services
            .values()
            .find(|s| s.name == name || s.cluster_name() == name)
    }

    /// The service whose workloads run as `id`.
    pub fn service_running_as(&self, id: &SpiffeId) -> Option<&Service> {
        self.services.values().find(|s| &s.identity == id)
    }

    /// The clusters a node of service `caller` (its name or `name.namespace`) should see:
    /// what the service may call, plus every cluster those services' routes lead to. `None`
    /// means everything: an unknown caller, or one without a `calls` list.
    pub fn scope_for(&self, caller: &str) -> Option<std::collections::BTreeSet<String>> {
        let service = self.service_named(caller)?;
        let mut scope = std::collections::BTreeSet::new();
        let mut todo: Vec<String> = service.calls.clone()?;
        while let Some(cluster) = todo.pop() {
            if scope.insert(cluster.clone())
                && let Some(callee) = self.services.get(&cluster)
            {
                todo.extend(
                    callee
                        .routes
                        .iter()
                        .flat_map(|r| r.backends.iter().map(|(c, _)| c.clone())),
                );
                // A service that may be called may be called on any of its ports.
                todo.extend(
                    self.services
                        .values()
                        .filter(|s| s.extra_port && s.same_service(callee))
                        .map(Service::cluster_name),
                );
            }
        }
        Some(scope)
    }
}

/// Rust's regex and Envoy's RE2 accept nearly the same language (neither has
/// backreferences or look-around). RE2 also refuses a pattern whose compiled program is over
/// its size limit (100 by default in Envoy), which is not checked here: Envoy NACKs such a
/// route (`tests/tests/envoy_xds.rs` shows it) and keeps its last good one.
fn regex_check(re: &str) -> Result<(), regex::Error> {
    regex::Regex::new(re).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "mesh:\n  outbound_port: 15001\nservices:\n  - name: web\n    endpoints: [{address: 127.0.0.1:8080}]\n    routes:\n      - match: {prefix: /v2}\n        backends: [{service: web-v2}]\n  - name: web-v2\n    endpoints: [{address: 127.0.0.1:8081}]\n";

    #[test]
    fn parses_and_resolves_backends() {
        let mesh = Mesh::parse("mesh.yaml", GOOD).unwrap();
        let web = &mesh.services["web.default"];
        assert_eq!(
            web.routes[0].backends,
            vec![("web-v2.default".to_string(), 1)]
        );
        assert!(
            web.hostnames()
                .contains(&"web.default.svc.cluster.local:80".to_string())
        );
    }

    #[test]
    fn scope_follows_calls_and_their_routes() {
        let text = GOOD.replace(
            "  - name: web-v2\n",
            "  - name: web-v2\n    calls: []\n  - name: front\n    calls: [web]\n",
        );
        let mesh = Mesh::parse("mesh.yaml", &text).unwrap();
        let scope = mesh.scope_for("front").unwrap();
        assert_eq!(
            scope.into_iter().collect::<Vec<_>>(),
            ["web-v2.default", "web.default"]
        );
        assert_eq!(mesh.scope_for("web-v2").unwrap().len(), 0);
        assert_eq!(mesh.scope_for("web"), None, "no calls list: everything");
    }

    #[test]
    fn a_bad_retry_condition_names_its_line() {
        let text = GOOD.replace(
            "  - name: web-v2\n",
            "  - name: web-v2\n    policy:\n      retry: {attempts: 2, on: [sometimes]}\n",
        );
        let e = Mesh::parse("mesh.yaml", &text).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (Some(11), "services[1].policy.retry.on[0]"),
            "{e}"
        );
    }

    #[test]
    fn unknown_backend_names_its_line() {
        let bad = GOOD.replace("{service: web-v2}", "{service: nope}");
        let e = Mesh::parse("mesh.yaml", &bad).unwrap_err();
        assert_eq!(e.line, Some(8));
        assert_eq!(e.field, "services[0].routes[0].backends[0].service");
    }
}
