//! mTLS interop with a real Envoy 1.40 holding a certificate from our CA, both ways, with
//! each side checking the other's SPIFFE ID:
//! - client → Envoy (outbound, originates mTLS) → our inbound proxy → app;
//! - client → our outbound proxy (originates mTLS) → Envoy (inbound, terminates) → app.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use outrigger_control_plane::ca::{Ca, DEFAULT_LIFETIME};
use outrigger_core::spiffe::SpiffeId;
use outrigger_tests::clients::TestClient;
use outrigger_tests::envoy::Envoy;
use outrigger_tests::{
    TestProxy, eventually, free_addr, identity_yaml, temp_path, upstreams, write_identity,
};

const ENVOY_ID: &str = "spiffe://mesh.test/ns/edge/sa/envoy";
const OURS: &str = "spiffe://mesh.test/ns/shop/sa/api";

/// Writes `cert.pem`, `key.pem` and `bundle.pem` for `id` into a new directory.
fn issue(ca: &Ca, id: &str) -> std::path::PathBuf {
    let (chain, key) = ca
        .issue(&SpiffeId::parse(id).unwrap(), DEFAULT_LIFETIME)
        .unwrap();
    write_identity(&chain, &key, ca.bundle_pem())
}

/// Envoy's TLS context: its certificate, our CA, and the one peer identity it accepts.
fn common_tls(dir: &Path, peer: &str, alpn: &str) -> String {
    format!(
        r#"common_tls_context:
                    alpn_protocols: [{alpn}]
                    tls_certificates:
                      - certificate_chain: {{filename: {d}/cert.pem}}
                        private_key: {{filename: {d}/key.pem}}
                    validation_context:
                      trusted_ca: {{filename: {d}/bundle.pem}}
                      match_typed_subject_alt_names:
                        - san_type: URI
                          matcher: {{exact: "{peer}"}}"#,
        d = dir.display()
    )
}

/// Envoy with two listeners: `outbound` sends to our inbound proxy over mTLS (HTTP/2), and
/// `inbound` terminates mTLS and hands the caller's identity to the app in XFCC.
fn envoy_config(dir: &Path, ours: SocketAddr, app: SocketAddr, listen: [SocketAddr; 2]) -> String {
    let hcm = |name: &str, cluster: &str, extra: &str| {
        format!(
            r#"- name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: {name}
                codec_type: AUTO
{extra}                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"#
        )
    };
    let addr = |a: SocketAddr| {
        format!(
            "{{socket_address: {{address: 127.0.0.1, port_value: {}}}}}",
            a.port()
        )
    };
    format!(
        r#"static_resources:
  listeners:
    - name: outbound
      address: {out_addr}
      filter_chains:
        - filters:
            {out_hcm}
    - name: inbound
      address: {in_addr}
      filter_chains:
        - transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              require_client_certificate: true
              {down_tls}
          filters:
            {in_hcm}
  clusters:
    - name: ours
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{http2_protocol_options: {{}}}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          {up_tls}
      load_assignment:
        cluster_name: ours
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {ours_addr}}}}}]}}]
    - name: app
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: app
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {app_addr}}}}}]}}]
"#,
        out_addr = addr(listen[0]),
        in_addr = addr(listen[1]),
        out_hcm = hcm("outbound", "ours", ""),
        in_hcm = hcm(
            "inbound",
            "app",
            r#"                forward_client_cert_details: SANITIZE_SET
                set_current_client_cert_details: {uri: true}
"#
        ),
        down_tls = common_tls(dir, OURS, "h2, http/1.1")
            .replace("\n                  ", "\n              "),
        up_tls = common_tls(dir, OURS, "h2").replace("\n                  ", "\n          "),
        ours_addr = addr(ours),
        app_addr = addr(app),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_our_proxy_speak_mtls_both_ways_checking_identities() {
    let ca = Ca::generate("mesh.test").unwrap();
    let (envoy_dir, our_dir) = (issue(&ca, ENVOY_ID), issue(&ca, OURS));
    let app = upstreams::http("app").await;

    // Ours: an inbound listener (strict mTLS, only Envoy's identity allowed) and an outbound
    // listener whose cluster is Envoy's inbound side.
    let envoy_listen = [free_addr(), free_addr()];
    let ours = TestProxy::start(&format!(
        r#"{}listeners:
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
    tls: {{mode: strict}}
    authorization: {{allow: ["{ENVOY_ID}"]}}
    virtual_hosts:
      - name: app
        domains: ['*']
        routes: [{{backends: [{{cluster: app}}]}}]
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    virtual_hosts:
      - name: envoy
        domains: ['*']
        routes: [{{backends: [{{cluster: envoy}}]}}]
clusters:
  - name: app
    endpoints: [{{address: "{}"}}]
  - name: envoy
    tls: {{identities: ["{ENVOY_ID}"]}}
    endpoints: [{{address: "{}"}}]
"#,
        identity_yaml(&our_dir),
        app.addr,
        envoy_listen[1]
    ))
    .await;

    let config = temp_path("envoy-mtls.yaml");
    std::fs::write(
        &config,
        envoy_config(&envoy_dir, ours.addr("inbound"), app.addr, envoy_listen),
    )
    .unwrap();
    let _envoy = Envoy::start(&config);

    // Envoy → ours: our inbound side sees Envoy's SPIFFE ID, and Envoy checked ours.
    let via_envoy = TestClient::http1(envoy_listen[0]);
    let r = eventually("Envoy serves", Duration::from_secs(30), || {
        let c = via_envoy.clone();
        async move { c.get("app", "/").await.ok().filter(|r| r.status == 200) }
    })
    .await;
    assert_eq!(
        r.header("x-echo-x-outrigger-client-id"),
        Some(ENVOY_ID),
        "{r:?}"
    );

    // Ours → Envoy: Envoy sees our SPIFFE ID (in XFCC), and we checked Envoy's.
    let r = TestClient::http1(ours.addr("outbound"))
        .get("app", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let xfcc = r
        .header("x-echo-x-forwarded-client-cert")
        .unwrap_or_default();
    assert!(xfcc.contains(&format!("URI={OURS}")), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_refuses_our_proxy_with_an_identity_it_does_not_expect() {
    let ca = Ca::generate("mesh.test").unwrap();
    let envoy_dir = issue(&ca, ENVOY_ID);
    // Our proxy runs as someone Envoy does not accept.
    let stranger = issue(&ca, "spiffe://mesh.test/ns/shop/sa/stranger");
    let app = upstreams::http("app").await;
    let envoy_listen = [free_addr(), free_addr()];
    let ours = TestProxy::start(&format!(
        r#"{}listeners:
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    virtual_hosts:
      - name: envoy
        domains: ['*']
        routes: [{{backends: [{{cluster: envoy}}]}}]
clusters:
  - name: envoy
    tls: {{identities: ["{ENVOY_ID}"]}}
    endpoints: [{{address: "{}"}}]
"#,
        identity_yaml(&stranger),
        envoy_listen[1]
    ))
    .await;
    let config = temp_path("envoy-mtls.yaml");
    std::fs::write(
        &config,
        envoy_config(&envoy_dir, free_addr(), app.addr, envoy_listen),
    )
    .unwrap();
    let _envoy = Envoy::start(&config);
    let client = TestClient::http1(ours.addr("outbound"));
    // Once Envoy listens, every attempt fails at the handshake, never reaching the app.
    let r = eventually(
        "Envoy answers the handshake",
        Duration::from_secs(30),
        || {
            let c = client.clone();
            async move {
                let r = c.get("app", "/").await.ok()?;
                (!r.body.contains("Connection refused")).then_some(r)
            }
        },
    )
    .await;
    assert!([502, 503].contains(&r.status.as_u16()), "{r:?}");
}
