//! A Kubernetes API server for tests: real TLS with a self-signed `localhost` certificate, a
//! bearer token it checks, and JSON answers from a handler the test supplies.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use serde_json::Value;

/// `(method, path and query, request body)` → `(status, response body)`.
pub type Handler = dyn Fn(&str, &str, Value) -> (u16, Value) + Send + Sync;

pub struct FakeApiServer {
    pub addr: SocketAddr,
    /// The CA a client must trust: the server's own certificate.
    pub ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApiServer {
    /// Answers requests carrying `Bearer <bearer>` with `handler`, others with 401.
    pub async fn start(bearer: &'static str, handler: Arc<Handler>) -> FakeApiServer {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(outrigger_core::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                    .unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, handler) = (acceptor.clone(), handler.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let handler = handler.clone();
                            async move {
                                let authorized = req
                                    .headers()
                                    .get("authorization")
                                    .and_then(|v| v.to_str().ok())
                                    == Some(&format!("Bearer {bearer}"));
                                let method = req.method().to_string();
                                let path = req
                                    .uri()
                                    .path_and_query()
                                    .map_or("/".into(), |p| p.to_string());
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                                let (status, answer) = if authorized {
                                    handler(&method, &path, body)
                                } else {
                                    (401, serde_json::json!({"kind": "Status", "code": 401}))
                                };
                                let mut resp =
                                    http::Response::new(Full::new(Bytes::from(answer.to_string())));
                                *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        FakeApiServer {
            addr,
            ca_pem: cert.pem(),
            task,
        }
    }

    /// The URL a client uses: the certificate names `localhost`.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
