//! Small HTTP/1.1 ports (the proxy's admin, the control plane's admin and its webhook) served
//! so that whoever reaches them cannot hold more than their share: a cap on open connections,
//! deadlines for the TLS handshake and for each request's headers, and a longest life for a
//! connection, after which it is closed gracefully (a request in flight finishes).
//!
//! Past the cap a new connection is closed at once and counted. These ports answer probes,
//! scrapes and the API server; none of them needs a connection that lives for minutes.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// For the TLS handshake, and for each request's header block.
    pub header_read: Duration,
    /// A connection is closed gracefully this long after it was accepted.
    pub max_age: Duration,
    pub max_header_bytes: usize,
}

impl Limits {
    /// Probes, scrapes and status pages: a few callers, each done in well under a second.
    pub const ADMIN: Limits = Limits {
        max_connections: 64,
        header_read: Duration::from_secs(10),
        max_age: Duration::from_secs(60),
        max_header_bytes: 16 * 1024,
    };
}

/// A listener's cap, and how many connections it turned away.
pub struct Gate {
    permits: Arc<Semaphore>,
    refused: AtomicU64,
    pub limits: Limits,
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            refused: AtomicU64::new(0),
            limits,
        })
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max_connections - self.permits.available_permits()
    }
}

/// The address a request's connection came from, in the request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Accepts on `listener` until the process ends; each admitted connection, after `handshake`
/// (TLS, or nothing), is served HTTP/1.1 by `handle`. Each request carries its connection's
/// `PeerAddr`.
pub async fn serve<H, Fut, B, Hs, HsFut, IO>(
    listener: TcpListener,
    gate: Arc<Gate>,
    handshake: Hs,
    handle: H,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    Hs: Fn(tokio::net::TcpStream) -> HsFut + Clone + Send + Sync + 'static,
    HsFut: Future<Output = std::io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors and the like: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = gate.permits.clone().try_acquire_owned() else {
            gate.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (limits, handshake, handle) = (gate.limits, handshake.clone(), handle.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(io)) = tokio::time::timeout(limits.header_read, handshake(stream)).await
            else {
                return;
            };
            let svc = service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .serve_connection(TokioIo::new(io), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = tokio::time::sleep(limits.max_age) => {
                    conn.as_mut().graceful_shutdown();
                    // A request still running gets one more header-read's worth of time.
                    let _ = tokio::time::timeout(limits.header_read, conn).await;
                }
            }
        });
    }
}

/// The handshake of a plaintext port: none.
pub async fn plaintext(stream: tokio::net::TcpStream) -> std::io::Result<tokio::net::TcpStream> {
    Ok(stream)
}
