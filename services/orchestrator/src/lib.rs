//! The orchestrator: the apps API and the desired state behind it, the
//! reconciler that makes observed state match ([`reconcile`], deciding
//! through the pure [`plan`]), and the event log behind `capstan events`.
//!
//! It never starts a workload itself (agents do) nor picks a node (the
//! scheduler does); it never reads another service's tables.

mod api;
pub mod autoscaler;
mod changes;
mod cluster;
mod event_log;
pub mod journal;
mod logs;
mod reconcile;

pub use api::MAX_WATCHERS;
pub use capstan_rollout::{plan, records};
pub use cluster::{Cluster, GrpcCluster};
pub use reconcile::Reconciler;

use capstan_authn::{Access, Policy, RequireAuthLayer};
use capstan_proto::v1::orchestrator_server::OrchestratorServer;
use capstan_server::{Platform, Service};
use capstan_types::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Viewers read, operators change apps; router-config reads the endpoints,
/// the metrics service the app list.
pub fn policy() -> Policy {
    Policy::new()
        .write("/capstan.v1.Orchestrator/ApplyApp")
        .write("/capstan.v1.Orchestrator/ScaleApp")
        .write("/capstan.v1.Orchestrator/DeleteApp")
        .read("/capstan.v1.Orchestrator/GetApp")
        .users("/capstan.v1.Orchestrator/ListApps", Access::Read, true)
        .read("/capstan.v1.Orchestrator/ListEvents")
        .read("/capstan.v1.Orchestrator/WatchEvents")
        .read("/capstan.v1.Orchestrator/GetAppHistory")
        .read("/capstan.v1.Orchestrator/AppLogs")
        .write("/capstan.v1.Orchestrator/ResumeAutoscale")
        .write("/capstan.v1.Orchestrator/RestartApp")
        .write("/capstan.v1.Orchestrator/RollbackApp")
        .services("/capstan.v1.Orchestrator/WakeApp")
        .users("/capstan.v1.Orchestrator/ListEndpoints", Access::Read, true)
}

pub struct OrchestratorOptions {
    /// The lease of the reconciler's leadership.
    pub lease_ttl: std::time::Duration,
    /// How often the autoscaler decides: the agents' and the edge proxy's
    /// sampling period (it reads the last two).
    pub autoscale_every: std::time::Duration,
}

/// The singleton role of the reconciler: one replica leads it at a time.
pub const RECONCILER_ROLE: &str = "orchestrator.reconciler";

/// Serves the orchestrator on `listener` until `shutdown`. Every replica
/// serves the API and keeps the event log; only the leader of
/// [`RECONCILER_ROLE`] reconciles, writing through its fenced store.
pub async fn run(
    platform: Platform,
    options: OrchestratorOptions,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let lease_ttl = options.lease_ttl;
    let autoscale_every = options.autoscale_every;
    let instance_id = capstan_server::new_id("orchestrator");
    let changes = changes::Changes::new();
    let events = event_log::EventLog::new(&platform);
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(events.clone().consume(platform.clone(), shutdown.clone()));
    tasks.spawn(
        events
            .clone()
            .fan_out(platform.clone(), changes.clone(), shutdown.clone()),
    );
    let election = platform.election(RECONCILER_ROLE, &instance_id, lease_ttl);
    tasks.spawn({
        let platform = platform.clone();
        let changes = changes.clone();
        election.lead(shutdown.clone(), move |store, term| {
            let platform = platform.with_store(store);
            let reconciler =
                reconcile::Reconciler::new(platform.clone(), changes.clone()).run(term.clone());
            let autoscaler =
                autoscaler::Autoscaler::new(platform, autoscale_every).run(changes.clone(), term);
            async move {
                tokio::join!(reconciler, autoscaler);
            }
        })
    });

    let policy = policy();
    let service = Service {
        name: "orchestrator",
        instance_id,
        grpc_names: vec!["capstan.v1.Orchestrator"],
        routes: tonic::service::Routes::new(OrchestratorServer::new(api::Api::new(
            platform.clone(),
            events,
            changes,
        ))),
        auth: RequireAuthLayer::new(platform.verifier(), policy),
    };
    let result = capstan_server::serve(&platform, service, listener, shutdown).await;
    tasks.close();
    tasks.wait().await;
    result
}
