//! A **test double** of the Vault HTTP API, for wire-level tests where no
//! real Vault can be installed. It implements the documented behaviour of
//! the endpoints Capstan uses, and checks every request it gets against the
//! OpenAPI subset in `shared/contracts/vault-api-subset.openapi.json`
//! (method, path template, request body schema): [`VaultDouble::violations`].
//!
//! - `POST /v1/auth/approle/role/:role/secret-id`: with `X-Vault-Wrap-TTL`
//!   the answer is only `wrap_info.token`, a single-use wrapping token.
//! - `POST /v1/sys/wrapping/unwrap`: the wrapped response, once; then 400
//!   "wrapping token is not valid or does not exist".
//! - `POST /v1/auth/approle/login`: `{role_id, secret_id}` to a token with
//!   the role's TTL and max TTL; 400 "invalid role or secret ID".
//! - `POST /v1/auth/token/renew-self`: extends the token, never past its max
//!   TTL (then `lease_duration` is what is left); 403 for a dead token.
//! - `GET|POST /v1/secret/data/:path` (KV v2): versions from 1, `options.cas`
//!   (0: only if absent), 400 "check-and-set parameter did not match the
//!   current version"; 404 for a missing secret; 403 "permission denied"
//!   outside the role's policy prefix or with a dead token.
//! - `GET /v1/sys/health`.
//! - The seal lifecycle, for a double made with
//!   [`VaultDouble::start_uninitialized`]: `GET /v1/sys/init`,
//!   `POST /v1/sys/init` (one key share: `keys`, `keys_base64`,
//!   `root_token`; 400 "Vault is already initialized"), `GET
//!   /v1/sys/seal-status`, `POST /v1/sys/unseal` (`key`, base64 or hex; 400
//!   for a wrong key). While it is uninitialised or sealed every other path
//!   but `sys/health` answers 503 "Vault is sealed".
//! - PKI at `pki/`: `POST /v1/pki/root/generate/internal` (a root CA, once),
//!   `GET /v1/pki/ca/pem` (204 with none), `POST /v1/pki/roles/:name`
//!   (`allowed_domains`, bare names only), `POST /v1/pki/issue/:role`: a
//!   certificate for `common_name` (SAN DNS:common_name, server and client
//!   use) if the role allows it (400 "common name ... not allowed by this
//!   role") and the token's policy grants `pki/issue/<role>` (403).
//!
//! Lives in testkit: never in a shipped binary.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::go_duration;

use crate::consul_double::RecordedRequest;

struct Role {
    role_id: String,
    /// KV paths (after `secret/data/`) this role's policy allows.
    prefixes: Vec<String>,
    /// ACL policies bound to the role (their paths add to `prefixes`).
    policies: Vec<String>,
    ttl: Duration,
    max_ttl: Duration,
}

struct Token {
    /// `None`: the root token (everything).
    prefixes: Option<Vec<String>>,
    ttl: Duration,
    expires: Instant,
    max: Instant,
}

#[derive(Default)]
struct State {
    auth_methods: std::collections::BTreeSet<String>,
    mounts: std::collections::BTreeSet<String>,
    /// Transit key name -> its versions (signing key, created), oldest first.
    transit_keys: HashMap<String, Vec<(ed25519_dalek::SigningKey, String)>>,
    /// ACL policy name -> the KV prefixes its `secret/data/...` paths allow.
    policies: HashMap<String, Vec<String>>,
    roles: HashMap<String, Role>,
    secret_ids: HashMap<String, String>,
    wraps: HashMap<String, Value>,
    tokens: HashMap<String, Token>,
    kv: HashMap<String, Vec<Value>>,
    requests: Vec<RecordedRequest>,
    violations: Vec<String>,
    logins: usize,
    renewals: usize,
    /// The PKI engine's CA, once generated (or given).
    pki_ca: Option<crate::pki::TestCa>,
    /// PKI role -> the names it may issue for.
    pki_roles: HashMap<String, Vec<String>>,
    issued: usize,
    /// What `expiration` the double reports; [`PKI_TTL`] unless set.
    pki_ttl: Option<Duration>,
    /// `None`: initialised and unsealed from the start (the usual double).
    /// `Some`: the seal lifecycle, with the unseal key once initialised.
    seal: Option<Seal>,
}

struct Seal {
    key: Option<[u8; 32]>,
    sealed: bool,
}

/// How long the double's PKI certificates are said to last.
pub const PKI_TTL: Duration = Duration::from_secs(72 * 3600);

pub struct VaultDouble {
    address: SocketAddr,
    root: String,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

/// The OpenAPI subset, compiled once: (method, path regex, body schema).
struct Spec {
    operations: Vec<(String, regex::Regex, Option<jsonschema::Validator>)>,
}

fn spec() -> Arc<Spec> {
    static SPEC: std::sync::OnceLock<Arc<Spec>> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/contracts/vault-api-subset.openapi.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: the Vault double checks requests against it; shared/ must sit beside the repository",
                path.display()
            )
        });
        let document: Value = serde_json::from_str(&text).expect("the OpenAPI subset is JSON");
        let mut operations = Vec::new();
        let pattern = regex::Regex::new(r"\{[^}]+\}").unwrap();
        for (template, item) in document["paths"].as_object().expect("paths") {
            let mut regex = String::from("^/v1");
            let mut last = 0;
            for found in pattern.find_iter(template) {
                regex.push_str(&regex::escape(&template[last..found.start()]));
                // KV paths hold slashes; every other parameter is one segment.
                regex.push_str(if found.as_str() == "{path}" { ".+" } else { "[^/]+" });
                last = found.end();
            }
            regex.push_str(&regex::escape(&template[last..]));
            regex.push('$');
            let regex = regex::Regex::new(&regex).unwrap();
            for (method, operation) in item.as_object().unwrap() {
                if !["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                    continue;
                }
                let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
                let validator = (!schema.is_null()).then(|| {
                    let root = json!({ "components": document["components"], "allOf": [schema] });
                    jsonschema::validator_for(&root).expect("the subset's schemas compile")
                });
                operations.push((method.to_uppercase(), regex.clone(), validator));
            }
        }
        Arc::new(Spec { operations })
    })
    .clone()
}

impl Spec {
    fn check(&self, method: &str, path: &str, body: &str) -> Result<(), String> {
        let matching: Vec<_> = self
            .operations
            .iter()
            .filter(|(m, regex, _)| m == method && regex.is_match(path))
            .collect();
        if matching.is_empty() {
            return Err(format!("{method} {path}: not in the Vault API subset"));
        }
        let Some((_, _, Some(validator))) = matching.iter().find(|(_, _, v)| v.is_some()) else {
            return Ok(());
        };
        if body.is_empty() {
            return Ok(());
        }
        let value: Value = serde_json::from_str(body)
            .map_err(|e| format!("{method} {path}: body is not JSON: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("{method} {path}: {}", errors.join("; ")))
        }
    }
}

/// A new transit key version, created now.
fn new_version() -> (ed25519_dalek::SigningKey, String) {
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    (key, rfc3339(now))
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil from days).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::random::<u128>())
}

impl VaultDouble {
    /// A Vault as a fresh server is: not initialised, sealed. `POST
    /// /v1/sys/init` hands out [`VaultDouble::root_token`].
    pub async fn start_uninitialized() -> VaultDouble {
        let double = VaultDouble::start().await;
        double.state.lock().unwrap().seal = Some(Seal {
            key: None,
            sealed: true,
        });
        double
    }

    /// Seals it again, as a restart of a real server does.
    pub fn seal(&self) {
        if let Some(seal) = self.state.lock().unwrap().seal.as_mut() {
            seal.sealed = true;
        }
    }

    pub fn is_sealed(&self) -> bool {
        self.state
            .lock()
            .unwrap()
            .seal
            .as_ref()
            .is_some_and(|s| s.sealed)
    }

    pub async fn start() -> VaultDouble {
        let spec = spec();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let root = random_id("hvs.root");
        let state = Arc::new(Mutex::new(State::default()));
        state.lock().unwrap().tokens.insert(
            root.clone(),
            Token {
                prefixes: None,
                ttl: Duration::from_secs(86400),
                expires: Instant::now() + Duration::from_secs(86400),
                max: Instant::now() + Duration::from_secs(86400),
            },
        );
        let server = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let state = state.clone();
                    let spec = spec.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let state = state.clone();
                            let spec = spec.clone();
                            async move { Ok::<_, Infallible>(handle(&state, &spec, request).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        VaultDouble {
            address,
            root,
            state,
            server,
        }
    }

    /// `vault://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("vault://{}", self.address)
    }

    pub fn address(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn root_token(&self) -> &str {
        &self.root
    }

    /// An AppRole whose policy allows `secret/data/<prefix>*`; its role_id.
    pub fn add_role(&self, name: &str, prefix: &str, ttl: Duration, max_ttl: Duration) -> String {
        self.add_role_with(name, &[prefix], ttl, max_ttl)
    }

    /// An AppRole whose policy allows `secret/data/<p>*` for each prefix.
    pub fn add_role_with(
        &self,
        name: &str,
        prefixes: &[&str],
        ttl: Duration,
        max_ttl: Duration,
    ) -> String {
        let role_id = random_id("role-");
        self.state.lock().unwrap().roles.insert(
            name.to_string(),
            Role {
                role_id: role_id.clone(),
                prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
                policies: Vec::new(),
                ttl,
                max_ttl,
            },
        );
        role_id
    }

    /// A new secret_id for `role`, response-wrapped: asks the double's own
    /// `secret-id` endpoint with `X-Vault-Wrap-TTL`, as `infra/vault`'s init
    /// script asks Vault. Returns the wrapping token.
    pub async fn wrapped_secret_id(&self, role: &str) -> String {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let request = Request::post(format!(
            "{}/v1/auth/approle/role/{role}/secret-id",
            self.address()
        ))
        .header("X-Vault-Token", &self.root)
        .header("X-Vault-Wrap-TTL", "300s")
        .body(Full::new(Bytes::from("{}")))
        .unwrap();
        let response = client.request(request).await.expect("the double answers");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(body["data"].is_null(), "a wrapped answer carries no data");
        body["wrap_info"]["token"].as_str().unwrap().to_string()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Requests that did not follow the OpenAPI subset.
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    /// Mounts PKI with `ca` as its root, so certificates it issues chain to
    /// the same CA as files a test writes from it.
    pub fn use_pki_ca(&self, ca: crate::pki::TestCa) {
        let mut state = self.state.lock().unwrap();
        state.mounts.insert("pki".into());
        state.pki_ca = Some(ca);
    }

    /// A PKI role that issues for exactly `names`.
    pub fn add_pki_role(&self, role: &str, names: &[&str]) {
        self.state
            .lock()
            .unwrap()
            .pki_roles
            .insert(role.into(), names.iter().map(|n| n.to_string()).collect());
    }

    /// Files for `name` from the PKI engine's CA (which must exist), for
    /// peers that take theirs from files (agents, the CLI).
    pub fn pki_files(&self, dir: &std::path::Path, name: &str) -> crate::pki::TlsFiles {
        self.state
            .lock()
            .unwrap()
            .pki_ca
            .as_ref()
            .expect("the PKI engine has a CA: run init.sh or use_pki_ca first")
            .write(dir, name)
    }

    /// Certificates it issues from now on are said to expire after `ttl`.
    pub fn set_pki_ttl(&self, ttl: Duration) {
        self.state.lock().unwrap().pki_ttl = Some(ttl);
    }

    /// Certificates issued so far.
    pub fn issued(&self) -> usize {
        self.state.lock().unwrap().issued
    }

    pub fn logins(&self) -> usize {
        self.state.lock().unwrap().logins
    }

    pub fn renewals(&self) -> usize {
        self.state.lock().unwrap().renewals
    }

    /// Every token but root dies (as after a Vault restore).
    pub fn revoke_all_tokens(&self) {
        let root = self.root.clone();
        self.state
            .lock()
            .unwrap()
            .tokens
            .retain(|token, _| *token == root);
    }
}

impl Drop for VaultDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let body = if status == StatusCode::NO_CONTENT {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(body))
        .unwrap()
}

fn errors(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let list: Vec<&str> = if message.is_empty() {
        vec![]
    } else {
        vec![message]
    };
    reply(status, json!({ "errors": list }))
}

fn envelope(data: Value, auth: Value, wrap_info: Value) -> Value {
    json!({
        "request_id": random_id(""), "lease_id": "", "renewable": false, "lease_duration": 0,
        "data": data, "wrap_info": wrap_info, "warnings": null, "auth": auth, "mount_type": "",
    })
}

fn auth_block(token: &str, policies: &[&str], lease: u64) -> Value {
    json!({
        "client_token": token, "accessor": random_id("acc-"), "policies": policies,
        "token_policies": policies, "metadata": {}, "lease_duration": lease, "renewable": true,
        "entity_id": "", "token_type": "service", "orphan": true, "mfa_requirement": null,
        "num_uses": 0,
    })
}

fn version_metadata(version: usize) -> Value {
    json!({
        "created_time": "2026-11-24T00:00:00Z", "custom_metadata": null, "deletion_time": "",
        "destroyed": false, "version": version,
    })
}

async fn handle(
    state: &Arc<Mutex<State>>,
    spec: &Spec,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let token = header("X-Vault-Token");
    let wrap_ttl = header("X-Vault-Wrap-TTL");
    let headers = request
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body_text = String::from_utf8_lossy(&body).to_string();
    let mut state = state.lock().unwrap();
    if let Err(violation) = spec.check(method.as_str(), &path, &body_text) {
        state.violations.push(violation);
    }
    state.requests.push(RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        query: String::new(),
        headers,
        body: body_text.clone(),
    });
    let body: Value = serde_json::from_str(&body_text).unwrap_or(Value::Null);
    let now = Instant::now();
    let live_token = |state: &State| {
        token
            .as_deref()
            .and_then(|t| state.tokens.get(t))
            .filter(|t| t.expires > now)
            .map(|t| t.prefixes.clone())
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let Some(seal) = state.seal.as_mut() {
        let status = |seal: &Seal| {
            json!({
                "type": "shamir", "initialized": seal.key.is_some(), "sealed": seal.sealed,
                "t": 1, "n": 1, "progress": 0, "nonce": "", "version": "1.17.0-double",
                "build_date": "2024-01-01T00:00:00Z", "migration": false,
                "recovery_seal": false, "storage_type": "file",
            })
        };
        match (&method, segments.as_slice()) {
            (&Method::GET, ["v1", "sys", "init"]) => {
                return reply(StatusCode::OK, json!({ "initialized": seal.key.is_some() }));
            }
            (&Method::POST, ["v1", "sys", "init"]) => {
                if seal.key.is_some() {
                    return errors(StatusCode::BAD_REQUEST, "Vault is already initialized");
                }
                if body["secret_shares"] != 1 || body["secret_threshold"] != 1 {
                    return errors(
                        StatusCode::BAD_REQUEST,
                        "the double supports secret_shares = secret_threshold = 1 only",
                    );
                }
                let key: [u8; 32] = rand::random();
                seal.key = Some(key);
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                let root = state
                    .tokens
                    .iter()
                    .find(|(_, t)| t.prefixes.is_none())
                    .map(|(id, _)| id.clone())
                    .unwrap_or_default();
                return reply(
                    StatusCode::OK,
                    json!({ "keys": [hex], "keys_base64": [B64.encode(key)], "root_token": root }),
                );
            }
            (&Method::GET, ["v1", "sys", "seal-status"]) => {
                return reply(StatusCode::OK, status(seal));
            }
            (&Method::POST, ["v1", "sys", "unseal"]) => {
                let Some(key) = seal.key else {
                    return errors(StatusCode::BAD_REQUEST, "Vault is not initialized");
                };
                let given = body["key"].as_str().unwrap_or_default();
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                if given != B64.encode(key) && given != hex {
                    return errors(
                        StatusCode::BAD_REQUEST,
                        "Error unsealing: crypto/aes: invalid key size",
                    );
                }
                seal.sealed = false;
                return reply(StatusCode::OK, status(seal));
            }
            (_, ["v1", "sys", "health"]) => {}
            _ if seal.sealed => return errors(StatusCode::SERVICE_UNAVAILABLE, "Vault is sealed"),
            _ => {}
        }
    }
    match (method, segments.as_slice()) {
        (Method::GET, ["v1", "sys", "health"]) => reply(
            StatusCode::OK,
            json!({
                "initialized": true, "sealed": false, "standby": false,
                "performance_standby": false, "replication_performance_mode": "disabled",
                "replication_dr_mode": "disabled", "server_time_utc": 1_795_000_000,
                "version": "1.15.0-double", "cluster_name": "double", "cluster_id": "double",
            }),
        ),
        (method, ["v1", "sys", kind @ ("auth" | "mounts"), path])
            if method == Method::GET || method == Method::POST =>
        {
            if live_token(&state) != Some(None) {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            }
            let set = if *kind == "auth" {
                &mut state.auth_methods
            } else {
                &mut state.mounts
            };
            if method == Method::POST {
                if body["type"].as_str().is_none_or(str::is_empty) {
                    return errors(StatusCode::BAD_REQUEST, "type is required");
                }
                if !set.insert(path.to_string()) {
                    return errors(
                        StatusCode::BAD_REQUEST,
                        &format!("path is already in use at {path}/"),
                    );
                }
                return reply(StatusCode::NO_CONTENT, Value::Null);
            }
            if set.contains(*path) {
                reply(
                    StatusCode::OK,
                    envelope(json!({"type": path}), Value::Null, Value::Null),
                )
            } else {
                errors(
                    StatusCode::BAD_REQUEST,
                    &format!("No {kind} engine at {path}/"),
                )
            }
        }
        (method, ["v1", "transit", "keys", name])
            if method == Method::GET || method == Method::POST =>
        {
            if live_token(&state).is_none() {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            }
            if !state.mounts.contains("transit") {
                return errors(
                    StatusCode::NOT_FOUND,
                    "no handler for route \"transit/keys\"",
                );
            }
            if method == Method::POST {
                state
                    .transit_keys
                    .entry(name.to_string())
                    .or_insert_with(|| vec![new_version()]);
                return reply(StatusCode::NO_CONTENT, Value::Null);
            }
            match state.transit_keys.get(*name) {
                Some(versions) => {
                    let keys: serde_json::Map<String, Value> = versions
                        .iter()
                        .enumerate()
                        .map(|(i, (key, created))| {
                            (
                                (i + 1).to_string(),
                                json!({
                                    "creation_time": created, "name": "ed25519",
                                    "public_key": B64.encode(key.verifying_key().to_bytes()),
                                }),
                            )
                        })
                        .collect();
                    reply(
                        StatusCode::OK,
                        envelope(
                            json!({
                                "name": name, "type": "ed25519", "deletion_allowed": false,
                                "derived": false, "exportable": false, "allow_plaintext_backup": false,
                                "keys": keys, "latest_version": versions.len(),
                                "min_decryption_version": 1, "min_encryption_version": 0,
                                "supports_encryption": false, "supports_decryption": false,
                                "supports_derivation": true, "supports_signing": true, "imported": false,
                            }),
                            Value::Null,
                            Value::Null,
                        ),
                    )
                }
                None => errors(StatusCode::NOT_FOUND, ""),
            }
        }
        (Method::POST, ["v1", "transit", "keys", name, "rotate"]) => {
            if live_token(&state).is_none() {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            }
            match state.transit_keys.get_mut(*name) {
                Some(versions) => {
                    versions.push(new_version());
                    reply(StatusCode::NO_CONTENT, Value::Null)
                }
                None => errors(StatusCode::BAD_REQUEST, "key not found"),
            }
        }
        (Method::POST, ["v1", "transit", "sign", name]) => {
            if live_token(&state).is_none() {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            }
            let Some(versions) = state.transit_keys.get(*name) else {
                return errors(StatusCode::BAD_REQUEST, "signing key not found");
            };
            let Some(input) = body["input"].as_str().and_then(|i| B64.decode(i).ok()) else {
                return errors(StatusCode::BAD_REQUEST, "unable to decode input as base64");
            };
            let version = body["key_version"]
                .as_u64()
                .unwrap_or(versions.len() as u64);
            let Some((key, _)) = versions.get((version as usize).wrapping_sub(1)) else {
                return errors(
                    StatusCode::BAD_REQUEST,
                    "requested version for signing does not exist",
                );
            };
            use ed25519_dalek::Signer as _;
            let signature = key.sign(&input).to_bytes();
            reply(
                StatusCode::OK,
                envelope(
                    json!({ "signature": format!("vault:v{version}:{}", B64.encode(signature)), "key_version": version }),
                    Value::Null,
                    Value::Null,
                ),
            )
        }
        (Method::POST, ["v1", "pki", "root", "generate", "internal" | "exported"]) => {
            if live_token(&state) != Some(None) {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            }
            if !state.mounts.contains("pki") {
                return errors(StatusCode::NOT_FOUND, "no handler for route \"pki/root\"");
            }
            let name = body["common_name"].as_str().unwrap_or("root").to_string();
            let ca = state
                .pki_ca
                .get_or_insert_with(|| crate::pki::TestCa::new(&name));
            let pem = ca.cert_pem.clone();
            reply(
                StatusCode::OK,
                envelope(
                    json!({"certificate": pem, "issuing_ca": pem, "serial_number": "01", "expiration": 4_102_444_800u64}),
                    Value::Null,
                    Value::Null,
                ),
            )
        }
        (Method::GET, ["v1", "pki", "ca", "pem"]) => match &state.pki_ca {
            Some(ca) => Response::builder()
                .status(StatusCode::OK)
                .header("Content-Type", "application/pem-certificate-chain")
                .body(Full::new(Bytes::from(ca.cert_pem.clone())))
                .unwrap(),
            None => reply(StatusCode::NO_CONTENT, Value::Null),
        },
        (Method::POST, ["v1", "pki", "roles", name]) => {
            if live_token(&state) != Some(None) {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            }
            let names: Vec<String> = match &body["allowed_domains"] {
                Value::String(list) => list.split(',').map(|n| n.trim().to_string()).collect(),
                Value::Array(list) => list
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            state.pki_roles.insert(name.to_string(), names);
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        (Method::POST, ["v1", "pki", "issue", role]) => {
            let Some(prefixes) = live_token(&state) else {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            };
            let grant = format!("pki/issue/{role}");
            if prefixes.is_some_and(|p| !p.contains(&grant)) {
                return errors(
                    StatusCode::FORBIDDEN,
                    "1 error occurred:\n\t* permission denied\n\n",
                );
            }
            let Some(allowed) = state.pki_roles.get(*role).cloned() else {
                return errors(StatusCode::BAD_REQUEST, &format!("unknown role: {role}"));
            };
            let Some(name) = body["common_name"].as_str().filter(|n| !n.is_empty()) else {
                return errors(StatusCode::BAD_REQUEST, "the common_name field is required");
            };
            if !allowed.iter().any(|a| a == name) {
                return errors(
                    StatusCode::BAD_REQUEST,
                    &format!("common name {name} not allowed by this role"),
                );
            }
            let Some(ca) = &state.pki_ca else {
                return errors(
                    StatusCode::BAD_REQUEST,
                    "no default issuer currently configured",
                );
            };
            let (certificate, key) = ca.issue(name);
            let issuing_ca = ca.cert_pem.clone();
            state.issued += 1;
            let expiration = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| (d + state.pki_ttl.unwrap_or(PKI_TTL)).as_secs())
                .unwrap_or_default();
            reply(
                StatusCode::OK,
                envelope(
                    json!({
                        "certificate": certificate, "issuing_ca": issuing_ca,
                        "ca_chain": [issuing_ca], "private_key": key,
                        "private_key_type": "ec", "serial_number": format!("{:02x}", state.issued),
                        "expiration": expiration,
                    }),
                    Value::Null,
                    Value::Null,
                ),
            )
        }
        (Method::POST, ["v1", "sys", "policies", "acl", name]) => {
            if live_token(&state) != Some(None) {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            }
            let Some(text) = body["policy"].as_str() else {
                return errors(
                    StatusCode::BAD_REQUEST,
                    "'policy' parameter not supplied or empty",
                );
            };
            // `path "secret/data/X*" { capabilities = [...] }`, deny skipped.
            let path =
                regex::Regex::new(r#"path\s+"secret/data/([^"*]*)\*?"\s*\{([^}]*)\}"#).unwrap();
            let mut prefixes: Vec<String> = path
                .captures_iter(text)
                .filter(|c| !c[2].contains("deny"))
                .map(|c| c[1].to_string())
                .collect();
            // `path "pki/issue/ROLE"`: kept whole, so no KV key matches it.
            let issue = regex::Regex::new(r#"path\s+"(pki/issue/[^"*]+)"\s*\{([^}]*)\}"#).unwrap();
            prefixes.extend(
                issue
                    .captures_iter(text)
                    .filter(|c| c[2].contains("update"))
                    .map(|c| c[1].to_string()),
            );
            state.policies.insert(name.to_string(), prefixes);
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        (Method::POST, ["v1", "auth", "approle", "role", role]) => {
            if live_token(&state) != Some(None) {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            }
            if !state.auth_methods.contains("approle") {
                return errors(
                    StatusCode::BAD_REQUEST,
                    "no handler for route \"auth/approle/role\"",
                );
            }
            let duration = |field: &str, default: u64| {
                body[field]
                    .as_str()
                    .and_then(go_duration)
                    .or_else(|| body[field].as_u64().map(Duration::from_secs))
                    .unwrap_or(Duration::from_secs(default))
            };
            let policies: Vec<String> = body["token_policies"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let (ttl, max_ttl) = (
                duration("token_ttl", 2764800),
                duration("token_max_ttl", 2764800),
            );
            let role_id = state
                .roles
                .get(*role)
                .map(|r| r.role_id.clone())
                .unwrap_or_else(|| random_id("role-"));
            state.roles.insert(
                role.to_string(),
                Role {
                    role_id,
                    prefixes: Vec::new(),
                    policies,
                    ttl,
                    max_ttl,
                },
            );
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        (Method::GET, ["v1", "auth", "approle", "role", role, "role-id"]) => {
            if live_token(&state) != Some(None) {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            }
            match state.roles.get(*role) {
                Some(r) => reply(
                    StatusCode::OK,
                    envelope(json!({"role_id": r.role_id}), Value::Null, Value::Null),
                ),
                None => errors(StatusCode::NOT_FOUND, ""),
            }
        }
        (Method::POST, ["v1", "auth", "approle", "role", role, "secret-id"]) => {
            if live_token(&state) != Some(None) {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            }
            if !state.roles.contains_key(*role) {
                return errors(
                    StatusCode::BAD_REQUEST,
                    &format!("role \"{role}\" does not exist"),
                );
            }
            let secret_id = random_id("sid-");
            state.secret_ids.insert(secret_id.clone(), role.to_string());
            let data = json!({
                "secret_id": secret_id, "secret_id_accessor": random_id("sida-"),
                "secret_id_ttl": 0, "secret_id_num_uses": 0,
            });
            match wrap_ttl {
                Some(ttl) => {
                    let wrapping = random_id("hvs.wrap");
                    state.wraps.insert(wrapping.clone(), data);
                    reply(
                        StatusCode::OK,
                        envelope(
                            Value::Null,
                            Value::Null,
                            json!({
                                "token": wrapping, "accessor": random_id("wacc-"), "ttl": go_duration(&ttl).map_or(300, |d| d.as_secs()),
                                "creation_time": "2026-11-24T00:00:00Z",
                                "creation_path": format!("auth/approle/role/{role}/secret-id"),
                            }),
                        ),
                    )
                }
                None => reply(StatusCode::OK, envelope(data, Value::Null, Value::Null)),
            }
        }
        (Method::POST, ["v1", "sys", "wrapping", "unwrap"]) => {
            let wrapping = body["token"].as_str().map(str::to_string).or(token.clone());
            match wrapping.and_then(|t| state.wraps.remove(&t)) {
                Some(data) => reply(StatusCode::OK, envelope(data, Value::Null, Value::Null)),
                None => errors(
                    StatusCode::BAD_REQUEST,
                    "wrapping token is not valid or does not exist",
                ),
            }
        }
        (Method::POST, ["v1", "auth", "approle", "login"]) => {
            let role_id = body["role_id"].as_str().unwrap_or_default();
            let secret_id = body["secret_id"].as_str().unwrap_or_default();
            let Some((name, role)) = state
                .secret_ids
                .get(secret_id)
                .and_then(|name| state.roles.get(name).map(|role| (name.clone(), role)))
                .filter(|(_, role)| role.role_id == role_id)
            else {
                return errors(StatusCode::BAD_REQUEST, "invalid role or secret ID");
            };
            let mut prefixes = role.prefixes.clone();
            for policy in &role.policies {
                prefixes.extend(state.policies.get(policy).cloned().unwrap_or_default());
            }
            let (ttl, max_ttl) = (role.ttl, role.max_ttl);
            let client_token = random_id("hvs.");
            state.tokens.insert(
                client_token.clone(),
                Token {
                    prefixes: Some(prefixes),
                    ttl,
                    expires: now + ttl,
                    max: now + max_ttl,
                },
            );
            state.logins += 1;
            let policy = format!("capstan-{name}");
            reply(
                StatusCode::OK,
                envelope(
                    Value::Null,
                    auth_block(&client_token, &["default", &policy], ttl.as_secs()),
                    Value::Null,
                ),
            )
        }
        (Method::POST, ["v1", "auth", "token", "renew-self"]) => {
            let Some(held) = token
                .as_deref()
                .filter(|t| state.tokens.get(*t).is_some_and(|t| t.expires > now))
            else {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            };
            let held = held.to_string();
            let entry = state.tokens.get_mut(&held).unwrap();
            let expires = (now + entry.ttl).min(entry.max);
            entry.expires = expires;
            let lease = expires.saturating_duration_since(now).as_secs_f64().round() as u64;
            state.renewals += 1;
            reply(
                StatusCode::OK,
                envelope(
                    Value::Null,
                    auth_block(&held, &["default"], lease),
                    Value::Null,
                ),
            )
        }
        (method @ (Method::GET | Method::POST), ["v1", "secret", "data", rest @ ..]) => {
            let key = rest.join("/");
            let allowed = match live_token(&state) {
                Some(None) => true,
                Some(Some(prefixes)) => prefixes.iter().any(|p| key.starts_with(p.as_str())),
                None => false,
            };
            if !allowed {
                return errors(StatusCode::FORBIDDEN, "permission denied");
            }
            if method == Method::GET {
                return match state
                    .kv
                    .get(&key)
                    .and_then(|versions| versions.last().map(|v| (versions.len(), v)))
                {
                    Some((version, data)) => reply(
                        StatusCode::OK,
                        envelope(
                            json!({ "data": data, "metadata": version_metadata(version) }),
                            Value::Null,
                            Value::Null,
                        ),
                    ),
                    None => errors(StatusCode::NOT_FOUND, ""),
                };
            }
            let Some(data) = body.get("data").filter(|d| d.is_object()) else {
                return errors(StatusCode::BAD_REQUEST, "no data provided");
            };
            let current = state.kv.get(&key).map_or(0, Vec::len) as u64;
            if let Some(cas) = body["options"]["cas"].as_u64()
                && cas != current
            {
                return errors(
                    StatusCode::BAD_REQUEST,
                    "check-and-set parameter did not match the current version",
                );
            }
            let versions = state.kv.entry(key).or_default();
            versions.push(data.clone());
            let version = versions.len();
            reply(
                StatusCode::OK,
                envelope(version_metadata(version), Value::Null, Value::Null),
            )
        }
        _ => errors(
            StatusCode::NOT_FOUND,
            &format!("no handler for route \"{path}\""),
        ),
    }
}
