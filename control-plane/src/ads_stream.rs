//! One ADS stream, whichever the variant: requests in, pushes out on every snapshot change, in
//! push order. State of the world (`ads.rs`) and delta (`ads_delta.rs`) differ only in what
//! the `Protocol` trait hides.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use futures_util::SinkExt;
use tonic::Status;

use crate::ads_transport::{OutboundTx, Requests};
use crate::node_status::{NodeEntry, NodeRegistry};
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
    fn open(link: StreamLink) -> Self;
    fn link(&self) -> &StreamLink;
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

/// What either protocol's side of a stream holds of it: the node, where its responses go, and
/// where what it was sent and what it answered are recorded.
pub(crate) struct StreamLink {
    pub node: String,
    /// The node's status, which the stream's pushes and ACKs update.
    entry: NodeEntry,
    pub out: OutboundTx,
    nodes: Arc<NodeRegistry>,
    nonce: Arc<AtomicU64>,
}

impl StreamLink {
    /// A nonce no other response of this control plane has carried.
    pub fn next_nonce(&self) -> String {
        self.nonce
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string()
    }

    pub fn sent(&self, type_url: &str, version: u64) {
        self.nodes.sent(&self.entry, type_url, version);
    }

    pub fn acked(&self, type_url: &str, version: &str) {
        self.nodes.acked(&self.entry, type_url, version);
    }

    pub fn nacked(&self, type_url: &str, version: &str, message: &str) {
        self.nodes.nacked(&self.entry, type_url, version, message);
    }
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
#[derive(Default, Clone, PartialEq, Eq, Hash)]
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

/// Who a node is, as far as its view goes: streams whose nodes are the same see the same view.
#[derive(Default, Clone, PartialEq, Eq, Hash)]
struct Viewer {
    proven: Option<SpiffeId>,
    facts: NodeFacts,
}

/// Views of the latest snapshot, by viewer, shared by every stream: the replicas of a service
/// see the same view, so a change builds one view per service rather than one per proxy.
/// Only one snapshot's views are kept; the first stream to come with a newer snapshot drops
/// them. At most `MAX_SHARED_VIEWS` are kept; a stream past that builds its own.
#[derive(Default)]
pub(crate) struct SharedViews(Mutex<Option<ViewsOf>>);

/// A snapshot, and its views by viewer.
type ViewsOf = (Arc<Snapshot>, HashMap<Viewer, Arc<Snapshot>>);

const MAX_SHARED_VIEWS: usize = 16_384;

impl SharedViews {
    /// The view of `base` for `who`, built by `build` if no stream has built it yet. The lock
    /// is not held while building: two streams may build the same view, and one is kept.
    fn get_or_build(
        &self,
        base: &Arc<Snapshot>,
        who: &Viewer,
        build: impl FnOnce() -> Arc<Snapshot>,
    ) -> Arc<Snapshot> {
        let lock = || self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, views)) = &*lock()
            && Arc::ptr_eq(seen, base)
            && let Some(view) = views.get(who)
        {
            return view.clone();
        }
        let fresh = build();
        let mut current = lock();
        let views = match &mut *current {
            Some((seen, views)) if Arc::ptr_eq(seen, base) => views,
            other => &mut other.insert((base.clone(), HashMap::new())).1,
        };
        if views.len() >= MAX_SHARED_VIEWS {
            return fresh;
        }
        views.entry(who.clone()).or_insert(fresh).clone()
    }
}

/// The last snapshot a stream saw and the node's view of it: a request that changes nothing
/// takes nothing shared.
#[derive(Default)]
struct ViewCache(Option<(Arc<Snapshot>, Arc<Snapshot>)>);

impl ViewCache {
    fn get(
        &mut self,
        base: Arc<Snapshot>,
        who: &Viewer,
        shared: &SharedViews,
        nodes: &NodeRegistry,
    ) -> Arc<Snapshot> {
        if let Some((seen, view)) = &self.0
            && Arc::ptr_eq(seen, &base)
        {
            return view.clone();
        }
        let fresh = shared.get_or_build(&base, who, || match &self.0 {
            // A node that sees the whole mesh as it is sees the new one as it is.
            Some((seen, view))
                if Arc::ptr_eq(seen, view) && only_endpoints_changed(seen, &base) =>
            {
                base.clone()
            }
            // Only endpoints moved (pods came and went): the view keeps everything else, and
            // takes the new endpoints of the clusters it already holds.
            Some((seen, view)) if only_endpoints_changed(seen, &base) => {
                Arc::new(view.with_endpoints_from(seen, &base))
            }
            _ => {
                nodes.views_built.inc();
                view(base.clone(), &who.proven, &who.facts)
            }
        });
        self.0 = Some((base, fresh.clone()));
        fresh
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
    shared: Arc<SharedViews>,
) {
    let mut state = StreamState::<P> {
        snapshots: publisher.subscribe(),
        shared,
        stream: None,
        who: Viewer {
            proven,
            facts: NodeFacts::default(),
        },
        views: ViewCache::default(),
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
        tracing::info!(node = %s.link().node, "ADS stream closed");
        state.nodes.disconnected(&s.link().node);
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
    /// The views every stream shares.
    shared: Arc<SharedViews>,
    /// Opened by the node's first request.
    stream: Option<P>,
    /// The identity it proved, and what its first request says of it.
    who: Viewer,
    /// The node's view of the last snapshot: a request that changes nothing rebuilds nothing.
    views: ViewCache,
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
                    let proven = self.who.proven.as_ref().map(|p| p.to_string());
                    self.nodes
                        .connected(&node, &cluster, proven)
                        .map(|entry| (f, entry))
                });
            let entry = match admitted {
                Ok((f, entry)) => {
                    self.who.facts = f;
                    entry
                }
                Err(status) => {
                    tracing::warn!(node = %xds_limits::truncate(&node, xds_limits::MAX_NAME), error = %status.message(), "ADS stream refused");
                    let _ = self.out.send(Err(status)).await;
                    return false;
                }
            };
            tracing::info!(%node, "ADS stream opened");
            self.stream = Some(P::open(StreamLink {
                node,
                entry,
                out: self.out.clone(),
                nodes: self.nodes.clone(),
                nonce: self.nonce.clone(),
            }));
        }
        let base = self.snapshots.borrow().clone();
        let snapshot = self.views.get(base, &self.who, &self.shared, &self.nodes);
        let s = self.stream.as_mut().expect("opened above");
        s.on_request(req, &snapshot).await
    }

    /// A new snapshot: each type the node lacks, in push order; false when the stream is gone.
    async fn on_change(&mut self) -> bool {
        let base = self.snapshots.borrow_and_update().clone();
        let snapshot = self.views.get(base, &self.who, &self.shared, &self.nodes);
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
    use std::sync::Arc;

    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

    use super::{NodeFacts, SharedViews, Viewer};
    use crate::snapshot::Snapshot;

    fn viewer(cluster: &str) -> Viewer {
        Viewer {
            proven: None,
            facts: NodeFacts {
                cluster: cluster.into(),
                ..Default::default()
            },
        }
    }

    /// Replicas share one view of a snapshot; another service, or the next snapshot, gets a
    /// view of its own.
    #[test]
    fn replicas_share_a_view_until_the_snapshot_changes() {
        let shared = SharedViews::default();
        let base = Arc::new(Snapshot::default());
        let mut builds = 0;
        let mut get = |base: &Arc<Snapshot>, who: &Viewer| {
            shared.get_or_build(base, who, || {
                builds += 1;
                Arc::new(Snapshot::default())
            })
        };
        let first = get(&base, &viewer("a"));
        let replica = get(&base, &viewer("a"));
        assert!(Arc::ptr_eq(&first, &replica));
        let other = get(&base, &viewer("b"));
        assert!(!Arc::ptr_eq(&first, &other));
        let next = Arc::new(Snapshot::default());
        let after = get(&next, &viewer("a"));
        assert!(!Arc::ptr_eq(&first, &after));
        assert_eq!(builds, 3);
        // The old snapshot's views are gone: only the new one's are held.
        let held = shared.0.lock().unwrap();
        let (seen, views) = held.as_ref().unwrap();
        assert!(Arc::ptr_eq(seen, &next));
        assert_eq!(views.len(), 1);
    }

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
            Default::default(),
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1280, "the stream task is {size} bytes");
    }
}
