//! A small mesh with steady traffic, for the tests that read the service graph back: a
//! control plane whose proxies report load every second, sidecars that follow it, and load
//! generators with a known rate and share of failures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use outrigger_control_plane::app::{self, ControlPlane};
use outrigger_control_plane::service_graph::Limits;

use crate::clients::TestClient;
use crate::{TestProxy, eventually, temp_path, xds_config};

/// A control plane serving `yaml`, to which proxies report once a second, so that a test's
/// window fills in seconds.
pub async fn control_plane(yaml: &str) -> ControlPlane {
    let mesh_path = temp_path("mesh.yaml");
    std::fs::write(&mesh_path, yaml).unwrap();
    app::start(app::Options {
        mesh_path,
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: Default::default(),
        load_reports: Limits {
            interval: Duration::from_secs(1),
            ..Default::default()
        },
    })
    .await
    .expect("the control plane starts")
}

/// A sidecar of `service` following the control plane at `xds`, once a call through it to
/// `callee` goes through (it has its routes).
pub async fn sidecar(xds: SocketAddr, service: &str, callee: &str) -> TestProxy {
    let proxy = TestProxy::start(&xds_config(&format!(
        "address: \"{xds}\"\nnode: {service}-1\nservice: {service}"
    )))
    .await;
    let client = TestClient::http1(proxy.addr("outbound"));
    eventually(
        "the sidecar has its routes",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            async move { (client.get(callee, "/").await.ok()?.status == 200).then_some(()) }
        },
    )
    .await;
    proxy
}

/// Sends `rate` requests a second for `host` through `proxy` until the test ends; every
/// `fail_every`-th asks its upstream (a `faults::faulty` one) for a 500. Counts the answers.
pub fn load(proxy: SocketAddr, host: &'static str, rate: u32, fail_every: u32) -> Arc<AtomicU64> {
    let answered = Arc::new(AtomicU64::new(0));
    let counter = answered.clone();
    let client = TestClient::http1(proxy);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
        for n in 1u32.. {
            tick.tick().await;
            let path = if fail_every > 0 && n % fail_every == 0 {
                "/status/500"
            } else {
                "/"
            };
            let (client, counter) = (client.clone(), counter.clone());
            tokio::spawn(async move {
                if client.get(host, path).await.is_ok() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    answered
}

/// The mesh both graph tests drive: web → api 40/s and web → db 20/s, api → audit 30/s with
/// one request in ten failing, db → audit 10/s. Returns the control plane and what must live
/// as long as the traffic.
pub async fn four_edges() -> (ControlPlane, Vec<Box<dyn std::any::Any + Send>>) {
    let (api, _) = crate::faults::faulty("api").await;
    let (db, _) = crate::faults::faulty("db").await;
    let (audit, _) = crate::faults::faulty("audit").await;
    let cp = control_plane(&format!(
        r#"services:
  - name: web
    endpoints: [{{address: "127.0.0.1:9"}}]
  - name: api
    endpoints: [{{address: "{}"}}]
  - name: db
    endpoints: [{{address: "{}"}}]
  - name: audit
    endpoints: [{{address: "{}"}}]
"#,
        api.addr, db.addr, audit.addr
    ))
    .await;
    let web = sidecar(cp.xds_addr, "web", "api").await;
    let api_sidecar = sidecar(cp.xds_addr, "api", "audit").await;
    let db_sidecar = sidecar(cp.xds_addr, "db", "audit").await;
    load(web.addr("outbound"), "api", 40, 0);
    load(web.addr("outbound"), "db", 20, 0);
    load(api_sidecar.addr("outbound"), "audit", 30, 10);
    load(db_sidecar.addr("outbound"), "audit", 10, 0);
    let keep: Vec<Box<dyn std::any::Any + Send>> = vec![
        Box::new(api),
        Box::new(db),
        Box::new(audit),
        Box::new(web),
        Box::new(api_sidecar),
        Box::new(db_sidecar),
    ];
    (cp, keep)
}

/// The edge `caller` → `callee` of the control plane's service graph (admin at `admin`),
/// once load reports have made it.
pub async fn edge(admin: SocketAddr, caller: &str, callee: &str) -> serde_json::Value {
    let (caller, callee) = (caller.to_string(), callee.to_string());
    eventually(
        &format!("load reports make the edge {caller} -> {callee}"),
        Duration::from_secs(15),
        || {
            let (caller, callee) = (caller.clone(), callee.clone());
            async move {
                let page = crate::clients::get(admin, "/graph?window=30s").await.body;
                let graph: serde_json::Value = serde_json::from_str(&page).ok()?;
                graph["edges"]
                    .as_array()?
                    .iter()
                    .find(|e| e["caller"] == caller.as_str() && e["callee"] == callee.as_str())
                    .cloned()
            }
        },
    )
    .await
}
