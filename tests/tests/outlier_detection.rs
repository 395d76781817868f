//! A dead endpoint under steady load: retries hide it, outlier detection ejects it, and it
//! gets traffic again once it is back.

use std::collections::HashMap;
use std::time::Duration;

use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::{TestProxy, config, eventually, metric, upstreams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_ejected_then_comes_back() {
    let (a, b) = (upstreams::http("a").await, upstreams::http("b").await);
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - name: main
      retry: {attempts: 2}
      backends: [{cluster: app}]
"#;
    let clusters = format!(
        r#"- name: app
  lb: round_robin
  outlier: {{consecutive_gateway_failure: 3, base_ejection: 1s, max_ejection_percent: 50}}
  endpoints: [{{address: "{}"}}, {{address: "{}"}}, {{address: "{dead}"}}]
"#,
        a.addr, b.addr
    );
    let proxy = TestProxy::start(&config(vhosts, &clusters)).await;
    let client = TestClient::http1(proxy.addr("outbound"));

    let mut served: HashMap<String, u32> = HashMap::new();
    for _ in 0..300 {
        let r = client.get("app.test", "/").await.unwrap();
        assert_eq!(
            r.status, 200,
            "the client never sees the dead endpoint: {r:?}"
        );
        *served.entry(r.body).or_default() += 1;
    }
    let metrics = get(proxy.admin(), "/metrics").await.body;
    let retries = metric(
        &metrics,
        "outrigger_retries_total{direction=\"outbound\",route=\"main\"}",
    );
    let ejections = metric(
        &metrics,
        "outrigger_outlier_ejections_total{cluster=\"app\"}",
    );
    eprintln!(
        "300 requests: {served:?}; {retries} hit the dead endpoint and were retried; {ejections} ejection(s)"
    );
    assert!(ejections >= 1, "{metrics}");
    // Without ejection about a third of 300 requests would hit it first; ejected, only the
    // few before each ejection and each failed probe do.
    assert!(
        retries < 30,
        "{retries} retries: the dead endpoint kept getting traffic"
    );

    // It comes back where it was: once its ejection ends, a probe succeeds and it serves again.
    let _revived = upstreams::http_at("revived", dead).await;
    eventually(
        "the revived endpoint serves again",
        Duration::from_secs(15),
        || {
            let client = client.clone();
            async move { (client.get("app.test", "/").await.ok()?.body == "revived").then_some(()) }
        },
    )
    .await;
}

/// An endpoint that answers 429 is loaded, not broken: it is not ejected, and the balancer
/// sends its share elsewhere while it says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_says_it_is_overloaded_is_steered_around_not_ejected() {
    let (busy, busy_faults) = outrigger_tests::faults::faulty("busy").await;
    busy_faults.fail(100, 429);
    let (calm, _) = outrigger_tests::faults::faulty("calm").await;
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - name: main
      backends: [{cluster: app}]
"#;
    let clusters = format!(
        r#"- name: app
  outlier: {{consecutive_5xx: 1, consecutive_gateway_failure: 1}}
  endpoints: [{{address: "{}"}}, {{address: "{}"}}]
"#,
        busy.addr, calm.addr
    );
    let proxy = TestProxy::start(&config(vhosts, &clusters)).await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let mut told_to_wait = 0;
    for _ in 0..100 {
        let r = client.get("app.test", "/").await.unwrap();
        told_to_wait += usize::from(r.status == 429);
    }
    let metrics = get(proxy.admin(), "/metrics").await.body;
    let ejections = metric(
        &metrics,
        "outrigger_outlier_ejections_total{cluster=\"app\"}",
    );
    assert_eq!(ejections, 0, "a 429 is not a failure");
    // Without steering, peak-EWMA would favour the endpoint whose 429s come back fastest.
    assert!(
        told_to_wait <= 5,
        "{told_to_wait} of 100 requests met the overloaded endpoint"
    );
}

/// With the defaults alone (no outlier or retry settings): a killed endpoint is hidden and
/// ejected, and once it is back it serves again within about a second, not when a 30 s
/// ejection timer ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_endpoint_is_back_within_a_second_by_default() {
    let a = upstreams::http("a").await;
    let b = upstreams::http("b").await;
    let b_addr = b.addr;
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - name: main
      backends: [{cluster: app}]
"#;
    let clusters = format!(
        r#"- name: app
  endpoints: [{{address: "{}"}}, {{address: "{b_addr}"}}]
"#,
        a.addr
    );
    let proxy = TestProxy::start(&config(vhosts, &clusters)).await;
    let client = TestClient::http1(proxy.addr("outbound"));
    // Eight at a time, so that the balancer spreads them rather than keep to the fastest.
    let burst = || {
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let client = client.clone();
                async move { client.get("app.test", "/").await }
            })
            .collect();
        futures_util::future::join_all(calls)
    };
    drop(b);
    for _ in 0..25 {
        for r in burst().await {
            let r = r.unwrap();
            assert_eq!(
                r.status, 200,
                "the default retries hide the dead endpoint: {r:?}"
            );
        }
    }
    let metrics = get(proxy.admin(), "/metrics").await.body;
    let ejections = metric(
        &metrics,
        "outrigger_outlier_ejections_total{cluster=\"app\"}",
    );
    let _b = upstreams::http_at("b", b_addr).await;
    let back = std::time::Instant::now();
    eventually("b serves again", Duration::from_secs(3), || async {
        burst()
            .await
            .into_iter()
            .any(|r| r.is_ok_and(|r| r.body == "b"))
            .then_some(())
    })
    .await;
    eprintln!(
        "{ejections} ejection(s); b served again {:?} after it was back",
        back.elapsed()
    );
}

/// An endpoint that stays broken is probed at no more than about one request a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_still_broken_endpoint_stays_out_at_the_probe_rate() {
    let a = upstreams::http("a").await;
    let (broken, faults) = outrigger_tests::faults::faulty("broken").await;
    faults.fail(100, 503);
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - name: main
      backends: [{cluster: app}]
"#;
    let clusters = format!(
        r#"- name: app
  endpoints: [{{address: "{}"}}, {{address: "{}"}}]
"#,
        a.addr, broken.addr
    );
    let proxy = TestProxy::start(&config(vhosts, &clusters)).await;
    let client = TestClient::http1(proxy.addr("outbound"));
    // Until it is ejected (five 503s in a row). Eight at a time, so that the balancer sends
    // it some: one at a time, the healthy endpoint's record could win every draw.
    eventually(
        "the broken endpoint is ejected",
        Duration::from_secs(5),
        || async {
            let calls: Vec<_> = (0..8).map(|_| client.get("app.test", "/")).collect();
            futures_util::future::join_all(calls).await;
            let metrics = get(proxy.admin(), "/metrics").await.body;
            (metric(
                &metrics,
                "outrigger_outlier_ejections_total{cluster=\"app\"}",
            ) >= 1)
                .then_some(())
        },
    )
    .await;
    let before = faults.requests();
    let started = std::time::Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let r = client.get("app.test", "/").await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        sent += 1;
    }
    let probes = faults.requests() - before;
    eprintln!("{sent} requests in 3 s; the broken endpoint saw {probes}");
    // 250 ms, 500 ms, then one a second: about 4 in 3 s.
    assert!((2..=6).contains(&probes), "{probes} probes in 3 s");
}
