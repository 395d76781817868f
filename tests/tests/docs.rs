//! Every YAML example in the documentation is checked with the binaries' own validation, so
//! the docs cannot drift from what the binaries accept. A block says what it is after the
//! language: ```` ```yaml proxy ```` (a proxy config, as `outrigger-proxy check` reads it) or
//! ```` ```yaml mesh ```` (a mesh file, as `outrigger-control-plane check` reads it) or
//! ```` ```yaml kube ```` (Kubernetes objects, each parsed as its typed object with no field
//! lost). A YAML block that says none of these fails the test.

use std::path::{Path, PathBuf};

use outrigger_control_plane::mesh::Mesh;
use outrigger_proxy::config::snapshot::RuntimeConfig;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every fenced YAML block of a Markdown file: its kind, the line it starts on, and its text.
fn yaml_blocks(path: &Path) -> Vec<(String, usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut blocks = Vec::new();
    let mut open: Option<(String, usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        match &mut open {
            Some(_) if line.trim_start().starts_with("```") => blocks.push(open.take().unwrap()),
            Some((_, _, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {
                if let Some(info) = line.trim_start().strip_prefix("```yaml") {
                    open = Some((info.trim().to_string(), n + 1, String::new()));
                }
            }
        }
    }
    blocks
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .chain(["README.md", "ARCHITECTURE.md", "SECURITY.md"].map(|f| root().join(f)))
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn every_yaml_example_in_the_docs_is_valid() {
    let mut checked = 0;
    for file in markdown_files() {
        for (kind, line, body) in yaml_blocks(&file) {
            let source = format!("{}:{line}", file.display());
            let result = match kind.as_str() {
                "proxy" => RuntimeConfig::build(&source, &body, 1, None).map(|_| ()),
                "mesh" => Mesh::parse(&source, &body).map(|_| ()),
                "kube" => {
                    let docs = outrigger_tests::kube::yaml_documents(&body);
                    assert!(!docs.is_empty(), "{source}: no object");
                    docs.iter().for_each(outrigger_tests::kube::assert_typed);
                    Ok(())
                }
                other => panic!(
                    "{source}: a YAML block must say `proxy`, `mesh` or `kube`, not `{other}`"
                ),
            };
            if let Err(e) = result {
                panic!("{e}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} examples found");
}

#[test]
fn a_broken_example_would_be_caught() {
    let dir = std::env::temp_dir().join(format!("outrigger-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("page.md");
    std::fs::write(
        &page,
        r#"text
```yaml mesh
services:
  - nme: typo
```
"#,
    )
    .unwrap();
    let blocks = yaml_blocks(&page);
    assert_eq!(blocks.len(), 1);
    let (kind, line, body) = &blocks[0];
    assert_eq!((kind.as_str(), *line), ("mesh", 2));
    assert!(Mesh::parse("page.md", body).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
