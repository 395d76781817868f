//! The admission webhook over real TLS: an AdmissionReview as the API server sends it, the
//! JSONPatch it answers applied with an RFC 6902 implementation, and the result compared
//! with what the `inject` command makes of the same pod.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use outrigger_control_plane::admission;
use outrigger_control_plane::ca::Ca;
use outrigger_control_plane::inject::Injector;
use outrigger_tests::kube::{assert_typed, yaml_documents};
use outrigger_tests::{temp_path, workspace_binary};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

const WEBHOOK_HOST: &str = "outrigger.outrigger.svc";

fn review_fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("webhook/admission-review.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn webhook() -> (SocketAddr, Ca) {
    let ca = Ca::generate("cluster.local").unwrap();
    let addr = admission::start(
        "127.0.0.1:0".parse().unwrap(),
        &ca,
        &[WEBHOOK_HOST.to_string()],
        Injector::for_cluster("outrigger/proxy:0.1.0"),
    )
    .await
    .unwrap();
    (addr, ca)
}

/// POSTs as the API server would: TLS, checking the certificate against the `caBundle`
/// (the mesh CA's root) and the Service's host name.
async fn post(addr: SocketAddr, ca: &Ca, body: Vec<u8>) -> Result<(u16, Value), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.bundle_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(outrigger_core::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(WEBHOOK_HOST).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::post(format!("https://{WEBHOOK_HOST}/inject"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

fn apply(object: &Value, response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch", "{response:#}");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    patched
}

fn inject_cli(object: &Value, ca: &Ca) -> Value {
    // JSON is YAML: the command reads the pod exactly as the webhook received it.
    let path = temp_path("pod.json");
    std::fs::write(&path, serde_json::to_string_pretty(object).unwrap()).unwrap();
    let root = temp_path("root.pem");
    std::fs::write(&root, ca.bundle_pem()).unwrap();
    let out = Command::new(workspace_binary("outrigger-control-plane"))
        .args(["inject", "-f"])
        .arg(&path)
        .arg("--ca-root")
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_documents(&String::from_utf8(out.stdout).unwrap()).remove(0)
}

#[tokio::test]
async fn the_patched_pod_is_what_inject_makes() {
    let (addr, ca) = webhook().await;
    let review = review_fixture();
    let (status, answer) = post(addr, &ca, serde_json::to_vec(&review).unwrap())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], review["request"]["uid"]);
    assert_eq!(response["allowed"], true);
    let pod = &review["request"]["object"];
    let patched = apply(pod, response);
    assert_eq!(patched, inject_cli(pod, &ca));
    assert_eq!(
        patched["spec"]["initContainers"][1]["restartPolicy"],
        "Always"
    );
    assert_typed(&patched);
}

#[tokio::test]
async fn pods_that_need_nothing_are_admitted_unchanged() {
    let (addr, ca) = webhook().await;
    let base = review_fixture();

    let mut opted_out = base.clone();
    opted_out["request"]["object"]["metadata"]["annotations"]["outrigger.io/inject"] =
        json!("false");
    let mut injected = base.clone();
    let pod = injected["request"]["object"].clone();
    injected["request"]["object"] = apply(
        &pod,
        &post(addr, &ca, serde_json::to_vec(&base).unwrap())
            .await
            .unwrap()
            .1["response"],
    );
    let mut service = base.clone();
    service["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Service"});
    for review in [opted_out, injected, service] {
        let (status, answer) = post(addr, &ca, serde_json::to_vec(&review).unwrap())
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none(), "{answer:#}");
    }

    // A pod the injector cannot handle is still admitted, with a warning that says why.
    let mut bad = base.clone();
    bad["request"]["object"]["metadata"]["annotations"]["outrigger.io/sidecar-mode"] =
        json!("sometimes");
    let (_, answer) = post(addr, &ca, serde_json::to_vec(&bad).unwrap())
        .await
        .unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(
        answer["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("outrigger.io/sidecar-mode"),
        "{answer:#}"
    );

    // Not an AdmissionReview at all.
    let (status, answer) = post(addr, &ca, b"{\"hello\": 1}".to_vec()).await.unwrap();
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("request"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_mesh_ca_cannot_connect() {
    let (addr, _) = webhook().await;
    let other = Ca::generate("cluster.local").unwrap();
    let err = post(addr, &other, b"{}".to_vec()).await.unwrap_err();
    assert!(err.contains("TLS"), "{err}");
}
