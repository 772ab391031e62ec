//! Its own test binary, so no other test installed a rustls provider: the
//! Vault adapter refuses to log in without one instead of letting reqwest
//! panic.

use std::time::Duration;

use capstan_secrets::{VaultConfig, VaultSecretStore};
use capstan_testkit::vault_double::VaultDouble;

#[tokio::test(flavor = "multi_thread")]
async fn without_a_crypto_provider_login_fails_instead_of_panicking() {
    assert!(
        rustls::crypto::CryptoProvider::get_default().is_none(),
        "this binary must not install a provider"
    );
    let double = VaultDouble::start().await;
    let dir = tempfile::tempdir().unwrap();
    let role_id = double.add_role(
        "x",
        "capstan/x/",
        Duration::from_secs(60),
        Duration::from_secs(600),
    );
    let role_id_file = dir.path().join("x.role-id");
    let secret_id_file = dir.path().join("x.secret-id");
    std::fs::write(&role_id_file, role_id).unwrap();
    std::fs::write(&secret_id_file, double.wrapped_secret_id("x").await).unwrap();
    let error = VaultSecretStore::login(VaultConfig {
        address: double.address(),
        role_id_file,
        secret_id_file,
        approle_mount: "approle".into(),
        kv_mount: "secret".into(),
        prefix: "capstan/x".into(),
    })
    .await
    .err()
    .unwrap();
    assert!(
        error.to_string().contains("no rustls crypto provider"),
        "{error}"
    );
}
