//! Resilience and access, each as its own state machine: retries and their budget and
//! throttle, circuit-breaker thresholds, outlier detection, and authorization. The checked
//! policy model they are built from is `outrigger_core::policy`.

pub mod circuit_breaker;
pub mod outlier;
pub mod retry;
pub mod retry_budget;
pub mod retry_throttle;
