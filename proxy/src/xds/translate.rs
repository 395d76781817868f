//! Envoy v3 resources → the proxy's config model (the same one the YAML file produces), so
//! xDS config passes through exactly the same validation as a file.
//!
//! The proxy supports a declared subset of each resource. A field outside that subset that
//! would change behaviour is refused with an error naming it, which the client sends back as
//! a NACK; it is never silently ignored.

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, address, header_value_option, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, Route, RouteConfiguration, VirtualHost, header_matcher,
    query_parameter_matcher, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use serde_saphyr::Spanned;

use crate::config::file::{
    BackendFile, ClusterFile, ClusterTlsFile, EndpointFile, HeaderChangesFile, HeaderMatchFile,
    HeaderValueFile, LbPolicy, MatchFile, QueryMatchFile, RouteFile, UpstreamProtocol,
    VirtualHostFile,
};
use crate::xds::tracing;
use outrigger_core::xds_policy as policy_xds;

pub use outrigger_core::xds::{XdsError, decode, duration_text, refuse, sp};

pub struct TranslatedCluster {
    pub file: ClusterFile,
    /// True when endpoints come from EDS (under the cluster's or its service name).
    pub eds_name: Option<String>,
}

pub fn cluster(c: &Cluster) -> Result<TranslatedCluster, XdsError> {
    let what = format!("Cluster {}", c.name);
    refuse(
        &what,
        &[
            (
                !c.transport_socket_matches.is_empty(),
                "transport_socket_matches",
            ),
            (!c.health_checks.is_empty(), "health_checks"),
            (c.lb_subset_config.is_some(), "lb_subset_config"),
            (
                c.upstream_connection_options.is_some(),
                "upstream_connection_options",
            ),
        ],
    )?;
    let (retry_budget, circuit_breaker) = match &c.circuit_breakers {
        None => (None, None),
        Some(cb) => policy_xds::thresholds(&what, cb)?,
    };
    let eds_name = match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t))
            if *t == cluster::DiscoveryType::Eds as i32 =>
        {
            let service = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .unwrap_or_default();
            Some(if service.is_empty() {
                c.name.clone()
            } else {
                service
            })
        }
        Some(cluster::ClusterDiscoveryType::Type(t))
            if *t == cluster::DiscoveryType::Static as i32 =>
        {
            None
        }
        _ => {
            return Err(format!(
                "{what}: field `type`: only EDS and STATIC clusters are supported"
            )
            .into());
        }
    };
    let lb = match &c.load_balancing_policy {
        Some(policy) => policy
            .policies
            .iter()
            .find_map(|p| {
                let url = p
                    .typed_extension_config
                    .as_ref()?
                    .typed_config
                    .as_ref()?
                    .type_url
                    .as_str();
                if url.ends_with(".least_request.v3.LeastRequest") {
                    Some(LbPolicy::PeakEwma)
                } else if url.ends_with(".round_robin.v3.RoundRobin") {
                    Some(LbPolicy::RoundRobin)
                } else {
                    None
                }
            })
            .ok_or_else(|| {
                format!("{what}: field `load_balancing_policy`: no policy this proxy supports")
            })?,
        None if c.lb_policy == cluster::LbPolicy::LeastRequest as i32 => LbPolicy::PeakEwma,
        None if c.lb_policy == cluster::LbPolicy::RoundRobin as i32 => LbPolicy::RoundRobin,
        None => {
            return Err(format!(
                "{what}: field `lb_policy`: only ROUND_ROBIN and LEAST_REQUEST are supported"
            )
            .into());
        }
    };
    let mut protocol = UpstreamProtocol::Http1;
    for (key, any) in &c.typed_extension_protocol_options {
        if key != "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" {
            return Err(format!(
                "{what}: field `typed_extension_protocol_options[{key}]` is not supported"
            )
            .into());
        }
        let options: HttpProtocolOptions = decode(any).map_err(|e| format!("{what}: {e}"))?;
        match options.upstream_protocol_options {
            Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) => {
                if let Some(http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_)) =
                    explicit.protocol_config
                {
                    protocol = UpstreamProtocol::Http2;
                }
            }
            None => {}
            Some(_) => {
                return Err(format!("{what}: field `upstream_protocol_options`: only explicit_http_config is supported").into());
            }
        }
    }
    let endpoints = match (&eds_name, &c.load_assignment) {
        (None, Some(cla)) => endpoints(cla)?,
        _ => Vec::new(),
    };
    Ok(TranslatedCluster {
        file: ClusterFile {
            name: sp(c.name.clone()),
            protocol,
            lb,
            connect_timeout: c.connect_timeout.as_ref().map(|d| sp(duration_text(d))),
            endpoints,
            retry_budget,
            circuit_breaker,
            outlier: match &c.outlier_detection {
                Some(o) => Some(policy_xds::outlier(&what, o)?),
                None => None,
            },
            tls: match &c.transport_socket {
                Some(ts) => Some(ClusterTlsFile {
                    identities: outrigger_core::xds_tls::peer_identities(&what, ts)?
                        .into_iter()
                        .map(sp)
                        .collect(),
                }),
                None => None,
            },
        },
        eds_name,
    })
}

pub fn endpoints(cla: &ClusterLoadAssignment) -> Result<Vec<EndpointFile>, XdsError> {
    let mut out = Vec::new();
    for locality in &cla.endpoints {
        for lb in &locality.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &lb.host_identifier else {
                return Err(format!(
                    "ClusterLoadAssignment {}: only endpoints with an address are supported",
                    cla.cluster_name
                )
                .into());
            };
            let Some(address::Address::SocketAddress(sa)) =
                e.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                return Err(format!(
                    "ClusterLoadAssignment {}: only socket addresses are supported",
                    cla.cluster_name
                )
                .into());
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                return Err(format!(
                    "ClusterLoadAssignment {}: a named port is not supported",
                    cla.cluster_name
                )
                .into());
            };
            let addr = if sa.address.contains(':') {
                format!("[{}]:{port}", sa.address)
            } else {
                format!("{}:{port}", sa.address)
            };
            out.push(EndpointFile { address: sp(addr) });
        }
    }
    Ok(out)
}

/// A route's `upgrade_configs`: WebSocket may be turned on or off; nothing else is taken.
/// Without any, the proxy's default holds (WebSocket on).
fn upgrades(
    what: &str,
    configs: &[route_action::UpgradeConfig],
) -> Result<Option<Vec<Spanned<String>>>, XdsError> {
    if configs.is_empty() {
        return Ok(None);
    }
    let mut allowed = Vec::new();
    for c in configs {
        if !c.upgrade_type.eq_ignore_ascii_case("websocket") || c.connect_config.is_some() {
            return Err(format!(
                "{what}: field `route.upgrade_configs`: only `websocket` is supported, not `{}`",
                c.upgrade_type
            )
            .into());
        }
        if c.enabled.as_ref().is_none_or(|e| e.value) {
            allowed.push(sp("websocket".to_string()));
        }
    }
    Ok(Some(allowed))
}

pub fn route_table(rc: &RouteConfiguration) -> Result<Vec<VirtualHostFile>, XdsError> {
    let what = format!("RouteConfiguration {}", rc.name);
    refuse(
        &what,
        &[
            (
                !rc.request_headers_to_add.is_empty(),
                "request_headers_to_add",
            ),
            (
                !rc.response_headers_to_add.is_empty(),
                "response_headers_to_add",
            ),
            (
                !rc.typed_per_filter_config.is_empty(),
                "typed_per_filter_config",
            ),
        ],
    )?;
    rc.virtual_hosts
        .iter()
        .map(|vh| virtual_host(&what, vh))
        .collect()
}

fn virtual_host(what: &str, vh: &VirtualHost) -> Result<VirtualHostFile, XdsError> {
    let what = format!("{what} virtual_host {}", vh.name);
    refuse(
        &what,
        &[
            (vh.require_tls != 0, "require_tls"),
            (vh.retry_policy.is_some(), "retry_policy"),
            (!vh.rate_limits.is_empty(), "rate_limits"),
            (
                !vh.request_headers_to_add.is_empty(),
                "request_headers_to_add",
            ),
            (
                !vh.response_headers_to_add.is_empty(),
                "response_headers_to_add",
            ),
            (
                !vh.typed_per_filter_config.is_empty(),
                "typed_per_filter_config",
            ),
        ],
    )?;
    let routes = vh
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| route(&what, &vh.name, i, r))
        .collect::<Result<_, _>>()?;
    Ok(VirtualHostFile {
        name: vh.name.clone(),
        domains: vh.domains.clone(),
        routes,
    })
}

fn route(what: &str, vhost: &str, index: usize, r: &Route) -> Result<RouteFile, XdsError> {
    let name = if r.name.is_empty() {
        format!("{vhost}/{index}")
    } else {
        r.name.clone()
    };
    let what = format!("{what} route {name}");
    refuse(&what, &[(r.decorator.is_some(), "decorator")])?;
    let m = r
        .r#match
        .as_ref()
        .ok_or_else(|| format!("{what}: field `match` is required"))?;
    refuse(
        &what,
        &[
            (
                m.case_sensitive.as_ref().is_some_and(|b| !b.value),
                "match.case_sensitive",
            ),
            (m.runtime_fraction.is_some(), "match.runtime_fraction"),
            (m.grpc.is_some(), "match.grpc"),
            (m.tls_context.is_some(), "match.tls_context"),
            (!m.dynamic_metadata.is_empty(), "match.dynamic_metadata"),
        ],
    )?;
    let mut matches = MatchFile::default();
    match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) => matches.prefix = Some(p.clone()),
        Some(route_match::PathSpecifier::Path(p)) => matches.exact = Some(p.clone()),
        Some(route_match::PathSpecifier::PathSeparatedPrefix(p)) => {
            matches.segment_prefix = Some(p.clone())
        }
        Some(route_match::PathSpecifier::SafeRegex(re)) => {
            matches.regex = Some(sp(re.regex.clone()))
        }
        _ => {
            return Err(format!(
                "{what}: field `match.path_specifier`: only prefix, path, path_separated_prefix and safe_regex are supported"
            ).into());
        }
    }
    for h in &m.headers {
        // Envoy matches the method as the `:method` pseudo-header.
        if h.name == ":method" {
            matches.methods.push(sp(method_match(&what, h)?));
        } else {
            matches.headers.push(header_match(&what, h)?);
        }
    }
    matches.query = m
        .query_parameters
        .iter()
        .map(|q| query_match(&what, q))
        .collect::<Result<_, _>>()?;

    let Some(route::Action::Route(action)) = &r.action else {
        return Err(format!(
            "{what}: field `action`: only `route` is supported (not redirect or direct_response)"
        )
        .into());
    };
    refuse(
        &what,
        &[
            (!action.prefix_rewrite.is_empty(), "route.prefix_rewrite"),
            (action.regex_rewrite.is_some(), "route.regex_rewrite"),
            (
                action.host_rewrite_specifier.is_some(),
                "route.host_rewrite_specifier",
            ),
            (!action.hash_policy.is_empty(), "route.hash_policy"),
            (
                !action.request_mirror_policies.is_empty(),
                "route.request_mirror_policies",
            ),
            (action.idle_timeout.is_some(), "route.idle_timeout"),
            (
                action.max_stream_duration.is_some(),
                "route.max_stream_duration",
            ),
            (!action.rate_limits.is_empty(), "route.rate_limits"),
        ],
    )?;
    let backends = match &action.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => vec![BackendFile {
            cluster: sp(c.clone()),
            weight: 1,
        }],
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
            .clusters
            .iter()
            .map(|c| BackendFile {
                cluster: sp(c.name.clone()),
                weight: c.weight.as_ref().map_or(1, |w| w.value),
            })
            .collect(),
        _ => {
            return Err(format!(
                "{what}: field `route.cluster_specifier`: only cluster and weighted_clusters are supported"
            ).into());
        }
    };
    Ok(RouteFile {
        name: Some(name),
        matches: Some(Box::new(matches)),
        backends,
        timeout: action.timeout.as_ref().map(|d| sp(duration_text(d))),
        request_headers: header_changes(&r.request_headers_to_add, &r.request_headers_to_remove),
        response_headers: header_changes(&r.response_headers_to_add, &r.response_headers_to_remove),
        retry: match &action.retry_policy {
            Some(p) => Some(Box::new(policy_xds::retry(&what, p)?)),
            None => None,
        },
        rate_limit: policy_xds::route_filters(&what, &r.typed_per_filter_config)?,
        sampling: match &r.tracing {
            Some(t) => tracing::route_sampling(&what, t)?,
            None => None,
        },
        upgrades: upgrades(&what, &action.upgrade_configs)?,
    })
}

fn header_match(what: &str, h: &HeaderMatcher) -> Result<HeaderMatchFile, XdsError> {
    if h.invert_match {
        return Err(format!("{what}: field `match.headers.invert_match` is not supported").into());
    }
    let mut out = HeaderMatchFile {
        name: sp(h.name.clone()),
        exact: None,
        regex: None,
        present: None,
    };
    match &h.header_match_specifier {
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(p)) => out.present = Some(*p),
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(s)) if !s.ignore_case => {
            match &s.match_pattern {
                Some(string_matcher::MatchPattern::Exact(v)) => out.exact = Some(v.clone()),
                Some(string_matcher::MatchPattern::SafeRegex(re)) => {
                    out.regex = Some(sp(re.regex.clone()))
                }
                _ => {
                    return Err(format!(
                        "{what}: header `{}`: only exact and safe_regex string matches are supported",
                        h.name
                    ).into());
                }
            }
        }
        _ => {
            return Err(format!(
                "{what}: header `{}`: only present and string matches are supported",
                h.name
            )
            .into());
        }
    }
    Ok(out)
}

fn method_match(what: &str, h: &HeaderMatcher) -> Result<String, XdsError> {
    match &h.header_match_specifier {
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(method)),
            ignore_case: false,
        })) if !h.invert_match => Ok(method.clone()),
        _ => Err(format!("{what}: header `:method`: only an exact match is supported").into()),
    }
}

fn query_match(what: &str, q: &QueryParameterMatcher) -> Result<QueryMatchFile, XdsError> {
    let mut out = QueryMatchFile {
        name: sp(q.name.clone()),
        exact: None,
        regex: None,
    };
    match &q.query_parameter_match_specifier {
        Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(s))
            if !s.ignore_case =>
        {
            match &s.match_pattern {
                Some(string_matcher::MatchPattern::Exact(v)) => out.exact = Some(v.clone()),
                Some(string_matcher::MatchPattern::SafeRegex(re)) => {
                    out.regex = Some(sp(re.regex.clone()))
                }
                _ => return Err(format!(
                    "{what}: query parameter `{}`: only exact and safe_regex matches are supported",
                    q.name
                )
                .into()),
            }
        }
        _ => {
            return Err(format!(
                "{what}: field `match.query_parameters` `{}`: only string matches are supported",
                q.name
            )
            .into());
        }
    }
    Ok(out)
}

/// Envoy's header additions: those that overwrite are `set`, those that append are `add`.
fn header_changes(add: &[HeaderValueOption], remove: &[String]) -> HeaderChangesFile {
    use header_value_option::HeaderAppendAction;
    let value = |h: &HeaderValue| HeaderValueFile {
        name: sp(h.key.clone()),
        value: sp(h.value.clone()),
    };
    let overwrites = |o: &&HeaderValueOption| {
        o.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32
    };
    HeaderChangesFile {
        set: add
            .iter()
            .filter(overwrites)
            .filter_map(|o| o.header.as_ref())
            .map(value)
            .collect(),
        add: add
            .iter()
            .filter(|o| !overwrites(o))
            .filter_map(|o| o.header.as_ref())
            .map(value)
            .collect(),
        remove: remove.iter().map(|r| sp(r.clone())).collect(),
    }
}
