//! The gRPC servers' limits on a real server: a call that runs past the
//! timeout is cut off with an error instead of holding its connection.

use std::sync::Arc;
use std::time::Duration;

use capstan_authn::{Policy, RequireAuthLayer, StaticKeys, Verifier};
use capstan_events::MemoryBus;
use capstan_proto::v1::GetVerificationKeysRequest;
use capstan_proto::v1::auth_client::AuthClient;
use capstan_registry::EmbeddedRegistry;
use capstan_secrets::{FileSecretStore, Secret};
use capstan_server::{GrpcLimits, Platform, Service};
use capstan_store::MemoryStore;
use tokio_util::sync::CancellationToken;

/// Answers every call under `capstan.v1.Auth` after ten seconds.
#[derive(Clone)]
struct Slow;

impl tonic::server::NamedService for Slow {
    const NAME: &'static str = "capstan.v1.Auth";
}

impl tower::Service<http::Request<tonic::body::Body>> for Slow {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(tonic::Status::internal("too late").into_http())
        })
    }
}

#[tokio::test]
async fn a_call_past_the_timeout_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let platform = Platform::new(
        Arc::new(EmbeddedRegistry::start(shutdown.child_token())),
        Arc::new(MemoryBus::new()),
        Arc::new(MemoryStore::new()),
        Arc::new(FileSecretStore::new(dir.path())),
        Arc::new(capstan_cache::MemoryCache::new()),
        Secret::new("unused"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = Service {
        name: "slow",
        instance_id: "slow-1".into(),
        grpc_names: vec!["capstan.v1.Auth"],
        routes: tonic::service::Routes::new(Slow),
        auth: RequireAuthLayer::new(
            Arc::new(Verifier::new(Arc::new(StaticKeys(vec![])))),
            Policy::new().public("/capstan.v1.Auth/GetVerificationKeys"),
        ),
    };
    let limits = GrpcLimits {
        timeout: Duration::from_millis(300),
        ..GrpcLimits::default()
    };
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { capstan_server::serve_with(&platform, service, listener, shutdown, limits).await }
    });
    let mut client = AuthClient::new(capstan_server::channel_to(&address.to_string()).unwrap());
    let started = tokio::time::Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_verification_keys(GetVerificationKeysRequest {}),
    )
    .await
    .expect("the server held the call past its timeout");
    let status = outcome.expect_err("a slow call must fail");
    assert_ne!(status.message(), "too late", "the handler ran to the end");
    assert!(started.elapsed() < Duration::from_secs(5));
    shutdown.cancel();
    let _ = server.await;
}
