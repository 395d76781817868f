//! What proxyless gRPC takes instead of SDS: certificate provider instances (gRFC A29), and
//! for a gRPC server its own Listener (gRFC A36) with the mesh's RBAC rules (gRFC A41).
//!
//! A gRPC app names its certificate files in its bootstrap, as the provider instance
//! `default` (the `file_watcher` plugin, fed by `outrigger-proxy certs`); the resources name
//! that instance and never an SDS secret, which gRPC would refuse. A gRPC server cannot take
//! plaintext and mTLS on one port, so a meshed service's server takes mTLS only, permissive
//! or not.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{
    ApiVersion, ConfigSource, SelfConfigSource, TransportSocket, config_source, transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    NonForwardingAction, Route, RouteConfiguration, RouteMatch, VirtualHost, route, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateProviderPluginInstance, CertificateValidationContext, CommonTlsContext,
    DownstreamTlsContext, UpstreamTlsContext, common_tls_context,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::BoolValue;

use crate::inbound::Inbound;
use crate::xds::pack;
use crate::xds_rbac::{RBAC_FILTER, rbac};
use crate::xds_tls::{BUNDLE_SECRET, TLS_TRANSPORT_SOCKET, WORKLOAD_SECRET, peer_identities};

/// The name a gRPC server asks its Listener by, with its address after it (the bootstrap's
/// `server_listener_resource_name_template`).
pub const SERVER_LISTENER_PREFIX: &str = "grpc/server?xds.resource.listening_address=";
/// The certificate provider instance a gRPC app's bootstrap defines.
pub const PROVIDER_INSTANCE: &str = "default";

fn provider(certificate: &str) -> CertificateProviderPluginInstance {
    CertificateProviderPluginInstance {
        instance_name: PROVIDER_INSTANCE.into(),
        certificate_name: certificate.into(),
    }
}

/// The workload certificate and the trust bundle from the provider, the peer checked
/// against `identities` (none: any identity of the mesh).
fn common(identities: &[String]) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_provider_instance: Some(provider(WORKLOAD_SECRET)),
        validation_context_type: Some(
            common_tls_context::ValidationContextType::ValidationContext(
                #[allow(deprecated)]
                CertificateValidationContext {
                    ca_certificate_provider_instance: Some(provider(BUNDLE_SECRET)),
                    match_subject_alt_names: identities
                        .iter()
                        .map(|id| StringMatcher {
                            match_pattern: Some(string_matcher::MatchPattern::Exact(id.clone())),
                            ignore_case: false,
                        })
                        .collect(),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    }
}

fn socket<M: prost::Message + prost::Name>(context: &M) -> TransportSocket {
    TransportSocket {
        name: TLS_TRANSPORT_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack(context))),
    }
}

/// A cluster as a gRPC client takes it: it reports its load to the server it came from
/// (`lrs_server: self`, gRFC A27), and an SDS-named TLS context becomes the provider form,
/// with the same peer identities.
pub fn for_grpc_client(cluster: &mut Cluster) {
    cluster.lrs_server = Some(ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Self_(
            SelfConfigSource {
                transport_api_version: ApiVersion::V3 as i32,
            },
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    });
    let Some(ts) = &cluster.transport_socket else {
        return;
    };
    let Ok(identities) = peer_identities(&cluster.name, ts) else {
        return;
    };
    cluster.transport_socket = Some(socket(&UpstreamTlsContext {
        common_tls_context: Some(common(&identities)),
        ..Default::default()
    }));
}

/// The Listener a gRPC server listening on `address` asks for as `name`: mTLS when the
/// service is meshed (`mtls`), the mesh's rules as RBAC, and the route every server Listener
/// needs (a non-forwarding one: the server answers the call itself).
pub fn server_listener(
    name: &str,
    address: SocketAddr,
    inbound: Option<&Inbound>,
    mtls: bool,
) -> Listener {
    let authorization = inbound.and_then(|i| i.authorization.as_ref());
    let filter = |name: &str, config| HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: "grpc-server".into(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: name.into(),
                virtual_hosts: vec![VirtualHost {
                    name: "server".into(),
                    domains: vec!["*".into()],
                    routes: vec![Route {
                        r#match: Some(RouteMatch {
                            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                            ..Default::default()
                        }),
                        action: Some(route::Action::NonForwardingAction(NonForwardingAction {})),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters: authorization
            .map(|a| filter(RBAC_FILTER, pack(&rbac(a))))
            .into_iter()
            .chain([filter(
                "envoy.filters.http.router",
                pack(&Router::default()),
            )])
            .collect(),
        ..Default::default()
    };
    let secure = mtls || inbound.is_some();
    Listener {
        name: name.into(),
        address: Some(crate::xds_inbound::address_of(address)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: crate::xds_inbound::HTTP_CONNECTION_MANAGER.into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
            }],
            transport_socket: secure.then(|| {
                socket(&DownstreamTlsContext {
                    common_tls_context: Some(common(&[])),
                    require_client_certificate: Some(BoolValue { value: true }),
                    ..Default::default()
                })
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The address a server Listener name asks for.
pub fn server_address(name: &str) -> Option<SocketAddr> {
    name.strip_prefix(SERVER_LISTENER_PREFIX)?.parse().ok()
}
