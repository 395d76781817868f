//! Talking to upstreams over HTTP: the per-endpoint connection pools (HTTP/1.1 keep-alive
//! and one multiplexed HTTP/2 connection), the body type, and the proxy's error type with
//! the one place it becomes a response.

pub mod client;
pub mod error;
pub mod http1_pool;
