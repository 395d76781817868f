//! Bootstrap credentials in Kubernetes: a projected service-account token, checked with the
//! API server's TokenReview. An authenticated `system:serviceaccount:<ns>:<sa>` proves
//! `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`; anything else proves nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outrigger_core::token_bucket::RateLimiter;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use outrigger_core::spiffe::SpiffeId;

/// The audience projected tokens must be minted for.
pub const AUDIENCE: &str = "outrigger";

/// How long an answer is reused: a proxy renews rarely, but a restarting fleet asks at once.
const CACHE_FOR: Duration = Duration::from_secs(30);
/// Answers kept; past it, expired ones go, then all (a flood of distinct tokens).
const CACHE_ENTRIES: usize = 4096;
/// Longer than any service-account token the API server issues.
const MAX_TOKEN: usize = 16 * 1024;
/// Reviews sent to the API server, for tokens not in the cache: a caller making up tokens
/// cannot turn the CA into a load generator against the API server.
const REVIEWS_PER_SECOND: f64 = 20.0;
const REVIEW_BURST: u32 = 100;
/// And per caller (by address): a proxy needs one review a renewal, a restart a few.
const CALLER_REVIEWS_PER_SECOND: f64 = 1.0;
const CALLER_REVIEW_BURST: u32 = 10;
/// Callers remembered for their limit; past it the table starts again.
const CALLERS: usize = 4096;

/// A review's answer and when it was given.
type Cached = (Instant, Result<SpiffeId, String>);

pub struct TokenReviewer {
    api: Api<TokenReview>,
    cache: Mutex<HashMap<String, Cached>>,
    limiter: RateLimiter,
    callers: Mutex<HashMap<IpAddr, RateLimiter>>,
}

impl TokenReviewer {
    /// Reviews through `client`, the control plane's own.
    pub fn new(client: kube::Client) -> TokenReviewer {
        TokenReviewer {
            api: Api::all(client),
            cache: Mutex::default(),
            limiter: RateLimiter::new(REVIEWS_PER_SECOND, REVIEW_BURST),
            callers: Mutex::default(),
        }
    }

    /// `review`, answered from a short cache, and refused without asking once too many
    /// reviews have gone out.
    pub async fn check(
        &self,
        token: &str,
        trust_domain: &str,
        from: Option<IpAddr>,
    ) -> Result<SpiffeId, String> {
        if token.len() > MAX_TOKEN {
            return Err("the token is longer than any service-account token".into());
        }
        if let Some((at, answer)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            && at.elapsed() < CACHE_FOR
        {
            return answer.clone();
        }
        // The caller's own limit first, so that one caller making up tokens spends its own
        // allowance, not everyone's.
        if let Some(ip) = from {
            let mut callers = self.callers.lock().unwrap_or_else(|p| p.into_inner());
            if callers.len() >= CALLERS && !callers.contains_key(&ip) {
                callers.clear();
            }
            let limit = callers.entry(ip).or_insert_with(|| {
                RateLimiter::new(CALLER_REVIEWS_PER_SECOND, CALLER_REVIEW_BURST)
            });
            if limit.acquire().is_err() {
                return Err("too many token reviews from this address; retry shortly".into());
            }
        }
        if self.limiter.acquire().is_err() {
            return Err("too many token reviews right now; retry shortly".into());
        }
        let answer = self.review(token, trust_domain).await;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(token.to_string(), (Instant::now(), answer.clone()));
        answer
    }

    /// The identity `token` proves, or why it proves none.
    pub async fn review(&self, token: &str, trust_domain: &str) -> Result<SpiffeId, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("the TokenReview failed: {e}"))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.as_deref().unwrap_or("not authenticated");
            return Err(format!("the API server refused the token: {why}"));
        }
        // An API server that does not say which audiences it checked has not checked ours.
        if !status
            .audiences
            .is_some_and(|a| a.iter().any(|v| v == AUDIENCE))
        {
            return Err(format!("the token is not for audience `{AUDIENCE}`"));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        match user.split(':').collect::<Vec<_>>().as_slice() {
            ["system", "serviceaccount", ns, sa] if !ns.is_empty() && !sa.is_empty() => {
                Ok(SpiffeId::new(trust_domain, ns, sa))
            }
            _ => Err(format!("`{user}` is not a service account")),
        }
    }
}
