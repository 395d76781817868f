//! A route's tracing settings in xDS. The resilience policies (retries, rate limits,
//! circuit breakers, outlier detection) are read by `outrigger_core::xds_policy`, beside the
//! code that writes them.

use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
use outrigger_core::xds::{XdsError, refuse};

/// A route's `tracing.random_sampling`: the share of new traces it samples. The other
/// sampling knobs and custom tags are refused.
pub fn route_sampling(
    what: &str,
    t: &envoy_types::pb::envoy::config::route::v3::Tracing,
) -> Result<Option<f64>, XdsError> {
    refuse(
        what,
        &[
            (t.client_sampling.is_some(), "tracing.client_sampling"),
            (t.overall_sampling.is_some(), "tracing.overall_sampling"),
            (!t.custom_tags.is_empty(), "tracing.custom_tags"),
        ],
    )?;
    let Some(fp) = t.random_sampling else {
        return Ok(None);
    };
    let whole = match DenominatorType::try_from(fp.denominator) {
        Ok(DenominatorType::Hundred) => 100.0,
        Ok(DenominatorType::TenThousand) => 10_000.0,
        Ok(DenominatorType::Million) => 1_000_000.0,
        Err(_) => {
            return Err(
                format!("{what}: field `tracing.random_sampling`: unknown denominator").into(),
            );
        }
    };
    Ok(Some((f64::from(fp.numerator) / whole).min(1.0)))
}
