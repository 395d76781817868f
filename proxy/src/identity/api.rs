//! The certificate-signing API between proxies and the control plane's CA: one unary gRPC
//! method. The proxy sends a CSR for the identity it claims, with its bootstrap token as a
//! bearer credential; the CA signs it only if the token proves that identity.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;

use crate::net::grpc_channel;

pub use outrigger_core::sign_api::{SIGN_PATH, SignRequest, SignResponse};

/// Calls `Sign` on the control plane at `addr`: over TLS with `tls`, else in plaintext.
pub async fn sign(
    addr: SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
    token: &str,
    request: SignRequest,
    timeout: Duration,
) -> Result<SignResponse, tonic::Status> {
    let endpoint = grpc_channel::endpoint(addr, timeout).timeout(timeout);
    let channel = grpc_channel::connect(endpoint, addr, tls)
        .await
        .map_err(|e| {
            // tonic's own message is only "transport error": the cause (a certificate the
            // anchor does not vouch for, say) is further down.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            tonic::Status::unavailable(format!("{addr}: {text}"))
        })?;
    let mut client = tonic::client::Grpc::new(channel);
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(request);
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| tonic::Status::invalid_argument("the token is not a valid header value"))?;
    req.metadata_mut().insert("authorization", bearer);
    let codec = tonic_prost::ProstCodec::<SignRequest, SignResponse>::default();
    client
        .unary(req, PathAndQuery::from_static(SIGN_PATH), codec)
        .await
        .map(tonic::Response::into_inner)
}
