//! The headers the proxy owns: the ones it vouches for (and strips from callers), the
//! hop-by-hop ones it never forwards, upgrade detection, and the rewrite of a request for the
//! endpoint it goes to.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};
use hyper::body::Incoming;

use crate::cluster::balance::UpstreamProtocol;
use crate::route::table::Route;
use crate::upstream::client::Body;
use crate::upstream::error::ProxyError;

/// Tells the upstream which attempt this is (1 for the first). Header names are constants,
/// not text: a name given as text is parsed, and a custom one allocated, at every insert.
pub const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-outrigger-attempt");
/// Tells the app behind an mTLS listener the caller's verified SPIFFE ID.
pub const CLIENT_ID_HEADER: HeaderName = HeaderName::from_static("x-outrigger-client-id");

/// The headers the proxy vouches for. A caller's copy is removed before the proxy sets its
/// own, and a `Connection:` nomination cannot remove the proxy's.
static VOUCHED: [HeaderName; 1] = [CLIENT_ID_HEADER];

/// The value of `ATTEMPT_HEADER` for attempt `number`, without allocating for the first few.
pub fn attempt_value(number: u32) -> HeaderValue {
    static FIRST: [HeaderValue; 9] = [
        HeaderValue::from_static("1"),
        HeaderValue::from_static("2"),
        HeaderValue::from_static("3"),
        HeaderValue::from_static("4"),
        HeaderValue::from_static("5"),
        HeaderValue::from_static("6"),
        HeaderValue::from_static("7"),
        HeaderValue::from_static("8"),
        HeaderValue::from_static("9"),
    ];
    match number.checked_sub(1).and_then(|i| FIRST.get(i as usize)) {
        Some(v) => v.clone(),
        None => HeaderValue::from(number),
    }
}

/// Whether `name` is `vouched` as an app might read it: frameworks that map headers to
/// variables (CGI, WSGI, Rack, nginx) fold `_` into `-`, and names arrive lowercased.
fn spells(name: &str, vouched: &str) -> bool {
    name.len() == vouched.len()
        && name
            .bytes()
            .zip(vouched.bytes())
            .all(|(a, b)| a.to_ascii_lowercase() == b || (a == b'_' && b == b'-'))
}

fn is_vouched(name: &str) -> bool {
    VOUCHED.iter().any(|v| spells(name, v.as_str()))
}

/// Removes every spelling of every vouched-for header.
pub fn strip_vouched(headers: &mut HeaderMap) {
    // Most requests carry none: look before allocating.
    if !headers.keys().any(|k| is_vouched(k.as_str())) {
        return;
    }
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_vouched(k.as_str()))
        .cloned()
        .collect();
    for name in found {
        headers.remove(name);
    }
}

/// The hop-by-hop headers removed whether or not `Connection` names them; `Connection`
/// first. Spelled once, here, for both the names and their lengths below.
const HOP_BY_HOP_NAMES: [&str; 6] = [
    "connection",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];
static HOP_BY_HOP: [HeaderName; 6] = [
    HeaderName::from_static(HOP_BY_HOP_NAMES[0]),
    HeaderName::from_static(HOP_BY_HOP_NAMES[1]),
    HeaderName::from_static(HOP_BY_HOP_NAMES[2]),
    HeaderName::from_static(HOP_BY_HOP_NAMES[3]),
    HeaderName::from_static(HOP_BY_HOP_NAMES[4]),
    HeaderName::from_static(HOP_BY_HOP_NAMES[5]),
];
/// `te`'s bit beside `HOP_BY_HOP`'s.
const TE_PRESENT: u8 = 1 << HOP_BY_HOP.len();
/// The lengths of those names and of `te`, as bits: a name of any other length is none of
/// them, and most names are told apart by this alone, without comparing their bytes.
const HOP_BY_HOP_LENGTHS: u32 = {
    let mut bits = 1 << "te".len();
    let mut i = 0;
    while i < HOP_BY_HOP_NAMES.len() {
        bits |= 1 << HOP_BY_HOP_NAMES[i].len();
        i += 1;
    }
    bits
};

/// Connection-scoped headers describe one hop and must not be forwarded (RFC 9110 §7.6.1).
/// `te: trailers` is the exception: gRPC needs it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are there. Most messages carry one or none, and a
    // lookup of each (which hashes the name) cost more than all the rest of this function.
    let mut present = 0u8;
    for name in headers.keys() {
        let len = name.as_str().len();
        if len >= 32 || HOP_BY_HOP_LENGTHS & (1 << len) == 0 {
            continue;
        }
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        } else if name == header::TE {
            present |= TE_PRESENT;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .map(str::trim)
            // Removed below in any case. The token almost every response carries: skipped,
            // it costs no name and no list.
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            // The proxy's own headers are not the caller's to remove.
            .filter(|n| !VOUCHED.contains(n))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if present & TE_PRESENT != 0 && headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

/// Whether this is an upgrade the proxy honours. Only WebSocket is: an `h2c` upgrade would
/// hand the rest of the connection to the app unrouted, and any other protocol is one the
/// proxy cannot vouch for. Their `Upgrade` header is removed as hop-by-hop, and the request
/// goes on as an ordinary one.
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    let websocket = |v: &HeaderValue| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
        })
    };
    req.version() == Version::HTTP_11
        && req.headers().get(header::UPGRADE).is_some_and(websocket)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Readies a request for the endpoint it goes to, in place: a request is moved whole at
/// every stage it passes, and taking it apart and back together here would move it twice more.
pub fn rewrite_request(
    req: &mut Request<Body>,
    route: &Route,
    host: &str,
    protocol: UpstreamProtocol,
    upgrade: bool,
) -> Result<(), ProxyError> {
    let invalid = || ProxyError::BadRequest("invalid request target");
    if !upgrade {
        strip_hop_by_hop(req.headers_mut());
    }
    match protocol {
        UpstreamProtocol::Http1 => {
            // The connection is already the endpoint's: the target goes in origin form, and
            // the name the client asked for rides in Host, which an HTTP/2 client did not send.
            let uri = req.uri();
            if uri.authority().is_some() || uri.path_and_query().is_none() {
                let mut origin = http::uri::Parts::default();
                origin.path_and_query = Some(
                    uri.path_and_query()
                        .cloned()
                        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
                );
                *req.uri_mut() = Uri::from_parts(origin).map_err(|_| invalid())?;
            }
            *req.version_mut() = Version::HTTP_11;
            if !req.headers().contains_key(header::HOST) {
                let value = HeaderValue::from_str(host)
                    .map_err(|_| ProxyError::BadRequest("invalid host"))?;
                req.headers_mut().insert(header::HOST, value);
            }
        }
        UpstreamProtocol::Http2 => {
            // The connection is already the endpoint's; the URI only supplies :authority.
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() =
                Uri::try_from(format!("http://{host}{path}")).map_err(|_| invalid())?;
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(header::HOST);
        }
    }
    route.request_headers.apply(req.headers_mut());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hop_by_hop_bits_follow_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name} (bit {i}) is removed, nothing else");
        }
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_stripped() {
        let strip = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            strip_hop_by_hop(&mut h);
            let mut left: Vec<String> = h
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
                .collect();
            left.sort();
            left
        };
        assert_eq!(
            strip(&[("host", "a"), ("accept", "*/*")]),
            ["accept: */*", "host: a"]
        );
        assert_eq!(
            strip(&[
                ("connection", "keep-alive"),
                ("keep-alive", "timeout=5"),
                ("content-length", "2"),
            ]),
            ["content-length: 2"]
        );
        assert_eq!(
            strip(&[
                ("connection", "X-Foo, Keep-Alive"),
                ("connection", "x-bar"),
                ("x-foo", "1"),
                ("x-bar", "2"),
                ("x-baz", "3"),
            ]),
            ["x-baz: 3"]
        );
        assert_eq!(
            strip(&[
                ("proxy-authorization", "secret"),
                ("proxy-connection", "keep-alive"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "h2c"),
                ("te", "gzip"),
                ("x-kept", "1"),
            ]),
            ["x-kept: 1"]
        );
        assert_eq!(strip(&[("te", "trailers")]), ["te: trailers"]);
        assert_eq!(
            strip(&[("connection", "te"), ("te", "trailers")]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_vouched_list_names_the_client_id_header() {
        assert_eq!(VOUCHED, [CLIENT_ID_HEADER]);
    }

    #[test]
    fn attempt_values_are_the_attempt_numbers() {
        for n in 1..=12u32 {
            assert_eq!(attempt_value(n), n.to_string().as_str());
        }
    }

    #[test]
    fn every_spelling_of_a_vouched_header_is_stripped() {
        let mut h = HeaderMap::new();
        for name in [
            "x-outrigger-client-id",
            "x_outrigger_client_id",
            "x-outrigger_client-id",
        ] {
            h.append(
                name,
                "spiffe://cluster.local/ns/x/sa/admin".parse().unwrap(),
            );
        }
        h.insert("x-outrigger-client-idx", "kept".parse().unwrap());
        strip_vouched(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn a_connection_nomination_cannot_remove_a_vouched_header() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "x-outrigger-client-id, x-other".parse().unwrap(),
        );
        h.insert(
            CLIENT_ID_HEADER,
            "spiffe://cluster.local/ns/a/sa/a".parse().unwrap(),
        );
        h.insert("x-other", "gone".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.contains_key(CLIENT_ID_HEADER));
        assert!(!h.contains_key("x-other"));
    }
}
