//! The control plane's Kubernetes client (kube-rs): one pooled HTTPS client for the watches
//! and for TokenReview, authenticated with the control plane's own service-account token.
//!
//! The token and the API server's CA are read from files, and kube re-reads both as they
//! rotate (projected tokens expire within the hour).

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use kube::client::Body;

/// Where the API server is and how the control plane proves itself to it.
#[derive(Clone, Debug)]
pub struct KubeAccess {
    /// `https://host:port`.
    pub url: String,
    /// The control plane's bearer token.
    pub token_file: PathBuf,
    /// The CA that signs the API server's certificate (PEM).
    pub ca_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("`{0}` is not an https:// URL")]
    Url(String),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Dialing the API server takes at most this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's body takes at most this to send.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence longer than this on a response is a dead API server. Longer than a watch lasts
/// (the watcher asks for 290 s), so a quiet watch is not cut short.
const READ_TIMEOUT: Duration = Duration::from_secs(295);

/// The control plane's client, and what it has asked of the API server.
#[derive(Clone)]
pub struct KubeClient {
    pub client: kube::Client,
    pub calls: Arc<ApiCalls>,
}

/// A client for the API server. The files must be readable now, so that a typo fails at
/// start and names the file, not at the first watch.
pub fn client(access: &KubeAccess) -> Result<KubeClient, KubeError> {
    let url: http::Uri = access
        .url
        .parse()
        .map_err(|_| KubeError::Url(access.url.clone()))?;
    if url.scheme_str() != Some("https") || url.host().is_none() {
        return Err(KubeError::Url(access.url.clone()));
    }
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| KubeError::Read {
            path: path.clone(),
            source,
        })
    };
    read(&access.token_file)?;
    let ca = read(&access.ca_file)?;
    if !String::from_utf8_lossy(&ca).contains("-----BEGIN CERTIFICATE-----") {
        return Err(KubeError::NoCertificate(access.ca_file.clone()));
    }
    let mut config = kube::Config::new(url);
    config.root_cert_file = Some(access.ca_file.clone());
    config.auth_info.token_file = Some(access.token_file.display().to_string());
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.write_timeout = Some(WRITE_TIMEOUT);
    config.read_timeout = Some(READ_TIMEOUT);
    config.reset_reader_on_write = true;
    let calls = Arc::new(ApiCalls::default());
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&Observe(calls.clone()))
        .build();
    Ok(KubeClient { client, calls })
}

/// Requests made to the API server, by kind of request, and when each collection last
/// answered well: a watch that resumes says nothing until something changes, so its
/// successful start is what shows the API server is back.
#[derive(Default)]
pub struct ApiCalls {
    pub lists: AtomicU64,
    pub watches: AtomicU64,
    /// Writes and reviews: everything that is not a list or a watch.
    pub others: AtomicU64,
    answered: Mutex<HashMap<String, Instant>>,
}

impl ApiCalls {
    /// When `path` (a collection, `/api/v1/pods`) last answered with success.
    pub fn answered(&self, path: &str) -> Option<Instant> {
        self.lock().get(path).copied()
    }

    fn sent(&self, req: &Request<Body>) {
        let counter = if req.method() != http::Method::GET {
            &self.others
        } else if req.uri().query().is_some_and(|q| q.contains("watch=true")) {
            &self.watches
        } else {
            &self.lists
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.answered.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The layer under kube's client that keeps `ApiCalls`.
struct Observe(Arc<ApiCalls>);

impl<S> tower::Layer<S> for Observe {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            calls: self.0.clone(),
        }
    }
}

struct Observed<S> {
    inner: S,
    calls: Arc<ApiCalls>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<Request<Body>> for Observed<S>
where
    S: tower::Service<Request<Body>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<B>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        self.calls.sent(&req);
        let path = req.uri().path().to_string();
        let calls = self.calls.clone();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let answer = answer.await;
            if let Ok(resp) = &answer
                && resp.status().is_success()
            {
                calls.lock().insert(path, Instant::now());
            }
            answer
        })
    }
}
