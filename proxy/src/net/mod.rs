//! Sockets and bytes: protocol detection on the first bytes, where a redirected connection
//! was going, whether a connection came from this host, copying a pair of streams, and the
//! gRPC channel to the control plane. Nothing here knows the config.

pub mod detect;
pub mod grpc_channel;
pub mod local_origin;
pub mod original_dst;
pub mod splice;
