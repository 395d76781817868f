//! The images and manifests, checked as far as a machine with no container runtime and no
//! cluster can: every manifest parses as its typed Kubernetes object, they agree with each
//! other and with the binaries' flags, and the Dockerfiles are multi-stage builds of the
//! real binaries that run as non-root users.

use std::path::{Path, PathBuf};
use std::process::Command;

use outrigger_control_plane::mesh::Mesh;
use outrigger_tests::kube::{assert_typed, yaml_documents};
use outrigger_tests::workspace_binary;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn documents(path: &Path) -> Vec<Value> {
    yaml_documents(&std::fs::read_to_string(path).unwrap())
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn every_manifest_is_a_valid_typed_object() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.push(repo().join("examples/jaeger/kubernetes.yaml"));
    for file in files {
        let docs = documents(&file);
        assert!(!docs.is_empty(), "{}", file.display());
        for doc in &docs {
            assert_typed(doc);
        }
    }
}

#[test]
fn the_control_plane_manifest_hangs_together() {
    let docs = documents(&repo().join("deploy/kubernetes/outrigger.yaml"));
    // The mesh in the ConfigMap is one the control plane accepts.
    let mesh = find(&docs, "ConfigMap")["data"]["mesh.yaml"]
        .as_str()
        .unwrap();
    Mesh::parse("outrigger-mesh", mesh).unwrap();

    // Every flag the Deployment passes is one `serve` has.
    let container = &find(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "serve");
    let help = Command::new(workspace_binary("outrigger-control-plane"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap();
        // A flag with a value is followed by it, a switch by the end of its line.
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "`serve` has no {flag}"
        );
    }

    // The webhook configuration reaches the webhook: Service port → container port → flag,
    // and the path and host name the server answers.
    let webhooks = find(&docs, "MutatingWebhookConfiguration")["webhooks"]
        .as_array()
        .unwrap();
    // One opts in by namespace label, one by pod label; both reach the same server.
    assert_eq!(webhooks.len(), 2);
    assert_eq!(
        webhooks[0]["clientConfig"]["service"],
        webhooks[1]["clientConfig"]["service"]
    );
    assert!(webhooks[1]["objectSelector"]["matchLabels"]["outrigger.io/inject"] == "enabled");
    let service_ref = &webhooks[0]["clientConfig"]["service"];
    assert_eq!(service_ref["path"], "/inject");
    let service = find(&docs, "Service");
    assert_eq!(service_ref["name"], service["metadata"]["name"]);
    assert_eq!(service_ref["namespace"], service["metadata"]["namespace"]);
    let port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == service_ref["port"])
        .expect("the webhook's Service port");
    let target = port["targetPort"].as_u64().unwrap();
    assert!(args.contains(&format!("--webhook=0.0.0.0:{target}").as_str()));
    let host = format!(
        "{}.{}.svc",
        service["metadata"]["name"].as_str().unwrap(),
        service["metadata"]["namespace"].as_str().unwrap()
    );
    assert!(args.contains(&format!("--webhook-dns={host}").as_str()));
    // What the injector tells sidecars matches the Service.
    let injector = outrigger_control_plane::inject::Injector::for_cluster("x");
    assert_eq!(injector.ca_address, format!("{host}:15012"));
    assert_eq!(injector.xds_address, format!("{host}:15012"));
    assert!(injector.control_plane_identity.ends_with(&format!(
        "/ns/{}/sa/control-plane",
        service["metadata"]["namespace"].as_str().unwrap()
    )));
    let sa = &find(&docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"];
    assert_eq!(sa, "control-plane");
}

/// The instructions of a Dockerfile, with continuation lines joined.
fn instructions(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        current.push_str(line.trim_end_matches('\\'));
        current.push(' ');
        if !line.ends_with('\\') {
            let (op, rest) = current.trim().split_once(' ').unwrap();
            out.push((op.to_string(), rest.to_string()));
            current.clear();
        }
    }
    out
}

#[test]
fn the_dockerfiles_build_the_real_binaries_and_run_as_non_root() {
    const KNOWN: &[&str] = &[
        "FROM",
        "WORKDIR",
        "COPY",
        "RUN",
        "USER",
        "ENTRYPOINT",
        "CMD",
        "ENV",
        "ARG",
        "LABEL",
        "EXPOSE",
    ];
    for (file, binary) in [
        ("deploy/proxy.Dockerfile", "outrigger-proxy"),
        ("deploy/control-plane.Dockerfile", "outrigger-control-plane"),
    ] {
        let steps = instructions(&repo().join(file));
        for (op, _) in &steps {
            assert!(
                KNOWN.contains(&op.as_str()),
                "{file}: unknown instruction {op}"
            );
        }
        let froms: Vec<&String> = steps
            .iter()
            .filter(|(op, _)| op == "FROM")
            .map(|(_, a)| a)
            .collect();
        assert_eq!(froms.len(), 2, "{file}: a build stage and a runtime stage");
        assert!(froms[0].ends_with(" AS build"), "{file}");
        // The build stage's Rust is new enough for the workspace (edition 2024).
        assert!(froms[0].starts_with("rust:1.9"), "{file}: {}", froms[0]);
        let build = steps
            .iter()
            .find(|(op, a)| op == "RUN" && a.contains("cargo build"))
            .unwrap();
        assert!(build.1.contains(&format!("-p {binary}")), "{file}");
        assert!(
            build.1.contains("--release") && build.1.contains("--locked"),
            "{file}"
        );
        let copy = steps
            .iter()
            .find(|(op, a)| op == "COPY" && a.starts_with("--from=build"))
            .unwrap();
        assert!(
            copy.1.contains(&format!("/src/target/release/{binary} ")),
            "{file}"
        );
        // The runtime stage runs as a numeric, non-root user (Kubernetes' runAsNonRoot
        // can only check a number).
        let last_from = steps.iter().rposition(|(op, _)| op == "FROM").unwrap();
        let user = steps[last_from..]
            .iter()
            .rfind(|(op, _)| op == "USER")
            .map(|(_, u)| u.trim().parse::<u32>().unwrap())
            .unwrap_or(0);
        assert!(user > 0, "{file}: the image runs as root");
        let entry = &steps.iter().rfind(|(op, _)| op == "ENTRYPOINT").unwrap().1;
        let entry: Vec<String> = serde_json::from_str(entry).unwrap();
        assert_eq!(entry, [format!("/usr/local/bin/{binary}")], "{file}");
    }
    // The proxy image is also the init container's: it needs iptables.
    let proxy = std::fs::read_to_string(repo().join("deploy/proxy.Dockerfile")).unwrap();
    assert!(proxy.contains("install -y --no-install-recommends iptables"));
    // The proxy in the image is the profile-guided build the benches measure: the profile
    // scripts/pgo writes is made before the build that reads it.
    let steps = instructions(&repo().join("deploy/proxy.Dockerfile"));
    let run = |needle: &str| {
        steps
            .iter()
            .position(|(op, a)| op == "RUN" && a.contains(needle))
            .unwrap_or_else(|| panic!("proxy.Dockerfile: no RUN with {needle}"))
    };
    let profile = run("scripts/pgo --profile-only");
    let build = run("-Cprofile-use=/src/target/pgo/proxy.profdata");
    assert!(profile < build && steps[build].1.contains("cargo build"));
    let pgo = std::fs::read_to_string(repo().join("scripts/pgo")).unwrap();
    assert!(pgo.contains(r#"out="$PWD/target/pgo""#) && pgo.contains(r#""$out/proxy.profdata""#));
    // Builds do not send the host's target directory or venv to the daemon.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "target"));
}

/// The example policies next to their CRDs are ones the control plane accepts, and every
/// policy kind the control plane reads has its CRD there with a status subresource (its
/// status is written).
#[test]
fn the_example_policies_are_accepted() {
    use outrigger_control_plane::{inbound_policy, mesh::Mesh, resilience_policy};
    use std::sync::Arc;
    let docs = documents(&repo().join("deploy/kubernetes/policies.yaml"));
    for kind in ["ResiliencePolicy", "AuthorizationPolicy", "MTLSPolicy"] {
        let crd = docs
            .iter()
            .find(|d| d["kind"] == "CustomResourceDefinition" && d["spec"]["names"]["kind"] == kind)
            .unwrap_or_else(|| panic!("no CRD for {kind}"));
        assert!(
            crd["spec"]["versions"][0]["subresources"]["status"].is_object(),
            "{kind}"
        );
    }
    let mut services: Vec<_> = Mesh::parse("t", "services: [{name: catalog, namespace: shop}]")
        .unwrap()
        .services
        .into_values()
        .collect();
    let of =
        |kind: &str| -> Vec<Value> { docs.iter().filter(|d| d["kind"] == kind).cloned().collect() };
    fn typed<T: serde::de::DeserializeOwned>(docs: Vec<Value>) -> Vec<Arc<T>> {
        docs.into_iter()
            .map(|d| Arc::new(serde_json::from_value(d).unwrap()))
            .collect()
    }
    let outcomes = [
        resilience_policy::apply(&mut services, &typed(of("ResiliencePolicy"))),
        inbound_policy::apply_authorization(
            &mut services,
            &typed(of("AuthorizationPolicy")),
            "cluster.local",
        ),
        inbound_policy::apply_mtls(&mut services, &typed(of("MTLSPolicy"))),
    ];
    for o in outcomes {
        assert!(!o.is_empty());
        assert!(o.values().all(Result::is_ok), "{o:?}");
    }
    assert!(services[0].authorization.is_some());
}
