//! Listeners: the accept loop, and per connection the interception check (`arrival`), protocol
//! detection, TLS, then HTTP (`http`, each request handed to `stack`, its heads timed by
//! `head_timer`; a quiet HTTP/1 keep-alive connection rests between requests, `rest`) or
//! opaque TCP.

pub mod accept;
mod arrival;
mod head_timer;
mod http;
pub mod rest;
pub mod tcp;
