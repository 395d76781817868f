//! The workload identity: the certificate store that mTLS configs read, its files or the
//! CA client that keeps it fresh (with the signing API), and the rustls configs that
//! present it and check peers' SPIFFE IDs.

pub mod api;
pub mod cert_files;
pub mod client;
pub mod mtls;
pub mod store;
