//! Load reports to the control plane over Envoy's Load Reporting Service
//! (`envoy.service.load_stats.v3`): per cluster and endpoint, the requests sent, succeeded and
//! failed since the last report, with their latencies in the shared sketch's buckets.
//!
//! It runs beside the ADS stream, on the same connection. The control plane says which
//! clusters it wants and how often; until it answers, nothing is sent. A control plane without
//! the service ends only this stream: the config keeps flowing.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::core::v3::{
    Address, Node, SocketAddress, address, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterStats, EndpointLoadMetricStats, UpstreamEndpointStats, UpstreamLocalityStats,
};
use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;
use envoy_types::pb::envoy::service::load_stats::v3::{LoadStatsRequest, LoadStatsResponse};
use outrigger_core::latency_sketch;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::cluster::balance::Cluster;
use crate::config::file::Direction;
use crate::config::snapshot::{Listener, RuntimeConfig};
use outrigger_core::latency_sketch::ROUTE_PREFIX;
use outrigger_core::load_counter::LoadTaken;

/// However often the control plane asks, reports are at least this far apart...
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// ...and at most this far.
const MAX_INTERVAL: Duration = Duration::from_secs(300);

/// What the control plane last asked for.
struct Wanted {
    all: bool,
    clusters: BTreeSet<String>,
    interval: Duration,
    endpoints: bool,
}

impl Wanted {
    fn from(resp: LoadStatsResponse) -> Wanted {
        let interval = resp
            .load_reporting_interval
            .and_then(|d| outrigger_core::xds::std_duration(&d))
            .unwrap_or(MAX_INTERVAL)
            .clamp(MIN_INTERVAL, MAX_INTERVAL);
        Wanted {
            all: resp.send_all_clusters,
            clusters: resp.clusters.into_iter().collect(),
            interval,
            endpoints: resp.report_endpoint_granularity,
        }
    }

    fn wants(&self, cluster: &str) -> bool {
        self.all || self.clusters.contains(cluster)
    }
}

/// Reports until the stream ends; the ADS session restarts it with the next connection.
pub async fn run(
    channel: Channel,
    node: Node,
    config: Arc<ArcSwap<RuntimeConfig>>,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(2);
    let first = LoadStatsRequest {
        node: Some(node),
        cluster_stats: Vec::new(),
    };
    tx.send(first)
        .await
        .map_err(|_| tonic::Status::cancelled("report stream closed"))?;
    let mut answers = LoadReportingServiceClient::new(channel)
        .stream_load_stats(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let Some(first) = answers.message().await? else {
        return Ok(());
    };
    let mut wanted = Wanted::from(first);
    // What was counted before the first interval (a previous stream's leftovers) is not
    // this interval's: start from zero.
    take_everything(&config.load(), &wanted, Duration::ZERO);
    let mut last = Instant::now();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + wanted.interval,
        wanted.interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            answer = answers.message() => match answer? {
                Some(next) => {
                    let interval = wanted.interval;
                    wanted = Wanted::from(next);
                    if wanted.interval != interval {
                        tick = tokio::time::interval_at(tokio::time::Instant::now() + wanted.interval, wanted.interval);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                None => return Ok(()),
            },
            _ = tick.tick() => {
                let now = Instant::now();
                let stats = take_everything(&config.load(), &wanted, now - last);
                last = now;
                let report = LoadStatsRequest { node: None, cluster_stats: stats };
                if tx.send(report).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// The clusters' report, then the outbound routes'.
fn take_everything(
    config: &RuntimeConfig,
    wanted: &Wanted,
    interval: Duration,
) -> Vec<ClusterStats> {
    let mut stats = take_report(&config.clusters, wanted, interval);
    stats.extend(take_routes(&config.listeners, wanted, interval));
    stats
}

/// Each outbound route that saw requests since the last report, as a `ClusterStats` of the
/// service it belongs to (its virtual host, named after the service's cluster) whose
/// `cluster_service_name` is `outrigger.io/route/<route>`: what callers saw of each route,
/// requests rather than tries. A route name shared by two virtual hosts shares its series,
/// and is reported under the first.
fn take_routes(listeners: &[Listener], wanted: &Wanted, interval: Duration) -> Vec<ClusterStats> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for l in listeners
        .iter()
        .filter(|l| l.direction == Direction::Outbound)
    {
        for vh in &l.virtual_hosts {
            for route in &vh.routes {
                let Some(series) = route.series.get() else {
                    continue;
                };
                if !seen.insert(Arc::as_ptr(series)) {
                    continue;
                }
                let taken = series.load.take();
                if taken.issued == 0 || !wanted.wants(&vh.name) {
                    continue;
                }
                out.push(ClusterStats {
                    cluster_name: vh.name.clone(),
                    cluster_service_name: format!("{ROUTE_PREFIX}{}", route.name),
                    upstream_locality_stats: vec![locality(&[taken], 0)],
                    load_report_interval: Some(outrigger_core::xds::pb_duration(interval)),
                    ..Default::default()
                });
            }
        }
    }
    out
}

/// Each wanted cluster that saw traffic, with what its endpoints counted; every endpoint's
/// counters start again from zero.
fn take_report(
    clusters: &HashMap<String, Arc<Cluster>>,
    wanted: &Wanted,
    interval: Duration,
) -> Vec<ClusterStats> {
    let mut names: Vec<&String> = clusters.keys().collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let stats = cluster_stats(&clusters[name], wanted.endpoints, interval);
            // Counters are zeroed for every cluster; only wanted ones with traffic are sent.
            wanted.wants(name).then_some(stats).flatten()
        })
        .collect()
}

fn cluster_stats(cluster: &Cluster, endpoints: bool, interval: Duration) -> Option<ClusterStats> {
    let mut taken = Vec::with_capacity(cluster.endpoints.len());
    let mut endpoint_stats = Vec::new();
    let mut in_progress = 0;
    for endpoint in &cluster.endpoints {
        let load = endpoint.load.take();
        let busy = endpoint.outstanding();
        if load.issued == 0 && load.succeeded == 0 && load.failed == 0 && busy == 0 {
            continue;
        }
        in_progress += busy;
        if endpoints {
            endpoint_stats.push(UpstreamEndpointStats {
                address: Some(socket(endpoint.addr)),
                total_successful_requests: load.succeeded,
                total_requests_in_progress: busy,
                total_error_requests: load.failed,
                total_issued_requests: load.issued,
                ..Default::default()
            });
        }
        taken.push(load);
    }
    if taken.is_empty() {
        return None;
    }
    let mut locality = locality(&taken, in_progress);
    locality.upstream_endpoint_stats = endpoint_stats;
    Some(ClusterStats {
        cluster_name: cluster.name.clone(),
        upstream_locality_stats: vec![locality],
        load_report_interval: Some(outrigger_core::xds::pb_duration(interval)),
        ..Default::default()
    })
}

/// The sum of what was taken, with its latencies as our sketch's named load metrics.
fn locality(taken: &[LoadTaken], in_progress: u64) -> UpstreamLocalityStats {
    let mut locality = UpstreamLocalityStats {
        total_requests_in_progress: in_progress,
        ..Default::default()
    };
    let mut latency = latency_sketch::Sketch::default();
    let mut latency_seconds = [0f64; latency_sketch::BUCKETS];
    for t in taken {
        locality.total_issued_requests += t.issued;
        locality.total_successful_requests += t.succeeded;
        locality.total_error_requests += t.failed;
        latency.merge(&t.latency);
        for (index, seconds) in &t.latency_seconds {
            latency_seconds[*index] += seconds;
        }
    }
    locality.load_metric_stats = latency
        .buckets()
        .map(|(index, count)| EndpointLoadMetricStats {
            metric_name: latency_sketch::metric_name(index),
            num_requests_finished_with_metric: count,
            total_metric_value: latency_seconds[index],
        })
        .collect();
    locality
}

fn socket(addr: std::net::SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::balance::{Endpoint, LbPolicy, UpstreamProtocol};

    fn cluster(name: &str) -> Cluster {
        let eps = (0..2)
            .map(|i| Arc::new(Endpoint::new(([127, 0, 0, 1], 2000 + i).into())))
            .collect();
        Cluster::new(
            name.into(),
            UpstreamProtocol::Http1,
            LbPolicy::RoundRobin,
            Duration::from_secs(1),
            eps,
        )
    }

    #[test]
    fn a_report_sums_endpoints_and_keeps_their_latencies_in_buckets() {
        let c = cluster("api.default");
        for (i, ok) in [(0, true), (0, true), (1, false)] {
            let e = &c.endpoints[i];
            let t = e.start();
            t.finished(ok, t.answered());
        }
        let stats = cluster_stats(&c, true, Duration::from_secs(5)).expect("traffic");
        let l = &stats.upstream_locality_stats[0];
        assert_eq!(
            (
                l.total_issued_requests,
                l.total_successful_requests,
                l.total_error_requests
            ),
            (3, 2, 1)
        );
        assert_eq!(l.upstream_endpoint_stats.len(), 2);
        let in_buckets: u64 = l
            .load_metric_stats
            .iter()
            .filter(|m| latency_sketch::parse_metric_name(&m.metric_name).is_some())
            .map(|m| m.num_requests_finished_with_metric)
            .sum();
        assert_eq!(in_buckets, 3);
        // Taken: the next interval starts from zero, and a quiet cluster is not reported.
        assert!(cluster_stats(&c, true, Duration::from_secs(5)).is_none());
    }

    #[test]
    fn a_try_given_up_before_its_answer_counts_as_an_error() {
        let c = cluster("slow");
        drop(c.endpoints[0].start());
        let stats = cluster_stats(&c, false, Duration::from_secs(1)).unwrap();
        let l = &stats.upstream_locality_stats[0];
        assert_eq!((l.total_issued_requests, l.total_error_requests), (1, 1));
    }

    #[test]
    fn only_wanted_clusters_are_sent_but_all_are_zeroed() {
        let wanted = Wanted {
            all: false,
            clusters: ["a".to_string()].into(),
            interval: Duration::from_secs(1),
            endpoints: false,
        };
        let (a, b) = (cluster("a"), cluster("b"));
        for cluster in [&a, &b] {
            let try_ = cluster.endpoints[0].start();
            try_.finished(true, try_.answered());
        }
        let clusters: HashMap<String, Arc<Cluster>> =
            [("a".into(), Arc::new(a)), ("b".into(), Arc::new(b))].into();
        let report = take_report(&clusters, &wanted, Duration::from_secs(1));
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].cluster_name, "a");
        assert!(
            report[0].upstream_locality_stats[0]
                .upstream_endpoint_stats
                .is_empty()
        );
        assert_eq!(clusters["b"].endpoints[0].load.take().issued, 0);
    }
}
