//! What the proxy tells about itself: Prometheus metrics with their label sets, and
//! OpenTelemetry traces (W3C and B3 context, spans, the bounded OTLP exporter).

pub mod histogram;
pub mod labels;
pub mod metrics;
pub mod otlp;
pub mod request_trace;
pub mod route_series;
pub mod span_export;
pub mod tap;
pub mod trace_context;
