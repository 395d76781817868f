//! Two control-plane processes serve the same mesh file. A proxy under load loses the one it
//! is connected to (SIGKILL): no request fails, and the proxy follows the next change of the
//! mesh from the other.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::{
    TestProxy, eventually, free_addr, metric, temp_path, upstreams, workspace_binary, xds_config,
};

fn mesh(endpoint: std::net::SocketAddr) -> String {
    format!(
        "services:\n  - name: catalog\n    namespace: shop\n    endpoints: [{{address: \"{endpoint}\"}}]\n"
    )
}

/// A control plane process; killed when dropped.
struct Replica {
    child: Child,
    xds: std::net::SocketAddr,
}

impl Replica {
    async fn start(mesh: &std::path::Path) -> Replica {
        let (xds, admin) = (free_addr(), free_addr());
        let child = Command::new(workspace_binary("outrigger-control-plane"))
            .args(["serve", "--workers", "1", "--mesh"])
            .arg(mesh)
            .args(["--xds", &xds.to_string(), "--admin", &admin.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        eventually(
            "the control plane serves",
            Duration::from_secs(10),
            || async { tokio::net::TcpStream::connect(admin).await.ok() },
        )
        .await;
        assert_eq!(get(admin, "/status").await.status, 200);
        Replica { child, xds }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_fails_over_to_another_replica_without_a_failed_request() {
    let (v1, v2) = (
        upstreams::http("catalog-v1").await,
        upstreams::http("catalog-v2").await,
    );
    let mesh_path = temp_path("mesh.yaml");
    std::fs::write(&mesh_path, mesh(v1.addr)).unwrap();
    let mut first = Replica::start(&mesh_path).await;
    let second = Replica::start(&mesh_path).await;
    let proxy = TestProxy::start(&xds_config(&format!(
        "address: \"{}\"\nalternates: [\"{}\"]\nnode: web-1\nservice: web",
        first.xds, second.xds
    )))
    .await;
    let client = TestClient::http1(proxy.addr("outbound"));
    eventually("catalog is routed", Duration::from_secs(10), || async {
        let body = client.get("catalog.shop", "/").await.ok()?.body;
        (body == "catalog-v1").then_some(())
    })
    .await;

    // Load, from before the kill until the proxy has resynced.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (client, stop, sent, failed) =
            (client.clone(), stop.clone(), sent.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = client
                    .get("catalog.shop", "/")
                    .await
                    .is_ok_and(|r| r.status == 200);
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    eventually("load is flowing", Duration::from_secs(10), || async {
        (sent.load(Ordering::Relaxed) > 50).then_some(())
    })
    .await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    // The mesh changes; only the second replica is there to tell the proxy.
    std::fs::write(&mesh_path, mesh(v2.addr)).unwrap();
    eventually(
        "the proxy follows the mesh from the other replica",
        Duration::from_secs(30),
        || async {
            let body = client.get("catalog.shop", "/").await.ok()?.body;
            (body == "catalog-v2").then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(sent > 100, "{sent} requests sent");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    let metrics = get(proxy.admin(), "/metrics").await.body;
    assert!(
        metric(&metrics, "outrigger_xds_reconnects_total") >= 1,
        "{metrics}"
    );
}

/// The Lease that picks the status writer: one holder at a time, and another takes over
/// once the holder stops renewing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_holds_the_status_lease_and_another_takes_it_when_it_lapses() {
    use outrigger_control_plane::lease::Lease;
    let api = outrigger_tests::fake_kube::FakeApiServer::empty("cp-token").await;
    let lease = |holder: &str| {
        Lease::new(
            api.client().client,
            "outrigger",
            "outrigger-status-writer",
            holder,
            Duration::from_secs(1),
        )
    };
    let (a, b) = (lease("cp-a"), lease("cp-b"));
    assert!(a.try_acquire().await);
    assert!(a.is_leader());
    assert!(!b.try_acquire().await);
    assert!(!b.is_leader());
    // a renews: still a's.
    assert!(a.try_acquire().await);
    assert!(!b.try_acquire().await);
    // a stops renewing; once its claim has lapsed, b takes it, and a knows it lost.
    eventually(
        "b takes the lapsed lease",
        Duration::from_secs(10),
        || async { b.try_acquire().await.then_some(()) },
    )
    .await;
    assert!(!a.is_leader());
    assert!(!a.try_acquire().await);
    assert!(b.is_leader());
}
