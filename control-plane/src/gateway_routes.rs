//! HTTPRoutes attached to Services (Gateway API for the mesh, GAMMA) become the routes of
//! the mesh services they name, in the same model as the mesh file's routes.
//!
//! - A route's `parentRefs` name a Service (`group: ""`, `kind: Service`), optionally one of
//!   its ports; without a port it applies to every port.
//! - A route in the Service's own namespace is a producer route, for every caller; one in
//!   another namespace is a consumer route, for the callers in its own namespace only, in
//!   place of the producer's (GAMMA).
//! - A route's backends are Services of its own namespace, the Service it is attached to, or
//!   Services whose namespace grants the route's kind and namespace with a ReferenceGrant.
//! - Matches on path, headers, query parameters and method, weighted backends, timeouts,
//!   retries and the two header modifier filters are honoured.
//! - Each match of each rule becomes one mesh route; they are ordered by Gateway API's
//!   precedence (exact path, longest prefix, method, most headers, most query parameters,
//!   oldest route, then name), and a request no rule matches gets 404.
//! - A route that uses anything this version cannot honour is not applied at all; its
//!   outcome names the field, for `/status` and the route's status.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;

use outrigger_core::policy::{self, Retry};

use crate::gateway_api::{
    GrpcRoute, HeaderModifier, HttpBackendRef, HttpPathModifier, HttpRoute, HttpRouteMatch,
    HttpRouteRule, HttpValueMatch, ParentRef, ReferenceGrant, RequestMirror, RequestRedirect,
    UrlRewrite, parse_duration,
};
use crate::mesh::{
    HeaderChanges, PathMatch, PathModifier, Protocol, Redirect, Rewrite, Route, Service, ValueMatch,
};

/// What became of one route on one parent, as the status conditions say it.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub parent: ParentRef,
    /// `Accepted`: `Ok`, or the reason and a message.
    pub accepted: Result<(), (&'static str, String)>,
    /// `ResolvedRefs`: every backend exists and may be referenced.
    pub resolved_refs: Result<(), (&'static str, String)>,
}

impl Outcome {
    /// As `/status` shows it: each condition `true`, or its reason and message.
    pub fn to_json(&self) -> serde_json::Value {
        let condition = |c: &Result<(), (&'static str, String)>| match c {
            Ok(()) => serde_json::json!(true),
            Err((reason, message)) => serde_json::json!({"reason": reason, "message": message}),
        };
        serde_json::json!({
            "parent": self.parent,
            "accepted": condition(&self.accepted),
            "resolved_refs": condition(&self.resolved_refs),
        })
    }
}

/// The outcomes of one route, keyed `namespace/name`, with the generation they describe.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteOutcomes(pub BTreeMap<String, (i64, Vec<Outcome>)>);

/// What a route may send to outside its own namespace: the Service it is attached to, and
/// Services whose namespace grants it with a ReferenceGrant.
#[derive(Clone, Copy)]
struct Refs<'a> {
    parent: (&'a str, &'a str),
    /// `HTTPRoute` or `GRPCRoute`, as a grant names it.
    kind: &'static str,
    grants: &'a [Arc<ReferenceGrant>],
}

/// A mesh route with what orders it among the others.
struct Ranked {
    route: Route,
    rank: Rank,
    age: (String, String),
    order: usize,
}

/// What became of the HTTPRoutes, and of the GRPCRoutes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcomes {
    pub http: RouteOutcomes,
    pub grpc: RouteOutcomes,
}

/// Attaches `http` and `grpc` routes to `services` (those the cluster gave), and says what
/// became of each. A GRPCRoute is read as the HTTPRoute it amounts to; the Services it sends
/// to speak gRPC (HTTP/2) unless their port says otherwise.
pub fn attach(
    services: &mut [Service],
    http: &[Arc<HttpRoute>],
    grpc: &[Arc<GrpcRoute>],
    grants: &[Arc<ReferenceGrant>],
) -> Outcomes {
    let grpc_as_http: Vec<Arc<HttpRoute>> = grpc.iter().map(|g| Arc::new(g.as_http())).collect();
    let mut grpc_backends = std::collections::BTreeSet::new();
    // By (cluster, the consumer namespace for a consumer route).
    let mut attached: BTreeMap<(String, Option<String>), Vec<Ranked>> = BTreeMap::new();
    let mut order = 0;
    let tagged = http
        .iter()
        .map(|r| (false, r))
        .chain(grpc_as_http.iter().map(|r| (true, r)));
    let mut outcomes = Outcomes::default();
    for (is_grpc, route) in tagged {
        let namespace = route.metadata.namespace.clone().unwrap_or_default();
        let name = route.metadata.name.clone().unwrap_or_default();
        let created = route
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        let mut route_outcomes = Vec::new();
        if let Some((why, _)) = &route.spec.invalid {
            // Not a route this mesh can read at all: refused against each Service it names.
            for parent in route
                .spec
                .raw_parents()
                .into_iter()
                .filter(|p| p.is_service())
            {
                let refusal = Err(("UnsupportedValue", format!("spec: {why}")));
                route_outcomes.push(Outcome {
                    parent,
                    accepted: refusal.clone(),
                    resolved_refs: refusal,
                });
            }
        }
        for parent in route.spec.parent_refs.iter().filter(|p| p.is_service()) {
            let parent_ns = parent
                .namespace
                .clone()
                .unwrap_or_else(|| namespace.clone());
            let targets: Vec<usize> = services
                .iter()
                .enumerate()
                .filter(|(_, s)| s.name == parent.name && s.namespace == parent_ns)
                .filter(|(_, s)| parent.port.is_none_or(|p| i32::from(s.port) == p))
                .map(|(i, _)| i)
                .collect();
            // A route in another namespace than its Service is a consumer route: for the
            // callers in the route's namespace only.
            let consumer = (parent_ns != namespace).then(|| namespace.clone());
            let accepted = if targets.is_empty() {
                Err((
                    "NoMatchingParent",
                    format!("no Service {parent_ns}/{} with that port", parent.name),
                ))
            } else {
                unsupported(route).map_or(Ok(()), |field| {
                    Err((
                        "UnsupportedValue",
                        format!("{field} is not supported by this version of the mesh"),
                    ))
                })
            };
            let refs = Refs {
                parent: (parent_ns.as_str(), parent.name.as_str()),
                kind: if is_grpc { "GRPCRoute" } else { "HTTPRoute" },
                grants,
            };
            let translated = translate(route, &namespace, refs, services);
            let resolved_refs = translated.as_ref().map(|_| ()).map_err(Clone::clone);
            if accepted.is_ok()
                && let Ok(mesh_routes) = translated
            {
                if is_grpc {
                    grpc_backends.extend(
                        mesh_routes
                            .iter()
                            .flat_map(|(r, _)| r.backends.iter().map(|(c, _)| c.clone())),
                    );
                }
                for target in &targets {
                    let key = (services[*target].cluster_name(), consumer.clone());
                    for (r, rank) in &mesh_routes {
                        order += 1;
                        attached.entry(key.clone()).or_default().push(Ranked {
                            route: r.clone(),
                            rank: *rank,
                            age: (created.clone(), format!("{namespace}/{name}")),
                            order,
                        });
                    }
                }
            }
            route_outcomes.push(Outcome {
                parent: parent.clone(),
                accepted,
                resolved_refs,
            });
        }
        if route_outcomes.is_empty() {
            // Not a mesh route (a Gateway's, say): not ours to report on.
            continue;
        }
        let generation = route.metadata.generation.unwrap_or_default();
        let into = if is_grpc {
            &mut outcomes.grpc
        } else {
            &mut outcomes.http
        };
        into.0
            .insert(format!("{namespace}/{name}"), (generation, route_outcomes));
    }
    let ordered = |mut ranked: Vec<Ranked>| -> Vec<Route> {
        ranked.sort_by(|a, b| (a.rank, &a.age, a.order).cmp(&(b.rank, &b.age, b.order)));
        ranked.into_iter().map(|r| r.route).collect()
    };
    for ((cluster, consumer), ranked) in attached {
        let Some(service) = services.iter_mut().find(|s| s.cluster_name() == cluster) else {
            continue;
        };
        match consumer {
            None => {
                service.routes = ordered(ranked);
                service.only_routes = true;
            }
            Some(ns) => {
                service.consumer_routes.insert(ns, ordered(ranked));
            }
        }
    }
    for service in services.iter_mut() {
        if grpc_backends.contains(&service.cluster_name()) && service.protocol == Protocol::Http {
            service.protocol = Protocol::Grpc;
        }
    }
    outcomes
}

/// The filters a mesh route honours.
const FILTERS: [&str; 5] = [
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
    "RequestMirror",
];

/// The first field of `route` this version cannot honour, by its path in the object.
fn unsupported(route: &HttpRoute) -> Option<String> {
    if let Some(field) = route.spec.unknown.keys().next() {
        return Some(format!("spec.{field}"));
    }
    for (r, rule) in route.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        if let Some(field) = rule.unknown.keys().next() {
            return Some(format!("{at}.{field}"));
        }
        if let Some(f) = rule
            .filters
            .iter()
            .position(|f| !FILTERS.contains(&f.type_.as_str()))
        {
            return Some(format!("{at}.filters[{f}] ({})", rule.filters[f].type_));
        }
        for (m, matched) in rule.matches.iter().enumerate() {
            if let Some(field) = matched.unknown.keys().next() {
                return Some(format!("{at}.matches[{m}].{field}"));
            }
        }
        for (b, backend) in rule.backend_refs.iter().enumerate() {
            if !backend.filters.is_empty() {
                return Some(format!("{at}.backendRefs[{b}].filters"));
            }
        }
    }
    None
}

/// Gateway API's precedence among matches: exact path, then the longest prefix, then a
/// method, the most headers, the most query parameters; smaller sorts first.
type Rank = (u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>);

type Refusal = (&'static str, String);

/// The mesh routes of `route`, each with its precedence, or why its backends do not resolve.
fn translate(
    route: &HttpRoute,
    namespace: &str,
    refs: Refs<'_>,
    services: &[Service],
) -> Result<Vec<(Route, Rank)>, (&'static str, String)> {
    let name = route.metadata.name.as_deref().unwrap_or_default();
    let mut out = Vec::new();
    for (r, rule) in route.spec.rules.iter().enumerate() {
        let (redirect, rewrite) = target_filters(rule, r)?;
        // A rule that redirects sends nothing to its backends.
        let backends = match redirect {
            Some(_) => Vec::new(),
            None => backends(rule, namespace, refs, services)?,
        };
        let rule_name = rule.name.clone().unwrap_or_else(|| r.to_string());
        let default_match = [HttpRouteMatch::default()];
        let matches = if rule.matches.is_empty() {
            &default_match[..]
        } else {
            &rule.matches[..]
        };
        let timeouts = rule.timeouts.clone().unwrap_or_default();
        let timeout = duration_at(timeouts.request.as_deref(), r, "timeouts.request")?;
        let per_try = duration_at(
            timeouts.backend_request.as_deref(),
            r,
            "timeouts.backendRequest",
        )?;
        let retry = retry(rule, r)?;
        let (request_headers, response_headers) = header_filters(rule, r)?;
        let mirrors = mirrors(rule, r, namespace, refs, services)?;
        for (m, matched) in matches.iter().enumerate() {
            let at = format!("spec.rules[{r}].matches[{m}]");
            let path = matched.path.clone().unwrap_or_default();
            let value = path.value.unwrap_or_else(|| "/".into());
            let (path, rank) = match path.type_.as_deref().unwrap_or("PathPrefix") {
                "Exact" => (PathMatch::Exact(value), 0),
                "PathPrefix" => (PathMatch::SegmentPrefix(value), 1),
                "RegularExpression" => {
                    check_regex(&value, &format!("{at}.path.value"))?;
                    (PathMatch::Regex(value), 2)
                }
                other => {
                    return Err(("UnsupportedValue", format!("{at}.path.type `{other}`")));
                }
            };
            let length = match &path {
                PathMatch::SegmentPrefix(p) => p.trim_end_matches('/').len(),
                _ => 0,
            };
            let headers = values(&matched.headers, &format!("{at}.headers"), true)?;
            let query = values(&matched.query_params, &format!("{at}.queryParams"), false)?;
            let changes_prefix = [
                redirect.as_ref().and_then(|d| d.path.as_ref()),
                rewrite.as_ref().and_then(|w| w.path.as_ref()),
            ]
            .into_iter()
            .flatten()
            .any(|p| matches!(p, PathModifier::Prefix(_)));
            if changes_prefix && !matches!(path, PathMatch::SegmentPrefix(_)) {
                return Err((
                    "UnsupportedValue",
                    format!(
                        "spec.rules[{r}]: ReplacePrefixMatch needs every match to be a PathPrefix"
                    ),
                ));
            }
            let rank = (
                rank,
                Reverse(length),
                matched.method.is_none(),
                Reverse(headers.len()),
                Reverse(query.len()),
            );
            out.push((
                Route {
                    name: format!("{namespace}/{name}/{rule_name}"),
                    path,
                    headers,
                    method: matched.method.clone(),
                    query,
                    request_headers: request_headers.clone(),
                    response_headers: response_headers.clone(),
                    backends: backends.clone(),
                    redirect: redirect.clone(),
                    rewrite: rewrite.clone(),
                    mirrors: mirrors.clone(),
                    timeout,
                    retry: retry.clone(),
                    per_try_timeout: per_try,
                    rate_limit: None,
                },
                rank,
            ));
        }
    }
    Ok(out)
}

/// Header (`lowercase`) or query parameter matches.
fn values(
    matches: &[HttpValueMatch],
    at: &str,
    lowercase: bool,
) -> Result<Vec<(String, ValueMatch)>, Refusal> {
    let mut out = Vec::with_capacity(matches.len());
    for (i, m) in matches.iter().enumerate() {
        let value = match m.type_.as_deref().unwrap_or("Exact") {
            "Exact" => ValueMatch::Exact(m.value.clone()),
            "RegularExpression" => {
                check_regex(&m.value, &format!("{at}[{i}].value"))?;
                ValueMatch::Regex(m.value.clone())
            }
            other => return Err(("UnsupportedValue", format!("{at}[{i}].type `{other}`"))),
        };
        let name = if lowercase {
            m.name.to_ascii_lowercase()
        } else {
            m.name.clone()
        };
        out.push((name, value));
    }
    Ok(out)
}

fn check_regex(re: &str, at: &str) -> Result<(), Refusal> {
    regex::Regex::new(re).map(|_| ()).map_err(|e| {
        (
            "UnsupportedValue",
            format!("{at}: not a regular expression: {e}"),
        )
    })
}

/// The rule's request and response header changes. Headers named `x-outrigger-*` are the
/// mesh's own, and a route may not set or remove them.
fn header_filters(
    rule: &HttpRouteRule,
    r: usize,
) -> Result<(HeaderChanges, HeaderChanges), Refusal> {
    let mut request = HeaderChanges::default();
    let mut response = HeaderChanges::default();
    for (f, filter) in rule.filters.iter().enumerate() {
        let (key, into) = match filter.type_.as_str() {
            "RequestHeaderModifier" => ("requestHeaderModifier", &mut request),
            "ResponseHeaderModifier" => ("responseHeaderModifier", &mut response),
            _ => continue,
        };
        let at = format!("spec.rules[{r}].filters[{f}].{key}");
        let settings = filter.settings.get(key).cloned().unwrap_or_default();
        let modifier: HeaderModifier = serde_json::from_value(settings)
            .map_err(|e| ("UnsupportedValue", format!("{at}: {e}")))?;
        let names = modifier
            .set
            .iter()
            .chain(&modifier.add)
            .map(|h| &h.name)
            .chain(&modifier.remove);
        for name in names {
            let valid = http::HeaderName::from_bytes(name.as_bytes()).is_ok();
            if !valid || name.to_ascii_lowercase().starts_with("x-outrigger-") {
                return Err((
                    "UnsupportedValue",
                    format!("{at}: header `{name}` may not be changed by a route"),
                ));
            }
        }
        let pairs = |hs: &[crate::gateway_api::HttpHeader]| {
            hs.iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect::<Vec<_>>()
        };
        into.set.extend(pairs(&modifier.set));
        into.add.extend(pairs(&modifier.add));
        into.remove
            .extend(modifier.remove.iter().map(|n| n.to_ascii_lowercase()));
    }
    Ok((request, response))
}

/// The rule's `RequestRedirect` or `URLRewrite` (at most one of the two, as the Gateway API
/// allows).
fn target_filters(
    rule: &HttpRouteRule,
    r: usize,
) -> Result<(Option<Redirect>, Option<Rewrite>), Refusal> {
    let (mut redirect, mut rewrite) = (None, None);
    for (f, filter) in rule.filters.iter().enumerate() {
        let at = format!("spec.rules[{r}].filters[{f}]");
        let settings = |key: &str| filter.settings.get(key).cloned().unwrap_or_default();
        let refused = |e: serde_json::Error| ("UnsupportedValue", format!("{at}: {e}"));
        match filter.type_.as_str() {
            "RequestRedirect" => {
                let d: RequestRedirect =
                    serde_json::from_value(settings("requestRedirect")).map_err(refused)?;
                let status = d.status_code.unwrap_or(302);
                if ![301, 302, 303, 307, 308].contains(&status) {
                    return Err((
                        "UnsupportedValue",
                        format!("{at}.requestRedirect.statusCode {status}"),
                    ));
                }
                if let Some(s) = d
                    .scheme
                    .as_deref()
                    .filter(|s| !matches!(*s, "http" | "https"))
                {
                    return Err((
                        "UnsupportedValue",
                        format!("{at}.requestRedirect.scheme `{s}`"),
                    ));
                }
                let port = d
                    .port
                    .map(|p| {
                        u16::try_from(p).map_err(|_| {
                            ("UnsupportedValue", format!("{at}.requestRedirect.port {p}"))
                        })
                    })
                    .transpose()?;
                redirect = Some(Redirect {
                    scheme: d.scheme,
                    host: d.hostname,
                    port,
                    path: d
                        .path
                        .map(|p| path_modifier(&p, &format!("{at}.requestRedirect.path")))
                        .transpose()?,
                    status,
                });
            }
            "URLRewrite" => {
                let w: UrlRewrite =
                    serde_json::from_value(settings("urlRewrite")).map_err(refused)?;
                if let Some(h) = w
                    .hostname
                    .as_deref()
                    .filter(|h| http::HeaderValue::from_str(h).is_err())
                {
                    return Err((
                        "UnsupportedValue",
                        format!("{at}.urlRewrite.hostname `{h}`"),
                    ));
                }
                rewrite = Some(Rewrite {
                    host: w.hostname,
                    path: w
                        .path
                        .map(|p| path_modifier(&p, &format!("{at}.urlRewrite.path")))
                        .transpose()?,
                });
            }
            _ => {}
        }
    }
    if redirect.is_some() && rewrite.is_some() {
        return Err((
            "UnsupportedValue",
            format!("spec.rules[{r}]: RequestRedirect and URLRewrite cannot both be set"),
        ));
    }
    Ok((redirect, rewrite))
}

/// The rule's `RequestMirror`s: (cluster, percent).
fn mirrors(
    rule: &HttpRouteRule,
    r: usize,
    namespace: &str,
    refs: Refs<'_>,
    services: &[Service],
) -> Result<Vec<(String, f64)>, Refusal> {
    let mut out = Vec::new();
    for (f, filter) in rule.filters.iter().enumerate() {
        if filter.type_ != "RequestMirror" {
            continue;
        }
        let at = format!("spec.rules[{r}].filters[{f}].requestMirror");
        let settings = filter
            .settings
            .get("requestMirror")
            .cloned()
            .unwrap_or_default();
        let m: RequestMirror = serde_json::from_value(settings)
            .map_err(|e| ("UnsupportedValue", format!("{at}: {e}")))?;
        let percent = match (m.percent, m.fraction) {
            (Some(p), None) => f64::from(p),
            (None, Some(f)) => {
                let denominator = f.denominator.unwrap_or(100);
                if denominator <= 0 || f.numerator < 0 || f.numerator > denominator {
                    return Err(("UnsupportedValue", format!("{at}.fraction")));
                }
                f64::from(f.numerator) / f64::from(denominator) * 100.0
            }
            (None, None) => 100.0,
            (Some(_), Some(_)) => {
                return Err((
                    "UnsupportedValue",
                    format!("{at}: percent and fraction are exclusive"),
                ));
            }
        };
        if !(0.0..=100.0).contains(&percent) {
            return Err(("UnsupportedValue", format!("{at}.percent")));
        }
        out.push((
            backend_cluster(&m.backend_ref, namespace, refs, services)?,
            percent,
        ));
    }
    Ok(out)
}

fn path_modifier(p: &HttpPathModifier, at: &str) -> Result<PathModifier, Refusal> {
    let checked = |path: &Option<String>, field: &str| match path {
        Some(v) if v.starts_with('/') => Ok(v.clone()),
        _ => Err((
            "UnsupportedValue",
            format!("{at}.{field} must be a path starting with `/`"),
        )),
    };
    match p.type_.as_str() {
        "ReplaceFullPath" => Ok(PathModifier::Full(checked(
            &p.replace_full_path,
            "replaceFullPath",
        )?)),
        "ReplacePrefixMatch" => Ok(PathModifier::Prefix(checked(
            &p.replace_prefix_match,
            "replacePrefixMatch",
        )?)),
        other => Err(("UnsupportedValue", format!("{at}.type `{other}`"))),
    }
}

fn duration_at(
    text: Option<&str>,
    rule: usize,
    field: &str,
) -> Result<Option<std::time::Duration>, (&'static str, String)> {
    text.map(|t| {
        parse_duration(t).ok_or((
            "UnsupportedValue",
            format!("spec.rules[{rule}].{field} `{t}` is not a duration"),
        ))
    })
    .transpose()
}

/// The rule's backends as (cluster, weight); weight 0 sends nothing and is left out.
fn backends(
    rule: &HttpRouteRule,
    namespace: &str,
    refs: Refs<'_>,
    services: &[Service],
) -> Result<Vec<(String, u32)>, (&'static str, String)> {
    let mut out = Vec::new();
    for backend in &rule.backend_refs {
        let cluster = backend_cluster(backend, namespace, refs, services)?;
        let weight = u32::try_from(backend.weight.unwrap_or(1)).unwrap_or(0);
        if weight > 0 {
            out.push((cluster, weight));
        }
    }
    if out.is_empty() {
        return Err((
            "BackendNotFound",
            "a rule has no backend with a weight above 0".into(),
        ));
    }
    Ok(out)
}

fn backend_cluster(
    backend: &HttpBackendRef,
    namespace: &str,
    refs: Refs<'_>,
    services: &[Service],
) -> Result<String, (&'static str, String)> {
    let is_service = matches!(backend.group.as_deref(), None | Some("") | Some("core"))
        && matches!(backend.kind.as_deref(), None | Some("Service"));
    if !is_service {
        return Err((
            "InvalidKind",
            format!("backend `{}` is not a Service", backend.name),
        ));
    }
    let backend_ns = backend.namespace.as_deref().unwrap_or(namespace);
    // Another namespace's Service needs that namespace's ReferenceGrant, except the route's
    // own parent: its callers may call it anyway.
    let is_parent = (backend_ns, backend.name.as_str()) == refs.parent;
    let granted = || {
        refs.grants.iter().any(|g| {
            g.metadata.namespace.as_deref() == Some(backend_ns)
                && g.lets(refs.kind, namespace, &backend.name)
        })
    };
    if backend_ns != namespace && !is_parent && !granted() {
        return Err((
            "RefNotPermitted",
            format!(
                "backend {backend_ns}/{} is in another namespace, and no ReferenceGrant there lets a {} from {namespace} refer to it",
                backend.name, refs.kind
            ),
        ));
    }
    services
        .iter()
        .find(|s| {
            s.name == backend.name
                && s.namespace == backend_ns
                && backend.port.is_none_or(|p| i32::from(s.port) == p)
        })
        .map(Service::cluster_name)
        .ok_or_else(|| {
            (
                "BackendNotFound",
                format!("no Service {backend_ns}/{} with that port", backend.name),
            )
        })
}

/// The rule's `retry`: the attempts after the first, on the conditions that are always safe
/// plus the statuses it names.
fn retry(rule: &HttpRouteRule, r: usize) -> Result<Option<Retry>, (&'static str, String)> {
    let Some(spec) = &rule.retry else {
        return Ok(None);
    };
    let mut retry = policy::default_retry();
    if let Some(attempts) = spec.attempts {
        retry.retries = attempts;
    }
    if !spec.codes.is_empty() {
        retry.status_codes = spec.codes.clone();
        retry.on.push("retriable-status-codes".into());
    }
    if let Some(backoff) = duration_at(spec.backoff.as_deref(), r, "retry.backoff")? {
        retry.backoff_base = backoff;
        retry.backoff_max = retry.backoff_max.max(backoff * 10);
    }
    Ok(Some(retry))
}
