//! Retries over real sockets: conditions, idempotency, the body limit, endpoint avoidance.

use std::net::SocketAddr;

use http::Method;
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::upstreams::{self, Seen};
use outrigger_tests::{TestProxy, config};

fn cluster_yaml(name: &str, endpoints: &[SocketAddr]) -> String {
    let mut s = format!("- name: {name}\n  lb: round_robin\n  endpoints:\n");
    for e in endpoints {
        s.push_str(&format!("    - address: {e}\n"));
    }
    s
}

async fn proxy(endpoints: &[SocketAddr], retry: &str) -> TestProxy {
    let vhosts = format!(
        "- name: app\n  domains: [app.test]\n  routes:\n    - name: main\n      retry: {retry}\n      backends: [{{cluster: app}}]\n"
    );
    TestProxy::start(&config(&vhosts, &cluster_yaml("app", endpoints))).await
}

fn seen(seen: &Seen, path: &str) -> u32 {
    seen.lock().unwrap().get(path).copied().unwrap_or(0)
}

async fn closed_port() -> SocketAddr {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_on_another_endpoint() {
    let (up, _) = upstreams::fail_first().await;
    let dead = closed_port().await;
    let proxy = proxy(&[dead, up.addr], "{attempts: 2}").await;
    let client = TestClient::http1(proxy.addr("outbound"));
    for _ in 0..50 {
        let r = client.get("app.test", "/ok").await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
    let metrics = get(proxy.admin(), "/metrics").await.body;
    let retries: u32 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("outrigger_retries_total{direction=\"outbound\",route=\"main\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Every request that met the dead endpoint first was retried on the live one. (With
    // plain round robin and no ejection yet, that can be every one of them.)
    assert!((1..=50).contains(&retries), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_and_the_upstream_sees_the_attempt_number() {
    let (up, seen_paths) = upstreams::fail_first().await;
    let proxy = proxy(&[up.addr], "{attempts: 2, on: [gateway-error]}").await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let r = client.get("app.test", "/fail-once/a").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (200, "2"),
        "the second attempt succeeded"
    );
    assert_eq!(seen(&seen_paths, "/fail-once/a"), 2);

    // Always failing: 1 + 2 retries, then the upstream's own 503 goes back.
    let r = client.get("app.test", "/always-503/b").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        r.header("x-outrigger-error"),
        None,
        "the app's answer, not the proxy's"
    );
    assert_eq!(seen(&seen_paths, "/always-503/b"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_not_retried_unless_the_policy_says_so_and_big_bodies_never_are() {
    let (up, seen_paths) = upstreams::fail_first().await;
    let strict = proxy(&[up.addr], "{attempts: 2, on: [gateway-error]}").await;
    let client = TestClient::http1(strict.addr("outbound"));
    let r = client
        .send(Method::POST, "app.test", "/fail-once/post", &[], "order")
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(seen(&seen_paths, "/fail-once/post"), 1);

    let opted_in = proxy(
        &[up.addr],
        "{attempts: 2, on: [gateway-error], non_idempotent: true}",
    )
    .await;
    let client = TestClient::http1(opted_in.addr("outbound"));
    let r = client
        .send(Method::POST, "app.test", "/fail-once/post2", &[], "order")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(seen(&seen_paths, "/fail-once/post2"), 2);

    // Over 64 KiB the body is not kept for replay, so the request is sent once.
    let big = "x".repeat(100 * 1024);
    let r = client
        .send(Method::PUT, "app.test", "/fail-once/big", &[], &big)
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(seen(&seen_paths, "/fail-once/big"), 1);
}
