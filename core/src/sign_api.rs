//! The certificate-signing API between proxies and the control plane's CA: one unary gRPC
//! method. The proxy sends a CSR for the identity it claims, with its bootstrap token as a
//! bearer credential; the CA signs it only if the token proves that identity.

pub const SIGN_PATH: &str = "/outrigger.identity.v1.Identity/Sign";

#[derive(Clone, PartialEq, prost::Message)]
pub struct SignRequest {
    /// A PKCS#10 request, DER.
    #[prost(bytes = "vec", tag = "1")]
    pub csr: Vec<u8>,
    /// How long the certificate should last; 0 for the CA's default.
    #[prost(uint64, tag = "2")]
    pub lifetime_seconds: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SignResponse {
    /// The chain, leaf first, PEM.
    #[prost(string, tag = "1")]
    pub chain_pem: String,
    /// The roots to trust, PEM: during a root rotation, the old and the new.
    #[prost(string, tag = "2")]
    pub bundle_pem: String,
}
