//! The Aggregated Discovery Service, state of the world (delta is in `ads_delta`).
//!
//! One task per stream. It answers each new subscription at once, pushes every type again
//! when its version moves (in make-before-break order: CDS, EDS, LDS, RDS), and reads each
//! request that carries the nonce of our latest response as an ACK, or as a NACK when it has
//! `error_detail`. A request with an older nonce is stale and ignored, as the protocol says.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use futures_util::SinkExt;
use tonic::Status;
use tonic::server::NamedService;

use crate::ads_delta::DeltaStream;
use crate::ads_stream::{Protocol, SharedViews, StreamLink, run_stream};
use crate::ads_transport::{
    MAX_REQUEST, OutboundRx, Requests, answer, outbound, refuse, requests, streaming_response,
};
use crate::node_status::NodeRegistry;
use crate::secure_xds::Caller;
use crate::snapshot::{Publisher, Snapshot};
use crate::xds_limits;

#[derive(Clone)]
pub struct Ads {
    pub publisher: Arc<Publisher>,
    pub nodes: Arc<NodeRegistry>,
    nonce: Arc<AtomicU64>,
    /// The views of the current snapshot, shared by the streams whose nodes see the same.
    views: Arc<SharedViews>,
}

impl Ads {
    /// Starts a stream's task and gives back the receiving end of what it sends.
    pub(crate) fn open<P: Protocol>(
        &self,
        caller: Option<&Caller>,
        requests: Requests<P::Request>,
    ) -> Result<OutboundRx, Status> {
        let (tx, rx) = outbound(16);
        // Over mTLS, the certificate says who the node is; its metadata only claims it. The
        // TLS port also takes callers without a certificate, for the CA's bootstrap, but
        // config is only for a node that proved who it is.
        let proven = match caller {
            Some(Caller {
                tls: true,
                identity: None,
                ..
            }) => {
                return Err(Status::unauthenticated(
                    "xDS on this port needs a client certificate from the mesh's CA",
                ));
            }
            Some(c) => c.identity.clone(),
            None => None,
        };
        tokio::spawn(run_stream::<P>(
            proven,
            requests,
            tx,
            self.publisher.clone(),
            self.nodes.clone(),
            self.nonce.clone(),
            self.views.clone(),
        ));
        Ok(rx)
    }

    pub fn new(publisher: Arc<Publisher>, nodes: Arc<NodeRegistry>) -> Self {
        Ads {
            publisher,
            nodes,
            nonce: Arc::new(AtomicU64::new(0)),
            views: Default::default(),
        }
    }
}

/// One type's subscription on one stream.
#[derive(Default)]
struct Subscription {
    names: Vec<String>,
    sent_version: Option<u64>,
    sent_nonce: String,
    sent_names: Vec<String>,
    /// A digest of the resources last sent: a new version whose resources are the same for
    /// this subscriber (a change elsewhere in the mesh) is not sent again.
    sent_digest: Option<u64>,
}

pub(crate) struct SotwStream {
    link: StreamLink,
    subs: HashMap<String, Subscription>,
}

impl Protocol for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn check(req: &DiscoveryRequest) -> Result<(), Status> {
        xds_limits::check_names(&req.type_url, &req.version_info, req.resource_names.iter())
    }

    fn open(link: StreamLink) -> Self {
        SotwStream {
            link,
            subs: HashMap::new(),
        }
    }

    fn link(&self) -> &StreamLink {
        &self.link
    }

    /// Sends `type_url` if the subscriber has not seen this version (or `force`).
    async fn push(&mut self, snapshot: &Snapshot, type_url: &str, force: bool) -> bool {
        let version = snapshot.version_of(type_url);
        let Some(sub) = self.subs.get_mut(type_url) else {
            return true;
        };
        if !force && sub.sent_version == Some(version) {
            return true;
        }
        let response = snapshot.response(type_url, &sub.names);
        if !force && sub.sent_digest == Some(response.digest) {
            // Nothing this subscriber holds changed: it keeps the version it has.
            sub.sent_version = Some(version);
            return true;
        }
        let nonce = self.link.next_nonce();
        let frame = response.frame(&nonce);
        sub.sent_digest = Some(response.digest);
        sub.sent_version = Some(version);
        sub.sent_nonce = nonce;
        sub.sent_names = sub.names.clone();
        self.link.sent(type_url, version);
        self.link.out.send(Ok(frame)).await.is_ok()
    }

    async fn on_request(&mut self, req: DiscoveryRequest, snapshot: &Snapshot) -> bool {
        // A type we do not serve is answered with nothing and remembered nowhere.
        if !xds_limits::served(&req.type_url) {
            return true;
        }
        let sub = self.subs.entry(req.type_url.clone()).or_default();
        if !req.response_nonce.is_empty() {
            if req.response_nonce != sub.sent_nonce {
                tracing::debug!(node = %self.link.node, type_url = %req.type_url, "stale nonce; ignored");
                return true;
            }
            match &req.error_detail {
                Some(err) => {
                    tracing::warn!(node = %self.link.node, type_url = %req.type_url, version = %req.version_info, error = %err.message, "NACK");
                    self.link
                        .nacked(&req.type_url, &req.version_info, &err.message);
                }
                None => self.link.acked(&req.type_url, &req.version_info),
            }
        }
        sub.names = req.resource_names;
        // A new subscription, or a changed set of names, is answered now even at the same
        // version; a plain ACK is not.
        let force = sub.sent_version.is_none() || sub.names != sub.sent_names;
        if force {
            let type_url = req.type_url;
            return self.push(snapshot, &type_url, true).await;
        }
        true
    }
}

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const STATE_OF_THE_WORLD: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

// The service by hand rather than tonic's generated wrapper: see `ads_transport`.
impl NamedService for Ads {
    const NAME: &'static str = SERVICE;
}

impl tower::Service<http::Request<tonic::body::Body>> for Ads {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        answer(req, |path, req| match path {
            STATE_OF_THE_WORLD => Some(self.serve::<SotwStream>(req)),
            DELTA => Some(self.serve::<DeltaStream>(req)),
            _ => None,
        })
    }
}

impl Ads {
    fn serve<P: Protocol>(
        &self,
        req: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body>
    where
        P::Request: prost::Message + Default,
    {
        let (parts, body) = req.into_parts();
        match self.open::<P>(parts.extensions.get(), requests(body, MAX_REQUEST)) {
            Ok(rx) => streaming_response(rx),
            Err(status) => refuse(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::Service;

    fn call(
        ads: &mut Ads,
        path: &str,
        header: Option<(&str, &str)>,
        caller: Option<Caller>,
    ) -> String {
        let mut req = http::Request::builder().uri(path).method("POST");
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        let mut req = req.body(tonic::body::Body::default()).unwrap();
        if let Some(caller) = caller {
            req.extensions_mut().insert(caller);
        }
        let fut = ads.call(req);
        let response = futures_util::FutureExt::now_or_never(fut)
            .expect("answered at once")
            .unwrap();
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    /// What the service refuses before a stream starts, each with its gRPC status.
    #[tokio::test]
    async fn refusals_carry_their_status() {
        let mut ads = Ads::new(Arc::default(), Arc::default());
        let gzip = Some(("grpc-encoding", "gzip"));
        assert_eq!(call(&mut ads, STATE_OF_THE_WORLD, gzip, None), "12");
        assert_eq!(call(&mut ads, DELTA, gzip, None), "12");
        let other = "/envoy.service.discovery.v3.AggregatedDiscoveryService/Other";
        assert_eq!(call(&mut ads, other, None, None), "12");
        let unproven = Caller {
            addr: None,
            tls: true,
            identity: None,
        };
        assert_eq!(
            call(&mut ads, STATE_OF_THE_WORLD, None, Some(unproven)),
            "16"
        );
        // A stream that starts answers with headers alone; its status comes in trailers.
        assert_eq!(
            call(
                &mut ads,
                STATE_OF_THE_WORLD,
                Some(("grpc-encoding", "identity")),
                None
            ),
            ""
        );
    }
}
