//! A workload's inbound policy (`inbound::Inbound`) as an Envoy v3 `Listener`.
//!
//! The mTLS mode is the listener's filter chains: strict is one chain whose transport socket
//! is a `DownstreamTlsContext` that requires a client certificate; permissive adds a
//! plaintext chain, told apart by the TLS inspector. Authorization is the RBAC filter in
//! each chain's HTTP connection manager. Envoy reads this as is. Our proxy takes only the
//! policy from it: its listener sockets and the routes to the app stay its own, so a listener
//! that would route, or that this model cannot say, is refused by field.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, SocketAddress, TrafficDirection, TransportSocket, address, socket_address,
    transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, common_tls_context,
};
use envoy_types::pb::google::protobuf::BoolValue;

use crate::authz::Authorization;
use crate::inbound::{Inbound, TlsMode};
use crate::xds::{XdsError, decode, pack, refuse};
use crate::xds_rbac::{RBAC_FILTER, rbac, read_rbac};
use crate::xds_tls::{BUNDLE_SECRET, TLS_TRANSPORT_SOCKET, WORKLOAD_SECRET, sds};

/// The clusters an inbound listener's routes lead to: the app on loopback, one per port.
pub const LOCAL_APP_PREFIX: &str = "inbound|";
/// Where the workload tells the control plane to bind its inbound listener, when not
/// `0.0.0.0:15006` (node metadata).
pub const INBOUND_ADDRESS_METADATA: &str = "OUTRIGGER_INBOUND_ADDRESS";

pub fn local_app_cluster(port: u16) -> String {
    format!("{LOCAL_APP_PREFIX}{port}")
}

/// The app on loopback, `port`: where an Envoy's inbound listener sends what it admits.
pub fn address_of(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(addr.port() as u32)),
            ..Default::default()
        })),
    }
}

pub fn local_app(port: u16) -> Cluster {
    let address = address_of(SocketAddr::from(([127, 0, 0, 1], port)));
    Cluster {
        name: local_app_cluster(port),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(crate::xds::pb_duration(std::time::Duration::from_secs(1))),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: local_app_cluster(port),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(address),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
pub const HTTP_CONNECTION_MANAGER: &str = "envoy.filters.network.http_connection_manager";
const ROUTER: &str = "envoy.filters.http.router";

/// The listener for `inbound`, named `name`, on `address` (where an Envoy binds it). An
/// Envoy sends what it admits to `app_port` on loopback (`local_app`), and hands the app the
/// caller's identity in `x-forwarded-client-cert`; our proxy routes to its own app ports.
pub fn inbound_listener(
    name: &str,
    address: SocketAddr,
    inbound: &Inbound,
    app_port: Option<u16>,
) -> Listener {
    let virtual_hosts = app_port
        .map(|port| VirtualHost {
            name: "app".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        local_app_cluster(port),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        })
        .into_iter()
        .collect();
    let hcm = pack(&HttpConnectionManager {
        stat_prefix: "inbound".into(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: name.into(),
                virtual_hosts,
                ..Default::default()
            },
        )),
        forward_client_cert_details: http_connection_manager::ForwardClientCertDetails::SanitizeSet
            as i32,
        set_current_client_cert_details: Some(
            http_connection_manager::SetCurrentClientCertDetails {
                uri: true,
                ..Default::default()
            },
        ),
        http_filters: inbound
            .authorization
            .iter()
            .map(|a| http_filter_of(RBAC_FILTER, pack(&rbac(a))))
            .chain([http_filter_of(ROUTER, pack(&Router::default()))])
            .collect(),
        ..Default::default()
    });
    let chain = |tls: bool| FilterChain {
        filter_chain_match: (inbound.mode == TlsMode::Permissive).then(|| FilterChainMatch {
            transport_protocol: if tls { "tls" } else { "raw_buffer" }.into(),
            ..Default::default()
        }),
        filters: vec![Filter {
            name: HTTP_CONNECTION_MANAGER.into(),
            config_type: Some(filter::ConfigType::TypedConfig(hcm.clone())),
        }],
        transport_socket: tls.then(downstream_mtls),
        name: if tls { "mtls" } else { "plaintext" }.into(),
        ..Default::default()
    };
    let mut filter_chains = vec![chain(true)];
    let mut listener_filters = Vec::new();
    if inbound.mode == TlsMode::Permissive {
        filter_chains.push(chain(false));
        listener_filters.push(ListenerFilter {
            name: TLS_INSPECTOR.into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack(
                &TlsInspector::default(),
            ))),
            ..Default::default()
        });
    }
    Listener {
        name: name.into(),
        address: Some(address_of(address)),
        traffic_direction: TrafficDirection::Inbound as i32,
        filter_chains,
        listener_filters,
        ..Default::default()
    }
}

fn http_filter_of(name: &str, config: envoy_types::pb::google::protobuf::Any) -> HttpFilter {
    HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

/// mTLS that requires the caller's certificate; the workload's own certificate and the trust
/// bundle come by SDS under the conventional names.
fn downstream_mtls() -> TransportSocket {
    let context = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            tls_certificate_sds_secret_configs: vec![sds(WORKLOAD_SECRET)],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds(
                    BUNDLE_SECRET,
                )),
            ),
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket {
        name: TLS_TRANSPORT_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&context))),
    }
}

/// The policy a listener says, for a proxy that keeps its own sockets and routes.
pub fn read_inbound(l: &Listener) -> Result<Inbound, XdsError> {
    let what = format!("Listener {}", l.name);
    refuse(
        &what,
        &[
            (l.api_listener.is_some(), "api_listener"),
            (l.default_filter_chain.is_some(), "default_filter_chain"),
            (l.filter_chain_matcher.is_some(), "filter_chain_matcher"),
            (l.fcds_config.is_some(), "fcds_config"),
            (
                l.listener_filters.iter().any(|f| f.name != TLS_INSPECTOR),
                "listener_filters (other than the TLS inspector)",
            ),
        ],
    )?;
    if l.filter_chains.is_empty() {
        return Err(format!("{what}: no filter_chains").into());
    }
    let (mut tls, mut plaintext) = (false, false);
    let mut authorization: Option<Option<Authorization>> = None;
    for (i, chain) in l.filter_chains.iter().enumerate() {
        let at = format!("{what}: filter_chains[{i}]");
        if let Some(m) = &chain.filter_chain_match {
            let only_protocol = FilterChainMatch {
                transport_protocol: m.transport_protocol.clone(),
                ..Default::default()
            };
            refuse(
                &at,
                &[(
                    *m != only_protocol,
                    "filter_chain_match (other than transport_protocol)",
                )],
            )?;
        }
        match &chain.transport_socket {
            None => plaintext = true,
            Some(ts) => {
                check_downstream_tls(&at, ts)?;
                tls = true;
            }
        }
        let chain_authz = read_filters(&at, &chain.filters)?;
        match &authorization {
            None => authorization = Some(chain_authz),
            Some(seen) if *seen == chain_authz => {}
            Some(_) => {
                return Err(format!(
                    "{at}: its authorization differs from the first chain's; this proxy \
                     judges every connection of a listener alike"
                )
                .into());
            }
        }
    }
    let mode = match (tls, plaintext) {
        (true, false) => TlsMode::Strict,
        (true, true) => TlsMode::Permissive,
        _ => {
            return Err(format!(
                "{what}: no filter chain takes mTLS; an inbound listener of the mesh must"
            )
            .into());
        }
    };
    Ok(Inbound {
        mode,
        authorization: authorization.flatten(),
    })
}

fn check_downstream_tls(at: &str, ts: &TransportSocket) -> Result<(), XdsError> {
    let any = match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(any)) if ts.name == TLS_TRANSPORT_SOCKET => {
            any
        }
        _ => return Err(format!("{at}: transport_socket must be `{TLS_TRANSPORT_SOCKET}`").into()),
    };
    let context: DownstreamTlsContext = decode(any).map_err(|e| format!("{at}: {e}"))?;
    if context.require_client_certificate.is_none_or(|r| !r.value) {
        return Err(format!(
            "{at}: transport_socket: require_client_certificate must be true; the mesh's \
             mTLS proves both sides"
        )
        .into());
    }
    // The proxy serves its own workload certificate and checks callers against its own
    // trust bundle, whatever names the context gives them; a context that would narrow who
    // may connect says what RBAC says, and is refused so it is not taken as enforced.
    let common = context.common_tls_context.unwrap_or_default();
    let narrowing = match &common.validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContext(v)) => {
            !v.match_typed_subject_alt_names.is_empty()
        }
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => c
            .default_validation_context
            .as_ref()
            .is_some_and(|v| !v.match_typed_subject_alt_names.is_empty()),
        _ => false,
    };
    refuse(
        at,
        &[
            (
                narrowing,
                "transport_socket match_typed_subject_alt_names (use RBAC)",
            ),
            (
                !common.tls_certificates.is_empty(),
                "transport_socket tls_certificates",
            ),
        ],
    )
}

/// The authorization in a chain's filters: one HTTP connection manager, with an RBAC filter
/// or not, then the router.
fn read_filters(at: &str, filters: &[Filter]) -> Result<Option<Authorization>, XdsError> {
    let [only] = filters else {
        return Err(format!(
            "{at}: filters: exactly one, `{HTTP_CONNECTION_MANAGER}`, is supported"
        )
        .into());
    };
    let hcm: HttpConnectionManager = match (&only.name[..], &only.config_type) {
        (HTTP_CONNECTION_MANAGER, Some(filter::ConfigType::TypedConfig(any))) => {
            decode(any).map_err(|e| format!("{at}: {e}"))?
        }
        _ => {
            return Err(format!(
                "{at}: filters: exactly one, `{HTTP_CONNECTION_MANAGER}`, is supported"
            )
            .into());
        }
    };
    // The routes may lead only to the local app, which this proxy knows from its own
    // file: they are not used here, and anything else they could say is refused.
    let routes_elsewhere = match &hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => rc
            .virtual_hosts
            .iter()
            .flat_map(|vh| &vh.routes)
            .any(|r| match &r.action {
                Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(c)),
                    ..
                })) => !c.starts_with(LOCAL_APP_PREFIX),
                _ => true,
            }),
        None => false,
        Some(_) => true,
    };
    refuse(
        at,
        &[(
            routes_elsewhere,
            "http_connection_manager route_specifier (routes to other than the local app)",
        )],
    )?;
    let mut authorization = None;
    for (i, f) in hcm.http_filters.iter().enumerate() {
        let any = match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(any)) => Some(any),
            _ => None,
        };
        match (&f.name[..], any) {
            (RBAC_FILTER, Some(any)) if authorization.is_none() => {
                let config: Rbac = decode(any).map_err(|e| format!("{at}: {e}"))?;
                authorization = read_rbac(&format!("{at}: http_filters[{i}]"), &config)?;
            }
            (ROUTER, _) if i + 1 == hcm.http_filters.len() => {}
            _ if f.is_optional => {}
            (name, _) => {
                return Err(XdsError::Unsupported {
                    what: format!("{at}: http_filters[{i}]"),
                    field: name.to_string(),
                });
            }
        }
    }
    Ok(authorization)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{Caller, Rule};
    use crate::spiffe::Principal;

    fn sample(mode: TlsMode) -> Inbound {
        let web = Principal::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        Inbound {
            mode,
            authorization: Some(Authorization {
                rules: vec![Rule::anything("web", vec![Caller::from(&web)])],
            }),
        }
    }

    #[test]
    fn both_modes_read_back() {
        let addr = "0.0.0.0:15006".parse().unwrap();
        for mode in [TlsMode::Strict, TlsMode::Permissive] {
            let inbound = sample(mode);
            let l = inbound_listener("inbound", addr, &inbound, Some(8080));
            assert_eq!(read_inbound(&l).unwrap(), inbound);
        }
        let open = Inbound {
            mode: TlsMode::Strict,
            authorization: None,
        };
        assert_eq!(
            read_inbound(&inbound_listener("inbound", addr, &open, None)).unwrap(),
            open
        );
    }

    #[test]
    fn a_listener_that_would_say_more_is_refused() {
        let addr = "0.0.0.0:15006".parse().unwrap();
        let mut l = inbound_listener("inbound", addr, &sample(TlsMode::Permissive), None);
        l.filter_chains[0]
            .filter_chain_match
            .as_mut()
            .unwrap()
            .destination_port = Some(envoy_types::pb::google::protobuf::UInt32Value { value: 80 });
        let e = read_inbound(&l).unwrap_err().to_string();
        assert!(e.contains("filter_chain_match"), "{e}");

        let mut l = inbound_listener("inbound", addr, &sample(TlsMode::Permissive), None);
        l.filter_chains.remove(0);
        let e = read_inbound(&l).unwrap_err().to_string();
        assert!(e.contains("no filter chain takes mTLS"), "{e}");

        let mut l = inbound_listener("inbound", addr, &sample(TlsMode::Strict), None);
        l.filter_chains[0].transport_socket = None;
        l.filter_chains.push(
            inbound_listener("inbound", addr, &sample(TlsMode::Strict), None).filter_chains[0]
                .clone(),
        );
        l.filter_chains[0].filters = inbound_listener(
            "inbound",
            addr,
            &Inbound {
                mode: TlsMode::Strict,
                authorization: None,
            },
            None,
        )
        .filter_chains[0]
            .filters
            .clone();
        let e = read_inbound(&l).unwrap_err().to_string();
        assert!(e.contains("differs"), "{e}");
    }
}
