//! The OTLP messages, from the official `opentelemetry-proto` definitions, and the few
//! helpers the span code uses to fill them.

pub use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
pub use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
pub use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
pub use opentelemetry_proto::tonic::resource::v1::Resource;
pub use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

use opentelemetry_proto::tonic::common::v1::AnyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

pub const SPAN_KIND_SERVER: i32 = SpanKind::Server as i32;
pub const SPAN_KIND_CLIENT: i32 = SpanKind::Client as i32;
pub const STATUS_ERROR: i32 = StatusCode::Error as i32;

pub fn string(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

pub fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(value)),
        }),
        ..Default::default()
    }
}
