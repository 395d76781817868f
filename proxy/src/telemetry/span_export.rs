//! Spans out of the process: a bounded queue and one background task that batches them to
//! an OTLP collector, over gRPC (port 4317) or HTTP/protobuf (4318). Jaeger ingests both.
//!
//! The data path only ever `try_send`s: when the queue is full, the span is dropped and
//! counted, and a request never waits on a slow or absent collector.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use prost::Message;
use tokio::sync::mpsc;

use crate::telemetry::metrics::Metrics;
use crate::telemetry::otlp::{
    self, ExportTraceServiceRequest, InstrumentationScope, Resource, ResourceSpans, ScopeSpans,
    Span, TraceServiceClient,
};

const BATCH: usize = 512;
const LINGER: Duration = Duration::from_millis(200);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq)]
pub enum Collector {
    /// `http://host:4317`
    Grpc(String),
    /// `http://host:4318/v1/traces`
    Http(String),
}

pub struct Tracer {
    pub service_name: String,
    /// The share of new traces (requests with no parent) that are sampled.
    pub ratio: f64,
    pub collector: Collector,
    pub queue_size: usize,
    queue: mpsc::Sender<Span>,
    /// Learnt from the first span recorded: config is built before the process's metrics
    /// are at hand, and the export task counts into them too.
    metrics: Arc<OnceLock<Arc<Metrics>>>,
}

pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Tracer {
    /// Starts the export task on the current runtime (there is none in `check`; then spans
    /// just fill the queue and drop).
    pub fn start(
        service_name: String,
        ratio: f64,
        collector: Collector,
        queue_size: usize,
    ) -> Tracer {
        let (queue, rx) = mpsc::channel(queue_size.max(1));
        let metrics = Arc::new(OnceLock::new());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(export_loop(
                rx,
                collector.clone(),
                service_name.clone(),
                metrics.clone(),
            ));
        }
        Tracer {
            service_name,
            ratio,
            collector,
            queue_size,
            queue,
            metrics,
        }
    }

    pub fn same_settings(
        &self,
        name: &str,
        ratio: f64,
        collector: &Collector,
        queue: usize,
    ) -> bool {
        self.service_name == name
            && self.ratio == ratio
            && &self.collector == collector
            && self.queue_size == queue
    }

    pub fn record(&self, span: Span, metrics: &Arc<Metrics>) {
        let metrics = self.metrics.get_or_init(|| metrics.clone());
        if self.queue.try_send(span).is_err() {
            metrics.spans_dropped("queue_full", 1);
        }
    }
}

async fn export_loop(
    mut rx: mpsc::Receiver<Span>,
    collector: Collector,
    service_name: String,
    metrics: Arc<OnceLock<Arc<Metrics>>>,
) {
    let resource = Resource {
        attributes: vec![otlp::string("service.name", service_name)],
        ..Default::default()
    };
    let scope = InstrumentationScope {
        name: "outrigger-proxy".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    let sender = Sender::new(&collector);
    while let Some(first) = rx.recv().await {
        let mut spans = vec![first];
        let deadline = tokio::time::Instant::now() + LINGER;
        while spans.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => spans.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = spans.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope.clone()),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let result = tokio::time::timeout(EXPORT_TIMEOUT, sender.send(request)).await;
        let Some(metrics) = metrics.get() else {
            continue;
        };
        match result {
            Ok(Ok(())) => metrics.spans_exported(n),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "span export failed");
                metrics.spans_dropped("export_failed", n);
            }
            Err(_) => metrics.spans_dropped("export_failed", n),
        }
    }
}

/// Why a batch did not reach the collector; it is dropped and counted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ExportError(String);

enum Sender {
    Grpc(Option<tonic::transport::Channel>),
    Http(String, Box<HttpClient>),
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

impl Sender {
    fn new(collector: &Collector) -> Sender {
        match collector {
            Collector::Grpc(url) => Sender::Grpc(
                tonic::transport::Endpoint::from_shared(url.clone())
                    .ok()
                    .map(|e| {
                        e.connect_timeout(Duration::from_secs(1))
                            .timeout(EXPORT_TIMEOUT)
                            .connect_lazy()
                    }),
            ),
            Collector::Http(url) => Sender::Http(
                url.clone(),
                Box::new(
                    hyper_util::client::legacy::Client::builder(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .build_http(),
                ),
            ),
        }
    }

    async fn send(&self, request: ExportTraceServiceRequest) -> Result<(), ExportError> {
        match self {
            Sender::Grpc(None) => Err(ExportError("invalid collector URL".into())),
            Sender::Grpc(Some(channel)) => TraceServiceClient::new(channel.clone())
                .export(request)
                .await
                .map(|_| ())
                .map_err(|s| ExportError(s.to_string())),
            Sender::Http(url, client) => {
                let req = http::Request::post(url.as_str())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(Bytes::from(request.encode_to_vec())))
                    .map_err(|e| ExportError(e.to_string()))?;
                let resp = client
                    .request(req)
                    .await
                    .map_err(|e| ExportError(e.to_string()))?;
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(ExportError(format!("collector answered {status}")))
                }
            }
        }
    }
}
