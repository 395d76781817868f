//! The Outrigger sidecar proxy.
//!
//! `app` assembles the stages; each other module is one stage or one building block.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod balance;
pub mod circuit_breaker;
pub mod config;
pub mod config_store;
pub mod control_plane_channel;
pub mod demo;
pub mod detect;
pub mod error;
pub mod http_proxy;
pub mod identity;
pub mod identity_api;
pub mod identity_client;
pub mod idle;
pub mod intercept;
pub mod listener;
pub mod local_origin;
pub mod metrics;
pub mod mtls;
pub mod original_dst;
pub mod otlp_proto;
pub mod outlier;
pub mod request_trace;
pub mod retry;
pub mod retry_budget;
pub mod retry_throttle;
pub mod router;
pub mod runtime_config;
pub mod sidecar;
pub mod span_export;
pub mod tcp;
pub mod trace_context;
pub mod upstream;
pub mod xds_client;
pub mod xds_policy;
pub mod xds_translate;
