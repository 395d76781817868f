//! Listeners: the accept loop, and per connection the interception check, protocol
//! detection, TLS, then HTTP (handed to `stack`) or opaque TCP.

pub mod accept;
pub mod tcp;
