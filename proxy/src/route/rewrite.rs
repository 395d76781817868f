//! What a route may do to a request's target: rewrite its path and host before it goes on,
//! or answer it with a redirect instead. Both follow Envoy's semantics, so one xDS route
//! means the same in our proxy and in Envoy.

use http::uri::Authority;
use http::{HeaderValue, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use regex::Regex;

use crate::route::router::PathMatch;
use crate::upstream::client::Body;

/// A new path for a request.
pub enum PathRewrite {
    /// The whole path.
    Full(String),
    /// The part the route's prefix matched, replaced (Envoy's `prefix_rewrite`).
    Prefix(String),
    /// `regex` replaced by `substitution` (Envoy's `regex_rewrite`; `\1` is the first group).
    Regex(Regex, String),
}

impl PathRewrite {
    /// The rewritten path, or `None` when nothing applies (the route's match is not a
    /// prefix, for `Prefix`).
    fn apply(&self, path: &str, matched: &PathMatch) -> Option<String> {
        match self {
            PathRewrite::Full(p) => Some(p.clone()),
            PathRewrite::Prefix(replacement) => {
                let prefix = match matched {
                    PathMatch::Prefix(p) | PathMatch::SegmentPrefix(p) => p,
                    _ => return None,
                };
                let rest = path.strip_prefix(prefix.as_str())?;
                Some(format!("{replacement}{rest}"))
            }
            PathRewrite::Regex(re, substitution) => {
                Some(re.replace_all(path, substitution.as_str()).into_owned())
            }
        }
    }
}

/// Envoy writes a group as `\1`; Rust's regex as `${1}`, and a literal `$` as `$$`.
pub fn substitution(envoy: &str) -> String {
    let mut out = String::with_capacity(envoy.len());
    let mut chars = envoy.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    out.push(d);
                    chars.next();
                }
                out.push('}');
            }
            '\\' => out.push(chars.next().unwrap_or('\\')),
            c => out.push(c),
        }
    }
    out
}

/// A route's rewrite of the request before it goes to a backend.
pub struct Rewrite {
    pub path: Option<PathRewrite>,
    /// Sent as the Host (`:authority`) instead of the caller's.
    pub host: Option<HostRewrite>,
}

/// A rewritten host, parsed once when the config is built: the header the backend sees, and
/// the authority the request is then sent to.
pub struct HostRewrite {
    pub value: HeaderValue,
    pub authority: Authority,
}

impl HostRewrite {
    /// `None` unless `host` is an authority (`host[:port]`).
    pub fn parse(host: &str) -> Option<HostRewrite> {
        Some(HostRewrite {
            authority: host.parse().ok()?,
            value: HeaderValue::from_str(host).ok()?,
        })
    }
}

impl Rewrite {
    /// The new target (path and query) of a request to `uri` matched by `matched`.
    pub fn target(&self, uri: &Uri, matched: &PathMatch) -> Option<String> {
        let path = self.path.as_ref()?.apply(uri.path(), matched)?;
        Some(match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        })
    }
}

/// A route that answers with a redirect.
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathRewrite>,
    pub status: StatusCode,
}

impl Redirect {
    /// The redirect for a request to `host` (as the caller sent it) and `uri`.
    pub fn respond(&self, host: &str, uri: &Uri, matched: &PathMatch) -> Response<Body> {
        let (request_host, request_port) = split_host(host);
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let host = self.host.as_deref().unwrap_or(request_host);
        // A new scheme brings its own default port; otherwise the caller's port stays.
        let port = self.port.or(if self.scheme.is_some() {
            None
        } else {
            request_port
        });
        let port = port.filter(|p| default_port(scheme) != Some(*p));
        let path = self
            .path
            .as_ref()
            .and_then(|p| p.apply(uri.path(), matched))
            .unwrap_or_else(|| uri.path().to_string());
        let mut location = format!("{scheme}://{host}");
        if let Some(port) = port {
            location.push_str(&format!(":{port}"));
        }
        location.push_str(&path);
        if let Some(q) = uri.query() {
            location.push('?');
            location.push_str(q);
        }
        let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
        *resp.status_mut() = self.status;
        if let Ok(value) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, value);
        }
        resp
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// `host:port` → (host, port); a bracketed IPv6 address keeps its brackets.
fn split_host(host: &str) -> (&str, Option<u16>) {
    let (h, port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => {
            (h, p.parse().ok())
        }
        _ => (host, None),
    };
    if port.is_some() {
        (h, port)
    } else {
        (host, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn envoy_substitutions_become_rust_ones() {
        assert_eq!(substitution(r"/v2\1"), "/v2${1}");
        assert_eq!(substitution(r"\12x"), "${12}x");
        assert_eq!(substitution("$5"), "$$5");
        let re = Regex::new("^/api(/.*)?$").unwrap();
        assert_eq!(
            re.replace_all("/api/x", substitution(r"/v2\1").as_str()),
            "/v2/x"
        );
        assert_eq!(
            re.replace_all("/api", substitution(r"/v2\1").as_str()),
            "/v2"
        );
    }

    #[test]
    fn paths_rewrite_as_envoy_does() {
        let prefix = PathMatch::Prefix("/api".into());
        let full = Rewrite {
            path: Some(PathRewrite::Full("/new".into())),
            host: None,
        };
        assert_eq!(
            full.target(&uri("/api/x?a=1"), &prefix).as_deref(),
            Some("/new?a=1")
        );
        let pre = Rewrite {
            path: Some(PathRewrite::Prefix("/v2".into())),
            host: None,
        };
        assert_eq!(
            pre.target(&uri("/api/x"), &prefix).as_deref(),
            Some("/v2/x")
        );
        // A prefix rewrite on a route that matched no prefix leaves the path.
        let exact = PathMatch::Exact("/api".into());
        assert_eq!(pre.target(&uri("/api"), &exact), None);
    }

    #[test]
    fn redirects_keep_what_they_do_not_change() {
        let any = PathMatch::Prefix("/".into());
        let location = |r: &Redirect, host: &str, u: &str| {
            let resp = r.respond(host, &uri(u), &any);
            let loc = resp.headers()[header::LOCATION]
                .to_str()
                .unwrap()
                .to_string();
            (resp.status().as_u16(), loc)
        };
        let to_https = Redirect {
            scheme: Some("https".into()),
            host: None,
            port: None,
            path: None,
            status: StatusCode::MOVED_PERMANENTLY,
        };
        assert_eq!(
            location(&to_https, "shop:8080", "/a?b=1"),
            (301, "https://shop/a?b=1".into())
        );
        let moved = Redirect {
            scheme: None,
            host: Some("new.shop".into()),
            port: None,
            path: Some(PathRewrite::Full("/moved".into())),
            status: StatusCode::FOUND,
        };
        assert_eq!(
            location(&moved, "shop:8080", "/a"),
            (302, "http://new.shop:8080/moved".into())
        );
        assert_eq!(
            location(&moved, "shop", "/a"),
            (302, "http://new.shop/moved".into())
        );
        assert_eq!(
            location(&moved, "[::1]:80", "/a"),
            (302, "http://new.shop/moved".into())
        );
        let ported = Redirect {
            port: Some(9090),
            ..moved
        };
        assert_eq!(
            location(&ported, "shop", "/a"),
            (302, "http://new.shop:9090/moved".into())
        );
    }
}
