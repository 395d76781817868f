//! The authorization model (`authz`) as xDS carries it: the `envoy.filters.http.rbac`
//! filter's config, with an ALLOW action and one RBAC policy per rule.
//!
//! Written so Envoy and gRPC servers (gRFC A41) enforce it as our proxy does. Read back, a
//! construct the model cannot hold (a DENY action, a CEL condition, a source IP, a header
//! other than `:method`, a regex) is refused by name, never skipped: a skipped condition
//! would let in more than the rule says.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::rbac::v3::{
    Permission as PbPermission, Policy, Principal as PbPrincipal, Rbac as RbacRules, permission,
    principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, StringMatcher, path_matcher, string_matcher,
};

use crate::authz::{Authorization, Caller, Permission, Rule, TextMatch};
use crate::xds::XdsError;

pub const RBAC_FILTER: &str = "envoy.filters.http.rbac";

/// The filter config that enforces `authz`.
pub fn rbac(authz: &Authorization) -> Rbac {
    let policies: HashMap<String, Policy> = authz
        .rules
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                Policy {
                    permissions: r.permissions.iter().map(pb_permission).collect(),
                    principals: r.callers.iter().map(pb_principal).collect(),
                    ..Default::default()
                },
            )
        })
        .collect();
    Rbac {
        rules: Some(RbacRules {
            action: rbac::Action::Allow as i32,
            policies,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn string_matcher(m: &TextMatch) -> StringMatcher {
    use string_matcher::MatchPattern as P;
    let pattern = match m {
        TextMatch::Exact(s) => P::Exact(s.clone()),
        TextMatch::Prefix(s) => P::Prefix(s.clone()),
        TextMatch::Suffix(s) => P::Suffix(s.clone()),
        TextMatch::Contains(s) => P::Contains(s.clone()),
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    }
}

fn pb_principal(c: &Caller) -> PbPrincipal {
    use principal::Identifier as I;
    let id = match c {
        Caller::Any => I::Any(true),
        Caller::Authenticated(m) => I::Authenticated(principal::Authenticated {
            principal_name: m.as_ref().map(string_matcher),
        }),
        Caller::AnyOf(all) => I::OrIds(principal::Set {
            ids: all.iter().map(pb_principal).collect(),
        }),
        Caller::AllOf(all) => I::AndIds(principal::Set {
            ids: all.iter().map(pb_principal).collect(),
        }),
        Caller::Not(c) => I::NotId(Box::new(pb_principal(c))),
    };
    PbPrincipal {
        identifier: Some(id),
    }
}

fn pb_permission(p: &Permission) -> PbPermission {
    use permission::Rule as R;
    let rule = match p {
        Permission::Any => R::Any(true),
        Permission::Path(m) => R::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(string_matcher(m))),
        }),
        Permission::Method(m) => R::Header(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                string_matcher(&TextMatch::Exact(m.clone())),
            )),
            ..Default::default()
        }),
        Permission::AnyOf(all) => R::OrRules(permission::Set {
            rules: all.iter().map(pb_permission).collect(),
        }),
        Permission::AllOf(all) => R::AndRules(permission::Set {
            rules: all.iter().map(pb_permission).collect(),
        }),
        Permission::Not(p) => R::NotRule(Box::new(pb_permission(p))),
    };
    PbPermission { rule: Some(rule) }
}

/// The rules an RBAC filter config enforces: `None` when it has none (RBAC then lets every
/// request through).
pub fn read_rbac(what: &str, config: &Rbac) -> Result<Option<Authorization>, XdsError> {
    if config.matcher.is_some() {
        return unsupported(what, "matcher");
    }
    let Some(rules) = &config.rules else {
        return Ok(None);
    };
    if rules.action != rbac::Action::Allow as i32 {
        return unsupported(what, "rules.action (only ALLOW)");
    }
    if rules.audit_logging_options.is_some() {
        return unsupported(what, "rules.audit_logging_options");
    }
    // The map has no order; by name, so the same rules always read the same.
    let mut names: Vec<&String> = rules.policies.keys().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let p = &rules.policies[name];
        let at = format!("{what}: rules.policies[{name}]");
        if p.condition.is_some() || p.checked_condition.is_some() || p.cel_config.is_some() {
            return unsupported(&at, "condition");
        }
        out.push(Rule {
            name: name.clone(),
            callers: p
                .principals
                .iter()
                .map(|c| read_principal(&at, c))
                .collect::<Result<_, _>>()?,
            permissions: p
                .permissions
                .iter()
                .map(|c| read_permission(&at, c))
                .collect::<Result<_, _>>()?,
        });
    }
    Ok(Some(Authorization { rules: out }))
}

fn unsupported<T>(what: &str, field: &str) -> Result<T, XdsError> {
    Err(XdsError::Unsupported {
        what: what.to_string(),
        field: field.to_string(),
    })
}

fn read_text(at: &str, m: &StringMatcher) -> Result<TextMatch, XdsError> {
    use string_matcher::MatchPattern as P;
    if m.ignore_case {
        return unsupported(at, "ignore_case");
    }
    match &m.match_pattern {
        Some(P::Exact(s)) => Ok(TextMatch::Exact(s.clone())),
        Some(P::Prefix(s)) => Ok(TextMatch::Prefix(s.clone())),
        Some(P::Suffix(s)) => Ok(TextMatch::Suffix(s.clone())),
        Some(P::Contains(s)) => Ok(TextMatch::Contains(s.clone())),
        Some(P::SafeRegex(_)) => unsupported(at, "safe_regex"),
        _ => unsupported(at, "match_pattern"),
    }
}

// Deprecated variants are still read, to refuse them by name.
#[allow(deprecated)]
fn read_principal(at: &str, p: &PbPrincipal) -> Result<Caller, XdsError> {
    use principal::Identifier as I;
    let all = |set: &principal::Set| {
        set.ids
            .iter()
            .map(|c| read_principal(at, c))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match &p.identifier {
        Some(I::Any(true)) => Caller::Any,
        Some(I::Authenticated(a)) => Caller::Authenticated(
            a.principal_name
                .as_ref()
                .map(|m| read_text(&format!("{at}.principals.authenticated"), m))
                .transpose()?,
        ),
        Some(I::OrIds(set)) => Caller::AnyOf(all(set)?),
        Some(I::AndIds(set)) => Caller::AllOf(all(set)?),
        Some(I::NotId(c)) => Caller::Not(Box::new(read_principal(at, c)?)),
        Some(I::SourceIp(_)) => return unsupported(at, "principals.source_ip"),
        Some(I::DirectRemoteIp(_)) => return unsupported(at, "principals.direct_remote_ip"),
        Some(I::RemoteIp(_)) => return unsupported(at, "principals.remote_ip"),
        Some(I::Header(_)) => return unsupported(at, "principals.header"),
        Some(I::UrlPath(_)) => return unsupported(at, "principals.url_path"),
        Some(I::Metadata(_)) => return unsupported(at, "principals.metadata"),
        Some(I::FilterState(_)) => return unsupported(at, "principals.filter_state"),
        Some(I::Custom(_)) => return unsupported(at, "principals.custom"),
        _ => return unsupported(at, "principals"),
    })
}

fn read_permission(at: &str, p: &PbPermission) -> Result<Permission, XdsError> {
    use permission::Rule as R;
    let all = |set: &permission::Set| {
        set.rules
            .iter()
            .map(|r| read_permission(at, r))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match &p.rule {
        Some(R::Any(true)) => Permission::Any,
        Some(R::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(m)),
        })) => Permission::Path(read_text(&format!("{at}.permissions.url_path"), m)?),
        Some(R::Header(h)) if h.name == ":method" && !h.invert_match => {
            let exact = match &h.header_match_specifier {
                #[allow(deprecated)]
                Some(header_matcher::HeaderMatchSpecifier::ExactMatch(m)) => Some(m.clone()),
                Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)) => {
                    match read_text(&format!("{at}.permissions.header"), m)? {
                        TextMatch::Exact(m) => Some(m),
                        _ => None,
                    }
                }
                _ => None,
            };
            match exact {
                Some(m) => Permission::Method(m),
                None => return unsupported(at, "permissions.header (`:method` only, exact)"),
            }
        }
        Some(R::Header(_)) => return unsupported(at, "permissions.header (`:method` only)"),
        Some(R::OrRules(set)) => Permission::AnyOf(all(set)?),
        Some(R::AndRules(set)) => Permission::AllOf(all(set)?),
        Some(R::NotRule(r)) => Permission::Not(Box::new(read_permission(at, r)?)),
        Some(R::DestinationIp(_)) => return unsupported(at, "permissions.destination_ip"),
        Some(R::DestinationPort(_)) => return unsupported(at, "permissions.destination_port"),
        _ => return unsupported(at, "permissions"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::Principal;

    #[test]
    fn rules_read_back_as_written() {
        let web = Principal::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let ns = Principal::parse("spiffe://cluster.local/ns/ops/*").unwrap();
        let authz = Authorization {
            rules: vec![
                Rule::from_lists(
                    "a-reads".into(),
                    vec![Caller::from(&web)],
                    vec![TextMatch::path("/api/*").unwrap()],
                    vec!["GET".into(), "HEAD".into()],
                ),
                Rule::anything("b-ops", vec![Caller::from(&ns)]),
                Rule {
                    name: "c-not".into(),
                    callers: vec![Caller::Not(Box::new(Caller::Any))],
                    permissions: vec![Permission::Not(Box::new(Permission::Any))],
                },
            ],
        };
        let back = read_rbac("Listener x", &rbac(&authz)).unwrap().unwrap();
        assert_eq!(back, authz);
        assert_eq!(read_rbac("x", &Rbac::default()).unwrap(), None);
    }

    #[test]
    fn what_the_model_cannot_hold_is_refused_by_name() {
        let mut config = rbac(&Authorization::default());
        config.rules.as_mut().unwrap().action = rbac::Action::Deny as i32;
        let e = read_rbac("Listener x", &config).unwrap_err().to_string();
        assert!(e.contains("action"), "{e}");

        let mut config = rbac(&Authorization {
            rules: vec![Rule::anything("r", vec![Caller::Any])],
        });
        let policy = config
            .rules
            .as_mut()
            .unwrap()
            .policies
            .get_mut("r")
            .unwrap();
        policy.principals = vec![PbPrincipal {
            identifier: Some(principal::Identifier::RemoteIp(Default::default())),
        }];
        let e = read_rbac("Listener x", &config).unwrap_err().to_string();
        assert!(e.contains("remote_ip") && e.contains("policies[r]"), "{e}");
    }
}
