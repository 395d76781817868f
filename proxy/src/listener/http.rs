//! Serving HTTP on a connection once its protocol is known: hyper's HTTP/2 connection, or
//! its HTTP/1 connection made again after each rest (`rest.rs`), each request handed to the
//! stack, and closed on drain or after its idle timeout.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::listener::accept::Drain;
use crate::listener::head_timer::HeadTimer;
use crate::listener::rest::{self, ReadReady, Resting};
use crate::net::detect::Protocol;
use crate::stack::idle::{Activity, Quiet, Tracked};
use crate::stack::peer::Peer;
use crate::stack::{self, exchange::HttpContext};

/// Protects the proxy from peers that send huge or endless headers.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Envoy's default too. No more than hyper's own default of 100: hyper parses that many in
/// place, and any larger cap costs two 4 KiB heap buffers on every request.
const MAX_HEADERS: usize = 100;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves HTTP on `io` until it closes. With `hand_back`, an HTTP/1 connection that rests
/// returns its stream and idle deadline instead of waiting here, so that its task can wait
/// holding nothing else.
pub(super) async fn serve_http<I>(
    io: I,
    protocol: Protocol,
    idle: Duration,
    peer: Peer,
    ctx: Arc<HttpContext>,
    shutdown: Drain,
    hand_back: bool,
) -> Result<Option<(I, tokio::time::Instant)>, hyper::Error>
where
    I: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
{
    let Drain {
        mut signal,
        tracker,
    } = shutdown;
    let mut peer = peer;
    peer.drain = Some(tracker.clone());
    // Shared by the connection's requests, and handed to each directly: as a request
    // extension it would cost a map and two allocations per request.
    let peer = Arc::new(peer);
    let _guard = tracker;
    let activity = Arc::new(Activity::default());
    let rests = ctx.connections.rested.clone();
    let handler = {
        let activity = activity.clone();
        move |req: hyper::Request<hyper::body::Incoming>| {
            let in_flight = activity.request(rest::leaves_parser_idle(&req));
            // A combinator rather than an `async` block around it, which would keep a second
            // slot for the request.
            stack::handle(ctx.clone(), peer.clone(), Box::new(req))
                .map(move |resp| resp.map(|resp| resp.map(|body| Tracked::new(body, in_flight))))
        }
    };
    if protocol == Protocol::Http2 {
        // Boxed, as the HTTP/1 connection below is: this future lives as long as the
        // connection, and a rested one should not carry room for either. Each request's
        // future is boxed too: hyper spawns a task per stream holding it, and moving a
        // request's whole future into that task took a copy of kilobytes per request.
        let mut conn = Box::pin(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .serve_connection(
                    TokioIo::new(io),
                    service_fn(move |req| Box::pin(handler(req))),
                ),
        );
        if *signal.borrow() {
            conn.as_mut().graceful_shutdown();
        }
        let served = tokio::select! {
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
        return served.map(|()| None);
    }
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(HeadTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    // hyper keeps room for one request's future in every HTTP/1 connection from its start:
    // boxed, that room is a pointer, and the future exists only while a request is in flight.
    let mut service = service_fn(move |req| Box::pin(handler(req)));
    let mut io = Resting::new(io, activity.clone());
    loop {
        // Boxed: a resting connection gives back all of hyper's, its state with its buffers.
        let mut conn = Box::new(
            http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        if *signal.borrow() {
            Pin::new(&mut *conn).graceful_shutdown();
        }
        let quiet = tokio::select! {
            // In order: each wake polls the connection first, and draws no random number.
            biased;
            res = &mut *conn => return res.map(|()| None),
            _ = signal.changed() => Quiet::Idle,
            quiet = activity.quiet_for(idle, Some(rest::REST_AFTER)) => quiet,
        };
        if quiet == Quiet::Idle {
            Pin::new(&mut *conn).graceful_shutdown();
            return conn.await.map(|()| None);
        }
        // Upgraded connections have resolved above, so the parts are there.
        let Some(parts) = conn.into_parts() else {
            return Ok(None);
        };
        // A fresh timer, whose alarm is made at the next head: a resting connection holds
        // none.
        http1.timer(HeadTimer::new());
        service = parts.service;
        io = parts.io.into_inner();
        rests.inc();
        rest::count();
        if io.put_back(parts.read_buf) {
            activity.hold_rest();
            continue;
        }
        if hand_back {
            match io.into_socket() {
                Ok(socket) => return Ok(Some((socket, activity.idle_deadline(idle)))),
                Err(kept) => io = kept,
            }
        }
        tokio::select! {
            ready = io.readable() => if ready.is_err() { return Ok(None) },
            _ = signal.changed() => return Ok(None),
            _ = activity.idle_for(idle) => return Ok(None),
        }
    }
}
