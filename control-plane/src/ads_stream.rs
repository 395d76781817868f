//! One ADS stream, whichever the variant: requests in, pushes out on every snapshot change, in
//! push order. State of the world (`ads.rs`) and delta (`ads_delta.rs`) differ only in what
//! the `Protocol` trait hides.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use envoy_types::pb::envoy::config::core::v3::Node;
use futures_util::SinkExt;
use tonic::Status;

use crate::ads_transport::{OutboundTx, Requests};
use crate::node_status::NodeRegistry;
use crate::snapshot::{Publisher, Snapshot};
use crate::translate::PUSH_ORDER;
use crate::xds_limits;
use outrigger_core::spiffe::SpiffeId;
use outrigger_core::xds_inbound::INBOUND_ADDRESS_METADATA;
use outrigger_core::xds_sds;

/// What differs between state-of-the-world and delta; the stream loop is shared.
pub(crate) trait Protocol: Sized + Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: Send + 'static;
    fn node(req: &Self::Request) -> Option<&Node>;
    /// Refuses a request whose strings or lists exceed what a stream may make us hold.
    fn check(req: &Self::Request) -> Result<(), Status>;
    fn open(node: String, out: OutboundTx, nodes: Arc<NodeRegistry>, nonce: Arc<AtomicU64>)
    -> Self;
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
///
/// The task waits here for most of its life, and a task holds room for the largest state it
/// ever awaits in, for as long as it lives. So the loop only waits for the next event, and
/// each event is handled in a boxed future that is freed when it is done.
pub(crate) async fn run_stream<P: Protocol>(
    proven: Option<SpiffeId>,
    mut inbound: Requests<P::Request>,
    out: OutboundTx,
    publisher: Arc<Publisher>,
    nodes: Arc<NodeRegistry>,
    nonce: Arc<AtomicU64>,
) {
    let mut state = StreamState::<P> {
        snapshots: publisher.subscribe(),
        stream: None,
        facts: NodeFacts::default(),
        views: ViewCache::default(),
        proven,
        out,
        nodes,
        nonce,
    };
    loop {
        // The request is boxed before any await: the select's own output holds it otherwise,
        // in the task, for as long as the stream lives.
        let event = tokio::select! {
            msg = inbound.message() => Event::Request(msg.ok().flatten().map(Box::new)),
            changed = state.snapshots.changed() => Event::Changed(changed.is_ok()),
        };
        let open = match event {
            Event::Request(Some(req)) => Box::pin(state.on_request(*req)).await,
            Event::Changed(true) => Box::pin(state.on_change()).await,
            Event::Request(None) | Event::Changed(false) => false,
        };
        if !open {
            break;
        }
    }
    if let Some(s) = state.stream {
        tracing::info!(node = %s.node_id(), "ADS stream closed");
        state.nodes.disconnected(s.node_id());
    }
}

/// What a stream waits for: a request (none when the client is done or the stream broke), or
/// a new snapshot (false when the publisher is gone).
enum Event<R> {
    Request(Option<Box<R>>),
    Changed(bool),
}

/// What a stream keeps between events.
struct StreamState<P> {
    snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    /// Opened by the node's first request.
    stream: Option<P>,
    /// What the node's first request says of it.
    facts: NodeFacts,
    /// The node's view of the last snapshot: a request that changes nothing rebuilds nothing.
    views: ViewCache,
    proven: Option<SpiffeId>,
    out: OutboundTx,
    nodes: Arc<NodeRegistry>,
    nonce: Arc<AtomicU64>,
}

impl<P: Protocol> StreamState<P> {
    /// One request; false when the stream is to end.
    async fn on_request(&mut self, req: P::Request) -> bool {
        if let Err(status) = P::check(&req) {
            let _ = self.out.send(Err(status)).await;
            return false;
        }
        if self.stream.is_none() {
            let node = P::node(&req)
                .map(|n| n.id.clone())
                .unwrap_or_else(|| "unknown".into());
            let cluster = P::node(&req).map(|n| n.cluster.clone()).unwrap_or_default();
            let admitted = xds_limits::check_node(&node, &cluster)
                .and_then(|()| NodeFacts::of(P::node(&req)))
                .and_then(|f| {
                    let proven = self.proven.as_ref().map(|p| p.to_string());
                    self.nodes.connected(&node, &cluster, proven).map(|()| f)
                });
            match admitted {
                Ok(f) => self.facts = f,
                Err(status) => {
                    tracing::warn!(node = %xds_limits::truncate(&node, xds_limits::MAX_NAME), error = %status.message(), "ADS stream refused");
                    let _ = self.out.send(Err(status)).await;
                    return false;
                }
            }
            tracing::info!(%node, "ADS stream opened");
            self.stream = Some(P::open(
                node,
                self.out.clone(),
                self.nodes.clone(),
                self.nonce.clone(),
            ));
        }
        let base = self.snapshots.borrow().clone();
        let snapshot = self.views.get(base, &self.proven, &self.facts, &self.nodes);
        let s = self.stream.as_mut().expect("opened above");
        s.on_request(req, &snapshot).await
    }

    /// A new snapshot: each type the node lacks, in push order; false when the stream is gone.
    async fn on_change(&mut self) -> bool {
        let base = self.snapshots.borrow_and_update().clone();
        let snapshot = self.views.get(base, &self.proven, &self.facts, &self.nodes);
        if let Some(s) = self.stream.as_mut() {
            for type_url in PUSH_ORDER {
                if !s.push(&snapshot, type_url, false).await {
                    // As before: a push that finds the stream gone stops this round; the
                    // next request or change notices the stream is closed.
                    break;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

    /// A control plane holds one of these per connected proxy, for the proxy's life: its
    /// size is memory per stream (2.9 KB before requests were boxed out of the wait).
    #[test]
    fn a_waiting_stream_holds_about_a_kilobyte() {
        let publisher = std::sync::Arc::new(crate::snapshot::Publisher::default());
        let (tx, _rx) = crate::ads_transport::outbound(1);
        let inbound =
            crate::ads_transport::requests::<DiscoveryRequest>(tonic::body::Body::empty(), 1024);
        let task = super::run_stream::<crate::ads::SotwStream>(
            None,
            inbound,
            tx,
            publisher,
            Default::default(),
            Default::default(),
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1280, "the stream task is {size} bytes");
    }
}
