//! Sockets, bytes and timers: protocol detection on the first bytes, where a redirected
//! connection was going, whether a connection came from this host, copying a pair of
//! streams, the gRPC channel to the control plane, and timers cheap to poll. Nothing here
//! knows the config.

pub mod alarm;
pub mod detect;
pub mod grpc_channel;
pub mod local_origin;
pub mod original_dst;
pub mod splice;
