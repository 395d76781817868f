//! What each connected node has been sent, has ACKed and has NACKed: the heart of `/status`.
//!
//! Only the xDS control path touches this (once per request or push), never a data path, so
//! a plain mutex is fine.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

#[derive(Debug, Clone, Default)]
pub struct TypeStatus {
    pub sent_version: Option<u64>,
    /// When the last push went out, until its ACK comes back.
    pub sent_at: Option<std::time::Instant>,
    pub acked_version: Option<String>,
    pub last_nack: Option<Nack>,
    pub nacks: u64,
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
    pub types: BTreeMap<String, TypeStatus>,
}

#[derive(Default)]
pub struct NodeRegistry {
    nodes: Mutex<BTreeMap<String, NodeStatus>>,
    /// Pushes sent, and the time from each push to its ACK (sum and count).
    pushes: Mutex<PushStats>,
}

#[derive(Default, Clone, Copy)]
pub struct PushStats {
    pub sent: u64,
    pub acked: u64,
    pub ack_seconds_sum: f64,
}

fn short(type_url: &str) -> String {
    type_url.rsplit('.').next().unwrap_or(type_url).to_string()
}

impl NodeRegistry {
    fn with<R>(&self, node: &str, f: impl FnOnce(&mut NodeStatus) -> R) -> R {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        f(nodes.entry(node.to_string()).or_default())
    }

    pub fn connected(&self, node: &str, cluster: &str) {
        self.with(node, |n| {
            n.streams += 1;
            n.cluster = cluster.to_string();
        });
    }

    pub fn disconnected(&self, node: &str) {
        self.with(node, |n| n.streams = n.streams.saturating_sub(1));
    }

    pub fn sent(&self, node: &str, type_url: &str, version: u64) {
        self.with(node, |n| {
            let t = n.types.entry(short(type_url)).or_default();
            t.sent_version = Some(version);
            t.sent_at = Some(std::time::Instant::now());
        });
        self.pushes.lock().unwrap_or_else(|p| p.into_inner()).sent += 1;
    }

    pub fn acked(&self, node: &str, type_url: &str, version: &str) {
        let waited = self.with(node, |n| {
            let t = n.types.entry(short(type_url)).or_default();
            t.acked_version = Some(version.to_string());
            t.sent_at.take().map(|at| at.elapsed())
        });
        if let Some(waited) = waited {
            let mut stats = self.pushes.lock().unwrap_or_else(|p| p.into_inner());
            stats.acked += 1;
            stats.ack_seconds_sum += waited.as_secs_f64();
        }
    }

    pub fn push_stats(&self) -> PushStats {
        *self.pushes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn nacked(&self, node: &str, type_url: &str, version: &str, message: &str) {
        let at_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.with(node, |n| {
            let t = n.types.entry(short(type_url)).or_default();
            t.nacks += 1;
            t.last_nack = Some(Nack {
                version: version.to_string(),
                message: message.to_string(),
                at_unix,
            });
        });
    }

    pub fn connected_count(&self) -> usize {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|n| n.streams > 0)
            .count()
    }

    pub fn to_json(&self) -> Value {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let entries: serde_json::Map<String, Value> = nodes
            .iter()
            .map(|(id, n)| {
                let types: serde_json::Map<String, Value> = n
                    .types
                    .iter()
                    .map(|(t, s)| {
                        (t.clone(), json!({
                            "sent_version": s.sent_version.map(|v| v.to_string()),
                            "acked_version": s.acked_version,
                            "nacks": s.nacks,
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
