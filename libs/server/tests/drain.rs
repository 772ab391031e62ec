//! A server told to stop (what SIGTERM does in every service's main) while
//! clients call it: it leaves the registry first and keeps serving for a
//! moment, so clients move to the other instance; the calls it has in
//! flight finish; then it stops, within its drain timeout. No client call
//! fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use capstan_authn::{Policy, RequireAuthLayer, StaticKeys, Verifier};
use capstan_events::MemoryBus;
use capstan_proto::v1::router_config_client::RouterConfigClient;
use capstan_proto::v1::router_config_server::{RouterConfig, RouterConfigServer};
use capstan_proto::v1::{
    GetRoutesRequest, RenderTraefikRequest, RenderTraefikResponse, RouteTable, SyncRequest,
};
use capstan_registry::{EmbeddedRegistry, ServiceRegistry};
use capstan_secrets::{FileSecretStore, Secret};
use capstan_server::{GrpcLimits, Platform, Service};
use capstan_store::MemoryStore;
use tokio_util::sync::CancellationToken;

/// Answers `GetRoutes` after `delay`, with its `generation` as its name.
struct Delayed {
    delay: Duration,
    generation: u64,
}

#[tonic::async_trait]
impl RouterConfig for Delayed {
    async fn get_routes(
        &self,
        _: tonic::Request<GetRoutesRequest>,
    ) -> Result<tonic::Response<RouteTable>, tonic::Status> {
        tokio::time::sleep(self.delay).await;
        Ok(tonic::Response::new(RouteTable {
            generation: self.generation,
            routes: Vec::new(),
        }))
    }

    async fn sync(
        &self,
        _: tonic::Request<SyncRequest>,
    ) -> Result<tonic::Response<RouteTable>, tonic::Status> {
        Err(tonic::Status::permission_denied("not in this test"))
    }

    async fn render_traefik(
        &self,
        _: tonic::Request<RenderTraefikRequest>,
    ) -> Result<tonic::Response<RenderTraefikResponse>, tonic::Status> {
        Err(tonic::Status::permission_denied("not in this test"))
    }
}

fn platform(registry: Arc<dyn ServiceRegistry>, dir: &std::path::Path) -> Platform {
    Platform::new(
        registry,
        Arc::new(MemoryBus::new()),
        Arc::new(MemoryStore::new()),
        Arc::new(FileSecretStore::new(dir)),
        Arc::new(capstan_cache::MemoryCache::new()),
        Secret::new("unused"),
    )
}

async fn start(
    platform: &Platform,
    id: &str,
    delay: Duration,
    generation: u64,
) -> (
    String,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), capstan_types::Error>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let service = Service {
        name: "router-config",
        instance_id: id.into(),
        grpc_names: vec!["capstan.v1.RouterConfig"],
        routes: tonic::service::Routes::new(RouterConfigServer::new(Delayed { delay, generation })),
        auth: RequireAuthLayer::new(
            Arc::new(Verifier::new(Arc::new(StaticKeys(vec![])))),
            Policy::new().public("/capstan.v1.RouterConfig/GetRoutes"),
        ),
    };
    let shutdown = CancellationToken::new();
    let limits = GrpcLimits {
        leave_delay: Duration::from_millis(500),
        drain_timeout: Duration::from_secs(10),
        ..GrpcLimits::default()
    };
    let server = tokio::spawn({
        let (platform, shutdown) = (platform.clone(), shutdown.clone());
        async move { capstan_server::serve_with(&platform, service, listener, shutdown, limits).await }
    });
    (address, shutdown, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_server_leaves_the_registry_first_finishes_its_calls_and_clients_move_on() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let registry: Arc<dyn ServiceRegistry> = Arc::new(EmbeddedRegistry::start(stop.child_token()));
    let servers = platform(registry.clone(), dir.path());
    // A answers slowly, so calls are in flight when it is told to stop.
    let (address_a, stop_a, server_a) =
        start(&servers, "router-config-a", Duration::from_millis(1500), 1).await;
    let (_, _stop_b, _server_b) =
        start(&servers, "router-config-b", Duration::from_millis(5), 2).await;
    let clients = platform(registry.clone(), dir.path());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Clients call whichever instance the registry offers, round robin.
    let (ok, failed, served_by_a) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::<String>::new())),
        Arc::new(AtomicUsize::new(0)),
    );
    let running = CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (clients, ok, failed, served_by_a, running) = (
            clients.clone(),
            ok.clone(),
            failed.clone(),
            served_by_a.clone(),
            running.clone(),
        );
        workers.push(tokio::spawn(async move {
            while !running.is_cancelled() {
                let call = async {
                    let channel = clients
                        .channel("router-config")
                        .await
                        .map_err(|e| e.to_string())?;
                    RouterConfigClient::new(channel)
                        .get_routes(GetRoutesRequest::default())
                        .await
                        .map_err(|s| s.to_string())
                };
                match call.await {
                    Ok(table) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if table.into_inner().generation == 1 {
                            served_by_a.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => failed.lock().unwrap().push(e),
                }
            }
        }));
    }
    // Let calls reach A, then stop it mid-call.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stopped_at = tokio::time::Instant::now();
    stop_a.cancel();

    // It left the registry at once, while it still accepts connections.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let listed = registry.healthy("router-config").await.unwrap();
    assert!(
        listed.iter().all(|i| i.address != address_a),
        "A is still registered 100 ms after it was told to stop: {listed:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(&address_a).await.is_ok(),
        "A stopped accepting before clients could move away"
    );

    // Its calls in flight finish, and it stops well within its timeout.
    let served = tokio::time::timeout(Duration::from_secs(12), server_a)
        .await
        .expect("A stopped within its drain timeout")
        .unwrap();
    served.expect("A stopped cleanly");
    let took = stopped_at.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "A stopped before its leave delay: {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.cancel();
    for worker in workers {
        worker.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(
        served_by_a.load(Ordering::Relaxed) >= 1,
        "no call was served by A, so none was in flight when it stopped"
    );
    assert_eq!(failed, Vec::<String>::new(), "client calls failed");
    assert!(
        ok.load(Ordering::Relaxed) > 20,
        "the clients kept calling B"
    );
    stop.cancel();
}
