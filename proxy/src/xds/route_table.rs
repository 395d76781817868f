//! RouteConfiguration → the proxy's virtual hosts and routes: matches on path, headers,
//! method and query parameters, weighted backends, rewrites and redirects, header changes,
//! timeouts, retries, rate limits, sampling and upgrades. A field outside that subset is
//! refused by name.

use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, RedirectAction, Route, RouteConfiguration, VirtualHost,
    header_matcher, query_parameter_matcher, redirect_action, route, route_action, route_match,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, StringMatcher, string_matcher,
};
use serde_saphyr::Spanned;

use crate::config::file::{
    BackendFile, HeaderChangesFile, HeaderMatchFile, HeaderValueFile, MatchFile, MirrorFile,
    QueryMatchFile, RegexRewriteFile, RouteFile, TargetFile, VirtualHostFile,
};
use crate::xds::tracing;
use outrigger_core::xds::{XdsError, duration_text, refuse, sp};
use outrigger_core::xds_policy as policy_xds;

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

    let action = match &r.action {
        Some(route::Action::Route(action)) => action,
        Some(route::Action::Redirect(redirect)) => {
            return Ok(RouteFile {
                name: Some(name),
                matches: Some(Box::new(matches)),
                backends: Vec::new(),
                mirror: Vec::new(),
                rewrite: None,
                redirect: Some(Box::new(redirect_file(&what, redirect)?)),
                timeout: None,
                request_headers: None,
                response_headers: header_changes(
                    &r.response_headers_to_add,
                    &r.response_headers_to_remove,
                ),
                retry: None,
                rate_limit: policy_xds::route_filters(&what, &r.typed_per_filter_config)?,
                sampling: None,
                upgrades: None,
            });
        }
        _ => {
            return Err(format!(
                "{what}: field `action`: only `route` and `redirect` are supported (not direct_response)"
            )
            .into());
        }
    };
    let host = match &action.host_rewrite_specifier {
        None => None,
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(sp(h.clone())),
        Some(_) => {
            return Err(format!(
                "{what}: field `route.host_rewrite_specifier`: only host_rewrite_literal is supported"
            )
            .into());
        }
    };
    let rewrite = match (&action.prefix_rewrite, &action.regex_rewrite, host) {
        (p, None, None) if p.is_empty() => None,
        (p, regex, host) => Some(Box::new(TargetFile {
            path: None,
            prefix: (!p.is_empty()).then(|| p.clone()),
            regex: regex
                .as_ref()
                .map(|r| regex_rewrite(&what, r))
                .transpose()?,
            host,
            ..Default::default()
        })),
    };
    refuse(
        &what,
        &[
            (!action.hash_policy.is_empty(), "route.hash_policy"),
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
        mirror: action
            .request_mirror_policies
            .iter()
            .map(|m| mirror(&what, m))
            .collect::<Result<_, _>>()?,
        rewrite,
        redirect: None,
        timeout: action
            .timeout
            .as_ref()
            .map(|d| Box::new(sp(duration_text(d)))),
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

/// A mirror that keeps the request's Host: our proxy does not rename the copy, so it takes
/// only policies that say so (`disable_shadow_host_suffix_append`), as ours do.
fn mirror(what: &str, m: &route_action::RequestMirrorPolicy) -> Result<MirrorFile, XdsError> {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    refuse(
        what,
        &[
            (
                !m.cluster_header.is_empty(),
                "request_mirror_policies.cluster_header",
            ),
            (
                !m.request_headers_mutations.is_empty(),
                "request_mirror_policies.request_headers_mutations",
            ),
            (
                !m.disable_shadow_host_suffix_append,
                "request_mirror_policies.disable_shadow_host_suffix_append (only true)",
            ),
        ],
    )?;
    let percent = match m
        .runtime_fraction
        .as_ref()
        .and_then(|f| f.default_value.as_ref())
    {
        None => None,
        Some(f) => {
            let per = match DenominatorType::try_from(f.denominator) {
                Ok(DenominatorType::Hundred) => 100.0,
                Ok(DenominatorType::TenThousand) => 10_000.0,
                Ok(DenominatorType::Million) => 1_000_000.0,
                Err(_) => {
                    return Err(format!("{what}: field `request_mirror_policies.runtime_fraction`: unknown denominator").into());
                }
            };
            Some((f64::from(f.numerator) / per * 100.0).min(100.0))
        }
    };
    Ok(MirrorFile {
        cluster: sp(m.cluster.clone()),
        percent,
    })
}

fn regex_rewrite(what: &str, r: &RegexMatchAndSubstitute) -> Result<RegexRewriteFile, XdsError> {
    let pattern = r
        .pattern
        .as_ref()
        .ok_or_else(|| format!("{what}: field `regex_rewrite.pattern` is required"))?;
    Ok(RegexRewriteFile {
        pattern: sp(pattern.regex.clone()),
        substitution: r.substitution.clone(),
    })
}

fn redirect_file(what: &str, d: &RedirectAction) -> Result<TargetFile, XdsError> {
    use redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier};
    refuse(what, &[(d.strip_query, "redirect.strip_query")])?;
    let scheme = match &d.scheme_rewrite_specifier {
        None => None,
        Some(SchemeRewriteSpecifier::HttpsRedirect(https)) => https.then(|| "https".to_string()),
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.clone()),
    };
    let mut out = TargetFile {
        scheme,
        host: (!d.host_redirect.is_empty()).then(|| sp(d.host_redirect.clone())),
        port: match d.port_redirect {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| {
                format!("{what}: field `redirect.port_redirect`: {p} is not a port")
            })?),
        },
        status: Some(match RedirectResponseCode::try_from(d.response_code) {
            Ok(RedirectResponseCode::MovedPermanently) => 301,
            Ok(RedirectResponseCode::Found) => 302,
            Ok(RedirectResponseCode::SeeOther) => 303,
            Ok(RedirectResponseCode::TemporaryRedirect) => 307,
            Ok(RedirectResponseCode::PermanentRedirect) => 308,
            Err(_) => {
                return Err(format!(
                    "{what}: field `redirect.response_code`: unknown code {}",
                    d.response_code
                )
                .into());
            }
        }),
        ..Default::default()
    };
    match &d.path_rewrite_specifier {
        None => {}
        Some(PathRewriteSpecifier::PathRedirect(p)) => out.path = Some(p.clone()),
        Some(PathRewriteSpecifier::PrefixRewrite(p)) => out.prefix = Some(p.clone()),
        Some(PathRewriteSpecifier::RegexRewrite(r)) => out.regex = Some(regex_rewrite(what, r)?),
        Some(_) => {
            return Err(format!("{what}: field `redirect.path_rewrite_specifier`: only path_redirect, prefix_rewrite and regex_rewrite are supported").into());
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
fn header_changes(add: &[HeaderValueOption], remove: &[String]) -> Option<Box<HeaderChangesFile>> {
    if add.is_empty() && remove.is_empty() {
        return None;
    }
    use header_value_option::HeaderAppendAction;
    let value = |h: &HeaderValue| HeaderValueFile {
        name: sp(h.key.clone()),
        value: sp(h.value.clone()),
    };
    let overwrites = |o: &&HeaderValueOption| {
        o.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32
    };
    Some(Box::new(HeaderChangesFile {
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
    }))
}
