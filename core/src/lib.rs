//! What the Outrigger proxy and control plane share: SPIFFE IDs, durations, located config
//! errors, the resilience policy model with its defaults and its xDS form, the backoff both
//! sides wait with, and the bounded HTTP/1 serving of their small admin ports.
#![forbid(unsafe_code)]

pub mod authz;
pub mod backoff;
pub mod bounded_server;
pub mod cidr;
pub mod config_error;
pub mod duration;
pub mod inbound;
pub mod latency_sketch;
pub mod load_counter;
pub mod policy;
pub mod prefixed;
pub mod query;
pub mod sign_api;
pub mod spiffe;
pub mod tls;
pub mod token_bucket;
pub mod xds;
pub mod xds_grpc;
pub mod xds_inbound;
pub mod xds_policy;
pub mod xds_rbac;
pub mod xds_sds;
pub mod xds_tls;
