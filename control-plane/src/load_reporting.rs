//! The Load Reporting Service (`envoy.service.load_stats.v3`): each proxy's reports of what it
//! sent to each cluster, folded into the service graph.
//!
//! The caller of every edge is the reporting node's service: the one its certificate proves
//! over mTLS, or the one it names on the plaintext port (local development only). The callee
//! is the cluster, which must be one the mesh serves: a report cannot make up services.
//! A report is bounded before it is read (size, clusters, counts), and a stream that sends
//! garbage, too much or too often is cut off; every refusal is counted by reason.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::endpoint::v3::ClusterStats;
use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_server::{
    LoadReportingService, LoadReportingServiceServer,
};
use envoy_types::pb::envoy::service::load_stats::v3::{LoadStatsRequest, LoadStatsResponse};
use outrigger_core::latency_sketch;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

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

impl LoadReporting {
    /// The gRPC service, with its message size bound.
    pub fn server(self) -> LoadReportingServiceServer<LoadReporting> {
        LoadReportingServiceServer::new(self).max_decoding_message_size(MAX_REPORT)
    }
}

type Answers = Pin<Box<dyn tokio_stream::Stream<Item = Result<LoadStatsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LoadReportingService for LoadReporting {
    type StreamLoadStatsStream = Answers;

    async fn stream_load_stats(
        &self,
        request: Request<Streaming<LoadStatsRequest>>,
    ) -> Result<Response<Answers>, Status> {
        let proven = match request.extensions().get::<Caller>() {
            Some(Caller {
                tls: true,
                identity: None,
                ..
            }) => {
                return Err(Status::unauthenticated(
                    "load reports on this port need a client certificate from the mesh's CA",
                ));
            }
            Some(c) => c.identity.clone(),
            None => None,
        };
        let mut reports = request.into_inner();
        let first = match reports.message().await {
            Ok(Some(first)) => first,
            Ok(None) => return Err(Status::cancelled("no report")),
            Err(status) => return Err(self.refused(status)),
        };
        let node = first.node.unwrap_or_default();
        xds_limits::check_node(&node.id, &node.cluster)?;
        let Some(caller) = self
            .publisher
            .current()
            .service_of(proven.as_ref(), &node.cluster)
        else {
            self.counters.unknown_caller.fetch_add(1, Ordering::Relaxed);
            return Err(Status::failed_precondition(
                "load reports are taken from the mesh's services only",
            ));
        };
        let stream = ReportStream {
            caller,
            identity: proven.map(|id| id.to_string()),
            service: self.clone(),
        };
        let (tx, rx) = mpsc::channel(2);
        let interval = self.graph.limits().interval;
        let _ = tx
            .send(Ok(LoadStatsResponse {
                send_all_clusters: true,
                load_reporting_interval: Some(outrigger_core::xds::pb_duration(interval)),
                report_endpoint_granularity: true,
                ..Default::default()
            }))
            .await;
        tokio::spawn(stream.run(reports, tx, interval));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl LoadReporting {
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
        mut reports: Streaming<LoadStatsRequest>,
        tx: mpsc::Sender<Result<LoadStatsResponse, Status>>,
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
            edges.push((&cluster.cluster_name, edge_report(cluster)?));
        }
        let snapshot = self.service.publisher.current();
        let known = snapshot.types.get(CLUSTER_TYPE);
        let counters = &self.service.counters;
        for (callee, report) in edges {
            if !known.is_some_and(|t| t.resources.by_name.contains_key(callee)) {
                counters.unknown_cluster.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !self
                .service
                .graph
                .record(&self.caller, callee, self.identity.as_deref(), &report)
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
