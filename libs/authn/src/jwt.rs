use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use capstan_types::Error;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::Role;

pub const ISSUER: &str = "capstan-auth";
pub const AUDIENCE: &str = "capstan";
/// Clock skew tolerated between services.
const LEEWAY_SECS: i64 = 30;
/// An unknown key id triggers at most one key refresh per this interval.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub role: Role,
    pub iat: i64,
    pub exp: i64,
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

    pub fn issue(&self, sub: &str, role: Role, ttl: Duration) -> (String, Claims) {
        let iat = now_secs();
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: sub.into(),
            role,
            iat,
            exp: iat + ttl.as_secs() as i64,
        };
        let header = Header {
            alg: "EdDSA".into(),
            typ: "JWT".into(),
            kid: self.kid.clone(),
        };
        let signing_input = format!(
            "{}.{}",
            B64.encode(serde_json::to_vec(&header).expect("header serializes")),
            B64.encode(serde_json::to_vec(&claims).expect("claims serialize"))
        );
        let signature = self.key.sign(signing_input.as_bytes());
        (
            format!("{signing_input}.{}", B64.encode(signature.to_bytes())),
            claims,
        )
    }
}

pub type VerifyingKeys = Vec<(String, [u8; 32])>;

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
pub struct Verifier {
    source: Arc<dyn KeySource>,
    cache: RwLock<Cache>,
}

struct Cache {
    keys: HashMap<String, VerifyingKey>,
    refreshed: Option<tokio::time::Instant>,
}

impl Verifier {
    pub fn new(source: Arc<dyn KeySource>) -> Self {
        Verifier {
            source,
            cache: RwLock::new(Cache {
                keys: HashMap::new(),
                refreshed: None,
            }),
        }
    }

    async fn key(&self, kid: &str) -> Result<VerifyingKey, Error> {
        if let Some(key) = self.cache.read().await.keys.get(kid) {
            return Ok(*key);
        }
        let mut cache = self.cache.write().await;
        if let Some(key) = cache.keys.get(kid) {
            return Ok(*key);
        }
        let due = cache
            .refreshed
            .is_none_or(|at| at.elapsed() >= REFRESH_EVERY);
        if due {
            let fetched = self.source.fetch().await?;
            cache.refreshed = Some(tokio::time::Instant::now());
            cache.keys = fetched
                .into_iter()
                .filter_map(|(kid, bytes)| VerifyingKey::from_bytes(&bytes).ok().map(|k| (kid, k)))
                .collect();
        }
        cache
            .keys
            .get(kid)
            .copied()
            .ok_or_else(|| Error::Unauthenticated(format!("unknown signing key `{kid}`")))
    }

    pub async fn verify(&self, token: &str) -> Result<Claims, Error> {
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
        key.verify(
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
        let now = now_secs();
        if claims.exp + LEEWAY_SECS < now {
            return Err(Error::Unauthenticated("token expired".into()));
        }
        if claims.iat - LEEWAY_SECS > now {
            return Err(bad("issued in the future"));
        }
        Ok(claims)
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
        let (token, claims) = signer.issue("alice", Role::Operator, Duration::from_secs(300));
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

    #[test]
    fn key_id_is_stable_for_a_key() {
        let signer = TokenSigner::generate();
        let again = TokenSigner::from_bytes(&signer.secret_bytes());
        assert_eq!(signer.kid(), again.kid());
    }
}
