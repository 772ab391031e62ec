//! The keys auth signs tokens with.
//!
//! - [`Keyring`]: Ed25519 keys in the secret store (`auth/signing-keys`),
//!   for `capstan dev` and a file or KV secret store. The private keys are
//!   secrets of the auth service's policy only.
//! - [`TransitSigner`]: Vault's transit engine (key `capstan-jwt`); the
//!   private key never leaves Vault, and the kid is the key version.
//!
//! Both rotate with the key published before it is used: a new key is
//! published at once but signs only [`ACTIVATION_DELAY`] later, by when
//! every verifier that refreshed its keys since has it (they refresh on an
//! unknown kid at most every [`capstan_authn::KEY_REFRESH_INTERVAL`]); a
//! retired key stays published until every token it signed has expired
//! ([`capstan_authn::RETIRED_KEY_GRACE`]). Replicas of auth read the keys
//! at most [`CACHE_FOR`] apart.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use capstan_authn::{RETIRED_KEY_GRACE, Signer, TokenSigner, VerifyingKeys};
use capstan_secrets::{Cas, Secret, SecretStore, Transit};
use capstan_types::Error;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// Where the keyring lives in the secret store.
pub const KEYRING_PATH: &str = "auth/signing-keys";
/// The single key of installations from before rotation.
pub const LEGACY_KEY_PATH: &str = "auth/signing-key";
/// The transit key auth signs with in cluster mode.
pub const TRANSIT_KEY: &str = "capstan-jwt";
/// How long a read of the keys is reused.
pub const CACHE_FOR: Duration = Duration::from_secs(2);
/// How long after a rotation the new key starts signing.
pub const ACTIVATION_DELAY: Duration =
    Duration::from_secs(capstan_authn::KEY_REFRESH_INTERVAL.as_secs() + CACHE_FOR.as_secs() + 3);

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Whether a key retired at `retired` (seconds) must still be published.
fn still_verifiable(retired: Option<i64>, now: i64) -> bool {
    retired.is_none_or(|at| now - at < RETIRED_KEY_GRACE.as_secs() as i64)
}

/// Keys by the time each starts signing, oldest first: the index of the
/// one signing at `now` (the last whose time has come; the first if none
/// has), and for each key when it retired (the next one's start, if past).
fn schedule(starts: &[i64], now: i64) -> (usize, Vec<Option<i64>>) {
    let current = starts.iter().rposition(|&at| at <= now).unwrap_or(0);
    let retired = (0..starts.len())
        .map(|i| (i < current).then(|| starts.get(i + 1).copied()).flatten())
        .collect();
    (current, retired)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct StoredKey {
    /// Base64 Ed25519 secret key.
    secret: String,
    created: i64,
    /// When it starts signing (seconds); it signs until the next key does.
    active_from: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
struct StoredKeyring {
    keys: Vec<StoredKey>,
}

impl StoredKeyring {
    fn signers(&self) -> Result<Vec<(TokenSigner, i64)>, Error> {
        self.keys
            .iter()
            .map(|key| {
                let bytes: [u8; 32] = B64
                    .decode(&key.secret)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        Error::Internal(format!("a key in `{KEYRING_PATH}` is not Ed25519"))
                    })?;
                Ok((TokenSigner::from_bytes(&bytes), key.active_from))
            })
            .collect()
    }

    fn fresh(now: i64, active_from: i64) -> StoredKeyring {
        StoredKeyring {
            keys: vec![StoredKey {
                secret: B64.encode(TokenSigner::generate().secret_bytes()),
                created: now,
                active_from,
            }],
        }
    }
}

/// Signing keys in the secret store.
pub struct Keyring {
    secrets: Arc<dyn SecretStore>,
    cache: Mutex<Option<(tokio::time::Instant, Vec<Scheduled>)>>,
}

/// A key and when it starts signing.
type Scheduled = (TokenSigner, i64);

impl Keyring {
    /// Loads the keyring, creating it on first start (from the single key
    /// of an older installation when there is one; check-and-set, so auth
    /// replicas starting together agree).
    pub async fn open(secrets: Arc<dyn SecretStore>) -> Result<Keyring, Error> {
        let keyring = Keyring {
            secrets,
            cache: Mutex::new(None),
        };
        if keyring.read().await?.is_none() {
            let now = now_secs();
            let initial = match keyring
                .secrets
                .get(LEGACY_KEY_PATH)
                .await
                .map_err(Error::internal)?
            {
                Some(legacy) => StoredKeyring {
                    keys: vec![StoredKey {
                        secret: legacy.value.expose().to_string(),
                        created: now,
                        active_from: now,
                    }],
                },
                None => StoredKeyring::fresh(now, now),
            };
            let _ = keyring.write(&initial, Cas::Absent).await;
        }
        Ok(keyring)
    }

    async fn read(&self) -> Result<Option<(StoredKeyring, u64)>, Error> {
        let Some(stored) = self
            .secrets
            .get(KEYRING_PATH)
            .await
            .map_err(Error::internal)?
        else {
            return Ok(None);
        };
        let keyring: StoredKeyring = serde_json::from_str(stored.value.expose())
            .map_err(|e| Error::Internal(format!("`{KEYRING_PATH}` is corrupt: {e}")))?;
        Ok(Some((keyring, stored.version)))
    }

    async fn write(
        &self,
        keyring: &StoredKeyring,
        cas: Cas,
    ) -> Result<u64, capstan_secrets::SecretError> {
        let text = serde_json::to_string(keyring).expect("a keyring serializes");
        self.secrets.put(KEYRING_PATH, Secret::new(text), cas).await
    }

    /// The keys and when each starts signing, oldest first, from a read at
    /// most [`CACHE_FOR`] old.
    async fn signers(&self) -> Result<Vec<(TokenSigner, i64)>, Error> {
        let mut cache = self.cache.lock().await;
        if let Some((at, signers)) = cache.as_ref()
            && at.elapsed() < CACHE_FOR
        {
            return Ok(signers
                .iter()
                .map(|(s, r)| (TokenSigner::from_bytes(&s.secret_bytes()), *r))
                .collect());
        }
        let (keyring, _) = self
            .read()
            .await?
            .ok_or_else(|| Error::Internal(format!("`{KEYRING_PATH}` is missing")))?;
        let signers = keyring.signers()?;
        let copy = signers
            .iter()
            .map(|(s, r)| (TokenSigner::from_bytes(&s.secret_bytes()), *r))
            .collect();
        *cache = Some((tokio::time::Instant::now(), signers));
        Ok(copy)
    }
}

#[async_trait]
impl Signer for Keyring {
    async fn current_kid(&self) -> Result<String, Error> {
        let signers = self.signers().await?;
        let starts: Vec<i64> = signers.iter().map(|(_, at)| *at).collect();
        let (current, _) = schedule(&starts, now_secs());
        signers
            .get(current)
            .map(|(signer, _)| signer.kid().to_string())
            .ok_or_else(|| Error::Internal(format!("`{KEYRING_PATH}` has no key")))
    }

    async fn sign(&self, kid: &str, input: &[u8]) -> Result<[u8; 64], Error> {
        self.signers()
            .await?
            .into_iter()
            .find(|(signer, _)| signer.kid() == kid)
            .map(|(signer, _)| signer.sign_bytes(input))
            .ok_or_else(|| Error::Internal(format!("no signing key `{kid}`")))
    }

    async fn public_keys(&self) -> Result<VerifyingKeys, Error> {
        let signers = self.signers().await?;
        let starts: Vec<i64> = signers.iter().map(|(_, at)| *at).collect();
        let now = now_secs();
        let (_, retired) = schedule(&starts, now);
        // Current and pending keys, and retired ones with live tokens.
        Ok(signers
            .into_iter()
            .zip(retired)
            .filter(|(_, retired)| still_verifiable(*retired, now))
            .map(|((signer, _), _)| (signer.kid().to_string(), signer.public_key()))
            .collect())
    }

    async fn rotate(&self) -> Result<String, Error> {
        for _ in 0..8 {
            let (mut keyring, version) = self
                .read()
                .await?
                .ok_or_else(|| Error::Internal(format!("`{KEYRING_PATH}` is missing")))?;
            let now = now_secs();
            // Keys nobody can verify with any more are dropped for good.
            let starts: Vec<i64> = keyring.keys.iter().map(|k| k.active_from).collect();
            let (_, retired) = schedule(&starts, now);
            let mut keep = retired.iter().map(|r| still_verifiable(*r, now));
            keyring.keys.retain(|_| keep.next().unwrap_or(true));
            let fresh = StoredKeyring::fresh(now, now + ACTIVATION_DELAY.as_secs() as i64)
                .keys
                .remove(0);
            let kid = {
                let bytes: [u8; 32] = B64
                    .decode(&fresh.secret)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| Error::Internal("generated key".into()))?;
                TokenSigner::from_bytes(&bytes).kid().to_string()
            };
            keyring.keys.push(fresh);
            match self.write(&keyring, Cas::Version(version)).await {
                Ok(_) => {
                    *self.cache.lock().await = None;
                    return Ok(kid);
                }
                // Another replica rotated at the same moment: read again.
                Err(capstan_secrets::SecretError::Conflict { .. }) => continue,
                Err(e) => return Err(Error::internal(e)),
            }
        }
        Err(Error::Unavailable(
            "the signing keys kept changing; try again".into(),
        ))
    }
}

/// Signing through Vault transit: the private key never leaves Vault.
pub struct TransitSigner {
    transit: Arc<dyn Transit>,
    cache: Mutex<Option<(tokio::time::Instant, Vec<capstan_secrets::KeyVersion>)>>,
}

/// When each transit version starts signing: the first at once, each later
/// one [`ACTIVATION_DELAY`] after Vault created it.
fn transit_starts(versions: &[capstan_secrets::KeyVersion]) -> Vec<i64> {
    versions
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if i == 0 {
                v.created
            } else {
                v.created + ACTIVATION_DELAY.as_secs() as i64
            }
        })
        .collect()
}

fn kid_of(version: u64) -> String {
    format!("vault-v{version}")
}

impl TransitSigner {
    pub fn new(transit: Arc<dyn Transit>) -> Self {
        Self {
            transit,
            cache: Mutex::new(None),
        }
    }

    async fn versions(&self) -> Result<Vec<capstan_secrets::KeyVersion>, Error> {
        let mut cache = self.cache.lock().await;
        if let Some((at, versions)) = cache.as_ref()
            && at.elapsed() < CACHE_FOR
        {
            return Ok(versions.clone());
        }
        let versions = self
            .transit
            .versions(TRANSIT_KEY)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        if versions.is_empty() {
            return Err(Error::Unavailable(format!(
                "transit key `{TRANSIT_KEY}` has no versions (run infra/vault/init.sh)"
            )));
        }
        *cache = Some((tokio::time::Instant::now(), versions.clone()));
        Ok(versions)
    }
}

#[async_trait]
impl Signer for TransitSigner {
    async fn current_kid(&self) -> Result<String, Error> {
        let versions = self.versions().await?;
        let (current, _) = schedule(&transit_starts(&versions), now_secs());
        Ok(kid_of(versions[current].version))
    }

    async fn sign(&self, kid: &str, input: &[u8]) -> Result<[u8; 64], Error> {
        let version = kid
            .strip_prefix("vault-v")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Internal(format!("`{kid}` is not a transit key id")))?;
        self.transit
            .sign(TRANSIT_KEY, version, input)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))
    }

    async fn public_keys(&self) -> Result<VerifyingKeys, Error> {
        let versions = self.versions().await?;
        let now = now_secs();
        let (_, retired) = schedule(&transit_starts(&versions), now);
        Ok(versions
            .iter()
            .zip(retired)
            .filter(|(_, retired)| still_verifiable(*retired, now))
            .map(|(v, _)| (kid_of(v.version), v.public_key))
            .collect())
    }

    /// Returns the new version's kid, which signs [`ACTIVATION_DELAY`] after
    /// Vault created it.
    async fn rotate(&self) -> Result<String, Error> {
        self.transit
            .rotate(TRANSIT_KEY)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        *self.cache.lock().await = None;
        let versions = self.versions().await?;
        Ok(kid_of(versions.last().map_or(1, |v| v.version)))
    }
}

/// The keys auth's own verifier accepts: whatever its signer publishes.
pub struct SignerKeys(pub Arc<dyn Signer>);

#[async_trait]
impl capstan_authn::KeySource for SignerKeys {
    async fn fetch(&self) -> Result<VerifyingKeys, Error> {
        self.0.public_keys().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_authn::{Role, StaticKeys, Verifier};
    use capstan_secrets::FileSecretStore;

    #[tokio::test]
    async fn a_rotated_keyring_publishes_the_new_key_before_using_it() {
        let dir = tempfile::tempdir().unwrap();
        let secrets: Arc<dyn SecretStore> = Arc::new(FileSecretStore::new(dir.path()));
        let keyring: Arc<dyn Signer> = Arc::new(Keyring::open(secrets.clone()).await.unwrap());
        let issue = |signer: Arc<dyn Signer>| async move {
            capstan_authn::issue(signer.as_ref(), "ci", Role::Viewer, Duration::from_secs(60))
                .await
                .unwrap()
                .0
        };
        let old_token = issue(keyring.clone()).await;
        let old_kid = keyring.current_kid().await.unwrap();
        let new_kid = keyring.rotate().await.unwrap();
        assert_ne!(old_kid, new_kid);
        // Published at once, but the old key signs until the new one's time.
        let published = keyring.public_keys().await.unwrap();
        let kids: Vec<&str> = published.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kids, [old_kid.as_str(), new_kid.as_str()]);
        assert_eq!(keyring.current_kid().await.unwrap(), old_kid);
        // Once its time comes it signs (pinned here rather than waiting).
        let new_token = issue(Arc::new(Fixed(keyring.clone(), new_kid.clone()))).await;
        let verifier = Verifier::new(Arc::new(StaticKeys(published)));
        verifier
            .verify(&old_token)
            .await
            .expect("an old token verifies");
        verifier
            .verify(&new_token)
            .await
            .expect("a new token verifies");
        // Another replica opening the same store sees the same keys.
        let replica = Keyring::open(secrets).await.unwrap();
        assert_eq!(replica.public_keys().await.unwrap().len(), 2);
    }

    /// A signer pinned to one kid of another.
    struct Fixed(Arc<dyn Signer>, String);

    #[async_trait]
    impl Signer for Fixed {
        async fn current_kid(&self) -> Result<String, Error> {
            Ok(self.1.clone())
        }
        async fn sign(&self, kid: &str, input: &[u8]) -> Result<[u8; 64], Error> {
            self.0.sign(kid, input).await
        }
        async fn public_keys(&self) -> Result<VerifyingKeys, Error> {
            self.0.public_keys().await
        }
        async fn rotate(&self) -> Result<String, Error> {
            self.0.rotate().await
        }
    }

    #[tokio::test]
    async fn an_older_single_key_becomes_the_first_key_of_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let secrets: Arc<dyn SecretStore> = Arc::new(FileSecretStore::new(dir.path()));
        let legacy = TokenSigner::generate();
        secrets
            .put(
                LEGACY_KEY_PATH,
                Secret::new(B64.encode(legacy.secret_bytes())),
                Cas::Absent,
            )
            .await
            .unwrap();
        let keyring = Keyring::open(secrets).await.unwrap();
        assert_eq!(keyring.current_kid().await.unwrap(), legacy.kid());
    }

    #[test]
    fn retired_keys_stay_published_for_a_token_lifetime() {
        let now = 10_000_000;
        assert!(still_verifiable(None, now));
        assert!(still_verifiable(Some(now - 3600), now));
        assert!(!still_verifiable(
            Some(now - RETIRED_KEY_GRACE.as_secs() as i64),
            now
        ));
    }
}
