//! infra/vault/init.sh against the Vault double (a wire-level stand-in that
//! follows Vault's documented API and checks every request against the
//! OpenAPI subset): it configures AppRole, KV v2, transit, the policies and
//! roles, delivers a role_id and a wrapped secret_id per service, runs
//! again without changing anything, and the files it leaves log a service
//! in with exactly its policy.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use capstan_secrets::{Cas, Secret, SecretError, SecretStore, VaultConfig, VaultSecretStore};
use capstan_testkit::vault_double::VaultDouble;

fn run_init(double: &VaultDouble, out: &Path) -> std::process::Output {
    capstan_testkit::require_tool("curl", "apt-get install -y curl");
    capstan_testkit::require_tool("python3", "apt-get install -y python3");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../infra/vault/init.sh");
    tokio::task::block_in_place(|| {
        Command::new("bash")
            .arg(script)
            .arg(out)
            .env("VAULT_ADDR", double.address())
            .env("VAULT_TOKEN", double.root_token())
            .output()
            .unwrap()
    })
}

fn config(double: &VaultDouble, out: &Path, service: &str) -> VaultConfig {
    VaultConfig {
        address: double.address(),
        role_id_file: out.join(format!("{service}.role-id")),
        secret_id_file: out.join(format!("{service}.secret-id")),
        approle_mount: "approle".into(),
        kv_mount: "secret".into(),
        prefix: "capstan".into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn init_configures_vault_idempotently_and_its_files_log_services_in() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let double = VaultDouble::start().await;
    let out = tempfile::tempdir().unwrap();
    let first = run_init(&double, out.path());
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let services = [
        "auth",
        "scheduler",
        "orchestrator",
        "router-config",
        "agent",
    ];
    let role_ids: Vec<String> = services
        .iter()
        .map(|s| std::fs::read_to_string(out.path().join(format!("{s}.role-id"))).unwrap())
        .collect();
    for service in services {
        for file in [format!("{service}.role-id"), format!("{service}.secret-id")] {
            let mode = std::fs::metadata(out.path().join(&file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{file} is readable by others: {mode:o}");
        }
    }

    // Again: succeeds, same roles, fresh secret_ids.
    let second = run_init(&double, out.path());
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    for (service, role_id) in services.iter().zip(&role_ids) {
        let again = std::fs::read_to_string(out.path().join(format!("{service}.role-id"))).unwrap();
        assert_eq!(&again, role_id, "{service}'s role_id changed");
    }
    assert_eq!(
        double.violations(),
        Vec::<String>::new(),
        "init.sh left the documented API"
    );

    // The files log each service in with its own policy and nothing more.
    let auth = VaultSecretStore::login(config(&double, out.path(), "auth"))
        .await
        .unwrap();
    auth.put("auth/signing-key", Secret::new("k"), Cas::Absent)
        .await
        .unwrap();
    auth.put("capstan/service-key", Secret::new("s"), Cas::Absent)
        .await
        .unwrap();
    let scheduler = VaultSecretStore::login(config(&double, out.path(), "scheduler"))
        .await
        .unwrap();
    assert_eq!(
        scheduler
            .get("capstan/service-key")
            .await
            .unwrap()
            .unwrap()
            .value
            .expose(),
        "s"
    );
    assert!(matches!(
        scheduler.get("auth/signing-key").await,
        Err(SecretError::Denied(_))
    ));
    let router = VaultSecretStore::login(config(&double, out.path(), "router-config"))
        .await
        .unwrap();
    router
        .put(
            "router-config/provider-token",
            Secret::new("t"),
            Cas::Absent,
        )
        .await
        .unwrap();
    assert!(matches!(
        router.get("auth/signing-key").await,
        Err(SecretError::Denied(_))
    ));
    let agent = VaultSecretStore::login(config(&double, out.path(), "agent"))
        .await
        .unwrap();
    assert!(matches!(
        agent.get("capstan/service-key").await,
        Err(SecretError::Denied(_))
    ));

    // PKI: each service may issue its own certificate, for its own name.
    use capstan_secrets::CertificateIssuer;
    let issued = scheduler
        .issue("capstan-scheduler", "scheduler")
        .await
        .unwrap();
    assert!(issued.certificate.contains("BEGIN CERTIFICATE"));
    for (role, name) in [("capstan-scheduler", "auth"), ("capstan-auth", "auth")] {
        assert!(
            scheduler.issue(role, name).await.is_err(),
            "the scheduler got a certificate for {name} from {role}"
        );
    }
    assert_eq!(double.violations(), Vec::<String>::new());
}

/// infra/vault/bootstrap.sh, the `vault-init` of docker-compose.yml, on a
/// Vault as a fresh server is: it initialises and unseals it, then each
/// service finds its own role_id and wrapped secret_id in its own directory,
/// and they log it in. After a restart (sealed again) it unseals with the
/// key it kept and initialises nothing.
#[tokio::test(flavor = "multi_thread")]
async fn bootstrap_initialises_unseals_and_hands_each_service_its_credentials() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    capstan_testkit::require_tool("curl", "apt-get install -y curl");
    let double = VaultDouble::start_uninitialized().await;
    let (keys, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../infra/vault/bootstrap.sh");
    let run = || {
        tokio::task::block_in_place(|| {
            Command::new("bash")
                .arg(&script)
                .arg(keys.path())
                .arg(out.path())
                .env("VAULT_ADDR", double.address())
                .env("CAPSTAN_UID", nix::unistd::getuid().to_string())
                .output()
                .unwrap()
        })
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(!double.is_sealed());
    let mode = std::fs::metadata(keys.path().join("init.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "init.json is readable by others: {mode:o}");
    for service in [
        "auth",
        "scheduler",
        "orchestrator",
        "router-config",
        "agent",
    ] {
        let dir = out.path().join(service);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "{service}'s directory is open to others: {mode:o}"
        );
        let store = VaultSecretStore::login(VaultConfig {
            address: double.address(),
            role_id_file: dir.join("role-id"),
            secret_id_file: dir.join("secret-id"),
            approle_mount: "approle".into(),
            kv_mount: "secret".into(),
            prefix: "capstan".into(),
        })
        .await;
        assert!(store.is_ok(), "{service} did not log in: {:?}", store.err());
    }

    // A restart: sealed again. It unseals and leaves the init alone.
    double.seal();
    let second = run();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(!double.is_sealed());
    let inits = double
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/v1/sys/init")
        .count();
    assert_eq!(inits, 1, "Vault was initialised twice");
    assert_eq!(
        double.violations(),
        Vec::<String>::new(),
        "bootstrap.sh left the documented API"
    );
}
