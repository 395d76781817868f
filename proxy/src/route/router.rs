//! Request → (virtual host, route), read from the current snapshot.
//!
//! Virtual hosts are chosen by host name: an exact domain wins over the longest `*.suffix`
//! wildcard, which wins over `*`. Inside a virtual host, routes are tried in order and the
//! first whose path, headers and method all match is taken, as in Envoy and Gateway API.

use std::collections::HashMap;

use http::header::HeaderName;
use http::request::Parts;
use regex::Regex;

use crate::route::table::{Route, VirtualHost};

pub enum PathMatch {
    Exact(String),
    Prefix(String),
    /// The path itself, or anything under it at a `/` (held without a trailing `/`).
    SegmentPrefix(String),
    Regex(Regex),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::SegmentPrefix(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            PathMatch::Regex(re) => re.is_match(path),
        }
    }
}

/// A query parameter that must be there with a matching value. Names and values are
/// compared as they are on the wire (not percent-decoded), as Envoy compares them.
pub enum QueryMatch {
    Exact(String, String),
    Regex(String, Regex),
}

impl QueryMatch {
    fn matches(&self, query: Option<&str>) -> bool {
        let (QueryMatch::Exact(name, _) | QueryMatch::Regex(name, _)) = self;
        query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then_some(v)
            })
            .any(|v| match self {
                QueryMatch::Exact(_, value) => v == value,
                QueryMatch::Regex(_, re) => re.is_match(v),
            })
    }
}

pub enum HeaderMatch {
    Exact(HeaderName, String),
    Regex(HeaderName, Regex),
    Present(HeaderName, bool),
}

impl HeaderMatch {
    fn matches(&self, headers: &http::HeaderMap) -> bool {
        match self {
            HeaderMatch::Exact(name, want) => headers
                .get_all(name)
                .iter()
                .any(|v| v.as_bytes() == want.as_bytes()),
            HeaderMatch::Regex(name, re) => headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|s| re.is_match(s))),
            HeaderMatch::Present(name, want) => headers.contains_key(name) == *want,
        }
    }
}

/// Two virtual hosts of one listener claim the same domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("domain `{0}` appears in more than one virtual host")]
pub struct DuplicateDomain(pub String);

/// Host name → index into the listener's virtual hosts.
#[derive(Default)]
pub struct DomainTable {
    exact: HashMap<String, usize>,
    /// `(".example.com", index)`, longest suffix first.
    suffixes: Vec<(String, usize)>,
    any: Option<usize>,
}

impl DomainTable {
    pub fn new(vhosts: &[VirtualHost]) -> Result<Self, DuplicateDomain> {
        let mut table = DomainTable::default();
        for (i, vh) in vhosts.iter().enumerate() {
            for domain in &vh.domains {
                let domain = domain.to_ascii_lowercase();
                let taken = if domain == "*" {
                    table.any.replace(i).is_some()
                } else if let Some(suffix) = domain.strip_prefix('*') {
                    if table.suffixes.iter().any(|(s, _)| s == suffix) {
                        true
                    } else {
                        table.suffixes.push((suffix.to_string(), i));
                        false
                    }
                } else {
                    table.exact.insert(domain.clone(), i).is_some()
                };
                if taken {
                    return Err(DuplicateDomain(domain));
                }
            }
        }
        table.suffixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        Ok(table)
    }

    /// `host` may carry a port. A domain written with its port matches only that port; one
    /// written without matches any port.
    pub fn find(&self, host: &str) -> Option<usize> {
        // Hosts arrive lower-case nearly always; only the rest pay for a lower-case copy.
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        let bare = strip_port(host);
        if let Some(&i) = self.exact.get(bare) {
            return Some(i);
        }
        self.suffixes
            .iter()
            .find(|(suffix, _)| bare.ends_with(suffix.as_str()) && bare.len() > suffix.len())
            .map(|&(_, i)| i)
            .or(self.any)
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

pub enum RouteOutcome<'a> {
    Matched(&'a VirtualHost, &'a Route),
    NoVirtualHost,
    NoRoute(&'a VirtualHost),
}

/// The virtual host for `host` among a listener's, then the first of its routes that matches.
pub fn route<'a>(
    domains: &DomainTable,
    virtual_hosts: &'a [VirtualHost],
    host: &str,
    parts: &Parts,
) -> RouteOutcome<'a> {
    let Some(i) = domains.find(host) else {
        return RouteOutcome::NoVirtualHost;
    };
    route_in(&virtual_hosts[i], parts)
}

/// The first route of `vhost` that matches the request.
pub fn route_in<'a>(vhost: &'a VirtualHost, parts: &Parts) -> RouteOutcome<'a> {
    let path = parts.uri.path();
    let found = vhost.routes.iter().find(|r| {
        r.path.matches(path)
            && (r.methods.is_empty() || r.methods.contains(&parts.method))
            && r.headers.iter().all(|h| h.matches(&parts.headers))
            && r.query.iter().all(|q| q.matches(parts.uri.query()))
    });
    match found {
        Some(r) => RouteOutcome::Matched(vhost, r),
        None => RouteOutcome::NoRoute(vhost),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vh(name: &str, domains: &[&str]) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![],
        }
    }

    #[test]
    fn domain_precedence() {
        let vhosts = [
            vh("a", &["api.example.com"]),
            vh("b", &["*.example.com"]),
            vh("c", &["*"]),
            vh("d", &["x:8080"]),
        ];
        let t = DomainTable::new(&vhosts).unwrap();
        assert_eq!(t.find("api.example.com"), Some(0));
        assert_eq!(t.find("API.example.com:80"), Some(0));
        assert_eq!(t.find("web.example.com"), Some(1));
        assert_eq!(t.find("example.com"), Some(2));
        assert_eq!(t.find("x:8080"), Some(3));
        assert_eq!(t.find("x:9090"), Some(2));
        assert_eq!(t.find("[::1]:80"), Some(2));
    }

    #[test]
    fn duplicate_domain_is_refused() {
        assert!(DomainTable::new(&[vh("a", &["x"]), vh("b", &["x"])]).is_err());
    }
}
