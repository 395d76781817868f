//! Helpers for reading and writing Envoy v3 resources: packing into `Any`, decoding out of it,
//! durations, and the refusal of fields a reader does not honour.

use std::time::Duration;

use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use prost::{Message, Name};
use serde_saphyr::{Location, Spanned};

/// The `filter_metadata` key under which a Cluster says what Envoy has no field for, and the
/// `protocol` value that makes its connections opaque TCP. Envoy and gRPC ignore it.
pub const CLUSTER_METADATA: &str = "outrigger";
pub const OPAQUE_PROTOCOL: &str = "tcp";

/// Why a reader refuses an xDS resource. It goes back to the control plane as the NACK's
/// message, which names the resource and the field.
#[derive(Debug, Clone, thiserror::Error)]
pub enum XdsError {
    /// A field the reader does not honour: refused rather than ignored.
    #[error("{what}: field `{field}` is not supported by this proxy")]
    Unsupported { what: String, field: String },
    /// A value that is malformed or not valid where it is.
    #[error("{0}")]
    Invalid(String),
    /// The config the resources make fails the reader's own validation.
    #[error("{0}")]
    Config(#[from] crate::config_error::ConfigError),
}

impl From<String> for XdsError {
    fn from(message: String) -> Self {
        XdsError::Invalid(message)
    }
}

pub fn pack<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

pub fn decode<M: Message + Name + Default>(any: &Any) -> Result<M, XdsError> {
    if any.type_url != M::type_url() {
        return Err(format!("expected {}, got {}", M::type_url(), any.type_url).into());
    }
    M::decode(any.value.as_slice())
        .map_err(|e| XdsError::Invalid(format!("cannot decode {}: {e}", M::full_name())))
}

pub fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A protobuf duration as a `Duration`; `None` when it is negative or malformed.
pub fn std_duration(d: &PbDuration) -> Option<Duration> {
    let (seconds, nanos) = (u64::try_from(d.seconds).ok()?, u32::try_from(d.nanos).ok()?);
    (nanos < 1_000_000_000).then(|| Duration::new(seconds, nanos))
}

pub fn u32_value(v: Option<u32>) -> Option<UInt32Value> {
    v.map(|value| UInt32Value { value })
}

/// A value from xDS rather than a file: it has no location.
pub fn sp<T>(value: T) -> Spanned<T> {
    Spanned {
        value,
        referenced: Location::UNKNOWN,
        defined: Location::UNKNOWN,
    }
}

/// A protobuf duration as config text. Envoy reads a zero route timeout as "no timeout"; the
/// proxy's durations are finite, so zero becomes a year.
pub fn duration_text(d: &PbDuration) -> String {
    // Saturating: a control plane's absurd duration must not wrap into a short one.
    let ms = (d.seconds.max(0) as u64)
        .saturating_mul(1000)
        .saturating_add(d.nanos.max(0) as u64 / 1_000_000);
    if ms == 0 {
        "8760h".to_string()
    } else {
        format!("{ms}ms")
    }
}

/// Refuses the first set field of a list of (is set, field name).
pub fn refuse(what: &str, fields: &[(bool, &str)]) -> Result<(), XdsError> {
    match fields.iter().find(|(set, _)| *set) {
        Some((_, field)) => Err(XdsError::Unsupported {
            what: what.to_string(),
            field: field.to_string(),
        }),
        None => Ok(()),
    }
}
