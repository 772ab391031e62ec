//! The auth service. It holds the only signing key, keeps API keys as SHA-256
//! digests (never the keys), and issues JWTs that live [`TOKEN_TTL`] unless
//! configured otherwise ([`parse_token_ttl`]).
//!
//! It never stores or logs an API key or a token.

use std::sync::Arc;
use std::time::Duration;

pub mod signing;

use capstan_authn::{Policy, RequireAuthLayer, Role, Signer, Verifier, api_key_digest};
use capstan_cache::{Admit, RateLimit};
use capstan_proto::v1::auth_server::{Auth, AuthServer};
use capstan_proto::v1::{
    ApiKeyInfo, CreateApiKeyRequest, CreateApiKeyResponse, GetVerificationKeysRequest,
    GetVerificationKeysResponse, IssueTokenRequest, IssueTokenResponse, ListApiKeysRequest,
    ListApiKeysResponse, RevokeApiKeyRequest, RevokeApiKeyResponse, RotateSigningKeyRequest,
    RotateSigningKeyResponse, VerificationKey,
};
use capstan_secrets::Secret;
use capstan_server::{Platform, Service, now_ms};
use capstan_store::{Expect, Table};
use capstan_types::{Error, Event, EventKind, KeyName, NodeId};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub const TOKEN_TTL: Duration = Duration::from_secs(15 * 60);

/// A token lifetime from a flag: 1s to the verifiers' maximum of one hour.
pub fn parse_token_ttl(text: &str) -> Result<Duration, String> {
    capstan_types::duration::parse_within(
        text,
        Duration::from_secs(1)..=capstan_authn::MAX_TOKEN_LIFETIME,
        "1s and 1h",
    )
}
const API_KEYS: &str = "api_keys";
/// `<key digest>/<jti>` of every live token, kept as long as the token
/// lives: what revoking a key denies.
const ISSUED_TOKENS: &str = "issued_tokens";

/// Token exchanges per API key: a burst of 30, then 10 a second.
pub const PER_KEY: RateLimit = RateLimit {
    burst: 30,
    per_second: 10.0,
};
/// Token exchanges per peer address, whatever the key (guessing included).
pub const PER_PEER: RateLimit = RateLimit {
    burst: 200,
    per_second: 100.0,
};
/// Verifiers tolerate this much clock skew past `exp`, so a denial is kept
/// that much longer.
const DENY_LEEWAY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IssuedToken {
    exp: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub name: String,
    pub role: Role,
    pub created_ms: i64,
    /// The project a viewer's or deployer's key is for; empty for admin,
    /// node and service keys, and for keys made before projects (which are
    /// `default`'s: see `Claims::project_scope`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub project: String,
}

/// What auth signs with: Vault transit when secrets live in Vault (the
/// private key never leaves it), else the keyring in the secret store.
pub async fn signer(platform: &Platform) -> Result<Arc<dyn Signer>, Error> {
    Ok(match &platform.transit {
        Some(transit) => Arc::new(signing::TransitSigner::new(transit.clone())),
        None => Arc::new(signing::Keyring::open(platform.secrets.clone()).await?),
    })
}

/// Makes sure the keys of a single-host installation exist and are known:
/// the admin key in `<data_dir>/admin.key` (0600), for the CLI, and the
/// service key the services call each other with. Returns the admin key.
pub async fn bootstrap_keys(
    platform: &Platform,
    data_dir: &std::path::Path,
) -> Result<Secret, Error> {
    let path = data_dir.join("admin.key");
    let admin_key =
        capstan_secrets::read_or_create_private_file(&path, capstan_authn::generate_api_key)
            .map_err(|e| Error::Internal(format!("admin key {}: {e}", path.display())))?;
    let admin_key = Secret::new(admin_key);
    ensure_api_key(
        platform,
        &platform.api_key,
        "capstan-services",
        Role::Service,
    )
    .await?;
    ensure_api_key(platform, &admin_key, "admin", Role::Admin).await?;
    Ok(admin_key)
}

/// The API key of one agent, kept in the secret store under
/// `nodes/<node_id>/api-key` and recorded with the node role: its tokens may
/// act only as that node. Created on first use; idempotent.
pub async fn node_key(platform: &Platform, node_id: &NodeId) -> Result<Secret, Error> {
    let path = format!("nodes/{node_id}/api-key");
    let key = capstan_secrets::get_or_create(platform.secrets.as_ref(), &path, || {
        Secret::new(capstan_authn::generate_api_key())
    })
    .await
    .map_err(Error::internal)?;
    ensure_api_key(platform, &key, node_id.as_str(), Role::Node).await?;
    Ok(key)
}

/// Records an API key (by digest) with a name and role. Idempotent.
pub async fn ensure_api_key(
    platform: &Platform,
    api_key: &Secret,
    name: &str,
    role: Role,
) -> Result<(), Error> {
    let keys: Table<ApiKeyRecord> = Table::new(platform.store.clone(), API_KEYS);
    let record = ApiKeyRecord {
        name: name.to_string(),
        role,
        created_ms: now_ms(),
        project: String::new(),
    };
    keys.write(&api_key_digest(api_key.expose()), &record, None)
        .await
        .map_err(Error::internal)?;
    Ok(())
}

struct AuthApi {
    platform: Platform,
    token_ttl: Duration,
    signer: Arc<dyn Signer>,
    keys: Table<ApiKeyRecord>,
    issued: Table<IssuedToken>,
}

impl AuthApi {
    /// Takes a token from `bucket`; RESOURCE_EXHAUSTED with the delay (also
    /// in the `retry-after-ms` header) when it is empty. A cache that does
    /// not answer limits nothing: it must not take token exchange down.
    async fn limit(&self, bucket: &str, limit: RateLimit, what: &str) -> Result<(), Status> {
        match self.platform.cache.take(bucket, limit).await {
            Ok(Admit::Allowed) => Ok(()),
            Ok(Admit::Limited { retry_after }) => {
                let ms = retry_after.as_millis().max(1);
                let mut status = Status::resource_exhausted(format!(
                    "too many token requests for this {what}; retry in {ms} ms"
                ));
                if let Ok(value) = ms.to_string().parse() {
                    status.metadata_mut().insert("retry-after-ms", value);
                }
                Err(status)
            }
            Err(e) => {
                tracing::warn!("rate limiter unavailable, not limiting: {e}");
                Ok(())
            }
        }
    }

    /// Every key record with this name: (digest, record).
    async fn named(&self, name: &str) -> Result<Vec<(String, ApiKeyRecord)>, Status> {
        Ok(self
            .keys
            .list("")
            .await
            .map_err(|e| capstan_proto::status(Error::internal(e)))?
            .into_iter()
            .filter(|(_, _, record)| record.name == name)
            .map(|(digest, _, record)| (digest, record))
            .collect())
    }
}

fn parse_key_name(name: &str) -> Result<String, Status> {
    KeyName::parse("name", name)
        .map(|n| n.to_string())
        .or_else(|_| NodeId::parse("name", name).map(|n| n.to_string()))
        .map_err(capstan_proto::status)
}

#[tonic::async_trait]
impl Auth for AuthApi {
    async fn issue_token(
        &self,
        request: Request<IssueTokenRequest>,
    ) -> Result<Response<IssueTokenResponse>, Status> {
        if let Some(peer) = request.remote_addr() {
            self.limit(&format!("issue:peer:{}", peer.ip()), PER_PEER, "address")
                .await?;
        }
        let api_key = request.into_inner().api_key;
        if api_key.is_empty() {
            return Err(Status::unauthenticated("api_key: missing"));
        }
        let digest = api_key_digest(&api_key);
        let record = self
            .keys
            .get(&digest)
            .await
            .map_err(|e| capstan_proto::status(Error::internal(e)))?
            .map(|(_, r)| r)
            .ok_or_else(|| Status::unauthenticated("api_key: not a valid API key"))?;
        self.limit(&format!("issue:key:{digest}"), PER_KEY, "API key")
            .await?;
        let (token, claims) = capstan_authn::issue_in(
            self.signer.as_ref(),
            &record.name,
            record.role,
            &record.project,
            self.token_ttl,
        )
        .await
        .map_err(capstan_proto::status)?;
        // Recorded before the token leaves, so a revocation finds it.
        self.issued
            .write(
                &format!("{digest}/{}", claims.jti),
                &IssuedToken { exp: claims.exp },
                Some(self.token_ttl + DENY_LEEWAY),
            )
            .await
            .map_err(|e| capstan_proto::status(Error::internal(e)))?;
        Ok(Response::new(IssueTokenResponse {
            token,
            expires_at: claims.exp,
        }))
    }

    async fn get_verification_keys(
        &self,
        _: Request<GetVerificationKeysRequest>,
    ) -> Result<Response<GetVerificationKeysResponse>, Status> {
        let keys = self
            .signer
            .public_keys()
            .await
            .map_err(capstan_proto::status)?
            .into_iter()
            .map(|(kid, public_key)| VerificationKey {
                kid,
                public_key: public_key.to_vec(),
            })
            .collect();
        Ok(Response::new(GetVerificationKeysResponse { keys }))
    }

    async fn create_api_key(
        &self,
        request: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let mut audit =
            capstan_server::audit::begin(&request, "Auth/CreateApiKey", &request.get_ref().name);
        let summary = match request.get_ref().project.as_str() {
            "" => format!("role {}", request.get_ref().role),
            project => format!("role {} in project {project}", request.get_ref().role),
        };
        if !request.get_ref().project.is_empty() {
            audit.project(&request.get_ref().project);
        }
        let result = self.create_api_key_inner(request).await;
        audit.finish(&self.platform.store, &result, summary).await;
        result
    }

    async fn list_api_keys(
        &self,
        _: Request<ListApiKeysRequest>,
    ) -> Result<Response<ListApiKeysResponse>, Status> {
        let mut keys: Vec<ApiKeyInfo> = self
            .keys
            .values("")
            .await
            .map_err(|e| capstan_proto::status(Error::internal(e)))?
            .into_iter()
            .map(|record| ApiKeyInfo {
                project: match record.role {
                    Role::Viewer | Role::Deployer if record.project.is_empty() => {
                        capstan_authn::DEFAULT_PROJECT.to_string()
                    }
                    _ => record.project,
                },
                name: record.name,
                role: record.role.as_str().to_string(),
                created_ms: record.created_ms,
            })
            .collect();
        keys.sort_by(|a, b| (&a.name, a.created_ms).cmp(&(&b.name, b.created_ms)));
        Ok(Response::new(ListApiKeysResponse { keys }))
    }

    async fn list_audit(
        &self,
        request: Request<capstan_proto::v1::ListAuditRequest>,
    ) -> Result<Response<capstan_proto::v1::ListAuditResponse>, Status> {
        let r = request.into_inner();
        if r.limit > 10_000 {
            return Err(capstan_proto::status(Error::invalid(
                "limit",
                format!("{}; at most 10000", r.limit),
            )));
        }
        if !r.project.is_empty() {
            capstan_types::ProjectName::parse("project", &r.project)
                .map_err(capstan_proto::status)?;
        }
        let limit = if r.limit == 0 { 1000 } else { r.limit as usize };
        let mut records: Vec<capstan_proto::v1::AuditRecord> =
            capstan_server::audit::list(&self.platform.store)
                .await
                .map_err(capstan_proto::status)?
                .into_iter()
                .filter(|rec| rec.at_ms >= r.since_ms)
                .filter(|rec| r.project.is_empty() || rec.entry.project == r.project)
                .map(|rec| capstan_proto::v1::AuditRecord {
                    project: rec.entry.project,
                    seq: rec.seq,
                    at_ms: rec.at_ms,
                    actor: rec.entry.actor,
                    role: rec.entry.role,
                    method: rec.entry.method,
                    target: rec.entry.target,
                    summary: rec.entry.summary,
                    result: rec.entry.result,
                    prev: rec.prev,
                    hash: rec.hash,
                })
                .collect();
        if records.len() > limit {
            records.drain(..records.len() - limit);
        }
        Ok(Response::new(capstan_proto::v1::ListAuditResponse {
            records,
        }))
    }

    async fn verify_audit(
        &self,
        _: Request<capstan_proto::v1::VerifyAuditRequest>,
    ) -> Result<Response<capstan_proto::v1::VerifyAuditResponse>, Status> {
        let verdict = capstan_server::audit::verify(&self.platform.store)
            .await
            .map_err(capstan_proto::status)?;
        Ok(Response::new(match verdict {
            Ok(records) => capstan_proto::v1::VerifyAuditResponse {
                intact: true,
                records,
                problem: String::new(),
            },
            Err(problem) => capstan_proto::v1::VerifyAuditResponse {
                intact: false,
                records: 0,
                problem,
            },
        }))
    }

    async fn create_project(
        &self,
        request: Request<capstan_proto::v1::CreateProjectRequest>,
    ) -> Result<Response<capstan_proto::v1::Project>, Status> {
        let name = request.get_ref().name.clone();
        let mut audit = capstan_server::audit::begin(&request, "Auth/CreateProject", &name);
        audit.project(&name);
        let result = self.create_project_inner(request).await;
        audit.finish(&self.platform.store, &result, "").await;
        result
    }

    /// Admins see every project; anyone else, the one their key is for.
    async fn list_projects(
        &self,
        request: Request<capstan_proto::v1::ListProjectsRequest>,
    ) -> Result<Response<capstan_proto::v1::ListProjectsResponse>, Status> {
        let caller = capstan_authn::caller(&request).map_err(capstan_proto::status)?;
        let projects = capstan_server::projects::list(&self.platform.store)
            .await
            .map_err(capstan_proto::status)?
            .into_iter()
            .filter(|p| caller.in_project(&p.name))
            .map(project_to_wire)
            .collect();
        Ok(Response::new(capstan_proto::v1::ListProjectsResponse {
            projects,
        }))
    }

    async fn rotate_signing_key(
        &self,
        request: Request<RotateSigningKeyRequest>,
    ) -> Result<Response<RotateSigningKeyResponse>, Status> {
        let audit = capstan_server::audit::begin(&request, "Auth/RotateSigningKey", "signing key");
        let summary = String::new();
        let result = self.rotate_signing_key_inner(request).await;
        audit.finish(&self.platform.store, &result, summary).await;
        result
    }

    async fn revoke_api_key(
        &self,
        request: Request<RevokeApiKeyRequest>,
    ) -> Result<Response<RevokeApiKeyResponse>, Status> {
        let audit =
            capstan_server::audit::begin(&request, "Auth/RevokeApiKey", &request.get_ref().name);
        let summary = String::new();
        let result = self.revoke_api_key_inner(request).await;
        audit.finish(&self.platform.store, &result, summary).await;
        result
    }
}

/// Who may call what on the auth service.
pub fn policy() -> Policy {
    Policy::new()
        .public("/capstan.v1.Auth/IssueToken")
        .public("/capstan.v1.Auth/GetVerificationKeys")
        .admin("/capstan.v1.Auth/CreateApiKey")
        .admin("/capstan.v1.Auth/ListApiKeys")
        .admin("/capstan.v1.Auth/RevokeApiKey")
        .admin("/capstan.v1.Auth/RotateSigningKey")
        .admin("/capstan.v1.Auth/ListAudit")
        .admin("/capstan.v1.Auth/VerifyAudit")
        .admin("/capstan.v1.Auth/CreateProject")
        .read("/capstan.v1.Auth/ListProjects")
}

/// Serves the auth service on `listener` until `shutdown`.
pub async fn run(
    platform: Platform,
    token_ttl: Duration,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let signer = signer(&platform).await?;
    // The auth service verifies its own tokens without a network round trip.
    let verifier = Arc::new(
        Verifier::new(Arc::new(signing::SignerKeys(signer.clone())))
            .with_revocations(platform.cache.clone()),
    );
    let policy = policy();
    let api = AuthApi {
        platform: platform.clone(),
        token_ttl,
        signer,
        keys: Table::new(platform.store.clone(), API_KEYS),
        issued: Table::new(platform.store.clone(), ISSUED_TOKENS),
    };
    let service = Service {
        name: "auth",
        instance_id: capstan_server::new_id("auth"),
        grpc_names: vec!["capstan.v1.Auth"],
        routes: tonic::service::Routes::new(AuthServer::new(api)),
        auth: RequireAuthLayer::new(verifier, policy),
    };
    capstan_server::serve(&platform, service, listener, shutdown).await
}

fn project_to_wire(p: capstan_server::projects::Project) -> capstan_proto::v1::Project {
    capstan_proto::v1::Project {
        name: p.name,
        created_ms: p.created_ms,
        created_by: p.created_by,
    }
}

/// The mutating calls' bodies; the trait methods record each in the
/// audit log around them.
impl AuthApi {
    async fn create_project_inner(
        &self,
        request: Request<capstan_proto::v1::CreateProjectRequest>,
    ) -> Result<Response<capstan_proto::v1::Project>, Status> {
        let caller = capstan_authn::caller(&request)
            .map_err(capstan_proto::status)?
            .clone();
        let name = capstan_types::ProjectName::parse("name", &request.get_ref().name)
            .map_err(capstan_proto::status)?;
        let project = capstan_server::projects::create(&self.platform.store, &name, &caller.sub)
            .await
            .map_err(capstan_proto::status)?;
        tracing::info!(project = %name, by = %caller.sub, "created project");
        Ok(Response::new(project_to_wire(project)))
    }

    async fn create_api_key_inner(
        &self,
        request: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let caller = capstan_authn::caller(&request)
            .map_err(capstan_proto::status)?
            .clone();
        let request = request.into_inner();
        let role = match Role::parse(&request.role) {
            Some(role) if role.is_user() || role == Role::Node => role,
            _ => {
                return Err(capstan_proto::status(Error::invalid(
                    "role",
                    format!(
                        "must be one of admin, deployer, viewer (people) or node (an agent), got `{}`",
                        request.role
                    ),
                )));
            }
        };
        let name = if role == Role::Node {
            NodeId::parse("name", &request.name)
                .map_err(capstan_proto::status)?
                .to_string()
        } else {
            KeyName::parse("name", &request.name)
                .map_err(capstan_proto::status)?
                .to_string()
        };
        let name = name.as_str();
        let project = match (role, request.project.as_str()) {
            (Role::Viewer | Role::Deployer, "") => capstan_authn::DEFAULT_PROJECT.to_string(),
            (Role::Viewer | Role::Deployer, project) => {
                capstan_types::ProjectName::parse("project", project)
                    .map_err(capstan_proto::status)?;
                capstan_server::projects::require(&self.platform.store, "project", project)
                    .await
                    .map_err(capstan_proto::status)?;
                project.to_string()
            }
            (_, "") => String::new(),
            (role, _) => {
                return Err(capstan_proto::status(Error::invalid(
                    "project",
                    format!(
                        "a {} key is for every project: leave it empty",
                        role.as_str()
                    ),
                )));
            }
        };
        if !self.named(name).await?.is_empty() {
            return Err(Status::already_exists(format!(
                "name: an API key named `{name}` exists; revoke it first or pick another name"
            )));
        }
        let api_key = capstan_authn::generate_api_key();
        let record = ApiKeyRecord {
            name: name.to_string(),
            role,
            created_ms: now_ms(),
            project: project.clone(),
        };
        self.keys
            .put(&api_key_digest(&api_key), &record, Expect::Absent)
            .await
            .map_err(|e| capstan_proto::status(Error::internal(e)))?;
        tracing::info!(name, role = role.as_str(), project, by = %caller.sub, "created API key");
        self.platform
            .emit(
                Event::new(
                    capstan_server::new_id("ev"),
                    now_ms(),
                    EventKind::KeyCreated,
                )
                .message(match project.as_str() {
                    "" => format!("API key `{name}` with role {}", role.as_str()),
                    project => format!(
                        "API key `{name}` with role {} in project {project}",
                        role.as_str()
                    ),
                })
                .actor(&caller.sub, caller.role.as_str()),
            )
            .await;
        Ok(Response::new(CreateApiKeyResponse { api_key }))
    }

    async fn revoke_api_key_inner(
        &self,
        request: Request<RevokeApiKeyRequest>,
    ) -> Result<Response<RevokeApiKeyResponse>, Status> {
        let caller = capstan_authn::caller(&request)
            .map_err(capstan_proto::status)?
            .clone();
        let name = parse_key_name(&request.into_inner().name)?;
        let records = self.named(&name).await?;
        if records.is_empty() {
            return Err(capstan_proto::status(Error::NotFound(format!(
                "API key `{name}`"
            ))));
        }
        if records.iter().any(|(_, r)| r.role == Role::Service) {
            return Err(Status::failed_precondition(format!(
                "name: `{name}` is the services' own key; revoking it would cut every service off"
            )));
        }
        let now = capstan_server::now_ms() / 1000;
        let mut revoked_tokens = 0u32;
        for (digest, _) in &records {
            // The key first: from here on it issues nothing new.
            self.keys
                .remove(digest)
                .await
                .map_err(|e| capstan_proto::status(Error::internal(e)))?;
            let live = self
                .issued
                .list(&format!("{digest}/"))
                .await
                .map_err(|e| capstan_proto::status(Error::internal(e)))?;
            for (key, _, token) in live {
                let Some((_, jti)) = key.split_once('/') else {
                    continue;
                };
                let remaining = Duration::from_secs(token.exp.saturating_sub(now).max(0) as u64);
                self.platform
                    .cache
                    .revoke(jti, remaining + DENY_LEEWAY)
                    .await
                    .map_err(|e| Status::unavailable(format!("the token denylist: {e}")))?;
                revoked_tokens += 1;
            }
        }
        tracing::info!(name, revoked_tokens, by = %caller.sub, "revoked API key");
        self.platform
            .emit(
                Event::new(
                    capstan_server::new_id("ev"),
                    now_ms(),
                    EventKind::KeyRevoked,
                )
                .message(format!(
                    "API key `{name}` revoked with {revoked_tokens} live tokens"
                ))
                .actor(&caller.sub, caller.role.as_str()),
            )
            .await;
        Ok(Response::new(RevokeApiKeyResponse { revoked_tokens }))
    }

    async fn rotate_signing_key_inner(
        &self,
        request: Request<RotateSigningKeyRequest>,
    ) -> Result<Response<RotateSigningKeyResponse>, Status> {
        let caller = capstan_authn::caller(&request)
            .map_err(capstan_proto::status)?
            .clone();
        let kid = self.signer.rotate().await.map_err(capstan_proto::status)?;
        tracing::info!(kid, by = %caller.sub, "rotated the token signing key");
        self.platform
            .emit(
                Event::new(
                    capstan_server::new_id("ev"),
                    now_ms(),
                    EventKind::SigningKeyRotated,
                )
                .message(format!("tokens are now signed with key `{kid}`"))
                .actor(&caller.sub, caller.role.as_str()),
            )
            .await;
        Ok(Response::new(RotateSigningKeyResponse { kid }))
    }
}
