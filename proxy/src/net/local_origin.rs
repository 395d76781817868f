//! Whether a connection to an outbound listener started in this pod.
//!
//! An outbound listener sends what it receives into the mesh with the pod's own identity, so
//! a connection from anywhere else would turn the sidecar into an open relay: another host
//! could reach `<pod-ip>:15001` and call any service as this pod. Outbound therefore serves
//! only connections the interception rules redirected (the `OUTPUT` chain redirects only
//! what this host sends) or that come from one of this host's own addresses. This holds
//! whatever address the listener binds.

use std::net::{IpAddr, SocketAddr};

/// True when `peer` is one of this host's addresses. Loopback and the connection's own
/// local address answer without a system call; any other address is one of ours exactly
/// when a socket can be bound to it.
pub fn from_this_host(peer: SocketAddr, local: SocketAddr) -> bool {
    let (peer, local) = (peer.ip().to_canonical(), local.ip().to_canonical());
    if peer.is_loopback() || peer == local {
        return true;
    }
    if peer.is_unspecified() || peer.is_multicast() {
        return false;
    }
    bindable(peer)
}

fn bindable(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_and_own_address_are_local() {
        assert!(from_this_host(
            addr("127.0.0.1:4000"),
            addr("127.0.0.1:15001")
        ));
        assert!(from_this_host(addr("[::1]:4000"), addr("[::1]:15001")));
        // A dual-stack listener sees IPv4 peers as mapped addresses.
        assert!(from_this_host(
            addr("[::ffff:127.0.0.1]:4000"),
            addr("[::ffff:10.1.2.3]:15001")
        ));
    }

    #[test]
    fn an_address_this_host_does_not_have_is_foreign() {
        // TEST-NET-3: assigned to no host.
        assert!(!from_this_host(
            addr("203.0.113.9:4000"),
            addr("127.0.0.1:15001")
        ));
        assert!(!from_this_host(
            addr("0.0.0.0:4000"),
            addr("127.0.0.1:15001")
        ));
    }
}
