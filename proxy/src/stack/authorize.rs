//! The authorize stage: a listener with authorization rules lets through only the requests
//! they allow, judged on the caller's verified identity, the method and the normalised path.
//! Only the proxy may say who the caller is: a caller's copy of a vouched-for header is
//! removed on every listener, and the verified identity is set in its place.

use http::request::Parts;

use crate::config::file::TlsMode;
use crate::stack::exchange::Exchange;
use crate::stack::headers::{CLIENT_ID_HEADER, strip_vouched};
use crate::upstream::error::ProxyError;
use outrigger_core::authz::{Authorization, Request, normalised_path};
use outrigger_core::spiffe::SpiffeId;

pub fn authorize(ex: &Exchange<'_>, parts: &mut Parts) -> Result<(), ProxyError> {
    let peer = ex.peer.identity.as_deref();
    // A plaintext connection opened while the listener was permissive outlives a switch to
    // strict: its requests are refused from then on.
    if peer.is_none()
        && ex
            .listener
            .tls
            .as_ref()
            .is_some_and(|t| t.mode == TlsMode::Strict)
    {
        ex.ctx.metrics.denied(&ex.listener.name, None);
        return Err(denied(None));
    }
    if !ex.listener.authorization.is_empty() {
        // A path no rule can judge (one that hides a `/` in `%2F`, say) matches no path rule.
        let path = normalised_path(parts.uri.path()).unwrap_or_default();
        let request = Request {
            peer,
            http: Some((parts.method.as_str(), &path)),
        };
        check(&ex.listener.authorization, &request).inspect_err(|_| {
            let peer = peer.map(|p| p.to_string());
            ex.ctx.metrics.denied(&ex.listener.name, peer.as_deref());
        })?;
    }
    strip_vouched(&mut parts.headers);
    if let Some(value) = ex.peer.identity_header.clone() {
        parts.headers.insert(CLIENT_ID_HEADER, value);
    }
    Ok(())
}

/// Every layer (the file's, the control plane's) must let the request in.
pub fn check(layers: &[Authorization], request: &Request<'_>) -> Result<(), ProxyError> {
    if layers.iter().all(|a| a.allows(request)) {
        return Ok(());
    }
    Err(denied(request.peer))
}

fn denied(peer: Option<&SpiffeId>) -> ProxyError {
    ProxyError::Denied {
        peer: peer.map_or_else(|| "without an identity".into(), |p| p.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrigger_core::authz::{Caller, Rule, TextMatch};
    use outrigger_core::spiffe::Principal;

    #[test]
    fn a_request_passes_only_if_every_layer_lets_it() {
        let caller = |text: &str| Caller::from(&Principal::parse(text).unwrap());
        let file = Authorization {
            rules: vec![Rule::anything(
                "shop",
                vec![caller("spiffe://cluster.local/ns/shop/*")],
            )],
        };
        let central = Authorization {
            rules: vec![Rule::from_lists(
                "web-reads".into(),
                vec![caller("spiffe://cluster.local/ns/shop/sa/web")],
                vec![TextMatch::path("/api/*").unwrap()],
                vec![],
            )],
        };
        let layers = [file, central];
        let web = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let batch = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/batch").unwrap();
        let at = |peer, path| Request {
            peer,
            http: Some(("GET", path)),
        };
        assert!(check(&layers, &at(Some(&web), "/api/x")).is_ok());
        assert!(check(&layers, &at(Some(&web), "/admin")).is_err());
        assert!(check(&layers, &at(Some(&batch), "/api/x")).is_err());
        let anonymous = check(&layers, &at(None, "/api/x")).unwrap_err();
        assert!(
            anonymous.to_string().contains("without an identity"),
            "{anonymous}"
        );
    }
}
