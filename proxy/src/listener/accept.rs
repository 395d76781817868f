//! Accepting connections and serving each one with the protocol it speaks.
//!
//! Every connection watches the shutdown signal. On drain, HTTP/1 connections finish the
//! request in flight and close; HTTP/2 connections send GOAWAY and finish their streams;
//! opaque TCP runs on until the drain deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::cluster::balance::Cluster;
use crate::config::file::{ListenerProtocol, TlsMode};
use crate::config::snapshot::{Listener, RuntimeConfig};
use crate::identity::mtls;
use crate::listener::arrival::{Arrival, arrive, first_bytes, tcp_idle_timeout};
use crate::listener::http::serve_http;
use crate::listener::tcp;
use crate::net::detect::{self, Protocol};
use crate::route::destinations::Service;
use crate::stack::peer::Peer;
use crate::stack::{self, exchange::HttpContext};
use outrigger_core::prefixed::Prefixed;
use outrigger_core::spiffe::SpiffeId;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Shutdown {
    pub signal: watch::Receiver<bool>,
    /// Held by every open connection; the drain waits until all are dropped.
    pub tracker: mpsc::Sender<()>,
    /// Connections open on the listeners of this signal: while the app still has outbound
    /// connections, it is still running and the outbound side stays up.
    pub open: Arc<AtomicUsize>,
}

impl Clone for Shutdown {
    fn clone(&self) -> Self {
        Shutdown {
            signal: self.signal.clone(),
            tracker: self.tracker.clone(),
            open: self.open.clone(),
        }
    }
}

/// What a connection's task needs of its listener's `Shutdown`: the signal to drain on, and
/// the tracker the drain waits on.
pub(super) struct Drain {
    pub(super) signal: watch::Receiver<bool>,
    pub(super) tracker: mpsc::Sender<()>,
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        OpenConnection(count.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many finished handshakes a listener's socket holds before it is accepted. The
/// standard library's 128 is soon full under a burst of connections (a service scaling up,
/// a pool reconnecting), and every connection past it waits a second for its SYN to be sent
/// again. The kernel caps it at `net.core.somaxconn`.
const BACKLOG: u32 = 1024;

/// A listening socket with the backlog above.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

pub async fn accept_loop(listener: TcpListener, ctx: Arc<HttpContext>, shutdown: Shutdown) {
    let mut signal = shutdown.signal.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let drain = Drain {
                        signal: shutdown.signal.clone(),
                        tracker: shutdown.tracker.clone(),
                    };
                    let open = OpenConnection::new(&shutdown.open);
                    tokio::spawn(serve_connection(stream, ctx.clone(), drain, open));
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = signal.changed() => break,
        }
    }
    // Dropping the socket here makes new connections fail at once.
}

/// A connection's task. Until the first bytes arrive it holds only the socket, the service
/// it was sent to, and a timer: detection, the TLS handshake, HTTP serving and the TCP proxy
/// are each boxed when reached, so a connection that has sent nothing costs little more
/// than its socket.
// Not an `async fn`: one of those keeps its arguments twice (416 bytes against 336).
#[allow(clippy::manual_async_fn)]
fn serve_connection(
    stream: TcpStream,
    ctx: Arc<HttpContext>,
    shutdown: Drain,
    open: OpenConnection,
) -> impl Future<Output = ()> + Send {
    async move {
        // Moved in and dropped with the task, without a second copy in its state.
        let _ = &open;
        let (service, detect) = match arrive(&stream, &ctx) {
            Arrival::Refused => return,
            Arrival::Passthrough(to, idle) => {
                return Box::pin(passthrough(stream, to, idle, &ctx, shutdown)).await;
            }
            Arrival::Mesh(service, detect) => (service, detect),
        };
        ctx.connections.open.inc();
        let detect = match detect {
            Some(deadline) => Some(first_bytes(&stream, deadline).await),
            None => None,
        };
        let start = Start::New(detect);
        let rested = Box::pin(serve_mesh(stream, service, start, &ctx, shutdown)).await;
        // Boxed before the wait, so that what rests is in the box and not in this future.
        let kept = rested.map(|rested| Box::pin(keep_alive(rested, &ctx)));
        if let Some(kept) = kept {
            kept.await;
        }
        ctx.connections.open.dec();
    }
}

/// A plaintext HTTP/1 connection between its rests: it waits for its next bytes holding
/// only what `Rested` keeps, and is served again from the start when they come.
// Not an `async fn`, which would keep its argument twice.
#[allow(clippy::manual_async_fn)]
fn keep_alive(mut rested: Rested, ctx: &Arc<HttpContext>) -> impl Future<Output = ()> + Send + '_ {
    async move {
        loop {
            first_bytes(&rested.stream, rested.idle_by).await;
            // Idle past its timeout: closed. The drain does not wait for a resting
            // connection, and one that wakes after it ended is closed too.
            if tokio::time::Instant::now() >= rested.idle_by {
                return;
            }
            let Some(tracker) = rested.tracker.upgrade() else {
                return;
            };
            let drain = Drain {
                signal: rested.signal,
                tracker,
            };
            let served = serve_mesh(rested.stream, rested.service, Start::Rested, ctx, drain);
            match Box::pin(served).await {
                Some(again) => rested = again,
                None => return,
            }
        }
    }
}

/// How a connection comes to `serve_mesh`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Newly accepted; its protocol is to be detected by this deadline, when given.
    New(Option<tokio::time::Instant>),
    /// A plaintext HTTP/1 connection that rested and has something to read again.
    Rested,
}

/// What a plaintext HTTP/1 connection that rested hands back to its task: its socket and
/// what its next request needs, but nothing that holds the drain open. Everything else it
/// had (hyper's connection, its buffers, the serving futures) is given back.
struct Rested {
    stream: TcpStream,
    service: Service,
    idle_by: tokio::time::Instant,
    signal: watch::Receiver<bool>,
    tracker: mpsc::WeakSender<()>,
}

/// A connection to a destination outside the mesh, copied through as it is.
async fn passthrough(
    stream: TcpStream,
    to: std::net::SocketAddr,
    idle: Duration,
    ctx: &HttpContext,
    shutdown: Drain,
) {
    let _guard = shutdown.tracker;
    let result = tcp::passthrough(stream, to, idle).await;
    let name = ctx.config.load().listeners[ctx.listener].name.clone();
    match result {
        Ok(n) => ctx.metrics.tcp_bytes(&name, n),
        Err(e) => {
            tracing::debug!(error = %e, listener = %name, %to, "passthrough ended");
            ctx.metrics.connection_error(&name);
        }
    }
}

/// A connection of the mesh's, once it has sent something (or its wait is over): its
/// protocol, then the stage that serves it.
async fn serve_mesh(
    stream: TcpStream,
    redirected: Service,
    start: Start,
    ctx: &Arc<HttpContext>,
    shutdown: Drain,
) -> Option<Rested> {
    let client_addr = stream.peer_addr().ok();
    let snapshot = ctx.config.load_full();
    let listener = &snapshot.listeners[ctx.listener];
    let name = listener.name.clone();
    let opaque_service = redirected.cluster.as_ref().is_some_and(|c| c.opaque);
    let detect_by = match start {
        Start::New(detect_by) => detect_by,
        Start::Rested => None,
    };
    let (protocol, io) = match listener.protocol {
        _ if start == Start::Rested => (Protocol::Http1, Prefixed::new(stream)),
        _ if opaque_service => (Protocol::Opaque, Prefixed::new(stream)),
        ListenerProtocol::Http1 => (Protocol::Http1, Prefixed::new(stream)),
        ListenerProtocol::Http2 => (Protocol::Http2, Prefixed::new(stream)),
        ListenerProtocol::Opaque => (Protocol::Opaque, Prefixed::new(stream)),
        ListenerProtocol::Detect => {
            let deadline =
                detect_by.unwrap_or_else(|| tokio::time::Instant::now() + listener.detect_timeout);
            match detect::detect(stream, deadline).await {
                Ok(found) => found,
                Err(_) => return None,
            }
        }
    };
    if start != Start::Rested {
        ctx.connections.opened(protocol.label());
    }
    let strict = listener
        .tls
        .as_ref()
        .is_some_and(|t| t.mode == TlsMode::Strict);
    match protocol {
        Protocol::Tls if listener.tls.is_some() => {
            // The handshake and all after it are boxed: a connection that has sent nothing
            // does not carry them.
            let tls = TlsConnection {
                io,
                snapshot,
                redirected,
                client_addr,
                name: &name,
            };
            Box::pin(serve_tls(tls, ctx, shutdown)).await;
        }
        // Strict mTLS: whatever is not TLS is closed unread.
        _ if strict => {
            tracing::debug!(listener = %name, "plaintext refused in strict mTLS mode");
            ctx.metrics.plaintext_refused(&name);
        }
        Protocol::Http1 | Protocol::Http2 => {
            let idle = listener.idle_timeout;
            drop(snapshot);
            let peer = Peer::new(
                None,
                client_addr,
                redirected.virtual_host.map(|i| i as usize),
            );
            let (signal, tracker) = (shutdown.signal.clone(), shutdown.tracker.downgrade());
            let serve = serve_http(io, protocol, idle, peer, ctx.clone(), shutdown, true);
            match Box::pin(serve).await {
                Err(_) => ctx.metrics.connection_error(&name),
                Ok(Some((io, idle_by))) => {
                    if let Ok(stream) = io.into_inner() {
                        return Some(Rested {
                            stream,
                            service: redirected,
                            idle_by,
                            signal,
                            tracker,
                        });
                    }
                }
                Ok(None) => {}
            }
        }
        // TLS is passed through untouched until the proxy terminates mTLS itself. Either way
        // the caller proved no identity, and is judged as such.
        Protocol::Tls | Protocol::Opaque => match tcp_route(redirected, listener) {
            _ if !admit_tcp(listener, None, ctx) => drop(snapshot),
            Some((cluster, idle)) => {
                drop(snapshot);
                let _guard = shutdown.tracker;
                Box::pin(proxy_tcp(io, &cluster, idle, ctx, &name)).await;
            }
            None => tracing::debug!(listener = %name, "no tcp route; closing opaque connection"),
        },
    }
    None
}

/// A connection that opened with a TLS ClientHello on a listener that terminates mTLS.
struct TlsConnection<'a> {
    io: Prefixed<TcpStream>,
    snapshot: Arc<RuntimeConfig>,
    redirected: Service,
    client_addr: Option<std::net::SocketAddr>,
    name: &'a str,
}

/// The mTLS handshake, then HTTP or opaque TCP by the ALPN the caller chose.
async fn serve_tls(tls: TlsConnection<'_>, ctx: &Arc<HttpContext>, shutdown: Drain) {
    let TlsConnection {
        io,
        snapshot,
        redirected,
        client_addr,
        name,
    } = tls;
    let listener = &snapshot.listeners[ctx.listener];
    let acceptor = listener.tls.as_ref().expect("checked").acceptor.clone();
    let idle = listener.idle_timeout;
    let handshake = Box::pin(acceptor.accept(io));
    let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, listener = %name, "TLS handshake failed");
            ctx.metrics.tls_handshake_failure(name);
            return;
        }
        Err(_) => return ctx.metrics.tls_handshake_failure(name),
    };
    let conn = stream.get_ref().1;
    let peer = mtls::peer_identity(conn);
    if conn.alpn_protocol() == Some(mtls::ALPN_TCP) {
        let admitted = admit_tcp(listener, peer.as_ref(), ctx);
        let route = tcp_route(redirected, listener);
        drop(snapshot);
        match route {
            _ if !admitted => {}
            Some((cluster, idle)) => {
                let _guard = shutdown.tracker;
                Box::pin(proxy_tcp(stream, &cluster, idle, ctx, name)).await;
            }
            None => tracing::debug!(listener = %name, "no tcp route for mTLS TCP"),
        }
        return;
    }
    let protocol = match conn.alpn_protocol() {
        Some(mtls::ALPN_H2) => Protocol::Http2,
        _ => Protocol::Http1,
    };
    let peer = Peer::new(
        peer.map(Arc::new),
        client_addr,
        redirected.virtual_host.map(|i| i as usize),
    );
    drop(snapshot);
    let serve = serve_http(stream, protocol, idle, peer, ctx.clone(), shutdown, false);
    if Box::pin(serve).await.is_err() {
        ctx.metrics.connection_error(name);
    }
}

/// Opaque TCP to `cluster`, holding one of its connections under the circuit breaker for as
/// long as it lasts; past the breaker's `max_connections` it is closed at once and counted.
async fn proxy_tcp<D>(
    downstream: D,
    cluster: &Cluster,
    idle: Duration,
    ctx: &HttpContext,
    name: &str,
) where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let Some(_connection) = cluster.breaker.try_connection() else {
        ctx.metrics.overflow(&cluster.name, "connections");
        return;
    };
    match tcp::proxy(downstream, cluster, idle).await {
        Ok(n) => ctx.metrics.tcp_bytes(name, n),
        Err(e) => {
            tracing::debug!(error = %e, listener = %name, "tcp proxy ended");
            ctx.metrics.connection_error(name);
        }
    }
}

/// Authorization and the listener's rate limit, for a TCP connection: it has no status code
/// to carry a refusal, so a refused one is just closed (and counted).
fn admit_tcp(listener: &Listener, peer: Option<&SpiffeId>, ctx: &HttpContext) -> bool {
    let request = outrigger_core::authz::Request { peer, http: None };
    if stack::authorize::check(&listener.authorization, &request).is_err() {
        let peer = peer.map(|p| p.to_string());
        ctx.metrics.denied(&listener.name, peer.as_deref());
        return false;
    }
    if let Some(Err(_)) = listener.rate_limit.as_ref().map(|l| l.acquire()) {
        ctx.metrics.rate_limited(ctx.direction, "tcp");
        return false;
    }
    true
}

/// Opaque TCP goes to the dialled service's cluster, else to the listener's `tcp` route.
fn tcp_route(service: Service, listener: &Listener) -> Option<(Arc<Cluster>, Duration)> {
    let idle = tcp_idle_timeout(listener);
    match service.cluster {
        Some(cluster) => Some((cluster, idle)),
        None => listener.tcp.as_ref().map(|r| (r.cluster.clone(), idle)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::snapshot::RuntimeConfig;
    use crate::telemetry::metrics::Metrics;
    use arc_swap::ArcSwap;

    /// Every connection that has sent nothing holds its task's future, so its size is the
    /// floor of what an idle connection costs (the bench's "idle KB/conn").
    /// A detecting inbound listener's context, and a drain signal (with what keeps it open).
    fn context() -> (
        Arc<HttpContext>,
        Drain,
        watch::Sender<bool>,
        mpsc::Receiver<()>,
    ) {
        let yaml = "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    direction: inbound\n";
        let config = RuntimeConfig::build("t.yaml", yaml, 1, None).unwrap();
        assert_eq!(config.listeners[0].protocol, ListenerProtocol::Detect);
        let metrics = Arc::new(Metrics::new());
        let ctx = Arc::new(HttpContext {
            config: Arc::new(ArcSwap::from_pointee(config)),
            listener: 0,
            direction: "inbound",
            connections: metrics.connection_series("in"),
            metrics,
        });
        let (stop, signal) = watch::channel(false);
        let (tracker, drained) = mpsc::channel(1);
        (ctx, Drain { signal, tracker }, stop, drained)
    }

    #[tokio::test]
    async fn a_connection_that_has_sent_nothing_holds_a_small_future() {
        let (ctx, shutdown, _stop, _drained) = context();
        let open = OpenConnection::new(&Arc::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let task = serve_connection(stream, ctx, shutdown, open);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 272, "the connection future is {size} bytes");
    }

    /// A plaintext keep-alive connection that has rested holds its task's future and this
    /// one, and nothing else: its size is most of what such a connection costs (the bench's
    /// "quiet KB/conn"). The serving future it was (over a kilobyte, with room for hyper's
    /// connection) is given back.
    #[tokio::test]
    async fn a_resting_connection_holds_a_small_future() {
        let (ctx, shutdown, _stop, _drained) = context();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let rested = Rested {
            stream,
            service: Service::default(),
            idle_by: tokio::time::Instant::now() + Duration::from_secs(60),
            signal: shutdown.signal.clone(),
            tracker: shutdown.tracker.downgrade(),
        };
        let task = keep_alive(rested, &ctx);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 232, "a resting connection's future is {size} bytes");
    }

    /// Nobody accepts here: whatever connects is held by the backlog alone, and a connection
    /// past it would hang on SYN retransmits.
    #[tokio::test]
    async fn a_burst_of_connections_fits_in_the_backlog() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for i in 0..400 {
            let connected =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await;
            match connected {
                Ok(Ok(stream)) => held.push(stream),
                _ => panic!("connection {i} was not taken into the backlog"),
            }
        }
    }
}
