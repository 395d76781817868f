//! Chaos over real sockets: endpoints die, come back and fail wholesale under steady load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::faults::{self, Faults};
use outrigger_tests::{TestProxy, config, eventually, metric};

/// Clients sending one request after another until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    slowest: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(client: &TestClient, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let slowest = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (client, stop) = (client.clone(), stop.clone());
                let (sent, failed, slowest) = (sent.clone(), failed.clone(), slowest.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let ok =
                            matches!(client.get("app.test", "/").await, Ok(r) if r.status == 200);
                        slowest.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                        sent.fetch_add(1, Ordering::Relaxed);
                        if !ok {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            sent,
            failed,
            slowest,
            tasks,
        }
    }

    /// Stops, and returns (sent, failed, slowest).
    async fn finish(self) -> (u64, u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            Duration::from_millis(self.slowest.load(Ordering::Relaxed)),
        )
    }
}

fn proxy_config(endpoints: &[std::net::SocketAddr], retry: &str, outlier: &str) -> String {
    let vhosts = format!(
        r#"- name: app
  domains: [app.test]
  routes:
    - name: main
      retry: {retry}
      backends: [{{cluster: app}}]
"#
    );
    let mut clusters = format!(
        r#"- name: app
{outlier}  endpoints:
"#
    );
    for e in endpoints {
        clusters.push_str(&format!("    - address: \"{e}\"\n"));
    }
    config(&vhosts, &clusters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_mid_run_costs_the_clients_nothing_and_comes_back() {
    let mut endpoints = Vec::new();
    for name in ["a", "b", "c"] {
        endpoints.push(faults::faulty(name).await);
    }
    let addrs: Vec<_> = endpoints.iter().map(|(u, _)| u.addr).collect();
    let proxy = TestProxy::start(&proxy_config(
        &addrs,
        "{attempts: 2}",
        "  outlier: {consecutive_gateway_failure: 3, base_ejection: 1s}\n",
    ))
    .await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let load = Load::start(&client, 4);
    let victim: Arc<Faults> = endpoints[2].1.clone();
    let victim_addr = addrs[2];
    eventually("c serves", Duration::from_secs(5), || {
        let v = victim.clone();
        async move { (v.requests() > 50).then_some(()) }
    })
    .await;

    // Kill c: its listener and every connection to it go.
    let retries = |page: &str| {
        metric(
            page,
            "outrigger_retries_total{direction=\"outbound\",route=\"main\"}",
        )
    };
    drop(endpoints.pop());
    let before = retries(&get(proxy.admin(), "/metrics").await.body);
    let killed_at = load.sent.load(Ordering::Relaxed);
    eventually("c is ejected", Duration::from_secs(5), || async {
        let page = get(proxy.admin(), "/metrics").await.body;
        (metric(
            &page,
            "outrigger_outlier_ejected_endpoints{cluster=\"app\"}",
        ) == 1)
            .then_some(())
    })
    .await;
    // Dead for a while longer, through ejections and failed probes.
    let dead_from = Instant::now();
    eventually("two seconds of load", Duration::from_secs(10), || async {
        (dead_from.elapsed() > Duration::from_secs(2)).then_some(())
    })
    .await;
    let page = get(proxy.admin(), "/metrics").await.body;
    let hit_while_dead = retries(&page) - before;
    let sent_while_dead = load.sent.load(Ordering::Relaxed) - killed_at;

    // Back on the same address: once a probe succeeds, it takes traffic again.
    let served_before = victim.requests();
    let _revived = faults::faulty_at("c", victim_addr, victim.clone()).await;
    eventually("c serves again", Duration::from_secs(15), || {
        let v = victim.clone();
        async move { (v.requests() > served_before + 20).then_some(()) }
    })
    .await;
    let (sent, failed, slowest) = load.finish().await;
    let page = get(proxy.admin(), "/metrics").await.body;
    let ejections = metric(&page, "outrigger_outlier_ejections_total{cluster=\"app\"}");
    eprintln!(
        "{sent} requests, {failed} failed, slowest {slowest:?}; while c was dead, {hit_while_dead} of \
         {sent_while_dead} requests hit it first and were retried elsewhere; {ejections} ejection(s)"
    );
    assert_eq!(failed, 0, "the clients never see the dead endpoint");
    assert!(ejections >= 1, "{page}");
    assert!(
        hit_while_dead * 20 < sent_while_dead,
        "ejected, c should get under 5 % of the requests: {hit_while_dead} of {sent_while_dead}"
    );
    assert_eq!(
        metric(
            &page,
            "outrigger_outlier_ejected_endpoints{cluster=\"app\"}"
        ),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_endpoint_fails_the_budget_stops_a_retry_storm() {
    let mut endpoints = Vec::new();
    for name in ["a", "b", "c"] {
        let (up, faults) = faults::faulty(name).await;
        faults.fail(100, 503);
        endpoints.push((up, faults));
    }
    let addrs: Vec<_> = endpoints.iter().map(|(u, _)| u.addr).collect();
    // Three retries each: without a budget, four upstream attempts per request.
    let proxy = TestProxy::start(&proxy_config(
        &addrs,
        "{attempts: 3, on: [gateway-error]}",
        "",
    ))
    .await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let started = Instant::now();
    let load = Load::start(&client, 4);
    eventually("500 requests", Duration::from_secs(30), || async {
        (load.sent.load(Ordering::Relaxed) >= 500).then_some(())
    })
    .await;
    let (sent, failed, slowest) = load.finish().await;
    let elapsed = started.elapsed();
    let attempts: u64 = endpoints.iter().map(|(_, f)| f.requests()).sum();
    // 20 % of the requests, plus 10 a second over every second the window touched, plus one
    // per client for checks that raced each other.
    let budget = sent + sent / 5 + 10 * (elapsed.as_secs() + 2) + 4;
    let page = get(proxy.admin(), "/metrics").await.body;
    eprintln!(
        "{sent} requests in {elapsed:?} made {attempts} upstream attempts (budget {budget}, \
         {} without one); slowest answer {slowest:?}",
        sent * 4
    );
    assert_eq!(failed, sent, "every request fails: all endpoints do");
    assert!(attempts <= budget, "{attempts} attempts > budget {budget}");
    // Tighter still: the throttle shuts retries once failures outweigh successes, after about
    // 50 of them, so the outage costs at most 5 % more attempts than requests beyond those.
    let throttled = sent + sent / 20 + 50;
    assert!(
        attempts <= throttled,
        "{attempts} attempts for {sent} requests: more than {throttled}"
    );
    assert!(
        metric(
            &page,
            "outrigger_retry_budget_exhausted_total{cluster=\"app\"}"
        ) > 0,
        "{page}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "errors come fast, not as timeouts: {slowest:?}"
    );
}
