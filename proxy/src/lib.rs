//! The Outrigger sidecar proxy.
//!
//! `app` assembles the stages; each other module is one stage or one building block.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod identity;
pub mod intercept;
pub mod listener;
pub mod net;
pub mod policy;
pub mod route;
pub mod sidecar;
pub mod stack;
pub mod telemetry;
pub mod upstream;
pub mod xds;
