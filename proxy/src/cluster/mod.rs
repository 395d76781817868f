//! TODO

pub mod balance;
