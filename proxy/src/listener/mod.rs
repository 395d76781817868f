//! Listeners: the accept loop, and per connection the interception check (`arrival`), protocol
//! detection, TLS, then HTTP (handed to `stack`) or opaque TCP.

pub mod accept;
mod arrival;
pub mod rest;
pub mod tcp;
