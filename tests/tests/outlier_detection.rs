//! A dead endpoint under steady load: retries hide it, outlier detection ejects it, and it
//! gets traffic again once it is back.

use std::collections::HashMap;
use std::time::Duration;

use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::{TestProxy, config, eventually, upstreams};

fn counter(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_ejected_then_comes_back() {
    let (a, b) = (upstreams::http("a").await, upstreams::http("b").await);
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let vhosts = "- name: app\n  domains: [app.test]\n  routes:\n    - name: main\n      retry: {attempts: 2}\n      backends: [{cluster: app}]\n";
    let clusters = format!(
        "- name: app\n  lb: round_robin\n  outlier: {{consecutive_gateway_failure: 3, base_ejection: 1s, max_ejection_percent: 50}}\n  endpoints: [{{address: \"{}\"}}, {{address: \"{}\"}}, {{address: \"{dead}\"}}]\n",
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
    let retries = counter(
        &metrics,
        "outrigger_retries_total{direction=\"outbound\",route=\"main\"} ",
    );
    let ejections = counter(
        &metrics,
        "outrigger_outlier_ejections_total{cluster=\"app\"} ",
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
    let vhosts = "- name: app\n  domains: [app.test]\n  routes:\n    - name: main\n      backends: [{cluster: app}]\n";
    let clusters = format!(
        "- name: app\n  outlier: {{consecutive_5xx: 1, consecutive_gateway_failure: 1}}\n  endpoints: [{{address: \"{}\"}}, {{address: \"{}\"}}]\n",
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
    let ejections = counter(
        &metrics,
        "outrigger_outlier_ejections_total{cluster=\"app\"} ",
    );
    assert_eq!(ejections, 0, "a 429 is not a failure");
    // Without steering, peak-EWMA would favour the endpoint whose 429s come back fastest.
    assert!(
        told_to_wait <= 5,
        "{told_to_wait} of 100 requests met the overloaded endpoint"
    );
}
