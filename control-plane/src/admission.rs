//! The mutating admission webhook: an AdmissionReview with a Pod in, the same Pod with the
//! sidecar out, as a JSONPatch. The change itself is `inject`'s, so the webhook and the CLI
//! cannot drift apart.
//!
//! Which pods reach the webhook is the API server's business (the webhook configuration's
//! namespace and object selectors); a pod that opts out by annotation is let through as is.
//! The webhook never refuses a pod: an error is reported in the response's warnings and the
//! pod is admitted unchanged, so that a broken mesh cannot stop a cluster's workloads.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use outrigger_core::bounded_server;

use rustls::ServerConfig;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::ca::{Ca, CaError};
use crate::inject::{Injector, Outcome, json_patch};

/// An AdmissionReview larger than this is not a pod.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Why a request to the webhook gets no review back, or the webhook does not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("not an AdmissionReview: {0}")]
    NotAReview(String),
    #[error("an AdmissionReview without `request`")]
    NoRequest,
    #[error("an AdmissionReview request without `uid`")]
    NoUid,
    #[error("the patch: {0}")]
    Patch(String),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("cannot bind the webhook on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Answers one AdmissionReview (the request body) with another.
pub fn review(injector: &Injector, body: &[u8]) -> Result<Value, WebhookError> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| WebhookError::NotAReview(e.to_string()))?;
    let request = review.get("request").ok_or(WebhookError::NoRequest)?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or(WebhookError::NoUid)?;
    let api_version = review
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("admission.k8s.io/v1");
    let mut response = json!({"uid": uid, "allowed": true});
    let is_pod = request.pointer("/kind/kind").and_then(Value::as_str) == Some("Pod");
    if let (true, Some(pod)) = (is_pod, request.get("object")) {
        let mut injected = pod.clone();
        match injector.inject_template(&mut injected) {
            Ok(Outcome::Injected) => {
                let patch = serde_json::to_vec(&json_patch(pod, &injected))
                    .map_err(|e| WebhookError::Patch(e.to_string()))?;
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
            }
            Ok(Outcome::AlreadyInjected | Outcome::OptedOut) => {}
            Err(e) => {
                tracing::warn!(error = %e, uid, "not injected");
                response["warnings"] = json!([format!("outrigger: sidecar not injected: {e}")]);
            }
        }
    }
    Ok(json!({
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// A TLS config for the webhook, with a certificate from the mesh CA for `dns_names`; the
/// webhook configuration's `caBundle` is the CA's root.
pub fn tls_config(ca: &Ca, dns_names: &[String]) -> Result<Arc<ServerConfig>, CaError> {
    let tls = |e: rustls::Error| CaError::Tls(e.to_string());
    let (chain, key) = ca.issue_server(dns_names, Duration::from_secs(365 * 24 * 3600))?;
    let (chain, key) = crate::ca::rustls_pair(&chain, &key)?;
    let mut config = ServerConfig::builder_with_provider(outrigger_core::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(tls)?;
    // HTTP/1.1 only: the API server speaks it, and the port's limits are HTTP/1.1's.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn handle(
    injector: Arc<Injector>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        Ok(r)
    };
    if req.method() != Method::POST || req.uri().path() != "/inject" {
        return reply(
            StatusCode::NOT_FOUND,
            b"{\"error\":\"POST /inject\"}".to_vec(),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let msg = json!({"error": format!("cannot read the request: {e}")});
            return reply(StatusCode::BAD_REQUEST, msg.to_string().into_bytes());
        }
    };
    match review(&injector, &body) {
        Ok(answer) => reply(StatusCode::OK, answer.to_string().into_bytes()),
        Err(e) => {
            tracing::warn!(error = %e, "bad admission request");
            reply(
                StatusCode::BAD_REQUEST,
                json!({"error": e.to_string()}).to_string().into_bytes(),
            )
        }
    }
}

/// Serves `POST /inject` over TLS until the process ends, bounded like every admin port:
/// only the API server calls it, a few times a second at most.
pub async fn serve(socket: TcpListener, tls: Arc<ServerConfig>, injector: Arc<Injector>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let gate = bounded_server::Gate::new(bounded_server::Limits::ADMIN);
    bounded_server::serve(
        socket,
        gate,
        move |tcp| acceptor.clone().accept(tcp),
        move |req| {
            let injector = injector.clone();
            async move {
                match handle(injector, req).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            }
        },
    )
    .await
}

/// Binds the webhook on `address` with a certificate for `dns_names` from `ca`, and serves
/// it in the background. Returns the bound address.
pub async fn start(
    address: SocketAddr,
    ca: &Ca,
    dns_names: &[String],
    mut injector: Injector,
) -> Result<SocketAddr, WebhookError> {
    let tls = tls_config(ca, dns_names)?;
    // Injected pods check the CA against the roots of the CA that serves this webhook.
    if injector.ca_root_pem.is_none() {
        injector.ca_root_pem = Some(ca.bundle_pem().to_string());
    }
    let socket = TcpListener::bind(address)
        .await
        .map_err(|source| WebhookError::Bind { address, source })?;
    let bound = socket.local_addr().unwrap_or(address);
    tracing::info!(address = %bound, "admission webhook serving POST /inject");
    tokio::spawn(serve(socket, tls, Arc::new(injector)));
    Ok(bound)
}
