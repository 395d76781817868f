//! Who may call a service, as users write it: the mesh file's `authorization:` section and
//! the `AuthorizationPolicy` resource say the same things, and are checked here alike.
//!
//! ```yaml
//! authorization:
//!   allow:
//!     - from: [{service_account: web}, {namespace: ops}]
//!       paths: ["/api/*"]
//!       methods: [GET]
//! ```
//!
//! A rule lets in any of its callers (none: anyone), on any of its paths (none: any) with
//! any of its methods (none: any). Once a service has an `authorization` section, a request
//! no rule allows gets 403; an empty `allow` list lets nobody in.

use serde::Deserialize;

use outrigger_core::authz::{Authorization, Caller, Rule, TextMatch, method};
use outrigger_core::spiffe::{Principal, SpiffeId};

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationFile {
    #[serde(default)]
    pub allow: Vec<AllowFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowFile {
    #[serde(default)]
    pub from: Vec<CallerFile>,
    /// `/exact`, or `/prefix/*`.
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
}

/// One caller: a service account (in `namespace`, by default the service's own), every
/// workload of a namespace, or a SPIFFE ID.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerFile {
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub identity: Option<String>,
}

/// Label values Kubernetes allows for names: what a namespace or service account can be.
fn dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The rules of `file`, for a service in `namespace`, named `<name_prefix><i>`. Errors name
/// the field under `field`.
pub fn check(
    file: &AuthorizationFile,
    namespace: &str,
    trust_domain: &str,
    field: &str,
    name_prefix: &str,
) -> Result<Authorization, String> {
    let mut rules = Vec::with_capacity(file.allow.len());
    for (i, allow) in file.allow.iter().enumerate() {
        let at = format!("{field}.allow[{i}]");
        let mut callers = Vec::with_capacity(allow.from.len());
        for (j, c) in allow.from.iter().enumerate() {
            let at = format!("{at}.from[{j}]");
            let name_ok = |what: &str, v: &str| {
                if dns_label(v) {
                    Ok(v.to_string())
                } else {
                    Err(format!("{at}.{what}: `{v}` is not a Kubernetes name"))
                }
            };
            let principal = match (&c.service_account, &c.namespace, &c.identity) {
                (Some(sa), ns, None) => {
                    let ns = name_ok("namespace", ns.as_deref().unwrap_or(namespace))?;
                    Principal::Exact(SpiffeId::new(
                        trust_domain,
                        &ns,
                        &name_ok("service_account", sa)?,
                    ))
                }
                (None, Some(ns), None) => Principal::Namespace {
                    trust_domain: trust_domain.to_string(),
                    namespace: name_ok("namespace", ns)?,
                },
                (None, None, Some(id)) => {
                    Principal::parse(id).map_err(|e| format!("{at}.identity: {e}"))?
                }
                _ => {
                    return Err(format!(
                        "{at}: give `service_account` (and maybe `namespace`), `namespace` \
                         alone, or `identity`"
                    ));
                }
            };
            callers.push(Caller::from(&principal));
        }
        let paths = allow
            .paths
            .iter()
            .enumerate()
            .map(|(j, p)| TextMatch::path(p).map_err(|e| format!("{at}.paths[{j}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let methods = allow
            .methods
            .iter()
            .enumerate()
            .map(|(j, m)| method(m).map_err(|e| format!("{at}.methods[{j}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        rules.push(Rule::from_lists(
            format!("{name_prefix}{i}"),
            callers,
            paths,
            methods,
        ));
    }
    Ok(Authorization { rules })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrigger_core::authz::Request;

    fn parse(yaml: &str) -> AuthorizationFile {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn callers_paths_and_methods() {
        let file = parse(
            r#"
allow:
  - from: [{service_account: web}, {service_account: batch, namespace: jobs}]
    paths: ["/api/*"]
    methods: [GET]
  - from: [{namespace: ops}]
"#,
        );
        let authz = check(&file, "shop", "cluster.local", "authorization", "r").unwrap();
        let id = |ns: &str, sa: &str| SpiffeId::new("cluster.local", ns, sa);
        let get = |peer: &SpiffeId, path: &'static str| {
            authz.allows(&Request {
                peer: Some(peer),
                http: Some(("GET", path)),
            })
        };
        assert!(get(&id("shop", "web"), "/api/x"));
        assert!(get(&id("jobs", "batch"), "/api/x"));
        assert!(!get(&id("jobs", "web"), "/api/x"));
        assert!(!get(&id("shop", "web"), "/admin"));
        assert!(get(&id("ops", "anyone"), "/admin"));
        assert_eq!(authz.rules[1].name, "r1");
    }

    #[test]
    fn mistakes_are_named() {
        for (yaml, want) in [
            ("allow: [{from: [{}]}]", "authorization.allow[0].from[0]"),
            (
                "allow: [{from: [{namespace: a, identity: 'spiffe://x/ns/a/sa/b'}]}]",
                "authorization.allow[0].from[0]",
            ),
            ("allow: [{from: [{namespace: Shop}]}]", "from[0].namespace"),
            ("allow: [{paths: [api]}]", "authorization.allow[0].paths[0]"),
            (
                "allow: [{methods: [get]}]",
                "authorization.allow[0].methods[0]",
            ),
            ("allow: [{from: [{identity: 'web'}]}]", "from[0].identity"),
        ] {
            let e = check(&parse(yaml), "shop", "cluster.local", "authorization", "r").unwrap_err();
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }
}
