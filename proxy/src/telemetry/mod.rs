//! TODO

pub mod metrics;
pub mod otlp_proto;
pub mod request_trace;
pub mod span_export;
pub mod trace_context;
