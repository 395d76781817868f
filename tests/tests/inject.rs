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
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {outrigger.io/sidecar-mode: sidecar}\nspec:\n  containers: [{name: a, image: a}]\n",
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
