//! Live requests, for `tap`: each request's method, authority, path, status, latency, caller
//! and trace ID, streamed from the admin port as JSON lines to whoever is watching.
//!
//! While nobody watches, a request pays one atomic load. While someone does, each request is
//! published once into a bounded broadcast ring; a watcher that falls behind loses the oldest
//! (and is told how many), so a slow watcher never slows the proxy or grows its memory. Each
//! watcher also has its own rate cap. Nothing else of a request is shown: no body, no header
//! value, and no query string (it may carry tokens).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::StreamBody;
use hyper::body::Frame;
use outrigger_core::token_bucket::RateLimiter;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// Events held for watchers that are behind.
const RING: usize = 1024;
/// Events per second a watcher gets unless it asks for fewer...
const DEFAULT_RATE: f64 = 100.0;
/// ...and at most.
const MAX_RATE: f64 = 1000.0;
/// Watchers at once, on one proxy.
pub const MAX_WATCHERS: usize = 8;

pub struct TapHub {
    watchers: AtomicUsize,
    tx: broadcast::Sender<Arc<TapEvent>>,
}

impl Default for TapHub {
    fn default() -> Self {
        TapHub {
            watchers: AtomicUsize::new(0),
            tx: broadcast::channel(RING).0,
        }
    }
}

/// What is taken of a request as it arrives, only while someone watches.
pub struct TapStart {
    pub method: Method,
    pub authority: String,
    pub path: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TapEvent {
    pub direction: &'static str,
    pub method: String,
    pub authority: String,
    /// Without its query string.
    pub path: String,
    pub status: u16,
    pub latency_ms: f64,
    pub route: String,
    /// The SPIFFE ID the caller proved, if it did.
    pub caller: Option<String>,
    pub caller_address: Option<String>,
    pub trace_id: Option<String>,
}

impl TapHub {
    /// Takes what the event needs of the request, if anyone is watching.
    pub fn begin<B>(&self, req: &Request<B>) -> Option<TapStart> {
        if self.watchers.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default();
        Some(TapStart {
            method: req.method().clone(),
            authority: authority.chars().take(256).collect(),
            path: req.uri().path().chars().take(1024).collect(),
        })
    }

    /// Publishes a finished request to the watchers.
    pub fn publish(&self, event: TapEvent) {
        // No receiver left (the last watcher just went): nothing to do.
        let _ = self.tx.send(Arc::new(event));
    }

    /// A new watcher's stream of JSON lines, or `None` when `MAX_WATCHERS` already watch.
    pub fn watch(self: &Arc<Self>, filter: TapFilter) -> Option<TapBody> {
        let watching = self.watchers.fetch_add(1, Ordering::Relaxed);
        if watching >= MAX_WATCHERS {
            self.watchers.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let guard = Watching(self.clone());
        let mut rx = self.tx.subscribe();
        let (out, body) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
        tokio::spawn(async move {
            let _guard = guard;
            let limiter = RateLimiter::new(filter.rate, filter.rate.ceil() as u32);
            let (mut sent, mut dropped) = (0u64, 0u64);
            loop {
                let received = tokio::select! {
                    received = rx.recv() => received,
                    // The watcher hung up while nothing happened.
                    () = out.closed() => return,
                };
                let event = match received {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        dropped += n;
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if !filter.matches(&event) {
                    continue;
                }
                if limiter.acquire().is_err() {
                    dropped += 1;
                    continue;
                }
                let mut line = String::new();
                if dropped > 0 {
                    line = serde_json::json!({ "dropped": dropped }).to_string() + "\n";
                    dropped = 0;
                }
                line += &serde_json::to_string(&*event).unwrap_or_default();
                line.push('\n');
                // The watcher hung up.
                if out.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                    return;
                }
                sent += 1;
                if filter.max.is_some_and(|max| sent >= max) {
                    return;
                }
            }
        });
        Some(StreamBody::new(ReceiverStream::new(body)))
    }

    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }
}

pub type TapBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// Held by a watcher's task: the hub counts it while it lives.
struct Watching(Arc<TapHub>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which requests a watcher wants, from `/tap`'s query.
#[derive(Debug, Clone, PartialEq)]
pub struct TapFilter {
    pub path_prefix: Option<String>,
    pub method: Option<String>,
    /// A status (`503`) or a class (`5xx`).
    pub status: Option<String>,
    /// A SPIFFE ID, or its start (`spiffe://cluster.local/ns/shop/`).
    pub caller: Option<String>,
    pub authority: Option<String>,
    pub rate: f64,
    /// Stop after this many events.
    pub max: Option<u64>,
}

impl TapFilter {
    /// Reads `path`, `method`, `status`, `caller`, `authority`, `rate` and `max` from a query
    /// string (values percent-encoded).
    pub fn parse(query: Option<&str>) -> Result<TapFilter, String> {
        let mut f = TapFilter {
            path_prefix: None,
            method: None,
            status: None,
            caller: None,
            authority: None,
            rate: DEFAULT_RATE,
            max: None,
        };
        for pair in outrigger_core::query::pairs(query) {
            let (key, value) = pair.map_err(|key| format!("{key}: bad encoding"))?;
            if value.len() > 1024 {
                return Err(format!("{key}: longer than 1024 bytes"));
            }
            match key {
                "path" => f.path_prefix = Some(value),
                "method" => f.method = Some(value.to_ascii_uppercase()),
                "status" => {
                    let ok = value.len() == 3
                        && (value.bytes().all(|b| b.is_ascii_digit())
                            || (value.as_bytes()[0].is_ascii_digit() && &value[1..] == "xx"));
                    if !ok {
                        return Err(format!("status: `{value}` is not like 503 or 5xx"));
                    }
                    f.status = Some(value);
                }
                "caller" => f.caller = Some(value),
                "authority" => f.authority = Some(value),
                "rate" => {
                    f.rate = value
                        .parse::<f64>()
                        .ok()
                        .filter(|r| *r >= 1.0)
                        .ok_or_else(|| format!("rate: `{value}` is not a number of at least 1"))?
                        .min(MAX_RATE)
                }
                "max" => {
                    f.max = Some(
                        value
                            .parse()
                            .map_err(|_| format!("max: `{value}` is not a count"))?,
                    )
                }
                other => return Err(format!("unknown filter `{other}`")),
            }
        }
        Ok(f)
    }

    pub fn matches(&self, e: &TapEvent) -> bool {
        let status = e.status.to_string();
        self.path_prefix
            .as_ref()
            .is_none_or(|p| e.path.starts_with(p.as_str()))
            && self.method.as_ref().is_none_or(|m| *m == e.method)
            && self
                .status
                .as_ref()
                .is_none_or(|s| match s.strip_suffix("xx") {
                    Some(class) => status.starts_with(class),
                    None => *s == status,
                })
            && self.caller.as_ref().is_none_or(|c| {
                e.caller
                    .as_ref()
                    .is_some_and(|id| id.starts_with(c.as_str()))
            })
            && self
                .authority
                .as_ref()
                .is_none_or(|a| e.authority == *a || e.authority.split(':').next() == Some(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str, status: u16, caller: Option<&str>) -> TapEvent {
        TapEvent {
            direction: "inbound",
            method: "GET".into(),
            authority: "api:8080".into(),
            path: path.into(),
            status,
            latency_ms: 1.0,
            route: "r".into(),
            caller: caller.map(str::to_string),
            caller_address: None,
            trace_id: None,
        }
    }

    #[test]
    fn filters_read_from_the_query_select_events() {
        let f = TapFilter::parse(Some(
            "path=%2Fapi&method=get&status=5xx&caller=spiffe%3A%2F%2Ft%2Fns%2Fshop%2F&authority=api",
        ))
        .unwrap();
        let id = Some("spiffe://t/ns/shop/sa/web");
        assert!(f.matches(&event("/api/x", 503, id)));
        assert!(!f.matches(&event("/other", 503, id)));
        assert!(!f.matches(&event("/api/x", 200, id)));
        assert!(!f.matches(&event("/api/x", 503, None)));
        assert!(!f.matches(&event("/api/x", 503, Some("spiffe://t/ns/other/sa/web"))));
        assert!(
            TapFilter::parse(None)
                .unwrap()
                .matches(&event("/", 200, None))
        );
    }

    #[test]
    fn bad_filters_are_refused_with_their_name() {
        for (query, names) in [
            ("status=5x", "status"),
            ("rate=0", "rate"),
            ("max=many", "max"),
            ("body=1", "body"),
            ("path=%zz", "path"),
        ] {
            let err = TapFilter::parse(Some(query)).unwrap_err();
            assert!(err.contains(names), "{query}: {err}");
        }
        assert_eq!(TapFilter::parse(Some("rate=5000")).unwrap().rate, MAX_RATE);
    }

    #[tokio::test]
    async fn watchers_are_capped_and_counted_while_they_watch() {
        let hub = Arc::new(TapHub::default());
        let bodies: Vec<_> = (0..MAX_WATCHERS)
            .map(|_| hub.watch(TapFilter::parse(None).unwrap()).expect("room"))
            .collect();
        assert!(hub.watch(TapFilter::parse(None).unwrap()).is_none());
        assert_eq!(hub.watchers(), MAX_WATCHERS);
        drop(bodies);
        // Each watcher's task notices its watcher is gone, with no event to wake it.
        for _ in 0..100 {
            if hub.watchers() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(hub.watchers(), 0);
        assert!(hub.begin(&Request::new(())).is_none(), "nobody watches");
    }
}
