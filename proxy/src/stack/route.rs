//! The route stage: the host a request is for, then its virtual host and route in the
//! listener's table.

use http::header;
use http::request::Parts;
use http::uri::Authority;

use crate::route::rewrite::Rewrite;
use crate::route::router::{self, PathMatch, RouteOutcome};
use crate::route::table::Route;
use crate::stack::exchange::Exchange;
use crate::upstream::error::ProxyError;

/// The route for a request to `host`. A redirected connection whose Host names no service
/// (an IP, say) is routed by the address the app dialled.
pub fn select<'a>(ex: &Exchange<'a>, host: &str, parts: &Parts) -> Result<&'a Route, ProxyError> {
    let listener = ex.listener;
    let mut routed = router::route(&listener.domains, &listener.virtual_hosts, host, parts);
    let fallback = ex.peer.virtual_host;
    if let (RouteOutcome::NoVirtualHost, Some(i)) = (&routed, fallback)
        && let Some(vhost) = listener.virtual_hosts.get(i)
    {
        routed = router::route_in(vhost, parts);
    }
    match routed {
        RouteOutcome::Matched(_, route) => Ok(route),
        RouteOutcome::NoVirtualHost => Err(ProxyError::NoVirtualHost {
            host: host.to_string(),
        }),
        RouteOutcome::NoRoute(_) => Err(ProxyError::NoRoute {
            host: host.to_string(),
            path: parts.uri.path().to_string(),
        }),
    }
}

/// Applies a route's rewrite to the request's target and Host; returns the host it now goes
/// to. The target becomes origin-form: the upstream stage puts the host back where the
/// upstream's protocol wants it.
pub fn rewrite(
    rewrite: &Rewrite,
    matched: &PathMatch,
    parts: &mut Parts,
    host: Authority,
) -> Result<Authority, ProxyError> {
    if let Some(target) = rewrite.target(&parts.uri, matched) {
        parts.uri = target
            .parse()
            .map_err(|_| ProxyError::BadRequest("the rewritten path is not a valid target"))?;
    }
    match &rewrite.host {
        Some(rewritten) => {
            parts.headers.insert(header::HOST, rewritten.value.clone());
            if parts.uri.authority().is_some() {
                let origin = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                parts.uri = origin
                    .parse()
                    .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
            }
            Ok(rewritten.authority.clone())
        }
        None => Ok(host),
    }
}

/// The host a request is for: `:authority` for HTTP/2 (and absolute-form HTTP/1), else `Host`.
/// When both are present they must agree: the proxy routes by one, and an app behind it may
/// read the other. The parsed `Authority` is the host from then on, so it is copied once.
pub fn request_host_of(parts: &http::request::Parts) -> Result<Authority, ProxyError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    if let Some(authority) = parts.uri.authority() {
        let disagree = hosts.any(|h| {
            !h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        });
        if disagree {
            return Err(ProxyError::BadRequest(
                "Host and the request's authority disagree",
            ));
        }
        return Ok(authority.clone());
    }
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h,
        (None, _) => return Err(ProxyError::BadRequest("missing Host header")),
        (Some(_), Some(_)) => return Err(ProxyError::BadRequest("more than one Host header")),
    };
    host.to_str()
        .map_err(|_| ProxyError::BadRequest("Host header is not ASCII"))?;
    Authority::try_from(host.as_bytes())
        .map_err(|_| ProxyError::BadRequest("Host header is not a valid authority"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn host_of(uri: &str, hosts: &[&str]) -> Result<String, ProxyError> {
        let mut b = Request::builder().uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        request_host_of(&b.body(()).unwrap().into_parts().0).map(|a| a.to_string())
    }

    #[test]
    fn the_host_is_the_authority_or_the_one_host_header() {
        assert_eq!(host_of("/", &["shop"]).unwrap(), "shop");
        assert_eq!(host_of("http://shop:80/x", &[]).unwrap(), "shop:80");
        assert_eq!(host_of("http://shop/x", &["SHOP"]).unwrap(), "shop");
        assert!(host_of("/", &[]).is_err(), "missing");
        assert!(host_of("/", &["a", "b"]).is_err(), "two Host headers");
        assert!(
            host_of("http://a/x", &["b"]).is_err(),
            "authority and Host disagree"
        );
        assert!(host_of("/", &["a b"]).is_err(), "not an authority");
    }
}
