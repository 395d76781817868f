//! An HTTP/1 keep-alive connection that has been quiet for a while gives back hyper's
//! buffers (8 KB to read and 8 KB to write, kept by hyper for the connection's life) and
//! waits for its next request holding little more than its socket. In a mesh an inbound
//! sidecar holds a keep-alive connection from every caller, so this is the memory that grows
//! with the mesh.
//!
//! hyper has no setting for this, so the connection is taken apart (`into_parts`) and a new
//! one is made over the same socket when the next request arrives. That is safe only where
//! hyper holds nothing of HTTP's:
//! - no request is in flight, and all written has been flushed to the socket;
//! - the last request was HTTP/1.1 with no body, no `Upgrade` header and no `Connection`
//!   token but `keep-alive`, so the parser is between messages, never inside a body (body bytes read as a new request
//!   would desynchronise the connection);
//! - bytes read but not yet parsed (the start of the next request) are put back in front of
//!   the socket, and the connection does not rest again until that request is dispatched,
//!   so a slow request head still meets the header timeout.
//!
//! A connection rests only after `REST_AFTER` without a request, so one in steady use never
//! pays for a new hyper connection per request.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::Request;
use hyper::header;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::stack::idle::Activity;
use outrigger_core::prefixed::Prefixed;

/// How long an HTTP/1 connection has had no request in flight before it rests.
pub(super) const REST_AFTER: Duration = Duration::from_secs(1);

static RESTED: AtomicU64 = AtomicU64::new(0);

/// How many times a connection has given back its buffers: the allocator's free memory
/// grows with it, which is when handing that memory back to the system pays.
pub fn rested_connections() -> u64 {
    RESTED.load(Ordering::Relaxed)
}

/// Whether the parser is between messages once `req`'s response is written: HTTP/1.1, no
/// body, and nothing that ends or turns the connection (`Connection: close` or `upgrade`, an
/// `Upgrade` header). `Connection: keep-alive`, which many clients send, changes nothing.
pub(super) fn leaves_parser_idle<B: hyper::body::Body>(req: &Request<B>) -> bool {
    let ends_or_turns = |value: &header::HeaderValue| {
        value.to_str().map_or(true, |list| {
            list.split(',')
                .any(|token| !token.trim().eq_ignore_ascii_case("keep-alive"))
        })
    };
    req.version() == hyper::Version::HTTP_11
        && req.body().is_end_stream()
        && !req.headers().contains_key(header::UPGRADE)
        && !req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(ends_or_turns)
}

/// A connection's stream as hyper sees it: bytes put back by the last rest are read first,
/// and what is written and flushed is told to the connection's `Activity`.
pub(super) struct Resting<I> {
    io: Prefixed<I>,
    activity: Arc<Activity>,
}

/// Counts a rest, for the allocator's trim (`rested_connections`).
pub(super) fn count() {
    RESTED.fetch_add(1, Ordering::Relaxed);
}

impl<I> Resting<I> {
    pub(super) fn new(io: I, activity: Arc<Activity>) -> Self {
        Resting {
            io: Prefixed::new(io),
            activity,
        }
    }

    /// Takes back what hyper read but did not parse; true if there was any.
    pub(super) fn put_back(&mut self, unread: Bytes) -> bool {
        // Copied out, so the rest of hyper's read buffer is not kept alive with it.
        self.io.put_back(&unread);
        !unread.is_empty()
    }
}

impl<I: ReadReady> Resting<I> {
    /// The stream, if nothing is left in it or put back in front of it, so that a new
    /// connection can be made over its socket alone.
    pub(super) fn into_socket(self) -> Result<I, Self> {
        if self.io.get_ref().holds_state() {
            return Err(self);
        }
        let activity = self.activity;
        self.io.into_inner().map_err(|io| Resting { io, activity })
    }

    /// Resolves once there is something to read (or the socket failed).
    pub(super) async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.io.poll_read_ready(cx)).await
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Resting<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, out)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Resting<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.activity.wrote();
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.activity.wrote();
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.activity.flushed();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A stream that can wait for something to read without reading it (and so without a
/// buffer).
pub(super) trait ReadReady {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Whether the stream itself holds bytes or state a new stream over the same socket
    /// would lose.
    fn holds_state(&self) -> bool;
}

impl ReadReady for TcpStream {
    fn holds_state(&self) -> bool {
        false
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl<S: ReadReady> ReadReady for Prefixed<S> {
    fn holds_state(&self) -> bool {
        self.has_prefix() || self.get_ref().holds_state()
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.has_prefix() {
            return Poll::Ready(Ok(()));
        }
        self.get_ref().poll_read_ready(cx)
    }
}

impl<S: ReadReady> ReadReady for tokio_rustls::server::TlsStream<S> {
    /// The TLS session itself.
    fn holds_state(&self) -> bool {
        true
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (io, tls) = self.get_ref();
        // Plaintext already decrypted (or a close to act on) is something to read.
        if !tls.wants_read() {
            return Poll::Ready(Ok(()));
        }
        io.poll_read_ready(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Empty, Full};

    fn get(headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
        let mut req = Request::get("/").body(Empty::new()).unwrap();
        for (name, value) in headers {
            req.headers_mut().append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                header::HeaderValue::from_str(value).unwrap(),
            );
        }
        req
    }

    #[test]
    fn only_a_bodiless_http11_request_that_keeps_the_connection_leaves_the_parser_idle() {
        assert!(leaves_parser_idle(&get(&[])));
        assert!(leaves_parser_idle(&get(&[("connection", "keep-alive")])));
        assert!(leaves_parser_idle(&get(&[("connection", "Keep-Alive")])));
        assert!(!leaves_parser_idle(&get(&[("connection", "close")])));
        assert!(!leaves_parser_idle(&get(&[(
            "connection",
            "keep-alive, close"
        )])));
        assert!(!leaves_parser_idle(&get(&[
            ("connection", "keep-alive"),
            ("connection", "Upgrade"),
        ])));
        assert!(!leaves_parser_idle(&get(&[("upgrade", "websocket")])));
        // Other nominations are left alone: such a connection does not rest.
        assert!(!leaves_parser_idle(&get(&[("connection", "x-trace")])));
        let mut http10 = get(&[]);
        *http10.version_mut() = hyper::Version::HTTP_10;
        assert!(!leaves_parser_idle(&http10));
        let post = Request::post("/")
            .body(Full::new(Bytes::from("x")))
            .unwrap();
        assert!(!leaves_parser_idle(&post));
    }
}
