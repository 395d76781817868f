//! Local rate limits over real sockets: 429 with Retry-After, at the configured rate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::{TestProxy, cluster, config, metric, upstreams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_limit_admits_the_configured_rate_within_ten_percent() {
    let up = upstreams::http("app").await;
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - name: limited
      rate_limit: {requests_per_second: 100, burst: 10}
      backends: [{cluster: app}]
"#;
    let proxy = TestProxy::start(&config(vhosts, &cluster("app", "http1", &[up.addr]))).await;
    let client = TestClient::http1(proxy.addr("outbound"));

    let (admitted, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let run_for = Duration::from_secs(3);
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (client, admitted, limited) = (client.clone(), admitted.clone(), limited.clone());
            tokio::spawn(async move {
                while started.elapsed() < run_for {
                    let r = client.get("app.test", "/").await.unwrap();
                    match r.status.as_u16() {
                        200 => admitted.fetch_add(1, Ordering::Relaxed),
                        429 => {
                            assert_eq!(r.header("x-outrigger-error"), Some("rate-limited"));
                            assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
                            limited.fetch_add(1, Ordering::Relaxed)
                        }
                        other => panic!("unexpected {other}: {r:?}"),
                    };
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (admitted, limited) = (
        admitted.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
    );
    let expected = 10.0 + 100.0 * elapsed;
    eprintln!(
        "{admitted} admitted and {limited} limited in {elapsed:.2}s; expected {expected:.0} admitted"
    );
    assert!(
        limited > admitted,
        "the clients really pushed past the limit"
    );
    assert!(
        (admitted as f64 - expected).abs() <= expected * 0.1,
        "{admitted} admitted, expected {expected:.0} ± 10 %"
    );
    let page = get(proxy.admin(), "/metrics").await.body;
    assert_eq!(
        metric(
            &page,
            "outrigger_rate_limited_total{direction=\"outbound\",route=\"limited\"}"
        ),
        limited
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_limit_covers_every_route_of_the_service() {
    let up = upstreams::http("app").await;
    let text = format!(
        r#"admin:
  address: 127.0.0.1:0
listeners:
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
    rate_limit: {{requests_per_second: 0.5, burst: 2}}
    virtual_hosts:
      - name: app
        domains: ['*']
        routes:
          - name: one
            match: {{prefix: /one}}
            backends: [{{cluster: app}}]
          - name: two
            backends: [{{cluster: app}}]
clusters:
  - name: app
    endpoints: [{{address: "{}"}}]
"#,
        up.addr
    );
    let proxy = TestProxy::start(&text).await;
    let client = TestClient::http1(proxy.addr("inbound"));
    assert_eq!(client.get("app", "/one").await.unwrap().status, 200);
    assert_eq!(client.get("app", "/two").await.unwrap().status, 200);
    let r = client.get("app", "/one").await.unwrap();
    assert_eq!(r.status, 429);
    // The next token is two seconds away.
    assert_eq!(r.header("retry-after"), Some("2"));
    assert!(r.body.contains("listener `inbound`"), "{}", r.body);
}
