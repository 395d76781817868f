//! The policy of a workload's inbound side: whether callers must use mTLS, and who may call
//! on which paths. The control plane sets it per service or namespace; the proxy enforces it.

use serde::Deserialize;

use crate::authz::Authorization;

/// Whether an inbound listener also takes plaintext.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// mTLS and plaintext, while a service moves onto the mesh.
    Permissive,
    /// mTLS only: plaintext connections are closed.
    Strict,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Strict => "strict",
            TlsMode::Permissive => "permissive",
        }
    }

    /// Of two modes, the one that takes less: strict wins.
    pub fn strictest(self, other: TlsMode) -> TlsMode {
        self.max(other)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub mode: TlsMode,
    /// `None`: every caller the mode lets connect may call.
    pub authorization: Option<Authorization>,
}
