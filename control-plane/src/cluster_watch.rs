//! The cluster, watched: one kube-rs reflector per kind (Services, EndpointSlices, Pods, the
//! metadata of Namespaces, and the route and policy kinds)
//! keeps a local copy of what the API server holds, and every change to any of them
//! recomputes the mesh's view of the cluster (`cluster_source::services_from`).
//!
//! ```text
//! API server ──list once, then watch──► reflector stores ──change──► services_from ──► MeshSource
//!      └─ watch dropped: resumed from the last resourceVersion; 410 Gone: listed again
//! ```
//!
//! A failing API server keeps the last view: the stores are only replaced by a complete new
//! listing. Errors go to `cluster_health`.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector::reflector};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::cluster_health::ClusterHealth;
use crate::cluster_source::{INJECTED, services_from};
use crate::gateway_api::{GrpcRoute, HttpRoute, ReferenceGrant};
use crate::gateway_routes;
use crate::inbound_policy::{self, AuthorizationPolicy, MtlsPolicy};
use crate::kube_client::KubeClient;
use crate::lease::Lease;
use crate::mesh_source::MeshSource;
use crate::policy_attachment::write_status;
use crate::resilience_policy::{self, ResiliencePolicy};
use crate::route_status;

/// Changes that arrive this close together are folded into one recomputation: a rollout
/// moves many endpoints at once.
const COALESCE: Duration = Duration::from_millis(20);
/// How often the status writer looks again without being told of a change.
const STATUS_RECHECK: Duration = Duration::from_secs(5);

/// Watches the cluster through `client` for as long as the process runs, folding it into
/// `source`.
pub fn spawn(
    kube: KubeClient,
    source: Arc<MeshSource>,
    trust_domain: String,
    status_writer: Option<Arc<Lease>>,
) {
    let changed = Arc::new(Notify::new());
    let health = source.cluster_health.clone();
    let _ = health.calls.set(kube.calls);
    let client = kube.client;
    let watch = |kind| Watch {
        kind,
        changed: changed.clone(),
        health: health.clone(),
        failed: Arc::new(Notify::new()),
    };
    let services = watch("Service").start(Api::<Service>::all(client.clone()), |_| {});
    let slices = watch("EndpointSlice").start(Api::<EndpointSlice>::all(client.clone()), |_| {});
    let pods = watch("Pod").start(Api::<Pod>::all(client.clone()), strip_pod);
    // Only their annotations are read: metadata is enough.
    let namespaces = watch("Namespace").start(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        strip_namespace,
    );
    // Kinds from CRDs the cluster may not have: each comes with what tells of its failure.
    let (routes, routes_failed) = watch("HTTPRoute").optional::<HttpRoute>(&client);
    let (grpc, grpc_failed) = watch("GRPCRoute").optional::<GrpcRoute>(&client);
    let (grants, grants_failed) = watch("ReferenceGrant").optional::<ReferenceGrant>(&client);
    let (policies, policies_failed) =
        watch("ResiliencePolicy").optional::<ResiliencePolicy>(&client);
    let (authz, authz_failed) =
        watch("AuthorizationPolicy").optional::<AuthorizationPolicy>(&client);
    let (mtls, mtls_failed) = watch("MTLSPolicy").optional::<MtlsPolicy>(&client);
    let recomputed = Arc::new(Notify::new());
    if let Some(lease) = status_writer {
        lease.clone().spawn();
        tokio::spawn(write_statuses(
            client,
            lease,
            (routes.clone(), grpc.clone()),
            (policies.clone(), authz.clone(), mtls.clone()),
            health.clone(),
            recomputed.clone(),
        ));
    }
    tokio::spawn(async move {
        // Each fails only if its writer is gone, which ends its watch first.
        let _ = tokio::join!(
            services.wait_until_ready(),
            slices.wait_until_ready(),
            pods.wait_until_ready(),
            namespaces.wait_until_ready()
        );
        // Routes and policies are optional: without their CRDs the list fails, and the mesh
        // goes on without them (the error is on /status) rather than waiting.
        tokio::join!(
            ready_or_failed(&routes, &routes_failed),
            ready_or_failed(&grpc, &grpc_failed),
            ready_or_failed(&grants, &grants_failed),
            ready_or_failed(&policies, &policies_failed),
            ready_or_failed(&authz, &authz_failed),
            ready_or_failed(&mtls, &mtls_failed),
        );
        health.synced.store(true, Ordering::Relaxed);
        loop {
            let mut view = services_from(
                &services.state(),
                &slices.state(),
                &pods.state(),
                &trust_domain,
            );
            let applied = resilience_policy::apply(&mut view, &policies.state());
            health.set_policies("ResiliencePolicy", applied);
            let applied =
                inbound_policy::apply_authorization(&mut view, &authz.state(), &trust_domain);
            health.set_policies("AuthorizationPolicy", applied);
            health.set_policies(
                "MTLSPolicy",
                inbound_policy::apply_mtls(&mut view, &mtls.state()),
            );
            inbound_policy::apply_namespace_modes(&mut view, &namespaces.state());
            let outcomes =
                gateway_routes::attach(&mut view, &routes.state(), &grpc.state(), &grants.state());
            health.set_routes(outcomes);
            source.set_cluster(view);
            recomputed.notify_one();
            changed.notified().await;
            tokio::time::sleep(COALESCE).await;
        }
    });
}

/// Waits until `store` has its first listing, or its watch has failed once: an optional
/// kind whose CRD is not installed must not hold the rest back.
async fn ready_or_failed<K>(store: &Store<K>, failed: &Notify)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    tokio::select! {
        _ = store.wait_until_ready() => {}
        _ = failed.notified() => {}
    }
}

/// While this replica holds the Lease, writes each route's status after every
/// recomputation, and now and then besides: a replica that has just become the writer
/// catches up without waiting for a change.
async fn write_statuses(
    client: kube::Client,
    lease: Arc<Lease>,
    (routes, grpc): (Store<HttpRoute>, Store<GrpcRoute>),
    (policies, authz, mtls): (
        Store<ResiliencePolicy>,
        Store<AuthorizationPolicy>,
        Store<MtlsPolicy>,
    ),
    health: Arc<ClusterHealth>,
    recomputed: Arc<Notify>,
) {
    let mut written = route_status::Written::new();
    let mut written_grpc = route_status::Written::new();
    let mut written_policies = route_status::Written::new();
    let mut written_authz = route_status::Written::new();
    let mut written_mtls = route_status::Written::new();
    loop {
        tokio::select! {
            _ = recomputed.notified() => {}
            _ = tokio::time::sleep(STATUS_RECHECK) => {}
        }
        if lease.is_leader() {
            let outcomes = health.routes();
            route_status::write(&client, &routes.state(), &outcomes.http, &mut written).await;
            route_status::write(&client, &grpc.state(), &outcomes.grpc, &mut written_grpc).await;
            let applied = health.policies("ResiliencePolicy");
            write_status(&client, &policies.state(), &applied, &mut written_policies).await;
            let applied = health.policies("AuthorizationPolicy");
            write_status(&client, &authz.state(), &applied, &mut written_authz).await;
            let applied = health.policies("MTLSPolicy");
            write_status(&client, &mtls.state(), &applied, &mut written_mtls).await;
        }
    }
}

/// A pod is kept only for who it runs as and whether it has the sidecar: a cluster's pods
/// are its largest objects, and the store holds every one.
fn strip_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.owner_references = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|k, _| k == INJECTED);
    }
    pod.spec = Some(PodSpec {
        service_account_name: pod.spec.take().and_then(|s| s.service_account_name),
        ..Default::default()
    });
    pod.status = None;
}

/// A namespace is kept for its mTLS annotation only.
fn strip_namespace(ns: &mut PartialObjectMeta<Namespace>) {
    let meta = &mut ns.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|k, _| k == inbound_policy::NAMESPACE_TLS_ANNOTATION);
    }
}

/// An object is kept without what the API server adds for its own bookkeeping.
fn strip_bookkeeping<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

struct Watch {
    kind: &'static str,
    changed: Arc<Notify>,
    health: Arc<ClusterHealth>,
    /// Told of each error.
    failed: Arc<Notify>,
}

impl Watch {
    /// Runs a reflector for `api`'s kind, and returns its store.
    /// Watches an optional kind (all namespaces), stripped of bookkeeping: its store, and
    /// what is told when its watch fails.
    fn optional<K>(self, client: &kube::Client) -> (Store<K>, Arc<Notify>)
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
        K: Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let failed = self.failed.clone();
        (
            self.start(Api::all(client.clone()), strip_bookkeeping::<K>),
            failed,
        )
    }

    fn start<K>(self, api: Api<K>, strip: fn(&mut K)) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync,
        K: 'static,
    {
        let (store, writer): (Store<K>, Writer<K>) = reflector::store();
        let path = K::url_path(&(), None);
        let events = watcher(api).modify(strip).default_backoff();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(reflector(writer, events));
            while let Some(event) = events.next().await {
                match event {
                    Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_)) => {
                        self.changed.notify_one();
                    }
                    Ok(Event::Init | Event::InitApply(_)) => {}
                    Err(e) => {
                        tracing::warn!(kind = self.kind, error = %e, "watching the cluster failed; keeping its last view");
                        let error = format!("{}s: {e}", self.kind);
                        self.health.failed(self.kind, &path, error);
                        self.failed.notify_one();
                    }
                }
            }
        });
        store
    }
}

/// A watcher with the defaults the mesh wants: bookmarks on, pages of 500.
fn watcher<K>(api: Api<K>) -> impl futures_util::Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default())
}
