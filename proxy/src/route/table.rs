//! The compiled route table of one listener: virtual hosts, and in each the routes tried in
//! order, with what a matched request gets (backends, timeout, retries, header changes).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::Method;
use http::header::{HeaderName, HeaderValue};
use outrigger_core::token_bucket::RateLimiter;

use crate::cluster::balance::WeightedBackend;
use crate::policy::retry::RetryPolicy;
use crate::route::rewrite::{Redirect, Rewrite};
use crate::route::router::{HeaderMatch, PathMatch, QueryMatch};
use crate::telemetry::route_series::RouteSeries;

pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
}

/// One of these per route in every listener's table, so what most routes leave out is boxed
/// (a pointer when absent) and the retry policy most share is shared.
pub struct Route {
    /// Used as the metrics label; bounded because it comes from config, not from requests.
    pub name: Arc<str>,
    pub path: PathMatch,
    pub headers: Box<[HeaderMatch]>,
    pub methods: Box<[Method]>,
    pub query: Box<[QueryMatch]>,
    /// Empty for a route that redirects.
    pub backends: Vec<WeightedBackend>,
    pub total_weight: u32,
    pub rewrite: Option<Box<Rewrite>>,
    pub redirect: Option<Box<Redirect>>,
    pub mirrors: Box<[Mirror]>,
    pub timeout: Duration,
    pub request_headers: HeaderChanges,
    pub response_headers: HeaderChanges,
    pub retry: Option<Arc<RetryPolicy>>,
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// The share of new traces sampled here; `None`: the proxy's.
    pub sampling: Option<f64>,
    /// Whether a WebSocket upgrade is honoured here (the only upgrade there is).
    pub websocket: bool,
    /// The metric series its requests write to, handed over when the config is accepted
    /// (`RuntimeConfig::resolve_series`).
    pub series: OnceLock<Arc<RouteSeries>>,
}

/// A cluster that gets a copy of a share of the route's requests.
pub struct Mirror {
    pub cluster: Arc<crate::cluster::balance::Cluster>,
    /// 0 to 100.
    pub percent: f64,
}

/// Headers a route sets, adds and removes; nothing at all (a null pointer) when it changes
/// none, as most do.
#[derive(Default)]
pub struct HeaderChanges(Option<Box<HeaderChangeLists>>);

#[derive(Default)]
pub struct HeaderChangeLists {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl From<HeaderChangeLists> for HeaderChanges {
    fn from(lists: HeaderChangeLists) -> Self {
        let none = lists.set.is_empty() && lists.add.is_empty() && lists.remove.is_empty();
        HeaderChanges((!none).then(|| Box::new(lists)))
    }
}

impl HeaderChanges {
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        let Some(lists) = &self.0 else { return };
        lists.apply(headers);
    }
}

impl HeaderChangeLists {
    fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    /// A table holds one of these per route, for every virtual host of every listener: at
    /// 10,000 virtual hosts, each 100 bytes here is a megabyte (`scripts/bench memory`).
    #[test]
    fn a_route_stays_small() {
        let size = std::mem::size_of::<super::Route>();
        assert!(size <= 248, "a route is {size} bytes");
        assert_eq!(std::mem::size_of::<super::HeaderChanges>(), 8);
    }
}
