//! The real `outrigger-proxy` binary as a process: signals and the admin endpoints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::{
    eventually, free_addr, indent, temp_path, upstreams, wait_in_flight, workspace_binary,
};

fn proxy_binary() -> PathBuf {
    workspace_binary("outrigger-proxy")
}

struct ProxyProcess {
    child: Child,
    outbound: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
    config_path: PathBuf,
}

impl ProxyProcess {
    fn yaml(
        outbound: SocketAddr,
        inbound: SocketAddr,
        admin: SocketAddr,
        upstream: SocketAddr,
        tag: &str,
    ) -> String {
        let vhosts = format!(
            r#"- name: app
  domains: [app.test]
  routes:
    - response_headers:
        set: [{{name: x-tag, value: {tag}}}]
      backends: [{{cluster: app}}]
"#
        );
        format!(
            r#"admin:
  address: {admin}
workers: 1
listeners:
  - name: outbound
    address: {outbound}
    direction: outbound
    virtual_hosts:
{0}  - name: inbound
    address: {inbound}
    direction: inbound
    virtual_hosts:
{0}clusters:
  - name: app
    endpoints: [{{address: "{upstream}"}}]
"#,
            indent(&vhosts, 6)
        )
    }

    async fn start(upstream: SocketAddr, extra_args: &[&str]) -> ProxyProcess {
        let (outbound, inbound, admin) = (free_addr(), free_addr(), free_addr());
        let config_path = temp_path("process.yaml");
        let yaml = Self::yaml(outbound, inbound, admin, upstream, "one");
        std::fs::write(&config_path, yaml).unwrap();
        let child = Command::new(proxy_binary())
            .args(["run", "--config"])
            .arg(&config_path)
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let p = ProxyProcess {
            child,
            outbound,
            inbound,
            admin,
            config_path,
        };
        eventually(
            "the proxy is ready",
            Duration::from_secs(10),
            || async move {
                let client = TestClient::http1(admin);
                let r = client.get("admin", "/ready").await.ok()?;
                (r.status == 200).then_some(())
            },
        )
        .await;
        p
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_inbound_first_and_outbound_once_the_app_is_done() {
    let up = upstreams::http("app").await;
    let mut proxy = ProxyProcess::start(up.addr, &["--drain-timeout", "20s"]).await;
    let h1 = TestClient::http1(proxy.inbound);
    let h2 = TestClient::http2(proxy.inbound).await;
    let slow_h1 = tokio::spawn({
        let h1 = h1.clone();
        async move { h1.get("app.test", "/slow/1500").await }
    });
    let slow_h2 = tokio::spawn({
        let h2 = h2.clone();
        async move { h2.get("app.test", "/slow/1500").await }
    });
    // The app is still running: it holds an outbound connection.
    let app_outbound = TestClient::http2(proxy.outbound).await;
    assert_eq!(app_outbound.get("app.test", "/").await.unwrap().status, 200);
    let admin = proxy.admin;
    wait_in_flight(admin, 2).await;

    proxy.signal("TERM");
    let inbound = proxy.inbound;
    eventually(
        "new inbound connections are refused",
        Duration::from_secs(5),
        || async move {
            tokio::net::TcpStream::connect(inbound)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    // Outbound still takes new connections and requests while the app uses it.
    let late = TestClient::http1(proxy.outbound).get("app.test", "/").await;
    assert_eq!(
        late.unwrap().status,
        200,
        "outbound closed under a running app"
    );
    assert_eq!(app_outbound.get("app.test", "/").await.unwrap().status, 200);

    let (r1, r2) = (
        slow_h1.await.unwrap().unwrap(),
        slow_h2.await.unwrap().unwrap(),
    );
    assert_eq!(
        (r1.status.as_u16(), r1.body.as_str()),
        (200, "app"),
        "HTTP/1.1 request in flight completes"
    );
    assert_eq!(
        (r2.status.as_u16(), r2.body.as_str()),
        (200, "app"),
        "HTTP/2 stream in flight completes"
    );
    // The inbound HTTP/2 connection got GOAWAY: no new stream is accepted on it.
    assert!(h2.get("app.test", "/").await.is_err());

    // The app exits: its connections close, and so the proxy drains outbound and exits.
    drop(app_outbound);
    let status = tokio::task::spawn_blocking(move || proxy.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_when_polling_is_off() {
    let up = upstreams::http("app").await;
    let proxy = ProxyProcess::start(up.addr, &["--watch-interval", "0s"]).await;
    let client = TestClient::http1(proxy.outbound);
    assert_eq!(
        client.get("app.test", "/").await.unwrap().header("x-tag"),
        Some("one")
    );

    std::fs::write(
        &proxy.config_path,
        ProxyProcess::yaml(proxy.outbound, proxy.inbound, proxy.admin, up.addr, "two"),
    )
    .unwrap();
    // Polling is off: nothing changes until the signal.
    assert_eq!(
        client.get("app.test", "/").await.unwrap().header("x-tag"),
        Some("one")
    );
    proxy.signal("HUP");
    eventually(
        "SIGHUP applied the new file",
        Duration::from_secs(5),
        || {
            let client = client.clone();
            async move {
                (client.get("app.test", "/").await.ok()?.header("x-tag")? == "two").then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let up = upstreams::http("app").await;
    let proxy = ProxyProcess::start(up.addr, &[]).await;
    let client = TestClient::http1(proxy.outbound);
    for _ in 0..3 {
        assert_eq!(client.get("app.test", "/").await.unwrap().status, 200);
    }
    assert_eq!(client.get("nowhere.test", "/").await.unwrap().status, 404);

    assert_eq!(get(proxy.admin, "/live").await.status, 200);
    assert_eq!(get(proxy.admin, "/ready").await.status, 200);
    let metrics = get(proxy.admin, "/metrics").await.body;
    for line in [
        "outrigger_requests_total{direction=\"outbound\",route=\"app/0\",status=\"200\",grpc_status=\"\",peer=\"\"} 3",
        "outrigger_requests_total{direction=\"outbound\",route=\"none\",status=\"404\",grpc_status=\"\",peer=\"\"} 1",
        "outrigger_request_duration_seconds_count{direction=\"outbound\",route=\"app/0\"} 3",
        "outrigger_config_reloads_total{result=\"accepted\"} 1",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in:\n{metrics}");
    }
    // The client's keep-alive pool holds one or two connections, depending on timing.
    let open: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outrigger_open_connections{listener=\"outbound\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no open_connections gauge in:\n{metrics}"));
    assert!((1..=2).contains(&open), "open connections: {open}");
    let config = get(proxy.admin, "/config").await.body;
    assert!(
        config.contains("\"version\": 1") && config.contains("\"app.test\""),
        "{config}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_and_reports_traffic() {
    let out = tokio::task::spawn_blocking(|| {
        Command::new(proxy_binary())
            .args(["demo", "--duration", "2s"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let total = stdout
        .lines()
        .find(|l| l.starts_with("total"))
        .unwrap_or_else(|| panic!("no total line:\n{stdout}"));
    // The demo's config sends 90 % to v1 and 10 % to v2, times out /slow and 404s an unknown host.
    for want in ["200:", "404:", "504:", "shop-v1", "shop-v2"] {
        assert!(total.contains(want), "`{want}` missing from: {total}");
    }
    assert!(
        stdout.contains(
            "outrigger_requests_total{direction=\"outbound\",route=\"split\",status=\"200\",grpc_status=\"\",peer=\"\"}"
        ),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_demo_shows_a_live_canary_shift() {
    let bin = workspace_binary("outrigger-demo");
    let mut child = Command::new(bin)
        .args(["--duration", "6s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While it runs, `stat` works against the control plane it names.
    let reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let (mut printed, reader, admin) = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let (mut reader, mut printed) = (reader, String::new());
        loop {
            let mut line = String::new();
            assert!(
                reader.read_line(&mut line).unwrap() > 0,
                "no dashboard line: {printed}"
            );
            printed.push_str(&line);
            if let Some(rest) = line.trim().strip_prefix("dashboard") {
                let url = rest.split_whitespace().next().unwrap();
                let admin = url
                    .trim_start_matches("http://")
                    .trim_end_matches("/dashboard");
                return (printed.clone(), reader, admin.to_string());
            }
        }
    })
    .await
    .unwrap();
    let stat = eventually(
        "stat shows the demo's traffic",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            async move {
                let out = Command::new(workspace_binary("outrigger-control-plane"))
                    .args(["stat", "edges", "--admin", &admin])
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.contains("frontend.default").then_some(text)
            }
        },
    )
    .await;
    assert!(stat.contains("shop.default"), "{stat}");
    let (out, printed) = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut reader = reader;
        reader.read_to_string(&mut printed).unwrap();
        (child.wait_with_output().unwrap(), printed)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = printed;
    // Before the edit the canary gets about 10 %; in the last second, about 50 %.
    let share = |line: &str| -> f64 {
        let v2 = line
            .split("shop-v2 ")
            .nth(1)
            .unwrap_or_else(|| panic!("no shop-v2 share in {line:?}"));
        v2.trim_end_matches([']', '%']).parse().unwrap()
    };
    let seconds: Vec<&str> = stdout.lines().filter(|l| l.starts_with("t=")).collect();
    assert!(seconds.len() >= 5, "{stdout}");
    assert!(share(seconds[1]) < 20.0, "before the edit: {}", seconds[1]);
    assert!(
        share(seconds[seconds.len() - 1]) > 35.0,
        "after the edit: {stdout}"
    );
    assert!(stdout.contains("mesh file edited"), "{stdout}");
    assert!(stdout.contains("(NACKs: 0)"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_lines_carry_the_trace_id() {
    let up = upstreams::http("app").await;
    let (outbound, admin) = (free_addr(), free_addr());
    let config_path = temp_path("access.yaml");
    let yaml = ProxyProcess::yaml(outbound, free_addr(), admin, up.addr, "one");
    std::fs::write(&config_path, format!("access_log: true\n{yaml}")).unwrap();
    let log_path = temp_path("access.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(proxy_binary())
        .args(["run", "--log-json", "--config"])
        .arg(&config_path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    eventually("the proxy serves", Duration::from_secs(10), || async move {
        let r = TestClient::http1(outbound)
            .send(
                http::Method::GET,
                "app.test",
                "/logged",
                &[(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )],
                "",
            )
            .await
            .ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    let line = eventually("an access log line", Duration::from_secs(5), || {
        let log_path = log_path.clone();
        async move {
            std::fs::read_to_string(&log_path)
                .ok()?
                .lines()
                .find(|l| l.contains("\"target\":\"access\"") && l.contains("/logged"))
                .map(str::to_string)
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    let fields = &entry["fields"];
    assert_eq!(
        fields["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{line}"
    );
    assert_eq!(fields["status"], 200, "{line}");
    assert_eq!(fields["method"], "GET", "{line}");
}

/// A classic sidecar's postStart hook: returns once the proxy is ready, fails at its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_returns_when_the_proxy_is_ready_and_fails_when_it_never_is() {
    let up = upstreams::http("app").await;
    let proxy = ProxyProcess::start(up.addr, &[]).await;
    let wait = |admin: SocketAddr| {
        Command::new(proxy_binary())
            .args([
                "wait-ready",
                "--admin",
                &admin.to_string(),
                "--timeout",
                "2s",
            ])
            .output()
            .unwrap()
    };
    let admin = proxy.admin;
    let ready = tokio::task::spawn_blocking(move || wait(admin))
        .await
        .unwrap();
    assert!(ready.status.success(), "{ready:?}");
    // Nothing listens there: the hook gives up and says so.
    let nowhere = free_addr();
    let never = tokio::task::spawn_blocking(move || wait(nowhere))
        .await
        .unwrap();
    assert!(!never.status.success());
    assert!(String::from_utf8_lossy(&never.stderr).contains("not ready"));
}
