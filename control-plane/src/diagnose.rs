//! What is wrong with the mesh, as the control plane sees it: each problem one line with a
//! hint, for `check` (`GET /check` on the admin port).
//!
//! It looks at the mesh file's last error, the cluster's watches and routes, services with no
//! ready endpoint and routes that lead only to such services, the CA's root and the workload
//! certificates it signed, and each proxy's stream: NACKed, behind, or gone.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::mesh::Mesh;
use crate::node_status::NodeRegistry;
use outrigger_core::duration::coarse as human;
use outrigger_core::spiffe::SpiffeId;

/// A proxy this long without ACKing what it was sent is behind.
pub const BEHIND_AFTER: Duration = Duration::from_secs(5);
/// A root with less than this left is near its expiry.
pub const ROOT_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);
/// Identities whose last certificate is remembered.
const MAX_IDENTITIES: usize = 100_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Problem {
    /// Which check found it: `mesh`, `cluster`, `routes`, `endpoints`, `ca`, `certificates`,
    /// `proxies`.
    pub check: String,
    /// What it is about: a file, a service, a route, a node, an identity.
    pub subject: String,
    pub message: String,
    pub hint: String,
}

fn problem(check: &str, subject: impl Into<String>, message: String, hint: &str) -> Problem {
    Problem {
        check: check.into(),
        subject: subject.into(),
        message,
        hint: hint.into(),
    }
}

/// The last certificate signed for each identity: when it ends, and how long it was for.
#[derive(Default)]
pub struct SignedCerts {
    last: Mutex<BTreeMap<String, (SystemTime, Duration)>>,
}

impl SignedCerts {
    pub fn signed(&self, id: &SpiffeId, lifetime: Duration) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let id = id.to_string();
        if last.len() >= MAX_IDENTITIES && !last.contains_key(&id) {
            // Forget the one that ended first: it is the least likely still in use.
            if let Some(oldest) = last.iter().min_by_key(|(_, (end, _))| *end) {
                let oldest = oldest.0.clone();
                last.remove(&oldest);
            }
        }
        last.insert(id, (SystemTime::now() + lifetime, lifetime));
    }

    /// Each identity's last certificate: its end, in Unix seconds.
    pub fn list(&self) -> Vec<(String, u64)> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.iter()
            .map(|(id, (end, _))| (id.clone(), unix(*end)))
            .collect()
    }

    /// Identities whose last certificate has under a third of its life left (a proxy renews
    /// at half), or none: renewal is failing.
    fn problems(&self, now: SystemTime) -> Vec<Problem> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.iter()
            .filter_map(|(id, (end, lifetime))| {
                let message = match end.duration_since(now) {
                    Err(e) => format!(
                        "its last certificate expired {} ago and none was signed since",
                        human(e.duration())
                    ),
                    Ok(left) if left < *lifetime / 3 => format!(
                        "its last certificate expires in {} and none newer was signed",
                        human(left)
                    ),
                    Ok(_) => return None,
                };
                Some(problem(
                    "certificates",
                    id.clone(),
                    message,
                    "its proxies renew at half the lifetime: look at their /ready for the CA's last answer",
                ))
            })
            .collect()
    }
}

/// What the diagnosis reads.
pub struct Inputs<'a> {
    pub mesh: Option<&'a Mesh>,
    /// The mesh file's last refusal: its message, naming file, line and field.
    pub mesh_error: Option<String>,
    pub mesh_file: String,
    /// Errors from the cluster's watches, by resource.
    pub cluster_errors: Vec<(String, String)>,
    /// Gateway API routes the cluster holds that are not accepted or do not resolve.
    pub route_errors: Vec<(String, String)>,
    pub root_not_after: Option<SystemTime>,
    pub signed: &'a SignedCerts,
    pub nodes: &'a NodeRegistry,
    /// Services the proxies' load reports show being called.
    pub called: std::collections::BTreeSet<String>,
}

pub fn diagnose(inputs: &Inputs<'_>) -> Vec<Problem> {
    let now = SystemTime::now();
    let mut out = Vec::new();
    if let Some(e) = &inputs.mesh_error {
        out.push(problem(
            "mesh",
            inputs.mesh_file.clone(),
            e.clone(),
            "fix the file: until then the last good mesh keeps serving",
        ));
    }
    for (resource, e) in &inputs.cluster_errors {
        out.push(problem(
            "cluster",
            resource.clone(),
            e.clone(),
            "check the control plane's RBAC and the API server: the last view keeps serving",
        ));
    }
    for (route, e) in &inputs.route_errors {
        out.push(problem(
            "routes",
            route.clone(),
            e.clone(),
            "see the route's status conditions (kubectl describe)",
        ));
    }
    if let Some(mesh) = inputs.mesh {
        out.extend(mesh_problems(mesh, &inputs.called));
    }
    if let Some(end) = inputs.root_not_after {
        match end.duration_since(now) {
            Err(e) => out.push(problem(
                "ca",
                "root",
                format!("the CA's certificate expired {} ago", human(e.duration())),
                "rotate the root: add the new one to the bundle first (docs/operations.md)",
            )),
            Ok(left) if left < ROOT_WARNING => out.push(problem(
                "ca",
                "root",
                format!("the CA's certificate expires in {}", human(left)),
                "rotate the root: add the new one to the bundle first (docs/operations.md)",
            )),
            Ok(_) => {}
        }
    }
    out.extend(inputs.signed.problems(now));
    out.extend(
        inputs
            .nodes
            .problems(BEHIND_AFTER)
            .into_iter()
            .map(|(node, message, hint)| problem("proxies", node, message, hint)),
    );
    out
}

/// Services that are called (by a route, a `calls` list or the traffic) without a ready
/// endpoint, and routes that lead only to such services. A service nobody calls, a client
/// such as a job, needs no endpoint.
fn mesh_problems(mesh: &Mesh, called: &std::collections::BTreeSet<String>) -> Vec<Problem> {
    let ready: BTreeMap<String, bool> = mesh
        .services
        .values()
        .map(|s| (s.cluster_name(), s.endpoints.iter().any(|(_, w)| *w > 0)))
        .collect();
    let mut called = called.clone();
    for s in mesh.services.values() {
        let own = s.cluster_name();
        called.extend(
            s.routes
                .iter()
                .flat_map(|r| r.backends.iter().map(|(c, _)| c.clone()))
                .filter(|c| *c != own),
        );
        called.extend(s.calls.iter().flatten().cloned());
    }
    let mut out = Vec::new();
    for s in mesh.services.values() {
        let name = s.cluster_name();
        if !ready[&name] && called.contains(&name) {
            out.push(problem(
                "endpoints",
                name.clone(),
                "has no ready endpoint: calls to it fail with 503".into(),
                "are its pods running and ready (or its endpoints listed in the mesh file)?",
            ));
            continue;
        }
        for r in &s.routes {
            let leads = r.backends.iter().filter(|(_, w)| *w > 0);
            if !r.backends.is_empty()
                && leads
                    .clone()
                    .all(|(c, _)| !ready.get(c).copied().unwrap_or(false))
            {
                out.push(problem(
                    "routes",
                    format!("{name}/{}", r.name),
                    "leads only to services with no ready endpoint".into(),
                    "point a backend at a service with endpoints, or give its weight to one",
                ));
            }
        }
    }
    out
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_a_problem_once_a_third_of_its_life_is_left() {
        let signed = SignedCerts::default();
        let id = SpiffeId::parse("spiffe://t/ns/a/sa/web").unwrap();
        signed.signed(&id, Duration::from_secs(3600));
        let now = SystemTime::now();
        assert!(signed.problems(now).is_empty());
        let later = now + Duration::from_secs(2500);
        assert!(signed.problems(later)[0].message.contains("expires in"));
        let after = now + Duration::from_secs(4000);
        assert!(signed.problems(after)[0].message.contains("expired"));
    }
}
