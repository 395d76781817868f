//! Test support: fake upstreams and helpers.
