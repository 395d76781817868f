//! Bootstrap credentials in Kubernetes: a projected service-account token, checked with the
//! API server's TokenReview. An authenticated `system:serviceaccount:<ns>:<sa>` proves
//! `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`; anything else proves nothing.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use outrigger_proxy::spiffe::SpiffeId;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

/// The audience projected tokens must be minted for.
pub const AUDIENCE: &str = "outrigger";

pub struct TokenReviewer {
    api: Uri,
    /// The control plane's own credential for the API server.
    bearer: String,
    tls: Arc<ClientConfig>,
}

impl TokenReviewer {
    /// `api` is `https://host:port`; `ca_pem` verifies the API server.
    pub fn new(api: &str, bearer: String, ca_pem: &[u8]) -> Result<TokenReviewer, String> {
        let api: Uri = api
            .parse()
            .map_err(|e| format!("`{api}` is not a URL: {e}"))?;
        if api.scheme_str() != Some("https") || api.host().is_none() {
            return Err(format!("`{api}` is not an https:// URL"));
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots
                .add(cert.map_err(|e| format!("API server CA: {e}"))?)
                .map_err(|e| format!("API server CA: {e}"))?;
        }
        let tls = ClientConfig::builder_with_provider(outrigger_proxy::identity::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TokenReviewer {
            api,
            bearer,
            tls: Arc::new(tls),
        })
    }

    /// The identity `token` proves, or why it proves none.
    pub async fn review(&self, token: &str, trust_domain: &str) -> Result<SpiffeId, String> {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [AUDIENCE]},
        });
        let answer = tokio::time::timeout(Duration::from_secs(5), self.post(body))
            .await
            .map_err(|_| "the TokenReview timed out".to_string())??;
        let status = &answer["status"];
        if status["authenticated"] != Value::Bool(true) {
            let why = status["error"].as_str().unwrap_or("not authenticated");
            return Err(format!("the API server refused the token: {why}"));
        }
        let audiences = status["audiences"].as_array();
        if audiences.is_some_and(|a| !a.iter().any(|v| v == AUDIENCE)) {
            return Err(format!("the token is not for audience `{AUDIENCE}`"));
        }
        let user = status["user"]["username"].as_str().unwrap_or_default();
        match user.split(':').collect::<Vec<_>>().as_slice() {
            ["system", "serviceaccount", ns, sa] if !ns.is_empty() && !sa.is_empty() => {
                Ok(SpiffeId::new(trust_domain, ns, sa))
            }
            _ => Err(format!("`{user}` is not a service account")),
        }
    }

    async fn post(&self, body: Value) -> Result<Value, String> {
        let host = self.api.host().unwrap_or_default();
        let port = self.api.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("{}: {e}", self.api))?;
        let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{}: TLS: {e}", self.api))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::post("/apis/authentication.k8s.io/v1/tokenreviews")
            .header("host", format!("{host}:{port}"))
            .header("authorization", format!("Bearer {}", self.bearer))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "the API server answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("not a TokenReview: {e}"))
    }
}
