//! TODO

pub mod idle;
pub mod peer;
pub mod server;
