//! Circuit-breaker thresholds over real sockets: overflow fails fast, and recovers.

use std::time::{Duration, Instant};

use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::{TestProxy, config, upstreams, wait_in_flight};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_fails_fast_with_the_header_and_recovers() {
    let up = upstreams::http("app").await;
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - backends: [{cluster: app}]
"#;
    let clusters = format!(
        r#"- name: app
  circuit_breaker: {{max_requests: 2}}
  endpoints: [{{address: "{}"}}]
"#,
        up.addr
    );
    let proxy = TestProxy::start(&config(vhosts, &clusters)).await;
    let client = TestClient::http2(proxy.addr("outbound")).await;

    let started = Instant::now();
    let calls = (0..5).map(|_| {
        let client = client.clone();
        async move {
            let r = client.get("app.test", "/slow/800").await.unwrap();
            (r, started.elapsed())
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let ok = results.iter().filter(|(r, _)| r.status == 200).count();
    let shed: Vec<_> = results.iter().filter(|(r, _)| r.status == 503).collect();
    assert_eq!((ok, shed.len()), (2, 3), "{results:?}");
    for (r, took) in &shed {
        assert_eq!(r.header("x-outrigger-overloaded"), Some("true"));
        assert_eq!(r.header("x-outrigger-error"), Some("overloaded"));
        assert!(
            *took < Duration::from_millis(500),
            "shed at once, not after the slow upstream: {took:?}"
        );
    }
    let metrics = get(proxy.admin(), "/metrics").await.body;
    assert!(
        metrics.contains(
            "outrigger_circuit_breaker_overflows_total{cluster=\"app\",limit=\"requests\"} 3"
        ),
        "{metrics}"
    );

    // Load gone, slots free: requests pass again.
    for _ in 0..3 {
        assert_eq!(client.get("app.test", "/").await.unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_requests_queue_and_past_max_pending_they_fail_fast() {
    let up = upstreams::http("app").await;
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - backends: [{cluster: app}]
"#;
    let clusters = format!(
        r#"- name: app
  circuit_breaker: {{max_connections: 1, max_pending: 1}}
  endpoints: [{{address: "{}"}}]
"#,
        up.addr
    );
    let proxy = TestProxy::start(&config(vhosts, &clusters)).await;
    let client = TestClient::http2(proxy.addr("outbound")).await;

    let started = Instant::now();
    let call = |client: TestClient| async move {
        let r = client.get("app.test", "/slow/600").await.unwrap();
        (r, started.elapsed())
    };
    // The first holds the one connection; once it is in flight, two more arrive: one waits
    // its turn, and the other finds the queue full.
    let first = tokio::spawn(call(client.clone()));
    wait_in_flight(proxy.admin(), 1).await;
    let (a, b) = tokio::join!(call(client.clone()), call(client.clone()));
    let first = first.await.unwrap();
    let (second, third) = if a.0.status == 200 { (a, b) } else { (b, a) };
    assert_eq!(first.0.status, 200);
    assert_eq!(second.0.status, 200, "the pending request waited its turn");
    assert!(
        second.1 >= Duration::from_millis(1150),
        "served after the first: {:?}",
        second.1
    );
    assert_eq!(third.0.status, 503, "{:?}", third.0);
    assert_eq!(third.0.header("x-outrigger-overloaded"), Some("true"));
    assert!(
        third.1 < Duration::from_millis(500),
        "failed fast: {:?}",
        third.1
    );
    let metrics = get(proxy.admin(), "/metrics").await.body;
    assert!(
        metrics.contains(
            "outrigger_circuit_breaker_overflows_total{cluster=\"app\",limit=\"pending\"} 1"
        ),
        "{metrics}"
    );
    assert_eq!(client.get("app.test", "/").await.unwrap().status, 200);
}
