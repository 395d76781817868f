//! Where the mesh comes from: the mesh file (or directory), polled and reloaded when it
//! changes, and the cluster's services folded into it. Both inputs, and the publishing of
//! their merge, sit behind one lock: a file reload and a cluster update each read both and
//! publish while holding it, so neither can publish over the other's newer view.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use outrigger_core::config_error::ConfigError;

use crate::cluster_health::ClusterHealth;
use crate::cluster_source::merge;
use crate::mesh::{Mesh, Service};
use crate::snapshot::Publisher;

/// How often the mesh file is checked for changes.
const POLL: Duration = Duration::from_millis(200);
/// An editor writes a file in more than one step; wait for it to finish.
const DEBOUNCE: Duration = Duration::from_millis(100);

pub struct MeshSource {
    pub path: PathBuf,
    pub publisher: Arc<Publisher>,
    state: Mutex<State>,
    /// How the cluster's watches are doing.
    pub cluster_health: Arc<ClusterHealth>,
    pub last_error: ArcSwapOption<ConfigError>,
    pub rejections: AtomicU64,
}

#[derive(Default)]
struct State {
    /// What the poller compares: every input file's name and content.
    fingerprint: String,
    /// The last good mesh file.
    file: Option<Mesh>,
    /// The cluster's services.
    cluster: Vec<Service>,
}

impl MeshSource {
    pub fn new(path: PathBuf, publisher: Arc<Publisher>) -> Self {
        MeshSource {
            path,
            publisher,
            state: Mutex::default(),
            cluster_health: Arc::default(),
            last_error: ArcSwapOption::empty(),
            rejections: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn reload(&self) -> Result<u64, ConfigError> {
        let source = self.path.display().to_string();
        let mut state = self.state();
        let result = read_inputs(&self.path).and_then(|inputs| {
            state.fingerprint = fingerprint(&inputs);
            Mesh::parse_many(&inputs)
        });
        match result {
            Ok(mesh) => {
                self.publisher.publish(merge(&mesh, &state.cluster));
                state.file = Some(mesh);
                self.last_error.store(None);
                let version = self.publisher.current().mesh_version;
                tracing::info!(version, file = %source, "mesh accepted");
                Ok(version)
            }
            Err(e) => {
                tracing::error!(error = %e, "mesh rejected; the last good mesh stays live");
                self.rejections.fetch_add(1, Ordering::Relaxed);
                self.last_error.store(Some(Arc::new(e.clone())));
                Err(e)
            }
        }
    }

    /// A new view of the cluster: published, folded into the last good mesh file, when it
    /// differs from the one before.
    pub fn set_cluster(&self, services: Vec<Service>) {
        let mut state = self.state();
        if state.cluster == services {
            return;
        }
        state.cluster = services;
        if let Some(mesh) = &state.file {
            self.publisher.publish(merge(mesh, &state.cluster));
            tracing::info!(services = state.cluster.len(), "cluster services changed");
        }
    }

    pub fn cluster_services(&self) -> usize {
        self.state().cluster.len()
    }

    fn changed(&self) -> bool {
        read_inputs(&self.path).is_ok_and(|inputs| self.state().fingerprint != fingerprint(&inputs))
    }

    pub async fn watch(self: Arc<Self>) {
        loop {
            tokio::time::sleep(POLL).await;
            if self.changed() {
                tokio::time::sleep(DEBOUNCE).await;
                let _ = self.reload();
            }
        }
    }
}

/// The mesh file, or every `*.yaml` / `*.yml` file of a mesh directory in name order.
fn read_inputs(path: &std::path::Path) -> Result<Vec<(String, String)>, ConfigError> {
    let read = |p: &std::path::Path| {
        let source = p.display().to_string();
        std::fs::read_to_string(p)
            .map(|t| (source.clone(), t))
            .map_err(|e| ConfigError::io(&source, &e))
    };
    if !path.is_dir() {
        return Ok(vec![read(path)?]);
    }
    let listing =
        std::fs::read_dir(path).map_err(|e| ConfigError::io(&path.display().to_string(), &e))?;
    let mut files: Vec<PathBuf> = listing
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files.iter().map(|p| read(p)).collect()
}

/// What the poller compares: every file's name and content.
fn fingerprint(inputs: &[(String, String)]) -> String {
    inputs
        .iter()
        .map(|(source, text)| format!("{source}\0{text}\0"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    fn cluster_service(name: &str) -> Service {
        let mesh = Mesh::parse("cluster", &format!("services:\n  - name: {name}\n")).unwrap();
        mesh.services.into_values().next().unwrap()
    }

    /// A file reload and a cluster update racing: whichever way they interleave, what is
    /// published last is the newest file merged with the newest cluster view.
    #[test]
    fn racing_file_and_cluster_updates_never_publish_a_stale_view() {
        let dir =
            std::env::temp_dir().join(format!("outrigger-source-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mesh.yaml");
        let file = |i: usize| format!("services:\n  - name: file-{i}\n");
        std::fs::write(&path, file(0)).unwrap();
        let source = Arc::new(MeshSource::new(
            path.clone(),
            Arc::new(Publisher::default()),
        ));
        source.reload().unwrap();
        for i in 1..200 {
            std::fs::write(&path, file(i)).unwrap();
            let views = [
                cluster_service(&format!("a-{i}")),
                cluster_service(&format!("b-{i}")),
            ];
            let start = Arc::new(Barrier::new(2));
            let reloading = {
                let (source, start) = (source.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    source.reload().unwrap();
                })
            };
            start.wait();
            // Cluster updates keep coming while the file is reloaded.
            for k in 0..20 {
                source.set_cluster(vec![views[k % 2].clone()]);
            }
            reloading.join().unwrap();
            let published = source.publisher.current().mesh.clone().unwrap();
            let names: Vec<&str> = published
                .services
                .values()
                .map(|s| s.name.as_str())
                .collect();
            assert_eq!(
                names,
                [format!("b-{i}"), format!("file-{i}")],
                "iteration {i}: published {names:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
