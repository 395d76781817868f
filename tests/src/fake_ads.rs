//! A fake ADS server (state of the world) for tests that must say exactly which resources a
//! client sees, and when. The test sets each type's resources with `push`; the server sends
//! them on every open stream at once, and to a stream that subscribes later. Every request a
//! client sends (subscriptions, ACKs, NACKs) comes back to the test through `requests`.
//!
//! It speaks the real protocol (envoy-types' generated service), so the client under test is
//! the real one; what it does not do is decide anything.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub struct FakeAds {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    requests: tokio::sync::Mutex<mpsc::UnboundedReceiver<DiscoveryRequest>>,
}

struct Shared {
    /// The latest response of each type, sent to a stream that subscribes.
    latest: std::sync::Mutex<HashMap<String, DiscoveryResponse>>,
    pushes: broadcast::Sender<DiscoveryResponse>,
    seen: mpsc::UnboundedSender<DiscoveryRequest>,
    nonce: AtomicU64,
}

impl FakeAds {
    pub async fn start() -> FakeAds {
        let (seen, requests) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            latest: Default::default(),
            pushes: broadcast::channel(64).0,
            seen,
            nonce: AtomicU64::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = AggregatedDiscoveryServiceServer::new(Service(shared.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        FakeAds {
            addr,
            shared,
            requests: tokio::sync::Mutex::new(requests),
        }
    }

    /// Makes `resources` the whole state of `type_url` at `version`, and sends it.
    pub fn push(&self, type_url: &str, version: &str, resources: Vec<Any>) {
        let n = self.shared.nonce.fetch_add(1, Ordering::Relaxed);
        let response = DiscoveryResponse {
            version_info: version.to_string(),
            resources,
            type_url: type_url.to_string(),
            nonce: format!("n{n}"),
            ..Default::default()
        };
        self.shared
            .latest
            .lock()
            .unwrap()
            .insert(type_url.to_string(), response.clone());
        let _ = self.shared.pushes.send(response);
    }

    /// The next request from any client that `matches`, waiting at most `deadline`; the
    /// requests before it are passed over.
    pub async fn request(
        &self,
        what: &str,
        deadline: Duration,
        matches: impl Fn(&DiscoveryRequest) -> bool,
    ) -> DiscoveryRequest {
        let mut requests = self.requests.lock().await;
        tokio::time::timeout(deadline, async {
            loop {
                let req = requests.recv().await.expect("the server is running");
                if matches(&req) {
                    return req;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no request within {deadline:?}: {what}"))
    }
}

struct Service(Arc<Shared>);

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let shared = self.0.clone();
        let (tx, rx) = mpsc::channel(16);
        let mut pushes = shared.pushes.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = inbound.message() => {
                        let Ok(Some(req)) = msg else { return };
                        // A subscription (no nonce yet) gets the type's current state.
                        let current = req
                            .response_nonce
                            .is_empty()
                            .then(|| shared.latest.lock().unwrap().get(&req.type_url).cloned())
                            .flatten();
                        let _ = shared.seen.send(req);
                        if let Some(resp) = current
                            && tx.send(Ok(resp)).await.is_err()
                        {
                            return;
                        }
                    }
                    pushed = pushes.recv() => {
                        let Ok(resp) = pushed else { return };
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "the fake ADS server speaks state of the world only",
        ))
    }
}
