//! `outrigger-bench churn`: pods coming and going under a control plane that serves
//! thousands of scoped proxies.
//!
//! A fake Kubernetes API server (the test suite's, speaking the real list/watch protocol over
//! TLS) holds `--services` Services, each with an EndpointSlice and a Pod. The control plane
//! runs as its own process (one worker thread) watching it, with a mesh file that gives
//! every service a `calls` list of two others: each proxy's view is scoped. `--streams`
//! simulated proxies, one HTTP/2 connection each, subscribe to CDS, to the EDS of their
//! clusters and to RDS, and ACK everything.
//!
//! Then `--rate` EndpointSlice changes a second, for `--duration`: each moves one Service's
//! endpoint to a new address that encodes the change's number, so a proxy that receives it
//! knows which change it is and how long it took.
//!
//! Reported: changes made, pushes received by the proxies whose scope holds the changed
//! service, change → proxy latency p50/p99/max, and the control plane's CPU per change and
//! as a share of its one core.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{Node, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use outrigger_tests::fake_kube::FakeApiServer;
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Cp, cpu_seconds, free_port, memory_kib, percentile, wait_for_port, write_json};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

struct Options {
    streams: usize,
    services: usize,
    rate: f64,
    duration: Duration,
    cp_bin: PathBuf,
}

pub fn run(args: &[String]) {
    let mut o = Options {
        streams: 10_000,
        services: 1_000,
        rate: 100.0,
        duration: Duration::from_secs(20),
        cp_bin: "target/release/outrigger-control-plane".into(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().expect("a value").clone();
        match flag.as_str() {
            "--streams" => o.streams = value().parse().expect("--streams N"),
            "--services" => o.services = value().parse().expect("--services N"),
            "--rate" => o.rate = value().parse().expect("--rate PER_SECOND"),
            "--duration" => {
                o.duration = Duration::from_secs(value().parse().expect("--duration SECONDS"))
            }
            "--control-plane" => o.cp_bin = value().into(),
            other => panic!(
                "unknown flag {other}; flags: --streams N --services N --rate R --duration S --control-plane PATH"
            ),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(measure(o));
}

/// The address that says "change `n`" (change 0 is the first state).
fn address_of(n: usize) -> String {
    format!("10.{}.{}.{}", 100 + n / 65536, (n / 256) % 256, n % 256)
}

fn change_of(address: &str) -> Option<usize> {
    let parts: Vec<usize> = address
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    match parts[..] {
        [10, a, b, c] if a >= 100 => Some((a - 100) * 65536 + b * 256 + c),
        _ => None,
    }
}

fn slice(i: usize, change: usize) -> Value {
    let name = format!("svc-{i}");
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{name}-1"), "namespace": "bench",
                        "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": [{"addresses": [address_of(change)], "conditions": {"ready": true},
                          "targetRef": {"kind": "Pod", "name": format!("{name}-pod"), "namespace": "bench"}}]})
}

fn objects(i: usize) -> [Value; 3] {
    let name = format!("svc-{i}");
    [
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "bench"},
               "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        slice(i, 0),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": format!("{name}-pod"), "namespace": "bench"},
               "spec": {"serviceAccountName": name, "containers": [{"name": "app", "image": "app"}]}}),
    ]
}

/// Every service calls the next two: a proxy of `svc-i` sees `svc-(i+1)` and `svc-(i+2)`.
fn mesh(services: usize) -> String {
    let mut s = String::from("mesh: {trust_domain: cluster.local}\nservices:\n");
    for i in 0..services {
        s.push_str(&format!(
            "  - {{name: svc-{i}, namespace: bench, calls: [svc-{}, svc-{}]}}\n",
            (i + 1) % services,
            (i + 2) % services
        ));
    }
    s
}

/// One simulated proxy of service `svc-{service}`: CDS, then the EDS of its clusters, and
/// RDS; ACKs everything, and reports each change it sees in an EDS response.
async fn proxy(
    channel: tonic::transport::Channel,
    id: usize,
    service: usize,
    seen: mpsc::UnboundedSender<(usize, Instant)>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (tx, rx) = mpsc::channel(8);
    let request =
        |type_url: &str, names: Vec<String>, version: String, nonce: String| DiscoveryRequest {
            version_info: version,
            resource_names: names,
            type_url: type_url.into(),
            response_nonce: nonce,
            ..Default::default()
        };
    let mut first = request(CDS, vec![], String::new(), String::new());
    first.node = Some(Node {
        id: format!("sim-{id}"),
        cluster: format!("svc-{service}.bench"),
        ..Default::default()
    });
    tx.send(first).await?;
    tx.send(request(
        RDS,
        vec!["outbound".into()],
        String::new(),
        String::new(),
    ))
    .await?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut clusters: Vec<String> = Vec::new();
    // The change each cluster's endpoints last said: a response that repeats it is not a
    // new receipt.
    let mut last: std::collections::HashMap<String, usize> = Default::default();
    while let Some(resp) = inbound.message().await? {
        let names =
            match resp.type_url.as_str() {
                CDS => {
                    clusters = resp
                        .resources
                        .iter()
                        .filter_map(|a| {
                            envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(
                                a.value.as_slice(),
                            )
                            .ok()
                        })
                        .map(|c| c.name)
                        .collect();
                    vec![]
                }
                EDS => {
                    let at = Instant::now();
                    for a in &resp.resources {
                        let Ok(cla) = ClusterLoadAssignment::decode(a.value.as_slice()) else {
                            continue;
                        };
                        let endpoint = cla.endpoints.iter().flat_map(|l| &l.lb_endpoints).find_map(
                            |e| match &e.host_identifier {
                                Some(lb_endpoint::HostIdentifier::Endpoint(e)) => e.address.clone(),
                                _ => None,
                            },
                        );
                        if let Some(address::Address::SocketAddress(s)) =
                            endpoint.and_then(|a| a.address)
                            && let Some(n) = change_of(&s.address)
                            && matches!(
                                s.port_specifier,
                                Some(socket_address::PortSpecifier::PortValue(_))
                            )
                            && last.insert(cla.cluster_name.clone(), n) != Some(n)
                        {
                            let _ = seen.send((n, at));
                        }
                    }
                    clusters.clone()
                }
                _ => vec!["outbound".into()],
            };
        let is_cds = resp.type_url == CDS;
        tx.send(request(
            &resp.type_url,
            names,
            resp.version_info,
            resp.nonce,
        ))
        .await?;
        if is_cds {
            tx.send(request(EDS, clusters.clone(), String::new(), String::new()))
                .await?;
        }
    }
    Ok(())
}

async fn measure(o: Options) {
    let api = FakeApiServer::empty("bench-token").await;
    for i in 0..o.services {
        for obj in objects(i) {
            api.cluster.apply(obj);
        }
    }
    let access = api.access();
    let dir = std::env::temp_dir().join(format!("outrigger-churn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mesh_path = dir.join("mesh.yaml");
    std::fs::write(&mesh_path, mesh(o.services)).unwrap();
    let (xds, admin) = (free_port(), free_port());
    let cp = Cp::serve(
        &o.cp_bin,
        &mesh_path,
        (xds, admin),
        &[
            "--kube-api".as_ref(),
            access.url.as_ref(),
            "--kube-services".as_ref(),
            "--kube-token-file".as_ref(),
            access.token_file.as_os_str(),
            "--kube-ca-file".as_ref(),
            access.ca_file.as_os_str(),
        ],
    );
    wait_for_port(xds);
    let pid = cp.0.id();
    // Synced: every service has its endpoint from the cluster.
    let until = Instant::now() + Duration::from_secs(120);
    while !synced(admin) {
        assert!(Instant::now() < until, "the control plane did not sync");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    for id in 0..o.streams {
        // Connected one after another, as a fleet of proxies comes up.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{xds}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to the control plane");
        let seen = seen_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = proxy(channel, id, id % o.services, seen).await {
                eprintln!("proxy {id}: {e}");
            }
        });
    }
    // Every proxy holds its two clusters' endpoints (change 0).
    let mut initial = 0;
    let started = Instant::now();
    while initial < o.streams * 2 {
        let (n, _) = tokio::time::timeout(Duration::from_secs(120), seen.recv())
            .await
            .unwrap_or_else(|_| panic!("{initial} of {} initial endpoints arrived", o.streams * 2))
            .unwrap();
        if n == 0 {
            initial += 1;
        }
    }
    let sync = started.elapsed();
    let rss = memory_kib(pid, "VmRSS:");

    // Churn.
    let interval = Duration::from_secs_f64(1.0 / o.rate);
    let changes = (o.duration.as_secs_f64() * o.rate) as usize;
    let mut applied = vec![None; changes + 1];
    let cpu_before = cpu_seconds(pid);
    let churn_started = Instant::now();
    let mut latencies = Vec::new();
    let mut next = churn_started;
    let mut change = 0;
    loop {
        let now = Instant::now();
        if change < changes && now >= next {
            change += 1;
            let service = change % o.services;
            applied[change] = Some(Instant::now());
            api.cluster.apply(slice(service, change));
            next += interval;
            continue;
        }
        let wait = if change < changes {
            next.saturating_duration_since(now)
        } else {
            Duration::from_secs(2)
        };
        match tokio::time::timeout(wait, seen.recv()).await {
            Ok(Some((n, at))) => {
                if let Some(Some(t)) = applied.get(n) {
                    latencies.push(at - *t);
                }
            }
            Ok(None) => break,
            // After the last change, two quiet seconds end it.
            Err(_) if change >= changes => break,
            Err(_) => {}
        }
    }
    let elapsed = churn_started.elapsed();
    let cpu = cpu_seconds(pid) - cpu_before;
    latencies.sort();
    // Each change reaches the proxies of the two services that call the changed one.
    let expected = changes * 2 * (o.streams / o.services);
    let (p50, p99, max) = (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
    );
    println!(
        "churn: {} streams, {} services, {} changes at {}/s",
        o.streams, o.services, changes, o.rate
    );
    println!("{:<44} {:>12.2?}", "initial sync of every proxy", sync);
    println!(
        "{:<44} {:>12.1}",
        "control plane RSS (MB)",
        rss as f64 / 1024.0
    );
    println!(
        "{:<44} {:>12}",
        "pushes received with a change (expected)",
        format!("{} ({expected})", latencies.len())
    );
    println!("{:<44} {:>12.1?}", "change → proxy p50", p50);
    println!("{:<44} {:>12.1?}", "change → proxy p99", p99);
    println!("{:<44} {:>12.1?}", "change → proxy max", max);
    println!(
        "{:<44} {:>12.2}",
        "control plane CPU per change (ms)",
        cpu * 1e3 / changes.max(1) as f64
    );
    println!(
        "{:<44} {:>11.0}%",
        "control plane CPU (one core)",
        cpu / elapsed.as_secs_f64() * 100.0
    );
    write_json(
        Path::new("target/bench"),
        "churn.json",
        &json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "streams": o.streams,
            "services": o.services,
            "changes": changes,
            "rate_per_second": o.rate,
            "control_plane_workers": 1,
            "initial_sync_ms": sync.as_secs_f64() * 1e3,
            "rss_mb": rss as f64 / 1024.0,
            "pushes_with_a_change": latencies.len(),
            "pushes_expected": expected,
            "push_p50_ms": p50.as_secs_f64() * 1e3,
            "push_p99_ms": p99.as_secs_f64() * 1e3,
            "push_max_ms": max.as_secs_f64() * 1e3,
            "cpu_ms_per_change": cpu * 1e3 / changes.max(1) as f64,
            "cpu_share_of_one_core": cpu / elapsed.as_secs_f64(),
        }),
    );
    drop(cp);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The control plane has listed the cluster and holds every service.
fn synced(admin: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(admin) else {
        return false;
    };
    let _ = s.write_all(b"GET /status HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    let json = body.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str::<Value>(json).is_ok_and(|v| {
        v["cluster"]["synced"] == true && v["cluster"]["services"].as_u64() > Some(0)
    })
}
