//! TODO

pub mod api;
pub mod client;
pub mod mtls;
pub mod store;
