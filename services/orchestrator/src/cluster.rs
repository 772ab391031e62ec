//! What the reconciler needs from the rest of the platform, as one small
//! trait: the scheduler (nodes, placement, allocations), the agents
//! (observe, start, stop) and router-config (sync). [`GrpcCluster`] is the
//! real one; tests drive the reconciler through an in-memory fake, failing
//! any step on purpose.

use std::time::Duration;

use async_trait::async_trait;
use capstan_proto::v1::agent_client::AgentClient;
use capstan_proto::v1::router_config_client::RouterConfigClient;
use capstan_proto::v1::scheduler_client::SchedulerClient;
use capstan_proto::v1::{
    Allocation, Instance, ListAllocationsRequest, ListInstancesRequest, ListNodesRequest, Node,
    PlaceRequest, PlaceResponse, ReleaseRequest, StartInstanceRequest, StopInstanceRequest,
    SyncRequest,
};
use capstan_server::Platform;
use capstan_types::Error;

/// How long an agent gets to list its instances before it counts as unreachable.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Grace an instance gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

#[async_trait]
pub trait Cluster: Send + Sync + 'static {
    /// Every registered node, with its status and drain flag.
    async fn nodes(&self) -> Result<Vec<Node>, Error>;
    /// What one node runs; `None` when its agent does not answer.
    async fn instances(&self, node: &Node) -> Option<Vec<Instance>>;
    async fn place(&self, request: PlaceRequest) -> Result<PlaceResponse, Error>;
    /// Frees allocations; freeing what holds nothing succeeds.
    async fn release(&self, instance_ids: Vec<String>) -> Result<(), Error>;
    async fn allocations(&self) -> Result<Vec<Allocation>, Error>;
    async fn start(
        &self,
        node_address: &str,
        request: StartInstanceRequest,
    ) -> Result<Instance, Error>;
    /// Stops an instance; stopping one the node does not run succeeds.
    async fn stop(&self, node_address: &str, instance_id: &str) -> Result<(), Error>;
    /// Rebuilds the routing table's routes of `apps` (every app when
    /// empty) and waits for requests to removed upstreams to finish.
    async fn sync_routes(&self, apps: Vec<String>) -> Result<(), Error>;
}

/// The cluster over gRPC, with the platform's service credentials.
pub struct GrpcCluster {
    platform: Platform,
}

impl GrpcCluster {
    pub fn new(platform: Platform) -> Self {
        GrpcCluster { platform }
    }

    async fn scheduler(&self) -> Result<SchedulerClient<capstan_authn::Authed>, Error> {
        Ok(SchedulerClient::new(
            self.platform.client("scheduler").await?,
        ))
    }

    async fn agent(&self, address: &str) -> Result<AgentClient<capstan_authn::Authed>, Error> {
        Ok(AgentClient::new(self.platform.client_at(address).await?))
    }
}

#[async_trait]
impl Cluster for GrpcCluster {
    async fn nodes(&self) -> Result<Vec<Node>, Error> {
        Ok(self
            .scheduler()
            .await?
            .list_nodes(ListNodesRequest {})
            .await
            .map_err(capstan_proto::into_error)?
            .into_inner()
            .nodes)
    }

    async fn instances(&self, node: &Node) -> Option<Vec<Instance>> {
        let mut request = tonic::Request::new(ListInstancesRequest {});
        request.set_timeout(OBSERVE_TIMEOUT);
        let response = self
            .agent(&node.address)
            .await
            .ok()?
            .list_instances(request)
            .await
            .ok()?;
        Some(response.into_inner().instances)
    }

    async fn place(&self, request: PlaceRequest) -> Result<PlaceResponse, Error> {
        Ok(self
            .scheduler()
            .await?
            .place(request)
            .await
            .map_err(capstan_proto::into_error)?
            .into_inner())
    }

    async fn release(&self, instance_ids: Vec<String>) -> Result<(), Error> {
        self.scheduler()
            .await?
            .release(ReleaseRequest { instance_ids })
            .await
            .map_err(capstan_proto::into_error)?;
        Ok(())
    }

    async fn allocations(&self) -> Result<Vec<Allocation>, Error> {
        Ok(self
            .scheduler()
            .await?
            .list_allocations(ListAllocationsRequest {})
            .await
            .map_err(capstan_proto::into_error)?
            .into_inner()
            .allocations)
    }

    async fn start(
        &self,
        node_address: &str,
        request: StartInstanceRequest,
    ) -> Result<Instance, Error> {
        Ok(self
            .agent(node_address)
            .await?
            .start_instance(request)
            .await
            .map_err(capstan_proto::into_error)?
            .into_inner())
    }

    async fn stop(&self, node_address: &str, instance_id: &str) -> Result<(), Error> {
        self.agent(node_address)
            .await?
            .stop_instance(StopInstanceRequest {
                instance_id: instance_id.to_string(),
                grace_ms: STOP_GRACE.as_millis() as u64,
            })
            .await
            .map_err(capstan_proto::into_error)?;
        Ok(())
    }

    async fn sync_routes(&self, apps: Vec<String>) -> Result<(), Error> {
        RouterConfigClient::new(self.platform.client("router-config").await?)
            .sync(SyncRequest { apps })
            .await
            .map_err(capstan_proto::into_error)?;
        Ok(())
    }
}
