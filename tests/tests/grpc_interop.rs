//! A real gRPC stack on both ends (grpcio, from the venv that scripts/test makes) talking
//! through the proxy: unary, bidirectional streaming, an error status, and trailing metadata.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use outrigger_tests::{TestProxy, cluster, config};

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
    let vhosts =
        "- name: grpc\n  domains: [grpc.test]\n  routes:\n    - backends: [{cluster: echo}]\n";
    let upstream = format!("127.0.0.1:{port}").parse().unwrap();
    let proxy = TestProxy::start(&config(vhosts, &cluster("echo", "http2", &[upstream]))).await;
    let target = proxy.addr("outbound").to_string();

    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script())
            .args(["client", &target, "grpc.test"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

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
