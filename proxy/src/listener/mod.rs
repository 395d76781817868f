//! TODO

pub mod accept;
pub mod tcp;
