//! Versioned snapshots of the translated mesh, published to every ADS stream.
//!
//! Each resource type has its own version, which moves only when that type's resources
//! change, so a mesh edit that touches only endpoints pushes only EDS.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use tokio::sync::watch;

use crate::mesh::Mesh;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use outrigger_core::spiffe::SpiffeId;
use prost::Message;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use outrigger_core::inbound::Inbound;
use outrigger_core::xds_tls::{BUNDLE_SECRET, WORKLOAD_SECRET};
use outrigger_core::{xds_grpc, xds_inbound, xds_sds};

use crate::translate::{
    self, CLUSTER_TYPE, ENDPOINT_TYPE, INBOUND, LISTENER_TYPE, OUTBOUND, PUSH_ORDER, ROUTE_TYPE,
    Resources, SECRET_TYPE, consumer_of, inbound_of, pack, translate,
};

#[derive(Debug, Clone, Default)]
pub struct TypeSnapshot {
    pub version: u64,
    /// Shared between the snapshot and every node's view that leaves this type as it is, so
    /// that a view costs only what it changes.
    pub resources: Arc<Resources>,
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Increases with every accepted mesh file.
    pub mesh_version: u64,
    pub types: BTreeMap<&'static str, TypeSnapshot>,
    /// The mesh it was made from, for per-node scoping.
    pub mesh: Option<Arc<Mesh>>,
    /// For a proxyless gRPC node: what its server Listeners say (`xds_grpc`).
    pub grpc_server: Option<GrpcServer>,
    /// Its state-of-the-world responses, encoded once for every stream that gets them.
    pub responses: crate::sotw_responses::Responses,
}

/// The inbound side of a gRPC node's service, for the Listener a gRPC server asks for.
#[derive(Debug, Clone, Default)]
pub struct GrpcServer {
    pub inbound: Option<Inbound>,
    /// The service is meshed: its callers originate mTLS.
    pub mtls: bool,
}

impl Snapshot {
    /// What a node of service `caller` should see: its own inbound Listener as `inbound`,
    /// its namespace's outbound table if it has consumer routes, and for a caller with a
    /// `calls` list, only those clusters and their virtual hosts. Versions stay the
    /// snapshot's, so a scoped node moves in step with the mesh.
    pub fn view_for(self: &Arc<Self>, caller: &str) -> Arc<Snapshot> {
        let scope = self.mesh.as_ref().and_then(|m| m.scope_for(caller));
        let with = |base: &Snapshot, own: Personal| {
            let mut view = base.clone();
            own.add_to(&mut view);
            Arc::new(view)
        };
        match (scope, self.personal(caller)) {
            (None, None) => self.clone(),
            (Some(scope), None) => self.view_scoped(&scope),
            (None, Some(own)) => with(self, own),
            // Consumer tables are whole: scoped after they are in.
            (Some(scope), Some(own)) if !own.tables.is_empty() => {
                with(self, own).view_scoped(&scope)
            }
            // Scoped first, so the view copies only what the scope keeps.
            (Some(scope), Some(own)) => with(&self.view_scoped(&scope), own),
        }
    }

    /// The caller's own resources, under the names it asks for: its service's inbound
    /// Listener as `inbound` (with its app's cluster), and its namespace's tables with their
    /// consumer routes in place of the shared ones. `None` when it has neither.
    fn personal(&self, caller: &str) -> Option<Personal> {
        let mesh = self.mesh.as_ref()?;
        let service = mesh.service_named(caller)?;
        // Every table kept for this namespace's callers: `outbound@ns`, and `name.ns'@ns`
        // for a service's own table (what proxyless gRPC clients ask for).
        let suffix = consumer_of("", &service.namespace);
        let tables: Vec<(String, Any)> = self
            .types
            .get(ROUTE_TYPE)
            .into_iter()
            .flat_map(|t| &t.resources.by_name)
            .filter_map(|(name, any)| Some((name.strip_suffix(&suffix)?.to_string(), any.clone())))
            .collect();
        let inbound = self
            .types
            .get(LISTENER_TYPE)
            .and_then(|t| {
                t.resources
                    .by_name
                    .get(&inbound_of(&service.cluster_name()))
            })
            .cloned()
            .map(|listener| (listener, service.app_port()));
        if tables.is_empty() && inbound.is_none() {
            return None;
        }
        Some(Personal { tables, inbound })
    }

    /// What a node that proved the identity `id` should see: its service's view, or nothing
    /// if no service runs as `id`.
    pub fn view_for_identity(self: &Arc<Self>, id: &SpiffeId) -> Arc<Snapshot> {
        let service = self.mesh.as_ref().and_then(|m| m.service_running_as(id));
        match service {
            Some(s) => self.view_for(&s.cluster_name()),
            None => self.view_scoped(&std::collections::BTreeSet::new()),
        }
    }

    /// This view as a proxyless gRPC node takes it (gRFC A29, A36): TLS contexts name the
    /// certificate provider instance of its bootstrap instead of SDS secrets, and the server
    /// Listeners it asks for say what its service's inbound policy says. `service` is the
    /// node's, as its proven identity or its claimed cluster names it.
    pub fn for_grpc(self: &Arc<Self>, service: Option<&str>) -> Arc<Snapshot> {
        let mut view = (**self).clone();
        if view.types.contains_key(CLUSTER_TYPE) {
            for any in view.resources_mut(CLUSTER_TYPE).by_name.values_mut() {
                if let Ok(mut c) = Cluster::decode(any.value.as_slice()) {
                    xds_grpc::for_grpc_client(&mut c);
                    *any = pack(&c);
                }
            }
        }
        let mesh = self.mesh.as_ref();
        let own = mesh
            .zip(service)
            .and_then(|(m, name)| m.service_named(name).map(|s| (m, s)));
        view.grpc_server = Some(match own {
            Some((m, s)) => GrpcServer {
                inbound: translate::inbound_policy(m, s),
                mtls: s.mtls || translate::inbound_mode(m, s).is_some(),
            },
            None => GrpcServer::default(),
        });
        Arc::new(view)
    }

    /// The service a node runs as: the one its proven identity runs as, else the one it
    /// claims.
    pub fn service_of(&self, proven: Option<&SpiffeId>, claimed: &str) -> Option<String> {
        let mesh = self.mesh.as_ref()?;
        let found = match proven {
            Some(id) => mesh.service_running_as(id),
            None => mesh.service_named(claimed),
        };
        found.map(|s| s.cluster_name())
    }

    /// This view with its `inbound` Listener bound at `address` instead of the default.
    pub fn with_inbound_address(self: &Arc<Self>, address: std::net::SocketAddr) -> Arc<Snapshot> {
        let Some(any) = self
            .types
            .get(LISTENER_TYPE)
            .and_then(|t| t.resources.by_name.get(INBOUND))
        else {
            return self.clone();
        };
        let Ok(mut listener) = Listener::decode(any.value.as_slice()) else {
            return self.clone();
        };
        listener.address = Some(translate::socket_address(address));
        let mut view = (**self).clone();
        view.resources_mut(LISTENER_TYPE)
            .by_name
            .insert(INBOUND.into(), pack(&listener));
        Arc::new(view)
    }

    /// This view with the node's own workload secret, `default`: its certificate and key as
    /// files in `dir` on the node's disk.
    pub fn with_workload_secret(self: &Arc<Self>, dir: &str) -> Arc<Snapshot> {
        let mut view = (**self).clone();
        view.resources_mut(SECRET_TYPE)
            .by_name
            .insert(WORKLOAD_SECRET.into(), pack(&xds_sds::workload_secret(dir)));
        Arc::new(view)
    }

    /// This snapshot with only what a node that calls the clusters in `scope` needs: those
    /// clusters and their endpoints, their virtual hosts in `outbound`, their own tables and
    /// the API listeners of their host names. Names kept for other views are left out.
    fn view_scoped(self: &Arc<Self>, scope: &std::collections::BTreeSet<String>) -> Arc<Snapshot> {
        let hostnames: std::collections::BTreeSet<String> = self
            .mesh
            .iter()
            .flat_map(|m| m.services.values())
            .filter(|s| scope.contains(&s.cluster_name()))
            .flat_map(|s| s.hostnames())
            .collect();
        let mut view = (**self).clone();
        for (type_url, t) in view.types.iter_mut() {
            let keep = |name: &str| match *type_url {
                // The node's own app stays: it is not a service it calls.
                CLUSTER_TYPE | ENDPOINT_TYPE => {
                    scope.contains(name) || name.starts_with(xds_inbound::LOCAL_APP_PREFIX)
                }
                ROUTE_TYPE => name == OUTBOUND || scope.contains(name),
                LISTENER_TYPE => name == OUTBOUND || name == INBOUND || hostnames.contains(name),
                _ => true,
            };
            let r = &t.resources;
            let by_name = r
                .by_name
                .iter()
                .filter(|(name, _)| keep(name))
                .map(|(name, any)| (name.clone(), any.clone()))
                .collect();
            let named_only = r.named_only.iter().filter(|n| keep(n)).cloned().collect();
            t.resources = Arc::new(Resources {
                by_name,
                named_only,
            });
        }
        if let Some(outbound) = view.resources_mut(ROUTE_TYPE).by_name.get_mut(OUTBOUND)
            && let Ok(mut routes) = RouteConfiguration::decode(outbound.value.as_slice())
        {
            // Virtual hosts are named after their service's cluster.
            routes.virtual_hosts.retain(|vh| scope.contains(&vh.name));
            *outbound = pack(&routes);
        }
        Arc::new(view)
    }

    /// This view with `base`'s endpoints for the clusters it holds endpoints of, and
    /// `base`'s endpoint version and mesh: when only endpoints changed, that is the view
    /// `base` would give, made without going over the whole mesh.
    pub fn with_endpoints_from(&self, seen: &Snapshot, base: &Snapshot) -> Snapshot {
        let mut view = self.clone();
        view.mesh.clone_from(&base.mesh);
        view.mesh_version = base.mesh_version;
        let (Some(mine), Some(theirs)) =
            (self.types.get(ENDPOINT_TYPE), base.types.get(ENDPOINT_TYPE))
        else {
            return view;
        };
        // A view that held all of the last snapshot's endpoints holds all of the new ones.
        if seen
            .types
            .get(ENDPOINT_TYPE)
            .is_some_and(|s| Arc::ptr_eq(&s.resources, &mine.resources))
        {
            view.types.insert(ENDPOINT_TYPE, theirs.clone());
            return view;
        }
        let by_name = mine
            .resources
            .by_name
            .keys()
            .filter_map(|n| Some((n.clone(), theirs.resources.by_name.get(n)?.clone())))
            .collect();
        view.types.insert(
            ENDPOINT_TYPE,
            TypeSnapshot {
                version: theirs.version,
                resources: Arc::new(Resources {
                    by_name,
                    named_only: mine.resources.named_only.clone(),
                }),
            },
        );
        view
    }

    /// A type's resources, to change in this view only.
    fn resources_mut(&mut self, type_url: &'static str) -> &mut Resources {
        Arc::make_mut(&mut self.types.entry(type_url).or_default().resources)
    }

    pub fn version_of(&self, type_url: &str) -> u64 {
        self.types.get(type_url).map_or(0, |t| t.version)
    }

    /// The state-of-the-world response of a type for `names`, encoded once per snapshot.
    pub fn response(
        &self,
        type_url: &str,
        names: &[String],
    ) -> Arc<crate::sotw_responses::Encoded> {
        self.responses
            .get_or_encode(type_url, names, self.version_of(type_url), || {
                self.select(type_url, names)
            })
    }

    /// The resources of a type: all of them for a wildcard (no names), else those named.
    pub fn select(&self, type_url: &str, names: &[String]) -> Vec<Any> {
        let Some(t) = self.types.get(type_url) else {
            return Vec::new();
        };
        if names.is_empty() {
            let r = &t.resources;
            r.by_name
                .iter()
                .filter(|(n, _)| !r.named_only.contains(*n))
                .map(|(_, a)| a.clone())
                .collect()
        } else if let (LISTENER_TYPE, Some(server)) = (type_url, &self.grpc_server) {
            // A gRPC server's Listener is made for the address its name asks for.
            names
                .iter()
                .filter_map(|n| match xds_grpc::server_address(n) {
                    Some(addr) => Some(pack(&xds_grpc::server_listener(
                        n,
                        addr,
                        server.inbound.as_ref(),
                        server.mtls,
                    ))),
                    None if crate::translate::is_internal(n) => None,
                    None => t.resources.by_name.get(n).cloned(),
                })
                .collect()
        } else {
            names
                .iter()
                .filter(|n| !crate::translate::is_internal(n))
                .filter_map(|n| t.resources.by_name.get(n).cloned())
                .collect()
        }
    }
}

/// A node's own resources (`Snapshot::personal`).
struct Personal {
    /// Route tables as its namespace's callers see them, by the names it asks for.
    tables: Vec<(String, Any)>,
    /// Its service's inbound Listener, and the app port it routes to.
    inbound: Option<(Any, Option<u16>)>,
}

impl Personal {
    fn add_to(self, view: &mut Snapshot) {
        if !self.tables.is_empty() {
            let routes = view.resources_mut(ROUTE_TYPE);
            for (name, table) in self.tables {
                routes.by_name.insert(name, table);
            }
        }
        if let Some((listener, port)) = self.inbound {
            // Sent to a wildcard subscriber too: an Envoy sidecar binds it.
            view.resources_mut(LISTENER_TYPE)
                .by_name
                .insert(INBOUND.into(), listener);
            // The app it routes to, for an Envoy (our proxy knows its app from its file).
            if let Some(port) = port {
                view.resources_mut(CLUSTER_TYPE).by_name.insert(
                    xds_inbound::local_app_cluster(port),
                    pack(&xds_inbound::local_app(port)),
                );
            }
        }
    }
}

/// Holds the latest snapshot and hands out receivers to ADS streams.
pub struct Publisher {
    tx: watch::Sender<Arc<Snapshot>>,
    /// What the snapshot is built from, held while it is built and sent: two publishes can
    /// neither interleave nor give different resources the same version.
    inputs: std::sync::Mutex<Inputs>,
}

#[derive(Default)]
struct Inputs {
    mesh: Option<Mesh>,
    /// The CA's trust bundle, served as the SDS secret `ROOTCA`.
    bundle: Option<String>,
}

impl Default for Publisher {
    fn default() -> Self {
        Publisher {
            tx: watch::channel(Arc::new(Snapshot::default())).0,
            inputs: Default::default(),
        }
    }
}

impl Publisher {
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Publishes a new mesh. Types whose resources did not change keep their version.
    pub fn publish(&self, mesh: Mesh) {
        let mut inputs = self.inputs();
        inputs.mesh = Some(mesh);
        self.rebuild(&inputs);
    }

    /// Publishes a new trust bundle (at start, and after a CA rotation).
    pub fn set_bundle(&self, bundle_pem: &str) {
        let mut inputs = self.inputs();
        inputs.bundle = Some(bundle_pem.to_string());
        self.rebuild(&inputs);
    }

    /// When `mesh` differs from the last one only in endpoints (pods came and went), the
    /// next snapshot without translating the whole mesh again: every type as it was, and the
    /// changed services' endpoints.
    fn endpoints_moved(old: &Snapshot, mesh: &Mesh, secrets: &Resources) -> Option<Snapshot> {
        let before = old.mesh.as_ref()?;
        let same_secrets = old
            .types
            .get(SECRET_TYPE)
            .is_some_and(|t| *t.resources == *secrets);
        if !same_secrets || !before.same_but_endpoints(mesh) {
            return None;
        }
        let mut next = Snapshot {
            mesh_version: old.mesh_version + 1,
            types: old.types.clone(),
            mesh: Some(Arc::new(mesh.clone())),
            grpc_server: None,
            responses: Default::default(),
        };
        let moved: Vec<_> = mesh
            .services
            .iter()
            .filter(|(name, s)| {
                before.services.get(*name).map(|b| &b.endpoints) != Some(&s.endpoints)
            })
            .collect();
        if !moved.is_empty() {
            let endpoints = next.resources_mut(ENDPOINT_TYPE);
            for (_, s) in moved {
                endpoints
                    .by_name
                    .insert(s.cluster_name(), translate::endpoints_of(s));
            }
            if let Some(t) = next.types.get_mut(ENDPOINT_TYPE) {
                t.version += 1;
            }
        }
        Some(next)
    }

    fn inputs(&self) -> std::sync::MutexGuard<'_, Inputs> {
        self.inputs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rebuild(&self, inputs: &Inputs) {
        let Some(mesh) = &inputs.mesh else { return };
        let mut secrets = Resources::default();
        if let Some(bundle) = &inputs.bundle {
            secrets
                .by_name
                .insert(BUNDLE_SECRET.into(), pack(&xds_sds::bundle_secret(bundle)));
        }
        let old = self.current();
        if let Some(snapshot) = Self::endpoints_moved(&old, mesh, &secrets) {
            self.tx.send_replace(Arc::new(snapshot));
            return;
        }
        let mut fresh: BTreeMap<&'static str, Resources> = translate(mesh).into_iter().collect();
        fresh.insert(SECRET_TYPE, secrets);
        let mut types = BTreeMap::new();
        for type_url in PUSH_ORDER {
            let resources = fresh.remove(type_url).unwrap_or_default();
            let version = match old.types.get(type_url) {
                Some(t) if *t.resources == resources => t.version,
                Some(t) => t.version + 1,
                None => 1,
            };
            types.insert(
                type_url,
                TypeSnapshot {
                    version,
                    resources: Arc::new(resources),
                },
            );
        }
        self.tx.send_replace(Arc::new(Snapshot {
            mesh_version: old.mesh_version + 1,
            types,
            mesh: Some(Arc::new(mesh.clone())),
            grpc_server: None,
            responses: Default::default(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(endpoint: &str) -> Mesh {
        Mesh::parse(
            "m.yaml",
            &format!(
                r#"services:
  - {{name: a, calls: [b]}}
  - {{name: b, endpoints: [{{address: "{endpoint}"}}]}}
  - {{name: c, endpoints: [{{address: "10.0.0.9:80"}}]}}
"#
            ),
        )
        .unwrap()
    }

    fn same(x: &Snapshot, y: &Snapshot) {
        for t in PUSH_ORDER {
            assert_eq!(x.version_of(t), y.version_of(t), "{t}");
            let names = |s: &Snapshot| {
                s.types
                    .get(t)
                    .map(|t| t.resources.by_name.clone())
                    .unwrap_or_default()
            };
            assert_eq!(names(x), names(y), "{t}");
        }
    }

    #[test]
    fn an_endpoint_change_publishes_what_a_full_translation_would() {
        let publisher = Publisher::default();
        publisher.publish(mesh("10.0.0.1:80"));
        let before = publisher.current();
        publisher.publish(mesh("10.0.0.2:80"));
        let quick = publisher.current();
        let full: BTreeMap<&'static str, Resources> =
            translate(&mesh("10.0.0.2:80")).into_iter().collect();
        for (t, resources) in &full {
            assert_eq!(*quick.types[t].resources, *resources, "{t}");
        }
        assert_eq!(
            quick.version_of(ENDPOINT_TYPE),
            before.version_of(ENDPOINT_TYPE) + 1
        );
        assert_eq!(
            quick.version_of(CLUSTER_TYPE),
            before.version_of(CLUSTER_TYPE)
        );
        // A change beyond endpoints takes the full path, and still only moves what changed.
        let other = Mesh::parse("m.yaml", "services: [{name: a}]").unwrap();
        publisher.publish(other.clone());
        let full: BTreeMap<&'static str, Resources> = translate(&other).into_iter().collect();
        for (t, resources) in &full {
            assert_eq!(*publisher.current().types[t].resources, *resources, "{t}");
        }
    }

    #[test]
    fn an_endpoint_change_gives_the_view_a_full_rebuild_would() {
        let publisher = Publisher::default();
        publisher.publish(mesh("10.0.0.1:80"));
        let seen = publisher.current();
        publisher.publish(mesh("10.0.0.2:80"));
        let base = publisher.current();
        for caller in ["a", "c"] {
            let old = seen.view_for(caller);
            let quick = old.with_endpoints_from(&seen, &base);
            same(&quick, &base.view_for(caller));
        }
        // The scoped caller holds b's endpoints only.
        let scoped = seen.view_for("a").with_endpoints_from(&seen, &base);
        assert_eq!(scoped.types[ENDPOINT_TYPE].resources.by_name.len(), 1);
    }
}
