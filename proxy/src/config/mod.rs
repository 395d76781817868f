//! TODO

pub mod file;
pub mod snapshot;
pub mod store;
