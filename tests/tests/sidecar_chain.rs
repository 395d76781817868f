//! Two sidecars in a row, as in a mesh: app → outbound listener → inbound listener → app.

use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::{TestProxy, indent, upstreams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_to_inbound_to_local_app() {
    let app = upstreams::http("orders").await;
    // The server side's sidecar: its inbound listener sends everything to the local app.
    let server_side = TestProxy::start(&format!(
        r#"admin:
  address: 127.0.0.1:0
listeners:
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
    virtual_hosts:
{}clusters:
  - name: local-app
    endpoints: [{{address: "{}"}}]
"#,
        indent(
            r#"- name: local
  domains: [orders.shop.svc]
  routes:
    - name: to-app
      backends: [{cluster: local-app}]
"#,
            6
        ),
        app.addr
    ))
    .await;
    // The client side's sidecar: its outbound listener knows `orders` lives behind that sidecar,
    // and speaks HTTP/2 to it whatever the app spoke.
    let client_side = TestProxy::start(&format!(
        r#"admin:
  address: 127.0.0.1:0
listeners:
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    virtual_hosts:
{}clusters:
  - name: orders
    protocol: http2
    endpoints: [{{address: "{}"}}]
"#,
        indent(
            r#"- name: orders
  domains: [orders, orders.shop.svc]
  routes:
    - name: orders
      backends: [{cluster: orders}]
"#,
            6
        ),
        server_side.addr("inbound")
    ))
    .await;

    let client = TestClient::http1(client_side.addr("outbound"));
    for _ in 0..5 {
        let r = client
            .send(
                http::Method::POST,
                "orders.shop.svc",
                "/orders?id=7",
                &[],
                "one coffee",
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "one coffee");
        assert_eq!(r.header("x-upstream"), Some("orders"));
        assert_eq!(
            r.header("x-echo-host"),
            Some("orders.shop.svc"),
            "the original host survives two hops"
        );
        assert_eq!(r.header("x-path"), Some("/orders?id=7"));
    }
    let out = get(client_side.admin(), "/metrics").await.body;
    assert!(
        out.contains(
            "outrigger_requests_total{direction=\"outbound\",route=\"orders\",status=\"200\",grpc_status=\"\",peer=\"\"} 5"
        ),
        "{out}"
    );
    let inb = get(server_side.admin(), "/metrics").await.body;
    assert!(
        inb.contains(
            "outrigger_requests_total{direction=\"inbound\",route=\"to-app\",status=\"200\",grpc_status=\"\",peer=\"\"} 5"
        ),
        "{inb}"
    );
    assert!(
        inb.contains("outrigger_connections_total{listener=\"inbound\",protocol=\"http2\"}"),
        "the hop between sidecars is HTTP/2: {inb}"
    );
}
