//! What the control plane asks of the Kubernetes API server: the requests it makes to sync a
//! cluster of `--services` Services (each with an EndpointSlice and a Pod), then per minute
//! while the cluster is idle (only bookmarks arrive), and how long an EndpointSlice change
//! takes from the watch event to a new published mesh.
//!
//! The API server is the test suite's fake one, speaking the real list/watch protocol over
//! TLS: no real one can be run here. The control plane runs in this process.
//!
//! `outrigger-bench kube-idle [--services N] [--duration S]`; JSON in
//! `target/bench/kube-idle.json`.

use std::path::Path;
use std::time::{Duration, Instant};

use outrigger_tests::fake_kube::FakeApiServer;
use serde_json::{Value, json};

use crate::write_json;

pub fn run(args: &[String]) {
    let mut services = 1000usize;
    let mut idle = Duration::from_secs(60);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--services" => services = it.next().and_then(|v| v.parse().ok()).expect("N"),
            "--duration" => {
                idle = Duration::from_secs(it.next().and_then(|v| v.parse().ok()).expect("S"))
            }
            other => panic!("unknown flag {other}; flags: --services N --duration S"),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(measure(services, idle));
}

fn service(i: usize) -> [Value; 3] {
    let name = format!("svc-{i}");
    let ip = format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256);
    [
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "bench"},
               "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": format!("{name}-1"), "namespace": "bench",
                            "labels": {"kubernetes.io/service-name": name}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": [ip],
                              "targetRef": {"kind": "Pod", "name": format!("{name}-pod"), "namespace": "bench"}}]}),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": format!("{name}-pod"), "namespace": "bench"},
               "spec": {"serviceAccountName": name, "containers": [{"name": "app", "image": "app"}]}}),
    ]
}

/// `(lists, watches, others)` among `requests`.
fn kinds(requests: &[String]) -> (usize, usize, usize) {
    let watches = requests.iter().filter(|r| r.contains("watch=true")).count();
    let lists = requests
        .iter()
        .filter(|r| r.starts_with("GET ") && !r.contains("watch=true"))
        .count();
    (lists, watches, requests.len() - lists - watches)
}

async fn measure(count: usize, idle: Duration) {
    let api = FakeApiServer::empty("bench-token").await;
    for i in 0..count {
        for obj in service(i) {
            api.cluster.apply(obj);
        }
    }
    let cp = outrigger_tests::control_plane("mesh: {trust_domain: cluster.local}\n").await;
    let started = Instant::now();
    cp.watch_cluster(api.client(), None);
    let synced = loop {
        let snapshot = cp.publisher.current();
        if snapshot
            .mesh
            .as_ref()
            .is_some_and(|m| m.services.len() >= count)
        {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no sync in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let at_sync = api.cluster.requests().len();
    let (sync_lists, sync_watches, _) = kinds(&api.cluster.requests());

    // Idle: nothing changes; a bookmark now and then, as an API server sends them.
    let idle_start = Instant::now();
    while idle_start.elapsed() < idle {
        tokio::time::sleep(Duration::from_secs(10).min(idle)).await;
        api.cluster.bookmark();
    }
    let (lists, watches, others) = kinds(&api.cluster.requests()[at_sync..]);
    let per_minute = |n: usize| n as f64 * 60.0 / idle.as_secs_f64();

    // An EndpointSlice change, from the watch event to the published mesh.
    let mut latencies = Vec::new();
    for round in 0..20 {
        let version = cp.publisher.current().mesh_version;
        let mut slice = service(round)[1].clone();
        slice["endpoints"][0]["addresses"][0] = json!(format!("10.200.0.{}", round + 1));
        let changed = Instant::now();
        api.cluster.apply(slice);
        while cp.publisher.current().mesh_version == version {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies.push(changed.elapsed());
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];

    println!(
        "{:<44} {:>12}",
        format!("kube-idle, {count} Services"),
        "value"
    );
    println!("{:<44} {:>12.2?}", "first sync (list + watch)", synced);
    println!("{:<44} {:>12}", "requests to sync: lists", sync_lists);
    println!("{:<44} {:>12}", "requests to sync: watches", sync_watches);
    println!(
        "{:<44} {:>12.1}",
        "idle: lists per minute",
        per_minute(lists)
    );
    println!(
        "{:<44} {:>12.1}",
        "idle: watches per minute",
        per_minute(watches)
    );
    println!(
        "{:<44} {:>12.1}",
        "idle: other requests per minute",
        per_minute(others)
    );
    println!(
        "{:<44} {:>12.2?}",
        "EndpointSlice change → mesh published (median of 20)", median
    );
    write_json(
        Path::new("target/bench"),
        "kube-idle.json",
        &json!({
            "services": count,
            "idle_seconds": idle.as_secs(),
            "sync_ms": synced.as_secs_f64() * 1000.0,
            "sync_lists": sync_lists,
            "sync_watches": sync_watches,
            "idle_lists_per_minute": per_minute(lists),
            "idle_watches_per_minute": per_minute(watches),
            "idle_other_per_minute": per_minute(others),
            "endpoint_change_to_publish_ms_median": median.as_secs_f64() * 1000.0,
        }),
    );
}
