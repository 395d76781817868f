//! The dashboard in a real browser: Debian's Chromium, headless, loads the control plane's
//! page against a running mesh with traffic. The graph must have the mesh's services and
//! edges with the numbers `stat` gives, the page must load nothing from anywhere else, and a
//! screenshot is saved under target/ (the README's is one of these).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outrigger_tests::mesh_traffic::four_edges;
use outrigger_tests::{eventually, temp_path, workspace_binary};
use serde_json::Value;

fn chromium() -> &'static str {
    "chromium"
}

/// Runs headless Chromium on `url` with `args`, in a fresh profile, with its background
/// services off (they would talk to the network for themselves, not for the page).
async fn browse(url: &str, args: &[String]) -> String {
    let profile = temp_path("chromium-profile");
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--metrics-recording-only",
        // Lets the page's fetches and first draw run before the DOM is read.
        "--virtual-time-budget=8000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .expect("chromium finishes")
    .unwrap()
    .expect("chromium runs (scripts/test installs Debian's chromium)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stat(admin: SocketAddr) -> Vec<Value> {
    let out = Command::new(workspace_binary("outrigger-control-plane"))
        .args(["stat", "edges", "--window", "1m", "-o", "json"])
        .args(["--admin", &admin.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value of `attr` in the element `tag` that carries every attribute in `with`.
fn attribute(dom: &str, tag: &str, with: &[(&str, &str)], attr: &str) -> Option<String> {
    dom.split(&format!("<{tag} "))
        .skip(1)
        .map(|rest| &rest[..rest.find('>').unwrap_or(rest.len())])
        .find(|head| {
            with.iter()
                .all(|(k, v)| head.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|head| {
            let at = head.find(&format!("{attr}=\""))? + attr.len() + 2;
            Some(head[at..at + head[at..].find('"')?].to_string())
        })
}

/// Every URL the page asked for, from the browser's network log: the requests made in the
/// page's network partition (its site), which a script, style, image or font it pulled from
/// anywhere would share. The browser's own background traffic has a partition of its own.
fn page_requests(net_log: &Path, site: &str) -> Vec<String> {
    let log: Value = serde_json::from_str(&std::fs::read_to_string(net_log).unwrap()).unwrap();
    let start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"].clone();
    log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == start_job)
        .filter(|e| {
            e["params"]["network_isolation_key"]
                .as_str()
                .is_some_and(|k| k.starts_with(site))
        })
        .filter_map(|e| e["params"]["url"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_draws_the_mesh_in_a_real_browser() {
    let (cp, _traffic) = four_edges().await;
    // Traffic on every edge for a few seconds, as the page will see it.
    eventually(
        "four edges in the graph",
        Duration::from_secs(30),
        || async {
            let edges = stat(cp.admin_addr);
            (edges.len() == 4 && edges.iter().all(|e| e["seconds"].as_f64() >= Some(4.0)))
                .then_some(())
        },
    )
    .await;

    let origin = format!("http://{}", cp.admin_addr);
    let url = format!("{origin}/dashboard");
    let net_log = temp_path("net-log.json");
    let before = stat(cp.admin_addr);
    let dom = browse(
        &url,
        &[
            "--dump-dom".to_string(),
            format!("--log-net-log={}", net_log.display()),
        ],
    )
    .await;
    let after = stat(cp.admin_addr);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page did not load its data:\n{dom}"
    );

    // The graph: each service a node, each edge an arrow with its figures.
    for service in ["web.default", "api.default", "db.default", "audit.default"] {
        assert!(
            attribute(&dom, "g", &[("data-service", service)], "class").is_some(),
            "no node for {service}"
        );
    }
    for e in &before {
        let (caller, callee) = (e["caller"].as_str().unwrap(), e["callee"].as_str().unwrap());
        let on_page = |attr: &str| -> f64 {
            attribute(
                &dom,
                "g",
                &[("data-caller", caller), ("data-callee", callee)],
                attr,
            )
            .unwrap_or_else(|| panic!("no edge {caller} -> {callee} on the page"))
            .parse()
            .unwrap()
        };
        let other = after
            .iter()
            .find(|a| a["caller"] == caller && a["callee"] == callee)
            .unwrap();
        // The page read the graph between the two `stat` runs.
        let near = |page: f64, key: &str, tolerance: f64| {
            let (a, b) = (e[key].as_f64().unwrap(), other[key].as_f64().unwrap());
            let (low, high) = (a.min(b) - tolerance, a.max(b) + tolerance);
            assert!(
                (low..=high).contains(&page),
                "{caller} -> {callee}: {key} {page} on the page, {a}..{b} from stat"
            );
        };
        let rps = e["rps"].as_f64().unwrap();
        near(on_page("data-rps"), "rps", rps * 0.05);
        near(on_page("data-success"), "success_rate", 0.01);
    }
    let failing = attribute(
        &dom,
        "g",
        &[
            ("data-caller", "api.default"),
            ("data-callee", "audit.default"),
        ],
        "class",
    )
    .unwrap();
    assert_eq!(failing, "edge bad", "90 % success is drawn as failing");
    // Usable from the keyboard: each edge is a tab stop that names its figures.
    for e in &before {
        let with = [
            ("data-caller", e["caller"].as_str().unwrap()),
            ("data-callee", e["callee"].as_str().unwrap()),
        ];
        assert_eq!(
            attribute(&dom, "g", &with, "tabindex").as_deref(),
            Some("0")
        );
        let label = attribute(&dom, "g", &with, "aria-label").unwrap();
        assert!(
            label.contains("rps") && label.contains("success"),
            "{label}"
        );
    }
    // The other sections: services, proxies (three sidecars, synced), certificates.
    assert!(
        attribute(
            &dom,
            "tr",
            &[("data-service", "audit.default")],
            "data-service"
        )
        .is_some()
    );
    for node in ["web-1", "api-1", "db-1"] {
        assert!(
            attribute(&dom, "tr", &[("data-node", node)], "data-node").is_some(),
            "{node}"
        );
    }
    assert!(dom.contains("SYNCED"), "proxies are shown synced");
    assert!(
        attribute(
            &dom,
            "tr",
            &[("data-certificate", "CA root")],
            "data-certificate"
        )
        .is_some()
    );

    // Nothing loaded from anywhere but the control plane's own port.
    let urls = page_requests(&net_log, "http://127.0.0.1");
    for path in ["/dashboard", "/graph?window=1m", "/status", "/check"] {
        assert!(
            urls.iter().any(|u| u.ends_with(path)),
            "{path} not in {urls:?}"
        );
    }
    let foreign: Vec<&String> = urls.iter().filter(|u| !u.starts_with(&origin)).collect();
    assert!(foreign.is_empty(), "the page loaded {foreign:?}");

    // A screenshot, for people (the README shows one).
    let shot = screenshot_path();
    browse(
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1400,1500".to_string(),
            "--hide-scrollbars".to_string(),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
}

fn screenshot_path() -> PathBuf {
    // target/<profile>/deps/<test> → target/dashboard.png
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().to_path_buf();
    target.join("dashboard.png")
}
