//! The xDS client: an ADS stream to the control plane, the translation of Envoy resources
//! into the same file model a YAML file gives, and its on-disk cache.

pub mod client;
pub mod load_report;
pub mod route_table;
pub mod tracing;
pub mod translate;
