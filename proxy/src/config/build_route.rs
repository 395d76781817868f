//! Building a route: its matches, backends, timeout, retries, rate limit, header changes
//! and upgrades.

use std::collections::HashMap;
use std::sync::Arc;

use http::Method;
use http::header::{HeaderName, HeaderValue};
use outrigger_core::config_error::ConfigError;
use outrigger_core::policy;
use outrigger_core::token_bucket::RateLimiter;
use regex::Regex;
use serde_saphyr::Spanned;

use crate::cluster::balance::{Cluster, WeightedBackend};
use crate::config::build::Builder;
use crate::config::carry_over;
use crate::config::file::{
    HeaderChangesFile, MatchFile, RateLimitFile, RetryFile, RouteFile, TargetFile,
};
use crate::config::snapshot::DEFAULT_ROUTE_TIMEOUT;
use crate::policy::retry::RetryPolicy;
use crate::route::rewrite::{HostRewrite, PathRewrite, Redirect, Rewrite, substitution};
use crate::route::router::{HeaderMatch, PathMatch, QueryMatch};
use crate::route::table::{HeaderChangeLists, HeaderChanges, Mirror, Route};

/// The policy of every route that sets none, one for the whole process.
static DEFAULT_RETRY: std::sync::LazyLock<Arc<RetryPolicy>> =
    std::sync::LazyLock::new(|| Arc::new(RetryPolicy::from_model(&policy::default_retry())));

impl Builder<'_> {
    /// A bucket keeps its tokens across reloads that leave its limits alone; otherwise every
    /// config push would hand out a fresh burst.
    pub(super) fn rate_limiter(
        &self,
        limit: &Option<RateLimitFile>,
        field: &str,
        listener: &str,
        route: Option<&str>,
    ) -> Result<Option<Arc<RateLimiter>>, ConfigError> {
        let Some(limit) = limit else {
            return Ok(None);
        };
        let policy::RateLimit {
            requests_per_second: rate,
            burst,
        } = policy::check_rate_limit(self.source, limit, field)?;
        let old = self.previous.and_then(|p| p.rate_limiter(listener, route));
        Ok(Some(carry_over::rate_limiter(old, rate, burst)))
    }

    pub(super) fn route(
        &self,
        r: &RouteFile,
        field: &str,
        (listener, vhost): (&str, &str),
        index: usize,
        clusters: &HashMap<String, Arc<Cluster>>,
    ) -> Result<Route, ConfigError> {
        let name = r.name.clone().unwrap_or_else(|| format!("{vhost}/{index}"));
        let every_path = MatchFile::default();
        let m = r.matches.as_deref().unwrap_or(&every_path);
        let path = match (&m.exact, &m.prefix, &m.segment_prefix, &m.regex) {
            (Some(p), None, None, None) => PathMatch::Exact(p.clone()),
            (None, Some(p), None, None) => PathMatch::Prefix(p.clone()),
            (None, None, Some(p), None) => match p.trim_end_matches('/') {
                "" => PathMatch::Prefix("/".into()),
                p => PathMatch::SegmentPrefix(p.to_string()),
            },
            (None, None, None, Some(re)) => {
                PathMatch::Regex(self.regex(re, &format!("{field}.match.regex"))?)
            }
            (None, None, None, None) => PathMatch::Prefix("/".into()),
            _ => {
                return Err(ConfigError::at(
                    self.source,
                    None,
                    &format!("{field}.match"),
                    "set at most one of `exact`, `prefix`, `segment_prefix` and `regex`",
                ));
            }
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for (h, hm) in m.headers.iter().enumerate() {
            let hfield = format!("{field}.match.headers[{h}]");
            let name = self.header_name(&hm.name, &format!("{hfield}.name"))?;
            let matcher = match (&hm.exact, &hm.regex, hm.present) {
                (Some(v), None, None) => HeaderMatch::Exact(name, v.clone()),
                (None, Some(re), None) => {
                    HeaderMatch::Regex(name, self.regex(re, &format!("{hfield}.regex"))?)
                }
                (None, None, Some(p)) => HeaderMatch::Present(name, p),
                _ => {
                    return Err(self.err(
                        &hm.name,
                        &hfield,
                        "set exactly one of `exact`, `regex` and `present`",
                    ));
                }
            };
            headers.push(matcher);
        }
        let mut methods = Vec::with_capacity(m.methods.len());
        for (k, method) in m.methods.iter().enumerate() {
            let parsed =
                Method::from_bytes(method.value.to_ascii_uppercase().as_bytes()).map_err(|_| {
                    self.err(
                        method,
                        &format!("{field}.match.methods[{k}]"),
                        "not an HTTP method",
                    )
                })?;
            methods.push(parsed);
        }
        let mut query = Vec::with_capacity(m.query.len());
        for (q, qm) in m.query.iter().enumerate() {
            let qfield = format!("{field}.match.query[{q}]");
            let name = qm.name.value.clone();
            query.push(match (&qm.exact, &qm.regex) {
                (Some(v), None) => QueryMatch::Exact(name, v.clone()),
                (None, Some(re)) => {
                    QueryMatch::Regex(name, self.regex(re, &format!("{qfield}.regex"))?)
                }
                _ => {
                    return Err(self.err(
                        &qm.name,
                        &qfield,
                        "set exactly one of `exact` and `regex`",
                    ));
                }
            });
        }
        let redirect = match &r.redirect {
            Some(d) => Some(Box::new(self.redirect(d, &format!("{field}.redirect"))?)),
            None => None,
        };
        let rewrite = match &r.rewrite {
            Some(w) if w.scheme.is_some() || w.port.is_some() || w.status.is_some() => {
                return Err(ConfigError::at(
                    self.source,
                    None,
                    &format!("{field}.rewrite"),
                    "`scheme`, `port` and `status` belong to a redirect",
                ));
            }
            Some(w) => Some(Box::new(Rewrite {
                path: self.path_rewrite(w, &format!("{field}.rewrite"))?,
                host: match &w.host {
                    Some(h) => Some(HostRewrite::parse(&h.value).ok_or_else(|| {
                        self.err(h, &format!("{field}.rewrite.host"), "not a valid host")
                    })?),
                    None => None,
                },
            })),
            None => None,
        };
        if redirect.is_some() != r.backends.is_empty() {
            return Err(ConfigError::at(
                self.source,
                None,
                &format!("{field}.backends"),
                "a route needs backends, or a redirect instead of them",
            ));
        }
        let mut backends = Vec::with_capacity(r.backends.len());
        for (b, backend) in r.backends.iter().enumerate() {
            let cluster = self.cluster_ref(
                &backend.cluster,
                &format!("{field}.backends[{b}].cluster"),
                clusters,
            )?;
            backends.push(WeightedBackend {
                cluster,
                weight: backend.weight,
            });
        }
        let mut mirrors = Vec::with_capacity(r.mirror.len());
        for (m, mirror) in r.mirror.iter().enumerate() {
            let at = format!("{field}.mirror[{m}]");
            let percent = mirror.percent.unwrap_or(100.0);
            if !(0.0..=100.0).contains(&percent) {
                return Err(self.err(
                    &mirror.cluster,
                    &format!("{at}.percent"),
                    format!("{percent} is not between 0 and 100"),
                ));
            }
            mirrors.push(Mirror {
                cluster: self.cluster_ref(&mirror.cluster, &format!("{at}.cluster"), clusters)?,
                percent,
            });
        }
        let total_weight: u32 = backends.iter().map(|b| b.weight).sum();
        if total_weight == 0 && redirect.is_none() {
            return Err(self.err(
                &r.backends[0].cluster,
                &format!("{field}.backends"),
                "backend weights add up to 0",
            ));
        }
        if let Some(ratio) = r.sampling.filter(|r| !(0.0..=1.0).contains(r)) {
            return Err(ConfigError::at(
                self.source,
                None,
                &format!("{field}.sampling"),
                format!("{ratio} is not between 0 and 1"),
            ));
        }
        let mut websocket = r.upgrades.is_none();
        for u in r.upgrades.iter().flatten() {
            match u.value.to_ascii_lowercase().as_str() {
                "websocket" => websocket = true,
                "h2c" => {
                    return Err(self.err(
                        u,
                        &format!("{field}.upgrades"),
                        "`h2c` is never honoured: it would hand the connection to the app unrouted",
                    ));
                }
                other => {
                    return Err(self.err(
                        u,
                        &format!("{field}.upgrades"),
                        format!("`{other}` is not an upgrade the proxy honours (only `websocket`)"),
                    ));
                }
            }
        }
        Ok(Route {
            websocket,
            series: Default::default(),
            sampling: r.sampling,
            rate_limit: self.rate_limiter(
                &r.rate_limit,
                &format!("{field}.rate_limit"),
                listener,
                Some(&name),
            )?,
            name: name.into(),
            path,
            headers: headers.into(),
            methods: methods.into(),
            query: query.into(),
            backends,
            total_weight,
            rewrite,
            redirect,
            mirrors: mirrors.into(),
            timeout: self.duration(
                r.timeout.as_deref(),
                &format!("{field}.timeout"),
                DEFAULT_ROUTE_TIMEOUT,
            )?,
            request_headers: match &r.request_headers {
                Some(h) => self.header_changes(h, &format!("{field}.request_headers"))?,
                None => HeaderChanges::default(),
            },
            response_headers: match &r.response_headers {
                Some(h) => self.header_changes(h, &format!("{field}.response_headers"))?,
                None => HeaderChanges::default(),
            },
            // On unless turned off (`attempts: 0`): the defaults retry only what never reached
            // the app or what it said it could not take, idempotent requests only.
            retry: Some(match &r.retry {
                Some(retry) => Arc::new(self.retry(retry, &format!("{field}.retry"))?),
                None => DEFAULT_RETRY.clone(),
            }),
        })
    }

    fn path_rewrite(
        &self,
        t: &TargetFile,
        field: &str,
    ) -> Result<Option<PathRewrite>, ConfigError> {
        Ok(match (&t.path, &t.prefix, &t.regex) {
            (None, None, None) => None,
            (Some(p), None, None) => Some(PathRewrite::Full(p.clone())),
            (None, Some(p), None) => Some(PathRewrite::Prefix(p.clone())),
            (None, None, Some(re)) => Some(PathRewrite::Regex(
                Regex::new(&re.pattern.value).map_err(|e| {
                    self.err(
                        &re.pattern,
                        &format!("{field}.regex.pattern"),
                        format!("invalid regex: {e}"),
                    )
                })?,
                substitution(&re.substitution),
            )),
            _ => {
                return Err(ConfigError::at(
                    self.source,
                    None,
                    field,
                    "set at most one of `path`, `prefix` and `regex`",
                ));
            }
        })
    }

    fn redirect(&self, d: &TargetFile, field: &str) -> Result<Redirect, ConfigError> {
        let status = match d.status.unwrap_or(302) {
            s @ (301 | 302 | 303 | 307 | 308) => {
                http::StatusCode::from_u16(s).unwrap_or(http::StatusCode::FOUND)
            }
            other => {
                return Err(ConfigError::at(
                    self.source,
                    None,
                    &format!("{field}.status"),
                    format!("{other} is not a redirect status (301, 302, 303, 307, 308)"),
                ));
            }
        };
        if let Some(scheme) = d
            .scheme
            .as_deref()
            .filter(|s| !matches!(*s, "http" | "https"))
        {
            return Err(ConfigError::at(
                self.source,
                None,
                &format!("{field}.scheme"),
                format!("`{scheme}` is not http or https"),
            ));
        }
        Ok(Redirect {
            scheme: d.scheme.clone(),
            host: d.host.as_ref().map(|h| h.value.clone()),
            port: d.port,
            path: self.path_rewrite(d, field)?,
            status,
        })
    }

    pub(super) fn retry(&self, r: &RetryFile, field: &str) -> Result<RetryPolicy, ConfigError> {
        Ok(RetryPolicy::from_model(&policy::check_retry(
            self.source,
            r,
            field,
        )?))
    }

    pub(super) fn regex(&self, re: &Spanned<String>, field: &str) -> Result<Regex, ConfigError> {
        // Anchored: a path regex must match the whole path, as in Envoy's safe_regex.
        Regex::new(&format!("^(?:{})$", re.value))
            .map_err(|e| self.err(re, field, format!("invalid regex: {e}")))
    }

    pub(super) fn header_name(
        &self,
        name: &Spanned<String>,
        field: &str,
    ) -> Result<HeaderName, ConfigError> {
        HeaderName::from_bytes(name.value.to_ascii_lowercase().as_bytes()).map_err(|_| {
            self.err(
                name,
                field,
                format!("`{}` is not a valid header name", name.value),
            )
        })
    }

    pub(super) fn header_changes(
        &self,
        h: &HeaderChangesFile,
        field: &str,
    ) -> Result<HeaderChanges, ConfigError> {
        let mut out = HeaderChangeLists::default();
        for (key, list, into) in [("set", &h.set, &mut out.set), ("add", &h.add, &mut out.add)] {
            for (i, kv) in list.iter().enumerate() {
                let name = self.header_name(&kv.name, &format!("{field}.{key}[{i}].name"))?;
                let value = HeaderValue::from_str(&kv.value.value).map_err(|_| {
                    self.err(
                        &kv.value,
                        &format!("{field}.{key}[{i}].value"),
                        "not a valid header value",
                    )
                })?;
                into.push((name, value));
            }
        }
        for (i, name) in h.remove.iter().enumerate() {
            out.remove
                .push(self.header_name(name, &format!("{field}.remove[{i}]"))?);
        }
        Ok(out.into())
    }
}
