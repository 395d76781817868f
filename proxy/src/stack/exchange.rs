//! The value that flows down the stack: what every stage of one request shares, and what
//! the inner stages tell the outer ones (the route taken, the trace started) whatever the
//! outcome.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::cluster::balance::Cluster;
use crate::config::snapshot::{Listener, RuntimeConfig};
use crate::route::table::Route;
use crate::stack::peer::Peer;
use crate::telemetry::metrics::{ConnectionSeries, Metrics};
use crate::telemetry::request_trace::Trace;

/// What every request on one listener shares.
pub struct HttpContext {
    pub config: Arc<ArcSwap<RuntimeConfig>>,
    /// Listeners are fixed for the life of the process, so the index is stable across swaps.
    pub listener: usize,
    pub direction: &'static str,
    pub metrics: Arc<Metrics>,
    pub connections: ConnectionSeries,
}

/// One request on its way through the stack.
pub struct Exchange<'a> {
    pub ctx: &'a HttpContext,
    /// The one snapshot the whole request reads: a config swap mid-request cannot tear it.
    pub snapshot: &'a RuntimeConfig,
    pub listener: &'a Listener,
    /// Who is calling, taken from the connection once.
    pub peer: Arc<Peer>,
    pub started: Instant,
    /// Set by the route stage.
    pub route: Option<&'a Route>,
    /// Started once the request is routed: a route may carry its own sampling ratio.
    pub trace: Option<Trace>,
}

impl<'a> Exchange<'a> {
    pub fn new(ctx: &'a HttpContext, snapshot: &'a RuntimeConfig, peer: Arc<Peer>) -> Self {
        Exchange {
            ctx,
            snapshot,
            listener: &snapshot.listeners[ctx.listener],
            peer,
            started: Instant::now(),
            route: None,
            trace: None,
        }
    }

    /// The metrics label of the route taken, or `none`.
    pub fn route_label(&self) -> &'a str {
        self.route.map_or("none", |r| &*r.name)
    }
}

/// Where one request is going, as every attempt at it needs to know.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    pub ctx: &'a HttpContext,
    pub route: &'a Route,
    pub cluster: &'a Cluster,
    pub host: &'a str,
    pub trace: Option<&'a Trace>,
}
