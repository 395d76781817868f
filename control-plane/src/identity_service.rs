//! The CA's gRPC face: `outrigger.identity.v1.Identity/Sign`, served beside ADS.
//!
//! The caller's bootstrap token (a bearer credential) is looked up in the live mesh; the CSR
//! must ask for exactly the identity the token proves. Refusals say why, so that a workload
//! stuck without a certificate is easy to diagnose.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use outrigger_core::sign_api::{SIGN_PATH, SignRequest, SignResponse};
use time::OffsetDateTime;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, StdError};
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};

use crate::ca::{Ca, CaError};
use crate::mesh::TokenError;
use crate::snapshot::Publisher;
use crate::token_review::TokenReviewer;
use outrigger_core::spiffe::SpiffeId;

/// The longest certificate the CA will sign, whatever a caller asks for.
const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Clone)]
pub struct IdentityService {
    pub ca: Arc<ArcSwap<Ca>>,
    pub publisher: Arc<Publisher>,
    pub default_lifetime: Duration,
    pub issued: Arc<AtomicU64>,
    /// The last certificate signed for each identity, for `check`.
    pub signed: Arc<crate::diagnose::SignedCerts>,
    /// In Kubernetes: tokens the mesh file does not know are service-account tokens.
    pub token_review: Option<Arc<TokenReviewer>>,
}

impl IdentityService {
    /// The identity a bootstrap token proves: a token from the mesh file, else (in
    /// Kubernetes) a service-account token the API server vouches for.
    async fn prove(
        &self,
        token: Option<&str>,
        from: Option<std::net::IpAddr>,
    ) -> Result<SpiffeId, Status> {
        let token = token.ok_or_else(|| {
            Status::unauthenticated("no bootstrap token: send `authorization: Bearer <token>`")
        })?;
        let snapshot = self.publisher.current();
        let mesh = snapshot
            .mesh
            .as_ref()
            .ok_or_else(|| Status::unavailable("no mesh loaded yet"))?;
        match mesh.identity_for_token(token, OffsetDateTime::now_utc()) {
            Ok(id) => Ok(id.clone()),
            Err(TokenError::Expired) => {
                Err(Status::unauthenticated("the bootstrap token has expired"))
            }
            Err(TokenError::Unknown) => match &self.token_review {
                None => Err(Status::unauthenticated("unknown bootstrap token")),
                Some(reviewer) => reviewer
                    .check(token, &mesh.trust_domain, from)
                    .await
                    .map_err(Status::unauthenticated),
            },
        }
    }

    fn sign(&self, proved: &SpiffeId, req: SignRequest) -> Result<SignResponse, Status> {
        let lifetime = match req.lifetime_seconds {
            0 => self.default_lifetime,
            s => Duration::from_secs(s).min(MAX_LIFETIME),
        };
        let ca = self.ca.load();
        let chain_pem = ca
            .sign_csr(&req.csr, proved, lifetime)
            .map_err(|e| match e {
                CaError::BadCsr(_) => Status::invalid_argument(e.to_string()),
                CaError::WrongIdentity { .. } => Status::permission_denied(e.to_string()),
                _ => Status::internal(e.to_string()),
            })?;
        self.issued.fetch_add(1, Ordering::Relaxed);
        self.signed.signed(proved, lifetime);
        tracing::info!(identity = %proved, ?lifetime, "certificate issued");
        Ok(SignResponse {
            chain_pem,
            bundle_pem: ca.bundle_pem().to_string(),
        })
    }
}

struct Sign(IdentityService);

impl UnaryService<SignRequest> for Sign {
    type Response = SignResponse;
    type Future = BoxFuture<Response<SignResponse>, Status>;

    fn call(&mut self, request: Request<SignRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move {
            let token = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string);
            let from = request
                .extensions()
                .get::<crate::secure_xds::Caller>()
                .and_then(|c| c.addr)
                .map(|a| a.ip());
            let proved = service.prove(token.as_deref(), from).await?;
            service
                .sign(&proved, request.into_inner())
                .map(Response::new)
        })
    }
}

impl<B> Service<http::Request<B>> for IdentityService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != SIGN_PATH {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let service = self.clone();
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<SignResponse, SignRequest>::default();
            Ok(tonic::server::Grpc::new(codec)
                .unary(Sign(service), req)
                .await)
        })
    }
}

impl NamedService for IdentityService {
    const NAME: &'static str = "outrigger.identity.v1.Identity";
}
