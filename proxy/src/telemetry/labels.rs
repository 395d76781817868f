//! The label sets of the proxy's metric families. Every value comes from config (listener,
//! route, cluster names) or from a fixed list, never from a request, so the number of series
//! is bounded by the config.

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;

/// The empty label value, shared: a request without a peer identity allocates none.
pub(super) fn empty() -> Arc<str> {
    static EMPTY: OnceLock<Arc<str>> = OnceLock::new();
    EMPTY.get_or_init(|| Arc::from("")).clone()
}

/// A gRPC status as a label: the upstream sends any text it likes, so only the 17 codes
/// gRPC defines (and "unknown", for a call that never finished) are kept as they are.
pub(super) fn grpc_status_label(status: Option<&str>) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    match status {
        None => "",
        Some("unknown") => "unknown",
        Some(s) => CODES.iter().find(|c| **c == s).copied().unwrap_or("other"),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RequestLabels {
    pub(super) direction: &'static str,
    /// Route names and identities are shared, not copied: a lookup costs no allocation.
    pub(super) route: Arc<str>,
    pub(super) status: u16,
    /// Empty unless the response is gRPC.
    pub(super) grpc_status: &'static str,
    /// The caller's SPIFFE ID on an mTLS listener, else empty: bounded by the mesh's workloads.
    pub(super) peer: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RouteLabels {
    pub(super) direction: &'static str,
    pub(super) route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ListenerLabels {
    pub(super) listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ConnectionLabels {
    pub(super) listener: String,
    pub(super) protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ResultLabels {
    pub(super) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct XdsLabels {
    /// The resource type: Cluster, ClusterLoadAssignment, RouteConfiguration.
    pub(super) resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DropLabels {
    pub(super) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DeniedLabels {
    pub(super) listener: String,
    /// Bounded by the workloads in the mesh; "none" for a caller without an identity.
    pub(super) peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OverflowLabels {
    pub(super) cluster: String,
    pub(super) limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ClusterLabels {
    pub(super) cluster: String,
}
