//! Accepting connections and serving each one with the protocol it speaks.
//!
//! Every connection watches the shutdown signal. On drain, HTTP/1 connections finish the
//! request in flight and close; HTTP/2 connections send GOAWAY and finish their streams;
//! opaque TCP runs on until the drain deadline.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::cluster::balance::Cluster;
use crate::config::file::{ListenerProtocol, TlsMode};
use crate::config::snapshot::{Listener, RuntimeConfig};
use crate::identity::mtls;
use crate::listener::arrival::{Arrival, arrive, first_bytes, tcp_idle_timeout};
use crate::listener::rest::{self, ReadReady, Resting};
use crate::listener::tcp;
use crate::net::detect::{self, Protocol};
use crate::route::destinations::Service;
use crate::stack::idle::{Activity, Quiet, Tracked};
use crate::stack::peer::Peer;
use crate::stack::{self, exchange::HttpContext};
use outrigger_core::prefixed::Prefixed;
use outrigger_core::spiffe::SpiffeId;

/// Protects the proxy from peers that send huge or endless headers.
const MAX_HEADER_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
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
struct Drain {
    signal: watch::Receiver<bool>,
    tracker: mpsc::Sender<()>,
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
        Box::pin(serve_mesh(stream, service, detect, &ctx, shutdown)).await;
        ctx.connections.open.dec();
    }
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
    detect_by: Option<tokio::time::Instant>,
    ctx: &Arc<HttpContext>,
    shutdown: Drain,
) {
    let client_addr = stream.peer_addr().ok();
    let snapshot = ctx.config.load_full();
    let listener = &snapshot.listeners[ctx.listener];
    let name = listener.name.clone();
    let opaque_service = redirected.cluster.as_ref().is_some_and(|c| c.opaque);
    let (protocol, io) = match listener.protocol {
        _ if opaque_service => (Protocol::Opaque, Prefixed::new(stream)),
        ListenerProtocol::Http1 => (Protocol::Http1, Prefixed::new(stream)),
        ListenerProtocol::Http2 => (Protocol::Http2, Prefixed::new(stream)),
        ListenerProtocol::Opaque => (Protocol::Opaque, Prefixed::new(stream)),
        ListenerProtocol::Detect => {
            let deadline =
                detect_by.unwrap_or_else(|| tokio::time::Instant::now() + listener.detect_timeout);
            match detect::detect(stream, deadline).await {
                Ok(found) => found,
                Err(_) => return,
            }
        }
    };
    ctx.connections.opened(protocol.label());
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
            if Box::pin(serve_http(io, protocol, idle, peer, ctx.clone(), shutdown))
                .await
                .is_err()
            {
                ctx.metrics.connection_error(&name);
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
    let serve = serve_http(stream, protocol, idle, peer, ctx.clone(), shutdown);
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

async fn serve_http<I>(
    io: I,
    protocol: Protocol,
    idle: Duration,
    peer: Peer,
    ctx: Arc<HttpContext>,
    shutdown: Drain,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
{
    let Drain {
        mut signal,
        tracker,
    } = shutdown;
    let mut peer = peer;
    peer.drain = Some(tracker.clone());
    let _guard = tracker;
    let activity = Arc::new(Activity::default());
    let handler = {
        let activity = activity.clone();
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            let in_flight = activity.request(rest::leaves_parser_idle(&req));
            req.extensions_mut().insert(peer.clone());
            let ctx = ctx.clone();
            async move {
                let resp = stack::handle(ctx, req).await?;
                Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, in_flight)))
            }
        }
    };
    if protocol == Protocol::Http2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .serve_connection(TokioIo::new(io), service_fn(handler));
        tokio::pin!(conn);
        if *signal.borrow() {
            conn.as_mut().graceful_shutdown();
        }
        return tokio::select! {
            res = conn.as_mut() => res,
            _ = signal.changed() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            _ = activity.idle_for(idle) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
    }
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    // hyper keeps room for one request's future in every HTTP/1 connection from its start:
    // boxed, that room is a pointer, and the future exists only while a request is in flight.
    let mut service = service_fn(move |req| Box::pin(handler(req)));
    let mut io = Resting::new(io, activity.clone());
    loop {
        let mut conn = http1
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        if *signal.borrow() {
            Pin::new(&mut conn).graceful_shutdown();
        }
        let quiet = tokio::select! {
            res = &mut conn => return res,
            _ = signal.changed() => Quiet::Idle,
            quiet = activity.quiet_for(idle, Some(rest::REST_AFTER)) => quiet,
        };
        if quiet == Quiet::Idle {
            Pin::new(&mut conn).graceful_shutdown();
            return conn.await;
        }
        // Upgraded connections have resolved above, so the parts are there.
        let Some(parts) = conn.into_parts() else {
            return Ok(());
        };
        service = parts.service;
        io = parts.io.into_inner();
        if io.put_back(parts.read_buf) {
            activity.hold_rest();
            continue;
        }
        tokio::select! {
            ready = io.readable() => if ready.is_err() { return Ok(()) },
            _ = signal.changed() => return Ok(()),
            _ = activity.idle_for(idle) => return Ok(()),
        }
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
    #[tokio::test]
    async fn a_connection_that_has_sent_nothing_holds_a_small_future() {
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
        let (_stop, signal) = watch::channel(false);
        let (tracker, _drained) = mpsc::channel(1);
        let shutdown = Drain { signal, tracker };
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
