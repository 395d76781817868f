//! The proxy's ADS client (state of the world): CDS, EDS and RDS from the control plane,
//! turned into the config model and applied through the config store.
//!
//! Listener sockets stay local (the proxy's ports are fixed where it is injected); a listener
//! with `rds: NAME` takes its virtual hosts from the RouteConfiguration NAME, and one with
//! `lds: NAME` its mTLS mode and authorization from the Listener NAME. A response is
//! ACKed only after the whole resulting config validated and was swapped in (or, while the
//! config is still incomplete, after its resources translated); otherwise it is NACKed with
//! the error, and the last good config keeps serving. When the control plane goes away the
//! client reconnects with jittered exponential backoff, resending the versions it has.

use outrigger_core::backoff::Backoff;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::{Message, Name};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::file::{ClusterFile, VirtualHostFile};
use crate::config::store::{ConfigStore, XdsOverlay};
use crate::net::grpc_channel;
use crate::xds::translate::{self, XdsError, decode};
use outrigger_core::inbound::Inbound;
use outrigger_core::xds_inbound;

const RECONNECT: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

pub struct XdsSettings {
    /// The control plane's replicas: the first is tried first, and each failure moves on to
    /// the next.
    pub addresses: Vec<std::net::SocketAddr>,
    pub node: String,
    pub service: String,
    /// The RouteConfiguration names the listeners ask for.
    pub route_tables: Vec<String>,
    /// The Listener names the listeners take their inbound policy from.
    pub listeners: Vec<String>,
    /// Where to keep the last accepted responses (`xds.cache`).
    pub cache: Option<std::path::PathBuf>,
    /// mTLS to the control plane, with this proxy's certificate and the control plane's
    /// expected identity.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Everything accepted so far; survives reconnects, so the proxy resends its versions.
#[derive(Clone, Default)]
struct State {
    versions: HashMap<String, String>,
    nonces: HashMap<String, String>,
    clusters: BTreeMap<String, ClusterFile>,
    /// Cluster name → the EDS name its endpoints come under.
    eds: BTreeMap<String, String>,
    endpoints: HashMap<String, Vec<crate::config::file::EndpointFile>>,
    routes: HashMap<String, Vec<VirtualHostFile>>,
    have_clusters: bool,
    /// Listener name → its inbound policy. A Listener asked for and not in the response
    /// does not exist: the file's own settings apply.
    inbound: HashMap<String, Inbound>,
    have_listeners: bool,
    /// The last accepted response of each type, as received: what the cache file holds.
    accepted: BTreeMap<String, DiscoveryResponse>,
}

impl State {
    fn eds_names(&self) -> Vec<String> {
        self.eds
            .values()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    fn complete(&self, settings: &XdsSettings) -> bool {
        self.have_clusters
            && (self.have_listeners || settings.listeners.is_empty())
            && settings
                .route_tables
                .iter()
                .all(|t| self.routes.contains_key(t))
            && self.eds.values().all(|n| self.endpoints.contains_key(n))
    }

    fn overlay(&self) -> XdsOverlay {
        let mut clusters: Vec<ClusterFile> = self
            .clusters
            .iter()
            .map(|(name, c)| {
                let mut c = c.clone();
                if let Some(eds) = self.eds.get(name) {
                    c.endpoints = self.endpoints.get(eds).cloned().unwrap_or_default();
                }
                c
            })
            .collect();
        // A route may name a cluster that has not arrived (or was removed): Envoy answers
        // 503 for it, and so do we, through a cluster with no endpoints.
        let referenced: BTreeSet<String> = self
            .routes
            .values()
            .flatten()
            .flat_map(|vh| {
                vh.routes
                    .iter()
                    .flat_map(|r| r.backends.iter().map(|b| b.cluster.value.clone()))
            })
            .collect();
        for name in referenced {
            if !self.clusters.contains_key(&name) {
                clusters.push(ClusterFile {
                    name: serde_saphyr::Spanned {
                        value: name,
                        referenced: serde_saphyr::Location::UNKNOWN,
                        defined: serde_saphyr::Location::UNKNOWN,
                    },
                    protocol: Default::default(),
                    lb: Default::default(),
                    connect_timeout: None,
                    endpoints: Vec::new(),
                    retry_budget: None,
                    circuit_breaker: None,
                    outlier: None,
                    tls: None,
                    opaque: false,
                });
            }
        }
        XdsOverlay {
            route_tables: self.routes.clone(),
            clusters,
            inbound: self.inbound.clone(),
        }
    }
}

/// The cache file: each accepted response, length-prefixed, in push order.
fn save_cache(path: &std::path::Path, state: &State) {
    let mut bytes = Vec::new();
    for resp in state.accepted.values() {
        let encoded = resp.encode_to_vec();
        bytes.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&encoded);
    }
    let tmp = path.with_extension("tmp");
    // Write then rename, so a crash mid-write never leaves half a cache.
    // Synced before the rename: otherwise a power loss can leave the new name pointing at
    // an empty file.
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        std::io::Write::write_all(&mut f, &bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the xDS cache");
    }
}

/// Replays a cache file through the same path as live responses.
fn load_cache(
    path: &std::path::Path,
    store: &ConfigStore,
    settings: &XdsSettings,
) -> Option<State> {
    let bytes = std::fs::read(path).ok()?;
    let mut responses = Vec::new();
    let mut rest = bytes.as_slice();
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let body = rest.get(4..4 + len)?;
        responses.push(DiscoveryResponse::decode(body).ok()?);
        rest = &rest[4 + len..];
    }
    // Clusters before the endpoints and routes that refer to them.
    responses.sort_by_key(|r| {
        [Cluster::type_url(), ClusterLoadAssignment::type_url()]
            .iter()
            .position(|t| *t == r.type_url)
            .unwrap_or(2)
    });
    let mut state = State::default();
    for resp in responses {
        absorb(&mut state, &resp).ok()?;
        state
            .versions
            .insert(resp.type_url.clone(), resp.version_info.clone());
        state.accepted.insert(resp.type_url.clone(), resp);
    }
    if !state.complete(settings) {
        return None;
    }
    match store.apply_xds(state.overlay()) {
        Ok(_) => {
            tracing::info!(path = %path.display(), "serving the cached xDS config until the control plane answers");
            Some(state)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the xDS cache does not apply; ignoring it");
            None
        }
    }
}

/// Restores the cached config (if any) before returning, so the proxy can serve and be
/// ready at once, then runs the client until the process ends.
pub fn spawn(store: Arc<ConfigStore>, settings: XdsSettings) {
    let state = settings
        .cache
        .as_deref()
        .and_then(|p| load_cache(p, &store, &settings))
        .unwrap_or_default();
    tokio::spawn(run(store, settings, state));
}

async fn run(store: Arc<ConfigStore>, settings: XdsSettings, mut state: State) {
    let mut attempt = 0u32;
    for address in settings.addresses.iter().cycle() {
        match session(&store, &settings, *address, &mut state, &mut attempt).await {
            Ok(()) => tracing::warn!(%address, "control plane closed the ADS stream"),
            Err(e) => tracing::warn!(%address, error = %e, "ADS stream failed"),
        }
        // A stream lost, whether closed or broken (a peer gone silent is caught by the
        // HTTP/2 keepalive): counted, so a flapping control plane shows.
        store.metrics.xds_reconnect();
        // Full jitter: a fleet of proxies must not reconnect in lockstep.
        let wait = RECONNECT.full_jitter(attempt);
        attempt = attempt.saturating_add(1);
        tracing::info!(
            ?wait,
            "reconnecting to the control plane; the last good config keeps serving"
        );
        tokio::time::sleep(wait).await;
    }
}

fn request(
    settings: &XdsSettings,
    state: &State,
    type_url: &str,
    names: Vec<String>,
    first: bool,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: state.versions.get(type_url).cloned().unwrap_or_default(),
        node: first.then(|| node(settings)),
        resource_names: names,
        type_url: type_url.to_string(),
        response_nonce: state.nonces.get(type_url).cloned().unwrap_or_default(),
        ..Default::default()
    }
}

fn node(settings: &XdsSettings) -> Node {
    Node {
        id: settings.node.clone(),
        cluster: settings.service.clone(),
        ..Default::default()
    }
}

/// A task that ends when its handle goes out of scope.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `Cluster` for `type.googleapis.com/envoy.config.cluster.v3.Cluster`: a bounded label.
fn type_short(type_url: &str) -> &'static str {
    match type_url.rsplit('.').next() {
        Some("Cluster") => "Cluster",
        Some("ClusterLoadAssignment") => "ClusterLoadAssignment",
        Some("RouteConfiguration") => "RouteConfiguration",
        Some("Listener") => "Listener",
        _ => "other",
    }
}

async fn session(
    store: &ConfigStore,
    settings: &XdsSettings,
    address: std::net::SocketAddr,
    state: &mut State,
    attempt: &mut u32,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let endpoint = grpc_channel::endpoint(address, Duration::from_secs(1));
    let channel = grpc_channel::connect(endpoint, address, settings.tls.as_ref()).await?;
    // Load reports share the connection, and end with it.
    let reporter = AbortOnDrop(tokio::spawn({
        let (channel, config) = (channel.clone(), store.current.clone());
        let node = node(settings);
        async move {
            if let Err(status) = crate::xds::load_report::run(channel, node, config).await {
                tracing::debug!(%status, "load reports stopped");
            }
        }
    }));
    let _reporter = reporter;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    // A new stream knows no nonces; versions are kept so an unchanged config is not resent.
    state.nonces.clear();
    tx.send(request(settings, state, &Cluster::type_url(), vec![], true))
        .await?;
    if state.have_clusters && !state.eds.is_empty() {
        tx.send(request(
            settings,
            state,
            &ClusterLoadAssignment::type_url(),
            state.eds_names(),
            false,
        ))
        .await?;
    }
    if !settings.listeners.is_empty() {
        tx.send(request(
            settings,
            state,
            &Listener::type_url(),
            settings.listeners.clone(),
            false,
        ))
        .await?;
    }
    tx.send(request(
        settings,
        state,
        &RouteConfiguration::type_url(),
        settings.route_tables.clone(),
        false,
    ))
    .await?;
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(%address, node = %settings.node, "ADS stream open");

    while let Some(resp) = inbound.message().await? {
        *attempt = 0;
        let type_url = resp.type_url.clone();
        let eds_before = state.eds_names();
        let mut candidate = state.clone();
        let outcome = absorb(&mut candidate, &resp).and_then(|()| {
            if candidate.complete(settings) {
                store
                    .apply_xds(candidate.overlay())
                    .map(|_| true)
                    .map_err(XdsError::from)
            } else {
                Ok(false)
            }
        });
        let names = match type_url.as_str() {
            t if t == ClusterLoadAssignment::type_url() => candidate.eds_names(),
            t if t == RouteConfiguration::type_url() => settings.route_tables.clone(),
            t if t == Listener::type_url() => settings.listeners.clone(),
            _ => vec![],
        };
        match outcome {
            Ok(applied) => {
                store
                    .metrics
                    .xds_accepted(type_short(&type_url), &resp.version_info);
                candidate
                    .versions
                    .insert(type_url.clone(), resp.version_info.clone());
                candidate
                    .nonces
                    .insert(type_url.clone(), resp.nonce.clone());
                candidate.accepted.insert(type_url.clone(), resp);
                *state = candidate;
                if let (true, Some(path)) = (applied, settings.cache.as_deref()) {
                    save_cache(path, state);
                }
                tx.send(request(settings, state, &type_url, names, false))
                    .await?;
            }
            Err(message) => {
                tracing::warn!(%type_url, version = %resp.version_info, error = %message, "NACK; the last good config keeps serving");
                store.metrics.xds_nacked(type_short(&type_url));
                state.nonces.insert(type_url.clone(), resp.nonce.clone());
                let mut nack = request(settings, state, &type_url, names, false);
                nack.error_detail = Some(RpcStatus {
                    code: 3,
                    message: message.to_string(),
                    details: vec![],
                });
                tx.send(nack).await?;
            }
        }
        // New clusters mean a new set of endpoint names to ask for.
        let eds_after = state.eds_names();
        if type_url == Cluster::type_url() && eds_after != eds_before {
            tx.send(request(
                settings,
                state,
                &ClusterLoadAssignment::type_url(),
                eds_after,
                false,
            ))
            .await?;
        }
    }
    Ok(())
}

/// Folds one response into the state, or says why it cannot be accepted.
fn absorb(state: &mut State, resp: &DiscoveryResponse) -> Result<(), XdsError> {
    let t = resp.type_url.as_str();
    if t == Cluster::type_url() {
        state.clusters.clear();
        state.eds.clear();
        for any in &resp.resources {
            let c = translate::cluster(&decode::<Cluster>(any)?)?;
            if let Some(eds) = c.eds_name {
                state.eds.insert(c.file.name.value.clone(), eds);
            }
            state.clusters.insert(c.file.name.value.clone(), c.file);
        }
        state.have_clusters = true;
    } else if t == ClusterLoadAssignment::type_url() {
        for any in &resp.resources {
            let cla = decode::<ClusterLoadAssignment>(any)?;
            state
                .endpoints
                .insert(cla.cluster_name.clone(), translate::endpoints(&cla)?);
        }
    } else if t == RouteConfiguration::type_url() {
        for any in &resp.resources {
            let rc = decode::<RouteConfiguration>(any)?;
            state
                .routes
                .insert(rc.name.clone(), translate::route_table(&rc)?);
        }
    } else if t == Listener::type_url() {
        state.inbound.clear();
        for any in &resp.resources {
            let l = decode::<Listener>(any)?;
            state
                .inbound
                .insert(l.name.clone(), xds_inbound::read_inbound(&l)?);
        }
        state.have_listeners = true;
    } else {
        return Err(format!("type {t} was not asked for").into());
    }
    Ok(())
}
