//! An upgraded (WebSocket) request becomes a tunnel once the upstream switches protocols.
//! The tunnel outlives the request: it keeps the cluster's request slot and holds off the
//! drain like any connection, and it is closed when idle like opaque TCP.

use std::time::Duration;

use http::Response;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use crate::net::splice::copy_with_idle_timeout;
use crate::policy::circuit_breaker::Slot;
use crate::upstream::http1_pool::UpstreamBody;

pub fn tunnel(
    downstream: OnUpgrade,
    resp: &mut Response<UpstreamBody>,
    slot: Slot,
    drain: Option<mpsc::Sender<()>>,
    idle: Duration,
) {
    let upstream = hyper::upgrade::on(resp);
    tokio::spawn(async move {
        let (_slot, _draining) = (slot, drain);
        let (Ok(down), Ok(up)) = tokio::join!(downstream, upstream) else {
            return;
        };
        let _ = copy_with_idle_timeout(TokioIo::new(down), TokioIo::new(up), idle).await;
    });
}
