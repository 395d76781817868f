//! Routing decisions and the proxy's own error responses, over real sockets.

use std::net::SocketAddr;

use http::Method;
use outrigger_tests::clients::{TestClient, raw_exchange};
use outrigger_tests::upstreams;
use outrigger_tests::{TestProxy, cluster, config};

async fn closed_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Method, path, request headers, and the upstream that should answer.
type Case<'a> = (Method, &'a str, &'a [(&'a str, &'a str)], &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_header_and_method_matching() {
    let (a, b, c, d, e) = (
        upstreams::http("exact").await,
        upstreams::http("regex").await,
        upstreams::http("canary").await,
        upstreams::http("writes").await,
        upstreams::http("default").await,
    );
    let vhosts = r#"- name: shop
  domains: ["shop.test"]
  routes:
    - name: exact
      match: {exact: /checkout}
      backends: [{cluster: exact}]
    - name: regex
      match: {regex: "/items/[0-9]+"}
      backends: [{cluster: regex}]
    - name: canary
      match: {prefix: /, headers: [{name: x-canary, exact: "yes"}]}
      backends: [{cluster: canary}]
    - name: writes
      match: {prefix: /, methods: [POST, delete]}
      backends: [{cluster: writes}]
    - name: default
      backends: [{cluster: default}]
"#;
    let clusters = [
        cluster("exact", "http1", &[a.addr]),
        cluster("regex", "http1", &[b.addr]),
        cluster("canary", "http1", &[c.addr]),
        cluster("writes", "http1", &[d.addr]),
        cluster("default", "http1", &[e.addr]),
    ]
    .concat();
    let proxy = TestProxy::start(&config(vhosts, &clusters)).await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let cases: &[Case] = &[
        (Method::GET, "/checkout", &[], "exact"),
        (Method::GET, "/checkout/more", &[], "default"),
        (Method::GET, "/items/42", &[], "regex"),
        (Method::GET, "/items/42x", &[], "default"),
        (Method::GET, "/anything", &[("x-canary", "yes")], "canary"),
        (Method::GET, "/anything", &[("x-canary", "no")], "default"),
        (Method::POST, "/anything", &[], "writes"),
        (Method::DELETE, "/anything", &[], "writes"),
        (Method::PUT, "/anything", &[], "default"),
    ];
    for (method, path, headers, want) in cases {
        let r = client
            .send(method.clone(), "shop.test", path, headers, "")
            .await
            .unwrap();
        assert_eq!(
            r.header("x-upstream"),
            Some(*want),
            "{method} {path} {headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_within_five_points() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let vhosts = r#"- name: web
  domains: [web.test]
  routes:
    - backends: [{cluster: v1, weight: 80}, {cluster: v2, weight: 20}]
"#;
    let proxy = TestProxy::start(&config(
        vhosts,
        &[
            cluster("v1", "http1", &[v1.addr]),
            cluster("v2", "http1", &[v2.addr]),
        ]
        .concat(),
    ))
    .await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let mut v2_count = 0;
    const N: usize = 2000;
    for _ in 0..N / 50 {
        let replies =
            futures_util::future::join_all((0..50).map(|_| client.get("web.test", "/"))).await;
        for r in replies {
            if r.unwrap().body == "v2" {
                v2_count += 1;
            }
        }
    }
    let share = v2_count as f64 / N as f64;
    assert!(
        (0.15..=0.25).contains(&share),
        "v2 got {:.1} % of {N}, want 20 ± 5",
        share * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_headers_are_rewritten() {
    let up = upstreams::http("app").await;
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - request_headers:
        set: [{name: x-added, value: "by-proxy"}]
        remove: [x-secret]
      response_headers:
        set: [{name: x-served-by, value: outrigger}]
        remove: [x-method]
      backends: [{cluster: app}]
"#;
    let proxy = TestProxy::start(&config(vhosts, &cluster("app", "http1", &[up.addr]))).await;
    let r = TestClient::http1(proxy.addr("outbound"))
        .send(
            Method::GET,
            "app.test",
            "/",
            &[("x-secret", "hunter2"), ("x-kept", "1")],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.header("x-echo-x-added"), Some("by-proxy"));
    assert_eq!(r.header("x-echo-x-secret"), None);
    assert_eq!(r.header("x-echo-x-kept"), Some("1"));
    assert_eq!(r.header("x-served-by"), Some("outrigger"));
    assert_eq!(r.header("x-method"), None);
}

fn assert_synthetic(r: &outrigger_tests::clients::Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.header("x-outrigger-error"), Some(code), "{r:?}");
    assert!(
        r.body.starts_with("outrigger: "),
        "body says the proxy made it: {:?}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_404_503_504() {
    let up = upstreams::http("app").await;
    let dead = closed_port().await;
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - match: {prefix: /slow}
      timeout: 200ms
      backends: [{cluster: app}]
    - match: {prefix: /api}
      backends: [{cluster: app}]
- name: dead
  domains: [dead.test]
  routes:
    - backends: [{cluster: dead}]
- name: empty
  domains: [empty.test]
  routes:
    - backends: [{cluster: empty}]
"#;
    let clusters = [
        cluster("app", "http1", &[up.addr]),
        cluster("dead", "http1", &[dead]),
        r#"- name: empty
  endpoints: []
"#
        .to_string(),
    ]
    .concat();
    let proxy = TestProxy::start(&config(vhosts, &clusters)).await;
    for client in [
        TestClient::http1(proxy.addr("outbound")),
        TestClient::http2(proxy.addr("outbound")).await,
    ] {
        assert_synthetic(
            &client.get("nobody.test", "/").await.unwrap(),
            404,
            "no-route",
        );
        assert_synthetic(
            &client.get("app.test", "/elsewhere").await.unwrap(),
            404,
            "no-route",
        );
        assert_synthetic(
            &client.get("dead.test", "/").await.unwrap(),
            503,
            "connect-failed",
        );
        assert_synthetic(
            &client.get("empty.test", "/").await.unwrap(),
            503,
            "no-endpoint",
        );
        let started = std::time::Instant::now();
        assert_synthetic(
            &client.get("app.test", "/slow/3000").await.unwrap(),
            504,
            "timeout",
        );
        assert!(
            started.elapsed() < std::time::Duration::from_millis(2500),
            "the route timeout, not the upstream, ended it"
        );
        assert_eq!(
            client.get("app.test", "/api").await.unwrap().status,
            200,
            "the connection still works"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_cost_nothing_else() {
    let up = upstreams::http("app").await;
    let vhosts = r#"- name: app
  domains: ["*"]
  routes:
    - backends: [{cluster: app}]
"#;
    let proxy = TestProxy::start(&config(vhosts, &cluster("app", "http1", &[up.addr]))).await;
    let addr = proxy.addr("outbound");

    let no_host = raw_exchange(addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(no_host.starts_with("HTTP/1.1 400"), "{no_host}");
    assert!(
        no_host
            .to_ascii_lowercase()
            .contains("x-outrigger-error: bad-request"),
        "{no_host}"
    );

    let two_hosts = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(two_hosts.starts_with("HTTP/1.1 400"), "{two_hosts}");

    let garbage_header = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nthis is not a header\r\n\r\n",
    )
    .await;
    assert!(
        garbage_header.starts_with("HTTP/1.1 400"),
        "{garbage_header}"
    );

    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nx-big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let too_big = raw_exchange(addr, huge.as_bytes()).await;
    assert!(
        too_big.starts_with("HTTP/1.1 431"),
        "header size limit: {}",
        &too_big[..too_big.len().min(80)]
    );

    // A client that hangs up halfway through its body costs only its own request.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nonly-part")
            .await
            .unwrap();
    }
    let r = TestClient::http1(addr)
        .get("app.test", "/after")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}
