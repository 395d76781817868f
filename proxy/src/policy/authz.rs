//! Authorization of a listener's callers by their SPIFFE ID.

use outrigger_core::spiffe::{Principal, SpiffeId};

pub struct Authorization {
    pub default_allow: bool,
    pub allow: Vec<Principal>,
}

impl Authorization {
    /// A caller without an identity (plaintext, in permissive mode) gets only the default.
    pub fn allows(&self, peer: Option<&SpiffeId>) -> bool {
        match peer {
            Some(id) if self.allow.iter().any(|p| p.matches(id)) => true,
            _ => self.default_allow,
        }
    }
}
