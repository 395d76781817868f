//! Adding the sidecar to a workload. One function changes one pod template; `inject` (YAML
//! in, YAML out) and the admission webhook (a Pod in, a JSONPatch out) both call it, so the
//! two can never disagree.
//!
//! The document is handled as a generic JSON tree, not as typed objects, so that every field
//! this module does not touch (including ones newer than any typed schema) comes out exactly
//! as it went in.

use serde_json::{Map, Value, json};

pub const ANNOTATION_INJECT: &str = "outrigger.io/inject";
pub const ANNOTATION_INJECTED: &str = "outrigger.io/injected";
pub const ANNOTATION_MODE: &str = "outrigger.io/sidecar-mode";
pub const ANNOTATION_SKIP_INBOUND_PORTS: &str = "outrigger.io/skip-inbound-ports";
pub const ANNOTATION_SKIP_OUTBOUND_PORTS: &str = "outrigger.io/skip-outbound-ports";
pub const ANNOTATION_SKIP_OUTBOUND_CIDRS: &str = "outrigger.io/skip-outbound-cidrs";
pub const ANNOTATION_INBOUND_TLS: &str = "outrigger.io/inbound-tls";
pub const ANNOTATION_SERVICE: &str = "outrigger.io/service";
pub const ANNOTATION_PROXY_CPU: &str = "outrigger.io/proxy-cpu";
pub const ANNOTATION_PROXY_MEMORY: &str = "outrigger.io/proxy-memory";
pub const ANNOTATION_PROXY_CPU_LIMIT: &str = "outrigger.io/proxy-cpu-limit";
pub const ANNOTATION_PROXY_MEMORY_LIMIT: &str = "outrigger.io/proxy-memory-limit";

pub const PROXY_CONTAINER: &str = "outrigger-proxy";
pub const INIT_CONTAINER: &str = "outrigger-init";
const TOKEN_VOLUME: &str = "outrigger-token";
const WORK_VOLUME: &str = "outrigger-work";
const CA_ROOT_VOLUME: &str = "outrigger-ca-root";
/// The CA's root travels in this pod annotation, and the sidecar reads it as a file through
/// the downward API: it reaches the pod through the API server, out of band from the CA it
/// vouches for, in every namespace, with nothing to copy between namespaces.
pub const ANNOTATION_CA_ROOT: &str = "outrigger.io/ca-root";
/// Where the sidecar finds that file (the sidecar's default `--ca-trust-anchor`).
pub const CA_ROOT_DIR: &str = "/var/run/outrigger-ca";
pub const CA_ROOT_FILE: &str = "root-cert.pem";
pub const PROXY_UID: i64 = 1337;
pub const ADMIN_PORT: i64 = 15020;
/// The audience of the projected token; the control plane's TokenReview asks for it.
pub const TOKEN_AUDIENCE: &str = crate::token_review::AUDIENCE;

/// Where the sidecar finds the control plane, and what it runs.
#[derive(Debug, Clone)]
pub struct Injector {
    pub image: String,
    /// `host:port` of the CA: the control plane's TLS port.
    pub ca_address: String,
    /// The CA's roots (PEM), mounted into every pod as the trust anchor the sidecar checks
    /// the CA against. The webhook fills it from its own CA.
    pub ca_root_pem: Option<String>,
    /// Plaintext to the CA and no anchor: local development only, never the default.
    pub ca_plaintext: bool,
    /// `host:port` of xDS over mTLS.
    pub xds_address: String,
    pub control_plane_identity: String,
    pub trust_domain: String,
    /// Native sidecars (an init container with `restartPolicy: Always`, Kubernetes 1.29+)
    /// unless a pod asks for `classic`.
    pub native: bool,
}

impl Injector {
    /// Defaults for the manifests in `deploy/`: the control plane as the `outrigger`
    /// Service in the `outrigger` namespace.
    pub fn for_cluster(image: &str) -> Self {
        Injector {
            image: image.into(),
            ca_address: "outrigger.outrigger.svc:15012".into(),
            ca_root_pem: None,
            ca_plaintext: false,
            xds_address: "outrigger.outrigger.svc:15012".into(),
            control_plane_identity: "spiffe://cluster.local/ns/outrigger/sa/control-plane".into(),
            trust_domain: "cluster.local".into(),
            native: true,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InjectError {
    #[error("document {document}: {message}")]
    Invalid { document: usize, message: String },
    #[error("annotation `{annotation}`: {message}")]
    Annotation { annotation: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    AlreadyInjected,
    OptedOut,
}

/// Where a kind keeps its pod template, as a path of object keys.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

fn annotations(meta: &Value) -> Option<&Map<String, Value>> {
    meta.get("annotations").and_then(Value::as_object)
}

fn annotation<'a>(meta: &'a Value, key: &str) -> Option<&'a str> {
    annotations(meta)?.get(key)?.as_str()
}

fn ports(meta: &Value, key: &str) -> Result<Vec<u16>, InjectError> {
    let Some(text) = annotation(meta, key) else {
        return Ok(Vec::new());
    };
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>().map_err(|_| InjectError::Annotation {
                annotation: key.into(),
                message: format!("`{p}` is not a port number"),
            })
        })
        .collect()
}

fn join(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Every object in a YAML or JSON tree that holds a pod template, `List`s included.
fn for_each_workload(
    obj: &mut Value,
    document: usize,
    f: &mut dyn FnMut(&mut Value) -> Result<(), InjectError>,
) -> Result<(), InjectError> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind == "List" || kind.ends_with("List") {
        if let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                for_each_workload(item, document, f)?;
            }
        }
        return Ok(());
    }
    let Some(path) = template_path(&kind) else {
        return Ok(());
    };
    let mut template = obj;
    for key in path {
        template = template.get_mut(*key).ok_or_else(|| InjectError::Invalid {
            document,
            message: format!("a {kind} without `{}`", path.join(".")),
        })?;
    }
    f(template)
}

impl Injector {
    /// Injects every workload of a multi-document YAML stream; other documents pass
    /// through unchanged.
    pub fn inject_yaml(&self, text: &str) -> Result<String, InjectError> {
        // YAML 1.2 scalars: `N`, `yes` or `0755` stay the strings they look like, and are
        // written back quoted.
        let options = serde_saphyr::options! {
            strict_booleans: true,
            leading_zero_numbers_as_strings: true,
            underscored_numbers_as_strings: true,
        };
        let mut docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options)
            .map_err(|e| InjectError::Invalid {
                document: 0,
                message: e.to_string(),
            })?;
        docs.retain(|d| !d.is_null());
        for (i, doc) in docs.iter_mut().enumerate() {
            self.inject_object(doc, i + 1)?;
        }
        let mut out = String::new();
        for (i, doc) in docs.iter().enumerate() {
            if i > 0 {
                out.push_str("---\n");
            }
            out.push_str(
                &serde_saphyr::to_string(doc).map_err(|e| InjectError::Invalid {
                    document: i + 1,
                    message: e.to_string(),
                })?,
            );
        }
        Ok(out)
    }

    /// Injects every pod template in `obj`.
    pub fn inject_object(&self, obj: &mut Value, document: usize) -> Result<(), InjectError> {
        for_each_workload(obj, document, &mut |template| {
            self.inject_template(template).map(|_| ())
        })
    }

    /// The one change both paths make: a pod template (`metadata` + `spec`) gets the init
    /// container, the sidecar and their volumes.
    pub fn inject_template(&self, template: &mut Value) -> Result<Outcome, InjectError> {
        let obj = template
            .as_object_mut()
            .ok_or_else(|| InjectError::Invalid {
                document: 0,
                message: "a pod template that is not an object".into(),
            })?;
        check_shape(obj)?;
        let meta = obj
            .get("metadata")
            .filter(|m| m.is_object())
            .cloned()
            .unwrap_or_else(|| json!({}));
        if annotation(&meta, ANNOTATION_INJECT) == Some("false") {
            return Ok(Outcome::OptedOut);
        }
        let spec = obj.get("spec").ok_or_else(|| InjectError::Invalid {
            document: 0,
            message: "a pod template without `spec`".into(),
        })?;
        let named = |list: &str| {
            spec.get(list).and_then(Value::as_array).is_some_and(|cs| {
                cs.iter().any(|c| {
                    matches!(
                        c.get("name").and_then(Value::as_str),
                        Some(PROXY_CONTAINER | INIT_CONTAINER)
                    )
                })
            })
        };
        if named("containers") || named("initContainers") {
            return Ok(Outcome::AlreadyInjected);
        }
        let native = match annotation(&meta, ANNOTATION_MODE) {
            None => self.native,
            Some("native") => true,
            Some("classic") => false,
            Some(other) => {
                return Err(InjectError::Annotation {
                    annotation: ANNOTATION_MODE.into(),
                    message: format!("`{other}` is neither `native` nor `classic`"),
                });
            }
        };
        let inbound_tls = match annotation(&meta, ANNOTATION_INBOUND_TLS) {
            None => "permissive",
            Some(mode @ ("strict" | "permissive")) => mode,
            Some(other) => {
                return Err(InjectError::Annotation {
                    annotation: ANNOTATION_INBOUND_TLS.into(),
                    message: format!("`{other}` is neither `strict` nor `permissive`"),
                });
            }
        };
        let skip_inbound = ports(&meta, ANNOTATION_SKIP_INBOUND_PORTS)?;
        let mut app_ports: Vec<u16> = spec
            .get("containers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|c| {
                c.get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
            })
            .filter(|p| p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == "TCP")
            .filter_map(|p| p.get("containerPort")?.as_u64())
            .filter_map(|p| u16::try_from(p).ok())
            .filter(|p| !skip_inbound.contains(p))
            .collect();
        app_ports.sort_unstable();
        app_ports.dedup();

        // Without a root to mount, the sidecar could only trust whoever answers.
        let ca_root = match (&self.ca_root_pem, self.ca_plaintext) {
            (_, true) => None,
            (Some(pem), false) => Some(pem.clone()),
            (None, false) => {
                return Err(InjectError::Invalid {
                    document: 0,
                    message: "no CA root to mount into the pod: pass --ca-root".into(),
                });
            }
        };
        let init = self.init_container(&meta, &app_ports)?;
        let proxy = self.proxy_container(&meta, &app_ports, inbound_tls, native)?;
        let spec = obj
            .get_mut("spec")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| InjectError::Invalid {
                document: 0,
                message: "`spec` is not an object".into(),
            })?;
        let mut inits = vec![init];
        if native {
            inits.push(proxy);
        } else {
            prepend(spec, "containers", vec![proxy]);
        }
        prepend(spec, "initContainers", inits);
        let mut volumes = vec![
            json!({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
                "audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}}),
            json!({"name": WORK_VOLUME, "emptyDir": {"medium": "Memory"}}),
        ];
        if ca_root.is_some() {
            volumes.push(json!({"name": CA_ROOT_VOLUME, "downwardAPI": {"items": [{
                "path": CA_ROOT_FILE,
                "fieldRef": {"fieldPath": format!("metadata.annotations['{ANNOTATION_CA_ROOT}']")},
            }]}}));
        }
        append(spec, "volumes", volumes);

        // `check_shape` saw maps (or nothing) here.
        let annotations = map_entry(map_entry(obj, "metadata"), "annotations");
        annotations.insert(
            ANNOTATION_INJECTED.into(),
            json!(if native { "native" } else { "classic" }),
        );
        if let Some(root) = ca_root {
            annotations.insert(ANNOTATION_CA_ROOT.into(), json!(root));
        }
        Ok(Outcome::Injected)
    }

    fn init_container(&self, meta: &Value, app_ports: &[u16]) -> Result<Value, InjectError> {
        let mut args = vec![
            "init".to_string(),
            "--proxy-uid".into(),
            PROXY_UID.to_string(),
            "--inbound-ports".into(),
        ];
        // No declared ports: nothing inbound is intercepted, rather than guessed at.
        if !app_ports.is_empty() {
            args.push(join(app_ports));
        }
        // The control plane's ports stay out of interception whoever dials them.
        let mut control_plane: Vec<u16> = [&self.ca_address, &self.xds_address]
            .iter()
            .filter_map(|a| a.rsplit_once(':')?.1.parse().ok())
            .collect();
        control_plane.dedup();
        if !control_plane.is_empty() {
            args.extend(["--xds-port".into(), join(&control_plane)]);
        }
        let skip_outbound = ports(meta, ANNOTATION_SKIP_OUTBOUND_PORTS)?;
        if !skip_outbound.is_empty() {
            args.extend(["--exclude-outbound-ports".into(), join(&skip_outbound)]);
        }
        if let Some(cidrs) = annotation(meta, ANNOTATION_SKIP_OUTBOUND_CIDRS) {
            for cidr in cidrs.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                cidr.parse::<outrigger_core::cidr::Cidr>()
                    .map_err(|message| InjectError::Annotation {
                        annotation: ANNOTATION_SKIP_OUTBOUND_CIDRS.into(),
                        message: message.to_string(),
                    })?;
            }
            args.extend(["--exclude-outbound-cidrs".into(), cidrs.replace(' ', "")]);
        }
        Ok(json!({
            "name": INIT_CONTAINER,
            "image": self.image,
            "args": args,
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
            "securityContext": {
                "runAsUser": 0,
                "runAsNonRoot": false,
                "allowPrivilegeEscalation": false,
                // iptables takes its lock in /run/xtables.lock.
                "readOnlyRootFilesystem": false,
                "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            },
        }))
    }

    fn proxy_container(
        &self,
        meta: &Value,
        app_ports: &[u16],
        inbound_tls: &str,
        native: bool,
    ) -> Result<Value, InjectError> {
        let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
        let mut env = vec![
            json!({"name": "POD_NAME"}),
            json!({"name": "POD_NAMESPACE"}),
            json!({"name": "SERVICE_ACCOUNT"}),
        ];
        for (e, path) in env.iter_mut().zip([
            "metadata.name",
            "metadata.namespace",
            "spec.serviceAccountName",
        ]) {
            e.as_object_mut()
                .expect("object")
                .extend(field(path).as_object().expect("object").clone());
        }
        let mut plain = vec![
            ("OUTRIGGER_CA_ADDRESS", self.ca_address.clone()),
            (
                "OUTRIGGER_CA_TRUST_ANCHOR",
                format!("{CA_ROOT_DIR}/{CA_ROOT_FILE}"),
            ),
            ("OUTRIGGER_XDS_ADDRESS", self.xds_address.clone()),
            (
                "OUTRIGGER_CONTROL_PLANE_IDENTITY",
                self.control_plane_identity.clone(),
            ),
            ("OUTRIGGER_TRUST_DOMAIN", self.trust_domain.clone()),
            ("OUTRIGGER_APP_PORTS", join(app_ports)),
            ("OUTRIGGER_INBOUND_TLS", inbound_tls.into()),
        ];
        let labels = meta.get("labels");
        let service = annotation(meta, ANNOTATION_SERVICE)
            .or_else(|| labels?.get("app.kubernetes.io/name")?.as_str())
            .or_else(|| labels?.get("app")?.as_str());
        if let Some(service) = service {
            plain.push(("OUTRIGGER_SERVICE", service.into()));
        }
        if self.ca_plaintext {
            plain.push(("OUTRIGGER_CA_PLAINTEXT", "true".into()));
        }
        env.extend(
            plain
                .into_iter()
                .map(|(name, value)| json!({"name": name, "value": value})),
        );
        let mut requests = json!({"cpu": "50m", "memory": "64Mi"});
        let mut limits = Map::new();
        for (key, resource, target) in [
            (ANNOTATION_PROXY_CPU, "cpu", true),
            (ANNOTATION_PROXY_MEMORY, "memory", true),
            (ANNOTATION_PROXY_CPU_LIMIT, "cpu", false),
            (ANNOTATION_PROXY_MEMORY_LIMIT, "memory", false),
        ] {
            if let Some(v) = annotation(meta, key) {
                if v.is_empty() || v.contains(char::is_whitespace) {
                    return Err(InjectError::Annotation {
                        annotation: key.into(),
                        message: format!("`{v}` is not a quantity"),
                    });
                }
                if target {
                    requests[resource] = json!(v);
                } else {
                    limits.insert(resource.into(), json!(v));
                }
            }
        }
        let mut resources = json!({"requests": requests});
        if !limits.is_empty() {
            resources["limits"] = Value::Object(limits);
        }
        let probe = |path: &str, period: u32, failures: u32| {
            json!({"httpGet": {"path": path, "port": ADMIN_PORT},
                   "periodSeconds": period, "failureThreshold": failures})
        };
        let mut proxy = json!({
            "name": PROXY_CONTAINER,
            "image": self.image,
            "args": ["sidecar", "--log-json"],
            "env": env,
            "ports": [{"name": "outrigger-admin", "containerPort": ADMIN_PORT}],
            "resources": resources,
            // The app starts only once this holds: identity and first config are in.
            "startupProbe": probe("/ready", 1, 120),
            "readinessProbe": probe("/ready", 5, 3),
            "livenessProbe": probe("/live", 10, 3),
            "securityContext": {
                "runAsUser": PROXY_UID,
                "runAsGroup": PROXY_UID,
                "runAsNonRoot": true,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": TOKEN_VOLUME, "mountPath": "/var/run/secrets/outrigger", "readOnly": true},
                {"name": WORK_VOLUME, "mountPath": "/var/run/outrigger"},
            ],
        });
        if !self.ca_plaintext {
            proxy["volumeMounts"]
                .as_array_mut()
                .expect("a list")
                .push(json!({"name": CA_ROOT_VOLUME, "mountPath": CA_ROOT_DIR, "readOnly": true}));
        }
        if native {
            proxy["restartPolicy"] = json!("Always");
        } else {
            // The kubelet starts the next container only when this hook returns: the app
            // waits for the proxy as a native sidecar's startup probe would make it.
            proxy["lifecycle"] = json!({"postStart": {"exec": {"command":
                ["/usr/local/bin/outrigger-proxy", "wait-ready"]}}});
        }
        Ok(proxy)
    }
}

fn invalid(message: &str) -> InjectError {
    InjectError::Invalid {
        document: 0,
        message: message.into(),
    }
}

/// Checks, before anything changes, that every place the injector writes to is a map or a
/// list, or `null` (which the API server takes for empty). Anything else is refused with its
/// path: never a panic, and never half an injection.
fn check_shape(template: &Map<String, Value>) -> Result<(), InjectError> {
    let map_or_null = |v: Option<&Value>, path: &str| match v {
        None | Some(Value::Null | Value::Object(_)) => Ok(()),
        Some(_) => Err(invalid(&format!("`{path}` is not a map"))),
    };
    map_or_null(template.get("metadata"), "metadata")?;
    map_or_null(
        template.get("metadata").and_then(|m| m.get("annotations")),
        "metadata.annotations",
    )?;
    let spec = template
        .get("spec")
        .ok_or_else(|| invalid("a pod template without `spec`"))?
        .as_object()
        .ok_or_else(|| invalid("`spec` is not an object"))?;
    for key in ["containers", "initContainers", "volumes"] {
        if !matches!(spec.get(key), None | Some(Value::Null | Value::Array(_))) {
            return Err(invalid(&format!("`spec.{key}` is not a list")));
        }
    }
    Ok(())
}

/// The map at `key`, made an empty one where it is absent or `null`.
fn map_entry<'a>(parent: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let v = parent.entry(key).or_insert(Value::Null);
    if !v.is_object() {
        *v = json!({});
    }
    v.as_object_mut().expect("made a map above")
}

fn prepend(spec: &mut Map<String, Value>, key: &str, mut items: Vec<Value>) {
    let list = spec.entry(key).or_insert(Value::Null);
    if list.is_null() {
        *list = json!([]);
    }
    if let Some(existing) = list.as_array_mut() {
        items.append(existing);
        *existing = items;
    }
}

fn append(spec: &mut Map<String, Value>, key: &str, items: Vec<Value>) {
    let list = spec.entry(key).or_insert(Value::Null);
    if list.is_null() {
        *list = json!([]);
    }
    if let Some(existing) = list.as_array_mut() {
        existing.extend(items);
    }
}

/// RFC 6902 operations that turn `before` into `after`, as the webhook answers.
pub fn json_patch(before: &Value, after: &Value) -> json_patch::Patch {
    json_patch::diff(before, after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
               "spec": {"containers": [{"name": "web", "image": "web:1",
                        "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]}]}})
    }

    /// Odd shapes where the injector reads or writes: never a panic, and either a clean
    /// injection or an error that leaves the template as it was.
    #[test]
    fn odd_input_is_refused_or_injected_never_a_panic() {
        let paths: [&[&str]; 9] = [
            &["metadata"],
            &["metadata", "annotations"],
            &["metadata", "labels"],
            &["spec"],
            &["spec", "containers"],
            &["spec", "initContainers"],
            &["spec", "volumes"],
            &["spec", "containers", "0"],
            &["spec", "containers", "0", "ports"],
        ];
        let odd = [
            json!(null),
            json!(1),
            json!("x"),
            json!([]),
            json!({}),
            json!([null]),
        ];
        for path in paths {
            for value in &odd {
                let mut p = pod();
                let mut at = &mut p;
                for key in &path[..path.len() - 1] {
                    at = match key.parse::<usize>() {
                        Ok(i) => &mut at[i],
                        Err(_) => &mut at[*key],
                    };
                }
                let last = path[path.len() - 1];
                match last.parse::<usize>() {
                    Ok(i) => at[i] = value.clone(),
                    Err(_) => at[last] = value.clone(),
                }
                let before = p.clone();
                match injector().inject_template(&mut p) {
                    Ok(Outcome::Injected) => {
                        let inits = p["spec"]["initContainers"].as_array();
                        assert!(
                            inits.is_some_and(|i| !i.is_empty()),
                            "{path:?}={value}: {p:#}"
                        );
                    }
                    Ok(_) => {}
                    Err(_) => assert_eq!(p, before, "{path:?}={value}: changed before failing"),
                }
            }
        }
    }

    fn injector() -> Injector {
        let mut injector = Injector::for_cluster("outrigger/proxy:test");
        injector.ca_root_pem =
            Some("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into());
        injector
    }

    #[test]
    fn native_sidecar_is_an_init_container_that_restarts() {
        let mut p = pod();
        assert_eq!(
            injector().inject_template(&mut p).unwrap(),
            Outcome::Injected
        );
        let inits = p["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits[0]["name"], INIT_CONTAINER);
        assert_eq!(inits[1]["name"], PROXY_CONTAINER);
        assert_eq!(inits[1]["restartPolicy"], "Always");
        assert_eq!(p["spec"]["containers"].as_array().unwrap().len(), 1);
        // UDP ports are not intercepted; the control plane's are never.
        assert_eq!(inits[0]["args"][4], "8080");
        assert_eq!(inits[0]["args"][6], "15012");
        // The CA's root reaches the sidecar as a file, from the pod's own annotation.
        let annotations = &p["metadata"]["annotations"];
        assert!(
            annotations[ANNOTATION_CA_ROOT]
                .as_str()
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        let mounts = inits[1]["volumeMounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["mountPath"] == CA_ROOT_DIR));
    }

    #[test]
    fn twice_is_once_and_opt_out_is_respected() {
        let mut once = pod();
        injector().inject_template(&mut once).unwrap();
        let mut twice = once.clone();
        assert_eq!(
            injector().inject_template(&mut twice).unwrap(),
            Outcome::AlreadyInjected
        );
        assert_eq!(once, twice);
        let mut out = pod();
        out["metadata"]["annotations"] = json!({ANNOTATION_INJECT: "false"});
        let before = out.clone();
        assert_eq!(
            injector().inject_template(&mut out).unwrap(),
            Outcome::OptedOut
        );
        assert_eq!(out, before);
    }

    #[test]
    fn a_bad_annotation_is_named() {
        let mut p = pod();
        p["metadata"]["annotations"] = json!({ANNOTATION_SKIP_INBOUND_PORTS: "80,http"});
        let err = injector().inject_template(&mut p).unwrap_err();
        assert!(
            err.to_string().contains(ANNOTATION_SKIP_INBOUND_PORTS),
            "{err}"
        );
    }

    #[test]
    fn the_patch_escapes_keys_and_reaches_the_same_result() {
        let before = json!({"metadata": {"annotations": {"a/b": "1"}}, "x": [1]});
        let after = json!({"metadata": {"annotations": {"a/b": "2", "c": "3"}}, "x": [1, 2]});
        let patch = json_patch(&before, &after);
        let ops = serde_json::to_value(&patch).unwrap();
        assert!(
            ops.as_array()
                .unwrap()
                .iter()
                .any(|op| op["path"] == "/metadata/annotations/a~1b"),
            "{ops}"
        );
        let mut patched = before.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        assert_eq!(patched, after);
    }
}
