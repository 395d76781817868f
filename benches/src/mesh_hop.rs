//! The "mesh hop" scenario: client → outbound sidecar → mTLS → inbound sidecar → server,
//! ours against two Envoys configured the same way, every proxy on one worker, with the same
//! certificates from our CA.
//!
//! Reported per pair: requests/s, p50 and p99 (h2load at a fixed rate and at maximum), CPU
//! µs per request summed over both proxies, and the inbound side's mTLS handshake rate (new
//! connections with a client certificate, as fast as four clients can make them).
//!
//! With Envoy, one more row in the same run: a single Envoy doing plain HTTP/1.1 straight to
//! the server, the bar a whole mTLS hop of ours should cost less than.
//!
//! `outrigger-bench mesh-hop [--duration SECONDS] [--rate RPS]`

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outrigger_control_plane::ca::{Ca, DEFAULT_LIFETIME};
use outrigger_core::spiffe::SpiffeId;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;

use crate::{
    RunArgs, Scenario, Target, cpu_seconds, fixed_rate, free_port, run_args, run_h2load,
    spawn_envoy, spawn_outrigger, start_upstream, wait_for_port, write_json,
};

const CLIENT_ID: &str = "spiffe://bench.test/ns/bench/sa/client";
const SERVER_ID: &str = "spiffe://bench.test/ns/bench/sa/server";

fn issue(ca: &Ca, id: &str, dir: &Path) -> PathBuf {
    let out = dir.join(id.rsplit('/').next().unwrap());
    std::fs::create_dir_all(&out).unwrap();
    let (chain, key) = ca
        .issue(&SpiffeId::parse(id).unwrap(), DEFAULT_LIFETIME)
        .unwrap();
    std::fs::write(out.join("cert.pem"), chain).unwrap();
    std::fs::write(out.join("key.pem"), key).unwrap();
    std::fs::write(out.join("bundle.pem"), ca.bundle_pem()).unwrap();
    out
}

fn identity_block(dir: &Path) -> String {
    format!(
        "identity:\n  cert: {0}/cert.pem\n  key: {0}/key.pem\n  bundle: {0}/bundle.pem\n",
        dir.display()
    )
}

fn ours_inbound(ids: &Path, addr: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        "{}workers: 1\nlisteners:\n  - name: inbound\n    address: {addr}\n    direction: inbound\n    tls: {{mode: strict}}\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes: [{{backends: [{{cluster: app}}]}}]\nclusters:\n  - name: app\n    endpoints: [{{address: \"{upstream}\"}}]\n",
        identity_block(ids)
    )
}

fn ours_outbound(ids: &Path, addr: SocketAddr, inbound: SocketAddr) -> String {
    format!(
        "{}workers: 1\nlisteners:\n  - name: outbound\n    address: {addr}\n    direction: outbound\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes: [{{backends: [{{cluster: peer}}]}}]\nclusters:\n  - name: peer\n    tls: {{identities: [\"{SERVER_ID}\"]}}\n    endpoints: [{{address: \"{inbound}\"}}]\n",
        identity_block(ids)
    )
}

fn socket(a: SocketAddr) -> String {
    format!(
        "{{socket_address: {{address: 127.0.0.1, port_value: {}}}}}",
        a.port()
    )
}

fn envoy_tls(ids: &Path, peer: &str, alpn: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    format!(
        "common_tls_context:\n{pad}  alpn_protocols: [{alpn}]\n{pad}  tls_certificates: [{{certificate_chain: {{filename: {d}/cert.pem}}, private_key: {{filename: {d}/key.pem}}}}]\n{pad}  validation_context:\n{pad}    trusted_ca: {{filename: {d}/bundle.pem}}\n{pad}    match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: \"{peer}\"}}}}]",
        d = ids.display()
    )
}

fn envoy(listen: SocketAddr, downstream_tls: Option<String>, cluster: String) -> String {
    let admin = free_port();
    let tls = downstream_tls.map_or(String::new(), |t| {
        format!(
            "          transport_socket:\n            name: envoy.transport_sockets.tls\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n              require_client_certificate: true\n              {t}\n"
        )
    });
    format!(
        r#"admin:
  address: {admin}
static_resources:
  listeners:
    - name: bench
      address: {listen}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: bench
                codec_type: AUTO
                route_config:
                  virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: next}}}}]}}]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
{tls}  clusters:
{cluster}"#,
        admin = socket(admin),
        listen = socket(listen),
    )
}

fn envoy_cluster(to: SocketAddr, upstream_tls: Option<String>) -> String {
    let tls = upstream_tls.map_or(String::new(), |t| {
        format!(
            "      typed_extension_protocol_options:\n        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n          \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n          explicit_http_config: {{http2_protocol_options: {{}}}}\n      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n          {t}\n"
        )
    });
    format!(
        "    - name: next\n      type: STATIC\n      connect_timeout: 1s\n{tls}      load_assignment: {{cluster_name: next, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {}}}}}]}}]}}\n",
        socket(to)
    )
}

/// mTLS handshakes per second against `addr`, four at a time, for `for_how_long`.
fn handshake_rate(addr: SocketAddr, client: &Path, for_how_long: Duration) -> f64 {
    let certs = CertificateDer::pem_file_iter(client.join("cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(client.join("key.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_file_iter(client.join("bundle.pem")).unwrap() {
        roots.add(root.unwrap()).unwrap();
    }
    // The bench trusts the server by chain only: its SPIFFE ID is not what is measured.
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        outrigger_core::tls::provider(),
    )
    .build()
    .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(outrigger_core::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
        .with_client_auth_cert(certs, key)
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let done = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (connector, done) = (connector.clone(), done.clone());
                tokio::spawn(async move {
                    while started.elapsed() < for_how_long {
                        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                            continue;
                        };
                        let name = ServerName::IpAddress(addr.ip().into());
                        if connector.connect(name, tcp).await.is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// WebPKI chain verification without the DNS-name check an SVID cannot pass.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The proxies a scenario goes through: the client's, and the server's when there is a hop.
struct Pair {
    name: &'static str,
    outbound: Target,
    inbound: Option<Target>,
}

pub fn run(raw: &[String]) {
    let args = run_args(raw);
    let dir = args.scratch("hop");
    let RunArgs {
        duration,
        rate,
        proxy_bin,
        envoy_bin,
        out_dir,
        ..
    } = args;
    let out_dir = out_dir.as_path();
    let ca = Ca::generate("bench.test").unwrap();
    let (client_ids, server_ids) = (issue(&ca, CLIENT_ID, &dir), issue(&ca, SERVER_ID, &dir));
    let upstream = start_upstream();
    wait_for_port(upstream);

    let mut pairs = Vec::new();
    let (inb, outb) = (free_port(), free_port());
    let inbound = spawn_outrigger(
        &proxy_bin,
        &ours_inbound(&server_ids, inb, upstream),
        inb,
        &dir.join("ours-in.yaml"),
    );
    let outbound = spawn_outrigger(
        &proxy_bin,
        &ours_outbound(&client_ids, outb, inb),
        outb,
        &dir.join("ours-out.yaml"),
    );
    pairs.push(Pair {
        name: "outrigger",
        outbound,
        inbound: Some(inbound),
    });
    if let Some(envoy_bin) = &envoy_bin {
        let (inb, outb) = (free_port(), free_port());
        let inbound = spawn_envoy(
            envoy_bin,
            &envoy(
                inb,
                Some(envoy_tls(&server_ids, CLIENT_ID, "h2, http/1.1", 14)),
                envoy_cluster(upstream, None),
            ),
            inb,
            &dir.join("envoy-in.yaml"),
        );
        let outbound = spawn_envoy(
            envoy_bin,
            &envoy(
                outb,
                None,
                envoy_cluster(inb, Some(envoy_tls(&client_ids, SERVER_ID, "h2", 10))),
            ),
            outb,
            &dir.join("envoy-out.yaml"),
        );
        pairs.push(Pair {
            name: "envoy",
            outbound,
            inbound: Some(inbound),
        });
        let plain = free_port();
        let outbound = spawn_envoy(
            envoy_bin,
            &envoy(plain, None, envoy_cluster(upstream, None)),
            plain,
            &dir.join("envoy-plain.yaml"),
        );
        pairs.push(Pair {
            name: "envoy plain",
            outbound,
            inbound: None,
        });
    }

    let d = duration.to_string();
    let scenarios = [
        fixed_rate("mesh hop fixed rate", rate, duration),
        Scenario {
            name: "mesh hop max",
            h2load: ["--h1", "-c", "50", "-t", "1", "-D", &d]
                .map(String::from)
                .to_vec(),
            fixed_rate: false,
        },
    ];
    let mut rows = Vec::new();
    let mut table = format!(
        "{:<20} {:<12} {:>9} {:>9} {:>9} {:>16} {:>7}\n",
        "scenario", "target", "req/s", "p50 ms", "p99 ms", "cpu µs/req (2×)", "failed"
    );
    for pair in &pairs {
        std::thread::sleep(Duration::from_millis(500));
        let warm = std::process::Command::new("h2load")
            .args(["--h1", "-c", "10", "-n", "2000"])
            .arg(format!("http://{}/", pair.outbound.addr))
            .output();
        assert!(warm.is_ok(), "h2load is installed");
        for scenario in &scenarios {
            eprintln!("running {} through {}", scenario.name, pair.name);
            let pid_in = pair
                .inbound
                .as_ref()
                .and_then(|t| t.child.as_ref())
                .map(|c| c.id());
            let in_before = pid_in.map_or(0.0, cpu_seconds);
            let m = run_h2load(scenario, &pair.outbound, &dir.join("h2load.log"));
            let in_cpu = pid_in.map_or(0.0, cpu_seconds) - in_before;
            let cpu = m
                .cpu_us_per_req
                .map(|out| out + in_cpu * 1e6 / m.requests.max(1) as f64);
            table.push_str(&format!(
                "{:<20} {:<12} {:>9.0} {:>9.3} {:>9.3} {:>16} {:>7}\n",
                scenario.name,
                pair.name,
                m.rps,
                m.p50_ms,
                m.p99_ms,
                cpu.map_or("-".into(), |c| format!("{c:.1}")),
                m.failed
            ));
            rows.push(json!({
                "scenario": scenario.name,
                "target": pair.name,
                "requests": m.requests,
                "failed": m.failed,
                "rps": m.rps,
                "p50_ms": m.p50_ms,
                "p99_ms": m.p99_ms,
                "cpu_us_per_request_both_proxies": cpu,
                "h2load_args": scenario.h2load.join(" "),
            }));
        }
        let Some(inbound) = &pair.inbound else {
            continue;
        };
        let pid_in = inbound.child.as_ref().map(|c| c.id()).unwrap();
        let before = cpu_seconds(pid_in);
        let window = Duration::from_secs(duration.clamp(1, 5));
        let rate = handshake_rate(inbound.addr, &client_ids, window);
        let cpu_per = (cpu_seconds(pid_in) - before) * 1e6 / (rate * window.as_secs_f64()).max(1.0);
        table.push_str(&format!(
            "{:<20} {:<12} {:>9.0} {:>9} {:>9} {:>16} {:>7}\n",
            "mTLS handshakes/s",
            pair.name,
            rate,
            "-",
            "-",
            format!("{cpu_per:.0} (inbound)"),
            "-"
        ));
        rows.push(json!({
            "scenario": "mtls handshakes",
            "target": pair.name,
            "handshakes_per_second": rate,
            "inbound_cpu_us_per_handshake": cpu_per,
        }));
    }
    println!("\n{table}");
    let doc = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "duration_s": duration,
        "fixed_rate_rps": rate,
        "rows": rows,
    });
    write_json(out_dir, "mesh-hop.json", &doc);
    let _ = std::fs::remove_dir_all(&dir);
}
