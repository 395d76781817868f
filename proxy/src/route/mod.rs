//! Routing: the compiled route table of a listener, the matching of a request to a virtual
//! host and route, what a route does to the request's target (rewrites, redirects), and the
//! mapping of a redirected connection's destination to a service.

pub mod destinations;
pub mod rewrite;
pub mod router;
pub mod table;
