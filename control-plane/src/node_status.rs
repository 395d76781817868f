//! What each connected node has been sent, has ACKed and has NACKed: the heart of `/status`.
//!
//! Only the xDS control path touches this (once per request or push), never a data path, so
//! a plain mutex is fine.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::xds_limits;

#[derive(Debug, Clone, Default)]
pub struct TypeStatus {
    pub sent_version: Option<u64>,
    /// When the last push went out, until its ACK comes back.
    pub sent_at: Option<std::time::Instant>,
    pub acked_version: Option<String>,
    /// Boxed: most nodes never NACK, and a node's status is kept for as long as it is connected.
    pub last_nack: Option<Box<Nack>>,
    pub nacks: u64,
    /// Its last answer for this type was a NACK: it still runs an older config.
    pub refusing: bool,
}

#[derive(Debug, Clone)]
pub struct Nack {
    pub version: String,
    pub message: String,
    pub at_unix: u64,
}

#[derive(Debug, Clone, Default)]
pub struct NodeStatus {
    pub streams: u32,
    pub cluster: String,
    /// The SPIFFE ID it proved, over mTLS.
    pub identity: Option<String>,
    /// By the type's short name (`Cluster`, …), in name order. A node has a few at most, so a
    /// sorted vector: a map's node would hold room for eleven, per node.
    pub types: Vec<(&'static str, TypeStatus)>,
    /// When its last stream closed; a node gone for `NODE_GRACE` is forgotten.
    pub gone_since: Option<std::time::Instant>,
}

/// One node's status, held by each of its streams, so that a push or an ACK updates it
/// without finding the node among all the others.
#[derive(Clone, Default)]
pub struct NodeEntry(Arc<Mutex<NodeStatus>>);

impl NodeEntry {
    fn lock(&self) -> MutexGuard<'_, NodeStatus> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lock order: the registry's, then a node's; a stream's updates take only its node's.
pub struct NodeRegistry {
    nodes: Mutex<BTreeMap<String, NodeEntry>>,
    /// Pushes sent, and the time from each push to its ACK.
    pub pushes: prometheus_client::metrics::counter::Counter,
    pub push_ack: prometheus_client::metrics::histogram::Histogram,
    /// Per-node views of a snapshot built (one per stream per snapshot, not per request).
    pub views_built: prometheus_client::metrics::counter::Counter,
    /// When gone nodes were last swept out.
    swept_at: Mutex<Option<std::time::Instant>>,
}

impl Default for NodeRegistry {
    fn default() -> Self {
        NodeRegistry {
            nodes: Mutex::default(),
            pushes: Default::default(),
            views_built: Default::default(),
            swept_at: Mutex::default(),
            // 1 ms … ~16 s.
            push_ack: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
        }
    }
}

/// The short name of a served type (`…cluster.v3.Cluster` → `Cluster`).
fn short(type_url: &str) -> &'static str {
    let served = crate::translate::PUSH_ORDER
        .iter()
        .find(|t| **t == type_url)
        .copied()
        .unwrap_or("unknown");
    served.rsplit('.').next().unwrap_or(served)
}

impl NodeStatus {
    /// The status of one served type, added (in name order) at its first use.
    fn of_type(&mut self, type_url: &str) -> &mut TypeStatus {
        let name = short(type_url);
        let at = match self.types.binary_search_by(|(t, _)| (*t).cmp(name)) {
            Ok(at) => at,
            Err(at) => {
                self.types.insert(at, (name, TypeStatus::default()));
                at
            }
        };
        &mut self.types[at].1
    }
}

impl NodeRegistry {
    /// Runs `f` on a node already registered; what a node says of a type the control plane
    /// does not serve is not kept.
    fn with<R: Default>(
        &self,
        node: &NodeEntry,
        type_url: &str,
        f: impl FnOnce(&mut NodeStatus) -> R,
    ) -> R {
        if !xds_limits::served(type_url) {
            return R::default();
        }
        f(&mut node.lock())
    }

    /// Registers one more stream of `node`, or says why it may not open: too many streams
    /// for one node, or too many nodes (after forgetting those gone past their grace).
    pub fn connected(
        &self,
        node: &str,
        cluster: &str,
        identity: Option<String>,
    ) -> Result<NodeEntry, tonic::Status> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if !nodes.contains_key(node) && nodes.len() >= xds_limits::MAX_NODES {
            nodes.retain(|_, n| {
                let n = n.lock();
                n.streams > 0
                    || n.gone_since
                        .is_none_or(|t| t.elapsed() < xds_limits::NODE_GRACE)
            });
            if nodes.len() >= xds_limits::MAX_NODES {
                // Still full: the longest-gone nodes make room, never a connected one.
                let mut gone: Vec<_> = nodes
                    .iter()
                    .filter_map(|(id, n)| {
                        let n = n.lock();
                        n.gone_since
                            .filter(|_| n.streams == 0)
                            .map(|t| (t, id.clone()))
                    })
                    .collect();
                gone.sort();
                for (_, id) in gone
                    .into_iter()
                    .take(nodes.len() + 1 - xds_limits::MAX_NODES)
                {
                    nodes.remove(&id);
                }
            }
            if nodes.len() >= xds_limits::MAX_NODES {
                return Err(tonic::Status::resource_exhausted(
                    "too many nodes connected",
                ));
            }
        }
        let entry = nodes.entry(node.to_string()).or_default().clone();
        let mut n = entry.lock();
        if n.streams >= xds_limits::MAX_STREAMS_PER_NODE {
            return Err(tonic::Status::resource_exhausted(format!(
                "node `{node}` already has {} streams open",
                n.streams
            )));
        }
        n.streams += 1;
        n.gone_since = None;
        n.cluster = cluster.to_string();
        n.identity = identity;
        drop(n);
        Ok(entry)
    }

    pub fn disconnected(&self, node: &str) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = nodes.get(node) {
            let mut n = n.lock();
            n.streams = n.streams.saturating_sub(1);
            if n.streams == 0 {
                n.gone_since = Some(std::time::Instant::now());
            }
        }
        // Forgetting is done here, where nodes leave, so the registry never grows with churn;
        // at most every tenth of the grace, so that a wave of disconnects is not a wave of
        // full sweeps.
        let now = std::time::Instant::now();
        let mut swept = self.swept_at.lock().unwrap_or_else(|p| p.into_inner());
        if swept.is_some_and(|t| now - t < xds_limits::NODE_GRACE / 10) {
            return;
        }
        *swept = Some(now);
        nodes.retain(|_, n| {
            let n = n.lock();
            n.streams > 0
                || n.gone_since
                    .is_none_or(|t| now - t < xds_limits::NODE_GRACE)
        });
    }

    pub fn sent(&self, node: &NodeEntry, type_url: &str, version: u64) {
        self.with(node, type_url, |n| {
            let t = n.of_type(type_url);
            t.sent_version = Some(version);
            t.sent_at = Some(std::time::Instant::now());
        });
        self.pushes.inc();
    }

    pub fn acked(&self, node: &NodeEntry, type_url: &str, version: &str) {
        let waited = self.with(node, type_url, |n| {
            let t = n.of_type(type_url);
            t.acked_version = Some(xds_limits::truncate(version, xds_limits::MAX_NAME).to_string());
            t.refusing = false;
            t.sent_at.take().map(|at| at.elapsed())
        });
        if let Some(waited) = waited {
            self.push_ack.observe(waited.as_secs_f64());
        }
    }

    /// Each node's NACK count, for the metrics page.
    pub fn nacks_per_node(&self) -> Vec<(String, u64)> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .iter()
            .map(|(id, n)| {
                (
                    id.clone(),
                    n.lock().types.iter().map(|(_, t)| t.nacks).sum(),
                )
            })
            .collect()
    }

    pub fn nacked(&self, node: &NodeEntry, type_url: &str, version: &str, message: &str) {
        let at_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.with(node, type_url, |n| {
            let t = n.of_type(type_url);
            t.nacks += 1;
            t.refusing = true;
            t.sent_at = None;
            t.last_nack = Some(Box::new(Nack {
                version: xds_limits::truncate(version, xds_limits::MAX_NAME).to_string(),
                message: xds_limits::truncate(message, xds_limits::MAX_MESSAGE).to_string(),
                at_unix,
            }));
        });
    }

    /// Each node's trouble for `check`: a type it refuses, a push it has not answered within
    /// `behind_after`, or a stream it lost; with a hint.
    pub fn problems(
        &self,
        behind_after: std::time::Duration,
    ) -> Vec<(String, String, &'static str)> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (id, n) in nodes.iter() {
            let n = n.lock();
            if let Some(gone) = n.gone_since.filter(|_| n.streams == 0) {
                out.push((
                    id.clone(),
                    format!(
                        "lost its stream {} ago and has not come back",
                        outrigger_core::duration::coarse(gone.elapsed())
                    ),
                    "is the proxy running? Its log says why it cannot reach the control plane",
                ));
                continue;
            }
            for (t, s) in &n.types {
                if s.refusing {
                    let why = s.last_nack.as_ref().map_or("", |k| k.message.as_str());
                    out.push((
                        id.clone(),
                        format!(
                            "refuses {t} version {} (runs {}): {why}",
                            s.sent_version.map_or("?".into(), |v| v.to_string()),
                            s.acked_version.as_deref().unwrap_or("nothing")
                        ),
                        "the message says which field; fix the mesh file or route that made it",
                    ));
                } else if let Some(waited) = s
                    .sent_at
                    .map(|at| at.elapsed())
                    .filter(|w| *w >= behind_after)
                {
                    out.push((
                        id.clone(),
                        format!(
                            "has not answered {t} version {} for {}",
                            s.sent_version.map_or("?".into(), |v| v.to_string()),
                            outrigger_core::duration::coarse(waited)
                        ),
                        "the proxy may be overloaded or stuck: look at its /ready and log",
                    ));
                }
            }
        }
        out
    }

    /// A node's service as it claimed it, the identity it proved, and its per-type status.
    pub fn node(&self, node: &str) -> Option<NodeStatus> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.get(node).map(|n| n.lock().clone())
    }

    pub fn connected_count(&self) -> usize {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|n| n.lock().streams > 0)
            .count()
    }

    pub fn to_json(&self) -> Value {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let entries: serde_json::Map<String, Value> = nodes
            .iter()
            .map(|(id, n)| {
                let n = n.lock();
                let types: serde_json::Map<String, Value> = n
                    .types
                    .iter()
                    .map(|(t, s)| {
                        (t.to_string(), json!({
                            "sent_version": s.sent_version.map(|v| v.to_string()),
                            "acked_version": s.acked_version,
                            "nacks": s.nacks,
                            "refusing": s.refusing,
                            "last_nack": s.last_nack.as_ref().map(|k| json!({
                                "version": k.version, "message": k.message, "at_unix": k.at_unix,
                            })),
                        }))
                    })
                    .collect();
                (id.clone(), json!({ "connected": n.streams > 0, "streams": n.streams, "cluster": n.cluster, "types": types }))
            })
            .collect();
        Value::Object(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::{CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE};

    #[test]
    fn a_node_keeps_one_status_per_served_type_in_name_order() {
        let nodes = NodeRegistry::default();
        let a = nodes.connected("a", "svc", None).unwrap();
        nodes.sent(&a, ROUTE_TYPE, 3);
        nodes.sent(&a, CLUSTER_TYPE, 3);
        nodes.sent(&a, ENDPOINT_TYPE, 3);
        nodes.acked(&a, CLUSTER_TYPE, "3");
        nodes.nacked(&a, ROUTE_TYPE, "3", "bad route");
        nodes.sent(&a, "type.googleapis.com/not.Served", 3);
        nodes.sent(&a, ROUTE_TYPE, 4);

        let a = nodes.node("a").unwrap();
        let names: Vec<_> = a.types.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            names,
            ["Cluster", "ClusterLoadAssignment", "RouteConfiguration"]
        );
        let route = &a
            .types
            .iter()
            .find(|(t, _)| *t == "RouteConfiguration")
            .unwrap()
            .1;
        assert_eq!(
            (route.sent_version, route.nacks, route.refusing),
            (Some(4), 1, true)
        );
        assert_eq!(route.last_nack.as_ref().unwrap().message, "bad route");

        let json = nodes.to_json();
        assert_eq!(json["a"]["types"]["Cluster"]["acked_version"], "3");
        assert_eq!(json["a"]["types"]["RouteConfiguration"]["nacks"], 1);
        assert_eq!(nodes.nacks_per_node(), [("a".to_string(), 1)]);
    }
}
