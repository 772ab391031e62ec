//! Authentication and authorisation for every API call.
//!
//! - The auth service signs short-lived JWTs with Ed25519 ([`TokenSigner`]).
//! - Every other service verifies them against the auth service's public
//!   keys, cached and refreshed on an unknown key id ([`Verifier`]).
//! - [`RequireAuthLayer`] wraps a gRPC server: no token or a bad one is
//!   UNAUTHENTICATED; a principal the method's [`Rule`] does not admit is
//!   PERMISSION_DENIED, and so is every method with no rule (default deny).
//! - Three kinds of principal: users (admin, operator, viewer API keys),
//!   Capstan's services (the service key), and nodes (one key per agent,
//!   whose tokens name the node). A user's key can never hold the service or
//!   node role; see [`Role::is_user`].
//! - [`TokenSource`] and [`Authed`] give clients a fresh token on every call.

mod client;
mod jwt;
mod middleware;
mod revocation;

pub use client::{Authed, TokenSource};
pub use jwt::{
    AUDIENCE, Claims, ISSUER, KEY_REFRESH_INTERVAL, KeySource, MAX_TOKEN_LIFETIME,
    RETIRED_KEY_GRACE, Signer, StaticKeys, TokenSigner, Verifier, VerifyingKeys, issue, issue_in,
};
pub use middleware::{Peer, Policy, RequireAuthLayer, Rule, caller};
pub use revocation::RECHECK as REVOCATION_RECHECK;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, including API keys.
    Admin,
    /// Reads and changes (deploys, scales, restarts, rolls back, deletes)
    /// the apps of its project. Keys made before projects say `operator`.
    #[serde(alias = "operator")]
    Deployer,
    /// Reads only.
    Viewer,
    /// Capstan's own services calling each other. Never a user's.
    Service,
    /// One agent, acting only as the node its token names (`sub`).
    Node,
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    Read,
    Write,
    Admin,
}

impl Role {
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "admin" => Some(Role::Admin),
            // The name before projects; keys and scripts that say it still work.
            "deployer" | "operator" => Some(Role::Deployer),
            "viewer" => Some(Role::Viewer),
            "service" => Some(Role::Service),
            "node" => Some(Role::Node),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Deployer => "deployer",
            Role::Viewer => "viewer",
            Role::Service => "service",
            Role::Node => "node",
        }
    }

    /// Roles a person's API key may hold.
    pub const USER_ROLES: [Role; 3] = [Role::Admin, Role::Deployer, Role::Viewer];

    pub fn is_user(self) -> bool {
        Self::USER_ROLES.contains(&self)
    }

    /// What a user role may do; the service and node roles are no user's and
    /// get nothing from this (their methods name them in a [`Rule`]).
    pub fn allows(self, access: Access) -> bool {
        match self {
            Role::Admin => true,
            Role::Deployer => access <= Access::Write,
            Role::Viewer => access == Access::Read,
            Role::Service | Role::Node => false,
        }
    }
}

pub use capstan_types::spec::DEFAULT_PROJECT;

/// An API key: `cap_` and 43 characters of base64url randomness.
/// The services whose certificates are service principals under mutual
/// TLS. Agents are not among them: they act as their node, by node key.
pub const CERTIFICATE_SERVICES: &[&str] = &[
    "auth",
    "scheduler",
    "orchestrator",
    "router-config",
    "metrics",
];

/// The Capstan service a client certificate (DER, already verified against
/// the platform's CA at the handshake) is valid for, by its SAN, if any.
pub fn certificate_principal(der: &[u8]) -> Option<&'static str> {
    let der = rustls_pki_types::CertificateDer::from(der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    CERTIFICATE_SERVICES.iter().copied().find(|service| {
        rustls_pki_types::ServerName::try_from(*service)
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    })
}

/// The claims a service holds when its certificate names it: no token, so
/// no signature, id or lifetime beyond this call.
pub fn certificate_claims(service: &str) -> Claims {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    Claims {
        iss: "certificate".into(),
        aud: AUDIENCE.into(),
        sub: service.to_string(),
        role: Role::Service,
        project: String::new(),
        iat: now,
        nbf: now,
        exp: now + 60,
        jti: String::new(),
    }
}

pub fn generate_api_key() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "cap_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Whether two secrets are equal, in time that does not depend on where
/// they differ or on their lengths: both are hashed first, and every byte of
/// the digests is compared.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    let (a, b) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |diff, (x, y)| diff | (x ^ y))
        == 0
}

/// How API keys are stored: only their SHA-256, never the key.
pub fn api_key_digest(api_key: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(api_key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_they_say() {
        assert!(Role::Viewer.allows(Access::Read));
        assert!(!Role::Viewer.allows(Access::Write));
        assert!(Role::Deployer.allows(Access::Write));
        assert!(!Role::Deployer.allows(Access::Admin));
        assert_eq!(Role::parse("operator"), Some(Role::Deployer));
        let old: Role = serde_json::from_str("\"operator\"").unwrap();
        assert_eq!(old, Role::Deployer);
        assert!(Role::Admin.allows(Access::Admin));
        for role in [Role::Service, Role::Node] {
            assert!(!role.is_user());
            assert!(!role.allows(Access::Read), "{role:?} got user access");
        }
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"Bearer abc", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer abc", b"Bearer abd"));
        assert!(!constant_time_eq(b"Bearer abc", b"Bearer ab"));
        assert!(!constant_time_eq(b"", b"Bearer abc"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn api_keys_are_random_and_stored_as_digests() {
        let (a, b) = (generate_api_key(), generate_api_key());
        assert_ne!(a, b);
        assert!(a.starts_with("cap_") && a.len() == 47);
        assert_eq!(api_key_digest(&a).len(), 64);
        assert_ne!(api_key_digest(&a), a);
    }
}
