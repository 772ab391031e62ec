//! Mutual TLS on a real server, with certificates this test makes (rcgen):
//! a client with a certificate from the platform's CA gets in; one without
//! a certificate, with one from another CA, in plaintext, or expecting
//! another service's name is refused at the handshake.

use std::sync::Arc;
use std::time::Duration;

use capstan_authn::{Policy, RequireAuthLayer, StaticKeys, Verifier};
use capstan_events::MemoryBus;
use capstan_registry::EmbeddedRegistry;
use capstan_secrets::{FileSecretStore, Secret};
use capstan_server::{Platform, Service, Tls};
use capstan_store::MemoryStore;
use capstan_testkit::pki::TestCa;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn tls(ca: &TestCa, dir: &std::path::Path, name: &str) -> Tls {
    let files = ca.write(dir, name);
    Tls::load(&files.ca, &files.cert, &files.key).unwrap()
}

async fn check(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
    let mut client = HealthClient::new(channel);
    let call = client.check(HealthCheckRequest {
        service: String::new(),
    });
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("an answer or a refusal within 5 s")
        .map(drop)
}

/// A scheduler-named server on `tls`, with `verifier` and `policy`, until
/// the returned token is cancelled: its address, the token, and the task.
async fn serve_scheduler(
    dir: &std::path::Path,
    tls: Tls,
    verifier: Verifier,
    policy: Policy,
) -> (
    String,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), capstan_types::Error>>,
) {
    let shutdown = CancellationToken::new();
    let platform = Platform::new(
        Arc::new(EmbeddedRegistry::start(shutdown.child_token())),
        Arc::new(MemoryBus::new()),
        Arc::new(MemoryStore::new()),
        Arc::new(FileSecretStore::new(dir)),
        Arc::new(capstan_cache::MemoryCache::new()),
        Secret::new("unused"),
    )
    .with_tls(Some(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let service = Service {
        name: "scheduler",
        instance_id: "scheduler-1".into(),
        grpc_names: vec!["capstan.v1.Scheduler"],
        routes: tonic::service::Routes::default(),
        auth: RequireAuthLayer::new(Arc::new(verifier), policy),
    };
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { capstan_server::serve(&platform, service, listener, shutdown).await }
    });
    (address, shutdown, server)
}

fn no_keys() -> Verifier {
    Verifier::new(Arc::new(StaticKeys(vec![])))
}

#[tokio::test(flavor = "multi_thread")]
async fn only_peers_with_the_platforms_certificates_get_in() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("capstan test CA");
    let (address, shutdown, server) = serve_scheduler(
        dir.path(),
        tls(&ca, dir.path(), "scheduler"),
        no_keys(),
        Policy::new(),
    )
    .await;

    // A peer with a certificate from the same CA, calling the scheduler.
    let orchestrator = tls(&ca, dir.path(), "orchestrator");
    check(capstan_server::channel_with(&address, Some((&orchestrator, "scheduler"))).unwrap())
        .await
        .expect("a peer with the platform's certificate gets in");

    // Expecting another service's name: the server's certificate does not match.
    let refused =
        check(capstan_server::channel_with(&address, Some((&orchestrator, "auth"))).unwrap()).await;
    assert!(
        refused.is_err(),
        "a certificate for another name was accepted"
    );

    // A certificate from another CA.
    let stranger_ca = TestCa::new("someone else's CA");
    let other_dir = tempfile::tempdir().unwrap();
    let stranger = tls(&stranger_ca, other_dir.path(), "orchestrator");
    assert!(
        check(capstan_server::channel_with(&address, Some((&stranger, "scheduler"))).unwrap())
            .await
            .is_err(),
        "a certificate from another CA was accepted"
    );

    // No client certificate: trusts the server, but shows nothing.
    let anonymous = tonic::transport::Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca.cert_pem))
                .domain_name("scheduler"),
        )
        .unwrap()
        .connect_lazy();
    assert!(
        check(anonymous).await.is_err(),
        "a client without a certificate got in"
    );

    // Plaintext.
    assert!(
        check(capstan_server::channel_to(&address).unwrap())
            .await
            .is_err(),
        "a plaintext client got in"
    );

    // The server still serves its peers after all that.
    check(capstan_server::channel_with(&address, Some((&orchestrator, "scheduler"))).unwrap())
        .await
        .unwrap();
    shutdown.cancel();
    let _ = server.await;
}

#[test]
fn unreadable_or_non_pem_files_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let error = Tls::load(&missing, &missing, &missing)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("tls_ca") && error.contains("missing.pem"),
        "{error}"
    );
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let error = Tls::load(&junk, &junk, &junk).err().unwrap().to_string();
    assert!(error.contains("is not PEM"), "{error}");
}

/// The server's certificate (and its CA) are replaced on disk while it runs:
/// new connections get the new one at once, no restart; files that do not
/// load leave the old ones in force.
#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_certificate_takes_effect_without_a_restart() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new("old CA");
    let files = old_ca.write(server_dir.path(), "scheduler");
    let server_tls = Tls::load(&files.ca, &files.cert, &files.key).unwrap();
    let (address, shutdown, server) = serve_scheduler(
        server_dir.path(),
        server_tls.clone(),
        no_keys(),
        Policy::new(),
    )
    .await;
    let old_client = tls(&old_ca, client_dir.path(), "orchestrator");
    check(capstan_server::channel_with(&address, Some((&old_client, "scheduler"))).unwrap())
        .await
        .expect("the old certificate works before the renewal");
    assert!(
        !server_tls.reload_if_changed().unwrap(),
        "nothing changed yet"
    );

    // Renewal: a new CA and a new certificate, written over the old files.
    let new_ca = TestCa::new("new CA");
    new_ca.write(server_dir.path(), "scheduler");
    assert!(
        server_tls.reload_if_changed().unwrap(),
        "the new files are in force"
    );
    assert_eq!(server_tls.generation(), 1);
    let new_dir = tempfile::tempdir().unwrap();
    let new_client = tls(&new_ca, new_dir.path(), "orchestrator");
    check(capstan_server::channel_with(&address, Some((&new_client, "scheduler"))).unwrap())
        .await
        .expect("the same server accepts the new CA's peers");
    assert!(
        check(capstan_server::channel_with(&address, Some((&old_client, "scheduler"))).unwrap())
            .await
            .is_err(),
        "a peer of the old CA is refused once the CA was replaced"
    );

    // A half-written renewal does not load: the new material stays.
    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    assert!(server_tls.reload_if_changed().is_err());
    check(capstan_server::channel_with(&address, Some((&new_client, "scheduler"))).unwrap())
        .await
        .expect("a renewal that does not load leaves the last good one in force");
    shutdown.cancel();
    let _ = server.await;
}

/// Over mutual TLS the service principal is the certificate: a peer whose
/// certificate names a control-plane service may call services-only methods
/// without a token; an agent's certificate may not; and a service token is
/// refused even from a service's certificate.
#[tokio::test(flavor = "multi_thread")]
async fn over_mutual_tls_a_service_is_its_certificate() {
    use capstan_proto::v1::PlaceRequest;
    use capstan_proto::v1::scheduler_client::SchedulerClient;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("capstan test CA");
    let signer = capstan_authn::TokenSigner::from_bytes(&[7; 32]);
    // A services-only method with no handler: admitted calls get
    // UNIMPLEMENTED from the router, refused ones the auth layer's answer.
    let (address, shutdown, server) = serve_scheduler(
        dir.path(),
        tls(&ca, dir.path(), "scheduler"),
        Verifier::new(Arc::new(StaticKeys(vec![(
            signer.kid().to_string(),
            signer.public_key(),
        )]))),
        Policy::new().services("/capstan.v1.Scheduler/Place"),
    )
    .await;
    let place = |identity: Tls, token: Option<String>| {
        let address = address.clone();
        async move {
            let channel =
                capstan_server::channel_with(&address, Some((&identity, "scheduler"))).unwrap();
            let mut request = tonic::Request::new(PlaceRequest::default());
            if let Some(token) = token {
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            let mut client = SchedulerClient::new(channel);
            tokio::time::timeout(Duration::from_secs(5), client.place(request))
                .await
                .expect("an answer within 5 s")
                .unwrap_err()
                .code()
        }
    };
    let orchestrator = tls(&ca, dir.path(), "orchestrator");
    let agent = tls(&ca, dir.path(), "agent");
    assert_eq!(
        place(orchestrator.clone(), None).await,
        tonic::Code::Unimplemented,
        "the orchestrator's certificate is a service principal"
    );
    assert_eq!(
        place(agent.clone(), None).await,
        tonic::Code::Unauthenticated,
        "an agent's certificate is no service"
    );
    let (service_token, _) = signer.issue(
        "capstan-services",
        capstan_authn::Role::Service,
        Duration::from_secs(60),
    );
    assert_eq!(
        place(orchestrator, Some(service_token.clone())).await,
        tonic::Code::Unauthenticated,
        "service tokens are refused over TLS"
    );
    assert_eq!(
        place(agent, Some(service_token)).await,
        tonic::Code::Unauthenticated,
        "a leaked service key does not make an agent a service"
    );
    shutdown.cancel();
    let _ = server.await;
}

/// With `--tls-vault-pki` the certificate comes from Vault's PKI engine and
/// is renewed at 2/3 of its lifetime, in place.
#[tokio::test(flavor = "multi_thread")]
async fn a_vault_pki_certificate_is_renewed_before_it_expires() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let double = capstan_testkit::vault_double::VaultDouble::start().await;
    double.use_pki_ca(TestCa::new("capstan CA in Vault"));
    double.add_pki_role("capstan-scheduler", &["scheduler"]);
    double.set_pki_ttl(Duration::from_secs(3));
    let dir = tempfile::tempdir().unwrap();
    let role_id = double.add_role_with(
        "scheduler",
        &["capstan/", "pki/issue/capstan-scheduler"],
        Duration::from_secs(60),
        Duration::from_secs(600),
    );
    let (role_id_file, secret_id_file) = (dir.path().join("role-id"), dir.path().join("secret-id"));
    std::fs::write(&role_id_file, role_id).unwrap();
    std::fs::write(&secret_id_file, double.wrapped_secret_id("scheduler").await).unwrap();
    let vault = capstan_secrets::VaultSecretStore::login(capstan_secrets::VaultConfig {
        address: double.address(),
        role_id_file,
        secret_id_file,
        approle_mount: "approle".into(),
        kv_mount: "secret".into(),
        prefix: "capstan".into(),
    })
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let tls = capstan_server::standalone::vault_certificate(
        Arc::new(vault),
        "capstan-scheduler".into(),
        "scheduler",
        shutdown.clone(),
    )
    .await
    .unwrap();
    assert_eq!((tls.generation(), double.issued()), (0, 1));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while tls.generation() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the certificate was not renewed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(double.issued() >= 2);
    shutdown.cancel();
}
