//! `inject` over real-world manifests of every kind it supports, through the real binary:
//! the output matches the reviewed golden file, injecting again changes nothing, every
//! object still parses as its typed Kubernetes API object, and once the sidecar's own parts
//! are taken out, what remains is exactly the input.
//!
//! `OUTRIGGER_UPDATE_GOLDEN=1` rewrites the golden files; review the diff before committing.

use std::path::{Path, PathBuf};
use std::process::Command;

use outrigger_tests::kube::{assert_typed, remove_injected, yaml_documents};
use outrigger_tests::workspace_binary;

fn cases() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("inject")
}

fn inject(path: &Path, extra: &[&str]) -> String {
    let out = Command::new(workspace_binary("outrigger-control-plane"))
        .arg("inject")
        .arg("-f")
        .arg(path)
        // The mesh's root, mounted into every pod as the sidecar's CA trust anchor.
        .arg("--ca-root")
        .arg(cases().join("root").with_extension("pem"))
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "inject {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_kind_is_injected_as_the_golden_file_says() {
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(cases())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.ends_with(".yaml") && !name.ends_with(".injected.yaml")
        })
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 8, "{inputs:?}");
    let update = std::env::var_os("OUTRIGGER_UPDATE_GOLDEN").is_some();
    for input in inputs {
        let output = inject(&input, &[]);
        let golden = input.with_extension("injected.yaml");
        if update {
            std::fs::write(&golden, &output).unwrap();
        }
        let expected = std::fs::read_to_string(&golden)
            .unwrap_or_else(|_| panic!("{} is missing", golden.display()));
        assert_eq!(
            output,
            expected,
            "{} differs from its golden file",
            input.display()
        );

        // Twice is once.
        let again = inject(&golden, &[]);
        assert_eq!(
            again,
            output,
            "{}: a second inject changed it",
            input.display()
        );

        let before = yaml_documents(&std::fs::read_to_string(&input).unwrap());
        let after = yaml_documents(&output);
        assert_eq!(before.len(), after.len(), "{}", input.display());
        for (b, a) in before.iter().zip(&after) {
            assert_typed(a);
            assert_eq!(
                &remove_injected(a),
                b,
                "{}: an unrelated field changed",
                input.display()
            );
        }
    }
}

#[test]
fn classic_mode_puts_the_proxy_among_the_containers() {
    let output = inject(&cases().join("job.yaml"), &["--classic"]);
    let job = &yaml_documents(&output)[0];
    let spec = &job["spec"]["template"]["spec"];
    assert_eq!(spec["containers"][0]["name"], "outrigger-proxy");
    assert_eq!(spec["initContainers"][0]["name"], "outrigger-init");
    assert!(spec["containers"][0].get("restartPolicy").is_none());
    // The app starts only once the proxy's postStart hook sees it ready.
    let hook = &spec["containers"][0]["lifecycle"]["postStart"]["exec"]["command"];
    assert_eq!(hook[1], "wait-ready");
    assert_typed(job);
}

#[test]
fn a_bad_annotation_fails_with_its_name() {
    let path = outrigger_tests::temp_path("bad.yaml");
    std::fs::write(
        &path,
        r#"apiVersion: v1
kind: Pod
metadata:
  name: p
  annotations: {outrigger.io/sidecar-mode: sidecar}
spec:
  containers: [{name: a, image: a}]
"#,
    )
    .unwrap();
    let out = Command::new(workspace_binary("outrigger-control-plane"))
        .args(["inject", "-f"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outrigger.io/sidecar-mode"), "{err}");
}

/// The contract between the injector and the sidecar: the environment and arguments the
/// injected container gets are ones `outrigger-proxy sidecar` starts from, even for a pod that
/// declares no ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injected_sidecar_starts_from_the_environment_it_is_given() {
    let output = inject(&cases().join("job.yaml"), &[]);
    let job = &yaml_documents(&output)[0];
    let proxy = job["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "outrigger-proxy")
        .unwrap()
        .clone();
    let admin = outrigger_tests::free_addr();
    let work_dir = outrigger_tests::temp_path("sidecar");
    let mut cmd = Command::new(workspace_binary("outrigger-proxy"));
    for arg in proxy["args"].as_array().unwrap() {
        cmd.arg(arg.as_str().unwrap());
    }
    // What the kubelet would fill in from the downward API, and the control plane here.
    let downward = [
        ("metadata.name", "reindex-x7k2p"),
        ("metadata.namespace", "search"),
        ("spec.serviceAccountName", "default"),
    ];
    for var in proxy["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        let value = match var["value"].as_str() {
            Some(_) if name.ends_with("_ADDRESS") => "127.0.0.1:1".to_string(),
            Some(v) => v.to_string(),
            None => {
                let path = var["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap();
                downward
                    .iter()
                    .find(|(p, _)| *p == path)
                    .unwrap()
                    .1
                    .to_string()
            }
        };
        cmd.env(name, value);
    }
    let mut child = cmd
        .args(["--admin-port", &admin.port().to_string(), "--work-dir"])
        .arg(&work_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let local_admin: std::net::SocketAddr = format!("127.0.0.1:{}", admin.port()).parse().unwrap();
    let live = outrigger_tests::eventually(
        "the sidecar is live",
        std::time::Duration::from_secs(10),
        || async move {
            let r = outrigger_tests::clients::TestClient::http1(local_admin)
                .get("admin", "/live")
                .await
                .ok()?;
            Some(r.status.as_u16())
        },
    )
    .await;
    // Live, but not ready: there is no control plane to give it a certificate and config.
    let ready = outrigger_tests::clients::get(local_admin, "/ready")
        .await
        .status
        .as_u16();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((live, ready), (200, 503));
    let config = std::fs::read_to_string(work_dir.join("proxy.yaml")).unwrap();
    assert!(
        config.contains("spiffe://cluster.local/ns/search/sa/default"),
        "{config}"
    );
}
