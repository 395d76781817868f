//! The one rustls crypto provider every TLS config in the mesh is built with, and the
//! mesh's rule on session resumption.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// No session resumption on the mesh's mTLS, either side. A resumed session carries the
/// identity proved when it began and skips the chain check: a proxy that first reached the
/// control plane before it had a certificate would stay anonymous on every later
/// connection, and a caller whose root has left the bundle would still be let in. So every
/// connection proves its identity, then, against the bundle of then.
pub fn no_client_resumption() -> rustls::client::Resumption {
    rustls::client::Resumption::disabled()
}

/// The server's side of `no_client_resumption`: no tickets sent, no sessions kept.
pub fn no_server_resumption(config: &mut rustls::ServerConfig) {
    config.send_tls13_tickets = 0;
    config.session_storage = std::sync::Arc::new(rustls::server::NoServerSessionStorage {});
}
