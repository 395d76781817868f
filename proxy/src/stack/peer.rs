//! Who is calling: what the listener learned about a connection, handed to every request on
//! it as a request extension.

use std::sync::Arc;

use outrigger_core::spiffe::SpiffeId;
use tokio::sync::mpsc;

/// Who is calling, on every request: the downstream address, and the verified identity on
/// an mTLS connection.
#[derive(Clone)]
pub struct Peer {
    pub identity: Option<Arc<SpiffeId>>,
    pub addr: Option<std::net::SocketAddr>,
    /// On a redirected outbound connection: the virtual host of the address the app dialled,
    /// used when the Host header names none.
    pub virtual_host: Option<usize>,
    /// The connection's hold on the drain, for what outlives its requests (an upgraded
    /// tunnel): the drain waits for it as for the connection.
    pub drain: Option<mpsc::Sender<()>>,
}
