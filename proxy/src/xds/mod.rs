//! TODO

pub mod client;
pub mod tracing;
pub mod translate;
