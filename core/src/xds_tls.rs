//! mTLS to a cluster's endpoints, as xDS says it: an `UpstreamTlsContext` transport socket.
//!
//! The control plane writes it the way Istio does, so Envoy reads it too: the workload's own
//! certificate and the trust bundle come by SDS under the conventional names `default` and
//! `ROOTCA`, and the peer must carry one of the listed SPIFFE IDs as a URI SAN. This proxy
//! has its own identity already, so it takes only the SPIFFE IDs from it, and refuses any
//! other way of naming certificates or peers rather than ignore it.

use crate::xds::XdsError;
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ConfigSource, TransportSocket, config_source, transport_socket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SdsSecretConfig, SubjectAltNameMatcher,
    UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";
/// SDS names for the workload certificate and the trust bundle.
pub const WORKLOAD_SECRET: &str = "default";
pub const BUNDLE_SECRET: &str = "ROOTCA";

pub(crate) fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ConfigSource {
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                AggregatedConfigSource {},
            )),
            ..Default::default()
        }),
    }
}

/// mTLS to endpoints that must prove one of `identities`, offering ALPN h2.
pub fn upstream_mtls(identities: &[String]) -> TransportSocket {
    let matchers = identities
        .iter()
        .map(|id| SubjectAltNameMatcher {
            san_type: subject_alt_name_matcher::SanType::Uri as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(id.clone())),
                ignore_case: false,
            }),
            ..Default::default()
        })
        .collect();
    let context = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: vec!["h2".into()],
            tls_certificate_sds_secret_configs: vec![sds(WORKLOAD_SECRET)],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: matchers,
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds(BUNDLE_SECRET)),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: TLS_TRANSPORT_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
            type_url: UpstreamTlsContext::type_url(),
            value: context.encode_to_vec(),
        })),
    }
}

/// The SPIFFE IDs a cluster's transport socket asks of its endpoints.
pub fn peer_identities(what: &str, ts: &TransportSocket) -> Result<Vec<String>, XdsError> {
    let any = match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(any)) => any,
        None => return Err(format!("{what}: transport_socket has no typed_config").into()),
    };
    let context: UpstreamTlsContext =
        crate::xds::decode(any).map_err(|e| format!("{what}: transport_socket: {e}"))?;
    let common = context.common_tls_context.unwrap_or_default();
    let unsupported = |field: &str| {
        Err(
            format!("{what}: transport_socket field `{field}` is not supported by this proxy")
                .into(),
        )
    };
    if !common.tls_certificates.is_empty() {
        return unsupported("common_tls_context.tls_certificates");
    }
    if common
        .tls_certificate_sds_secret_configs
        .iter()
        .any(|s| s.name != WORKLOAD_SECRET)
    {
        return unsupported("common_tls_context.tls_certificate_sds_secret_configs");
    }
    let validation = match common.validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContext(v)) => v,
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            c.default_validation_context.unwrap_or_default()
        }
        _ => return unsupported("common_tls_context.validation_context_type"),
    };
    let mut identities = Vec::new();
    for m in &validation.match_typed_subject_alt_names {
        let exact = match m.matcher.as_ref().and_then(|m| m.match_pattern.as_ref()) {
            Some(string_matcher::MatchPattern::Exact(id)) => id,
            _ => return unsupported("match_typed_subject_alt_names (other than exact)"),
        };
        if m.san_type != subject_alt_name_matcher::SanType::Uri as i32 {
            return unsupported("match_typed_subject_alt_names (other than URI)");
        }
        identities.push(exact.clone());
    }
    if identities.is_empty() {
        return Err(format!(
            "{what}: transport_socket names no SPIFFE ID (URI SAN) for the peer; \
             this proxy verifies every upstream identity"
        )
        .into());
    }
    Ok(identities)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_control_plane_writes_the_proxy_reads() {
        let ids = vec!["spiffe://cluster.local/ns/default/sa/backend".to_string()];
        assert_eq!(
            peer_identities("cluster `b`", &upstream_mtls(&ids)).unwrap(),
            ids
        );
    }

    #[test]
    fn a_context_without_identities_is_refused() {
        let err = peer_identities("cluster `b`", &upstream_mtls(&[])).unwrap_err();
        assert!(err.to_string().contains("names no SPIFFE ID"), "{err}");
    }
}
