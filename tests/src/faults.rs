//! A fault-injecting HTTP/1.1 upstream, written on raw sockets so that it can misbehave in
//! ways a well-behaved server library will not: reset the connection, hang, or close in the
//! middle of a body.
//!
//! What it does is chosen per request by the path, or for every request by its `Faults`
//! handle (a share of failures, for chaos under load):
//! - `/status/<code>`: answer with that status;
//! - `/fail/<n>/<code>/<key>`: the first `n` requests for `key` get `code`, later ones 200;
//! - `/retry-after/<secs>/<key>`: the first request for `key` gets 503 with
//!   `Retry-After: <secs>`, later ones 200;
//! - `/delay/<ms>`: answer after that long;
//! - `/hang`: read the request and never answer;
//! - `/reset`: reset the connection (RST) instead of answering;
//! - `/close-mid-body`: promise 100 bytes, send 10, close;
//! - `/first/<fault>/<key>`: the first request for `key` meets that fault (`hang`, `reset`,
//!   `close-mid-body`), later ones get 200.
//!
//! Every 200 carries the upstream's name as its body. Refusing connections, dying and coming
//! back are the `Upstream`'s own: drop it, and start another `faulty_at` the same address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::upstreams::Upstream;

/// Shared by an upstream and the test that drives it, and by its later incarnations.
#[derive(Default)]
pub struct Faults {
    /// Percent of requests (on any path) answered with `fail_status` instead.
    pub fail_percent: AtomicU32,
    pub fail_status: AtomicU32,
    /// Requests read, whatever came of them.
    pub requests: AtomicU64,
    /// Requests per path, to count attempts.
    pub seen: Mutex<HashMap<String, u32>>,
}

impl Faults {
    pub fn fail(&self, percent: u32, status: u16) {
        self.fail_status.store(u32::from(status), Ordering::Relaxed);
        self.fail_percent.store(percent, Ordering::Relaxed);
    }

    pub fn seen(&self, path: &str) -> u32 {
        self.seen.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

pub async fn faulty(name: &'static str) -> (Upstream, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let up = faulty_at(name, "127.0.0.1:0".parse().unwrap(), faults.clone()).await;
    (up, faults)
}

/// A faulty upstream on a given address, sharing counters with an earlier one there.
pub async fn faulty_at(name: &'static str, addr: SocketAddr, faults: Arc<Faults>) -> Upstream {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        // Connections live in the set, so that dropping the upstream kills them too: a dead
        // process keeps no keep-alive connection open.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let faults = faults.clone();
                    connections.spawn(async move {
                        let _ = connection(name, stream, &faults).await;
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    Upstream::from_task(addr, task)
}

struct Head {
    path: String,
    length: usize,
    consumed: usize,
}

fn parse_head(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(consumed) = req.parse(buf).ok()? else {
        return None;
    };
    let length = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0);
    Some(Head {
        path: req.path.unwrap_or("/").to_string(),
        length,
        consumed,
    })
}

async fn connection(name: &str, mut stream: TcpStream, faults: &Faults) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let head = loop {
            if let Some(head) = parse_head(&buf) {
                break head;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        while buf.len() < head.consumed + head.length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..head.consumed + head.length);

        faults.requests.fetch_add(1, Ordering::Relaxed);
        let count = {
            let mut seen = faults.seen.lock().unwrap();
            let c = seen.entry(head.path.clone()).or_default();
            *c += 1;
            *c
        };
        let mut parts: Vec<&str> = head.path.trim_start_matches('/').split('/').collect();
        if let ["first", fault, _] = parts.as_slice() {
            parts = if count == 1 { vec![*fault] } else { vec!["ok"] };
        }
        let mut status = 200u16;
        let mut extra = String::new();
        match parts.as_slice() {
            ["status", code] => status = code.parse().unwrap_or(500),
            ["fail", n, code, _] if count <= n.parse().unwrap_or(0) => {
                status = code.parse().unwrap_or(500)
            }
            ["retry-after", secs, _] if count == 1 => {
                status = 503;
                extra = format!("retry-after: {secs}\r\n");
            }
            ["delay", ms] => {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await
            }
            ["hang"] => std::future::pending::<()>().await,
            ["reset"] => {
                stream.set_zero_linger()?;
                return Ok(());
            }
            ["close-mid-body"] => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await?;
                return stream.shutdown().await;
            }
            _ => {}
        }
        let percent = faults.fail_percent.load(Ordering::Relaxed);
        if status == 200 && percent > 0 && fastrand::u32(0..100) < percent {
            status = faults.fail_status.load(Ordering::Relaxed) as u16;
        }
        let body = if status == 200 { name } else { "failed" };
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nx-upstream: {name}\r\n{extra}\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
    }
}

/// An HTTP/2 upstream that refuses the first stream it is sent (RST_STREAM with
/// REFUSED_STREAM, which promises the request was not processed) and answers the rest with
/// 200. Returns the upstream and how many streams it has seen.
pub async fn refuses_first_stream() -> (Upstream, Arc<AtomicU32>) {
    let seen = Arc::new(AtomicU32::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = seen.clone();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            connections.spawn(async move {
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if counter.fetch_add(1, Ordering::Relaxed) == 0 {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let resp = http::Response::new(());
                    if let Ok(mut body) = respond.send_response(resp, false) {
                        let _ = body.send_data(bytes::Bytes::from_static(b"ok"), true);
                    }
                }
            });
        }
    });
    (Upstream::from_task(addr, task), seen)
}
