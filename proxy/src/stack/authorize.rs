//! The authorize stage: a listener with authorization rules lets through only the callers
//! they allow. Only the proxy may say who the caller is: a caller's copy of a vouched-for
//! header is removed on every listener, and the verified identity is set in its place.

use http::HeaderMap;

use crate::policy::authz::Authorization;
use crate::stack::exchange::Exchange;
use crate::stack::headers::{CLIENT_ID_HEADER, strip_vouched};
use crate::upstream::error::ProxyError;
use outrigger_core::spiffe::SpiffeId;

pub fn authorize(ex: &Exchange<'_>, headers: &mut HeaderMap) -> Result<(), ProxyError> {
    let peer = ex.peer.as_ref().and_then(|p| p.identity.as_deref());
    if let Some(authz) = &ex.listener.authorization {
        check(authz, peer).inspect_err(|_| {
            let peer = peer.map(|p| p.to_string());
            ex.ctx.metrics.denied(&ex.listener.name, peer.as_deref());
        })?;
    }
    strip_vouched(headers);
    if let Some(value) = ex.peer.as_ref().and_then(|p| p.identity_header.clone()) {
        headers.insert(CLIENT_ID_HEADER, value);
    }
    Ok(())
}

fn check(authz: &Authorization, peer: Option<&SpiffeId>) -> Result<(), ProxyError> {
    if authz.allows(peer) {
        return Ok(());
    }
    Err(ProxyError::Denied {
        peer: peer.map_or_else(|| "without an identity".into(), |p| p.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrigger_core::spiffe::Principal;

    #[test]
    fn a_caller_is_let_through_only_by_a_rule_or_the_default() {
        let rules = Authorization {
            default_allow: false,
            allow: vec![Principal::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap()],
        };
        let web = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let other = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/batch").unwrap();
        assert!(check(&rules, Some(&web)).is_ok());
        assert!(check(&rules, Some(&other)).is_err());
        let anonymous = check(&rules, None).unwrap_err();
        assert!(
            anonymous.to_string().contains("without an identity"),
            "{anonymous}"
        );
    }
}
