//! Routing: the compiled route table of a listener, the matching of a request to a virtual
//! host and route, and the mapping of a redirected connection's destination to a service.

pub mod destinations;
pub mod router;
pub mod table;
