//! Which xDS fields the proxy accepts and which it refuses, one row per field: a refusal must
//! name the field (it becomes the NACK's message), and an accepted field must translate.
//! Each row changes one thing in a resource that is otherwise accepted.

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection, UpstreamConnectionOptions, circuit_breakers,
    cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, HealthCheck, Metadata, RoutingPriority,
};
use envoy_types::pb::envoy::config::route::v3::{
    Decorator, HeaderMatcher, QueryParameterMatcher, RateLimit, RedirectAction, RetryPolicy, Route,
    RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster, header_matcher,
    query_parameter_matcher, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{BoolValue, Duration as PbDuration, UInt32Value};
use outrigger_proxy::xds::translate::{cluster, route_table};

/// What a row expects: accepted, or refused naming this field.
enum Expect {
    Accepted,
    Refused(&'static str),
}
use Expect::{Accepted, Refused};

fn base_route() -> Route {
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster("web".into())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn table(route: Route) -> RouteConfiguration {
    RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vec![VirtualHost {
            name: "web".into(),
            domains: vec!["*".into()],
            routes: vec![route],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn action(r: &mut Route) -> &mut RouteAction {
    match &mut r.action {
        Some(route::Action::Route(a)) => a,
        _ => unreachable!("the base route routes"),
    }
}

fn matcher(r: &mut Route) -> &mut RouteMatch {
    r.r#match.as_mut().unwrap()
}

fn header(name: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.into(),
            value: value.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn check<T>(row: &str, result: Result<T, impl std::fmt::Display>, expect: &Expect) {
    match (result, expect) {
        (Ok(_), Accepted) => {}
        (Err(e), Accepted) => panic!("{row}: refused: {e}"),
        (Ok(_), Refused(field)) => panic!("{row}: accepted, but `{field}` must be refused"),
        (Err(e), Refused(field)) => assert!(
            e.to_string().contains(field),
            "{row}: the refusal does not name `{field}`: {e}"
        ),
    }
}

#[test]
fn route_fields() {
    type Change = fn(&mut Route);
    let rows: Vec<(&str, Change, Expect)> = vec![
        ("prefix match", |_| {}, Accepted),
        (
            "exact path",
            |r| matcher(r).path_specifier = Some(route_match::PathSpecifier::Path("/x".into())),
            Accepted,
        ),
        (
            "safe regex",
            |r| {
                matcher(r).path_specifier =
                    Some(route_match::PathSpecifier::SafeRegex(RegexMatcher {
                        regex: "/items/[0-9]+".into(),
                        ..Default::default()
                    }))
            },
            Accepted,
        ),
        (
            "exact header",
            |r| {
                matcher(r).headers.push(HeaderMatcher {
                    name: "x-canary".into(),
                    header_match_specifier: Some(
                        header_matcher::HeaderMatchSpecifier::PresentMatch(true),
                    ),
                    ..Default::default()
                })
            },
            Accepted,
        ),
        (
            "weighted clusters",
            |r| {
                action(r).cluster_specifier = Some(
                    route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
                        clusters: vec![
                            weighted_cluster::ClusterWeight {
                                name: "web".into(),
                                weight: Some(UInt32Value { value: 90 }),
                                ..Default::default()
                            },
                            weighted_cluster::ClusterWeight {
                                name: "web-v2".into(),
                                weight: Some(UInt32Value { value: 10 }),
                                ..Default::default()
                            },
                        ],
                        ..Default::default()
                    }),
                )
            },
            Accepted,
        ),
        (
            "timeout",
            |r| {
                action(r).timeout = Some(PbDuration {
                    seconds: 2,
                    nanos: 0,
                })
            },
            Accepted,
        ),
        (
            "retry policy",
            |r| {
                action(r).retry_policy = Some(RetryPolicy {
                    retry_on: "5xx,reset".into(),
                    num_retries: Some(UInt32Value { value: 2 }),
                    ..Default::default()
                })
            },
            Accepted,
        ),
        (
            "request headers to add",
            |r| r.request_headers_to_add.push(header("x-mesh", "outrigger")),
            Accepted,
        ),
        (
            "decorator",
            |r| {
                r.decorator = Some(Decorator {
                    operation: "op".into(),
                    ..Default::default()
                })
            },
            Refused("decorator"),
        ),
        (
            "case-insensitive match",
            |r| matcher(r).case_sensitive = Some(BoolValue { value: false }),
            Refused("match.case_sensitive"),
        ),
        (
            "query parameter, exact",
            |r| {
                matcher(r).query_parameters.push(QueryParameterMatcher {
                    name: "debug".into(),
                    query_parameter_match_specifier: Some(
                        query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                            StringMatcher {
                                match_pattern: Some(string_matcher::MatchPattern::Exact(
                                    "1".into(),
                                )),
                                ..Default::default()
                            },
                        ),
                    ),
                })
            },
            Accepted,
        ),
        (
            "query parameter, present",
            |r| {
                matcher(r).query_parameters.push(QueryParameterMatcher {
                    name: "debug".into(),
                    ..Default::default()
                })
            },
            Refused("match.query_parameters"),
        ),
        (
            "dynamic metadata",
            |r| matcher(r).dynamic_metadata.push(Default::default()),
            Refused("match.dynamic_metadata"),
        ),
        (
            "redirect",
            |r| r.action = Some(route::Action::Redirect(RedirectAction::default())),
            Accepted,
        ),
        (
            "redirect without the query",
            |r| {
                r.action = Some(route::Action::Redirect(RedirectAction {
                    strip_query: true,
                    ..Default::default()
                }))
            },
            Refused("redirect.strip_query"),
        ),
        (
            "direct response",
            |r| r.action = Some(route::Action::DirectResponse(Default::default())),
            Refused("action"),
        ),
        (
            "prefix rewrite",
            |r| action(r).prefix_rewrite = "/v2".into(),
            Accepted,
        ),
        (
            "host rewrite from a header",
            |r| {
                action(r).host_rewrite_specifier = Some(
                    route_action::HostRewriteSpecifier::HostRewriteHeader("x-host".into()),
                )
            },
            Refused("route.host_rewrite_specifier"),
        ),
        (
            "hash policy",
            |r| action(r).hash_policy.push(Default::default()),
            Refused("route.hash_policy"),
        ),
        (
            "request mirror keeping the host",
            |r| {
                action(r)
                    .request_mirror_policies
                    .push(route_action::RequestMirrorPolicy {
                        cluster: "web".into(),
                        disable_shadow_host_suffix_append: true,
                        ..Default::default()
                    })
            },
            Accepted,
        ),
        (
            "request mirror renaming the host",
            |r| {
                action(r)
                    .request_mirror_policies
                    .push(route_action::RequestMirrorPolicy {
                        cluster: "web".into(),
                        ..Default::default()
                    })
            },
            Refused("disable_shadow_host_suffix_append"),
        ),
        (
            "idle timeout",
            |r| action(r).idle_timeout = Some(PbDuration::default()),
            Refused("route.idle_timeout"),
        ),
        (
            "rate limits",
            |r| action(r).rate_limits.push(RateLimit::default()),
            Refused("route.rate_limits"),
        ),
        (
            "retry priority",
            |r| {
                action(r).retry_policy = Some(RetryPolicy {
                    retry_on: "5xx".into(),
                    retry_priority: Some(Default::default()),
                    ..Default::default()
                })
            },
            Refused("route.retry_policy.retry_priority"),
        ),
        (
            "an unknown retry condition",
            |r| {
                action(r).retry_policy = Some(RetryPolicy {
                    retry_on: "5xx,sometimes".into(),
                    ..Default::default()
                })
            },
            Refused("route.retry_policy.retry_on"),
        ),
    ];
    for (row, change, expect) in &rows {
        let mut r = base_route();
        change(&mut r);
        check(row, route_table(&table(r)), expect);
    }
}

#[test]
fn virtual_host_and_table_fields() {
    type Change = fn(&mut RouteConfiguration);
    let rows: Vec<(&str, Change, Expect)> = vec![
        ("the base table", |_| {}, Accepted),
        (
            "require TLS",
            |t| t.virtual_hosts[0].require_tls = 1,
            Refused("require_tls"),
        ),
        (
            "a virtual host's retry policy",
            |t| t.virtual_hosts[0].retry_policy = Some(RetryPolicy::default()),
            Refused("retry_policy"),
        ),
        (
            "a virtual host's headers",
            |t| {
                t.virtual_hosts[0]
                    .request_headers_to_add
                    .push(header("a", "b"))
            },
            Refused("request_headers_to_add"),
        ),
        (
            "the table's response headers",
            |t| t.response_headers_to_add.push(header("a", "b")),
            Refused("response_headers_to_add"),
        ),
    ];
    for (row, change, expect) in &rows {
        let mut t = table(base_route());
        change(&mut t);
        check(row, route_table(&t), expect);
    }
}

fn base_cluster() -> Cluster {
    Cluster {
        name: "web".into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    }
}

#[test]
fn cluster_fields() {
    type Change = fn(&mut Cluster);
    let rows: Vec<(&str, Change, Expect)> = vec![
        ("EDS, round robin", |_| {}, Accepted),
        (
            "least request",
            |c| c.lb_policy = cluster::LbPolicy::LeastRequest as i32,
            Accepted,
        ),
        (
            "static",
            |c| {
                c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::Static as i32,
                ))
            },
            Accepted,
        ),
        (
            "thresholds at the default priority",
            |c| {
                c.circuit_breakers = Some(CircuitBreakers {
                    thresholds: vec![circuit_breakers::Thresholds {
                        max_requests: Some(UInt32Value { value: 100 }),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
            },
            Accepted,
        ),
        (
            "consecutive 5xx ejection",
            |c| {
                c.outlier_detection = Some(OutlierDetection {
                    consecutive_5xx: Some(UInt32Value { value: 3 }),
                    ..Default::default()
                })
            },
            Accepted,
        ),
        (
            "strict DNS",
            |c| {
                c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::StrictDns as i32,
                ))
            },
            Refused("type"),
        ),
        (
            "ring hash",
            |c| c.lb_policy = cluster::LbPolicy::RingHash as i32,
            Refused("lb_policy"),
        ),
        (
            "health checks",
            |c| c.health_checks.push(HealthCheck::default()),
            Refused("health_checks"),
        ),
        (
            "upstream connection options",
            |c| c.upstream_connection_options = Some(UpstreamConnectionOptions::default()),
            Refused("upstream_connection_options"),
        ),
        (
            "high-priority thresholds",
            |c| {
                c.circuit_breakers = Some(CircuitBreakers {
                    thresholds: vec![circuit_breakers::Thresholds {
                        priority: RoutingPriority::High as i32,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
            },
            Refused("circuit_breakers.thresholds.priority"),
        ),
        (
            "failure-percentage ejection",
            |c| {
                c.outlier_detection = Some(OutlierDetection {
                    enforcing_failure_percentage: Some(UInt32Value { value: 100 }),
                    ..Default::default()
                })
            },
            Refused("outlier_detection.enforcing_failure_percentage"),
        ),
        (
            "metadata is harmless",
            |c| c.metadata = Some(Metadata::default()),
            Accepted,
        ),
    ];
    for (row, change, expect) in &rows {
        let mut c = base_cluster();
        change(&mut c);
        check(row, cluster(&c), expect);
    }
}
