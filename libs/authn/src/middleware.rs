use std::sync::Arc;
use std::task::{Context, Poll};

use capstan_types::Error;

use crate::{Access, Claims, Role, Verifier};

/// Who may call one gRPC method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// No token needed (health, reflection, token exchange).
    Public,
    /// Users whose role grants `access`; with `services`, Capstan's own
    /// services too (the orchestrator reading nodes, say).
    Users { access: Access, services: bool },
    /// Capstan's services only: the internal control-plane calls.
    Services,
    /// Agents only. The handler must also check that the node the call is
    /// about is the caller's own ([`Claims::node_id`]).
    Nodes,
    /// Agents and services: what reports observations (metric samples).
    /// The handler checks that what an agent reports is its own node's.
    Reporters,
}

impl Rule {
    fn admits(self, claims: &Claims) -> bool {
        match self {
            Rule::Public => true,
            Rule::Users { access, services } => {
                claims.role.allows(access) || (services && claims.role == Role::Service)
            }
            Rule::Services => claims.role == Role::Service,
            Rule::Nodes => claims.role == Role::Node,
            Rule::Reporters => matches!(claims.role, Role::Node | Role::Service),
        }
    }
}

/// The rule of every method a server serves. A method without one is
/// denied to everybody: adding a method means deciding who may call it.
#[derive(Clone, Debug)]
pub struct Policy {
    rules: Vec<(&'static str, Rule)>,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy {
    /// Health checks and reflection are always public.
    pub fn new() -> Self {
        Policy {
            rules: vec![
                ("/grpc.health.v1.Health/", Rule::Public),
                ("/grpc.reflection.v1.ServerReflection/", Rule::Public),
                ("/grpc.reflection.v1alpha.ServerReflection/", Rule::Public),
            ],
        }
    }

    /// A policy without even health and reflection public: a server that
    /// answers nothing without a token (the token-verification bench).
    pub fn none() -> Self {
        Policy { rules: Vec::new() }
    }

    /// `path` is a full method (`/capstan.v1.Auth/IssueToken`) or a prefix ending in `/`.
    pub fn rule(mut self, path: &'static str, rule: Rule) -> Self {
        self.rules.push((path, rule));
        self
    }

    pub fn public(self, path: &'static str) -> Self {
        self.rule(path, Rule::Public)
    }

    /// Viewers and up.
    pub fn read(self, path: &'static str) -> Self {
        self.users(path, Access::Read, false)
    }

    /// Operators and up.
    pub fn write(self, path: &'static str) -> Self {
        self.users(path, Access::Write, false)
    }

    pub fn admin(self, path: &'static str) -> Self {
        self.users(path, Access::Admin, false)
    }

    pub fn users(self, path: &'static str, access: Access, services: bool) -> Self {
        self.rule(path, Rule::Users { access, services })
    }

    pub fn services(self, path: &'static str) -> Self {
        self.rule(path, Rule::Services)
    }

    pub fn nodes(self, path: &'static str) -> Self {
        self.rule(path, Rule::Nodes)
    }

    pub fn reporters(self, path: &'static str) -> Self {
        self.rule(path, Rule::Reporters)
    }

    /// The rule for a full method path; `None` means nobody may call it.
    pub fn rule_for(&self, path: &str) -> Option<Rule> {
        self.rules.iter().find_map(|(pattern, rule)| {
            let hit = if pattern.ends_with('/') {
                path.starts_with(pattern)
            } else {
                path == *pattern
            };
            hit.then_some(*rule)
        })
    }

    /// Whether `claims` (none: no token) may call `path`, and if not, why.
    pub fn decide(&self, path: &str, claims: Option<&Claims>) -> Result<(), Error> {
        match (self.rule_for(path), claims) {
            (None, _) => Err(Error::PermissionDenied(format!(
                "`{path}` has no access rule, so nobody may call it"
            ))),
            (Some(Rule::Public), _) => Ok(()),
            (Some(_), None) => Err(Error::Unauthenticated(
                "missing `authorization: Bearer <token>` header".into(),
            )),
            (Some(rule), Some(claims)) if rule.admits(claims) => Ok(()),
            (Some(_), Some(claims)) => Err(Error::PermissionDenied(format!(
                "role `{}` may not call `{path}`",
                claims.role.as_str()
            ))),
        }
    }
}

/// The verified caller of a request that passed [`RequireAuthLayer`]; an
/// error for public methods, which carry no caller.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<&Claims, Error> {
    request
        .extensions()
        .get::<Claims>()
        .ok_or_else(|| Error::Unauthenticated("this call carries no verified caller".into()))
}

/// A tower layer for a tonic server: checks the bearer token and the role
/// before the request reaches any service.
#[derive(Clone)]
pub struct RequireAuthLayer {
    verifier: Arc<Verifier>,
    policy: Arc<Policy>,
    on_denied: Option<DenialHook>,
}

/// Told of every refused call of a method users may change things with:
/// the method, the verified caller (when the token was good), and why.
pub type DenialHook = Arc<dyn Fn(&str, Option<&Claims>, &str) + Send + Sync>;

impl RequireAuthLayer {
    pub fn new(verifier: Arc<Verifier>, policy: Policy) -> Self {
        RequireAuthLayer {
            verifier,
            policy: Arc::new(policy),
            on_denied: None,
        }
    }

    /// Calls `hook` for each refused call of a write or admin method (the
    /// audit log).
    pub fn with_denial_hook(mut self, hook: DenialHook) -> Self {
        self.on_denied = Some(hook);
        self
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

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let path = request.uri().path().to_string();
            let tls =
                request
                    .extensions()
                    .get::<tonic::transport::server::TlsConnectInfo<
                        tonic::transport::server::TcpConnectInfo,
                    >>()
                    .map(|info| info.peer_certs());
            let peer = match tls {
                None => Peer::Plaintext,
                Some(certs) => Peer::Tls(
                    certs
                        .as_deref()
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| crate::certificate_principal(leaf.as_ref())),
                ),
            };
            match authorize(&layer, &path, request.headers(), peer).await {
                Ok(Some(claims)) => {
                    request.extensions_mut().insert(claims);
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::debug!(%path, "rejected call: {err}");
                    let mutating = matches!(
                        layer.policy.rule_for(&path),
                        Some(Rule::Users {
                            access: Access::Write | Access::Admin,
                            ..
                        })
                    );
                    if let Some(hook) = &layer.on_denied
                        && mutating
                    {
                        // The caller, if its token was good (denied by role).
                        let token = request
                            .headers()
                            .get(http::header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "))
                            .map(|t| t.trim().to_string());
                        let claims = match token {
                            Some(token) => layer.verifier.verify(&token).await.ok(),
                            None => None,
                        };
                        hook(&path, claims.as_ref(), &err.to_string());
                    }
                    return Ok(capstan_proto::status(err).into_http());
                }
            }
            inner.call(request).await
        })
    }
}

/// How the caller reached this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Plaintext,
    /// Over mutual TLS (the client's certificate is from the platform's CA,
    /// checked at the handshake), with the service it names, if any.
    Tls(Option<&'static str>),
}

/// The verified claims of the caller (none for a public method). Over
/// mutual TLS the service principal is the certificate: a caller whose
/// certificate names a Capstan service and that sends no token is that
/// service, and a service token is refused (so the shared service key is
/// worth nothing off the platform's hosts).
async fn authorize(
    layer: &RequireAuthLayer,
    path: &str,
    headers: &http::HeaderMap,
    peer: Peer,
) -> Result<Option<Claims>, Error> {
    if layer.policy.rule_for(path) == Some(Rule::Public) {
        return Ok(None);
    }
    // Refuse a method with no rule before spending a verification on it.
    layer.policy.rule_for(path).ok_or_else(|| {
        Error::PermissionDenied(format!(
            "`{path}` has no access rule, so nobody may call it"
        ))
    })?;
    let claims = match headers.get(http::header::AUTHORIZATION) {
        None => None,
        Some(header) => {
            let token = header
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    Error::Unauthenticated("authorization header must be `Bearer <token>`".into())
                })?;
            Some(layer.verifier.verify(token.trim()).await?)
        }
    };
    let claims = match (peer, claims) {
        (Peer::Tls(_), Some(claims)) if claims.role == Role::Service => {
            return Err(Error::Unauthenticated(
                "over mutual TLS a service is its certificate: service tokens are refused".into(),
            ));
        }
        (Peer::Tls(Some(service)), None) => Some(crate::certificate_claims(service)),
        (_, claims) => claims,
    };
    layer.policy.decide(path, claims.as_ref())?;
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(role: Role) -> Claims {
        Claims {
            iss: crate::ISSUER.into(),
            aud: crate::AUDIENCE.into(),
            sub: "someone".into(),
            role,
            iat: 0,
            nbf: 0,
            exp: 0,
            jti: String::new(),
            project: String::new(),
        }
    }

    #[test]
    fn policy_denies_what_it_does_not_name() {
        let policy = Policy::new()
            .public("/capstan.v1.Auth/IssueToken")
            .read("/capstan.v1.Orchestrator/GetApp")
            .services("/capstan.v1.Scheduler/Place")
            .nodes("/capstan.v1.Scheduler/Heartbeat")
            .admin("/capstan.v1.Auth/CreateApiKey");
        assert_eq!(
            policy.rule_for("/grpc.health.v1.Health/Check"),
            Some(Rule::Public)
        );
        assert!(policy.decide("/capstan.v1.Auth/IssueToken", None).is_ok());
        let admin = claims(Role::Admin);
        let service = claims(Role::Service);
        let node = claims(Role::Node);
        // Unlisted: denied even to admin.
        assert_eq!(policy.rule_for("/capstan.v1.Orchestrator/ApplyApp"), None);
        assert!(matches!(
            policy.decide("/capstan.v1.Orchestrator/ApplyApp", Some(&admin)),
            Err(Error::PermissionDenied(_))
        ));
        // Internal methods: the service role only, not even admin.
        assert!(
            policy
                .decide("/capstan.v1.Scheduler/Place", Some(&service))
                .is_ok()
        );
        assert!(
            policy
                .decide("/capstan.v1.Scheduler/Place", Some(&admin))
                .is_err()
        );
        assert!(
            policy
                .decide("/capstan.v1.Scheduler/Place", Some(&node))
                .is_err()
        );
        assert!(
            policy
                .decide("/capstan.v1.Scheduler/Heartbeat", Some(&node))
                .is_ok()
        );
        assert!(
            policy
                .decide("/capstan.v1.Scheduler/Heartbeat", Some(&service))
                .is_err()
        );
        // The service role is no user: it cannot read what users read.
        assert!(
            policy
                .decide("/capstan.v1.Orchestrator/GetApp", Some(&service))
                .is_err()
        );
        assert!(matches!(
            policy.decide("/capstan.v1.Orchestrator/GetApp", None),
            Err(Error::Unauthenticated(_))
        ));
    }
}
