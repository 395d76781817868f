//! Envoy v3 resources → the proxy's config model (the same one the YAML file produces), so
//! xDS config passes through exactly the same validation as a file.
//!
//! The proxy supports a declared subset of each resource. A field outside that subset that
//! would change behaviour is refused with an error naming it, which the client sends back as
//! a NACK; it is never silently ignored.

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};

use crate::config::file::{ClusterFile, ClusterTlsFile, EndpointFile, LbPolicy, UpstreamProtocol};
use outrigger_core::xds_policy as policy_xds;

pub use crate::xds::route_table::route_table;
pub use outrigger_core::xds::{XdsError, decode, duration_text, refuse, sp};

pub struct TranslatedCluster {
    pub file: ClusterFile,
    /// True when endpoints come from EDS (under the cluster's or its service name).
    pub eds_name: Option<String>,
}

/// The cluster's metadata says its endpoints speak opaque TCP.
fn opaque(c: &Cluster) -> bool {
    use envoy_types::pb::google::protobuf::value::Kind;
    c.metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(outrigger_core::xds::CLUSTER_METADATA))
        .and_then(|s| s.fields.get("protocol"))
        .is_some_and(|v| {
            matches!(&v.kind, Some(Kind::StringValue(p)) if p == outrigger_core::xds::OPAQUE_PROTOCOL)
        })
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
            opaque: opaque(c),
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
