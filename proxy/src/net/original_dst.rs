//! Where a redirected connection was going: the address the kernel remembers
//! (`SO_ORIGINAL_DST`) for a connection the `init` rules sent to us. Which service that is,
//! `route::destinations` says.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The address the app dialled, if the connection was redirected to us; `None` when it was
/// made to the listener itself.
pub fn of(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    // A dual-stack listener sees IPv4 connections as `::ffff:a.b.c.d`; their conntrack entry
    // (and so the option to ask) is IPv4's.
    let local = match stream.local_addr().ok()? {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => SocketAddr::V6(v6),
        },
        v4 => v4,
    };
    let original = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    }
    .ok()?
    .as_socket()?;
    (original != local).then_some(original)
}
