//! Config: the file model (YAML, and what xDS is translated into), the immutable snapshot the
//! data path reads, how a snapshot is built and validated, what a reload carries over from
//! the snapshot it replaces, and the store that swaps snapshots in.

pub mod build;
pub mod build_cluster;
pub mod build_route;
pub mod carry_over;
pub mod file;
pub mod snapshot;
pub mod store;
