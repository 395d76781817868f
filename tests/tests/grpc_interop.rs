//! A real gRPC stack on both ends (grpcio, from the venv that scripts/test makes): through the
//! proxy, and proxyless with an `xds:///` target resolved by our control plane. Each run
//! covers unary, bidirectional streaming, an error status, and trailing metadata.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use outrigger_tests::{TestProxy, cluster, config, temp_path};

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let python = std::env::var_os("OUTRIGGER_PYTHON").map_or(venv, PathBuf::from);
    assert!(
        python.exists(),
        "{} is missing: scripts/test makes the venv with grpcio (or set OUTRIGGER_PYTHON)",
        python.display()
    );
    python
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/grpc_echo.py")
}

/// The grpcio server; it stops when its stdin closes, i.e. when this is dropped.
struct GrpcServer(Child);

impl Drop for GrpcServer {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server() -> (GrpcServer, u16) {
    let mut child = Command::new(python())
        .arg(script())
        .arg("server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("server said {line:?}"));
    (GrpcServer(child), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_client_and_server_through_the_proxy() {
    let (_server, port) = tokio::task::spawn_blocking(start_server).await.unwrap();
    let vhosts = r#"- name: grpc
  domains: [grpc.test]
  routes:
    - backends: [{cluster: echo}]
"#;
    let upstream = format!("127.0.0.1:{port}").parse().unwrap();
    let proxy = TestProxy::start(&config(vhosts, &cluster("echo", "http2", &[upstream]))).await;
    let target = proxy.addr("outbound").to_string();

    let out = run_client(&target, "grpc.test", None).await;
    assert_echo_calls(&out);
}

/// Runs the grpcio client; `bootstrap` is the xDS bootstrap file for `xds:///` targets.
async fn run_client(
    target: &str,
    authority: &str,
    bootstrap: Option<PathBuf>,
) -> serde_json::Value {
    let (target, authority) = (target.to_string(), authority.to_string());
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(python());
        cmd.arg(script()).args(["client", &target, &authority]);
        if let Some(b) = bootstrap {
            cmd.env("GRPC_XDS_BOOTSTRAP", b);
        }
        cmd.output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_echo_calls(v: &serde_json::Value) {
    assert_eq!(v["unary"]["reply"], "echo:hello");
    assert_eq!(v["unary"]["code"], "OK");
    assert_eq!(v["unary"]["trailers"]["x-trailer"], "kept");

    assert_eq!(
        v["bidi"]["got"],
        serde_json::json!(["echo:one", "echo:two", "echo:three"])
    );
    assert_eq!(v["bidi"]["code"], "OK");
    assert_eq!(v["bidi"]["trailers"]["x-trailer"], "kept");

    assert_eq!(v["fail"]["code"], "NOT_FOUND");
    assert_eq!(v["fail"]["details"], "no such thing");
    assert_eq!(v["fail"]["trailers"]["x-trailer"], "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_xds_client_resolves_through_the_control_plane() {
    let (_server, port) = tokio::task::spawn_blocking(start_server).await.unwrap();
    let mesh_path = temp_path("mesh.yaml");
    std::fs::write(
        &mesh_path,
        format!(
            r#"services:
  - name: echo
    protocol: grpc
    port: 50051
    endpoints: [{{address: "127.0.0.1:{port}"}}]
"#
        ),
    )
    .unwrap();
    let cp = outrigger_control_plane::app::start(outrigger_control_plane::app::Options {
        mesh_path,
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: Default::default(),
        load_reports: Default::default(),
    })
    .await
    .unwrap();
    let bootstrap = temp_path("grpc-bootstrap.json");
    std::fs::write(
        &bootstrap,
        serde_json::json!({
            "xds_servers": [{
                "server_uri": cp.xds_addr.to_string(),
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }],
            "node": {"id": "grpc-client", "cluster": "test", "locality": {}},
        })
        .to_string(),
    )
    .unwrap();
    // Both the short name and the full DNS name with its port resolve.
    for target in ["xds:///echo", "xds:///echo.default.svc.cluster.local:50051"] {
        let out = run_client(target, "-", Some(bootstrap.clone())).await;
        assert_echo_calls(&out);
    }
    let status = cp.nodes.to_json();
    assert_eq!(
        status["grpc-client"]["types"]["Listener"]["nacks"], 0,
        "{status}"
    );
    assert_eq!(
        status["grpc-client"]["types"]["Cluster"]["nacks"], 0,
        "{status}"
    );
}
