use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capstan_proto::v1::IssueTokenRequest;
use capstan_proto::v1::auth_client::AuthClient;
use capstan_secrets::Secret;
use capstan_types::Error;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// Renew this long before a token expires.
const RENEW_BEFORE: Duration = Duration::from_secs(60);

/// Exchanges an API key for JWTs at the auth service, caching each token
/// until shortly before it expires.
pub struct TokenSource {
    api_key: Secret,
    auth: Channel,
    cached: Mutex<Option<(String, i64)>>,
}

impl TokenSource {
    pub fn new(api_key: Secret, auth: Channel) -> Arc<Self> {
        Arc::new(TokenSource {
            api_key,
            auth,
            cached: Mutex::new(None),
        })
    }

    pub async fn token(&self) -> Result<String, Error> {
        let mut cached = self.cached.lock().await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        if let Some((token, exp)) = cached.as_ref()
            && *exp - RENEW_BEFORE.as_secs() as i64 > now
        {
            return Ok(token.clone());
        }
        let response = AuthClient::new(self.auth.clone())
            .issue_token(IssueTokenRequest {
                api_key: self.api_key.expose().to_string(),
            })
            .await
            .map_err(capstan_proto::into_error)?
            .into_inner();
        *cached = Some((response.token.clone(), response.expires_at));
        Ok(response.token)
    }
}

/// A gRPC channel that adds `authorization: Bearer <token>` to every call,
/// or, over mutual TLS between services, sends none: the client
/// certificate names the caller ([`crate::certificate_principal`]).
#[derive(Clone)]
pub struct Authed {
    inner: Channel,
    tokens: Option<Arc<TokenSource>>,
}

impl Authed {
    pub fn new(inner: Channel, tokens: Arc<TokenSource>) -> Self {
        Authed {
            inner,
            tokens: Some(tokens),
        }
    }

    /// Calls that carry no token: `inner` is a mutual TLS channel whose
    /// client certificate names a Capstan service.
    pub fn by_certificate(inner: Channel) -> Self {
        Authed {
            inner,
            tokens: None,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Request<tonic::body::Body>> for Authed {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        // The clone is not ready yet; swap so the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let tokens = self.tokens.clone();
        // The caller's trace continues in the server (W3C traceparent).
        capstan_telemetry::inject(request.headers_mut());
        Box::pin(async move {
            if let Some(tokens) = tokens {
                let token = tokens
                    .token()
                    .await
                    .map_err(|e| Box::new(capstan_proto::status(e)) as BoxError)?;
                let value = http::HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|e| Box::new(e) as BoxError)?;
                request
                    .headers_mut()
                    .insert(http::header::AUTHORIZATION, value);
            }
            tower::Service::call(&mut inner, request)
                .await
                .map_err(Into::into)
        })
    }
}
