//! A cluster: its endpoints, the balancer that picks one (peak-EWMA power of two choices,
//! or round robin), and the per-cluster state (pools, retry budget, breaker, outlier
//! detection) the stack consults.

pub mod balance;
