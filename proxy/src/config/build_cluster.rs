//! Building a cluster: its endpoints, mTLS, retry budget, circuit breaker and outlier
//! detection, each from the policy model's checks and defaults.

use outrigger_core::config_error::ConfigError;
use outrigger_core::policy;
use outrigger_core::spiffe::SpiffeId;

use crate::cluster::balance::{Cluster, ClusterTls, UpstreamProtocol};
use crate::config::build::Builder;
use crate::config::carry_over;
use crate::config::file::{ClusterFile, OutlierFile};
use crate::config::snapshot::DEFAULT_CONNECT_TIMEOUT;
use crate::identity::mtls;
use crate::policy::outlier::OutlierPolicy;

impl Builder<'_> {
    /// One cluster, keeping from the previous snapshot what a reload must not reset (see
    /// `carry_over`).
    pub(super) fn cluster(&self, c: &ClusterFile, field: &str) -> Result<Cluster, ConfigError> {
        let connect_timeout = self.duration(
            c.connect_timeout.as_ref(),
            &format!("{field}.connect_timeout"),
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        let mut addrs = Vec::with_capacity(c.endpoints.len());
        for (j, e) in c.endpoints.iter().enumerate() {
            addrs.push(self.address(&e.address, &format!("{field}.endpoints[{j}].address"))?);
        }
        let tls = match &c.tls {
            None => None,
            Some(t) => {
                let store = self.identity_for(&format!("{field}.tls"))?;
                let mut identities = Vec::with_capacity(t.identities.len());
                for (k, id) in t.identities.iter().enumerate() {
                    identities.push(
                        SpiffeId::parse(&id.value).map_err(|e| {
                            self.err(id, &format!("{field}.tls.identities[{k}]"), e)
                        })?,
                    );
                }
                if identities.is_empty() {
                    return Err(self.err(
                        &c.name,
                        &format!("{field}.tls.identities"),
                        "name at least one identity the endpoints may have",
                    ));
                }
                Some(ClusterTls {
                    config: mtls::client_config(store.clone(), identities.clone(), mtls::ALPN_H2),
                    tcp_config: mtls::client_config(store, identities.clone(), mtls::ALPN_TCP),
                    identities,
                })
            }
        };
        let old = self
            .previous
            .and_then(|p| p.reusable_cluster(&c.name.value, tls.as_ref()));
        let endpoints = carry_over::endpoints(old, addrs);
        let mut cluster = Cluster::new(
            c.name.value.clone(),
            // Proxies talk HTTP/2 to each other over mTLS, whatever the app spoke.
            if tls.is_some() {
                UpstreamProtocol::Http2
            } else {
                c.protocol
            },
            c.lb,
            connect_timeout,
            endpoints,
        );
        cluster.tls = tls;
        cluster.opaque = c.opaque;
        let budget = policy::check_retry_budget(
            self.source,
            c.retry_budget.as_ref(),
            &format!("{field}.retry_budget"),
        )?;
        let (percent, min) = (budget.percent, u64::from(budget.min_retries));
        cluster.retry_budget = carry_over::retry_budget(old, percent, min);
        let limits = c.circuit_breaker.clone().unwrap_or_default();
        let max_requests = u64::from(limits.max_requests.unwrap_or(policy::DEFAULT_MAX_REQUESTS));
        let max_retries = limits.max_retries.map(u64::from);
        let max_connections = limits
            .max_connections
            .unwrap_or(policy::DEFAULT_MAX_CONNECTIONS);
        let max_pending = u64::from(limits.max_pending.unwrap_or(policy::DEFAULT_MAX_PENDING));
        cluster.breaker =
            carry_over::breaker(old, max_requests, max_retries, max_connections, max_pending);
        // On unless turned off: a cluster without a word about it still hides a sick
        // endpoint.
        cluster.outlier = match &c.outlier {
            Some(o) if o.enabled == Some(false) => None,
            Some(o) => Some(self.outlier(o, &format!("{field}.outlier"))?),
            None => Some(OutlierPolicy::default()),
        };
        Ok(cluster)
    }

    pub(super) fn outlier(
        &self,
        o: &OutlierFile,
        field: &str,
    ) -> Result<OutlierPolicy, ConfigError> {
        let o = policy::check_outlier(self.source, o, field)?;
        let d = OutlierPolicy::default();
        Ok(OutlierPolicy {
            consecutive_5xx: o.consecutive_5xx.or(d.consecutive_5xx),
            consecutive_gateway_failure: o
                .consecutive_gateway_failure
                .or(d.consecutive_gateway_failure),
            base_ejection: o.base_ejection.unwrap_or(d.base_ejection),
            max_ejection: o.max_ejection.unwrap_or(d.max_ejection),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(d.max_ejection_percent),
        })
    }
}
