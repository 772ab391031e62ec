//! The gRPC adapter of the apps API: wire types in and out, domain rules in
//! between, errors mapped by `capstan_proto::status`.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use capstan_authn::{Access, Claims};
use capstan_proto::v1::orchestrator_server::Orchestrator;
use capstan_proto::v1::{
    AppEndpoints, AppStatus, ApplyAppRequest, ApplyAppResponse, DeleteAppRequest,
    DeleteAppResponse, Endpoint, GetAppHistoryRequest, GetAppHistoryResponse, GetAppRequest,
    JournalEntry, ListAppsRequest, ListAppsResponse, ListEndpointsRequest, ListEndpointsResponse,
    ListEventsRequest, ListEventsResponse, ResumeAutoscaleRequest, ScaleAppRequest, ScaleOverride,
    WakeAppRequest, WakeAppResponse, WatchEventsRequest,
};
use capstan_server::{Platform, new_id, now_ms};
use capstan_store::{Expect, StoreError, Table};
use capstan_types::spec::MAX_REPLICAS;
use capstan_types::{AppName, Error, Event, EventKind, InstanceState};
use futures::Stream;
use futures::future::join_all;
use tonic::{Request, Response, Status};

use crate::changes::Changes;
use crate::event_log::EventLog;
use crate::records::{
    APPS, AppRecord, INSTANCES, InstanceRecord, Rollout, RolloutState,
    ScaleOverride as ScaleOverrideRecord,
};

/// Most `WatchEvents` streams open at once; one more is RESOURCE_EXHAUSTED.
pub const MAX_WATCHERS: usize = 64;

pub struct Api {
    platform: Platform,
    watchers: Arc<tokio::sync::Semaphore>,
    apps: Table<AppRecord>,
    instances: Table<InstanceRecord>,
    events: EventLog,
    journal: crate::journal::Journal,
    changes: Arc<Changes>,
}

fn status(e: Error) -> Status {
    capstan_proto::status(e)
}

fn store_err(e: StoreError) -> Status {
    match e {
        StoreError::Conflict { key, .. } => status(Error::Conflict(format!(
            "app `{key}` changed concurrently; retry"
        ))),
        other => status(Error::internal(other)),
    }
}

fn rollout_to_wire(rollout: &Rollout, desired: u32) -> capstan_proto::v1::Rollout {
    use capstan_proto::v1::RolloutState as W;
    let state = match rollout.state {
        RolloutState::InProgress => W::InProgress,
        RolloutState::Completed => W::Completed,
        RolloutState::RolledBack => W::RolledBack,
        RolloutState::Failed => W::Failed,
    };
    capstan_proto::v1::Rollout {
        state: state as i32,
        target_hash: rollout.target_hash.clone(),
        message: rollout.message.clone(),
        updated: rollout.updated,
        desired,
    }
}

fn instance_to_wire(record: &InstanceRecord) -> capstan_proto::v1::Instance {
    capstan_proto::v1::Instance {
        id: record.id.clone(),
        app: record.app.clone(),
        node_id: record.node_id.clone(),
        spec_hash: record.spec_hash.clone(),
        state: capstan_proto::state_to_wire(if record.stopping {
            InstanceState::Stopping
        } else {
            record.state
        }) as i32,
        address: record.address.clone(),
        routable: record.routable,
        message: record.message.clone(),
        updated_at_ms: record.updated_ms,
    }
}

/// What a caller without write access sees of env values.
pub const REDACTED: &str = "<redacted>";

/// The wire status of `app`, from all instance records. Env values are
/// shown only to `show_env` callers (those who may change them anyway).
fn app_status(app: &AppRecord, version: u64, all: &[InstanceRecord], show_env: bool) -> AppStatus {
    let mut instances: Vec<&InstanceRecord> = all
        .iter()
        .filter(|r| r.app == app.spec.name.as_str())
        .collect();
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    let healthy = instances
        .iter()
        .filter(|r| r.state == InstanceState::Healthy && !r.stopping)
        .count() as u32;
    let mut rollout = rollout_to_wire(&app.rollout, app.spec.replicas);
    if !app.placement_error.is_empty() && rollout.message.is_empty() {
        rollout.message.clone_from(&app.placement_error);
    }
    let mut spec = capstan_proto::spec_to_wire(&app.spec);
    if !show_env {
        for value in spec.env.values_mut() {
            *value = REDACTED.to_string();
        }
    }
    AppStatus {
        spec: Some(spec),
        version,
        spec_hash: app.spec_hash.clone(),
        rollout: Some(rollout),
        instances: instances.iter().map(|r| instance_to_wire(r)).collect(),
        healthy,
        created_at_ms: app.created_ms,
        updated_at_ms: app.updated_ms,
        deleting: app.deleting,
        placement_error: app.placement_error.clone(),
        autoscale_override: app.autoscale_override.as_ref().map(|o| ScaleOverride {
            by: o.by.clone(),
            at_ms: o.at_ms,
            replicas: o.replicas,
        }),
        previous_templates: rollback_targets(app)
            .iter()
            .map(|s| s.template_hash())
            .collect(),
    }
}

/// Starts a rollout of `app`'s spec as it is now (a restart, a rollback):
/// a fresh rollout in this request's trace, no stale placement problem or
/// backoff. Returns the template hash.
fn roll_out(app: &mut AppRecord, now: i64) -> String {
    let hash = app.spec.template_hash();
    app.spec_hash = hash.clone();
    app.rollout = Rollout {
        trace: capstan_telemetry::traceparent(),
        ..Rollout::start(hash.clone(), now)
    };
    app.placement_error.clear();
    app.backoff = Default::default();
    app.updated_ms = now;
    hash
}

/// The templates an app can roll back to, newest first: the stable one
/// while another is rolling out, then the earlier ones.
fn rollback_targets(app: &AppRecord) -> Vec<&capstan_types::AppSpec> {
    let mut targets: Vec<&capstan_types::AppSpec> = Vec::new();
    for spec in app.stable.iter().chain(app.previous.iter()) {
        let hash = spec.template_hash();
        if hash != app.spec_hash && targets.iter().all(|t| t.template_hash() != hash) {
            targets.push(spec);
        }
    }
    targets
}

fn check_name(name: &str) -> Result<AppName, Status> {
    AppName::parse("name", name).map_err(status)
}

/// An optional app filter: empty means every app.
fn check_filter(app: &str) -> Result<(), Status> {
    if !app.is_empty() {
        AppName::parse("app", app).map_err(status)?;
    }
    Ok(())
}

fn caller<T>(request: &Request<T>) -> Result<Claims, Status> {
    capstan_authn::caller(request).cloned().map_err(status)
}

/// PERMISSION_DENIED unless `caller` may touch what is in `project`.
fn check_project(caller: &Claims, app: &str, project: &str) -> Result<(), Status> {
    caller.check_project(app, project).map_err(status)
}

/// Whether the caller may see env values: only roles that may write them.
fn sees_env(caller: &Claims) -> bool {
    caller.role.allows(Access::Write)
}

impl Api {
    pub fn new(platform: Platform, events: EventLog, changes: Arc<Changes>) -> Self {
        Api {
            apps: Table::new(platform.store.clone(), APPS),
            instances: Table::new(platform.store.clone(), INSTANCES),
            journal: crate::journal::Journal::new(platform.store.clone()),
            platform,
            watchers: Arc::new(tokio::sync::Semaphore::new(MAX_WATCHERS)),
            events,
            changes,
        }
    }

    async fn app_status(
        &self,
        app: &AppRecord,
        version: u64,
        show_env: bool,
    ) -> Result<AppStatus, Status> {
        // Instance ids are `{app}-{hex}` (`new_id`): the app's records are
        // under that prefix (with those of apps named `{app}-...`, which
        // `app_status` leaves out), so one app's status reads only its own.
        let prefix = format!("{}-", app.spec.name);
        let instances = self.instances.values(&prefix).await.map_err(store_err)?;
        Ok(app_status(app, version, &instances, show_env))
    }

    /// The live app `name`, if `caller` may touch its project.
    async fn load(&self, caller: &Claims, name: &str) -> Result<(u64, AppRecord), Status> {
        check_name(name)?;
        match self.apps.get(name).await.map_err(store_err)? {
            Some((version, app)) if !app.deleting => {
                check_project(caller, name, app.spec.project_name())?;
                Ok((version, app))
            }
            _ => Err(status(Error::NotFound(format!("app `{name}`")))),
        }
    }

    /// Whether `caller` may read what is recorded of app `name` (events,
    /// history): an app in its project; for a caller confined to a project,
    /// an app that is gone is NOT_FOUND (its project is not known).
    async fn readable(&self, caller: &Claims, name: &str) -> Result<(), Status> {
        if caller.project_scope().is_none() {
            return Ok(());
        }
        match self.apps.get(name).await.map_err(store_err)? {
            Some((_, app)) => check_project(caller, name, app.spec.project_name()),
            None => Err(status(Error::NotFound(format!("app `{name}`")))),
        }
    }

    /// Starts the audit record of a change to app `name`, about the app's
    /// project when it exists (else the caller's).
    async fn begin_audit<T>(
        &self,
        request: &Request<T>,
        method: &str,
        name: &str,
    ) -> capstan_server::audit::Pending {
        let mut audit = capstan_server::audit::begin(request, method, name);
        if AppName::parse("name", name).is_ok()
            && let Ok(Some((_, app))) = self.apps.get(name).await
        {
            audit.project(app.spec.project_name());
        }
        audit
    }

    /// The project of every app, for filtering what a confined caller sees.
    async fn projects(&self) -> Result<std::collections::HashMap<String, String>, Status> {
        Ok(self
            .apps
            .list("")
            .await
            .map_err(store_err)?
            .into_iter()
            .map(|(name, _, app)| (name, app.spec.project_name().to_string()))
            .collect())
    }

    /// Records a change `caller` made.
    async fn emit(&self, kind: EventKind, app: &str, message: String, caller: &Claims) {
        self.platform
            .emit(
                Event::new(new_id("ev"), now_ms(), kind)
                    .app(app)
                    .message(message)
                    .actor(&caller.sub, caller.role.as_str()),
            )
            .await;
    }
}

/// One open `WatchEvents` stream; holds a watcher slot until dropped.
struct Watch {
    live: tokio::sync::broadcast::Receiver<Event>,
    seen: HashSet<String>,
    app: String,
    /// For a caller confined to a project: which apps are in it.
    confined: Option<Confined>,
    deadline: tokio::time::Instant,
    ended: bool,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// What a watcher confined to `project` may see: events of its apps.
struct Confined {
    project: String,
    apps: Table<AppRecord>,
    /// App → in the project, as looked up (an app's project never changes).
    known: std::collections::HashMap<String, bool>,
}

impl Confined {
    async fn sees(&mut self, app: &str) -> bool {
        if let Some(seen) = self.known.get(app) {
            return *seen;
        }
        let seen = match self.apps.get(app).await {
            Ok(Some((_, record))) => record.spec.project_name() == self.project,
            // Gone or unreadable: not shown (and looked up again next time).
            _ => return false,
        };
        self.known.insert(app.to_string(), seen);
        seen
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<capstan_proto::v1::Event, Status>> + Send>>;

#[tonic::async_trait]
impl Orchestrator for Api {
    async fn apply_app(
        &self,
        request: Request<ApplyAppRequest>,
    ) -> Result<Response<ApplyAppResponse>, Status> {
        let name = request
            .get_ref()
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let mut audit = self
            .begin_audit(&request, "Orchestrator/ApplyApp", &name)
            .await;
        let asked = request.get_ref().spec.as_ref().map(|s| s.project.as_str());
        match asked.filter(|p| !p.is_empty()) {
            Some(project) => audit.project(project),
            // A new app an admin deploys without naming a project.
            None if !audit.has_project() => audit.project(capstan_types::spec::DEFAULT_PROJECT),
            None => {}
        }
        let mut summary = String::new();
        let result = self.apply_app_inner(request, &mut summary).await;
        audit.finish(&self.platform.store, &result, summary).await;
        result
    }

    async fn get_app(
        &self,
        request: Request<GetAppRequest>,
    ) -> Result<Response<AppStatus>, Status> {
        let caller = caller(&request)?;
        let show_env = sees_env(&caller);
        let name = request.into_inner().name;
        check_name(&name)?;
        // Deleting apps are shown, so a client can wait until they are gone.
        let (version, app) = self
            .apps
            .get(&name)
            .await
            .map_err(store_err)?
            .ok_or_else(|| status(Error::NotFound(format!("app `{name}`"))))?;
        check_project(&caller, &name, app.spec.project_name())?;
        Ok(Response::new(
            self.app_status(&app, version, show_env).await?,
        ))
    }

    async fn list_apps(
        &self,
        request: Request<ListAppsRequest>,
    ) -> Result<Response<ListAppsResponse>, Status> {
        let caller = caller(&request)?;
        let show_env = sees_env(&caller);
        let instances = self.instances.values("").await.map_err(store_err)?;
        let apps = self
            .apps
            .list("")
            .await
            .map_err(store_err)?
            .into_iter()
            .filter(|(_, _, app)| !app.deleting && caller.in_project(app.spec.project_name()))
            .map(|(_, version, app)| app_status(&app, version, &instances, show_env))
            .collect();
        Ok(Response::new(ListAppsResponse { apps }))
    }

    async fn scale_app(
        &self,
        request: Request<ScaleAppRequest>,
    ) -> Result<Response<AppStatus>, Status> {
        let audit = self
            .begin_audit(&request, "Orchestrator/ScaleApp", &request.get_ref().name)
            .await;
        let summary = format!("replicas {}", request.get_ref().replicas);
        let result = self.scale_app_inner(request).await;
        audit.finish(&self.platform.store, &result, summary).await;
        result
    }

    async fn delete_app(
        &self,
        request: Request<DeleteAppRequest>,
    ) -> Result<Response<DeleteAppResponse>, Status> {
        let audit = self
            .begin_audit(&request, "Orchestrator/DeleteApp", &request.get_ref().name)
            .await;
        let summary = String::new();
        let result = self.delete_app_inner(request).await;
        audit.finish(&self.platform.store, &result, summary).await;
        result
    }

    async fn get_app_history(
        &self,
        request: Request<GetAppHistoryRequest>,
    ) -> Result<Response<GetAppHistoryResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let name = AppName::parse("app", &r.app).map_err(status)?;
        self.readable(&caller, &name).await?;
        let limit = match r.limit {
            0 => 50,
            n => (n as usize).min(crate::journal::MAX_LIMIT),
        };
        let entries = self
            .journal
            .recent(name.as_str(), limit)
            .await
            .map_err(status)?;
        Ok(Response::new(GetAppHistoryResponse {
            entries: entries
                .into_iter()
                .map(|e| JournalEntry {
                    id: e.id,
                    app: e.app,
                    at_ms: e.at_ms,
                    kind: e.kind,
                    inputs: e.inputs.into_iter().collect(),
                    rule: e.rule,
                    result: e.result,
                    reason: e.reason,
                })
                .collect(),
        }))
    }

    async fn resume_autoscale(
        &self,
        request: Request<ResumeAutoscaleRequest>,
    ) -> Result<Response<AppStatus>, Status> {
        let audit = self
            .begin_audit(
                &request,
                "Orchestrator/ResumeAutoscale",
                &request.get_ref().name,
            )
            .await;
        let summary = String::new();
        let result = self.resume_autoscale_inner(request).await;
        audit.finish(&self.platform.store, &result, summary).await;
        result
    }

    async fn wake_app(
        &self,
        request: Request<WakeAppRequest>,
    ) -> Result<Response<WakeAppResponse>, Status> {
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        check_name(&name)?;
        let now = now_ms();
        let woken = self
            .apps
            .update(&name, |current| {
                let app = current?;
                let autoscale = app.spec.autoscale.as_ref()?;
                if app.deleting || app.spec.replicas > 0 || app.autoscale_override.is_some() {
                    return None;
                }
                let mut next = app.clone();
                next.spec.replicas = autoscale.min.max(1);
                next.updated_ms = now;
                Some(next)
            })
            .await
            .map_err(store_err)?;
        let Some((_, app)) = woken else {
            return Ok(Response::new(WakeAppResponse { woken: false }));
        };
        let to = app.spec.replicas;
        self.platform
            .emit(
                Event::new(new_id("ev"), now, EventKind::AppScaled)
                    .app(&name)
                    .message(format!("0 → {to} replicas: woken by a request"))
                    .actor(&caller.sub, caller.role.as_str()),
            )
            .await;
        self.journal
            .record(
                crate::journal::JournalEntry::new(&name, now, "autoscale")
                    .input("replicas", 0)
                    .rule("wake on demand: a request for an app at zero starts the minimum of one")
                    .result(format!("0 -> {to}"))
                    .reason(format!("scaled 0 -> {to}: a request arrived while at zero")),
            )
            .await;
        self.changes.app(&name);
        Ok(Response::new(WakeAppResponse { woken: true }))
    }

    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        check_filter(&r.app)?;
        let limit = if r.limit == 0 { 100 } else { r.limit.min(5000) } as usize;
        let events = if !r.app.is_empty() {
            self.readable(&caller, &r.app).await?;
            self.events.recent(&r.app, limit).await.map_err(status)?
        } else if caller.project_scope().is_none() {
            self.events.recent("", limit).await.map_err(status)?
        } else {
            // A confined caller sees the events of its project's apps: read
            // more and keep theirs (the log is bounded, so this is too).
            let projects = self.projects().await?;
            let mut events: Vec<Event> = self
                .events
                .recent("", 5000)
                .await
                .map_err(status)?
                .into_iter()
                .filter(|e| projects.get(&e.app).is_some_and(|p| caller.in_project(p)))
                .collect();
            if events.len() > limit {
                events.drain(..events.len() - limit);
            }
            events
        };
        Ok(Response::new(ListEventsResponse {
            events: events.iter().map(capstan_proto::event_to_wire).collect(),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn restart_app(
        &self,
        request: Request<capstan_proto::v1::RestartAppRequest>,
    ) -> Result<Response<AppStatus>, Status> {
        let audit = self
            .begin_audit(&request, "Orchestrator/RestartApp", &request.get_ref().name)
            .await;
        let summary = String::new();
        let result = self.restart_app_inner(request).await;
        audit.finish(&self.platform.store, &result, summary).await;
        result
    }

    async fn rollback_app(
        &self,
        request: Request<capstan_proto::v1::RollbackAppRequest>,
    ) -> Result<Response<AppStatus>, Status> {
        let audit = self
            .begin_audit(
                &request,
                "Orchestrator/RollbackApp",
                &request.get_ref().name,
            )
            .await;
        let summary = match request.get_ref().to_template.as_str() {
            "" => "to the template before".to_string(),
            to => format!("to template {to}"),
        };
        let result = self.rollback_app_inner(request).await;
        audit.finish(&self.platform.store, &result, summary).await;
        result
    }

    type AppLogsStream = crate::logs::LogStream;

    async fn app_logs(
        &self,
        request: Request<capstan_proto::v1::AppLogsRequest>,
    ) -> Result<Response<Self::AppLogsStream>, Status> {
        // A followed stream lives no longer than the token that opened it.
        let caller = caller(&request)?;
        let expires_ms = caller.exp.saturating_mul(1000);
        let r = request.into_inner();
        crate::logs::check(&r).map_err(status)?;
        self.load(&caller, &r.app).await?;
        let permit = if r.follow {
            Some(self.watchers.clone().try_acquire_owned().map_err(|_| {
                status(Error::ResourceExhausted(format!(
                    "{MAX_WATCHERS} event and log watchers are open already; retry later"
                )))
            })?)
        } else {
            None
        };
        let records = self.instances.values("").await.map_err(store_err)?;
        let targets = crate::logs::targets(&self.platform, records, &r.app, &r.instance_id)
            .await
            .map_err(status)?;
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_millis(expires_ms.saturating_sub(now_ms()).max(0) as u64);
        Ok(Response::new(
            crate::logs::stream(self.platform.clone(), targets, r, deadline, permit).await,
        ))
    }

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // A stream lives no longer than the token that opened it.
        let caller = caller(&request)?;
        let expires_ms = caller.exp.saturating_mul(1000);
        let r = request.into_inner();
        check_filter(&r.app)?;
        if !r.app.is_empty() {
            self.readable(&caller, &r.app).await?;
        }
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            status(Error::ResourceExhausted(format!(
                "{MAX_WATCHERS} event watchers are open already; retry later"
            )))
        })?;
        // Subscribe before reading history, so nothing falls between the two.
        let live = self.events.subscribe();
        let mut history = self
            .events
            .recent(&r.app, r.history.min(5000) as usize)
            .await
            .map_err(status)?;
        let confined = caller.project_scope().map(|project| Confined {
            project: project.to_string(),
            apps: self.apps.clone(),
            known: Default::default(),
        });
        if let Some(confined) = &confined {
            let projects = self.projects().await?;
            history.retain(|e| projects.get(&e.app).is_some_and(|p| *p == confined.project));
        }
        let seen: HashSet<String> = history.iter().map(|e| e.id.clone()).collect();
        let history = futures::stream::iter(
            history
                .into_iter()
                .map(|e| Ok(capstan_proto::event_to_wire(&e))),
        );
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_millis(expires_ms.saturating_sub(now_ms()).max(0) as u64);
        let watch = Watch {
            live,
            seen,
            app: r.app,
            confined,
            deadline,
            ended: false,
            _permit: permit,
        };
        let live = futures::stream::unfold(watch, |mut watch| async move {
            if watch.ended {
                return None;
            }
            loop {
                let received = tokio::select! {
                    received = watch.live.recv() => received,
                    _ = tokio::time::sleep_until(watch.deadline) => {
                        watch.ended = true;
                        let expired = Status::unauthenticated(
                            "token expired; watch again with a fresh token",
                        );
                        return Some((Err(expired), watch));
                    }
                };
                match received {
                    Ok(event) => {
                        let visible = match &mut watch.confined {
                            Some(confined) => confined.sees(&event.app).await,
                            None => true,
                        };
                        if visible
                            && (watch.app.is_empty() || event.app == watch.app)
                            && watch.seen.insert(event.id.clone())
                        {
                            return Some((Ok(capstan_proto::event_to_wire(&event)), watch));
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let lagged = Status::data_loss(format!("missed {n} events; watch again"));
                        return Some((Err(lagged), watch));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        let stream: EventStream = Box::pin(futures::StreamExt::chain(history, live));
        Ok(Response::new(stream))
    }

    async fn list_endpoints(
        &self,
        request: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let caller = caller(&request)?;
        let asked = AppName::parse_list("apps", &request.into_inner().apps).map_err(status)?;
        // The routable instances by app, in one pass over the records (or
        // over the asked apps' own): the table is rebuilt on every instance
        // change, so this must not be apps × instances.
        let mut routable: std::collections::HashMap<String, Vec<Endpoint>> = Default::default();
        let records = if asked.is_empty() {
            self.instances.values("").await.map_err(store_err)?
        } else {
            let reads = asked.iter().map(|name| async move {
                // An app's instance ids start with its name (see `app_status`).
                self.instances.values(&format!("{name}-")).await
            });
            let mut records = Vec::new();
            for read in join_all(reads).await {
                records.extend(read.map_err(store_err)?);
            }
            records
        };
        for r in records {
            if r.in_routes() {
                routable.entry(r.app).or_default().push(Endpoint {
                    instance_id: r.id,
                    address: r.address,
                });
            }
        }
        let app_records = if asked.is_empty() {
            self.apps
                .list("")
                .await
                .map_err(store_err)?
                .into_iter()
                .map(|(_, _, app)| app)
                .collect::<Vec<_>>()
        } else {
            let reads = asked
                .iter()
                .map(|name| async move { self.apps.get(name).await });
            let mut apps = Vec::new();
            for read in join_all(reads).await {
                apps.extend(read.map_err(store_err)?.map(|(_, app)| app));
            }
            apps
        };
        let mut apps = Vec::new();
        for app in app_records {
            if app.deleting
                || app.spec.route.hosts.is_empty()
                || !caller.in_project(app.spec.project_name())
            {
                continue;
            }
            let endpoints = routable.remove(app.spec.name.as_str()).unwrap_or_default();
            let health = &app.spec.health;
            apps.push(AppEndpoints {
                app: app.spec.name.to_string(),
                project: app.spec.project_name().to_string(),
                hosts: app.spec.route.hosts.clone(),
                endpoints,
                health_path: match &health.check {
                    capstan_types::HealthCheck::Http { path } => path.clone(),
                    capstan_types::HealthCheck::Tcp => String::new(),
                },
                health_interval_ms: health.interval.as_millis() as u64,
                health_timeout_ms: health.timeout.as_millis() as u64,
                wakeable: app
                    .spec
                    .autoscale
                    .as_ref()
                    .is_some_and(|a| a.min == 0 && a.scale_to_zero_after.is_some())
                    // Scaled to zero by hand: that stands.
                    && app.autoscale_override.is_none(),
            });
        }
        Ok(Response::new(ListEndpointsResponse { apps }))
    }
}

/// The mutating calls' bodies; the trait methods record each in the
/// audit log around them.
impl Api {
    /// The project a deploy of `spec` puts its app in, or why it may not:
    /// an existing app stays in its project (whose callers the caller has
    /// already been checked against); a new one goes where the spec says
    /// (which must exist and be the caller's), else into the caller's
    /// project.
    async fn project_of_deploy(
        &self,
        caller: &Claims,
        spec: &capstan_types::AppSpec,
        existing: Option<&AppRecord>,
    ) -> Result<capstan_types::ProjectName, Status> {
        let name = spec.name.as_str();
        if let Some(app) = existing.filter(|app| !app.deleting) {
            let current = app.spec.project_name();
            if let Some(asked) = spec.project.as_deref().filter(|asked| *asked != current) {
                return Err(status(Error::invalid(
                    "project",
                    format!(
                        "app `{name}` is in project `{current}`, not `{asked}`: an app does not move between projects (delete it, then deploy it there)"
                    ),
                )));
            }
            return capstan_types::ProjectName::parse("project", current).map_err(status);
        }
        let project = match (&spec.project, caller.project_scope()) {
            (Some(asked), Some(own)) if asked.as_str() != own => {
                return Err(status(Error::PermissionDenied(format!(
                    "project: this key may deploy only into project `{own}`, not `{asked}`"
                ))));
            }
            (Some(asked), _) => asked.clone(),
            (None, Some(own)) => {
                capstan_types::ProjectName::parse("project", own).map_err(status)?
            }
            (None, None) => {
                capstan_types::ProjectName::parse("project", capstan_types::spec::DEFAULT_PROJECT)
                    .map_err(status)?
            }
        };
        capstan_server::projects::require(&self.platform.store, "project", &project)
            .await
            .map_err(status)?;
        Ok(project)
    }

    /// `summary`: what the deploy changes, for the audit log, once known.
    async fn apply_app_inner(
        &self,
        request: Request<ApplyAppRequest>,
        summary: &mut String,
    ) -> Result<Response<ApplyAppResponse>, Status> {
        let caller = caller(&request)?;
        let wire = request
            .into_inner()
            .spec
            .ok_or_else(|| status(Error::invalid("spec", "missing")))?;
        // Read once, before the spec is looked at: another project's app is
        // refused first, since what is wrong with its spec is none of this
        // caller's business. (A name that does not parse fails below.)
        let existing = match AppName::parse("name", &wire.name) {
            Ok(name) => self.apps.get(&name).await.map_err(store_err)?,
            Err(_) => None,
        };
        if let Some((_, app)) = existing.as_ref().filter(|(_, app)| !app.deleting) {
            check_project(&caller, &wire.name, app.spec.project_name())?;
        }
        let mut spec = capstan_proto::spec_from_wire(wire).map_err(status)?;
        let project = self
            .project_of_deploy(&caller, &spec, existing.as_ref().map(|(_, app)| app))
            .await?;
        spec.project = Some(project);
        // Admission: what weakens isolation is the admin's to deploy.
        let privileged = spec.privileged_fields();
        if !privileged.is_empty() && caller.role != capstan_authn::Role::Admin {
            let fields: Vec<String> = privileged.iter().map(ToString::to_string).collect();
            return Err(status(Error::PermissionDenied(fields.join("; "))));
        }
        let now = now_ms();
        // Restarts are the platform's count: a deploy keeps the app's.
        spec.restarts = match &existing {
            Some((_, app)) if !app.deleting => app.spec.restarts,
            _ => 0,
        };
        let hash = spec.template_hash();
        // An autoscaled app keeps the count the autoscaler reached (within
        // the new bounds); `replicas` is where a new one starts.
        if let Some(autoscale) = &spec.autoscale {
            let start = match &existing {
                Some((_, app)) if app.spec.autoscale.is_some() && !app.deleting => {
                    app.spec.replicas
                }
                _ => spec.replicas,
            };
            spec.replicas = autoscale.clamp(start);
        }
        *summary = spec.changes_from(
            existing
                .as_ref()
                .filter(|(_, app)| !app.deleting)
                .map(|(_, app)| &app.spec),
        );
        let (record, expect, created, changed, rollout_started) = match existing {
            Some((_, app)) if app.deleting => {
                return Err(status(Error::FailedPrecondition(format!(
                    "app `{}` is being deleted; apply it again once it is gone",
                    spec.name
                ))));
            }
            None => {
                let record = AppRecord {
                    spec: spec.clone(),
                    spec_hash: hash.clone(),
                    stable: None,
                    rollout: Rollout {
                        trace: capstan_telemetry::traceparent(),
                        ..Rollout::start(hash.clone(), now)
                    },
                    deleting: false,
                    backoff: Default::default(),
                    placement_error: String::new(),
                    created_ms: now,
                    updated_ms: now,
                    autoscale_override: None,
                    previous: Vec::new(),
                };
                (record, Expect::Absent, true, true, true)
            }
            Some((version, mut app)) => {
                // A deploy ends a manual override of the autoscaler, whether
                // or not the spec changed.
                let overridden = app.autoscale_override.take().is_some();
                let changed = app.spec != spec || overridden;
                let rollout_started = hash != app.spec_hash
                    || app.rollout.state != RolloutState::Completed
                        && hash != app.rollout.target_hash;
                if rollout_started {
                    app.rollout = Rollout {
                        trace: capstan_telemetry::traceparent(),
                        ..Rollout::start(hash.clone(), now)
                    };
                    // The old template's placement problem says nothing
                    // about the new one.
                    app.placement_error.clear();
                }
                app.spec = spec.clone();
                app.spec_hash = hash.clone();
                app.backoff = Default::default();
                app.updated_ms = now;
                (
                    app,
                    Expect::Version(version),
                    false,
                    changed,
                    rollout_started,
                )
            }
        };
        let mut version = match expect {
            Expect::Version(version) => version,
            _ => 0,
        };
        if changed {
            version = self
                .apps
                .put(&spec.name, &record, expect)
                .await
                .map_err(store_err)?;
            if created {
                self.emit(
                    EventKind::AppCreated,
                    &spec.name,
                    format!("{} replicas", spec.replicas),
                    &caller,
                )
                .await;
            } else {
                self.emit(
                    EventKind::AppUpdated,
                    &spec.name,
                    format!("template {hash}"),
                    &caller,
                )
                .await;
            }
            if rollout_started {
                self.emit(
                    EventKind::RolloutStarted,
                    &spec.name,
                    format!("to template {hash}"),
                    &caller,
                )
                .await;
            }
            self.changes.app(&spec.name);
        }
        let app = self.app_status(&record, version, true).await?;
        Ok(Response::new(ApplyAppResponse {
            app: Some(app),
            created,
            changed,
        }))
    }

    async fn scale_app_inner(
        &self,
        request: Request<ScaleAppRequest>,
    ) -> Result<Response<AppStatus>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        if r.replicas > MAX_REPLICAS {
            return Err(status(Error::invalid(
                "replicas",
                format!("must be between 0 and {MAX_REPLICAS}, got {}", r.replicas),
            )));
        }
        let (mut version, mut app) = self.load(&caller, &r.name).await?;
        // By hand, an autoscaled app's count is the caller's until the
        // next deploy or ResumeAutoscale.
        let overrides = app.spec.autoscale.is_some()
            && app.autoscale_override.as_ref().map(|o| o.replicas) != Some(r.replicas);
        if overrides {
            app.autoscale_override = Some(ScaleOverrideRecord {
                by: caller.sub.clone(),
                at_ms: now_ms(),
                replicas: r.replicas,
            });
            self.journal
                .record(
                    crate::journal::JournalEntry::new(&r.name, now_ms(), "autoscale")
                        .input("replicas", app.spec.replicas)
                        .input("by", &caller.sub)
                        .rule("a manual scale overrides the autoscaler until the next deploy or `capstan app autoscale NAME --resume`")
                        .result(format!("{} -> {}", app.spec.replicas, r.replicas))
                        .reason(format!(
                            "autoscaling paused: scaled {} -> {} by hand ({})",
                            app.spec.replicas, r.replicas, caller.sub
                        )),
                )
                .await;
        }
        if app.spec.replicas != r.replicas || overrides {
            let from = app.spec.replicas;
            app.spec.replicas = r.replicas;
            app.updated_ms = now_ms();
            version = self
                .apps
                .put(&r.name, &app, Expect::Version(version))
                .await
                .map_err(store_err)?;
            self.emit(
                EventKind::AppScaled,
                &r.name,
                format!("{from} → {} replicas", r.replicas),
                &caller,
            )
            .await;
            self.changes.app(&r.name);
        }
        Ok(Response::new(self.app_status(&app, version, true).await?))
    }

    async fn delete_app_inner(
        &self,
        request: Request<DeleteAppRequest>,
    ) -> Result<Response<DeleteAppResponse>, Status> {
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        let (version, mut app) = self.load(&caller, &name).await?;
        app.deleting = true;
        app.updated_ms = now_ms();
        self.apps
            .put(&name, &app, Expect::Version(version))
            .await
            .map_err(store_err)?;
        self.emit(EventKind::AppDeleted, &name, String::new(), &caller)
            .await;
        self.changes.app(&name);
        Ok(Response::new(DeleteAppResponse {}))
    }

    async fn resume_autoscale_inner(
        &self,
        request: Request<ResumeAutoscaleRequest>,
    ) -> Result<Response<AppStatus>, Status> {
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        let (mut version, mut app) = self.load(&caller, &name).await?;
        if app.spec.autoscale.is_none() {
            return Err(status(Error::FailedPrecondition(format!(
                "app `{name}` has no [autoscale] section: its replicas are set by `app scale`"
            ))));
        }
        if let Some(previous) = app.autoscale_override.take() {
            app.updated_ms = now_ms();
            version = self
                .apps
                .put(&name, &app, Expect::Version(version))
                .await
                .map_err(store_err)?;
            self.journal
                .record(
                    crate::journal::JournalEntry::new(&name, now_ms(), "autoscale")
                        .input("replicas", app.spec.replicas)
                        .input("by", &caller.sub)
                        .rule("resume: the autoscaler decides the count again")
                        .result("resumed")
                        .reason(format!(
                            "autoscaling resumed by {} (paused since {} scaled to {})",
                            caller.sub, previous.by, previous.replicas
                        )),
                )
                .await;
            self.emit(
                EventKind::AppUpdated,
                &name,
                "autoscaling resumed".into(),
                &caller,
            )
            .await;
        }
        Ok(Response::new(self.app_status(&app, version, true).await?))
    }

    async fn restart_app_inner(
        &self,
        request: Request<capstan_proto::v1::RestartAppRequest>,
    ) -> Result<Response<AppStatus>, Status> {
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        let (version, mut app) = self.load(&caller, &name).await?;
        let now = now_ms();
        app.spec.restarts = app.spec.restarts.saturating_add(1);
        let hash = roll_out(&mut app, now);
        let version = self
            .apps
            .put(&name, &app, Expect::Version(version))
            .await
            .map_err(store_err)?;
        self.emit(
            EventKind::RolloutStarted,
            &name,
            format!("rolling restart {} to template {hash}", app.spec.restarts),
            &caller,
        )
        .await;
        self.changes.app(&name);
        Ok(Response::new(self.app_status(&app, version, true).await?))
    }

    async fn rollback_app_inner(
        &self,
        request: Request<capstan_proto::v1::RollbackAppRequest>,
    ) -> Result<Response<AppStatus>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let is_hash =
            |t: &str| t.len() == 16 && t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !r.to_template.is_empty() && !is_hash(&r.to_template) {
            return Err(status(Error::invalid(
                "to_template",
                "a template hash: 16 lowercase hex digits (see `capstan app status`)",
            )));
        }
        let (version, mut app) = self.load(&caller, &r.name).await?;
        let targets = rollback_targets(&app);
        let target = if r.to_template.is_empty() {
            targets.first().copied().ok_or_else(|| {
                status(Error::FailedPrecondition(format!(
                    "app `{}` has no earlier template to roll back to",
                    r.name
                )))
            })?
        } else if r.to_template == app.spec_hash {
            return Err(status(Error::FailedPrecondition(format!(
                "app `{}` is at template {} already",
                r.name, r.to_template
            ))));
        } else {
            let known: Vec<String> = targets.iter().map(|t| t.template_hash()).collect();
            targets
                .iter()
                .find(|t| t.template_hash() == r.to_template)
                .copied()
                .ok_or_else(|| {
                    status(Error::NotFound(format!(
                        "template {} of app `{}`; earlier templates: {}",
                        r.to_template,
                        r.name,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    )))
                })?
        };
        // The template is the target's; scale, routes and policies stay.
        let spec = capstan_types::AppSpec {
            run: target.run.clone(),
            resources: target.resources,
            ports: target.ports.clone(),
            env: target.env.clone(),
            health: target.health.clone(),
            placement: target.placement.clone(),
            restarts: target.restarts,
            ..app.spec.clone()
        };
        let from = app.spec_hash.clone();
        let now = now_ms();
        app.spec = spec;
        let hash = roll_out(&mut app, now);
        let version = self
            .apps
            .put(&r.name, &app, Expect::Version(version))
            .await
            .map_err(store_err)?;
        self.journal
            .record(
                crate::journal::JournalEntry::new(&r.name, now, "rollback")
                    .input("from", &from)
                    .input("by", &caller.sub)
                    .rule(
                        "a rollback by hand returns the template; scale, routes and policies stay",
                    )
                    .result(format!("{from} -> {hash}"))
                    .reason(format!(
                        "rolled back by hand to template {hash} ({})",
                        caller.sub
                    )),
            )
            .await;
        self.emit(
            EventKind::RolloutStarted,
            &r.name,
            format!("rollback from template {from} to {hash}"),
            &caller,
        )
        .await;
        self.changes.app(&r.name);
        Ok(Response::new(self.app_status(&app, version, true).await?))
    }
}
