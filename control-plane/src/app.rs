//! The control plane, assembled: mesh source → publisher → ADS server, plus `/status`.
//!
//! ```text
//! mesh file ──poll 200 ms, debounce 100 ms──► Mesh::parse ─ok─► Publisher (versioned snapshot)
//!                                                  └─err─► last error (/status, metric, log)
//! Publisher ──watch──► one ADS task per stream ──► Envoy / grpcio / outrigger-proxy
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use outrigger_core::bounded_server::{self, Gate, Limits};
use outrigger_core::config_error::ConfigError;
use serde_json::json;
use tokio::net::TcpListener;

use crate::ads::Ads;
use crate::ca::Ca;
use crate::identity_service::IdentityService;
use crate::load_reporting::{LoadReporting, ReportCounters};
use crate::mesh_source::MeshSource;
use crate::node_status::NodeRegistry;
use crate::service_graph::{Limits as GraphLimits, ServiceGraph};
use crate::snapshot::Publisher;

pub struct Options {
    pub mesh_path: PathBuf,
    pub xds_address: SocketAddr,
    pub admin_address: SocketAddr,
    pub identity: IdentityOptions,
    /// How often proxies report load, and what the service graph keeps.
    pub load_reports: GraphLimits,
}

/// The CA: loaded from a directory (`ca.crt`, `ca.key`, maybe `bundle.crt`), or a root made
/// at start that lives as long as the process.
pub struct IdentityOptions {
    pub ca_dir: Option<PathBuf>,
    pub cert_lifetime: std::time::Duration,
    /// Also serve ADS over mTLS here, scoping each node by the identity it proves.
    pub secure_xds_address: Option<SocketAddr>,
    /// Host names or IPs that port's certificate carries besides the SPIFFE ID.
    pub server_names: Vec<String>,
    /// Check service-account tokens with this Kubernetes API server.
    pub token_review: Option<Arc<crate::token_review::TokenReviewer>>,
}

impl Default for IdentityOptions {
    fn default() -> Self {
        IdentityOptions {
            ca_dir: None,
            cert_lifetime: crate::ca::DEFAULT_LIFETIME,
            secure_xds_address: None,
            server_names: Vec::new(),
            token_review: None,
        }
    }
}

pub struct ControlPlane {
    pub xds_addr: SocketAddr,
    /// ADS (and signing) over mTLS, if asked for.
    pub secure_xds_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub publisher: Arc<Publisher>,
    pub nodes: Arc<NodeRegistry>,
    /// The CA in use; replace it to rotate to a new root.
    pub ca: Arc<ArcSwap<Ca>>,
    /// Certificates signed since start.
    pub issued: Arc<AtomicU64>,
    /// What the proxies' load reports say, by edge.
    pub graph: Arc<ServiceGraph>,
    source: Arc<MeshSource>,
}

impl ControlPlane {
    /// Re-reads the mesh file now.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        self.source.reload()
    }

    /// Watches the cluster's Services, EndpointSlices and Pods through `client` and folds
    /// them into the mesh (`cluster_watch`).
    /// `status_writer`, when given, is the Lease that decides which replica writes the
    /// routes' status; without it, none is written.
    pub fn watch_cluster(
        &self,
        client: crate::kube_client::KubeClient,
        status_writer: Option<Arc<crate::lease::Lease>>,
    ) {
        let trust_domain = self.ca.load().trust_domain.clone();
        crate::cluster_watch::spawn(client, self.source.clone(), trust_domain, status_writer);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Mesh(#[from] ConfigError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the CA: {0}")]
    Ca(crate::ca::CaError),
}

pub async fn start(options: Options) -> Result<ControlPlane, StartError> {
    let publisher = Arc::new(Publisher::default());
    let nodes = Arc::new(NodeRegistry::default());
    let source = Arc::new(MeshSource::new(options.mesh_path, publisher.clone()));
    // An invalid mesh at start is fatal: there is no last good one to keep serving.
    source.reload()?;

    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let xds = bind("xDS", options.xds_address).await?;
    let xds_addr = xds.local_addr().unwrap_or(options.xds_address);
    let admin = bind("admin", options.admin_address).await?;
    let admin_addr = admin.local_addr().unwrap_or(options.admin_address);

    let trust_domain = publisher
        .current()
        .mesh
        .as_ref()
        .map_or(crate::mesh::DEFAULT_TRUST_DOMAIN.to_string(), |m| {
            m.trust_domain.clone()
        });
    let ca = match &options.identity.ca_dir {
        Some(dir) => Ca::load(dir, &trust_domain),
        None => Ca::generate(&trust_domain),
    }
    .map_err(StartError::Ca)?;
    let identity = IdentityService {
        ca: Arc::new(ArcSwap::from_pointee(ca)),
        publisher: publisher.clone(),
        default_lifetime: options.identity.cert_lifetime,
        issued: Arc::new(AtomicU64::new(0)),
        signed: Arc::default(),
        token_review: options.identity.token_review.clone(),
    };
    let ca = identity.ca.clone();
    let graph = Arc::new(ServiceGraph::new(options.load_reports));
    let load_reporting = LoadReporting {
        publisher: publisher.clone(),
        graph: graph.clone(),
        counters: Arc::new(ReportCounters::default()),
    };
    publisher.set_bundle(ca.load().bundle_pem());
    let issued = identity.issued.clone();
    let signed = identity.signed.clone();
    // Each gRPC port's connection cap, reported on /metrics.
    let plaintext_gate = Arc::new(crate::grpc_limits::Gate::default());
    let secure_gate = Arc::new(crate::grpc_limits::Gate::default());
    let gates = [
        ("xds", plaintext_gate.clone()),
        ("secure-xds", secure_gate.clone()),
    ];
    let secure_xds_addr = match options.identity.secure_xds_address {
        None => None,
        Some(addr) => {
            let socket = bind("xDS (mTLS)", addr).await?;
            let bound = socket.local_addr().unwrap_or(addr);
            let config =
                crate::secure_xds::server_config(&ca.load(), &options.identity.server_names)
                    .map_err(StartError::Ca)?;
            let (ads, identity) = (Ads::new(publisher.clone(), nodes.clone()), identity.clone());
            let lrs = load_reporting.clone();
            let td = trust_domain.clone();
            let gate = secure_gate.clone();
            tokio::spawn(async move {
                let incoming = crate::secure_xds::incoming(socket, config, td, gate);
                let result = crate::grpc_limits::server()
                    .add_service(ads)
                    .add_service(identity)
                    .add_service(lrs)
                    .serve_with_incoming(incoming)
                    .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "xDS (mTLS) server stopped");
                }
            });
            Some(bound)
        }
    };
    let ads = Ads::new(publisher.clone(), nodes.clone());
    let lrs = load_reporting.clone();
    tokio::spawn(async move {
        let incoming = crate::grpc_limits::plaintext_incoming(xds, plaintext_gate);
        let result = crate::grpc_limits::server()
            .add_service(ads)
            .add_service(identity)
            .add_service(lrs)
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "xDS server stopped");
        }
    });
    tokio::spawn(serve_admin(
        admin,
        Admin {
            source: source.clone(),
            nodes: nodes.clone(),
            issued: issued.clone(),
            load: load_reporting,
            ca: ca.clone(),
            signed,
        },
        gates,
    ));
    tokio::spawn(source.clone().watch());
    tracing::info!(xds = %xds_addr, admin = %admin_addr, "control plane serving");
    Ok(ControlPlane {
        secure_xds_addr,
        xds_addr,
        admin_addr,
        publisher,
        nodes,
        ca,
        issued,
        graph,
        source,
    })
}

/// What the admin port reads from.
struct Admin {
    source: Arc<MeshSource>,
    nodes: Arc<NodeRegistry>,
    issued: Arc<AtomicU64>,
    load: LoadReporting,
    ca: Arc<ArcSwap<Ca>>,
    signed: Arc<crate::diagnose::SignedCerts>,
}

async fn serve_admin(
    listener: TcpListener,
    admin: Admin,
    grpc_gates: [(&'static str, Arc<crate::grpc_limits::Gate>); 2],
) {
    let gate = Gate::new(Limits::ADMIN);
    let admin_gate = gate.clone();
    let admin = Arc::new(admin);
    let Admin {
        source,
        nodes,
        issued,
        load,
        ..
    } = &*admin;
    let (source, nodes, issued, load) =
        (source.clone(), nodes.clone(), issued.clone(), load.clone());
    bounded_server::serve(listener, gate, bounded_server::plaintext, move |req| {
        if req.uri().path() == "/dashboard" {
            return std::future::ready(crate::dashboard::page());
        }
        let body = match req.uri().path() {
            "/live" | "/ready" => Ok("ok\n".to_string()),
            "/status" => Ok(serde_json::to_string_pretty(&status_json(&source, &nodes))
                .unwrap_or_default()
                + "\n"),
            "/graph" => crate::graph_api::graph_json(&load.graph, req.uri().query()),
            "/node-config" => crate::node_config::node_config_json(
                &source.publisher.current(),
                &nodes,
                req.uri().query(),
            )
            .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"),
            "/check" => {
                Ok(serde_json::to_string_pretty(&check_json(&admin)).unwrap_or_default() + "\n")
            }
            "/metrics" => {
                let mut ports = vec![("admin", admin_gate.open(), admin_gate.refused())];
                ports.extend(
                    grpc_gates
                        .iter()
                        .map(|(port, g)| (*port, g.open(), g.refused.load(Ordering::Relaxed))),
                );
                Ok(metrics_text(
                    &source,
                    &nodes,
                    &issued,
                    &ports,
                    &load,
                    admin.ca.load().not_after(),
                ))
            }
            _ => Err(
                "endpoints: /dashboard /status /check /graph /node-config /metrics /live /ready\n"
                    .to_string(),
            ),
        };
        let (status, text) = match body {
            Ok(t) => (StatusCode::OK, t),
            Err(t) => (StatusCode::NOT_FOUND, t),
        };
        let content_type = match req.uri().path() {
            "/status" | "/check" | "/graph" | "/node-config" if status == StatusCode::OK => {
                "application/json"
            }
            "/metrics" => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            _ => "text/plain; charset=utf-8",
        };
        let mut resp = Response::new(Full::new(Bytes::from(text)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        std::future::ready(resp)
    })
    .await
}

/// `check`'s view: every problem the control plane can see, with its hint.
fn check_json(admin: &Admin) -> serde_json::Value {
    let snapshot = admin.source.publisher.current();
    let routes = admin.source.cluster_health.routes();
    let mut route_errors = Vec::new();
    for (kind, outcomes) in [("HTTPRoute", &routes.http), ("GRPCRoute", &routes.grpc)] {
        for (name, (_, list)) in &outcomes.0 {
            for o in list {
                for (reason, message) in [&o.accepted, &o.resolved_refs]
                    .into_iter()
                    .filter_map(|c| c.as_ref().err())
                {
                    route_errors.push((format!("{kind} {name}"), format!("{reason}: {message}")));
                }
            }
        }
    }
    let inputs = crate::diagnose::Inputs {
        mesh: snapshot.mesh.as_deref(),
        mesh_error: admin
            .source
            .last_error
            .load()
            .as_ref()
            .map(|e| e.to_string()),
        mesh_file: admin.source.path.display().to_string(),
        cluster_errors: admin
            .source
            .cluster_health
            .errors()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        route_errors,
        root_not_after: admin.ca.load().not_after(),
        signed: &admin.signed,
        nodes: &admin.nodes,
        called: admin.load.graph.callees(),
    };
    json!({
        "services": snapshot.mesh.as_ref().map_or(0, |m| m.services.len()),
        "proxies_connected": admin.nodes.connected_count(),
        "problems": crate::diagnose::diagnose(&inputs),
        "ca_not_after_unix": inputs.root_not_after.map(crate::diagnose::unix),
        "certificates": admin.signed.list().into_iter().map(|(id, end)| json!({"identity": id, "not_after_unix": end})).collect::<Vec<_>>(),
    })
}

fn status_json(source: &MeshSource, nodes: &NodeRegistry) -> serde_json::Value {
    let snapshot = source.publisher.current();
    let err = source.last_error.load();
    let cluster_errors = source.cluster_health.errors();
    let routes = source.cluster_health.routes();
    json!({
        "mesh": {
            "file": source.path.display().to_string(),
            "version": snapshot.mesh_version,
            "type_versions": snapshot.types.iter().map(|(t, s)| (t.rsplit('.').next().unwrap_or(t).to_string(), json!(s.version.to_string()))).collect::<serde_json::Map<_, _>>(),
            "last_error": err.as_ref().map(|e| json!({"message": e.to_string(), "line": e.line, "field": e.field})),
        },
        "cluster": {
            "services": source.cluster_services(),
            "synced": source.cluster_health.synced.load(Ordering::Relaxed),
            "last_error": cluster_errors.values().next(),
            "errors": cluster_errors,
            "routes": outcome_json(&routes.http),
            "grpc_routes": outcome_json(&routes.grpc),
            "resilience_policies": policy_json(&source.cluster_health.policies("ResiliencePolicy")),
            "authorization_policies": policy_json(&source.cluster_health.policies("AuthorizationPolicy")),
            "mtls_policies": policy_json(&source.cluster_health.policies("MTLSPolicy")),
        },
        "nodes": nodes.to_json(),
    })
}

/// Each policy's outcome, by `namespace/name`: `true`, or why not.
fn policy_json(outcomes: &crate::policy_attachment::PolicyOutcomes) -> serde_json::Value {
    outcomes
        .iter()
        .map(|(name, o)| {
            let value = match o {
                Ok(()) => json!(true),
                Err((reason, e)) => json!({"reason": reason, "error": e}),
            };
            (name.clone(), value)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Each route's outcomes, by `namespace/name`.
fn outcome_json(outcomes: &crate::gateway_routes::RouteOutcomes) -> serde_json::Value {
    outcomes
        .0
        .iter()
        .map(|(name, (_, o))| (name.clone(), o.iter().map(|o| o.to_json()).collect()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The metrics page, in OpenMetrics text from prometheus-client, which escapes every label
/// value (node ids come from the wire). A fresh registry is filled from the live counters at
/// each scrape: scrapes are rare, and nothing on the xDS path pays for a metric.
fn metrics_text(
    source: &MeshSource,
    nodes: &NodeRegistry,
    issued: &AtomicU64,
    ports: &[(&'static str, usize, u64)],
    load: &LoadReporting,
    ca_not_after: Option<std::time::SystemTime>,
) -> String {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct NodeLabel {
        node: String,
    }
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct PortLabel {
        port: &'static str,
    }
    let counter = |n: u64| {
        let c: Counter = Counter::default();
        c.inc_by(n);
        c
    };
    let gauge = |n: i64| {
        let g: Gauge = Gauge::default();
        g.set(n);
        g
    };
    let mut r = prometheus_client::registry::Registry::with_prefix("outrigger_cp");
    r.register("pushes", "Config pushes sent", nodes.pushes.clone());
    r.register(
        "views_built",
        "Per-node views of the config built (one per stream and config change)",
        nodes.views_built.clone(),
    );
    r.register(
        "push_ack_seconds",
        "From a push to its ACK",
        nodes.push_ack.clone(),
    );
    r.register(
        "certificates_issued",
        "Workload certificates signed",
        counter(issued.load(Ordering::Relaxed)),
    );
    r.register(
        "connected_proxies",
        "Nodes with an ADS stream open",
        gauge(nodes.connected_count() as i64),
    );
    r.register(
        "mesh_version",
        "Version of the mesh now served",
        gauge(source.publisher.current().mesh_version as i64),
    );
    r.register(
        "mesh_rejections",
        "Mesh files refused (the last good one kept serving)",
        counter(source.rejections.load(Ordering::Relaxed)),
    );
    r.register(
        "cluster_watch_errors",
        "Errors from the Kubernetes API server's lists and watches (the last view kept serving)",
        counter(source.cluster_health.errors_total.load(Ordering::Relaxed)),
    );
    if let Some(calls) = source.cluster_health.calls.get() {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct VerbLabel {
            verb: &'static str,
        }
        let requests = Family::<VerbLabel, Counter>::default();
        for (verb, n) in [
            ("list", &calls.lists),
            ("watch", &calls.watches),
            ("other", &calls.others),
        ] {
            requests
                .get_or_create(&VerbLabel { verb })
                .inc_by(n.load(Ordering::Relaxed));
        }
        r.register(
            "kube_requests",
            "Requests made to the Kubernetes API server, by verb",
            requests,
        );
    }
    let nacks = Family::<NodeLabel, Counter>::default();
    for (node, n) in nodes.nacks_per_node() {
        nacks.get_or_create(&NodeLabel { node }).inc_by(n);
    }
    r.register("nacks", "Config refused by each node", nacks);
    let open = Family::<PortLabel, Gauge>::default();
    let refused = Family::<PortLabel, Counter>::default();
    for (port, o, f) in ports {
        open.get_or_create(&PortLabel { port }).set(*o as i64);
        refused.get_or_create(&PortLabel { port }).inc_by(*f);
    }
    r.register("open_connections", "Connections open, by port", open);
    r.register(
        "connections_refused",
        "Connections closed at once: the port was at its cap",
        refused,
    );
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct ResultLabel {
        result: &'static str,
    }
    let reports = Family::<ResultLabel, Counter>::default();
    for (result, n) in load.counters.by_reason() {
        reports.get_or_create(&ResultLabel { result }).inc_by(n);
    }
    r.register(
        "load_reports",
        "Load reports from proxies, by what became of them (refusals by reason)",
        reports,
    );
    r.register(
        "proxies_out_of_sync",
        "Proxies that refuse their config, have not answered a push within 5 s, or lost their stream",
        gauge(
            nodes
                .problems(crate::diagnose::BEHIND_AFTER)
                .into_iter()
                .map(|(node, _, _)| node)
                .collect::<std::collections::BTreeSet<_>>()
                .len() as i64,
        ),
    );
    if let Some(end) = ca_not_after {
        r.register(
            "ca_expiry_timestamp_seconds",
            "When the CA's certificate ends, Unix time",
            gauge(crate::diagnose::unix(end) as i64),
        );
    }
    let (entries, _, bytes) = load.graph.usage();
    let edges = load.graph.edge_count();
    r.register(
        "graph_edges",
        "Caller-to-callee edges the service graph holds",
        gauge(edges as i64),
    );
    r.register(
        "graph_routes",
        "Caller-to-route entries the service graph holds (one per route a caller used)",
        gauge((entries - edges) as i64),
    );
    r.register(
        "graph_bytes",
        "Memory the service graph holds, in bytes",
        gauge(bytes as i64),
    );
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}
