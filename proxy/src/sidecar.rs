//! The proxy's config as an injected sidecar, made from the pod's facts instead of a file
//! the user writes: who the pod is (namespace, service account), which ports its app
//! serves, and where the control plane is.
//!
//! The result is an ordinary config file, so a sidecar goes through exactly the validation
//! and reload paths that a hand-written config does, and `/config` shows what it runs.

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::config::file::TlsMode;

pub struct Sidecar {
    /// The control plane's CA, on its TLS port (the proxy has no certificate yet, so the CA
    /// proves itself and the proxy proves itself with its token).
    pub ca: SocketAddr,
    /// The CA's root, mounted out of band; `None` only for plaintext local development.
    pub ca_trust_anchor: Option<String>,
    /// The control plane's xDS over mTLS.
    pub xds: SocketAddr,
    /// The SPIFFE ID the control plane must prove on the xDS stream.
    pub control_plane_identity: String,
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    /// The service this workload belongs to: the node's cluster in xDS.
    pub service: String,
    pub pod_name: String,
    pub token_file: String,
    /// The app's ports; an inbound connection to one of them reaches it on loopback.
    pub app_ports: Vec<u16>,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    pub inbound_tls: TlsMode,
    /// Listen on `[::]` (both families) rather than `0.0.0.0`: where the pod has IPv6.
    pub dual_stack: bool,
}

/// Whether this network namespace can listen on IPv6 (a pod may have it switched off).
pub fn ipv6_available() -> bool {
    std::net::TcpListener::bind("[::]:0").is_ok()
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot resolve `{address}`: {reason}")]
    Failed { address: String, reason: String },
    #[error("`{0}` resolves to no address")]
    NoAddress(String),
}

/// Resolves `host:port` (a Service's DNS name in Kubernetes), retrying while DNS is not yet
/// up: a pod's network can come up a moment after its first container starts.
pub fn resolve(address: &str, deadline: Duration) -> Result<SocketAddr, ResolveError> {
    let until = std::time::Instant::now() + deadline;
    loop {
        match address.to_socket_addrs() {
            Ok(mut addrs) => {
                if let Some(a) = addrs.next() {
                    return Ok(a);
                }
            }
            Err(e) if std::time::Instant::now() >= until => {
                return Err(ResolveError::Failed {
                    address: address.to_string(),
                    reason: e.to_string(),
                });
            }
            Err(_) => {}
        }
        if std::time::Instant::now() >= until {
            return Err(ResolveError::NoAddress(address.to_string()));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

impl Sidecar {
    pub fn config_yaml(&self) -> String {
        let id = format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        );
        let mode = self.inbound_tls.as_str();
        // Dual stack: one socket takes both families (IPv4 arrives as ::ffff:a.b.c.d).
        let any = if self.dual_stack { "[::]" } else { "0.0.0.0" };
        let mut y = String::new();
        let _ = writeln!(y, "admin: {{address: \"{any}:{}\"}}", self.admin_port);
        let trust = match &self.ca_trust_anchor {
            Some(file) => format!(
                "trust_anchor: \"{file}\", server_id: \"{}\"",
                self.control_plane_identity
            ),
            None => "plaintext: true".into(),
        };
        let _ = writeln!(
            y,
            "identity:\n  ca: {{address: \"{}\", token_file: \"{}\", id: \"{id}\", {trust}}}",
            self.ca, self.token_file
        );
        let _ = writeln!(
            y,
            "xds:\n  address: \"{}\"\n  node: \"{}.{}\"\n  service: \"{}\"\n  identity: \"{}\"",
            self.xds, self.pod_name, self.namespace, self.service, self.control_plane_identity
        );
        let _ = writeln!(
            y,
            "listeners:\n  - name: outbound\n    address: \"{any}:{}\"\n    direction: outbound\n    original_destination: true\n    rds: outbound",
            self.outbound_port
        );
        let _ = writeln!(
            y,
            "  - name: inbound\n    address: \"{any}:{}\"\n    direction: inbound\n    original_destination: true\n    tls: {{mode: {mode}}}\n    lds: inbound\n    virtual_hosts:",
            self.inbound_port
        );
        for port in &self.app_ports {
            let _ = writeln!(
                y,
                "      - name: app-{port}\n        domains: [\":{port}\"]\n        routes:\n          - backends: [{{cluster: app-{port}}}]"
            );
        }
        if self.app_ports.is_empty() {
            y.push_str("      []\n");
        }
        y.push_str("clusters:\n");
        for port in &self.app_ports {
            let _ = writeln!(
                y,
                "  - name: app-{port}\n    endpoints: [{{address: \"127.0.0.1:{port}\"}}]"
            );
        }
        if self.app_ports.is_empty() {
            y.push_str("  []\n");
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::snapshot::RuntimeConfig;

    fn sample(ports: Vec<u16>) -> Sidecar {
        Sidecar {
            ca: "10.96.0.20:15012".parse().unwrap(),
            ca_trust_anchor: Some("/var/run/outrigger/ca-root/root-cert.pem".into()),
            xds: "10.96.0.20:15012".parse().unwrap(),
            control_plane_identity: "spiffe://cluster.local/ns/outrigger-system/sa/outrigger"
                .into(),
            trust_domain: "cluster.local".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            service: "web".into(),
            pod_name: "web-7d9f".into(),
            token_file: "/var/run/secrets/outrigger/token".into(),
            app_ports: ports,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15020,
            inbound_tls: TlsMode::Permissive,
            dual_stack: true,
        }
    }

    #[test]
    fn the_generated_config_is_a_valid_config() {
        for ports in [vec![8080, 9090], vec![]] {
            let yaml = sample(ports).config_yaml();
            let built = RuntimeConfig::build("sidecar", &yaml, 1, None);
            assert!(built.is_ok(), "{yaml}\n{}", built.err().unwrap());
        }
    }

    #[test]
    fn each_app_port_has_its_route() {
        let yaml = sample(vec![8080, 9090]).config_yaml();
        assert!(yaml.contains("domains: [\":9090\"]"), "{yaml}");
        assert!(yaml.contains("address: \"127.0.0.1:9090\""), "{yaml}");
        assert!(
            yaml.contains("spiffe://cluster.local/ns/shop/sa/web"),
            "{yaml}"
        );
    }
}
