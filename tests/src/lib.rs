//! Test support: real upstream servers on loopback, a proxy harness, and small clients.
//!
//! Every helper here speaks over real sockets. Waiting is always on a condition with a
//! deadline (`eventually`), never a bare sleep.

pub mod clients;
pub mod envoy;
pub mod fake_ads;
pub mod fake_kube;
pub mod faults;
pub mod kube;
pub mod mesh_traffic;
pub mod netns;
pub mod otlp;
pub mod upstreams;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outrigger_proxy::app::{self, ProxyHandle};

/// A proxy started in-process on a config file written for the test.
pub struct TestProxy {
    pub handle: ProxyHandle,
    pub config_path: PathBuf,
}

impl TestProxy {
    pub async fn start(yaml: &str) -> TestProxy {
        let config_path = temp_path("proxy.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        let handle = app::start(app::Options::new(config_path.clone()))
            .await
            .expect("proxy starts");
        TestProxy {
            handle,
            config_path,
        }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.handle.listener_addr(listener)
    }

    pub fn admin(&self) -> SocketAddr {
        self.handle
            .admin_addr
            .expect("config has an admin listener")
    }

    /// Writes a new config file; the proxy notices on its own (file watch).
    pub fn write_config(&self, yaml: &str) {
        // Write then rename, as editors and config-map updates do, so the watcher never
        // reads half a file.
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }
}

/// A binary of this workspace (`outrigger-proxy`, `outrigger-control-plane`), built by
/// `cargo build --bins` next to the test executables.
pub fn workspace_binary(name: &str) -> PathBuf {
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` first (scripts/test does)",
        bin.display()
    );
    bin
}

/// A loopback address that was free a moment ago, for a process that binds it itself.
///
/// The port is drawn below the kernel's ephemeral range (32768 and up by default): a port
/// the kernel hands to `bind(0)` and that is released again is soon handed to another test
/// binding port 0, while one from here is taken only by another draw of the same number.
pub fn free_addr() -> SocketAddr {
    loop {
        let port = fastrand::u16(20_000..32_000);
        if let Ok(socket) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return socket.local_addr().unwrap();
        }
    }
}

/// A fresh path in a per-process scratch directory.
pub fn temp_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("outrigger-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}-{name}", N.fetch_add(1, Ordering::Relaxed)))
}

/// Polls `check` until it returns `Some`, or panics with `what` after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > until {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the proxy behind `admin` reports `n` requests in flight to one endpoint.
pub async fn wait_in_flight(admin: SocketAddr, n: usize) {
    let needle = format!("\"outstanding\": {n}");
    eventually(
        &format!("{n} requests in flight"),
        Duration::from_secs(5),
        || {
            let needle = needle.clone();
            async move {
                clients::get(admin, "/config")
                    .await
                    .body
                    .contains(&needle)
                    .then_some(())
            }
        },
    )
    .await;
}

/// A proxy config that takes everything from a control plane: `xds` is the body of its
/// `xds:` block (`address: ...` and more, one per line), and one outbound listener follows
/// the `outbound` route table.
pub fn xds_config(xds: &str) -> String {
    format!(
        r#"admin:
  address: 127.0.0.1:0
xds:
{}
listeners:
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    rds: outbound
"#,
        indent(xds, 2)
    )
}

/// A proxy with one inbound listener (and an admin port) in front of `app`. `identity` is its
/// `identity:` block and `tls` the listener's `tls:` line, if any.
pub async fn inbound(identity: &str, app: SocketAddr, tls: &str) -> TestProxy {
    TestProxy::start(&format!(
        r#"{identity}admin:
  address: 127.0.0.1:0
listeners:
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
{tls}    virtual_hosts:
      - name: app
        domains: ['*']
        routes:
          - backends: [{{cluster: app}}]
clusters:
  - name: app
    endpoints: [{{address: "{app}"}}]
"#
    ))
    .await
}

/// `inbound`, in strict mTLS mode.
pub async fn strict_inbound(identity: &str, app: SocketAddr) -> TestProxy {
    inbound(identity, app, STRICT).await
}

/// The `tls:` line of a listener in strict mTLS mode.
pub const STRICT: &str = "    tls: {mode: strict}\n";

/// A minimal proxy config: one outbound listener with the given virtual hosts, plus
/// clusters, on ephemeral ports, with an admin listener.
pub fn config(virtual_hosts: &str, clusters: &str) -> String {
    format!(
        r#"admin:
  address: 127.0.0.1:0
listeners:
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    virtual_hosts:
{}
clusters:
{}
"#,
        indent(virtual_hosts, 6),
        indent(clusters, 2)
    )
}

pub fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{pad}{l}\n")
            }
        })
        .collect()
}

/// A cluster block for `config`.
pub fn cluster(name: &str, protocol: &str, endpoints: &[SocketAddr]) -> String {
    let mut s = format!(
        r#"- name: {name}
  protocol: {protocol}
  endpoints:
"#
    );
    for e in endpoints {
        s.push_str(&format!("    - address: {e}\n"));
    }
    s
}

/// The value of one series in a Prometheus text page (`name{labels}`, as printed), or 0.
pub fn metric(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Writes a workload's `cert.pem`, `key.pem` and `bundle.pem` to a new directory.
pub fn write_identity(chain_pem: &str, key_pem: &str, bundle_pem: &str) -> PathBuf {
    let dir = temp_path("identity");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), chain_pem).unwrap();
    std::fs::write(dir.join("key.pem"), key_pem).unwrap();
    std::fs::write(dir.join("bundle.pem"), bundle_pem).unwrap();
    dir
}

/// The proxy config's `identity:` line for files written by `write_identity`.
pub fn identity_yaml(dir: &std::path::Path) -> String {
    format!(
        "identity: {{cert: {0}/cert.pem, key: {0}/key.pem, bundle: {0}/bundle.pem}}\n",
        dir.display()
    )
}

/// A control plane in-process on loopback, serving a mesh file with `yaml` over plaintext
/// xDS only.
pub async fn control_plane(yaml: &str) -> outrigger_control_plane::app::ControlPlane {
    let mesh_path = temp_path("mesh.yaml");
    std::fs::write(&mesh_path, yaml).unwrap();
    outrigger_control_plane::app::start(outrigger_control_plane::app::Options {
        mesh_path,
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: Default::default(),
        load_reports: Default::default(),
    })
    .await
    .expect("the control plane starts")
}

/// A proxy following the control plane whose ADS is at `xds` (as node `web-1` of service
/// `web`), and a client of its outbound listener.
pub async fn xds_proxy(xds: SocketAddr) -> (TestProxy, clients::TestClient) {
    let proxy = TestProxy::start(&xds_config(&format!(
        "address: \"{xds}\"\nnode: web-1\nservice: web"
    )))
    .await;
    let client = clients::TestClient::http1(proxy.addr("outbound"));
    (proxy, client)
}
