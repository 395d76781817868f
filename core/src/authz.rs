//! Who may call a service, on which paths and with which methods.
//!
//! The proxy enforces this model; the control plane builds it from the mesh file and the
//! cluster's policy resources, and it travels between them as Envoy's RBAC filter config
//! (`xds_rbac`). Its shape is RBAC's: an allow list of rules, each a set of callers and a set
//! of permissions, where a request passes if any rule has a caller and a permission that
//! match it. No rule, no entry.

use crate::spiffe::{Principal, SpiffeId};

/// How a text (a path, a caller's ID) is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

impl TextMatch {
    pub fn matches(&self, text: &str) -> bool {
        match self {
            TextMatch::Exact(want) => text == want,
            TextMatch::Prefix(p) => text.starts_with(p.as_str()),
            TextMatch::Suffix(s) => text.ends_with(s.as_str()),
            TextMatch::Contains(c) => text.contains(c.as_str()),
        }
    }

    /// A path as files write it: `/api/*` is every path under `/api/`, anything else exact.
    pub fn path(text: &str) -> Result<TextMatch, String> {
        if !text.starts_with('/') {
            return Err(format!("`{text}` is not a path: it must start with `/`"));
        }
        Ok(match text.strip_suffix('*') {
            Some(prefix) => TextMatch::Prefix(prefix.to_string()),
            None => TextMatch::Exact(text.to_string()),
        })
    }
}

/// A method as files write it: in capitals (`GET`, `POST`, an extension method).
pub fn method(text: &str) -> Result<String, String> {
    if !text.is_empty() && text.len() <= 32 && text.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(text.to_string())
    } else {
        Err(format!("`{text}` is not a method in capitals"))
    }
}

/// Who a rule lets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Anyone, with or without an identity.
    Any,
    /// A caller that proved an identity over mTLS, matching this when given.
    Authenticated(Option<TextMatch>),
    AnyOf(Vec<Caller>),
    AllOf(Vec<Caller>),
    Not(Box<Caller>),
}

impl Caller {
    pub fn matches(&self, peer: Option<&SpiffeId>) -> bool {
        match self {
            Caller::Any => true,
            Caller::Authenticated(want) => {
                peer.is_some_and(|id| want.as_ref().is_none_or(|m| m.matches(&id.to_string())))
            }
            Caller::AnyOf(all) => all.iter().any(|c| c.matches(peer)),
            Caller::AllOf(all) => all.iter().all(|c| c.matches(peer)),
            Caller::Not(c) => !c.matches(peer),
        }
    }
}

impl From<&Principal> for Caller {
    fn from(p: &Principal) -> Caller {
        Caller::Authenticated(Some(match p {
            Principal::Exact(id) => TextMatch::Exact(id.to_string()),
            // A namespace cannot hold a `/`, so the prefix takes exactly that namespace.
            Principal::Namespace {
                trust_domain,
                namespace,
            } => TextMatch::Prefix(format!("spiffe://{trust_domain}/ns/{namespace}/sa/")),
        }))
    }
}

/// What a rule lets a caller do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permission {
    Any,
    /// The request's path, normalised and without its query (see `normalised_path`).
    Path(TextMatch),
    /// The request's method, in capitals.
    Method(String),
    AnyOf(Vec<Permission>),
    AllOf(Vec<Permission>),
    Not(Box<Permission>),
}

/// What is known of a request: an opaque TCP connection has no method or path, so path and
/// method permissions never match it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub peer: Option<&'a SpiffeId>,
    /// The method and the normalised path; `None` for TCP.
    pub http: Option<(&'a str, &'a str)>,
}

impl Permission {
    pub fn matches(&self, request: &Request<'_>) -> bool {
        match self {
            Permission::Any => true,
            Permission::Path(m) => request.http.is_some_and(|(_, path)| m.matches(path)),
            Permission::Method(want) => request.http.is_some_and(|(method, _)| method == want),
            Permission::AnyOf(all) => all.iter().any(|p| p.matches(request)),
            Permission::AllOf(all) => all.iter().all(|p| p.matches(request)),
            Permission::Not(p) => !p.matches(request),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Names the rule in the xDS form and in logs.
    pub name: String,
    /// Any of these callers…
    pub callers: Vec<Caller>,
    /// …doing any of these.
    pub permissions: Vec<Permission>,
}

impl Rule {
    /// `callers` may do anything.
    pub fn anything(name: &str, callers: Vec<Caller>) -> Rule {
        Rule {
            name: name.to_string(),
            callers,
            permissions: vec![Permission::Any],
        }
    }

    /// A rule as files write it: callers (none: anyone), paths (none: any) and methods
    /// (none: any); the request must match one of each.
    pub fn from_lists(
        name: String,
        callers: Vec<Caller>,
        paths: Vec<TextMatch>,
        methods: Vec<String>,
    ) -> Rule {
        let mut all = Vec::new();
        if !paths.is_empty() {
            all.push(Permission::AnyOf(
                paths.into_iter().map(Permission::Path).collect(),
            ));
        }
        if !methods.is_empty() {
            all.push(Permission::AnyOf(
                methods.into_iter().map(Permission::Method).collect(),
            ));
        }
        Rule {
            name,
            callers: if callers.is_empty() {
                vec![Caller::Any]
            } else {
                callers
            },
            permissions: vec![if all.is_empty() {
                Permission::Any
            } else {
                Permission::AllOf(all)
            }],
        }
    }

    fn matches(&self, request: &Request<'_>) -> bool {
        self.callers.iter().any(|c| c.matches(request.peer))
            && self.permissions.iter().any(|p| p.matches(request))
    }
}

/// An allow list: a request no rule matches is refused.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Authorization {
    pub rules: Vec<Rule>,
}

impl Authorization {
    /// The rule that lets `request` in, if any.
    pub fn allowing(&self, request: &Request<'_>) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(request))
    }

    pub fn allows(&self, request: &Request<'_>) -> bool {
        self.allowing(request).is_some()
    }

    /// True when no rule looks at the path or method: the list can judge a TCP connection
    /// the same as a request.
    pub fn needs_http(&self) -> bool {
        fn looks(p: &Permission) -> bool {
            match p {
                Permission::Any => false,
                Permission::Path(_) | Permission::Method(_) => true,
                Permission::AnyOf(all) | Permission::AllOf(all) => all.iter().any(looks),
                Permission::Not(p) => looks(p),
            }
        }
        self.rules.iter().flat_map(|r| &r.permissions).any(looks)
    }
}

/// The path that rules judge: the query cut off, percent-encoded unreserved characters
/// decoded, repeated slashes merged and `.`/`..` segments resolved, as the service behind
/// would read it. So `/public/../admin` and `/%61dmin` are judged as `/admin`, and no
/// spelling of a path escapes a rule about it. `None` when the path hides a separator
/// (`%2F`, `%5C`, a backslash) or is not a path at all: no path rule matches it.
pub fn normalised_path(target: &str) -> Option<String> {
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') || path.contains('\\') {
        return None;
    }
    let mut decoded = Vec::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path.get(i + 1..i + 3)?;
            let byte = u8::from_str_radix(hex, 16).ok()?;
            let unreserved = byte.is_ascii_alphanumeric() || b"-._~".contains(&byte);
            if unreserved {
                decoded.push(byte);
            } else if byte == b'/' || byte == b'\\' {
                return None;
            } else {
                // Kept encoded, in one spelling.
                decoded.push(b'%');
                decoded.extend_from_slice(hex.to_ascii_uppercase().as_bytes());
            }
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(decoded).ok()?;
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/').skip(1) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap()
    }

    fn request<'a>(peer: Option<&'a SpiffeId>, method: &'a str, path: &'a str) -> Request<'a> {
        Request {
            peer,
            http: Some((method, path)),
        }
    }

    #[test]
    fn a_rule_needs_a_caller_and_a_permission() {
        let web = Principal::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let authz = Authorization {
            rules: vec![Rule::from_lists(
                "web-reads".into(),
                vec![Caller::from(&web)],
                vec![TextMatch::path("/api/*").unwrap()],
                vec!["GET".into()],
            )],
        };
        let (w, b) = (id("web"), id("batch"));
        assert!(authz.allows(&request(Some(&w), "GET", "/api/items")));
        assert!(!authz.allows(&request(Some(&w), "POST", "/api/items")));
        assert!(!authz.allows(&request(Some(&w), "GET", "/admin")));
        assert!(!authz.allows(&request(Some(&b), "GET", "/api/items")));
        assert!(!authz.allows(&request(None, "GET", "/api/items")));
        // A TCP connection has no path: the rule cannot match it.
        let tcp = Request {
            peer: Some(&w),
            http: None,
        };
        assert!(!authz.allows(&tcp));
        assert!(authz.needs_http());
        assert!(!Authorization::default().allows(&request(Some(&w), "GET", "/")));
    }

    #[test]
    fn a_namespace_takes_its_own_accounts_only() {
        let ns = Principal::parse("spiffe://cluster.local/ns/shop/*").unwrap();
        let caller = Caller::from(&ns);
        assert!(caller.matches(Some(&id("web"))));
        let other = SpiffeId::parse("spiffe://cluster.local/ns/shopping/sa/web").unwrap();
        assert!(!caller.matches(Some(&other)));
        assert!(!caller.matches(None));
        assert!(Caller::Any.matches(None));
    }

    #[test]
    fn every_spelling_of_a_path_is_judged_as_one() {
        for (given, judged) in [
            ("/admin", Some("/admin")),
            ("/public/../admin", Some("/admin")),
            ("/public/./../admin?x=/public/", Some("/admin")),
            ("//admin", Some("/admin")),
            ("/%61dmin", Some("/admin")),
            ("/a/b/", Some("/a/b/")),
            ("/a/..", Some("/")),
            ("/../../x", Some("/x")),
            ("/", Some("/")),
            ("/name%20with%2fslash", None),
            ("/x%5cy", None),
            ("/x\\y", None),
            ("/bad%zz", None),
            ("/end%2", None),
            ("*", None),
            ("/caf%c3%a9", Some("/caf%C3%A9")),
        ] {
            assert_eq!(normalised_path(given).as_deref(), judged, "{given}");
        }
    }
}
