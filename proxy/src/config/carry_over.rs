//! What a reload keeps from the snapshot it replaces, so that a config push does not reset
//! what the data path has learned or is counting: warm connection pools, endpoint latency
//! and outlier state, requests in flight against a budget or a breaker, a rate limiter's
//! tokens, a CA-signed certificate and a trace exporter's queue. Each is kept only while the
//! settings that made it are unchanged.

use std::net::SocketAddr;
use std::sync::Arc;

use outrigger_core::token_bucket::RateLimiter;

use crate::cluster::balance::{Cluster, ClusterTls, Endpoint};
use crate::config::snapshot::{Identity, IdentitySource, RuntimeConfig};
use crate::policy::circuit_breaker::CircuitBreaker;
use crate::policy::retry_budget::RetryBudget;

impl RuntimeConfig {
    /// The previous cluster of this name, if its connections may be reused: a connection
    /// made with other security settings must not be.
    pub(super) fn reusable_cluster(
        &self,
        name: &str,
        tls: Option<&ClusterTls>,
    ) -> Option<&Cluster> {
        self.clusters
            .get(name)
            .filter(|o| o.tls.as_ref().map(|t| &t.identities) == tls.map(|t| &t.identities))
            .map(|c| &**c)
    }

    /// The rate limiter of a listener (`route: None`) or of one of its routes.
    pub(super) fn rate_limiter(
        &self,
        listener: &str,
        route: Option<&str>,
    ) -> Option<Arc<RateLimiter>> {
        let l = self.listeners.iter().find(|l| l.name == listener)?;
        match route {
            None => l.rate_limit.clone(),
            Some(name) => l
                .virtual_hosts
                .iter()
                .flat_map(|vh| &vh.routes)
                .find(|r| &*r.name == name)?
                .rate_limit
                .clone(),
        }
    }

    /// The identity, with its certificate, if it comes from the same place.
    pub(super) fn same_identity(&self, source: &IdentitySource) -> Option<Identity> {
        let old = self
            .identity
            .as_ref()
            .filter(|old| old.source.same(source))?;
        Some(Identity {
            source: match &old.source {
                IdentitySource::Files(f) => IdentitySource::Files(f.clone()),
                IdentitySource::Ca(c) => IdentitySource::Ca(c.clone()),
            },
            store: old.store.clone(),
        })
    }
}

impl IdentitySource {
    pub(super) fn same(&self, other: &IdentitySource) -> bool {
        match (self, other) {
            (IdentitySource::Files(a), IdentitySource::Files(b)) => a.same_paths(b),
            (IdentitySource::Ca(a), IdentitySource::Ca(b)) => a.same_settings(b),
            _ => false,
        }
    }
}

/// An endpoint still in the cluster keeps its latency estimate and outlier record.
pub(super) fn endpoints(old: Option<&Cluster>, addrs: Vec<SocketAddr>) -> Vec<Arc<Endpoint>> {
    addrs
        .into_iter()
        .map(|addr| {
            old.and_then(|o| o.endpoints.iter().find(|e| e.addr == addr).cloned())
                .unwrap_or_else(|| Arc::new(Endpoint::new(addr)))
        })
        .collect()
}

/// The same budget keeps counting the requests already in flight.
pub(super) fn retry_budget(old: Option<&Cluster>, percent: f64, min: u64) -> Arc<RetryBudget> {
    match old {
        Some(o) if o.retry_budget.percent == percent && o.retry_budget.min == min => {
            o.retry_budget.clone()
        }
        _ => Arc::new(RetryBudget::new(percent, min)),
    }
}

/// The same limits keep counting the requests already in flight.
pub(super) fn breaker(
    old: Option<&Cluster>,
    max_requests: u64,
    max_retries: Option<u64>,
    max_connections: u32,
    max_pending: u64,
) -> Arc<CircuitBreaker> {
    match old {
        Some(o)
            if o.breaker.max_requests == max_requests
                && o.breaker.max_retries == max_retries
                && o.breaker.max_connections == max_connections
                && o.breaker.max_pending == max_pending =>
        {
            o.breaker.clone()
        }
        _ => Arc::new(
            CircuitBreaker::new(max_requests, max_retries)
                .with_connections(max_connections, max_pending),
        ),
    }
}

/// A bucket keeps its tokens across reloads that leave its limits alone; otherwise every
/// config push would hand out a fresh burst.
pub(super) fn rate_limiter(
    old: Option<Arc<RateLimiter>>,
    rate: f64,
    burst: u32,
) -> Arc<RateLimiter> {
    match old {
        Some(old) if old.same_limits(rate, burst) => old,
        _ => Arc::new(RateLimiter::new(rate, burst)),
    }
}
