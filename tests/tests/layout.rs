//! The shape of the code, checked so that it stays as ARCHITECTURE.md draws it: the proxy's
//! folders, and the control plane's modules, import one another without a cycle; no proxy
//! file grows past 600 lines; and the control plane does not link the proxy (what both need
//! lives in `outrigger-core`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The proxy's units: each folder under `proxy/src`, and each file directly in it.
fn unit_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Which units a file's non-test code names through `crate::`.
fn imports(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

fn graph_of(crate_dir: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join(crate_dir).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let unit = unit_of(&src, &file);
        if unit == "lib" || unit == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let deps = graph.entry(unit.clone()).or_default();
        for dep in imports(&text) {
            if dep != unit {
                deps.insert(dep);
            }
        }
    }
    graph
}

/// A cycle through `graph`, if there is one, as the units along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        unit: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|u| u == unit) {
            let mut cycle = path[at..].to_vec();
            cycle.push(unit.to_string());
            return Some(cycle);
        }
        if done.contains(unit) {
            return None;
        }
        path.push(unit.to_string());
        for next in graph.get(unit).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(unit.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|unit| visit(unit, graph, &mut done, &mut Vec::new()))
}

#[test]
fn the_proxys_folders_import_one_another_without_a_cycle() {
    let graph = graph_of("proxy");
    assert!(
        graph.contains_key("stack") && graph.contains_key("config"),
        "{graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle between folders: {}", cycle.join(" → "));
    }
}

#[test]
fn the_control_planes_modules_import_one_another_without_a_cycle() {
    let graph = graph_of("control-plane");
    assert!(
        graph.contains_key("ads") && graph.contains_key("mesh"),
        "{graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle between modules: {}", cycle.join(" → "));
    }
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&graph), None);
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(
        imports("use crate::{net::detect, stack};\nfn f() { crate::config::x(); }"),
        ["config", "net", "stack"].map(String::from).into()
    );
}

#[test]
fn no_proxy_file_is_over_600_lines() {
    let mut files = Vec::new();
    rust_files(&root().join("proxy/src"), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).unwrap().lines().count();
            (lines > 600).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "{long:?}");
}

#[test]
fn the_control_plane_does_not_link_the_proxy() {
    let manifest = std::fs::read_to_string(root().join("control-plane/Cargo.toml")).unwrap();
    assert!(!manifest.contains("outrigger-proxy"), "{manifest}");
    let mut files = Vec::new();
    rust_files(&root().join("control-plane/src"), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.contains("outrigger_proxy"), "{}", f.display());
    }
}
