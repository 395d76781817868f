//! Mesh → Envoy v3 resources: Cluster (EDS), ClusterLoadAssignment, Listener and
//! RouteConfiguration. These are exactly what Envoy, gRPC clients and our own proxy consume.
//!
//! Every sidecar gets one outbound listener on loopback whose HTTP connection manager loads
//! the route table `outbound` over ADS; each service is a virtual host answering to the names
//! Kubernetes DNS would give it.

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster, LoadBalancingPolicy, cluster, load_balancing_policy,
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HeaderValue, HeaderValueOption,
    Http2ProtocolOptions, Locality, RuntimeFractionalPercent, SocketAddress, TypedExtensionConfig,
    address, config_source, header_value_option, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, Listener, filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, RedirectAction, Route as EnvoyRoute, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster, header_matcher,
    query_parameter_matcher, redirect_action, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
use envoy_types::pb::envoy::extensions::load_balancing_policies::round_robin::v3::RoundRobin;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use prost::{Message, Name};

use crate::mesh::{
    HeaderChanges, Mesh, PathMatch, PathModifier, Protocol, Redirect, Service, TlsMode, ValueMatch,
};
use crate::policy;
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::google::protobuf::{Struct, Value as ProtoValue, value};
use outrigger_core::inbound::Inbound;
use outrigger_core::xds_inbound;

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The order Envoy asks in and we push in: the secrets TLS contexts name first, clusters
/// before the endpoints that fill them, listeners before the routes they name (make before
/// break).
pub const PUSH_ORDER: [&str; 5] = [
    SECRET_TYPE,
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
];

pub const OUTBOUND: &str = "outbound";
/// The Listener a sidecar asks for its inbound policy by: each node gets its own service's
/// under this name (`Snapshot::view_for`).
pub const INBOUND: &str = "inbound";
/// Where an injected sidecar's inbound listener binds; an Envoy in its place binds there.
pub const INBOUND_ADDRESS: &str = "0.0.0.0:15006";

/// The name under which service `cluster`'s inbound Listener is kept. Not a name a client
/// asks for: it is sent as `inbound`.
pub fn inbound_of(cluster: &str) -> String {
    format!("{INBOUND}@{cluster}")
}

/// The name under which the outbound table of namespace `ns`'s callers is kept. Not a name
/// a client asks for: it is sent as `outbound`.
pub fn consumer_table(ns: &str) -> String {
    consumer_of(OUTBOUND, ns)
}

/// The name under which route table `name` is kept as namespace `ns`'s callers see it (its
/// consumer routes in place of the producer's): sent as `name` to a node of `ns`.
pub fn consumer_of(name: &str, ns: &str) -> String {
    format!("{name}@{ns}")
}

pub fn pack<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// Names with an `@` are kept for per-node views (`outbound@ns`, `inbound@cluster`) and are
/// never served under that name: no Kubernetes name or host name has one.
pub fn is_internal(name: &str) -> bool {
    name.contains('@')
}

/// All resources of one type, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub by_name: std::collections::BTreeMap<String, Any>,
    /// Sent only to a subscriber that names them, never to a wildcard one: the API listeners
    /// for proxyless gRPC clients, which a sidecar has no use for.
    pub named_only: std::collections::BTreeSet<String>,
}

/// The four resource sets for a mesh.
pub fn translate(mesh: &Mesh) -> [(&'static str, Resources); 4] {
    // Every service and route carries its whole policy, defaults included, so that every
    // client is protected the same way whatever its own defaults are.
    let with_defaults = Mesh {
        services: mesh
            .services
            .iter()
            .map(|(name, s)| (name.clone(), s.with_defaults(&mesh.defaults)))
            .collect(),
        ..mesh.clone()
    };
    let mut with_defaults = with_defaults;
    // A strict service takes only mTLS: its callers must originate it.
    for s in with_defaults.services.values_mut() {
        if inbound_mode(mesh, s) == Some(TlsMode::Strict) {
            s.mtls = true;
        }
    }
    let mesh = &with_defaults;
    let mut clusters = Resources::default();
    let mut endpoints = Resources::default();
    for service in mesh.services.values() {
        let name = service.cluster_name();
        clusters
            .by_name
            .insert(name.clone(), pack(&cluster_for(service)));
        endpoints
            .by_name
            .insert(name, pack(&load_assignment_for(service)));
    }
    let mut listeners = Resources::default();
    listeners.by_name.insert(
        OUTBOUND.into(),
        pack(&outbound_listener(mesh.outbound_port)),
    );
    let mut routes = Resources::default();
    routes
        .by_name
        .insert(OUTBOUND.into(), pack(&outbound_routes(mesh)));
    // Consumer routes: the outbound table as the callers of one namespace see it, sent in
    // place of `outbound` to a node of that namespace (`Snapshot::view_for`).
    let consumers: std::collections::BTreeSet<&String> = mesh
        .services
        .values()
        .flat_map(|s| s.consumer_routes.keys())
        .collect();
    for ns in consumers {
        let seen_from = Mesh {
            services: mesh
                .services
                .iter()
                .map(|(name, s)| {
                    let mut s = s.clone();
                    if let Some(routes) = s.consumer_routes.get(ns) {
                        s.routes = routes.clone();
                        s.only_routes = true;
                    }
                    (name.clone(), s)
                })
                .collect(),
            ..mesh.clone()
        };
        let name = consumer_table(ns);
        routes
            .by_name
            .insert(name.clone(), pack(&outbound_routes(&seen_from)));
        routes.named_only.insert(name);
        // And each such service's own table, which proxyless gRPC clients ask for.
        for s in seen_from.services.values() {
            if s.consumer_routes.contains_key(ns) {
                let route_name = s.cluster_name();
                let name = consumer_of(&route_name, ns);
                routes
                    .by_name
                    .insert(name.clone(), pack(&service_routes(s, &route_name)));
                routes.named_only.insert(name);
            }
        }
    }
    // Each service's inbound policy, for its own sidecars only.
    for service in mesh.services.values() {
        if let Some(inbound) = inbound_policy(mesh, service) {
            let address = INBOUND_ADDRESS.parse().expect("a socket address");
            let name = inbound_of(&service.cluster_name());
            listeners.by_name.insert(
                name.clone(),
                pack(&xds_inbound::inbound_listener(
                    INBOUND,
                    address,
                    &inbound,
                    service.app_port(),
                )),
            );
            listeners.named_only.insert(name);
        }
    }
    // Proxyless gRPC: `xds:///<host>` asks for a listener named exactly `<host>`.
    for service in mesh.services.values() {
        let route_name = service.cluster_name();
        for host in service.hostnames() {
            listeners
                .by_name
                .insert(host.clone(), pack(&api_listener(&host, &route_name)));
            listeners.named_only.insert(host);
        }
        routes.by_name.insert(
            route_name.clone(),
            pack(&service_routes(service, &route_name)),
        );
        routes.named_only.insert(route_name);
    }
    [
        (CLUSTER_TYPE, clusters),
        (ENDPOINT_TYPE, endpoints),
        (LISTENER_TYPE, listeners),
        (ROUTE_TYPE, routes),
    ]
}

/// A service's inbound mTLS mode: its own, else its namespace's.
pub fn inbound_mode(mesh: &Mesh, s: &Service) -> Option<TlsMode> {
    s.tls_mode
        .or_else(|| mesh.namespace_tls.get(&s.namespace).copied())
}

/// What a service's sidecars are told about their inbound side, if the mesh says anything.
/// Authorization without a mode says permissive: the sidecar keeps the stricter of that and
/// its own.
pub fn inbound_policy(mesh: &Mesh, s: &Service) -> Option<Inbound> {
    let mode = inbound_mode(mesh, s);
    if mode.is_none() && s.authorization.is_none() {
        return None;
    }
    Some(Inbound {
        mode: mode.unwrap_or(TlsMode::Permissive),
        authorization: s.authorization.clone(),
    })
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn duration(d: std::time::Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn socket_address(addr: std::net::SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(addr.port() as u32)),
            ..Default::default()
        })),
    }
}

fn cluster_for(service: &Service) -> Cluster {
    let mut c = Cluster {
        name: service.cluster_name(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(duration(std::time::Duration::from_secs(1))),
        // Least-request (power-of-two-choices over outstanding requests, the nearest built-in
        // to our peak-EWMA balancer) where the client has it, else round robin: every client
        // takes the first policy of the list it supports. gRPC NACKs `lb_policy: LEAST_REQUEST`.
        load_balancing_policy: Some(LoadBalancingPolicy {
            policies: vec![
                lb_policy(
                    "envoy.load_balancing_policies.least_request",
                    pack(&LeastRequest::default()),
                ),
                lb_policy(
                    "envoy.load_balancing_policies.round_robin",
                    pack(&RoundRobin::default()),
                ),
            ],
        }),
        circuit_breakers: service
            .policy
            .circuit_breaker
            .as_ref()
            .map(policy::circuit_breakers),
        outlier_detection: service
            .policy
            .outlier
            .as_ref()
            .map(policy::outlier_detection),
        ..Default::default()
    };
    if service.mtls {
        c.transport_socket = Some(outrigger_core::xds_tls::upstream_mtls(&[service
            .identity
            .to_string()]));
    }
    if service.protocol == Protocol::Tcp {
        c.metadata = Some(opaque_metadata());
    }
    // Sidecars talk HTTP/2 to each other over mTLS (the TLS context offers only `h2`), and
    // an Envoy caller must say so too.
    if service.protocol.is_http2() || service.mtls {
        let options = HttpProtocolOptions {
            upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                        Http2ProtocolOptions::default(),
                    )),
                },
            )),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            pack(&options),
        );
    }
    c
}

/// What tells our proxy the cluster is opaque TCP (`outrigger_core::xds::CLUSTER_METADATA`).
fn opaque_metadata() -> Metadata {
    let protocol = ProtoValue {
        kind: Some(value::Kind::StringValue(
            outrigger_core::xds::OPAQUE_PROTOCOL.into(),
        )),
    };
    let fields = [("protocol".to_string(), protocol)].into_iter().collect();
    Metadata {
        filter_metadata: [(
            outrigger_core::xds::CLUSTER_METADATA.to_string(),
            Struct { fields },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

fn lb_policy(name: &str, config: Any) -> load_balancing_policy::Policy {
    load_balancing_policy::Policy {
        typed_extension_config: Some(TypedExtensionConfig {
            name: name.into(),
            typed_config: Some(config),
        }),
    }
}

/// A service's ClusterLoadAssignment, as `translate` makes it.
pub fn endpoints_of(service: &Service) -> Any {
    pack(&load_assignment_for(service))
}

fn load_assignment_for(service: &Service) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: service.cluster_name(),
        endpoints: vec![LocalityLbEndpoints {
            locality: Some(Locality::default()),
            // gRPC clients silently drop a locality without a weight.
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            lb_endpoints: service
                .endpoints
                .iter()
                .map(|(addr, weight)| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket_address(*addr)),
                        ..Default::default()
                    })),
                    load_balancing_weight: Some(UInt32Value { value: *weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An HTTP connection manager that loads `route_name` over ADS, with the router filter last
/// (gRPC clients insist on it). The local rate limit filter is there for routes that carry a
/// limit; on its own it limits nothing, and it is optional for clients that lack it.
fn http_connection_manager(stat_prefix: &str, route_name: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: stat_prefix.into(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_name.into(),
        })),
        http_filters: vec![
            HttpFilter {
                name: policy::LOCAL_RATE_LIMIT_FILTER.into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack(
                    &LocalRateLimit {
                        stat_prefix: "local_rate_limit".into(),
                        ..Default::default()
                    },
                ))),
                is_optional: true,
                ..Default::default()
            },
            HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack(
                    &Router::default(),
                ))),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

fn api_listener(host: &str, route_name: &str) -> Listener {
    Listener {
        name: host.into(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack(&http_connection_manager(host, route_name))),
        }),
        ..Default::default()
    }
}

/// One service's routes on their own, for proxyless clients of that service.
fn service_routes(service: &Service, route_name: &str) -> RouteConfiguration {
    let mut vhost = virtual_host(service);
    vhost.domains = vec!["*".into()];
    RouteConfiguration {
        name: route_name.into(),
        virtual_hosts: vec![vhost],
        ..Default::default()
    }
}

fn outbound_listener(port: u16) -> Listener {
    let hcm = http_connection_manager(OUTBOUND, OUTBOUND);
    Listener {
        name: OUTBOUND.into(),
        address: Some(socket_address(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            port,
        )))),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn outbound_routes(mesh: &Mesh) -> RouteConfiguration {
    let mut virtual_hosts: Vec<VirtualHost> = mesh.services.values().map(virtual_host).collect();
    // The mesh's sampling ratio rides every route, in Envoy's own field.
    if let Some(ratio) = mesh.sampling {
        let tracing = envoy_types::pb::envoy::config::route::v3::Tracing {
            random_sampling: Some(envoy_types::pb::envoy::r#type::v3::FractionalPercent {
                numerator: (ratio * 1_000_000.0).round() as u32,
                denominator:
                    envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType::Million
                        as i32,
            }),
            ..Default::default()
        };
        for route in virtual_hosts.iter_mut().flat_map(|vh| vh.routes.iter_mut()) {
            route.tracing = Some(tracing.clone());
        }
    }
    RouteConfiguration {
        name: OUTBOUND.into(),
        virtual_hosts,
        ..Default::default()
    }
}

fn virtual_host(s: &Service) -> VirtualHost {
    let mut routes: Vec<EnvoyRoute> = s.routes.iter().map(route_for).collect();
    if s.only_routes {
        // No route matched: 404, from every client.
        return VirtualHost {
            name: s.cluster_name(),
            domains: s.hostnames(),
            routes,
            ..Default::default()
        };
    }
    // Whatever no route matched goes to the service itself.
    routes.push(EnvoyRoute {
        name: format!("{}/default", s.name),
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(s.cluster_name())),
            retry_policy: s.policy.retry.as_ref().map(policy::retry_policy),
            ..Default::default()
        })),
        typed_per_filter_config: rate_limit_config(s.policy.rate_limit.as_ref()),
        ..Default::default()
    });
    VirtualHost {
        name: s.cluster_name(),
        domains: s.hostnames(),
        routes,
        ..Default::default()
    }
}

fn route_for(r: &crate::mesh::Route) -> EnvoyRoute {
    let path_specifier = match &r.path {
        PathMatch::Exact(p) => route_match::PathSpecifier::Path(p.clone()),
        PathMatch::Prefix(p) => route_match::PathSpecifier::Prefix(p.clone()),
        PathMatch::SegmentPrefix(p) => match p.trim_end_matches('/') {
            "" => route_match::PathSpecifier::Prefix("/".into()),
            p => route_match::PathSpecifier::PathSeparatedPrefix(p.to_string()),
        },
        PathMatch::Regex(re) => route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: re.clone(),
            ..Default::default()
        }),
    };
    let header = |name: &str, value: &ValueMatch| HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            string_match(value),
        )),
        ..Default::default()
    };
    // Envoy matches the method as the `:method` pseudo-header.
    let method = r
        .method
        .iter()
        .map(|m| header(":method", &ValueMatch::Exact(m.clone())));
    let headers = r
        .headers
        .iter()
        .map(|(name, value)| header(name, value))
        .chain(method)
        .collect();
    let query_parameters = r
        .query
        .iter()
        .map(|(name, value)| QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: Some(
                query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(string_match(
                    value,
                )),
            ),
        })
        .collect();
    let cluster_specifier = if r.backends.len() == 1 {
        route_action::ClusterSpecifier::Cluster(r.backends[0].0.clone())
    } else {
        route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: r
                .backends
                .iter()
                .map(|(name, weight)| weighted_cluster::ClusterWeight {
                    name: name.clone(),
                    weight: Some(UInt32Value { value: *weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    EnvoyRoute {
        name: r.name.clone(),
        r#match: Some(RouteMatch {
            path_specifier: Some(path_specifier),
            headers,
            query_parameters,
            ..Default::default()
        }),
        request_headers_to_add: header_additions(&r.request_headers),
        request_headers_to_remove: r.request_headers.remove.clone(),
        response_headers_to_add: header_additions(&r.response_headers),
        response_headers_to_remove: r.response_headers.remove.clone(),
        action: Some(match &r.redirect {
            Some(redirect) => route::Action::Redirect(redirect_action(redirect, &r.path)),
            None => route::Action::Route(RouteAction {
                cluster_specifier: Some(cluster_specifier),
                timeout: r.timeout.map(duration),
                retry_policy: r.retry.as_ref().map(policy::retry_policy),
                regex_rewrite: r
                    .rewrite
                    .as_ref()
                    .and_then(|w| w.path.as_ref())
                    .map(|p| path_substitution(p, &r.path)),
                host_rewrite_specifier: r.rewrite.as_ref().and_then(|w| {
                    w.host
                        .clone()
                        .map(route_action::HostRewriteSpecifier::HostRewriteLiteral)
                }),
                request_mirror_policies: r
                    .mirrors
                    .iter()
                    .map(|(cluster, percent)| mirror_policy(cluster, *percent))
                    .collect(),
                ..Default::default()
            }),
        }),
        typed_per_filter_config: rate_limit_config(r.rate_limit.as_ref()),
        ..Default::default()
    }
}

/// A path change as a regex substitution, which Envoy and our proxy apply alike. Replacing a
/// prefix this way (rather than with `prefix_rewrite`) keeps Gateway API's meaning at the
/// edges: `/api` → `/` turns `/api/x` into `/x`, not `//x`.
fn path_substitution(modifier: &PathModifier, matched: &PathMatch) -> RegexMatchAndSubstitute {
    let (pattern, substitution) = match (modifier, matched) {
        (PathModifier::Prefix(to), PathMatch::Prefix(from) | PathMatch::SegmentPrefix(from)) => {
            let from = regex::escape(from.trim_end_matches('/'));
            match to.trim_end_matches('/') {
                "" => (format!("^{from}/*(.*)$"), r"/\1".to_string()),
                to => (format!("^{from}(/.*)?$"), format!(r"{to}\1")),
            }
        }
        // Anything else replaces the whole path (a prefix change on a route without a
        // prefix is refused before it gets here).
        (PathModifier::Full(to) | PathModifier::Prefix(to), _) => {
            ("^.*$".to_string(), to.replace('\\', r"\\"))
        }
    };
    RegexMatchAndSubstitute {
        pattern: Some(RegexMatcher {
            regex: pattern,
            ..Default::default()
        }),
        substitution,
    }
}

/// A copy of `percent` of requests to `cluster`, keeping the Host (no `-shadow` suffix: our
/// proxy sends the copy as it is, and both clients should do the same).
fn mirror_policy(cluster: &str, percent: f64) -> route_action::RequestMirrorPolicy {
    use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
    route_action::RequestMirrorPolicy {
        cluster: cluster.to_string(),
        runtime_fraction: Some(RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: (percent.clamp(0.0, 100.0) * 10_000.0).round() as u32,
                denominator: fractional_percent::DenominatorType::Million as i32,
            }),
            ..Default::default()
        }),
        disable_shadow_host_suffix_append: true,
        ..Default::default()
    }
}

fn redirect_action(redirect: &Redirect, matched: &PathMatch) -> RedirectAction {
    use redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier};
    let code = match redirect.status {
        301 => RedirectResponseCode::MovedPermanently,
        303 => RedirectResponseCode::SeeOther,
        307 => RedirectResponseCode::TemporaryRedirect,
        308 => RedirectResponseCode::PermanentRedirect,
        _ => RedirectResponseCode::Found,
    };
    RedirectAction {
        host_redirect: redirect.host.clone().unwrap_or_default(),
        port_redirect: redirect.port.map_or(0, u32::from),
        response_code: code as i32,
        scheme_rewrite_specifier: redirect
            .scheme
            .clone()
            .map(SchemeRewriteSpecifier::SchemeRedirect),
        path_rewrite_specifier: redirect.path.as_ref().map(|p| match p {
            PathModifier::Full(to) => PathRewriteSpecifier::PathRedirect(to.clone()),
            PathModifier::Prefix(_) => {
                PathRewriteSpecifier::RegexRewrite(path_substitution(p, matched))
            }
        }),
        ..Default::default()
    }
}

fn string_match(value: &ValueMatch) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(match value {
            ValueMatch::Exact(v) => string_matcher::MatchPattern::Exact(v.clone()),
            ValueMatch::Regex(re) => string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                regex: re.clone(),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// `set` overwrites, `add` appends: Envoy's append actions say which.
fn header_additions(changes: &HeaderChanges) -> Vec<HeaderValueOption> {
    use header_value_option::HeaderAppendAction;
    let option = |(name, value): &(String, String), action: HeaderAppendAction| HeaderValueOption {
        header: Some(HeaderValue {
            key: name.clone(),
            value: value.clone(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    };
    let set = changes
        .set
        .iter()
        .map(|h| option(h, HeaderAppendAction::OverwriteIfExistsOrAdd));
    let add = changes
        .add
        .iter()
        .map(|h| option(h, HeaderAppendAction::AppendIfExistsOrAdd));
    set.chain(add).collect()
}

fn rate_limit_config(limit: Option<&policy::RateLimit>) -> std::collections::HashMap<String, Any> {
    limit
        .map(|l| {
            (
                policy::LOCAL_RATE_LIMIT_FILTER.to_string(),
                policy::local_rate_limit(l),
            )
        })
        .into_iter()
        .collect()
}
