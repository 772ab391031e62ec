use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use capstan_types::Error;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::Role;

pub const ISSUER: &str = "capstan-auth";
pub const AUDIENCE: &str = "capstan";
/// Clock skew tolerated between services.
const LEEWAY_SECS: i64 = 30;
/// An unknown key id triggers at most one key refresh per this interval.
pub const KEY_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
const REFRESH_EVERY: Duration = KEY_REFRESH_INTERVAL;
/// How long one key fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// A failed key fetch is not retried for this long: forged key ids cannot
/// turn an auth outage into a queue of stalled calls.
const FAILURE_TTL: Duration = Duration::from_secs(2);
/// No token is accepted whose `exp - iat` is longer, whoever signed it.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub role: Role,
    pub iat: i64,
    /// Not valid before (seconds since the epoch).
    #[serde(default)]
    pub nbf: i64,
    pub exp: i64,
    /// Unique per token.
    #[serde(default)]
    pub jti: String,
    /// The one project a viewer's or deployer's key is for. Empty for
    /// admins, services and nodes (every project), and in tokens of keys
    /// made before projects (which are `default`'s).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub project: String,
}

impl Claims {
    /// The project this caller is confined to; `None`: every project
    /// (admins, Capstan's services, nodes).
    pub fn project_scope(&self) -> Option<&str> {
        match self.role {
            Role::Admin | Role::Service | Role::Node => None,
            Role::Deployer | Role::Viewer if self.project.is_empty() => {
                Some(crate::DEFAULT_PROJECT)
            }
            Role::Deployer | Role::Viewer => Some(&self.project),
        }
    }

    /// Whether this caller may see or change what belongs to `project`.
    pub fn in_project(&self, project: &str) -> bool {
        self.project_scope().is_none_or(|own| own == project)
    }

    /// PERMISSION_DENIED unless this caller may touch `app`, which is in
    /// `project`: what every method about one app answers for another
    /// project's.
    pub fn check_project(&self, app: &str, project: &str) -> Result<(), Error> {
        if self.in_project(project) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "app `{app}` is not in project `{}`, the only one this key may touch",
            self.project_scope().unwrap_or_default()
        )))
    }

    /// The node this caller is, when it is an agent.
    pub fn node_id(&self) -> Option<&str> {
        (self.role == Role::Node).then_some(self.sub.as_str())
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Signs tokens. Lives only in the auth service.
pub struct TokenSigner {
    kid: String,
    key: SigningKey,
}

impl TokenSigner {
    pub fn generate() -> Self {
        Self::from_bytes(&SigningKey::generate(&mut rand::rngs::OsRng).to_bytes())
    }

    /// The key id is derived from the public key, so it is stable across restarts.
    pub fn from_bytes(secret: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(secret);
        let kid = B64.encode(&key.verifying_key().to_bytes()[..9]);
        TokenSigner { kid, key }
    }

    pub fn secret_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The Ed25519 signature of `input`.
    pub fn sign_bytes(&self, input: &[u8]) -> [u8; 64] {
        self.key.sign(input).to_bytes()
    }

    pub fn issue(&self, sub: &str, role: Role, ttl: Duration) -> (String, Claims) {
        let claims = claims_for(sub, role, ttl);
        let signing_input = signing_input(&self.kid, &claims);
        let signature = self.key.sign(signing_input.as_bytes());
        (
            format!("{signing_input}.{}", B64.encode(signature.to_bytes())),
            claims,
        )
    }
}

pub type VerifyingKeys = Vec<(String, [u8; 32])>;

/// What signs tokens: a key pair kept in the secret store, or Vault
/// transit, where the private key never leaves Vault.
#[async_trait]
pub trait Signer: Send + Sync + 'static {
    /// The key id new tokens are signed with.
    async fn current_kid(&self) -> Result<String, Error>;
    /// The Ed25519 signature of `input` by key `kid`.
    async fn sign(&self, kid: &str, input: &[u8]) -> Result<[u8; 64], Error>;
    /// Every key verifiers must accept now: the current one, and each one
    /// retired less than [`MAX_TOKEN_LIFETIME`] (plus clock leeway) ago,
    /// whose tokens may still be live.
    async fn public_keys(&self) -> Result<VerifyingKeys, Error>;
    /// Makes a new key current; returns its kid.
    async fn rotate(&self) -> Result<String, Error>;
}

/// How long a retired signing key stays verifiable: the longest a token
/// lives, plus the clock leeway verifiers allow.
pub const RETIRED_KEY_GRACE: Duration =
    Duration::from_secs(MAX_TOKEN_LIFETIME.as_secs() + 2 * LEEWAY_SECS as u64);

/// Issues a token for `sub` with `role`, signed by `signer`'s current key.
pub async fn issue(
    signer: &dyn Signer,
    sub: &str,
    role: Role,
    ttl: Duration,
) -> Result<(String, Claims), Error> {
    issue_in(signer, sub, role, "", ttl).await
}

/// [`issue`] for a key confined to `project` (empty: every project).
pub async fn issue_in(
    signer: &dyn Signer,
    sub: &str,
    role: Role,
    project: &str,
    ttl: Duration,
) -> Result<(String, Claims), Error> {
    let kid = signer.current_kid().await?;
    let mut claims = claims_for(sub, role, ttl);
    claims.project = project.to_string();
    let signing_input = signing_input(&kid, &claims);
    let signature = signer.sign(&kid, signing_input.as_bytes()).await?;
    Ok((format!("{signing_input}.{}", B64.encode(signature)), claims))
}

fn claims_for(sub: &str, role: Role, ttl: Duration) -> Claims {
    let iat = now_secs();
    Claims {
        iss: ISSUER.into(),
        aud: AUDIENCE.into(),
        sub: sub.into(),
        role,
        iat,
        nbf: iat,
        exp: iat + ttl.as_secs() as i64,
        jti: format!("{:032x}", rand::random::<u128>()),
        project: String::new(),
    }
}

fn signing_input(kid: &str, claims: &Claims) -> String {
    let header = Header {
        alg: "EdDSA".into(),
        typ: "JWT".into(),
        kid: kid.into(),
    };
    format!(
        "{}.{}",
        B64.encode(serde_json::to_vec(&header).expect("header serializes")),
        B64.encode(serde_json::to_vec(claims).expect("claims serialize"))
    )
}

/// Where a verifier gets public keys: the auth service, or a fixed set.
#[async_trait]
pub trait KeySource: Send + Sync + 'static {
    async fn fetch(&self) -> Result<VerifyingKeys, Error>;
}

pub struct StaticKeys(pub VerifyingKeys);

#[async_trait]
impl KeySource for StaticKeys {
    async fn fetch(&self) -> Result<VerifyingKeys, Error> {
        Ok(self.0.clone())
    }
}

/// Verifies tokens against cached public keys.
///
/// A known key id never waits: the cache lock is held only to read or swap
/// the key set, never across a fetch. Fetches happen one at a time, time out
/// after [`FETCH_TIMEOUT`], and a failure is remembered for [`FAILURE_TTL`].
pub struct Verifier {
    source: Arc<dyn KeySource>,
    cache: RwLock<Cache>,
    fetching: tokio::sync::Mutex<()>,
    revocations: Option<crate::revocation::Revocations>,
    /// Tokens whose signature verified, by their exact text: a client sends
    /// the same token for many calls, and an Ed25519 check costs more than
    /// most calls. Times, the key and revocation are checked on every call
    /// all the same; see [`Verifier::verify`].
    verified: std::sync::Mutex<HashMap<String, Verified>>,
}

/// A token whose signature and static claims checked out.
struct Verified {
    claims: Claims,
    kid: String,
    until: std::time::Instant,
}

/// Tokens remembered as verified, at most; past it the memory starts over.
const MAX_VERIFIED: usize = 10_000;
/// How long a verified signature is remembered (a token lives longer).
const VERIFIED_TTL: Duration = Duration::from_secs(60);

struct Cache {
    keys: HashMap<String, VerifyingKey>,
    refreshed: Option<tokio::time::Instant>,
    failed: Option<(tokio::time::Instant, String)>,
}

impl Verifier {
    pub fn new(source: Arc<dyn KeySource>) -> Self {
        Verifier {
            source,
            cache: RwLock::new(Cache {
                keys: HashMap::new(),
                refreshed: None,
                failed: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
            revocations: None,
            verified: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Also refuses tokens on the denylist in `cache` (revoked API keys).
    pub fn with_revocations(mut self, cache: Arc<dyn capstan_cache::Cache>) -> Self {
        self.revocations = Some(crate::revocation::Revocations::new(cache));
        self
    }

    async fn key(&self, kid: &str) -> Result<VerifyingKey, Error> {
        if let Some(key) = self.cache.read().await.keys.get(kid) {
            return Ok(*key);
        }
        let unknown = || Error::Unauthenticated(format!("unknown signing key `{kid}`"));
        let _fetching = self.fetching.lock().await;
        {
            let cache = self.cache.read().await;
            if let Some(key) = cache.keys.get(kid) {
                return Ok(*key);
            }
            if let Some((at, why)) = &cache.failed
                && at.elapsed() < FAILURE_TTL
            {
                return Err(Error::Unavailable(format!(
                    "cannot verify tokens signed with key `{kid}`: {why}"
                )));
            }
            if cache
                .refreshed
                .is_some_and(|at| at.elapsed() < REFRESH_EVERY)
            {
                return Err(unknown());
            }
        }
        let fetched = match tokio::time::timeout(FETCH_TIMEOUT, self.source.fetch()).await {
            Ok(Ok(keys)) => Ok(keys),
            Ok(Err(e)) => Err(format!("fetching the signing keys failed: {e}")),
            Err(_) => Err(format!(
                "fetching the signing keys timed out after {FETCH_TIMEOUT:?}"
            )),
        };
        let now = tokio::time::Instant::now();
        let mut cache = self.cache.write().await;
        match fetched {
            Ok(keys) => {
                cache.refreshed = Some(now);
                cache.failed = None;
                cache.keys = keys
                    .into_iter()
                    .filter_map(|(kid, bytes)| {
                        VerifyingKey::from_bytes(&bytes).ok().map(|k| (kid, k))
                    })
                    .collect();
                cache.keys.get(kid).copied().ok_or_else(unknown)
            }
            Err(why) => {
                tracing::warn!("{why}");
                cache.failed = Some((now, why.clone()));
                Err(Error::Unavailable(format!(
                    "cannot verify tokens signed with key `{kid}`: {why}"
                )))
            }
        }
    }

    /// The claims of `token` if it is valid now: signed by a key in force,
    /// for Capstan, within its times, not revoked. A token verified before
    /// skips the signature check only (not the key, times or revocation).
    pub async fn verify(&self, token: &str) -> Result<Claims, Error> {
        let remembered = {
            let verified = self.verified.lock().expect("verified lock poisoned");
            verified
                .get(token)
                .filter(|v| v.until > std::time::Instant::now())
                .map(|v| (v.claims.clone(), v.kid.clone()))
        };
        let claims = match remembered {
            // Still signed by a key in force (a retired key is gone).
            Some((claims, kid)) if self.cache.read().await.keys.contains_key(&kid) => claims,
            _ => {
                let (claims, kid) = self.verify_signature(token).await?;
                let mut verified = self.verified.lock().expect("verified lock poisoned");
                if verified.len() >= MAX_VERIFIED {
                    verified.clear();
                }
                verified.insert(
                    token.to_string(),
                    Verified {
                        claims: claims.clone(),
                        kid,
                        until: std::time::Instant::now() + VERIFIED_TTL,
                    },
                );
                claims
            }
        };
        let bad = |why: &str| Error::Unauthenticated(format!("invalid token: {why}"));
        let now = now_secs();
        if claims.exp + LEEWAY_SECS < now {
            return Err(Error::Unauthenticated("token expired".into()));
        }
        if claims.iat - LEEWAY_SECS > now {
            return Err(bad("issued in the future"));
        }
        if claims.nbf - LEEWAY_SECS > now {
            return Err(bad("not valid yet (nbf)"));
        }
        if let Some(revocations) = &self.revocations {
            revocations.check(&claims).await?;
        }
        Ok(claims)
    }

    /// The signature and what does not change with time: algorithm, key,
    /// issuer, audience, lifetime. Returns the claims and the key id.
    async fn verify_signature(&self, token: &str) -> Result<(Claims, String), Error> {
        let bad = |why: &str| Error::Unauthenticated(format!("invalid token: {why}"));
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("not a JWT"));
        };
        let header: Header =
            serde_json::from_slice(&B64.decode(h).map_err(|_| bad("header encoding"))?)
                .map_err(|_| bad("header"))?;
        if header.alg != "EdDSA" {
            return Err(bad("algorithm must be EdDSA"));
        }
        let key = self.key(&header.kid).await?;
        let signature_bytes: [u8; 64] = B64
            .decode(s)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("signature encoding"))?;
        key.verify_strict(
            format!("{h}.{c}").as_bytes(),
            &Signature::from_bytes(&signature_bytes),
        )
        .map_err(|_| bad("signature does not verify"))?;
        let claims: Claims =
            serde_json::from_slice(&B64.decode(c).map_err(|_| bad("claims encoding"))?)
                .map_err(|_| bad("claims"))?;
        if claims.iss != ISSUER {
            return Err(bad("wrong issuer"));
        }
        if claims.aud != AUDIENCE {
            return Err(bad("wrong audience"));
        }
        if claims.exp - claims.iat > MAX_TOKEN_LIFETIME.as_secs() as i64 {
            return Err(bad("lifetime longer than the maximum of one hour"));
        }
        Ok((claims, header.kid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier_for(signer: &TokenSigner) -> Verifier {
        Verifier::new(Arc::new(StaticKeys(vec![(
            signer.kid().to_string(),
            signer.public_key(),
        )])))
    }

    #[tokio::test]
    async fn a_remembered_signature_skips_nothing_but_the_signature_check() {
        let signer = TokenSigner::generate();
        let verifier = verifier_for(&signer);
        let (token, claims) = signer.issue("alice", Role::Viewer, Duration::from_secs(300));
        assert_eq!(verifier.verify(&token).await.unwrap(), claims);
        assert_eq!(
            verifier.verify(&token).await.unwrap(),
            claims,
            "from memory"
        );
        assert_eq!(verifier.verified.lock().unwrap().len(), 1);
        // Another signature on the same claims is not the remembered token.
        let mut tampered = token.clone().into_bytes();
        let at = tampered.len() - 10;
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(verifier.verify(&tampered).await.is_err());
        // A remembered token whose times run out is refused all the same.
        let mut stale = claims.clone();
        stale.iat -= 7200;
        stale.nbf -= 7200;
        stale.exp = stale.iat + 600;
        let expired = forge(&signer, &stale);
        verifier.verified.lock().unwrap().insert(
            expired.clone(),
            Verified {
                claims: stale,
                kid: signer.kid().to_string(),
                until: std::time::Instant::now() + VERIFIED_TTL,
            },
        );
        assert!(
            verifier.verify(&expired).await.is_err(),
            "expired, remembered or not"
        );
    }

    fn forge(signer: &TokenSigner, claims: &Claims) -> String {
        let header = Header {
            alg: "EdDSA".into(),
            typ: "JWT".into(),
            kid: signer.kid.clone(),
        };
        let input = format!(
            "{}.{}",
            B64.encode(serde_json::to_vec(&header).unwrap()),
            B64.encode(serde_json::to_vec(claims).unwrap())
        );
        format!(
            "{input}.{}",
            B64.encode(signer.key.sign(input.as_bytes()).to_bytes())
        )
    }

    #[tokio::test]
    async fn issued_tokens_verify() {
        let signer = TokenSigner::generate();
        let (token, claims) = signer.issue("alice", Role::Deployer, Duration::from_secs(300));
        assert_eq!(verifier_for(&signer).verify(&token).await.unwrap(), claims);
    }

    #[tokio::test]
    async fn rejects_tampering_other_keys_and_bad_claims() {
        let signer = TokenSigner::generate();
        let verifier = verifier_for(&signer);
        let (token, claims) = signer.issue("alice", Role::Viewer, Duration::from_secs(300));

        let mut parts: Vec<&str> = token.split('.').collect();
        let mut promoted = claims.clone();
        promoted.role = Role::Admin;
        let forged_claims = B64.encode(serde_json::to_vec(&promoted).unwrap());
        parts[1] = &forged_claims;
        assert!(
            verifier.verify(&parts.join(".")).await.is_err(),
            "tampered claims verified"
        );

        let stranger = TokenSigner::generate();
        let (foreign, _) = stranger.issue("mallory", Role::Admin, Duration::from_secs(300));
        assert!(
            verifier.verify(&foreign).await.is_err(),
            "token from another key verified"
        );

        for (field, mutate) in [
            (
                "iss",
                Box::new(|c: &mut Claims| c.iss = "evil".into()) as Box<dyn Fn(&mut Claims)>,
            ),
            ("aud", Box::new(|c: &mut Claims| c.aud = "other".into())),
            ("exp", Box::new(|c: &mut Claims| c.exp = now_secs() - 3600)),
            ("nbf", Box::new(|c: &mut Claims| c.nbf = now_secs() + 600)),
            (
                "lifetime",
                Box::new(|c: &mut Claims| c.exp = c.iat + 2 * 3600),
            ),
        ] {
            let mut bad = claims.clone();
            mutate(&mut bad);
            assert!(
                verifier.verify(&forge(&signer, &bad)).await.is_err(),
                "bad {field} verified"
            );
        }
        for garbage in ["", "a.b", "a.b.c", "a.b.c.d"] {
            assert!(verifier.verify(garbage).await.is_err());
        }
    }

    /// A key source that never answers, counting the calls.
    struct Hanging(std::sync::atomic::AtomicUsize);

    #[async_trait]
    impl KeySource for Hanging {
        async fn fetch(&self) -> Result<VerifyingKeys, Error> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::pending().await
        }
    }

    /// A token signed by `signer` but naming a key id nobody published.
    fn with_kid(signer: &TokenSigner, kid: &str) -> String {
        let stranger = TokenSigner {
            kid: kid.to_string(),
            key: SigningKey::from_bytes(&signer.secret_bytes()),
        };
        stranger
            .issue("mallory", Role::Admin, Duration::from_secs(60))
            .0
    }

    #[tokio::test(start_paused = true)]
    async fn a_forged_key_id_does_not_stall_verification() {
        let signer = TokenSigner::generate();
        let source = Arc::new(Hanging(Default::default()));
        let verifier = Arc::new(Verifier::new(source.clone()));
        // Seed the cache with the real key, as a first successful fetch would.
        verifier.cache.write().await.keys.insert(
            signer.kid().to_string(),
            VerifyingKey::from_bytes(&signer.public_key()).unwrap(),
        );
        let forged = with_kid(&signer, "forged");
        let stalled = tokio::spawn({
            let verifier = verifier.clone();
            let forged = forged.clone();
            async move { verifier.verify(&forged).await }
        });
        tokio::task::yield_now().await;
        // While that fetch hangs, a token with a known key verifies at once.
        let started = tokio::time::Instant::now();
        let (token, _) = signer.issue("alice", Role::Viewer, Duration::from_secs(60));
        tokio::time::timeout(Duration::from_secs(1), verifier.verify(&token))
            .await
            .expect("a known key waited for a hanging fetch")
            .unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO, "a known key waited");
        // The hanging fetch gives up after its timeout ...
        let error = stalled.await.unwrap().unwrap_err();
        assert!(matches!(error, Error::Unavailable(_)), "{error}");
        assert!(started.elapsed() <= FETCH_TIMEOUT + Duration::from_millis(10));
        // ... and the failure is cached: the next forged id fetches nothing.
        let error = verifier
            .verify(&with_kid(&signer, "forged-2"))
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Unavailable(_)), "{error}");
        assert_eq!(source.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn rejects_malleable_signatures() {
        // verify_strict refuses a signature whose R is a small-order point;
        // an all-zero signature is the simplest such forgery.
        let signer = TokenSigner::generate();
        let (token, _) = signer.issue("alice", Role::Viewer, Duration::from_secs(60));
        let (input, _) = token.rsplit_once('.').unwrap();
        let forged = format!("{input}.{}", B64.encode([0u8; 64]));
        assert!(verifier_for(&signer).verify(&forged).await.is_err());
    }

    /// A cache that never announces a revocation: only lookups find them.
    struct Deaf(capstan_cache::MemoryCache);

    #[async_trait]
    impl capstan_cache::Cache for Deaf {
        async fn claim(&self, k: &str, t: Duration) -> Result<bool, capstan_cache::CacheError> {
            self.0.claim(k, t).await
        }
        async fn take(
            &self,
            k: &str,
            l: capstan_cache::RateLimit,
        ) -> Result<capstan_cache::Admit, capstan_cache::CacheError> {
            self.0.take(k, l).await
        }
        async fn revoke(&self, id: &str, t: Duration) -> Result<(), capstan_cache::CacheError> {
            self.0.revoke(id, t).await
        }
        async fn is_revoked(&self, id: &str) -> Result<bool, capstan_cache::CacheError> {
            self.0.is_revoked(id).await
        }
        async fn revocations(
            &self,
        ) -> Result<futures::stream::BoxStream<'static, String>, capstan_cache::CacheError>
        {
            Ok(futures::StreamExt::boxed(futures::stream::pending()))
        }
    }

    #[tokio::test]
    async fn a_revoked_token_is_refused_at_once_when_announced() {
        let signer = TokenSigner::generate();
        let cache = Arc::new(capstan_cache::MemoryCache::new());
        let verifier = verifier_for(&signer).with_revocations(cache.clone());
        let (token, claims) = signer.issue("alice", Role::Viewer, Duration::from_secs(60));
        let (other, _) = signer.issue("bob", Role::Viewer, Duration::from_secs(60));
        verifier.verify(&token).await.unwrap();
        verifier.verify(&other).await.unwrap();
        capstan_cache::Cache::revoke(cache.as_ref(), &claims.jti, Duration::from_secs(60))
            .await
            .unwrap();
        // The announcement arrives through a task: give it a moment, far
        // below the recheck interval that would also catch it.
        let started = std::time::Instant::now();
        while verifier.verify(&token).await.is_ok() {
            assert!(
                started.elapsed() < crate::REVOCATION_RECHECK / 5,
                "not heard"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let error = verifier.verify(&token).await.unwrap_err();
        assert_eq!(error.to_string(), "unauthenticated: token revoked");
        verifier
            .verify(&other)
            .await
            .expect("other tokens still verify");
    }

    #[tokio::test]
    async fn a_revoked_token_is_refused_within_the_recheck_without_announcements() {
        let signer = TokenSigner::generate();
        let cache = Arc::new(Deaf(capstan_cache::MemoryCache::new()));
        let verifier = verifier_for(&signer).with_revocations(cache.clone());
        let (token, claims) = signer.issue("alice", Role::Viewer, Duration::from_secs(60));
        verifier.verify(&token).await.unwrap();
        capstan_cache::Cache::revoke(cache.as_ref(), &claims.jti, Duration::from_secs(60))
            .await
            .unwrap();
        tokio::time::sleep(crate::REVOCATION_RECHECK + Duration::from_millis(50)).await;
        assert!(verifier.verify(&token).await.is_err());
    }

    #[test]
    fn key_id_is_stable_for_a_key() {
        let signer = TokenSigner::generate();
        let again = TokenSigner::from_bytes(&signer.secret_bytes());
        assert_eq!(signer.kid(), again.kid());
    }
}
