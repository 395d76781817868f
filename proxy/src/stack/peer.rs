//! Who is calling: what the listener learned about a connection, shared by every request on
//! it.

use std::sync::Arc;

use http::HeaderValue;
use outrigger_core::spiffe::SpiffeId;
use tokio::sync::mpsc;

/// Who is calling, on every request: the downstream address, and the verified identity on
/// an mTLS connection.
#[derive(Clone)]
pub struct Peer {
    pub identity: Option<Arc<SpiffeId>>,
    /// The identity as text and as the header the app gets, formatted once per connection
    /// rather than for every request.
    pub identity_text: Option<Arc<str>>,
    pub identity_header: Option<HeaderValue>,
    pub addr: Option<std::net::SocketAddr>,
    /// On a redirected outbound connection: the virtual host of the address the app dialled,
    /// used when the Host header names none.
    pub virtual_host: Option<usize>,
    /// The connection's hold on the drain, for what outlives its requests (an upgraded
    /// tunnel): the drain waits for it as for the connection.
    pub drain: Option<mpsc::Sender<()>>,
}

impl Peer {
    pub fn new(
        identity: Option<Arc<SpiffeId>>,
        addr: Option<std::net::SocketAddr>,
        virtual_host: Option<usize>,
    ) -> Peer {
        let identity_text: Option<Arc<str>> = identity.as_ref().map(|i| i.to_string().into());
        Peer {
            identity_header: identity_text
                .as_deref()
                .and_then(|t| HeaderValue::from_str(t).ok()),
            identity_text,
            identity,
            addr,
            virtual_host,
            drain: None,
        }
    }
}
