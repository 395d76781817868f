//! Three "pods" in network namespaces, each an unmodified app beside our sidecar with the
//! `init` interception rules, and the control plane outside them. The apps call each other
//! by service address and never learn that a mesh is there.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use outrigger_control_plane::app;
use outrigger_tests::clients::TestClient;
use outrigger_tests::fake_kube::FakeApiServer;
use outrigger_tests::kube::{assert_typed, yaml_documents};
use outrigger_tests::netns::PodNetwork;
use outrigger_tests::{eventually, metric, temp_path, workspace_binary};

const PROXY_UID: u32 = 1337;
const APP_PORT: u16 = 8080;
const ADMIN_PORT: u16 = 15020;
const DB_PORT: u16 = 7000;

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

fn pod_app() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("interop/pod_app.py")
        .display()
        .to_string()
}

/// The one document of `yaml`, checked against its typed object.
fn typed(yaml: &str) -> serde_json::Value {
    let mut docs = yaml_documents(yaml);
    docs.iter().for_each(assert_typed);
    docs.remove(0)
}

/// The service VIP of pod number `i`: on no interface anywhere, like a ClusterIP.
fn vip(subnet: u8, i: u8) -> IpAddr {
    IpAddr::from([10, 251, subnet, 1 + i])
}

fn mesh(net: &PodNetwork, subnet: u8) -> String {
    let mut yaml = String::from(
        r#"mesh: {trust_domain: cluster.local}
services:
"#,
    );
    for (i, pod) in net.pods.iter().enumerate() {
        // b is reached over IPv6, whatever address family its callers dial.
        let endpoint = if pod.name == "b" {
            SocketAddr::new(pod.ip6.into(), APP_PORT)
        } else {
            SocketAddr::new(pod.ip.into(), APP_PORT)
        };
        yaml += &format!(
            r#"  - name: {name}
    port: {APP_PORT}
    mtls: true
    addresses: ["{vip}"]
    endpoints: [{{address: "{endpoint}"}}]
    tokens: [{{token: token-{name}}}]
"#,
            name = pod.name,
            vip = vip(subnet, i as u8),
        );
        if pod.name == "b" {
            yaml += r#"    policy:
      retry: {attempts: 2, on: [gateway-error]}
"#;
            // b also runs a server-first TCP service, reached straight (not intercepted).
            yaml += &format!(
                r#"  - name: b-db
    protocol: tcp
    port: {DB_PORT}
    addresses: ["{vip}"]
    endpoints: [{{address: "{ip}:{DB_PORT}"}}]
"#,
                vip = vip(subnet, 10),
                ip = pod.ip,
            );
        }
    }
    yaml
}

/// The sidecar's own file: its listeners and the local app; routes, clusters and its
/// certificate come from the control plane.
fn proxy_config(
    pod: &str,
    cp: SocketAddr,
    ca: SocketAddr,
    anchor: &std::path::Path,
    authorization: &str,
) -> String {
    let id = spiffe(pod);
    let anchor = anchor.display();
    [
        format!("admin: {{address: \"0.0.0.0:{ADMIN_PORT}\"}}"),
        format!(
            "identity:\n  ca: {{address: \"{ca}\", token: token-{pod}, id: \"{id}\", trust_anchor: \"{anchor}\"}}"
        ),
        format!("xds: {{address: \"{cp}\", node: {pod}-0, service: {pod}}}"),
        "listeners:".into(),
        r#"  - name: outbound
    address: "0.0.0.0:15001"
    direction: outbound"#.into(),
        "    original_destination: true\n    rds: outbound".into(),
        r#"  - name: inbound
    address: "0.0.0.0:15006"
    direction: inbound"#.into(),
        "    original_destination: true".into(),
        format!("    tls: {{mode: strict}}\n{authorization}    virtual_hosts:"),
        format!("      - name: app\n        domains: [':{APP_PORT}']"),
        "        routes:\n          - backends: [{cluster: app}]".into(),
        format!(r#"clusters:
  - name: app
    endpoints: [{{address: "127.0.0.1:{APP_PORT}"}}]"#),
    ]
    .join("\n")
        + "\n"
}

/// What the app in `pod` gets for `url`: the status and the JSON the other app answered.
fn app_get(net: &PodNetwork, pod: &str, url: &str) -> (String, serde_json::Value) {
    app_get_as(net, pod, url, None)
}

/// `app_get`, with the Host header set to `host` instead of the URL's.
fn app_get_as(
    net: &PodNetwork,
    pod: &str,
    url: &str,
    host: Option<&str>,
) -> (String, serde_json::Value) {
    let mut args = vec![pod_app(), "get".into(), url.to_string()];
    args.extend(host.map(str::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = net.exec(pod, "python3", &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, body) = text.split_once('\n').unwrap_or((&text, ""));
    let json = serde_json::from_str(body.trim()).unwrap_or(serde_json::Value::Null);
    (status.trim().to_string(), json)
}

async fn admin_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let r = TestClient::http1(addr)
        .get(&addr.to_string(), path)
        .await
        .ok()?;
    Some((r.status.as_u16(), r.body))
}

fn init(net: &PodNetwork, pod: &str, extra: &[&str]) {
    let proxy = workspace_binary("outrigger-proxy");
    let mut args = vec!["init", "--proxy-uid", "1337"];
    args.extend_from_slice(extra);
    let out = net.exec(pod, proxy.to_str().unwrap(), &args);
    assert!(
        out.status.success(),
        "init in {pod}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pod's nat table as `<save>` (`iptables-save`, `ip6tables-legacy-save`, …) prints it,
/// without comments or packet counters: only the rules.
fn nat_rules(net: &PodNetwork, pod: &str, save: &str) -> String {
    String::from_utf8_lossy(&net.exec(pod, save, &["-t", "nat"]).stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_in_pods_talk_mtls_through_their_sidecars() {
    pods_talk_through_their_sidecars("iptables-nft").await;
}

/// The same pods with the rules in the legacy backend: interception must work there too,
/// not just install.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_iptables_legacy() {
    pods_talk_through_their_sidecars("iptables-legacy").await;
}

async fn pods_talk_through_their_sidecars(backend: &str) {
    let subnet = 100 + (std::process::id() % 100) as u8;
    let mut net = PodNetwork::new(subnet, &["a", "b", "c"]);
    let mesh_path = temp_path("mesh.yaml");
    std::fs::write(&mesh_path, mesh(&net, subnet)).unwrap();
    let cp = app::start(app::Options {
        mesh_path,
        xds_address: SocketAddr::new(net.gateway.into(), 0),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: app::IdentityOptions {
            secure_xds_address: Some(SocketAddr::new(net.gateway.into(), 0)),
            ..Default::default()
        },
        load_reports: Default::default(),
    })
    .await
    .unwrap();
    // The cluster's API server, for the policy resources; the services are the file's.
    let kube = FakeApiServer::empty("cp-token").await;
    cp.watch_cluster(kube.client(), None);
    let xds_port = cp.xds_addr.port().to_string();
    let secure_xds = cp.secure_xds_addr.unwrap();
    // The CA's root, as the injector mounts it into each pod.
    let anchor = temp_path("ca-root.pem");
    std::fs::write(&anchor, cp.ca.load().bundle_pem()).unwrap();

    let proxy = workspace_binary("outrigger-proxy");
    for name in ["a", "b", "c"] {
        // As the injector runs it: only the app's declared ports are intercepted inbound.
        init(
            &net,
            name,
            &[
                "--iptables",
                backend,
                "--xds-port",
                &xds_port,
                "--inbound-ports",
                &APP_PORT.to_string(),
            ],
        );
        // Only b may call c.
        let authz = if name == "c" {
            format!(
                "    authorization: {{default: deny, allow: [\"{}\"]}}\n",
                spiffe("b")
            )
        } else {
            String::new()
        };
        let config = temp_path(&format!("{name}-proxy.yaml"));
        std::fs::write(
            &config,
            proxy_config(name, cp.xds_addr, secure_xds, &anchor, &authz),
        )
        .unwrap();
        let token = temp_path(&format!("{name}-token"));
        std::fs::write(&token, format!("token-{name}\n")).unwrap();
        let work_dir = temp_path(&format!("{name}-sidecar"));
        std::fs::create_dir_all(&work_dir).unwrap();
        // The proxy runs as its own user, which must be able to write its config there.
        std::process::Command::new("chown")
            .args(["1337", work_dir.to_str().unwrap()])
            .status()
            .unwrap();
        let (ca, xds) = (secure_xds.to_string(), secure_xds.to_string());
        let app_ports = APP_PORT.to_string();
        // a and b run exactly what the injector puts in a pod; c has a written file, for
        // its authorization rules.
        let argv: Vec<&str> = if name == "c" {
            vec![
                proxy.to_str().unwrap(),
                "run",
                "-c",
                config.to_str().unwrap(),
            ]
        } else {
            vec![
                proxy.to_str().unwrap(),
                "sidecar",
                "--ca-address",
                &ca,
                "--ca-trust-anchor",
                anchor.to_str().unwrap(),
                "--xds-address",
                &xds,
                "--control-plane-identity",
                "spiffe://cluster.local/ns/outrigger/sa/control-plane",
                "--namespace",
                "default",
                "--pod-name",
                name,
                "--service-account",
                name,
                "--token-file",
                token.to_str().unwrap(),
                "--app-ports",
                &app_ports,
                "--inbound-tls",
                "strict",
                "--work-dir",
                work_dir.to_str().unwrap(),
            ]
        };
        net.spawn(
            name,
            Some(PROXY_UID),
            &argv,
            &temp_path(&format!("{name}-proxy.log")),
        );
        let app = ["python3", &pod_app(), "serve", name, &APP_PORT.to_string()];
        net.spawn(name, None, &app, &temp_path(&format!("{name}-app.log")));
        if name == "b" {
            let db = ["python3", &pod_app(), "banner", name, &DB_PORT.to_string()];
            net.spawn(name, None, &db, &temp_path("b-db.log"));
        }
    }
    // The admin port is exempt from interception, so readiness is visible from outside.
    for pod in &net.pods {
        let admin = SocketAddr::new(pod.ip.into(), ADMIN_PORT);
        eventually(
            &format!("the sidecar of {} is ready", pod.name),
            Duration::from_secs(20),
            || async move { (admin_get(admin, "/ready").await?.0 == 200).then_some(()) },
        )
        .await;
    }
    eventually("the apps listen", Duration::from_secs(10), || async {
        ["a", "b", "c"]
            .iter()
            .all(|p| {
                let url = format!("http://127.0.0.1:{APP_PORT}/up");
                app_get(&net, p, &url).0 == "200"
            })
            .then_some(())
    })
    .await;

    // Everything b receives on its app port from here on is captured, on the host end of its
    // veth (frames bridged between pods never pass the bridge's own device, and "any" would
    // also take in every other test's loopback traffic and could drop packets under load).
    let capture = Capture::start(&net.pod("b").host_interface, APP_PORT).await;

    // a → b by service VIP: mTLS between the sidecars, b's app sees a's SPIFFE ID.
    let b_vip = vip(subnet, 1);
    let marker = format!("meshmarker{}", std::process::id());
    let (status, body) = app_get(&net, "a", &format!("http://{b_vip}:{APP_PORT}/{marker}"));
    assert_eq!(status, "200", "{body}");
    assert_eq!(body["pod"], "b");
    assert_eq!(body["client_id"], spiffe("a").as_str());

    // a → b by pod IP, over IPv6: the endpoint address maps to the same service.
    let (b_ip, b_ip6) = (net.pod("b").ip, net.pod("b").ip6);
    let (status, body) = app_get(&net, "a", &format!("http://[{b_ip6}]:{APP_PORT}/direct"));
    assert_eq!(status, "200", "{body}");
    assert_eq!(body["client_id"], spiffe("a").as_str());

    // The mesh's retry policy for b: the first try fails, the app never sees it.
    let (status, body) = app_get(&net, "a", &format!("http://{b_vip}:{APP_PORT}/flaky/one"));
    assert_eq!(status, "200", "{body}");
    assert_eq!(body["attempt"], "2");

    // Authorization at c: b is allowed, a is denied with 403.
    let c_vip = vip(subnet, 2);
    let (status, body) = app_get(&net, "b", &format!("http://{c_vip}:{APP_PORT}/secret"));
    assert_eq!(status, "200", "{body}");
    assert_eq!(body["client_id"], spiffe("b").as_str());
    let (status, _) = app_get(&net, "a", &format!("http://{c_vip}:{APP_PORT}/secret"));
    assert_eq!(status, "403");

    // Nor can a get there through b's sidecar: b's outbound listener binds every address,
    // but serves only what b's own app sends. Reached directly from a, it must not route
    // a's request to c with b's identity. The ports around the admin port serve nothing.
    let b_outbound = format!("http://{}:15001/secret", net.pod("b").ip);
    let c_host = format!("{c_vip}:{APP_PORT}");
    let (status, body) = app_get_as(&net, "a", &b_outbound, Some(&c_host));
    assert_eq!(status, "error", "b's sidecar relayed a's request: {body}");
    for port in [ADMIN_PORT - 1, ADMIN_PORT + 1, 15000, 15090] {
        let url = format!("http://{}:{port}/secret", net.pod("b").ip);
        let (status, body) = app_get_as(&net, "a", &url, Some(&c_host));
        assert_eq!(status, "error", "port {port}: {body}");
    }
    let b_page = admin_get(
        SocketAddr::new(net.pod("b").ip.into(), ADMIN_PORT),
        "/metrics",
    )
    .await
    .unwrap()
    .1;
    assert_eq!(
        metric(
            &b_page,
            "outrigger_foreign_connections_refused_total{listener=\"outbound\"}"
        ),
        1,
        "{b_page}"
    );

    // An address outside the mesh passes straight through: c's admin port.
    let c_admin = format!("http://{}:{ADMIN_PORT}/live", net.pod("c").ip);
    assert_eq!(app_get(&net, "a", &c_admin).0, "200");

    // A server-first service (protocol tcp) answers at once through a's sidecar: it does
    // not wait to detect a protocol the client never speaks first.
    let db_vip = vip(subnet, 10).to_string();
    let out = net.exec(
        "a",
        "python3",
        &[&pod_app(), "greet", &db_vip, &DB_PORT.to_string()],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("hello from b"), "{text}");
    let took: f64 = lines.next().and_then(|t| t.parse().ok()).unwrap_or(99.0);
    assert!(took < 2.0, "the greeting took {took} s");

    // An AuthorizationPolicy in the cluster lets only c call b: a is refused with 403
    // within 2 s, and allowed again once the policy is gone.
    let b_service = typed(&format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: b, namespace: default}}
spec:
  clusterIP: {b_vip}
  ports: [{{name: http, port: {APP_PORT}, protocol: TCP}}]
"#
    ));
    let only_c = typed(
        r#"
apiVersion: policy.outrigger.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: only-c, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: b}]
  allow:
    - from: [{serviceAccount: c}]
"#,
    );
    kube.cluster.apply(b_service);
    kube.cluster.apply(only_c.clone());
    let b_url = format!("http://{b_vip}:{APP_PORT}/guarded");
    let a_to_b = |want: &'static str| {
        let (net, url) = (&net, b_url.clone());
        move || {
            let url = url.clone();
            async move { (app_get(net, "a", &url).0 == want).then_some(()) }
        }
    };
    let applied = std::time::Instant::now();
    eventually(
        "a is denied by the policy",
        Duration::from_secs(2),
        a_to_b("403"),
    )
    .await;
    eprintln!("the policy took effect in {:?}", applied.elapsed());
    let (status, body) = app_get(&net, "c", &b_url);
    assert_eq!(status, "200", "{body}");
    assert_eq!(body["client_id"], spiffe("c").as_str());
    kube.cluster.delete(&only_c);
    eventually("a is allowed again", Duration::from_secs(2), a_to_b("200")).await;

    // The inbound sidecars saw the callers' identities, and nothing in plaintext: strict
    // mode refuses plaintext and counts it.
    let b_admin = SocketAddr::new(b_ip.into(), ADMIN_PORT);
    let c_admin = SocketAddr::new(net.pod("c").ip.into(), ADMIN_PORT);
    let b_metrics = admin_get(b_admin, "/metrics").await.unwrap().1;
    let from_a = format!(
        "outrigger_requests_total{{direction=\"inbound\",route=\"app-8080/0\",status=\"200\",grpc_status=\"\",peer=\"{}\"}}",
        spiffe("a")
    );
    assert!(metric(&b_metrics, &from_a) >= 3, "{b_metrics}");
    let c_metrics = admin_get(c_admin, "/metrics").await.unwrap().1;
    assert!(
        c_metrics.contains(&format!("peer=\"{}\"", spiffe("b"))),
        "{c_metrics}"
    );
    // c's app saw b's one call, and nothing relayed through b.
    let from_b = format!(
        "outrigger_requests_total{{direction=\"inbound\",route=\"app/0\",status=\"200\",grpc_status=\"\",peer=\"{}\"}}",
        spiffe("b")
    );
    assert_eq!(metric(&c_metrics, &from_b), 1, "{c_metrics}");
    for page in [&b_metrics, &c_metrics] {
        assert_eq!(
            metric(
                page,
                "outrigger_plaintext_refused_total{listener=\"inbound\"}"
            ),
            0
        );
    }

    // Taking the rules out restores direct traffic: b's app answers a's app itself.
    let save = format!("{backend}-save");
    let before = nat_rules(&net, "b", &save);
    for name in ["a", "b", "c"] {
        init(&net, name, &["--iptables", backend, "--remove"]);
        assert!(!nat_rules(&net, name, &save).contains("OUTRIGGER"));
    }
    assert!(before.contains("OUTRIGGER_OUTPUT"));
    let bare = format!("baremarker{}", std::process::id());
    let (status, body) = app_get(&net, "a", &format!("http://{b_ip}:{APP_PORT}/{bare}"));
    assert_eq!(status, "200", "{body}");
    assert_eq!(body["client_id"], serde_json::Value::Null);
    // The capture saw the plaintext request, so it would have seen the meshed one had it
    // crossed the wire in the clear.
    let seen = eventually(
        "the capture shows the plaintext request",
        Duration::from_secs(10),
        || {
            let (seen, bare) = (capture.text(), bare.clone());
            async move { seen.contains(&bare).then_some(seen) }
        },
    )
    .await;
    assert!(
        !seen.contains(&marker),
        "a meshed request crossed between pods in plaintext"
    );
    let after = admin_get(b_admin, "/metrics").await.unwrap().1;
    assert_eq!(metric(&after, &from_a), metric(&b_metrics, &from_a));
}

/// `init` twice leaves the same tables as once, with either iptables backend, and
/// `--remove` leaves them as they were before.
#[test]
fn init_is_idempotent_and_removable_with_nft_and_legacy() {
    let subnet = 100 + ((std::process::id() + 50) % 100) as u8;
    let net = PodNetwork::new(subnet, &["solo"]);
    for backend in ["iptables-nft", "iptables-legacy"] {
        // Both families: IPv4 first, then the IPv6 tables after a marker line.
        let saves = [
            format!("{backend}-save"),
            format!("{}-save", backend.replacen("iptables", "ip6tables", 1)),
        ];
        let rules = || {
            saves
                .iter()
                .map(|save| nat_rules(&net, "solo", save))
                .collect::<Vec<_>>()
                .join(
                    r#"
--- ipv6 ---
"#,
                )
        };
        let pristine = rules();
        let flags = [
            "--iptables",
            backend,
            "--exclude-outbound-cidrs",
            "10.96.0.0/12,fd00:10:96::/112",
            "--exclude-inbound-ports",
            "22",
        ];
        init(&net, "solo", &flags);
        let once = rules();
        assert!(
            once.contains("--uid-owner 1337 -j RETURN"),
            "{backend}: {once}"
        );
        assert!(
            once.contains("--dport 15020 -j RETURN"),
            "{backend}: {once}"
        );
        assert!(
            once.contains("-d 10.96.0.0/12 -j RETURN"),
            "{backend}: {once}"
        );
        assert!(
            once.contains("-j REDIRECT --to-ports 15001"),
            "{backend}: {once}"
        );
        // IPv6 gets the same rules, with its own CIDRs only.
        let (v4, v6) = once.split_once("--- ipv6 ---").unwrap();
        assert!(v6.contains("--uid-owner 1337 -j RETURN"), "{backend}: {v6}");
        assert!(
            v6.contains("-d fd00:10:96::/112 -j RETURN"),
            "{backend}: {v6}"
        );
        assert!(
            v6.contains("-j REDIRECT --to-ports 15006"),
            "{backend}: {v6}"
        );
        assert!(!v4.contains("fd00:10:96::") && !v6.contains("10.96.0.0"));
        init(&net, "solo", &flags);
        assert_eq!(rules(), once, "{backend}: a second init changed the rules");
        let mut remove = flags.to_vec();
        remove.push("--remove");
        init(&net, "solo", &remove);
        assert_eq!(rules(), pristine, "{backend}: --remove left rules behind");
        init(&net, "solo", &remove);
    }
}

/// tcpdump on one interface and TCP port, read back as text.
struct Capture {
    child: std::process::Child,
    file: PathBuf,
}

impl Capture {
    async fn start(interface: &str, port: u16) -> Capture {
        let file = temp_path("pods.pcap");
        let child = std::process::Command::new("tcpdump")
            .args(["-i", interface, "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&file)
            .args(["tcp", "port", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tcpdump (scripts/test installs it)");
        // The file's header is written once the capture is live.
        let path = file.clone();
        eventually("tcpdump captures", Duration::from_secs(10), || {
            let path = path.clone();
            async move {
                (std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) >= 24).then_some(())
            }
        })
        .await;
        Capture { child, file }
    }

    /// What was captured so far (`-U` writes every packet as it comes).
    fn text(&self) -> String {
        let out = std::process::Command::new("tcpdump")
            .args(["-nn", "-A", "-r"])
            .arg(&self.file)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
