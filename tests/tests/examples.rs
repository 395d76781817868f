//! The Jaeger quick start in `examples/jaeger` cannot run here (no container registry, no
//! cluster), so its files are checked instead: every proxy config and mesh file, including
//! those inside the Kubernetes ConfigMap, passes the same validation the binaries apply, and
//! the compose file and manifests are well-formed YAML of the expected shape.

use std::path::PathBuf;

use outrigger_control_plane::mesh::Mesh;
use outrigger_proxy::config::snapshot::RuntimeConfig;
use serde_json::Value;

fn example(name: &str) -> (String, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/jaeger")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    (path.display().to_string(), text)
}

fn proxy_config_is_valid(source: &str, text: &str) {
    if let Err(e) = RuntimeConfig::build(source, text, 1, None) {
        panic!("{e}");
    }
}

#[test]
fn the_quick_start_configs_are_valid() {
    for name in ["frontend-proxy.yaml", "backend-proxy.yaml"] {
        let (source, text) = example(name);
        proxy_config_is_valid(&source, &text);
    }
    let (source, text) = example("mesh.yaml");
    Mesh::parse(&source, &text).unwrap_or_else(|e| panic!("{e}"));

    let (_, compose) = example("docker-compose.yaml");
    let compose: Value = serde_saphyr::from_str(&compose).unwrap();
    for service in [
        "jaeger",
        "control-plane",
        "backend",
        "backend-sidecar",
        "frontend",
        "frontend-sidecar",
    ] {
        assert!(
            compose["services"][service].is_object(),
            "compose lacks {service}"
        );
    }

    let (source, manifests) = example("kubernetes.yaml");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&manifests).unwrap();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "Deployment").count(),
        4,
        "{kinds:?}"
    );
    let config_map = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let data = config_map["data"].as_object().unwrap();
    Mesh::parse(&source, data["mesh.yaml"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}"));
    for name in ["frontend-proxy.yaml", "backend-proxy.yaml"] {
        proxy_config_is_valid(&format!("{source} ({name})"), data[name].as_str().unwrap());
    }
    // Sidecars are native: init containers that keep running.
    for d in docs.iter().filter(|d| d["kind"] == "Deployment") {
        for init in d["spec"]["template"]["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert_eq!(init["restartPolicy"], "Always");
        }
    }
}
