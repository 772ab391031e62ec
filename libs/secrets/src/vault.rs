//! Secrets in Vault's KV v2, reached with an AppRole login (vaultrs).
//!
//! - **Login.** The role_id comes from a file. The secret_id comes as a
//!   response-wrapped token (from a file), unwrapped once at start. A
//!   wrapping token that was already used (Vault: 400 "wrapping token is not
//!   valid or does not exist") means someone else may hold the secret_id:
//!   the service refuses to start and says so ([`VaultError::WrapTokenUsed`]).
//! - **Renewal.** The token is renewed at 2/3 of its lease. When it cannot
//!   be renewed, or Vault grants too little to reach the next renewal (the
//!   max TTL is near), the
//!   service logs in again with the secret_id it keeps in memory. Nothing is
//!   written to disk.
//! - **KV v2.** `<mount>/data/<prefix>/<path>`, value under `value`, the KV
//!   version as our version, check-and-set writes (`options.cas`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::RwLock;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use crate::{Cas, Secret, SecretError, SecretStore, Versioned, check_path};

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("--secrets: {0}")]
    Url(String),
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error(
        "the secret_id's wrapping token was already used or has expired: someone may have unwrapped it (possible tampering); issue a new wrapped secret_id and revoke the old one"
    )]
    WrapTokenUsed,
    #[error("vault at {address}: {reason}")]
    Vault { address: String, reason: String },
}

/// Where and as whom to reach Vault.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// `http(s)://HOST:PORT`.
    pub address: String,
    pub role_id_file: std::path::PathBuf,
    /// Holds a wrapping token whose unwrapped response has a `secret_id`.
    pub secret_id_file: std::path::PathBuf,
    pub approle_mount: String,
    pub kv_mount: String,
    /// Every path lives under this KV prefix, e.g. `capstan`.
    pub prefix: String,
}

/// `vault://HOST:PORT` (plain HTTP, for a dev server) or
/// `vault+https://HOST:PORT` as the address vaultrs takes.
pub fn parse_url(url: &str) -> Result<String, VaultError> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("vault+https://") {
        ("https", rest)
    } else if let Some(rest) = url.strip_prefix("vault://") {
        ("http", rest)
    } else {
        return Err(VaultError::Url(format!(
            "`{url}` is not vault://HOST:PORT or vault+https://HOST:PORT"
        )));
    };
    let authority = rest.trim_end_matches('/');
    match authority.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !authority.contains(['/', '@'])
                && port.parse::<u16>().is_ok() =>
        {
            Ok(format!("{scheme}://{authority}"))
        }
        _ => Err(VaultError::Url(format!(
            "`{url}` is not vault://HOST:PORT (e.g. vault://127.0.0.1:8200)"
        ))),
    }
}

/// Whether Vault answers at `address` (`GET /v1/sys/health`), unsealed.
pub async fn ping(address: &str) -> Result<(), VaultError> {
    let anonymous = client(address, "")?;
    let health = vaultrs::sys::health(&anonymous)
        .await
        .map_err(|e| VaultError::Vault {
            address: address.into(),
            reason: reason(&e),
        })?;
    if health.sealed {
        return Err(VaultError::Vault {
            address: address.into(),
            reason: "sealed".into(),
        });
    }
    Ok(())
}

struct Session {
    client: VaultClient,
    /// Seconds Vault granted the current token.
    lease: u64,
}

pub struct VaultSecretStore {
    config: VaultConfig,
    role_id: Secret,
    secret_id: Secret,
    session: Arc<RwLock<Session>>,
    _renewer: CancelOnDrop,
}

fn client(address: &str, token: &str) -> Result<VaultClient, VaultError> {
    // reqwest panics without a process-wide rustls provider; binaries
    // install ring at the start of main. Say so instead of panicking.
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        return Err(VaultError::Vault {
            address: address.into(),
            reason: "no rustls crypto provider installed (install ring at the start of main)"
                .into(),
        });
    }
    let settings = VaultClientSettingsBuilder::default()
        .address(address)
        .token(token)
        .timeout(Some(TIMEOUT))
        .build()
        .map_err(|e| VaultError::Vault {
            address: address.into(),
            reason: e.to_string(),
        })?;
    VaultClient::new(settings).map_err(|e| VaultError::Vault {
        address: address.into(),
        reason: e.to_string(),
    })
}

fn read_file(what: &'static str, path: &std::path::Path) -> Result<Secret, VaultError> {
    let text = std::fs::read_to_string(path).map_err(|e| VaultError::File {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(VaultError::File {
            what,
            path: path.display().to_string(),
            reason: "is empty".into(),
        });
    }
    Ok(Secret::new(text))
}

fn reason(error: &ClientError) -> String {
    match error {
        ClientError::APIError { code, errors } => format!("{code}: {}", errors.join("; ")),
        other => other.to_string(),
    }
}

#[derive(Deserialize)]
struct Unwrapped {
    secret_id: String,
}

impl VaultSecretStore {
    /// Unwraps the secret_id, logs in, and starts renewing.
    pub async fn login(config: VaultConfig) -> Result<Self, VaultError> {
        let role_id = read_file("--vault-role-id-file", &config.role_id_file)?;
        let wrapping = read_file("--vault-secret-id-file", &config.secret_id_file)?;
        let unwrapper = client(&config.address, wrapping.expose())?;
        let unwrapped: Unwrapped = match vaultrs::sys::wrapping::unwrap(&unwrapper, None).await {
            Ok(data) => data,
            Err(ClientError::APIError { code: 400, errors })
                if errors
                    .iter()
                    .any(|e| e.contains("wrapping token is not valid")) =>
            {
                return Err(VaultError::WrapTokenUsed);
            }
            Err(e) => {
                return Err(VaultError::Vault {
                    address: config.address.clone(),
                    reason: format!("unwrapping the secret_id: {}", reason(&e)),
                });
            }
        };
        let secret_id = Secret::new(unwrapped.secret_id);
        let session = Self::new_session(&config, &role_id, &secret_id).await?;
        tracing::info!(address = %config.address, lease_s = session.lease, "logged in to Vault with AppRole");
        let session = Arc::new(RwLock::new(session));
        let renewer = tokio::spawn(renew(
            config.clone(),
            role_id.clone(),
            secret_id.clone(),
            Arc::downgrade(&session),
        ));
        Ok(Self {
            config,
            role_id,
            secret_id,
            session,
            _renewer: CancelOnDrop(renewer),
        })
    }

    async fn new_session(
        config: &VaultConfig,
        role_id: &Secret,
        secret_id: &Secret,
    ) -> Result<Session, VaultError> {
        let anonymous = client(&config.address, "")?;
        let auth = vaultrs::auth::approle::login(
            &anonymous,
            &config.approle_mount,
            role_id.expose(),
            secret_id.expose(),
        )
        .await
        .map_err(|e| VaultError::Vault {
            address: config.address.clone(),
            reason: format!("AppRole login: {}", reason(&e)),
        })?;
        Ok(Session {
            client: client(&config.address, &auth.client_token)?,
            lease: auth.lease_duration,
        })
    }

    /// The current token's lease, in seconds (for tests and status).
    pub async fn lease_seconds(&self) -> u64 {
        self.session.read().await.lease
    }

    /// Logs in again now (what the renewer does when renewal fails).
    pub async fn relogin(&self) -> Result<(), VaultError> {
        let fresh = Self::new_session(&self.config, &self.role_id, &self.secret_id).await?;
        *self.session.write().await = fresh;
        Ok(())
    }

    fn full_path(&self, path: &str) -> String {
        format!("{}/{path}", self.config.prefix)
    }

    fn error(&self, path: &str, error: ClientError) -> SecretError {
        match &error {
            ClientError::APIError { code: 403, .. } => SecretError::Denied(format!(
                "vault: {}: {}",
                self.full_path(path),
                reason(&error)
            )),
            _ => SecretError::Io {
                path: self.full_path(path).into(),
                reason: format!("vault at {}: {}", self.config.address, reason(&error)),
            },
        }
    }

    async fn read(&self, path: &str) -> Result<Option<Versioned>, SecretError> {
        let session = self.session.read().await;
        let endpoint = vaultrs::api::kv2::requests::ReadSecretRequest::builder()
            .mount(&self.config.kv_mount)
            .path(self.full_path(path))
            .build()
            .map_err(|e| SecretError::InvalidPath(format!("{path}: {e}")))?;
        match vaultrs::api::exec_with_result(&session.client, endpoint).await {
            Ok(response) => {
                // A soft-deleted latest version reads as no secret.
                let Some(value) = response.data.get("value").and_then(|v| v.as_str()) else {
                    return Ok(None);
                };
                Ok(Some(Versioned {
                    value: Secret::new(value),
                    version: response.metadata.version,
                }))
            }
            Err(ClientError::APIError { code: 404, .. }) => Ok(None),
            Err(e) => Err(self.error(path, e)),
        }
    }
}

#[async_trait]
impl SecretStore for VaultSecretStore {
    async fn get(&self, path: &str) -> Result<Option<Versioned>, SecretError> {
        check_path(path)?;
        self.read(path).await
    }

    async fn put(&self, path: &str, value: Secret, cas: Cas) -> Result<u64, SecretError> {
        check_path(path)?;
        let data = serde_json::json!({ "value": value.expose() });
        let result = {
            let session = self.session.read().await;
            let full = self.full_path(path);
            match cas {
                Cas::Any => {
                    vaultrs::kv2::set(&session.client, &self.config.kv_mount, &full, &data).await
                }
                Cas::Absent | Cas::Version(_) => {
                    let version = match cas {
                        Cas::Version(v) => u32::try_from(v).unwrap_or(u32::MAX),
                        _ => 0,
                    };
                    vaultrs::kv2::set_with_options(
                        &session.client,
                        &self.config.kv_mount,
                        &full,
                        &data,
                        vaultrs::api::kv2::requests::SetSecretRequestOptions { cas: version },
                    )
                    .await
                }
            }
        };
        match result {
            Ok(metadata) => Ok(metadata.version),
            Err(ClientError::APIError { code: 400, errors })
                if errors.iter().any(|e| e.contains("check-and-set")) =>
            {
                let found = self.read(path).await?.map(|v| v.version);
                Err(SecretError::Conflict {
                    path: path.to_string(),
                    expected: cas,
                    found,
                })
            }
            Err(e) => Err(self.error(path, e)),
        }
    }
}

/// One version of a transit key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersion {
    pub version: u64,
    /// Ed25519 public key.
    pub public_key: [u8; 32],
    /// Seconds since the epoch.
    pub created: i64,
}

/// Signing with a key that never leaves Vault (the transit engine).
#[async_trait]
pub trait Transit: Send + Sync + 'static {
    /// The Ed25519 signature of `input` by `version` of key `key`.
    async fn sign(&self, key: &str, version: u64, input: &[u8]) -> Result<[u8; 64], VaultError>;
    /// Every version of `key`, oldest first.
    async fn versions(&self, key: &str) -> Result<Vec<KeyVersion>, VaultError>;
    /// Adds a new version of `key` and makes it the latest.
    async fn rotate(&self, key: &str) -> Result<(), VaultError>;
}

const TRANSIT_MOUNT: &str = "transit";

#[async_trait]
impl Transit for VaultSecretStore {
    async fn sign(&self, key: &str, version: u64, input: &[u8]) -> Result<[u8; 64], VaultError> {
        use base64::Engine;
        let session = self.session.read().await;
        let mut options = vaultrs::api::transit::requests::SignDataRequest::builder();
        options.key_version(version);
        let encoded = base64::engine::general_purpose::STANDARD.encode(input);
        let signed = vaultrs::transit::data::sign(
            &session.client,
            TRANSIT_MOUNT,
            key,
            &encoded,
            Some(&mut options),
        )
        .await
        .map_err(|e| self.vault_error(format!("transit sign: {}", reason(&e))))?;
        // "vault:v<version>:<base64 signature>"
        let expected = format!("vault:v{version}:");
        let signature = signed.signature.strip_prefix(&expected).ok_or_else(|| {
            self.vault_error(format!(
                "transit signed with another version than v{version}"
            ))
        })?;
        base64::engine::general_purpose::STANDARD
            .decode(signature)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| {
                self.vault_error("transit returned a signature that is not Ed25519".into())
            })
    }

    async fn versions(&self, key: &str) -> Result<Vec<KeyVersion>, VaultError> {
        use base64::Engine;
        let session = self.session.read().await;
        let read = vaultrs::transit::key::read(&session.client, TRANSIT_MOUNT, key)
            .await
            .map_err(|e| self.vault_error(format!("transit key {key}: {}", reason(&e))))?;
        let vaultrs::api::transit::responses::ReadKeyData::Asymmetric(keys) = read.keys else {
            return Err(self.vault_error(format!("transit key {key} is not an asymmetric key")));
        };
        let mut versions = keys
            .into_iter()
            .map(|(version, entry)| {
                let version: u64 = version
                    .parse()
                    .map_err(|_| self.vault_error(format!("transit key version `{version}`")))?;
                let public_key = base64::engine::general_purpose::STANDARD
                    .decode(&entry.public_key)
                    .ok()
                    .and_then(|bytes| bytes.try_into().ok())
                    .ok_or_else(|| {
                        self.vault_error(format!("transit key {key} v{version} is not Ed25519"))
                    })?;
                let created = parse_rfc3339(&entry.creation_time).ok_or_else(|| {
                    self.vault_error(format!("creation_time `{}`", entry.creation_time))
                })?;
                Ok(KeyVersion {
                    version,
                    public_key,
                    created,
                })
            })
            .collect::<Result<Vec<_>, VaultError>>()?;
        versions.sort_by_key(|v| v.version);
        Ok(versions)
    }

    async fn rotate(&self, key: &str) -> Result<(), VaultError> {
        let session = self.session.read().await;
        vaultrs::transit::key::rotate(&session.client, TRANSIT_MOUNT, key)
            .await
            .map_err(|e| self.vault_error(format!("transit rotate {key}: {}", reason(&e))))
    }
}

/// A certificate issued by a CA, with its private key.
pub struct IssuedCertificate {
    /// PEM: the certificate, then any intermediates.
    pub certificate: String,
    /// PEM: the CA every certificate of the platform chains to.
    pub ca: String,
    pub private_key: Secret,
    /// Seconds since the epoch.
    pub expires_at: i64,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Vault's PKI secrets engine, as a process sees it: certificates for its
/// own name, from its own role.
#[async_trait]
pub trait CertificateIssuer: Send + Sync {
    /// `POST /v1/pki/issue/<role>` for `common_name` (also its only DNS SAN).
    async fn issue(&self, role: &str, common_name: &str) -> Result<IssuedCertificate, VaultError>;
}

const PKI_MOUNT: &str = "pki";

#[async_trait]
impl CertificateIssuer for VaultSecretStore {
    async fn issue(&self, role: &str, common_name: &str) -> Result<IssuedCertificate, VaultError> {
        let session = self.session.read().await;
        let mut options = vaultrs::api::pki::requests::GenerateCertificateRequest::builder();
        options.common_name(common_name).exclude_cn_from_sans(false);
        let issued =
            vaultrs::pki::cert::generate(&session.client, PKI_MOUNT, role, Some(&mut options))
                .await
                .map_err(|e| self.vault_error(format!("pki issue {role}: {}", reason(&e))))?;
        let expires_at = issued
            .expiration
            .ok_or_else(|| self.vault_error(format!("pki issue {role}: no expiration")))?
            as i64;
        // The chain after the leaf, without the root (the CA file's job).
        let chain = issued
            .ca_chain
            .unwrap_or_default()
            .into_iter()
            .filter(|pem| pem.trim() != issued.issuing_ca.trim())
            .collect::<Vec<_>>();
        let mut certificate = issued.certificate;
        for pem in chain {
            certificate.push('\n');
            certificate.push_str(&pem);
        }
        Ok(IssuedCertificate {
            certificate,
            ca: issued.issuing_ca,
            private_key: Secret::new(issued.private_key),
            expires_at,
        })
    }
}

impl VaultSecretStore {
    fn vault_error(&self, reason: String) -> VaultError {
        VaultError::Vault {
            address: self.config.address.clone(),
            reason,
        }
    }
}

/// Seconds since the epoch of an RFC 3339 time as Vault writes it
/// (`2026-11-24T11:13:30.123456789Z`, or with a `+hh:mm` offset).
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let (date, time) = text.split_once('T')?;
    let mut date_parts = date.split('-');
    let (y, m, d): (i64, i64, i64) = (
        date_parts.next()?.parse().ok()?,
        date_parts.next()?.parse().ok()?,
        date_parts.next()?.parse().ok()?,
    );
    let (clock, offset) = match time.find(['Z', '+', '-']) {
        Some(at) => (&time[..at], &time[at..]),
        None => return None,
    };
    let mut clock_parts = clock.split(':');
    let (hh, mm): (i64, i64) = (
        clock_parts.next()?.parse().ok()?,
        clock_parts.next()?.parse().ok()?,
    );
    let ss: f64 = clock_parts.next()?.parse().ok()?;
    let offset_secs = match offset {
        "Z" => 0,
        _ => {
            let sign = if offset.starts_with('-') { -1 } else { 1 };
            let (oh, om) = offset[1..].split_once(':')?;
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
        }
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss >= 61.0 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + hh * 3600 + mm * 60 + ss as i64 - offset_secs)
}

/// Renews the token at 2/3 of its lease; logs in again when renewal fails
/// or Vault grants less than 2/3 of the lease (the max TTL is near: the
/// token would die before the next renewal).
async fn renew(
    config: VaultConfig,
    role_id: Secret,
    secret_id: Secret,
    session: std::sync::Weak<RwLock<Session>>,
) {
    loop {
        let Some(current) = session.upgrade() else {
            return;
        };
        let lease = current.read().await.lease.max(1);
        drop(current);
        tokio::time::sleep(Duration::from_millis(lease * 2000 / 3)).await;
        let Some(current) = session.upgrade() else {
            return;
        };
        let renewed = {
            let held = current.read().await;
            vaultrs::token::renew_self(&held.client, Some(&format!("{lease}s"))).await
        };
        match renewed {
            // Enough to reach the next renewal (at 2/3 of this grant):
            // carry on with what Vault granted.
            Ok(auth) if auth.lease_duration * 3 >= lease * 2 => {
                current.write().await.lease = auth.lease_duration;
                tracing::debug!(lease_s = auth.lease_duration, "renewed the Vault token");
                continue;
            }
            Ok(auth) => tracing::info!(
                granted_s = auth.lease_duration,
                "the Vault token is near its max TTL; logging in again"
            ),
            Err(e) => tracing::warn!(
                "renewing the Vault token failed ({}); logging in again",
                reason(&e)
            ),
        }
        let mut delay = Duration::from_millis(200);
        loop {
            match VaultSecretStore::new_session(&config, &role_id, &secret_id).await {
                Ok(fresh) => {
                    *current.write().await = fresh;
                    tracing::info!("logged in to Vault again");
                    break;
                }
                Err(e) => {
                    tracing::error!("logging in to Vault again failed: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// Aborts the renewer when the store is dropped.
struct CancelOnDrop(tokio::task::JoinHandle<()>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vaults_times_parse() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-11-24T11:13:30.123456789Z"),
            Some(1_795_518_810)
        );
        assert_eq!(
            parse_rfc3339("2026-11-24T12:13:30+01:00"),
            Some(1_795_518_810)
        );
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400));
        for bad in [
            "",
            "2026-11-24",
            "2026-13-01T00:00:00Z",
            "2026-11-24T25:00:00Z",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn urls_parse_or_name_the_flag() {
        assert_eq!(
            parse_url("vault://127.0.0.1:8200").unwrap(),
            "http://127.0.0.1:8200"
        );
        assert_eq!(
            parse_url("vault+https://vault:8200/").unwrap(),
            "https://vault:8200"
        );
        for bad in [
            "",
            "vault://",
            "vault://h",
            "http://h:1",
            "vault://h:x",
            "vault://u@h:1",
        ] {
            let error = parse_url(bad).unwrap_err().to_string();
            assert!(error.starts_with("--secrets: "), "{bad}: {error}");
        }
    }
}
