use std::sync::Arc;
use std::task::{Context, Poll};

use capstan_types::Error;

use crate::{Access, Verifier};

/// Which access each gRPC method needs. Methods not listed need `Write`;
/// public ones need no token at all.
#[derive(Clone, Default)]
pub struct Policy {
    public: Vec<&'static str>,
    read: Vec<&'static str>,
    admin: Vec<&'static str>,
}

impl Policy {
    /// Health checks and reflection are always public.
    pub fn new() -> Self {
        Policy {
            public: vec![
                "/grpc.health.v1.Health/",
                "/grpc.reflection.v1.ServerReflection/",
                "/grpc.reflection.v1alpha.ServerReflection/",
            ],
            ..Default::default()
        }
    }

    /// `path` is a full method (`/capstan.v1.Auth/IssueToken`) or a prefix ending in `/`.
    pub fn public(mut self, path: &'static str) -> Self {
        self.public.push(path);
        self
    }

    pub fn read(mut self, path: &'static str) -> Self {
        self.read.push(path);
        self
    }

    pub fn admin(mut self, path: &'static str) -> Self {
        self.admin.push(path);
        self
    }

    fn matches(patterns: &[&str], path: &str) -> bool {
        patterns.iter().any(|p| {
            if p.ends_with('/') {
                path.starts_with(p)
            } else {
                path == *p
            }
        })
    }

    /// `None` for public methods.
    fn access(&self, path: &str) -> Option<Access> {
        if Self::matches(&self.public, path) {
            None
        } else if Self::matches(&self.read, path) {
            Some(Access::Read)
        } else if Self::matches(&self.admin, path) {
            Some(Access::Admin)
        } else {
            Some(Access::Write)
        }
    }
}

/// A tower layer for a tonic server: checks the bearer token and the role
/// before the request reaches any service.
#[derive(Clone)]
pub struct RequireAuthLayer {
    verifier: Arc<Verifier>,
    policy: Arc<Policy>,
}

impl RequireAuthLayer {
    pub fn new(verifier: Arc<Verifier>, policy: Policy) -> Self {
        RequireAuthLayer {
            verifier,
            policy: Arc::new(policy),
        }
    }
}

impl<S> tower::Layer<S> for RequireAuthLayer {
    type Service = RequireAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireAuth {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequireAuth<S> {
    inner: S,
    layer: RequireAuthLayer,
}

impl<S, B> tower::Service<http::Request<B>> for RequireAuth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let path = request.uri().path().to_string();
            if let Some(access) = layer.policy.access(&path)
                && let Err(err) = authorize(&layer.verifier, request.headers(), access).await
            {
                tracing::debug!(%path, "rejected call: {err}");
                return Ok(capstan_proto::status(err).into_http());
            }
            inner.call(request).await
        })
    }
}

async fn authorize(
    verifier: &Verifier,
    headers: &http::HeaderMap,
    access: Access,
) -> Result<(), Error> {
    let header = headers.get(http::header::AUTHORIZATION).ok_or_else(|| {
        Error::Unauthenticated("missing `authorization: Bearer <token>` header".into())
    })?;
    let token = header
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Error::Unauthenticated("authorization header must be `Bearer <token>`".into())
        })?;
    let claims = verifier.verify(token.trim()).await?;
    if claims.role.allows(access) {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!(
            "role `{}` may not make this call",
            claims.role.as_str()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_classifies_methods() {
        let policy = Policy::new()
            .public("/capstan.v1.Auth/IssueToken")
            .read("/capstan.v1.Orchestrator/GetApp")
            .admin("/capstan.v1.Auth/CreateApiKey");
        assert_eq!(policy.access("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            policy.access("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
        assert_eq!(policy.access("/capstan.v1.Auth/IssueToken"), None);
        assert_eq!(
            policy.access("/capstan.v1.Orchestrator/GetApp"),
            Some(Access::Read)
        );
        assert_eq!(
            policy.access("/capstan.v1.Orchestrator/ApplyApp"),
            Some(Access::Write)
        );
        assert_eq!(
            policy.access("/capstan.v1.Auth/CreateApiKey"),
            Some(Access::Admin)
        );
    }
}
