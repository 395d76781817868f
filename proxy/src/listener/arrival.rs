//! What a listener decides about a connection before reading from it (refused, passed
//! through, or the mesh's), and the wait for its first bytes, which is all a connection
//! that has sent nothing holds.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::file::{Direction, ListenerProtocol};
use crate::config::snapshot::{DEFAULT_TCP_IDLE_TIMEOUT, Listener};
use crate::net::local_origin;
use crate::net::original_dst;
use crate::route::destinations::Service;
use crate::stack::exchange::HttpContext;

/// What the listener decides about a connection before it has read a byte of it.
pub(super) enum Arrival {
    Refused,
    Passthrough(std::net::SocketAddr, Duration),
    /// The mesh's to serve; with the deadline for its first bytes when its protocol is to
    /// be detected from them.
    Mesh(Service, Option<tokio::time::Instant>),
}

pub(super) fn arrive(stream: &TcpStream, ctx: &HttpContext) -> Arrival {
    let snapshot = ctx.config.load();
    let listener = &snapshot.listeners[ctx.listener];
    // Only a transparent listener pays for the socket option.
    let original = listener
        .destinations
        .as_ref()
        .and_then(|_| original_dst::of(stream));
    if listener.direction == Direction::Outbound && original.is_none() {
        let client = stream.peer_addr().ok();
        let local = stream.local_addr().ok();
        if !client
            .zip(local)
            .is_some_and(|(peer, local)| local_origin::from_this_host(peer, local))
        {
            tracing::debug!(listener = %listener.name, peer = ?client, "outbound connection from another host refused");
            ctx.metrics.foreign_refused(&listener.name);
            return Arrival::Refused;
        }
    }
    match redirected(original, listener) {
        Redirect::Passthrough(to) => Arrival::Passthrough(to, tcp_idle_timeout(listener)),
        Redirect::Mesh(service) => {
            // A service whose cluster is opaque TCP is not waited on: its protocol may be
            // one where the server speaks first.
            let opaque = service.cluster.as_ref().is_some_and(|c| c.opaque);
            let detect = (listener.protocol == ListenerProtocol::Detect && !opaque)
                .then(|| tokio::time::Instant::now() + listener.detect_timeout);
            Arrival::Mesh(service, detect)
        }
    }
}

/// What the original destination of a connection says about it.
enum Redirect {
    /// Not the mesh's: copy it through to where the app meant it to go.
    Passthrough(std::net::SocketAddr),
    /// The proxy's to handle; the service is empty when the connection was not redirected.
    Mesh(Service),
}

/// Outbound, the dialled address picks the service or a passthrough; inbound, the dialled
/// port picks the app port.
fn redirected(original: Option<std::net::SocketAddr>, listener: &Listener) -> Redirect {
    let (Some(destinations), Some(original)) = (&listener.destinations, original) else {
        return Redirect::Mesh(Service::default());
    };
    match listener.direction {
        Direction::Outbound => destinations
            .lookup(original)
            .map_or(Redirect::Passthrough(original), Redirect::Mesh),
        Direction::Inbound => Redirect::Mesh(destinations.lookup_port(original.port())),
    }
}

pub(super) fn tcp_idle_timeout(listener: &Listener) -> Duration {
    listener
        .tcp
        .as_ref()
        .map_or(DEFAULT_TCP_IDLE_TIMEOUT, |t| t.idle_timeout)
}

pin_project_lite::pin_project! {
    /// Waits until a socket has something to read or a deadline passes, and gives the
    /// deadline back. The waker is kept in the socket's registration, so this holds no buffer
    /// and no waiter of its own: only the socket's address and the timer (which holds the
    /// deadline). A hand-written future, because an `async fn` would also keep its arguments.
    pub(super) struct FirstBytes<'a> {
        stream: &'a TcpStream,
        #[pin]
        timer: tokio::time::Sleep,
    }
}

pub(super) fn first_bytes(stream: &TcpStream, deadline: tokio::time::Instant) -> FirstBytes<'_> {
    FirstBytes {
        stream,
        timer: tokio::time::sleep_until(deadline),
    }
}

impl Future for FirstBytes<'_> {
    type Output = tokio::time::Instant;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // A peek, because read readiness alone is set on a socket that has nothing yet; the
        // byte it peeks at is left for detection.
        let mut byte = [0u8; 1];
        let mut peeked = tokio::io::ReadBuf::new(&mut byte);
        if this.stream.poll_peek(cx, &mut peeked).is_ready()
            || this.timer.as_mut().poll(cx).is_ready()
        {
            Poll::Ready(this.timer.deadline())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn first_bytes_waits_for_bytes_or_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        assert_eq!(first_bytes(&stream, deadline).await, deadline);
        assert!(
            tokio::time::Instant::now() >= deadline,
            "returned before the deadline"
        );
        tokio::io::AsyncWriteExt::write_all(&mut client, b"G")
            .await
            .unwrap();
        let later = tokio::time::Instant::now() + Duration::from_secs(30);
        tokio::time::timeout(Duration::from_secs(5), first_bytes(&stream, later))
            .await
            .expect("bytes end the wait");
    }
}
