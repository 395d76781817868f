//! How the cluster's watches are doing, for `/status` and `/metrics`: each kind's last error,
//! shown until that kind's collection answers well again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::gateway_routes::Outcomes;
use crate::kube_client::ApiCalls;
use crate::policy_attachment::PolicyOutcomes;

/// How the watches are doing, for `/status` and `/metrics`.
#[derive(Default)]
pub struct ClusterHealth {
    /// Each kind's last error: its collection's path, the error and when it came.
    errors: Mutex<BTreeMap<&'static str, (String, String, Instant)>>,
    /// Errors seen from the API server since start, all kinds together.
    pub errors_total: AtomicU64,
    /// Every kind has been listed once: the view is the cluster's, not a partial one.
    pub synced: AtomicBool,
    /// The client's requests, once the cluster is watched.
    pub calls: OnceLock<Arc<ApiCalls>>,
    /// What became of each HTTPRoute and GRPCRoute.
    routes: Mutex<Outcomes>,
    /// What became of each policy, by kind.
    policies: Mutex<BTreeMap<&'static str, PolicyOutcomes>>,
}

impl ClusterHealth {
    pub fn failed(&self, kind: &'static str, path: &str, error: String) {
        self.errors_total.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .insert(kind, (path.to_string(), error, Instant::now()));
    }

    pub fn set_policies(&self, kind: &'static str, outcomes: PolicyOutcomes) {
        self.policies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(kind, outcomes);
    }

    pub fn policies(&self, kind: &str) -> PolicyOutcomes {
        self.policies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(kind)
            .cloned()
            .unwrap_or_default()
    }

    pub fn set_routes(&self, outcomes: Outcomes) {
        *self.routes.lock().unwrap_or_else(|p| p.into_inner()) = outcomes;
    }

    pub fn routes(&self) -> Outcomes {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Each failing kind with its last error: one its collection has not answered well
    /// since.
    pub fn errors(&self) -> BTreeMap<&'static str, String> {
        let calls = self.calls.get();
        self.lock()
            .iter()
            .filter(|(_, (path, _, at))| {
                calls
                    .and_then(|c| c.answered(path))
                    .is_none_or(|ok| ok < *at)
            })
            .map(|(kind, (_, error, _))| (*kind, error.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, (String, String, Instant)>> {
        self.errors.lock().unwrap_or_else(|p| p.into_inner())
    }
}
