//! The pool stage: the request goes out on a connection of the cluster's pools. HTTP/1.1
//! takes a connection of its own until the response head, within the circuit breaker's
//! connection limit; HTTP/2 multiplexes onto the endpoint's one connection; an upgrade gets a
//! fresh connection that becomes the tunnel.

use std::future::Future;
use std::sync::Arc;

use http::{Request, Response};
use tokio::sync::OwnedSemaphorePermit;

use crate::cluster::balance::{Endpoint, UpstreamProtocol};
use crate::policy::circuit_breaker::Overflow;
use crate::stack::exchange::Call;
use crate::upstream::client::{Body, send_upgrade};
use crate::upstream::error::ProxyError;
use crate::upstream::http1_pool::UpstreamBody;

/// A permit for an HTTP/1.1 connection, waited for while fewer than `max_pending` requests
/// wait; `None` where the protocol needs none.
pub async fn connection(
    call: &Call<'_>,
    upgrade: bool,
) -> Result<Option<OwnedSemaphorePermit>, ProxyError> {
    let cluster = call.cluster;
    match (upgrade, cluster.protocol) {
        (false, UpstreamProtocol::Http1) => match cluster.breaker.connection().await {
            Ok(permit) => Ok(Some(permit)),
            Err(Overflow::Pending) => {
                call.ctx.metrics.overflow(&cluster.name, "pending");
                Err(ProxyError::Overloaded {
                    cluster: cluster.name.clone(),
                    limit: "max_pending",
                })
            }
        },
        _ => Ok(None),
    }
}

/// A function returning an `async` block, for the reason given at `retry::send`.
#[allow(clippy::manual_async_fn)] // one slot per argument, not two
pub fn send<'a>(
    call: &'a Call<'a>,
    endpoint: &'a Arc<Endpoint>,
    req: Request<Body>,
    upgrade: bool,
) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> {
    async move {
        let cluster = call.cluster;
        let timeout = cluster.connect_timeout;
        let unpooled = |resp: Response<_>| resp.map(UpstreamBody::unpooled);
        match (upgrade, cluster.protocol) {
            // An upgrade dials a connection of its own: boxed, like every dial.
            (true, _) => Box::pin(send_upgrade(&cluster.name, endpoint.addr, timeout, req))
                .await
                .map(unpooled),
            (false, UpstreamProtocol::Http1) => {
                endpoint
                    .h1
                    .send(&cluster.name, endpoint.addr, timeout, req)
                    .await
            }
            (false, UpstreamProtocol::Http2) => {
                let tls = cluster.tls.as_ref().map(|t| &t.config);
                endpoint
                    .h2
                    .send(&cluster.name, endpoint.addr, timeout, tls, req)
                    .await
                    .map(unpooled)
            }
        }
    }
}
