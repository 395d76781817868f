//! A minimal Kubernetes API client: JSON over HTTPS with the control plane's bearer token,
//! verified against the cluster's CA. Enough for TokenReview and for listing Services,
//! EndpointSlices and Pods; no generated client is needed for that.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;

/// A request that takes longer than this has failed.
const TIMEOUT: Duration = Duration::from_secs(10);

pub struct KubeApi {
    api: Uri,
    /// The control plane's own credential for the API server.
    bearer: String,
    tls: Arc<ClientConfig>,
}

impl KubeApi {
    /// `api` is `https://host:port`; `ca_pem` verifies the API server.
    pub fn new(api: &str, bearer: String, ca_pem: &[u8]) -> Result<KubeApi, String> {
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
        let tls = ClientConfig::builder_with_provider(outrigger_core::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(KubeApi {
            api,
            bearer,
            tls: Arc::new(tls),
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, String> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        self.request(Method::POST, path, Some(body)).await
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        tokio::time::timeout(TIMEOUT, self.send(method, path, body))
            .await
            .map_err(|_| format!("{} {path}: timed out", self.api))?
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
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
        let body = body.map(Value::to_string).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{host}:{port}"))
            .header("authorization", format!("Bearer {}", self.bearer))
            .header("accept", "application/json")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
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
                "{path}: the API server answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("{path}: not JSON: {e}"))
    }
}
