//! The auth service. It holds the only signing key, keeps API keys as SHA-256
//! digests (never the keys), and issues JWTs that live [`TOKEN_TTL`] unless
//! configured otherwise ([`parse_token_ttl`]).
//!
//! It never stores or logs an API key or a token.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use capstan_authn::{
    Policy, RequireAuthLayer, Role, StaticKeys, TokenSigner, Verifier, api_key_digest,
};
use capstan_proto::v1::auth_server::{Auth, AuthServer};
use capstan_proto::v1::{
    CreateApiKeyRequest, CreateApiKeyResponse, GetVerificationKeysRequest,
    GetVerificationKeysResponse, IssueTokenRequest, IssueTokenResponse, VerificationKey,
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
    let ttl = capstan_types::duration::parse(text)?;
    if ttl < Duration::from_secs(1) || ttl > capstan_authn::MAX_TOKEN_LIFETIME {
        return Err(format!("`{text}` must be between 1s and 1h"));
    }
    Ok(ttl)
}
const SIGNING_KEY_PATH: &str = "auth/signing-key";
const API_KEYS: &str = "api_keys";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub name: String,
    pub role: Role,
    pub created_ms: i64,
}

/// Loads the signing key from the secret store, creating it on first start
/// (check-and-set: auth replicas starting together agree on one key).
pub async fn signing_key(platform: &Platform) -> Result<Arc<TokenSigner>, Error> {
    let secret =
        capstan_secrets::get_or_create(platform.secrets.as_ref(), SIGNING_KEY_PATH, || {
            Secret::new(B64.encode(TokenSigner::generate().secret_bytes()))
        })
        .await
        .map_err(Error::internal)?;
    let bytes: [u8; 32] = B64
        .decode(secret.expose())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            Error::Internal(format!(
                "secret `{SIGNING_KEY_PATH}` is not a base64 Ed25519 key"
            ))
        })?;
    Ok(Arc::new(TokenSigner::from_bytes(&bytes)))
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
    };
    keys.write(&api_key_digest(api_key.expose()), &record, None)
        .await
        .map_err(Error::internal)?;
    Ok(())
}

struct AuthApi {
    platform: Platform,
    token_ttl: Duration,
    signer: Arc<TokenSigner>,
    keys: Table<ApiKeyRecord>,
}

#[tonic::async_trait]
impl Auth for AuthApi {
    async fn issue_token(
        &self,
        request: Request<IssueTokenRequest>,
    ) -> Result<Response<IssueTokenResponse>, Status> {
        let api_key = request.into_inner().api_key;
        if api_key.is_empty() {
            return Err(Status::unauthenticated("api_key: missing"));
        }
        let record = self
            .keys
            .get(&api_key_digest(&api_key))
            .await
            .map_err(|e| capstan_proto::status(Error::internal(e)))?
            .map(|(_, r)| r)
            .ok_or_else(|| Status::unauthenticated("api_key: not a valid API key"))?;
        let (token, claims) = self.signer.issue(&record.name, record.role, self.token_ttl);
        Ok(Response::new(IssueTokenResponse {
            token,
            expires_at: claims.exp,
        }))
    }

    async fn get_verification_keys(
        &self,
        _: Request<GetVerificationKeysRequest>,
    ) -> Result<Response<GetVerificationKeysResponse>, Status> {
        Ok(Response::new(GetVerificationKeysResponse {
            keys: vec![VerificationKey {
                kid: self.signer.kid().to_string(),
                public_key: self.signer.public_key().to_vec(),
            }],
        }))
    }

    async fn create_api_key(
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
                        "must be one of admin, operator, viewer (people) or node (an agent), got `{}`",
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
        let api_key = capstan_authn::generate_api_key();
        let record = ApiKeyRecord {
            name: name.to_string(),
            role,
            created_ms: now_ms(),
        };
        self.keys
            .put(&api_key_digest(&api_key), &record, Expect::Absent)
            .await
            .map_err(|e| capstan_proto::status(Error::internal(e)))?;
        tracing::info!(name, role = role.as_str(), by = %caller.sub, "created API key");
        self.platform
            .emit(
                Event::new(
                    capstan_server::new_id("ev"),
                    now_ms(),
                    EventKind::KeyCreated,
                )
                .message(format!("API key `{name}` with role {}", role.as_str()))
                .actor(&caller.sub, caller.role.as_str()),
            )
            .await;
        Ok(Response::new(CreateApiKeyResponse { api_key }))
    }
}

/// Who may call what on the auth service.
pub fn policy() -> Policy {
    Policy::new()
        .public("/capstan.v1.Auth/IssueToken")
        .public("/capstan.v1.Auth/GetVerificationKeys")
        .admin("/capstan.v1.Auth/CreateApiKey")
}

/// Serves the auth service on `listener` until `shutdown`.
pub async fn run(
    platform: Platform,
    token_ttl: Duration,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let signer = signing_key(&platform).await?;
    // The auth service verifies its own tokens without a network round trip.
    let verifier = Arc::new(Verifier::new(Arc::new(StaticKeys(vec![(
        signer.kid().to_string(),
        signer.public_key(),
    )]))));
    let policy = policy();
    let api = AuthApi {
        platform: platform.clone(),
        token_ttl,
        signer,
        keys: Table::new(platform.store.clone(), API_KEYS),
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
