//! One ADS stream, whichever the variant: requests in, pushes out on every snapshot change, in
//! push order. State of the world (`ads.rs`) and delta (`ads_delta.rs`) differ only in what
//! the `Protocol` trait hides.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::ads_transport::Outbound;
use crate::node_status::NodeRegistry;
use crate::snapshot::{Publisher, Snapshot};
use crate::translate::PUSH_ORDER;
use crate::xds_limits;
use outrigger_core::spiffe::SpiffeId;
use outrigger_core::xds_inbound::INBOUND_ADDRESS_METADATA;
use outrigger_core::xds_sds;

/// What differs between state-of-the-world and delta; the stream loop is shared.
pub(crate) trait Protocol: Sized + Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    fn node(req: &Self::Request) -> Option<&Node>;
    /// Refuses a request whose strings or lists exceed what a stream may make us hold.
    fn check(req: &Self::Request) -> Result<(), Status>;
    fn open(
        node: String,
        out: mpsc::Sender<Outbound>,
        nodes: Arc<NodeRegistry>,
        nonce: Arc<AtomicU64>,
    ) -> Self;
    fn node_id(&self) -> &str;
    /// Handles one request; false when the stream is gone.
    fn on_request(
        &mut self,
        req: Self::Request,
        snapshot: &Snapshot,
    ) -> impl Future<Output = bool> + Send;
    /// Pushes `type_url` if the client lacks its current state; false when the stream is gone.
    fn push(
        &mut self,
        snapshot: &Snapshot,
        type_url: &str,
        force: bool,
    ) -> impl Future<Output = bool> + Send;
}

/// What the node sees. Only a node that proved its identity gets its workload secret: the
/// secret names files, but it is the node's own.
fn view(snapshot: Arc<Snapshot>, proven: &Option<SpiffeId>, node: &NodeFacts) -> Arc<Snapshot> {
    let mut view = match proven {
        Some(id) => snapshot
            .view_for_identity(id)
            .with_workload_secret(&node.cert_dir),
        None => snapshot.view_for(&node.cluster),
    };
    if node.grpc {
        let service = snapshot.service_of(proven.as_ref(), &node.cluster);
        view = view.for_grpc(service.as_deref());
    }
    match node.inbound_address {
        Some(address) => view.with_inbound_address(address),
        None => view,
    }
}

/// What a stream's first request says about its node.
#[derive(Default)]
struct NodeFacts {
    /// The node's service: it decides the node's scope.
    cluster: String,
    /// Where its certificate files are (`OUTRIGGER_CERT_DIR` in its metadata).
    cert_dir: String,
    /// Where it binds its inbound listener, if not the default (`OUTRIGGER_INBOUND_ADDRESS`).
    inbound_address: Option<std::net::SocketAddr>,
    /// A proxyless gRPC client or server (its user agent says so): it takes certificate
    /// providers instead of SDS, and server Listeners by address.
    grpc: bool,
}

impl NodeFacts {
    fn of(node: Option<&Node>) -> Result<NodeFacts, Status> {
        use envoy_types::pb::google::protobuf::value::Kind;
        let cert_dir = node
            .and_then(|n| n.metadata.as_ref())
            .and_then(|m| m.fields.get(xds_sds::CERT_DIR_METADATA))
            .map(|v| match &v.kind {
                Some(Kind::StringValue(dir)) if xds_sds::valid_cert_dir(dir) => Ok(dir.clone()),
                _ => Err(Status::invalid_argument(format!(
                    "node.metadata.{}: an absolute path without `..`, at most 512 bytes",
                    xds_sds::CERT_DIR_METADATA
                ))),
            })
            .transpose()?
            .unwrap_or_else(|| xds_sds::DEFAULT_CERT_DIR.into());
        let inbound_address = node
            .and_then(|n| n.metadata.as_ref())
            .and_then(|m| m.fields.get(INBOUND_ADDRESS_METADATA))
            .map(|v| match &v.kind {
                Some(Kind::StringValue(a)) => a.parse().map_err(|_| ()),
                _ => Err(()),
            })
            .transpose()
            .map_err(|()| {
                Status::invalid_argument(format!(
                    "node.metadata.{INBOUND_ADDRESS_METADATA}: an IP:port address"
                ))
            })?;
        Ok(NodeFacts {
            cluster: node.map(|n| n.cluster.clone()).unwrap_or_default(),
            cert_dir,
            inbound_address,
            grpc: node.is_some_and(|n| n.user_agent_name.to_ascii_lowercase().starts_with("grpc")),
        })
    }
}

/// The last snapshot a stream saw and the node's view of it.
#[derive(Default)]
struct ViewCache(Option<(Arc<Snapshot>, Arc<Snapshot>)>);

impl ViewCache {
    fn get(
        &mut self,
        base: Arc<Snapshot>,
        proven: &Option<SpiffeId>,
        node: &NodeFacts,
        nodes: &NodeRegistry,
    ) -> Arc<Snapshot> {
        match &self.0 {
            Some((seen, view)) if Arc::ptr_eq(seen, &base) => view.clone(),
            // A node that sees the whole mesh as it is sees the new one as it is.
            Some((seen, view))
                if Arc::ptr_eq(seen, view) && only_endpoints_changed(seen, &base) =>
            {
                self.0 = Some((base.clone(), base.clone()));
                base
            }
            // Only endpoints moved (pods came and went): the view keeps everything else, and
            // takes the new endpoints of the clusters it already holds.
            Some((seen, view)) if only_endpoints_changed(seen, &base) => {
                let fresh = Arc::new(view.with_endpoints_from(seen, &base));
                self.0 = Some((base, fresh.clone()));
                fresh
            }
            _ => {
                nodes.views_built.inc();
                let fresh = view(base.clone(), proven, node);
                self.0 = Some((base, fresh.clone()));
                fresh
            }
        }
    }
}

/// The two snapshots differ in their endpoints only. The clusters, and so every view's set
/// of endpoint names, are the same.
fn only_endpoints_changed(seen: &Snapshot, base: &Snapshot) -> bool {
    PUSH_ORDER
        .iter()
        .all(|t| *t == crate::translate::ENDPOINT_TYPE || seen.version_of(t) == base.version_of(t))
        && seen.version_of(crate::translate::ENDPOINT_TYPE)
            != base.version_of(crate::translate::ENDPOINT_TYPE)
}

/// One ADS stream: requests in, pushes out on every snapshot change, in push order.
pub(crate) async fn run_stream<P: Protocol>(
    proven: Option<SpiffeId>,
    mut inbound: Streaming<P::Request>,
    out: mpsc::Sender<Outbound>,
    publisher: Arc<Publisher>,
    nodes: Arc<NodeRegistry>,
    nonce: Arc<AtomicU64>,
) {
    let mut snapshots = publisher.subscribe();
    let mut stream: Option<P> = None;
    // What the node's first request says of it.
    let mut facts = NodeFacts::default();
    // The node's view of the last snapshot: a request that changes nothing rebuilds nothing.
    let mut views = ViewCache::default();
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Ok(Some(req)) = msg else { break };
                if let Err(status) = P::check(&req) {
                    let _ = out.send(Err(status)).await;
                    break;
                }
                if stream.is_none() {
                    let node = P::node(&req).map(|n| n.id.clone()).unwrap_or_else(|| "unknown".into());
                    let cluster = P::node(&req).map(|n| n.cluster.clone()).unwrap_or_default();
                    let admitted = xds_limits::check_node(&node, &cluster)
                        .and_then(|()| NodeFacts::of(P::node(&req)))
                        .and_then(|f| nodes.connected(&node, &cluster, proven.as_ref().map(|p| p.to_string())).map(|()| f));
                    match admitted {
                        Ok(f) => facts = f,
                        Err(status) => {
                            tracing::warn!(node = %xds_limits::truncate(&node, xds_limits::MAX_NAME), error = %status.message(), "ADS stream refused");
                            let _ = out.send(Err(status)).await;
                            return;
                        }
                    }
                    tracing::info!(%node, "ADS stream opened");
                    stream = Some(P::open(node, out.clone(), nodes.clone(), nonce.clone()));
                }
                let s = stream.as_mut().expect("opened above");
                let snapshot = views.get(snapshots.borrow().clone(), &proven, &facts, &nodes);
                // Boxed, as is each push: a stream spends its life waiting, and its task holds
                // room for the largest thing it ever awaits.
                if !Box::pin(s.on_request(req, &snapshot)).await {
                    break;
                }
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let snapshot = views.get(snapshots.borrow_and_update().clone(), &proven, &facts, &nodes);
                if let Some(s) = stream.as_mut() {
                    for type_url in PUSH_ORDER {
                        if !Box::pin(s.push(&snapshot, type_url, false)).await {
                            break;
                        }
                    }
                }
            }
        }
    }
    if let Some(s) = stream {
        tracing::info!(node = %s.node_id(), "ADS stream closed");
        nodes.disconnected(s.node_id());
    }
}
