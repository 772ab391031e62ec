//! Tokens signed by Vault transit (the Vault double: a wire-level stand-in
//! that follows Vault's documented API and checks every request against the
//! OpenAPI subset), set up by infra/vault/init.sh: the private key never
//! leaves Vault, the kid is the key version, and after a rotation tokens of
//! the previous version still verify.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use capstan_auth::signing::TransitSigner;
use capstan_authn::{Role, Signer, StaticKeys, Verifier};
use capstan_secrets::{VaultConfig, VaultSecretStore};
use capstan_testkit::vault_double::VaultDouble;

#[tokio::test(flavor = "multi_thread")]
async fn transit_signs_rotates_and_keeps_old_tokens_valid() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    capstan_testkit::require_tool("curl", "apt-get install -y curl");
    let double = VaultDouble::start().await;
    let out = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../infra/vault/init.sh");
    let init = tokio::task::block_in_place(|| {
        std::process::Command::new("bash")
            .arg(script)
            .arg(out.path())
            .env("VAULT_ADDR", double.address())
            .env("VAULT_TOKEN", double.root_token())
            .output()
            .unwrap()
    });
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let vault = Arc::new(
        VaultSecretStore::login(VaultConfig {
            address: double.address(),
            role_id_file: out.path().join("auth.role-id"),
            secret_id_file: out.path().join("auth.secret-id"),
            approle_mount: "approle".into(),
            kv_mount: "secret".into(),
            prefix: "capstan".into(),
        })
        .await
        .unwrap(),
    );
    let signer: Arc<dyn Signer> = Arc::new(TransitSigner::new(vault));
    assert_eq!(signer.current_kid().await.unwrap(), "vault-v1");
    let (old, _) =
        capstan_authn::issue(signer.as_ref(), "ci", Role::Viewer, Duration::from_secs(60))
            .await
            .unwrap();

    assert_eq!(signer.rotate().await.unwrap(), "vault-v2");
    // Published at once; signing with it waits until verifiers can know it.
    let published = signer.public_keys().await.unwrap();
    let kids: Vec<&str> = published.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kids, ["vault-v1", "vault-v2"]);
    assert_eq!(signer.current_kid().await.unwrap(), "vault-v1");
    // Once its time comes, v2 signs (pinned here rather than waiting).
    let (new, _) = capstan_authn::issue(
        &Pinned(signer.clone(), "vault-v2"),
        "ci",
        Role::Viewer,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let verifier = Verifier::new(Arc::new(StaticKeys(published.clone())));
    assert_eq!(verifier.verify(&old).await.unwrap().sub, "ci");
    assert_eq!(verifier.verify(&new).await.unwrap().sub, "ci");
    // Each signature is its own version's: v1's key does not verify v2's.
    let only_v1 = Verifier::new(Arc::new(StaticKeys(vec![(
        "vault-v2".to_string(),
        published[0].1,
    )])));
    assert!(only_v1.verify(&new).await.is_err());

    // No private key went anywhere: nothing was written to KV, and every
    // request stayed within the documented API.
    assert!(
        !double
            .requests()
            .iter()
            .any(|r| r.path.starts_with("/v1/secret/data/") && r.method == "POST"),
        "a key was written to KV"
    );
    assert_eq!(double.violations(), Vec::<String>::new());
}

/// A signer pinned to one kid of another.
struct Pinned(Arc<dyn Signer>, &'static str);

#[async_trait::async_trait]
impl Signer for Pinned {
    async fn current_kid(&self) -> Result<String, capstan_types::Error> {
        Ok(self.1.to_string())
    }
    async fn sign(&self, kid: &str, input: &[u8]) -> Result<[u8; 64], capstan_types::Error> {
        self.0.sign(kid, input).await
    }
    async fn public_keys(&self) -> Result<capstan_authn::VerifyingKeys, capstan_types::Error> {
        self.0.public_keys().await
    }
    async fn rotate(&self) -> Result<String, capstan_types::Error> {
        self.0.rotate().await
    }
}
