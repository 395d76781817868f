//! The rate-limit stage: the listener's limit (the service's own) first, then the route's. A
//! request refused by either never reaches a cluster, so it costs the upstream nothing.

use outrigger_core::token_bucket::RateLimiter;

use crate::route::table::Route;
use crate::stack::exchange::Exchange;
use crate::upstream::error::ProxyError;

pub fn admit(ex: &Exchange<'_>, route: &Route) -> Result<(), ProxyError> {
    let listener = ex.listener;
    check(&listener.rate_limit, "listener", &listener.name)
        .and_then(|()| check(&route.rate_limit, "route", &route.name))
        .inspect_err(|_| ex.ctx.metrics.rate_limited(ex.ctx.direction, &route.name))
}

fn check(
    limiter: &Option<std::sync::Arc<RateLimiter>>,
    kind: &str,
    name: &str,
) -> Result<(), ProxyError> {
    match limiter.as_ref().map(|l| l.acquire()) {
        Some(Err(retry_after)) => Err(ProxyError::RateLimited {
            scope: format!("{kind} `{name}`"),
            retry_after,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn past_the_burst_a_request_is_refused_with_the_wait() {
        let limiter = Some(Arc::new(RateLimiter::new(1.0, 2)));
        assert!(check(&limiter, "route", "r").is_ok());
        assert!(check(&limiter, "route", "r").is_ok());
        match check(&limiter, "route", "r") {
            Err(ProxyError::RateLimited { scope, retry_after }) => {
                assert_eq!(scope, "route `r`");
                assert!(retry_after > std::time::Duration::ZERO);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            check(&None, "listener", "l").is_ok(),
            "no limit, no refusal"
        );
    }
}
