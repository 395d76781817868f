//! Config hot swap: no request lost, new routes take effect, bad files never serve.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::upstreams;
use outrigger_tests::{TestProxy, cluster, config, eventually, wait_in_flight};

/// Routes `app.test` to cluster `to`, tagging responses with the config generation.
fn generation(
    generation: usize,
    to: &str,
    v1: std::net::SocketAddr,
    v2: std::net::SocketAddr,
) -> String {
    let vhosts = format!(
        r#"- name: app
  domains: [app.test]
  routes:
    - name: main
      response_headers:
        set: [{{name: x-generation, value: "{generation}"}}]
      backends: [{{cluster: {to}}}]
"#
    );
    config(
        &vhosts,
        &[cluster("v1", "http1", &[v1]), cluster("v2", "http2", &[v2])].concat(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_swaps_under_load_lose_nothing() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let proxy = TestProxy::start(&generation(0, "v1", v1.addr, v2.addr)).await;
    let addr = proxy.addr("outbound");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut loads = Vec::new();
    for i in 0..4 {
        let client = if i % 2 == 0 {
            TestClient::http1(addr)
        } else {
            TestClient::http2(addr).await
        };
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        loads.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get("app.test", "/").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed request: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }

    for g in 1..=100 {
        let to = if g % 2 == 0 { "v1" } else { "v2" };
        let before = ok.load(Ordering::Relaxed);
        proxy.write_config(&generation(g, to, v1.addr, v2.addr));
        proxy.handle.reload().expect("valid config");
        // Traffic keeps flowing between swaps, so every swap happens under load.
        eventually("requests between swaps", Duration::from_secs(10), || {
            let ok = ok.clone();
            async move { (ok.load(Ordering::Relaxed) >= before + 5).then_some(()) }
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during swaps"
    );
    assert!(ok.load(Ordering::Relaxed) >= 500);
    // The file watcher may also have picked up some of the writes, so at least 100 swaps.
    assert!(proxy.handle.config().version >= 101);

    // The last config (generation 100 → v1) is the one serving.
    let r = TestClient::http1(addr).get("app.test", "/").await.unwrap();
    assert_eq!(
        (r.header("x-generation"), r.header("x-upstream")),
        (Some("100"), Some("v1"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_flight_finishes_on_its_snapshot() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let proxy = TestProxy::start(&generation(1, "v1", v1.addr, v2.addr)).await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.get("app.test", "/slow/800").await.unwrap() }
    });
    let admin = proxy.admin();
    wait_in_flight(admin, 1).await;
    proxy.write_config(&generation(2, "v2", v1.addr, v2.addr));
    proxy.handle.reload().unwrap();
    let fresh = client.get("app.test", "/").await.unwrap();
    assert_eq!(
        (fresh.header("x-generation"), fresh.header("x-upstream")),
        (Some("2"), Some("v2"))
    );
    let old = slow.await.unwrap();
    assert_eq!(
        (old.header("x-generation"), old.header("x-upstream")),
        (Some("1"), Some("v1"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_is_rejected_with_its_line_and_old_keeps_serving() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let good = generation(1, "v1", v1.addr, v2.addr);
    let proxy = TestProxy::start(&good).await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let admin = proxy.admin();

    // A semantic error: a timeout that is not a duration, on a known line.
    let bad = good.replace(
        "- name: main\n",
        &format!(
            r#"- name: main
{}timeout: soon
"#,
            " ".repeat(12)
        ),
    );
    let line = bad
        .lines()
        .position(|l| l.contains("timeout: soon"))
        .unwrap()
        + 1;
    proxy.write_config(&bad);
    let err = proxy.handle.reload().unwrap_err();
    assert_eq!(err.line, Some(line as u64), "{err}");
    assert!(err.field.ends_with("routes[0].timeout"), "{err}");
    assert!(
        err.to_string()
            .contains(&proxy.config_path.display().to_string()),
        "{err} names the file"
    );

    // A typo in a key: the parser's error, also with its line.
    let typo = good.replace(
        "- name: main\n",
        &format!(
            r#"- name: main
{}timeuot: 1s
"#,
            " ".repeat(12)
        ),
    );
    let typo_line = typo.lines().position(|l| l.contains("timeuot")).unwrap() + 1;
    proxy.write_config(&typo);
    let err = proxy.handle.reload().unwrap_err();
    assert_eq!(err.line, Some(typo_line as u64), "{err}");
    assert!(err.message.contains("timeuot"), "{err}");

    // The file watcher sees the same and keeps serving the old config.
    let dangling = good.replace("backends: [{cluster: v1}]", "backends: [{cluster: nope}]");
    proxy.write_config(&dangling);
    let shown = eventually(
        "/config shows the rejection",
        Duration::from_secs(5),
        || async move {
            let body = get(admin, "/config").await.body;
            body.contains("no cluster named `nope`").then_some(body)
        },
    )
    .await;
    assert!(shown.contains("\"line\":"), "{shown}");
    assert!(shown.contains("\"version\": 1"), "{shown}");
    let r = client.get("app.test", "/").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.header("x-upstream")),
        (200, Some("v1"))
    );
    let metrics = get(admin, "/metrics").await.body;
    assert!(
        metrics.contains("outrigger_config_reloads_total{result=\"rejected\"} 3"),
        "{metrics}"
    );

    // A good file again is picked up by the watcher and clears the error.
    proxy.write_config(&generation(2, "v2", v1.addr, v2.addr));
    eventually("the fixed config serves", Duration::from_secs(5), || {
        let client = client.clone();
        async move {
            (client
                .get("app.test", "/")
                .await
                .ok()?
                .header("x-upstream")?
                == "v2")
                .then_some(())
        }
    })
    .await;
    assert!(
        get(admin, "/config")
            .await
            .body
            .contains("\"last_error\": null")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_changes_are_refused_on_reload() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let good = generation(1, "v1", v1.addr, v2.addr);
    let proxy = TestProxy::start(&good).await;
    proxy.write_config(&good.replace("name: outbound", "name: renamed"));
    let err = proxy.handle.reload().unwrap_err();
    assert_eq!(err.field, "listeners");
    assert_eq!(proxy.handle.config().version, 1);
}
