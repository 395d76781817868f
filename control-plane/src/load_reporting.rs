//! The Load Reporting Service (`envoy.service.load_stats.v3`): each proxy's reports of what it
//! sent to each cluster, folded into the service graph.
//!
//! The caller of every edge is the reporting node's service: the one its certificate proves
//! over mTLS, or the one it names on the plaintext port (local development only). The callee
//! is the cluster, which must be one the mesh serves: a report cannot make up services.
//! A report is bounded before it is read (size, clusters, counts), and a stream that sends
//! garbage, too much or too often is cut off; every refusal is counted by reason.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::pb::envoy::config::endpoint::v3::ClusterStats;
use envoy_types::pb::envoy::service::load_stats::v3::{LoadStatsRequest, LoadStatsResponse};
use futures_util::SinkExt;
use outrigger_core::latency_sketch;
use outrigger_core::spiffe::SpiffeId;
use tokio::time::Instant;
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::ads_transport::{
    OutboundTx, Requests, answer, grpc_frame, outbound, refuse, requests, streaming_response,
};
use crate::secure_xds::Caller;
use crate::service_graph::{EdgeReport, ServiceGraph};
use crate::snapshot::Publisher;
use crate::translate::CLUSTER_TYPE;
use crate::xds_limits;

/// The largest report read: a proxy that calls 1,000 clusters with 20 endpoints each.
pub const MAX_REPORT: usize = 1024 * 1024;
/// Clusters in one report.
pub const MAX_CLUSTERS: usize = 1024;
/// Requests one cluster may claim in one interval: more than a proxy can send.
const MAX_REQUESTS: u64 = 1 << 32;
/// Reports early by more than half an interval are dropped; this many in a row end the stream.
const MAX_EARLY: u32 = 10;

/// Why reports were refused, counted for `/metrics`.
#[derive(Default)]
pub struct ReportCounters {
    pub accepted: AtomicU64,
    /// Not a protobuf, or not a load report.
    pub malformed: AtomicU64,
    /// Over `MAX_REPORT` bytes, or `MAX_CLUSTERS` clusters, or implausible counts.
    pub too_large: AtomicU64,
    /// Reports sent before their interval was up.
    pub too_frequent: AtomicU64,
    /// Clusters the mesh does not serve, skipped.
    pub unknown_cluster: AtomicU64,
    /// Streams from a node that is no service of the mesh.
    pub unknown_caller: AtomicU64,
    /// New edges dropped because the graph was full.
    pub graph_full: AtomicU64,
}

impl ReportCounters {
    pub fn by_reason(&self) -> [(&'static str, u64); 7] {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("accepted", n(&self.accepted)),
            ("malformed", n(&self.malformed)),
            ("too_large", n(&self.too_large)),
            ("too_frequent", n(&self.too_frequent)),
            ("unknown_cluster", n(&self.unknown_cluster)),
            ("unknown_caller", n(&self.unknown_caller)),
            ("graph_full", n(&self.graph_full)),
        ]
    }
}

#[derive(Clone)]
pub struct LoadReporting {
    pub publisher: Arc<Publisher>,
    pub graph: Arc<ServiceGraph>,
    pub counters: Arc<ReportCounters>,
}

const SERVICE: &str = "envoy.service.load_stats.v3.LoadReportingService";
const STREAM: &str = "/envoy.service.load_stats.v3.LoadReportingService/StreamLoadStats";

// By hand rather than tonic's generated wrapper, on the ADS service's transport
// (`ads_transport`): tonic's keeps an 8 KiB encoder buffer per stream for the one small
// answer each stream gets, which was more than half of a report stream's cost.
impl NamedService for LoadReporting {
    const NAME: &'static str = SERVICE;
}

impl tower::Service<http::Request<tonic::body::Body>> for LoadReporting {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        answer(req, |path, req| {
            (path == STREAM).then(|| {
                let (parts, body) = req.into_parts();
                match proven(parts.extensions.get()) {
                    Err(status) => refuse(status),
                    Ok(proven) => {
                        let (tx, rx) = outbound(2);
                        let reports = requests::<LoadStatsRequest>(body, MAX_REPORT);
                        tokio::spawn(self.clone().stream(proven, reports, tx));
                        streaming_response(rx)
                    }
                }
            })
        })
    }
}

/// Over mTLS, the certificate says who the node is. The TLS port also takes callers without
/// a certificate, for the CA's bootstrap, but reports only from a node that proved who it is.
fn proven(caller: Option<&Caller>) -> Result<Option<SpiffeId>, Status> {
    match caller {
        Some(Caller {
            tls: true,
            identity: None,
            ..
        }) => Err(Status::unauthenticated(
            "load reports on this port need a client certificate from the mesh's CA",
        )),
        Some(c) => Ok(c.identity.clone()),
        None => Ok(None),
    }
}

impl LoadReporting {
    /// One node's stream: its first message says who it is; the answer says how often to
    /// report; then its reports, until it goes or is cut off.
    async fn stream(
        self,
        proven: Option<SpiffeId>,
        mut reports: Requests<LoadStatsRequest>,
        mut tx: OutboundTx,
    ) {
        let first = match reports.message().await {
            Ok(Some(first)) => first,
            Ok(None) => return,
            Err(status) => {
                let _ = tx.send(Err(self.refused(status))).await;
                return;
            }
        };
        let node = first.node.unwrap_or_default();
        if let Err(status) = xds_limits::check_node(&node.id, &node.cluster) {
            let _ = tx.send(Err(status)).await;
            return;
        }
        let Some(caller) = self
            .publisher
            .current()
            .service_of(proven.as_ref(), &node.cluster)
        else {
            self.counters.unknown_caller.fetch_add(1, Ordering::Relaxed);
            let refused =
                Status::failed_precondition("load reports are taken from the mesh's services only");
            let _ = tx.send(Err(refused)).await;
            return;
        };
        let interval = self.graph.limits().interval;
        let answer = LoadStatsResponse {
            send_all_clusters: true,
            load_reporting_interval: Some(outrigger_core::xds::pb_duration(interval)),
            report_endpoint_granularity: true,
            ..Default::default()
        };
        if tx.send(Ok(grpc_frame(&answer))).await.is_err() {
            return;
        }
        let stream = ReportStream {
            caller,
            identity: proven.map(|id| id.to_string()),
            service: self,
        };
        stream.run(reports, tx, interval).await;
    }

    /// Counts a stream's read error by what it says, and passes it on.
    fn refused(&self, status: Status) -> Status {
        let counter = match status.code() {
            // tonic's answer to a message over the decoding limit.
            Code::OutOfRange | Code::ResourceExhausted => &self.counters.too_large,
            _ => &self.counters.malformed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        status
    }
}

struct ReportStream {
    caller: String,
    identity: Option<String>,
    service: LoadReporting,
}

impl ReportStream {
    async fn run(
        self,
        mut reports: Requests<LoadStatsRequest>,
        mut tx: OutboundTx,
        interval: Duration,
    ) {
        let counters = &self.service.counters;
        let mut last = Instant::now();
        let mut early = 0u32;
        let end = loop {
            let report = match reports.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(status) if status.code() == Code::Cancelled => return,
                Err(status) => break self.service.refused(status),
            };
            if last.elapsed() < interval / 2 {
                counters.too_frequent.fetch_add(1, Ordering::Relaxed);
                early += 1;
                if early >= MAX_EARLY {
                    break Status::resource_exhausted(format!(
                        "load reports are taken once per {interval:?}"
                    ));
                }
                continue;
            }
            early = 0;
            last = Instant::now();
            if let Err(status) = self.absorb(&report.cluster_stats) {
                counters.too_large.fetch_add(1, Ordering::Relaxed);
                break status;
            }
            counters.accepted.fetch_add(1, Ordering::Relaxed);
        };
        tracing::warn!(caller = %self.caller, error = %end.message(), "load report stream cut off");
        let _ = tx.send(Err(end)).await;
    }

    /// Checks the whole report, then adds each known cluster's counts to its edge.
    fn absorb(&self, clusters: &[ClusterStats]) -> Result<(), Status> {
        if clusters.len() > MAX_CLUSTERS {
            return Err(Status::resource_exhausted(format!(
                "at most {MAX_CLUSTERS} clusters in a load report"
            )));
        }
        let mut edges = Vec::with_capacity(clusters.len());
        for cluster in clusters {
            // Our proxies report each route they used as an entry of its service's cluster.
            let route = cluster
                .cluster_service_name
                .strip_prefix(latency_sketch::ROUTE_PREFIX);
            if route.is_some_and(|r| r.is_empty() || r.len() > xds_limits::MAX_NAME) {
                return Err(Status::invalid_argument(format!(
                    "a route's name is 1 to {} bytes",
                    xds_limits::MAX_NAME
                )));
            }
            edges.push((&cluster.cluster_name, route, edge_report(cluster)?));
        }
        let snapshot = self.service.publisher.current();
        let known = snapshot.types.get(CLUSTER_TYPE);
        let counters = &self.service.counters;
        for (callee, route, report) in edges {
            if !known.is_some_and(|t| t.resources.by_name.contains_key(callee)) {
                counters.unknown_cluster.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let key = (self.caller.as_str(), callee.as_str(), route);
            if !self
                .service
                .graph
                .record(key, self.identity.as_deref(), &report)
            {
                counters.graph_full.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// One cluster's counts, summed over its localities, with its latency buckets.
fn edge_report(cluster: &ClusterStats) -> Result<EdgeReport, Status> {
    let implausible = || {
        Status::invalid_argument(format!(
            "cluster {}: more than {MAX_REQUESTS} requests in one interval",
            xds_limits::truncate(&cluster.cluster_name, xds_limits::MAX_NAME)
        ))
    };
    let mut report = EdgeReport::default();
    for locality in &cluster.upstream_locality_stats {
        for n in [
            locality.total_successful_requests,
            locality.total_error_requests,
        ] {
            if n > MAX_REQUESTS {
                return Err(implausible());
            }
        }
        report.successes += locality.total_successful_requests;
        report.errors += locality.total_error_requests;
        for metric in &locality.load_metric_stats {
            if let Some(bucket) = latency_sketch::parse_metric_name(&metric.metric_name) {
                if metric.num_requests_finished_with_metric > MAX_REQUESTS {
                    return Err(implausible());
                }
                report
                    .latency
                    .add(bucket, metric.num_requests_finished_with_metric);
            }
        }
    }
    if report.successes + report.errors > MAX_REQUESTS {
        return Err(implausible());
    }
    Ok(report)
}
