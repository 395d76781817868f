//! Bootstrap credentials in Kubernetes: a projected service-account token, checked with the
//! API server's TokenReview. An authenticated `system:serviceaccount:<ns>:<sa>` proves
//! `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`; anything else proves nothing.

use std::sync::Arc;

use outrigger_proxy::spiffe::SpiffeId;
use serde_json::{Value, json};

use crate::kube_api::KubeApi;

/// The audience projected tokens must be minted for.
pub const AUDIENCE: &str = "outrigger";

pub struct TokenReviewer {
    api: Arc<KubeApi>,
}

impl TokenReviewer {
    /// `api` is `https://host:port`; `ca_pem` verifies the API server.
    pub fn new(api: &str, bearer: String, ca_pem: &[u8]) -> Result<TokenReviewer, String> {
        Ok(TokenReviewer {
            api: Arc::new(KubeApi::new(api, bearer, ca_pem)?),
        })
    }

    /// The same API server, for the cluster's Services and endpoints.
    pub fn api(&self) -> Arc<KubeApi> {
        self.api.clone()
    }

    /// The identity `token` proves, or why it proves none.
    pub async fn review(&self, token: &str, trust_domain: &str) -> Result<SpiffeId, String> {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [AUDIENCE]},
        });
        let answer = self
            .api
            .post("/apis/authentication.k8s.io/v1/tokenreviews", &body)
            .await?;
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
}
