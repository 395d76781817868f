//! Retries over real sockets: each condition, Retry-After, idempotency, the body limit and
//! endpoint avoidance, driven by upstreams that fail on purpose.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Method;
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::faults;
use outrigger_tests::upstreams::{self, Seen};
use outrigger_tests::{TestProxy, config};

fn cluster_yaml(name: &str, endpoints: &[SocketAddr]) -> String {
    let mut s = format!(
        r#"- name: {name}
  lb: round_robin
  endpoints:
"#
    );
    for e in endpoints {
        s.push_str(&format!("    - address: {e}\n"));
    }
    s
}

async fn proxy(endpoints: &[SocketAddr], retry: &str) -> TestProxy {
    let vhosts = format!(
        r#"- name: app
  domains: [app.test]
  routes:
    - name: main
      retry: {retry}
      backends: [{{cluster: app}}]
"#
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
    // Ten requests, so that even if every one meets the dead endpoint first, the retries stay
    // within the budget's floor of ten a second.
    for _ in 0..10 {
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
    assert!((1..=10).contains(&retries), "{metrics}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_is_retried_only_when_the_policy_names_it() {
    let (up, faults) = faults::faulty("app").await;
    let with_reset = proxy(&[up.addr], "{attempts: 2, on: [reset]}").await;
    let client = TestClient::http1(with_reset.addr("outbound"));
    let r = client.get("app.test", "/first/reset/a").await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "app"));
    assert_eq!(faults.seen("/first/reset/a"), 2);

    let without = proxy(&[up.addr], "{attempts: 2, on: [gateway-error]}").await;
    let client = TestClient::http1(without.addr("outbound"));
    let r = client.get("app.test", "/first/reset/b").await.unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("x-outrigger-error"), Some("upstream-failed"));
    assert_eq!(faults.seen("/first/reset/b"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_attempt_is_cut_by_the_per_try_timeout_and_retried() {
    let (up, faults) = faults::faulty("app").await;
    let proxy = proxy(
        &[up.addr],
        "{attempts: 2, on: [gateway-error], per_try_timeout: 200ms}",
    )
    .await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let started = Instant::now();
    let r = client.get("app.test", "/first/hang/a").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(faults.seen("/first/hang/a"), 2);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_status_code_is_retried() {
    let (up, faults) = faults::faulty("app").await;
    let listed = proxy(
        &[up.addr],
        "{attempts: 2, on: [gateway-error], status_codes: [429]}",
    )
    .await;
    let client = TestClient::http1(listed.addr("outbound"));
    let r = client.get("app.test", "/fail/1/429/a").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(faults.seen("/fail/1/429/a"), 2);

    let unlisted = proxy(&[up.addr], "{attempts: 2, on: [gateway-error]}").await;
    let client = TestClient::http1(unlisted.addr("outbound"));
    let r = client.get("app.test", "/fail/1/429/b").await.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(faults.seen("/fail/1/429/b"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_never_outlasts_the_route_timeout() {
    let (up, faults) = faults::faulty("app").await;
    let proxy = proxy(&[up.addr], "{attempts: 2, on: [gateway-error]}").await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let started = Instant::now();
    let r = client.get("app.test", "/retry-after/1/a").await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(faults.seen("/retry-after/1/a"), 2);
    // The backoff alone would be at most 25 ms.
    assert!(took >= Duration::from_secs(1), "retried after {took:?}");
    // The wait shows in the backoff histogram: one retry, waiting the second it was asked to.
    let page = get(proxy.admin(), "/metrics").await.body;
    let bucket = |le: &str| {
        outrigger_tests::metric(
            &page,
            &format!(
                "outrigger_retry_backoff_seconds_bucket{{le=\"{le}\",direction=\"outbound\",route=\"main\"}}"
            ),
        )
    };
    assert_eq!((bucket("0.512"), bucket("1.024")), (0, 1), "{page}");

    // Asked to wait longer than the route allows: the 503 goes back at once, not a 504 later.
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - timeout: 2s
      retry: {attempts: 2, on: [gateway-error]}
      backends: [{cluster: app}]
"#;
    let short = TestProxy::start(&config(vhosts, &cluster_yaml("app", &[up.addr]))).await;
    let client = TestClient::http1(short.addr("outbound"));
    let started = Instant::now();
    let r = client.get("app.test", "/retry-after/30/b").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("30"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(faults.seen("/retry-after/30/b"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_mid_body_fails_that_request_only() {
    let (up, _) = faults::faulty("app").await;
    let proxy = proxy(&[up.addr], "{attempts: 2}").await;
    let client = TestClient::http1(proxy.addr("outbound"));
    // The head (200) went out before the body broke, so the request cannot be retried; the
    // client sees its response cut short rather than a whole one.
    let cut = client.get("app.test", "/close-mid-body").await;
    assert!(cut.is_err(), "{cut:?}");
    let r = client.get("app.test", "/").await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_unavailable_is_retried() {
    let up = upstreams::grpc().await;
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - retry: {attempts: 2, on: [unavailable]}
      backends: [{cluster: app}]
"#;
    let proxy = TestProxy::start(&config(
        vhosts,
        &outrigger_tests::cluster("app", "http2", &[up.addr]),
    ))
    .await;
    let client = TestClient::http2(proxy.addr("outbound")).await;
    let message = String::from_utf8(upstreams::grpc_frame(b"hello").to_vec()).unwrap();
    let headers = [
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("x-key", "a"),
    ];
    let r = client
        .send(
            Method::POST,
            "app.test",
            "/test.Echo/UnavailableOnce",
            &headers,
            &message,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("grpc-status"),
        None,
        "not a trailers-only failure: {r:?}"
    );
    assert!(r.body.ends_with("hello"), "the message came back: {r:?}");
    let page = get(proxy.admin(), "/metrics").await.body;
    assert!(
        page.contains("outrigger_retries_total{direction=\"outbound\",route=\"app/0\"} 1"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_never_left_is_retried_whatever_the_method() {
    let (up, faults) = faults::faulty("app").await;
    let dead = closed_port().await;
    let proxy = proxy(&[dead, up.addr], "{attempts: 1, on: [connect-failure]}").await;
    let client = TestClient::http1(proxy.addr("outbound"));
    for i in 0..4 {
        let path = format!("/order/{i}");
        let r = client
            .send(Method::POST, "app.test", &path, &[], "order")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(faults.seen(&path), 1, "delivered exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_retried() {
    let (up, streams) = faults::refuses_first_stream().await;
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - retry: {attempts: 1, on: [refused-stream]}
      backends: [{cluster: app}]
"#;
    let proxy = TestProxy::start(&config(
        vhosts,
        &outrigger_tests::cluster("app", "http2", &[up.addr]),
    ))
    .await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let r = client
        .send(Method::POST, "app.test", "/", &[], "order")
        .await
        .unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"), "{r:?}");
    assert_eq!(streams.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_5xx_is_retried_under_5xx_but_only_gateway_errors_under_gateway_error() {
    let (up, faults) = faults::faulty("app").await;
    let any = proxy(&[up.addr], "{attempts: 1, on: [5xx]}").await;
    let client = TestClient::http1(any.addr("outbound"));
    assert_eq!(
        client
            .get("app.test", "/fail/1/500/a")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(faults.seen("/fail/1/500/a"), 2);
    let gateway = proxy(&[up.addr], "{attempts: 1, on: [gateway-error]}").await;
    let client = TestClient::http1(gateway.addr("outbound"));
    assert_eq!(
        client
            .get("app.test", "/fail/1/500/b")
            .await
            .unwrap()
            .status,
        500
    );
    assert_eq!(
        client
            .get("app.test", "/fail/1/502/c")
            .await
            .unwrap()
            .status,
        200
    );
}
