//! The standalone config file: what a user writes, exactly as written.
//!
//! This module only describes the YAML shape. Turning it into something the data path can
//! use (compiled regexes, resolved cluster references, parsed durations) is the job of
//! `config::build`, which reports every problem with the file, line and field.
//!
//! Values whose correctness can only be judged after parsing (durations, regexes, addresses,
//! references to clusters) are `Spanned`, so that a validation error can still point at the
//! line they came from.

use serde::Deserialize;
use serde_saphyr::Spanned;

pub use crate::cluster::balance::{LbPolicy, UpstreamProtocol};
pub use outrigger_core::policy::{
    CircuitBreakerFile, OutlierFile, RateLimitFile, RetryBudgetFile, RetryFile,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub admin: Option<AdminFile>,
    /// Worker threads for the data path. 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    #[serde(default)]
    pub listeners: Vec<ListenerFile>,
    #[serde(default)]
    pub clusters: Vec<ClusterFile>,
    /// Routes and clusters from a control plane over ADS, added to what this file declares.
    #[serde(default)]
    pub xds: Option<XdsFile>,
    /// This workload's certificate, key and trust bundle, as PEM files; reloaded when they
    /// change. Needed by any `tls` below.
    #[serde(default)]
    pub identity: Option<IdentityFile>,
    /// OpenTelemetry spans for every proxied request, sent over OTLP.
    #[serde(default)]
    pub tracing: Option<TracingFile>,
    /// One log line per request (target `access`), with its trace ID; JSON with --log-json.
    #[serde(default)]
    pub access_log: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracingFile {
    /// `service.name` of the spans: the workload's service.
    pub service_name: String,
    /// The share of new traces sampled, 0 to 1 (default 1). A request that arrives with a
    /// trace context follows its caller's decision.
    #[serde(default)]
    pub sampling: Option<f64>,
    /// A collector's OTLP/gRPC address, `host:port` (4317).
    #[serde(default)]
    pub otlp_grpc: Option<Spanned<String>>,
    /// A collector's OTLP/HTTP URL (`http://host:4318/v1/traces`).
    #[serde(default)]
    pub otlp_http: Option<Spanned<String>>,
    /// Spans waiting for export; beyond it they are dropped and counted. Default 2048.
    #[serde(default)]
    pub queue: Option<usize>,
}

/// Either PEM files kept fresh by someone else (`cert`, `key`, `bundle`), or `ca`: the proxy
/// makes its own key and has the control plane's CA sign it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    #[serde(default)]
    pub cert: Option<Spanned<String>>,
    #[serde(default)]
    pub key: Option<Spanned<String>>,
    #[serde(default)]
    pub bundle: Option<Spanned<String>>,
    #[serde(default)]
    pub ca: Option<CaIdentityFile>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaIdentityFile {
    /// The control plane's gRPC address, `IP:port` (its xDS port).
    pub address: Spanned<String>,
    /// The bootstrap token the mesh file gives this workload.
    #[serde(default)]
    pub token: Option<String>,
    /// Or a file holding the token, read for every request: a projected Kubernetes
    /// service-account token.
    #[serde(default)]
    pub token_file: Option<String>,
    /// The identity to ask for; the CA signs it only if the token proves it.
    pub id: Spanned<String>,
    /// Default 24h; renewed at about half of it.
    #[serde(default)]
    pub lifetime: Option<Spanned<String>>,
    /// The CA's root, PEM, got out of band (mounted into the pod): the CA is reached over
    /// TLS and must prove itself against it, and so must every chain it returns.
    #[serde(default)]
    pub trust_anchor: Option<Spanned<String>>,
    /// The CA's SPIFFE ID; default `spiffe://<trust domain of id>/ns/outrigger/sa/control-plane`.
    #[serde(default)]
    pub server_id: Option<Spanned<String>>,
    /// Plaintext to a CA that proves nothing: local development only, and never together
    /// with `trust_anchor`.
    #[serde(default)]
    pub plaintext: bool,
}

pub use outrigger_core::inbound::TlsMode;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsFile {
    pub mode: TlsMode,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationFile {
    /// What happens to a caller no rule names: `deny` (the default) or `allow`.
    #[serde(default)]
    pub default: Option<Spanned<String>>,
    /// Who may call: a SPIFFE ID (or `spiffe://<td>/ns/<namespace>/*` for a whole
    /// namespace) for any path, or a rule with `from`, `paths` and `methods`.
    #[serde(default)]
    pub allow: Vec<AllowFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a SPIFFE ID, or a rule with only `from`, `paths` and `methods` (lists)"
)]
pub enum AllowFile {
    Caller(Spanned<String>),
    Rule(AllowRuleFile),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowRuleFile {
    /// SPIFFE IDs or namespace patterns; absent: any caller, with an identity or not.
    #[serde(default)]
    pub from: Vec<Spanned<String>>,
    /// `/exact`, or `/prefix/*`; absent: any path.
    #[serde(default)]
    pub paths: Vec<Spanned<String>>,
    /// `GET`, `POST`, …; absent: any method.
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTlsFile {
    /// The SPIFFE IDs the endpoints may have; any other peer is refused.
    pub identities: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsFile {
    /// The control plane's ADS address, `IP:port`.
    pub address: Spanned<String>,
    /// Other replicas of the control plane, `IP:port`. When the stream to one fails, the
    /// next is tried, in turn; the last good config serves meanwhile.
    #[serde(default)]
    pub alternates: Vec<Spanned<String>>,
    /// This proxy's node id; defaults to the host name and process id.
    #[serde(default)]
    pub node: Option<String>,
    /// The service this proxy sits beside (the node's cluster).
    #[serde(default)]
    pub service: Option<String>,
    /// A file to keep the last accepted xDS config in, so that a proxy restarted while the
    /// control plane is away still serves.
    #[serde(default)]
    pub cache: Option<String>,
    /// Talk to the control plane over mTLS (with this proxy's `identity`), and accept only a
    /// control plane with this SPIFFE ID.
    #[serde(default)]
    pub identity: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub address: Spanned<String>,
    /// Who may watch live requests on `/tap`: addresses or CIDRs. Default: the pod itself
    /// (127.0.0.1 and ::1), which `kubectl port-forward` and `kubectl exec` reach.
    #[serde(default)]
    pub tap_from: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

/// How a listener decides what its connections speak.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// Peek at the first bytes (the default).
    #[default]
    Detect,
    Http1,
    Http2,
    /// Never wait for the client: server-speaks-first protocols need this.
    Opaque,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub name: String,
    pub address: Spanned<String>,
    pub direction: Direction,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// How long detection waits for the first bytes before treating the stream as opaque.
    #[serde(default)]
    pub detect_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHostFile>,
    /// Where opaque TCP goes: connections declared or detected as opaque.
    #[serde(default)]
    pub tcp: Option<TcpRouteFile>,
    /// Take this listener's virtual hosts from the control plane's RouteConfiguration of
    /// this name (added after any written here).
    #[serde(default)]
    pub rds: Option<String>,
    /// HTTP connections with no request in flight for this long are closed; default 1h.
    #[serde(default)]
    pub idle_timeout: Option<Spanned<String>>,
    /// One token bucket for every HTTP request this listener takes: the service's own limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimitFile>,
    /// Terminate mTLS from other proxies.
    #[serde(default)]
    pub tls: Option<ListenerTlsFile>,
    /// Which callers may use this listener, by SPIFFE ID, path and method.
    #[serde(default)]
    pub authorization: Option<AuthorizationFile>,
    /// Also take this listener's mTLS mode and authorization from the control plane's
    /// Listener of this name. The stricter mode applies, and a caller must pass both this
    /// file's authorization and the control plane's.
    #[serde(default)]
    pub lds: Option<String>,
    /// What the control plane's Listener `lds` says, once it has said it: set by the xDS
    /// client, never read from a file.
    #[serde(skip)]
    pub from_control_plane: Option<outrigger_core::inbound::Inbound>,
    /// Connections arrive redirected by the `init` rules: read where each was going
    /// (`SO_ORIGINAL_DST`). Outbound, that address picks the service, and an address that is
    /// no service of the mesh is passed straight through.
    #[serde(default)]
    pub original_destination: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRouteFile {
    pub cluster: Spanned<String>,
    #[serde(default)]
    pub idle_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHostFile {
    pub name: String,
    /// Host names, with an optional port; `*.example.com` and `*` are wildcards.
    #[serde(deserialize_with = "shrunk")]
    pub domains: Vec<String>,
    #[serde(default, deserialize_with = "shrunk")]
    pub routes: Vec<RouteFile>,
}

/// A list that takes no more room than its items. A list grows by doubling from four as it
/// is read, and a mesh of ten thousand one-route virtual hosts would otherwise hold room for
/// forty thousand routes while the file is read; freed later, that peak stays in the
/// process's RSS.
fn shrunk<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let mut items = Vec::<T>::deserialize(d)?;
    items.shrink_to_fit();
    Ok(items)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    #[serde(default)]
    pub name: Option<String>,
    // Boxed, as is `retry`: most routes leave them out, and every route read holds its room.
    #[serde(default, rename = "match")]
    pub matches: Option<Box<MatchFile>>,
    /// Where matched requests go; none for a route that redirects.
    #[serde(default, deserialize_with = "shrunk")]
    pub backends: Vec<BackendFile>,
    /// A new path or host for the request before it goes on.
    #[serde(default)]
    pub rewrite: Option<Box<TargetFile>>,
    /// Answer with a redirect instead of forwarding.
    #[serde(default)]
    pub redirect: Option<Box<TargetFile>>,
    /// Clusters that also get a copy of each request (its answer is ignored).
    #[serde(default)]
    pub mirror: Vec<MirrorFile>,
    #[serde(default)]
    pub timeout: Option<Box<Spanned<String>>>,
    #[serde(default)]
    pub request_headers: Option<Box<HeaderChangesFile>>,
    #[serde(default)]
    pub response_headers: Option<Box<HeaderChangesFile>>,
    #[serde(default)]
    pub retry: Option<Box<RetryFile>>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitFile>,
    /// The share of new traces sampled on this route, overriding `tracing.sampling`.
    #[serde(default)]
    pub sampling: Option<f64>,
    /// The protocol upgrades this route honours: `[websocket]` by default, `[]` for none.
    /// Nothing else is accepted, and never `h2c`.
    #[serde(default)]
    pub upgrades: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewriteFile {
    pub pattern: Spanned<String>,
    pub substitution: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorFile {
    pub cluster: Spanned<String>,
    /// The share of requests copied, 0 to 100 (default 100).
    #[serde(default)]
    pub percent: Option<f64>,
}

/// Where a request goes instead: as a `rewrite`, a new path and Host before it goes on; as
/// a `redirect`, the Location the caller is sent to. What is not set stays as the request
/// had it.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    /// Redirects only: `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub host: Option<Spanned<String>>,
    /// Redirects only.
    #[serde(default)]
    pub port: Option<u16>,
    /// A new path, at most one of: the whole of it, the part the route's prefix matched, or
    /// a regex substitution (Envoy's: `\1` is the first group).
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<RegexRewriteFile>,
    /// Redirects only: 301, 302 (the default), 303, 307 or 308.
    #[serde(default)]
    pub status: Option<u16>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MatchFile {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    /// The path itself or anything under it at a `/`: `/api` takes `/api` and `/api/x`,
    /// not `/apix` (Gateway API's `PathPrefix`).
    #[serde(default)]
    pub segment_prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<Spanned<String>>,
    #[serde(default)]
    pub headers: Vec<HeaderMatchFile>,
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    /// Query parameters that must be there, each with a value matching `exact` or `regex`.
    #[serde(default)]
    pub query: Vec<QueryMatchFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryMatchFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub regex: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub regex: Option<Spanned<String>>,
    /// Match when the header is present (true) or absent (false), whatever its value.
    #[serde(default)]
    pub present: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    pub cluster: Spanned<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderChangesFile {
    /// Header name → value; an existing header of that name is replaced.
    #[serde(default)]
    pub set: Vec<HeaderValueFile>,
    /// Header name → value, added beside any the message has.
    #[serde(default)]
    pub add: Vec<HeaderValueFile>,
    #[serde(default)]
    pub remove: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueFile {
    pub name: Spanned<String>,
    pub value: Spanned<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default)]
    pub lb: LbPolicy,
    #[serde(default)]
    pub connect_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub endpoints: Vec<EndpointFile>,
    /// On by default (20 % plus 10 per second).
    #[serde(default)]
    pub retry_budget: Option<RetryBudgetFile>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerFile>,
    /// Off unless set; unset fields take the defaults (5, 5, 30s, 300s, 50 %).
    #[serde(default)]
    pub outlier: Option<OutlierFile>,
    /// Originate mTLS to the endpoints (as HTTP/2, whatever `protocol` says).
    #[serde(default)]
    pub tls: Option<ClusterTlsFile>,
    /// Its endpoints speak opaque TCP: a redirected connection to it is proxied at once,
    /// without waiting for bytes to detect a protocol (server-first protocols need this).
    #[serde(default)]
    pub opaque: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    pub address: Spanned<String>,
}
