//! The mesh demo: the whole mesh on loopback. A control plane serves an
//! embedded mesh file over ADS to a sidecar proxy; four clients send traffic through the
//! sidecar to two versions of a service; halfway through, the demo edits the mesh file's
//! canary weights and the summary shows the sidecar follow.

use std::time::Duration;

use outrigger_proxy::app as proxy_app;
use outrigger_proxy::demo::{BoxError, demo_upstream, drive};

use outrigger_control_plane::app;

const MESH: &str = include_str!("demo-mesh.yaml");

pub async fn run(duration: Duration) -> Result<(), BoxError> {
    let v1 = demo_upstream("shop-v1").await?;
    let v2 = demo_upstream("shop-v2").await?;
    let dir = std::env::temp_dir().join(format!("outrigger-mesh-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mesh_path = dir.join("mesh.yaml");
    let mesh = MESH
        .replace("{V1}", &v1.to_string())
        .replace("{V2}", &v2.to_string());
    std::fs::write(&mesh_path, &mesh)?;

    let cp = app::start(app::Options {
        mesh_path: mesh_path.clone(),
        xds_address: "127.0.0.1:0".parse()?,
        admin_address: "127.0.0.1:0".parse()?,
        identity: Default::default(),
        // Reports every second, so that `stat` and the dashboard fill within the demo.
        load_reports: outrigger_control_plane::service_graph::Limits {
            interval: Duration::from_secs(1),
            ..Default::default()
        },
    })
    .await?;
    let proxy_path = dir.join("sidecar.yaml");
    std::fs::write(
        &proxy_path,
        format!(
            "admin:\n  address: 127.0.0.1:0\nxds:\n  address: \"{}\"\n  node: frontend-sidecar\n  service: frontend\nlisteners:\n  - name: outbound\n    address: 127.0.0.1:0\n    direction: outbound\n    rds: outbound\n",
            cp.xds_addr
        ),
    )?;
    let sidecar = proxy_app::start(proxy_app::Options::new(&proxy_path)).await?;
    let (outbound, admin) = (
        sidecar.listener_addr("outbound"),
        sidecar.admin_addr.ok_or("sidecar has admin")?,
    );
    // Traffic starts once the sidecar has its first config from the control plane.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !sidecar.is_ready() {
        if tokio::time::Instant::now() > deadline {
            return Err("the sidecar got no config from the control plane within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    println!("outrigger mesh demo");
    println!(
        "  control plane  xDS {}   status http://{}/status",
        cp.xds_addr, cp.admin_addr
    );
    println!(
        "  dashboard      http://{}/dashboard   (or: outrigger-control-plane stat edges --admin {})",
        cp.admin_addr, cp.admin_addr
    );
    println!(
        "  mesh file      {} (edit it while the demo runs)",
        mesh_path.display()
    );
    println!(
        "  sidecar        outbound {outbound}   admin http://{admin}/metrics  (routes from the control plane)"
    );
    println!("  upstreams      shop-v1 (HTTP/1.1) {v1}   shop-v2 (HTTP/2) {v2}");
    println!(
        "  traffic        4 clients → Host: shop   (canary 90/10, /slow times out at 100 ms, unknown host → 404)"
    );
    println!();

    let shift_at = (duration.as_secs() / 2).max(1);
    let mut shifted = false;
    drive(outbound, admin, "shop", duration, |secs| {
        if secs >= shift_at && !shifted {
            shifted = true;
            let edited = mesh.replace("weight: 90", "weight: 50").replace("weight: 10", "weight: 50");
            match std::fs::write(&mesh_path, edited) {
                Ok(()) => println!("       mesh file edited: canary 90/10 → 50/50; the control plane pushes it to the sidecar"),
                Err(e) => println!("       could not edit the mesh file: {e}"),
            }
        }
    })
    .await?;

    let status = cp.nodes.to_json();
    let routes = &status["frontend-sidecar"]["types"]["RouteConfiguration"];
    println!(
        "\nfrom the control plane (/status): the sidecar ACKed route version {} (NACKs: {})",
        routes["acked_version"].as_str().unwrap_or("none"),
        routes["nacks"]
    );
    println!("from the service graph (stat edges, last 10 s):");
    for e in cp.graph.edges(Duration::from_secs(10)) {
        println!(
            "  {} → {}: {:.1} rps, success {:.1} %, p99 {:.1} ms",
            e.caller,
            e.callee,
            e.signals.rps,
            e.signals.success_rate.unwrap_or(0.0) * 100.0,
            e.signals.p99_ms.unwrap_or(0.0)
        );
    }
    sidecar.drain(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
