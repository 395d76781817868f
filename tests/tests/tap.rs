//! `outrigger-control-plane tap` (the real binary) against a proxy's admin port: it shows the
//! requests of a running load, honours its filters, and is refused to whoever the proxy does
//! not let tap.

use std::net::SocketAddr;
use std::time::Duration;

use outrigger_control_plane::ca::{Ca, DEFAULT_LIFETIME};
use outrigger_core::spiffe::SpiffeId;
use outrigger_tests::clients::TestClient;
use outrigger_tests::faults::faulty;
use outrigger_tests::{TestProxy, identity_yaml, metric, workspace_binary, write_identity};
use serde_json::Value;

const WEB: &str = "spiffe://mesh.test/ns/shop/sa/web";
const CRON: &str = "spiffe://mesh.test/ns/jobs/sa/cron";
const API: &str = "spiffe://mesh.test/ns/shop/sa/api";

fn identity(ca: &Ca, id: &str) -> String {
    let (chain, key) = ca
        .issue(&SpiffeId::parse(id).unwrap(), DEFAULT_LIFETIME)
        .unwrap();
    identity_yaml(&write_identity(&chain, &key, ca.bundle_pem()))
}

/// The API's sidecar: strict mTLS in front of `app`; `tap_from` is its admin's allow list.
async fn api_sidecar(ca: &Ca, app: SocketAddr, tap_from: Option<&str>) -> TestProxy {
    let tap_from = tap_from.map_or(String::new(), |t| format!("  tap_from: [\"{t}\"]\n"));
    TestProxy::start(&format!(
        r#"{}admin:
  address: 127.0.0.1:0
{tap_from}listeners:
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
    tls: {{mode: strict}}
    virtual_hosts:
      - name: app
        domains: ['*']
        routes:
          - backends: [{{cluster: app}}]
clusters:
  - name: app
    endpoints: [{{address: "{app}"}}]
"#,
        identity(ca, API)
    ))
    .await
}

/// A caller's sidecar, sending to the API's over mTLS: a client of it, and its admin port.
async fn caller(ca: &Ca, id: &str, api: SocketAddr) -> (TestClient, SocketAddr) {
    let proxy = TestProxy::start(&format!(
        r#"{}admin:
  address: 127.0.0.1:0
listeners:
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    virtual_hosts:
      - name: api
        domains: ['*']
        routes:
          - backends: [{{cluster: api}}]
clusters:
  - name: api
    tls: {{identities: ["{API}"]}}
    endpoints: [{{address: "{api}"}}]
"#,
        identity(ca, id)
    ))
    .await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let admin = proxy.admin();
    // The proxy lives as long as the test's runtime.
    std::mem::forget(proxy);
    (client, admin)
}

/// Sends `paths` in turn, without end, 50 a second.
fn load(client: TestClient, paths: &'static [&'static str]) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for path in paths.iter().cycle() {
            tick.tick().await;
            let _ = client.get("api", path).await;
        }
    });
}

/// Runs `tap` against `admin` with `args`; its exit success, standard output and error.
async fn tap(admin: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(workspace_binary("outrigger-control-plane"));
    cmd.arg("tap")
        .args(["--proxy", &admin.to_string()])
        .args(args);
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .expect("tap ends at its --max")
    .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v.get("dropped").is_none())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tap_shows_live_requests_and_honours_its_filters() {
    let ca = Ca::generate("mesh.test").unwrap();
    let (app, _) = faulty("api").await;
    let api = api_sidecar(&ca, app.addr, None).await;
    let (web, web_admin) = caller(&ca, WEB, api.addr("inbound")).await;
    let (cron, _) = caller(&ca, CRON, api.addr("inbound")).await;
    load(web, &["/api/items", "/status/500"]);
    load(cron, &["/api/cron"]);

    // The web's failures only.
    let (ok, out, err) = tap(
        api.admin(),
        &[
            "--caller", WEB, "--status", "5xx", "--max", "5", "-o", "json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let events = json_lines(&out);
    assert_eq!(events.len(), 5, "{out}");
    for e in &events {
        assert_eq!(e["caller"], WEB, "{e}");
        assert_eq!(e["status"], 500, "{e}");
        assert_eq!(e["path"], "/status/500");
        assert_eq!(e["method"], "GET");
        assert_eq!(e["direction"], "inbound");
        assert!(e["latency_ms"].as_f64().unwrap() > 0.0);
        assert!(e.get("trace_id").is_some(), "{e}");
    }

    // By path and method: both callers' /api requests, and nothing else.
    let (ok, out, err) = tap(
        api.admin(),
        &[
            "--path", "/api", "--method", "get", "--max", "20", "-o", "json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let events = json_lines(&out);
    assert_eq!(events.len(), 20);
    assert!(
        events
            .iter()
            .all(|e| e["path"].as_str().unwrap().starts_with("/api"))
    );
    for id in [WEB, CRON] {
        assert!(events.iter().any(|e| e["caller"] == id), "no {id} in {out}");
    }

    // Two proxies at once, each line naming its own: web's sees its calls leave, api's sees
    // them arrive.
    let both = ["--proxy", &web_admin.to_string()];
    let (ok, out, err) = tap(
        api.admin(),
        &[
            &both[..],
            &["--path", "/status", "--max", "30", "-o", "json"],
        ]
        .concat(),
    )
    .await;
    assert!(ok, "{err}");
    let events = json_lines(&out);
    assert_eq!(events.len(), 30);
    for (proxy, direction) in [(api.admin(), "inbound"), (web_admin, "outbound")] {
        assert!(
            events
                .iter()
                .any(|e| e["proxy"] == proxy.to_string() && e["direction"] == direction),
            "no {direction} event from {proxy} in {out}"
        );
    }

    // For people: one line per request, with the caller's identity.
    let (ok, out, _) = tap(api.admin(), &["--caller", CRON, "--max", "3"]).await;
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines.iter().all(|l| l.contains("GET") && l.contains(CRON)),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_is_refused_to_a_caller_the_proxy_does_not_let_tap() {
    let ca = Ca::generate("mesh.test").unwrap();
    let (app, _) = faulty("api").await;
    // Taps only from 10.0.0.0/8: this loopback client may not.
    let api = api_sidecar(&ca, app.addr, Some("10.0.0.0/8")).await;
    let (ok, out, err) = tap(api.admin(), &["--max", "1"]).await;
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("403") && err.contains("tap_from"), "{err}");

    // By default, only the pod itself may: 127.0.0.2 is another host's address here.
    let default = api_sidecar(&ca, app.addr, None).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stream = socket.connect(default.admin()).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /tap HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    for proxy in [&api, &default] {
        let page = outrigger_tests::clients::get(proxy.admin(), "/metrics")
            .await
            .body;
        assert_eq!(metric(&page, "outrigger_tap_refused_total"), 1);
    }
}
