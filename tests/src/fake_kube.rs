//! A Kubernetes API server for tests, speaking the real protocol over real TLS (a self-signed
//! `localhost` certificate) to clients that present its bearer token:
//!
//! - **list**: `GET /api/v1/services?limit=500`, paginated with `continue`, each list
//!   stamped with the store's `resourceVersion`;
//! - **watch**: `GET ...?watch=true&resourceVersion=N`, a chunked stream of one JSON event
//!   per line (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK` when asked for), replaying what
//!   happened after `N`, or `ERROR` with code 410 when `N` is older than what the store
//!   still remembers (`compact`);
//! - **faults**: a failing API server (`fail`), and dropped watch connections (`drop_watches`);
//! - anything else (TokenReview) goes to a handler the test supplies.
//!
//! Objects are JSON trees in their wire form; any kind works, its collection being the
//! lowercase plural of its kind under its group and version.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use outrigger_control_plane::kube_client::KubeAccess;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// `(method, path and query, request body)` → `(status, response body)`.
pub type Handler = dyn Fn(&str, &str, Value) -> (u16, Value) + Send + Sync;

type Body = BoxBody<Bytes, std::io::Error>;

pub struct FakeApiServer {
    pub addr: SocketAddr,
    /// The CA a client must trust: the server's own certificate.
    pub ca_pem: String,
    /// The objects it serves and the watches open on them.
    pub cluster: Arc<FakeCluster>,
    bearer: &'static str,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApiServer {
    /// Serves `cluster` to requests carrying `Bearer <bearer>`, other requests that carry it
    /// with `handler`, and refuses the rest with 401.
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
        let cluster = Arc::new(FakeCluster::default());
        let served = cluster.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, handler, cluster) =
                    (acceptor.clone(), handler.clone(), served.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (handler, cluster) = (handler.clone(), cluster.clone());
                            async move {
                                Ok::<_, Infallible>(answer(req, bearer, &*handler, &cluster).await)
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
            cluster,
            bearer,
            task,
        }
    }

    /// An API server that only serves its cluster.
    pub async fn empty(bearer: &'static str) -> FakeApiServer {
        Self::start(
            bearer,
            Arc::new(|_: &str, _: &str, _: Value| (404, status(404, "NotFound", "not found"))),
        )
        .await
    }

    /// The URL a client uses: the certificate names `localhost`.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// What the control plane needs to reach this server: its token and CA, written to files
    /// as a pod's service account would have them.
    pub fn access(&self) -> KubeAccess {
        let token_file = crate::temp_path("kube-token");
        let ca_file = crate::temp_path("kube-ca.crt");
        std::fs::write(&token_file, self.bearer).unwrap();
        std::fs::write(&ca_file, &self.ca_pem).unwrap();
        KubeAccess {
            url: self.url(),
            token_file,
            ca_file,
        }
    }

    /// A client of this server, as the control plane makes one.
    pub fn client(&self) -> outrigger_control_plane::kube_client::KubeClient {
        outrigger_control_plane::kube_client::client(&self.access()).unwrap()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn json_response(code: u16, body: &Value) -> http::Response<Body> {
    let mut resp = http::Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = http::StatusCode::from_u16(code).unwrap();
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn answer(
    req: http::Request<hyper::body::Incoming>,
    bearer: &str,
    handler: &Handler,
    cluster: &FakeCluster,
) -> http::Response<Body> {
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
    if !authorized {
        return json_response(401, &status(401, "Unauthorized", "Unauthorized"));
    }
    cluster.lock().requests.push(format!("{method} {path}"));
    if let Some(failure) = cluster.lock().failing.clone() {
        return json_response(500, &status(500, "InternalError", &failure));
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    // Reviews are questions, not objects: the test's handler answers them.
    let review = path
        .split('?')
        .next()
        .unwrap_or_default()
        .ends_with("reviews");
    if !review && let Some(resp) = cluster.handle(&method, &path, body.clone()) {
        return resp;
    }
    let (code, answer) = handler(&method, &path, body);
    json_response(code, &answer)
}

/// The objects of a fake cluster, their history, and the watches open on them.
#[derive(Default)]
pub struct FakeCluster {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The store's resourceVersion: bumped by every write.
    version: u64,
    /// Collection path → `(namespace, name)` → object.
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    /// Every event since the last compaction: `(version, collection, event)`.
    history: Vec<(u64, String, Value)>,
    /// Watches older than this get 410 Gone.
    compacted: u64,
    watches: Vec<Watch>,
    failing: Option<String>,
    requests: Vec<String>,
}

/// An open watch: its collection, the namespace it is limited to, and its stream.
struct Watch {
    collection: String,
    namespace: Option<String>,
    tx: mpsc::UnboundedSender<Result<Bytes, std::io::Error>>,
}

impl Watch {
    /// Sends `event` if it is this watch's; false once the watch is gone.
    fn offer(&self, collection: &str, event: &Value, bytes: &Bytes) -> bool {
        let ns = event["object"]["metadata"]["namespace"].as_str();
        let mine = self.collection == collection
            && self.namespace.as_deref().is_none_or(|n| Some(n) == ns);
        !mine || self.tx.send(Ok(bytes.clone())).is_ok()
    }
}

/// The collection an object belongs to: `/api/v1/services`, `/apis/g/v/kinds`.
fn collection_of(obj: &Value) -> String {
    let api_version = obj["apiVersion"]
        .as_str()
        .expect("an object has an apiVersion");
    let kind = obj["kind"].as_str().expect("an object has a kind");
    let lower = kind.to_lowercase();
    // English plurals, as the API's resource names have them: policy → policies.
    let plural = match lower.strip_suffix('y') {
        Some(stem) if !stem.ends_with(['a', 'e', 'o', 'u']) => format!("{stem}ies"),
        _ if lower.ends_with('s') => format!("{lower}es"),
        _ => format!("{lower}s"),
    };
    if api_version.contains('/') {
        format!("/apis/{api_version}/{plural}")
    } else {
        format!("/api/{api_version}/{plural}")
    }
}

fn key_of(obj: &Value) -> (String, String) {
    let meta = &obj["metadata"];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (s(&meta["namespace"]), s(&meta["name"]))
}

fn query(path: &str) -> (&str, BTreeMap<&str, &str>) {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let params = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    (path, params)
}

impl FakeCluster {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates or replaces `obj`, as `kubectl apply` would: watchers see ADDED or MODIFIED.
    pub fn apply(&self, obj: Value) {
        let collection = collection_of(&obj);
        self.lock().store(&collection, obj);
    }

    /// The object `obj` names, as the cluster holds it now.
    pub fn get(&self, obj: &Value) -> Option<Value> {
        let state = self.lock();
        state
            .objects
            .get(&collection_of(obj))?
            .get(&key_of(obj))
            .cloned()
    }

    /// Deletes the object `obj` names: watchers see DELETED.
    pub fn delete(&self, obj: &Value) {
        let mut state = self.lock();
        let collection = collection_of(obj);
        let Some(mut gone) = state
            .objects
            .get_mut(&collection)
            .and_then(|c| c.remove(&key_of(obj)))
        else {
            return;
        };
        state.version += 1;
        let version = state.version;
        gone["metadata"]["resourceVersion"] = json!(version.to_string());
        state.record(
            version,
            &collection,
            json!({"type": "DELETED", "object": gone}),
        );
    }

    /// Forgets the history so far, as etcd's compaction does: a watch resumed from before
    /// now gets 410 Gone and must list again.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.compacted = state.version;
        state.history.clear();
    }

    /// Cuts every open watch connection mid-stream.
    pub fn drop_watches(&self) {
        for watch in self.lock().watches.drain(..) {
            let _ = watch.tx.send(Err(std::io::Error::other("watch dropped")));
        }
    }

    /// Sends a BOOKMARK with the current resourceVersion on every open watch.
    pub fn bookmark(&self) {
        let mut state = self.lock();
        let version = state.version.to_string();
        state.watches.retain(|Watch { collection, tx, .. }| {
            let kind = collection.rsplit('/').next().unwrap_or_default();
            let event = json!({"type": "BOOKMARK", "object": {
                "kind": kind, "metadata": {"resourceVersion": version}}});
            tx.send(Ok(line(&event))).is_ok()
        });
    }

    /// Answers every request with 500 and `message` until called with `None`.
    pub fn fail(&self, message: Option<&str>) {
        self.lock().failing = message.map(str::to_string);
    }

    /// Every request received, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// Watches open now.
    pub fn open_watches(&self) -> usize {
        let mut state = self.lock();
        state.watches.retain(|w| !w.tx.is_closed());
        state.watches.len()
    }

    /// Answers a request on the API's resource paths: lists and watches, and reads, creates,
    /// replacements, merge patches (of the object or its `status`) and deletes of one
    /// object, with `resourceVersion` preconditions (409 Conflict) as the API server has.
    fn handle(&self, method: &str, path: &str, body: Value) -> Option<http::Response<Body>> {
        let (path, params) = query(path);
        let at = ApiPath::parse(path)?;
        let mut state = self.lock();
        let Some(name) = at.name else {
            return Some(match method {
                "GET" if params.get("watch") == Some(&"true") => {
                    state.watch(&at.collection, at.namespace, &params)
                }
                "GET" => state.list(&at.collection, at.namespace, &params),
                "POST" => {
                    let mut obj = body;
                    if let Some(ns) = at.namespace {
                        obj["metadata"]["namespace"] = json!(ns);
                    }
                    let key = key_of(&obj);
                    if state
                        .objects
                        .get(&at.collection)
                        .is_some_and(|c| c.contains_key(&key))
                    {
                        json_response(409, &status(409, "AlreadyExists", "already exists"))
                    } else {
                        obj["metadata"]["generation"] = json!(1);
                        obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                        let stored = state.store(&at.collection, obj);
                        json_response(201, &stored)
                    }
                }
                _ => json_response(405, &status(405, "MethodNotAllowed", method)),
            });
        };
        let key = (
            at.namespace.unwrap_or_default().to_string(),
            name.to_string(),
        );
        let Some(current) = state
            .objects
            .get(&at.collection)
            .and_then(|c| c.get(&key))
            .cloned()
        else {
            return Some(json_response(
                404,
                &status(404, "NotFound", &format!("{name} not found")),
            ));
        };
        let version = &current["metadata"]["resourceVersion"];
        let precondition = &body["metadata"]["resourceVersion"];
        if matches!(method, "PUT" | "PATCH") && !precondition.is_null() && precondition != version {
            return Some(json_response(
                409,
                &status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version",
                ),
            ));
        }
        Some(match method {
            "GET" => json_response(200, &current),
            "DELETE" => {
                drop(state);
                self.delete(&current);
                json_response(200, &current)
            }
            "PUT" | "PATCH" => {
                let mut next = if method == "PUT" {
                    body.clone()
                } else {
                    current.clone()
                };
                if method == "PATCH" {
                    json_patch::merge(&mut next, &body);
                }
                if at.status {
                    // The status subresource changes the status and nothing else.
                    let mut only = current.clone();
                    only["status"] = next["status"].clone();
                    next = only;
                } else {
                    next["status"] = current["status"].clone();
                    if next["spec"] != current["spec"] {
                        let generation = current["metadata"]["generation"].as_i64().unwrap_or(0);
                        next["metadata"]["generation"] = json!(generation + 1);
                    }
                }
                let stored = state.store(&at.collection, next);
                json_response(200, &stored)
            }
            _ => json_response(405, &status(405, "MethodNotAllowed", method)),
        })
    }
}

/// A resource path: its collection (the cluster-wide path, where this fake keeps the
/// objects), the namespace and name it names, and whether it is the `status` subresource.
struct ApiPath<'a> {
    collection: String,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    status: bool,
}

impl<'a> ApiPath<'a> {
    fn parse(path: &'a str) -> Option<ApiPath<'a>> {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let prefix = match *segments.first()? {
            "api" => 2,
            "apis" => 3,
            _ => return None,
        };
        if segments.len() <= prefix {
            return None;
        }
        let group_version = segments[..prefix].join("/");
        let mut rest = &segments[prefix..];
        let mut namespace = None;
        if rest.len() >= 3 && rest[0] == "namespaces" {
            namespace = Some(rest[1]);
            rest = &rest[2..];
        }
        let (plural, name, status) = match rest {
            [plural] => (plural, None, false),
            [plural, name] => (plural, Some(*name), false),
            [plural, name, "status"] => (plural, Some(*name), true),
            _ => return None,
        };
        Some(ApiPath {
            collection: format!("/{group_version}/{plural}"),
            namespace,
            name,
            status,
        })
    }
}

impl State {
    /// Stores `obj` under a new resourceVersion, and tells the watches.
    fn store(&mut self, collection: &str, mut obj: Value) -> Value {
        self.version += 1;
        let version = self.version;
        obj["metadata"]["resourceVersion"] = json!(version.to_string());
        let existed = self
            .objects
            .entry(collection.to_string())
            .or_default()
            .insert(key_of(&obj), obj.clone())
            .is_some();
        let kind = if existed { "MODIFIED" } else { "ADDED" };
        self.record(version, collection, json!({"type": kind, "object": obj}));
        obj
    }

    fn list(
        &self,
        path: &str,
        namespace: Option<&str>,
        params: &BTreeMap<&str, &str>,
    ) -> http::Response<Body> {
        let empty = BTreeMap::new();
        let objects: BTreeMap<_, _> = self
            .objects
            .get(path)
            .unwrap_or(&empty)
            .iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|n| n == ns))
            .collect();
        let offset: usize = params
            .get("continue")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let limit: usize = params
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        let items: Vec<Value> = objects
            .values()
            .skip(offset)
            .take(limit)
            .map(|o| {
                // A list's items leave out their own kind and apiVersion, as the API does.
                let mut o = (*o).clone();
                let map = o.as_object_mut().unwrap();
                map.shift_remove("kind");
                map.shift_remove("apiVersion");
                o
            })
            .collect();
        let rest = objects.len().saturating_sub(offset + items.len());
        let mut metadata = json!({"resourceVersion": self.version.to_string()});
        if rest > 0 {
            metadata["continue"] = json!((offset + items.len()).to_string());
            metadata["remainingItemCount"] = json!(rest);
        }
        let kind = objects
            .values()
            .next()
            .and_then(|o| o["kind"].as_str())
            .map_or("List".to_string(), |k| format!("{k}List"));
        json_response(
            200,
            &json!({"kind": kind, "apiVersion": "v1", "metadata": metadata, "items": items}),
        )
    }

    fn record(&mut self, version: u64, collection: &str, event: Value) {
        let bytes = line(&event);
        self.watches.retain(|w| w.offer(collection, &event, &bytes));
        self.history.push((version, collection.to_string(), event));
    }

    fn watch(
        &mut self,
        path: &str,
        namespace: Option<&str>,
        params: &BTreeMap<&str, &str>,
    ) -> http::Response<Body> {
        let (tx, rx) = mpsc::unbounded_channel();
        let watch = Watch {
            collection: path.to_string(),
            namespace: namespace.map(str::to_string),
            tx: tx.clone(),
        };
        let from: u64 = params
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if from == 0 {
            // "Any version": the objects as they are now, each as ADDED.
            for obj in self.objects.get(path).into_iter().flat_map(|o| o.values()) {
                let event = json!({"type": "ADDED", "object": obj});
                watch.offer(path, &event, &line(&event));
            }
            self.watches.push(watch);
        } else if from < self.compacted {
            // What the API server does: a 200 whose one event is the error, then the end.
            let gone = status(
                410,
                "Expired",
                &format!("too old resource version: {from} ({})", self.compacted),
            );
            let _ = tx.send(Ok(line(&json!({"type": "ERROR", "object": gone}))));
        } else {
            for (_, collection, event) in self.history.iter().filter(|(v, _, _)| *v > from) {
                watch.offer(collection, event, &line(event));
            }
            self.watches.push(watch);
        }
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(|chunk| chunk.map(Frame::data));
        let mut resp = http::Response::new(BodyExt::boxed(StreamBody::new(stream)));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        resp
    }
}

fn line(event: &Value) -> Bytes {
    let mut text = event.to_string();
    text.push('\n');
    Bytes::from(text)
}
