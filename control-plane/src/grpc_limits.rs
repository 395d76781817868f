//! Bounds on the control plane's gRPC ports (ADS, and the CA's `Sign`): whoever reaches them
//! can hold at most `MAX_CONNECTIONS` connections, each with at most `MAX_STREAMS` streams; a
//! connection that has not sent the HTTP/2 preface within `HANDSHAKE_TIMEOUT` is closed; a
//! peer that stops answering PINGs is dropped; and every connection is recycled after
//! `MAX_CONNECTION_AGE`, which a proxy's xDS client takes as an ordinary reconnect.

use outrigger_core::spiffe::SpiffeId;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use outrigger_core::prefixed::Prefixed;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::transport::server::Connected;

/// Who is on a connection to a gRPC port, in each request's extensions: where it came from,
/// whether it is the TLS port, and the identity its certificate proved there, if any.
#[derive(Clone, Debug)]
pub struct Caller {
    pub addr: Option<std::net::SocketAddr>,
    pub tls: bool,
    pub identity: Option<SpiffeId>,
}

/// Enough for 10,000 proxies with a connection each, as sidecars connect, with room to
/// spare for a rollout's overlap. The process needs as many file descriptors.
pub const MAX_CONNECTIONS: usize = 16_384;
/// An ADS client needs one or two streams; the headroom is for multiplexing test clients.
pub const MAX_STREAMS: u32 = 128;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);

/// What every gRPC port of the control plane is served with.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_connection_age(MAX_CONNECTION_AGE)
        .tcp_nodelay(true)
}

/// A port's connection cap, and how often it turned a connection away.
pub struct Gate {
    permits: Arc<Semaphore>,
    pub refused: AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            refused: AtomicU64::new(0),
        }
    }
}

impl Gate {
    /// A place for one more connection, or `None` (counted) at the cap.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        permit
    }

    pub fn open(&self) -> usize {
        MAX_CONNECTIONS - self.permits.available_permits()
    }
}

/// A connection that holds its place under the cap for as long as it lives, with what it
/// tells the services about its caller (`info`: nothing for plaintext, which proves nothing).
pub struct Admitted<S, I = ()> {
    inner: S,
    info: I,
    _permit: OwnedSemaphorePermit,
}

impl<S, I> Admitted<S, I> {
    pub fn new(inner: S, info: I, permit: OwnedSemaphorePermit) -> Self {
        Admitted {
            inner,
            info,
            _permit: permit,
        }
    }
}

impl<S, I: Clone + Send + Sync + 'static> Connected for Admitted<S, I> {
    type ConnectInfo = I;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin, I: Unpin> AsyncRead for Admitted<S, I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, I: Unpin> AsyncWrite for Admitted<S, I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The HTTP/2 client preface: `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;

/// Connections on `listener`, admitted under `gate`, each handed on once `handshake` has
/// finished with it within `HANDSHAKE_TIMEOUT`, in a task of its own (a slow client must not
/// hold up the others). A handshake that fails, or says `None`, closes the connection.
pub fn incoming<S, I, H, Fut>(
    listener: TcpListener,
    gate: Arc<Gate>,
    handshake: H,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Admitted<S, I>>>
where
    S: Send + 'static,
    I: Send + 'static,
    H: Fn(TcpStream) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Option<(S, I)>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            // The server builder's `tcp_nodelay` reaches only sockets tonic accepts itself.
            // Without it, a stream's headers and its first message leave as two segments,
            // and Nagle holds the second until the peer's delayed ACK (40 ms).
            let _ = tcp.set_nodelay(true);
            let Some(permit) = gate.admit() else {
                continue;
            };
            let (tx, handshake) = (tx.clone(), handshake.clone());
            tokio::spawn(async move {
                if let Ok(Some((conn, info))) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp)).await
                {
                    let _ = tx.send(Ok(Admitted::new(conn, info, permit))).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Plaintext connections, each handed on only once it has sent as many bytes as the HTTP/2
/// preface: a client that connects and says nothing, or half of it, holds its place for
/// `HANDSHAKE_TIMEOUT`, not forever.
pub fn plaintext_incoming(
    listener: TcpListener,
    gate: Arc<Gate>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Admitted<Prefixed<TcpStream>, Caller>>>
{
    incoming(listener, gate, |mut tcp: TcpStream| async move {
        let read = read_preface(&mut tcp).await?;
        let caller = Caller {
            addr: tcp.peer_addr().ok(),
            tls: false,
            identity: None,
        };
        Some((Prefixed::with_prefix(tcp, read), caller))
    })
}

/// Reads until the preface's length has arrived; `None` if the peer closed first. What was
/// read is handed back, to be replayed to the HTTP/2 server.
async fn read_preface(tcp: &mut TcpStream) -> Option<BytesMut> {
    let mut buf = BytesMut::with_capacity(PREFACE_LEN);
    while buf.len() < PREFACE_LEN {
        match tcp.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
    Some(buf)
}
