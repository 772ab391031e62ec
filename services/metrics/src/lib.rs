//! The metrics service. Agents send what each instance uses (CPU, memory,
//! restarts) and the edge proxy what each serves (requests, status classes,
//! a latency histogram), in batches, every sampling period. The service
//! stores every sample raw, rolls them up into 1-minute and 1-hour rows,
//! and answers range queries (`Query`), the latest readings (`Top`) and a
//! live stream (`Watch`).
//!
//! Rollups are mergeable (`model::Rollup`) and written per service
//! replica (`Row::writer`), so replicas need no coordination: each upserts
//! the rollups of what it ingested, every [`FLUSH_EVERY`], and reads merge
//! the rows of every writer.

pub mod contract;
pub mod model;
pub mod query;
pub mod scylla;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_authn::{Policy, RequireAuthLayer, Role, caller};
use capstan_proto::v1::metrics_server::{Metrics, MetricsServer};
use capstan_proto::v1::{
    Aggregate as WireAggregate, IngestRequest, IngestResponse, InstanceReadings, InstanceUsage,
    Point, QueryRequest, QueryResponse, Sample, Series, TopRequest, TopResponse, WatchRequest,
};
use capstan_server::{Platform, Service, now_ms};
use capstan_types::{AppName, Error, FieldError, InstanceId};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::model::{LATENCY_BUCKETS, Metric, Resolution, Rollup, Row, SeriesKey};
use crate::query::Aggregate;
pub use crate::store::{MetricsStore, RingStore, Selector};

/// Samples per `Ingest` call, at most.
pub const MAX_BATCH: usize = 10_000;
/// How often rollups of what was ingested are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// Samples may be this old when they arrive (an agent catching up), and
/// this far ahead (clock skew).
pub const MAX_AGE_MS: i64 = 3_600_000;
pub const MAX_SKEW_MS: i64 = 60_000;
/// `Top` reads this much of the recent past.
pub const TOP_WINDOW_MS: i64 = 30_000;
/// `Top` lists instances with a memory reading this recent.
pub const TOP_LIVE_MS: i64 = 12_000;
/// Open `Watch` streams, at most.
pub const MAX_WATCHERS: usize = 256;

/// One rollup being accumulated: its node, the rollup, and whether it
/// changed since it was last written.
struct Pending {
    node: String,
    rollup: Rollup,
    dirty: bool,
}

/// Rollups being accumulated, per series, then per (resolution, start):
/// a sample's series is looked up by reference, so the hot path copies a
/// key only for a series' first row of a bucket. Hashed with foldhash
/// (seeded per process): SipHash was a tenth of ingest's time, and the
/// keys come from authenticated reporters only.
#[derive(Default)]
struct Accumulator {
    series: HashMap<SeriesKey, Buckets, foldhash::fast::RandomState>,
}

type Buckets = HashMap<(Resolution, i64), Pending, foldhash::fast::RandomState>;

impl Accumulator {
    fn add(&mut self, row: &Row) {
        let buckets = match self.series.get_mut(&row.key) {
            Some(buckets) => buckets,
            None => self.series.entry(row.key.clone()).or_default(),
        };
        for resolution in [Resolution::Minute, Resolution::Hour] {
            let pending = buckets
                .entry((resolution, resolution.bucket(row.start_ms)))
                .or_insert_with(|| Pending {
                    node: row.node.clone(),
                    rollup: Rollup::empty(),
                    dirty: false,
                });
            pending.rollup.merge(&row.rollup);
            pending.dirty = true;
        }
    }

    /// The changed rollups, as rows of `writer`. A bucket is kept until no
    /// sample can be late for it any more ([`MAX_AGE_MS`] after it ended),
    /// so a late sample updates the row it belongs to instead of replacing
    /// it with a partial one.
    fn take(&mut self, writer: &str, now: i64) -> Vec<(Resolution, Row)> {
        let mut out = Vec::new();
        for (key, buckets) in self.series.iter_mut() {
            for ((resolution, start), pending) in buckets.iter_mut() {
                if pending.dirty {
                    pending.dirty = false;
                    out.push((
                        *resolution,
                        Row {
                            key: key.clone(),
                            start_ms: *start,
                            writer: writer.to_string(),
                            node: pending.node.clone(),
                            rollup: pending.rollup.clone(),
                        },
                    ));
                }
            }
            buckets.retain(|(resolution, start), pending| {
                pending.dirty || start + resolution.width_ms() + MAX_AGE_MS > now
            });
        }
        self.series.retain(|_, buckets| !buckets.is_empty());
        out
    }

    /// Marks a row that could not be written as changed, for the next flush.
    fn retry(&mut self, resolution: Resolution, row: &Row) {
        if let Some(pending) = self
            .series
            .get_mut(&row.key)
            .and_then(|b| b.get_mut(&(resolution, row.start_ms)))
        {
            pending.dirty = true;
        }
    }
}

#[derive(Clone)]
struct MetricsService {
    platform: Platform,
    store: Arc<dyn MetricsStore>,
    writer: String,
    accumulator: Arc<Mutex<Accumulator>>,
    live: tokio::sync::broadcast::Sender<Arc<Vec<Sample>>>,
    watchers: Arc<tokio::sync::Semaphore>,
    projects: Arc<AppProjects>,
}

/// Which project each app is in, as the orchestrator (the authority on
/// apps) says: what lets this service refuse a caller confined to one
/// project another project's metrics. Read at most every
/// [`AppProjects::FRESH`], and again when an app is not in the copy.
#[derive(Default)]
struct AppProjects {
    copy: tokio::sync::Mutex<Option<(tokio::time::Instant, ProjectOf)>>,
}

/// App → project.
type ProjectOf = Arc<HashMap<String, String>>;

impl AppProjects {
    const FRESH: Duration = Duration::from_secs(1);
    const RECHECK: Duration = Duration::from_millis(100);

    /// App → project; `app`: one the caller asks about, read afresh when
    /// the copy does not have it.
    async fn get(&self, platform: &Platform, app: Option<&str>) -> Result<ProjectOf, Error> {
        let mut copy = self.copy.lock().await;
        if let Some((at, map)) = copy.as_ref() {
            // An app not in the copy sends for a new one, but not more
            // than every [`Self::RECHECK`] (a deleted app still reporting).
            let missing = app.is_some_and(|app| !map.contains_key(app));
            let stale = at.elapsed() >= Self::FRESH || missing && at.elapsed() >= Self::RECHECK;
            if !stale {
                return Ok(map.clone());
            }
        }
        let channel = platform.client("orchestrator").await?;
        let apps = capstan_proto::v1::orchestrator_client::OrchestratorClient::new(channel)
            .list_apps(capstan_proto::v1::ListAppsRequest {})
            .await
            .map_err(|e| Error::Unavailable(format!("orchestrator: {}", e.message())))?
            .into_inner()
            .apps;
        let map: ProjectOf = Arc::new(
            apps.into_iter()
                .filter_map(|a| a.spec)
                .map(|s| (s.name, s.project))
                .collect(),
        );
        *copy = Some((tokio::time::Instant::now(), map.clone()));
        Ok(map)
    }
}

/// The metric a wire enum value names.
pub fn metric_from_wire(value: i32) -> Option<Metric> {
    use capstan_proto::v1::MetricName as Wire;
    Some(match Wire::try_from(value).ok()? {
        Wire::Unspecified => return None,
        Wire::CpuPercent => Metric::CpuPercent,
        Wire::MemoryBytes => Metric::MemoryBytes,
        Wire::Restarts => Metric::Restarts,
        Wire::Requests => Metric::Requests,
        Wire::Responses4xx => Metric::Responses4xx,
        Wire::Responses5xx => Metric::Responses5xx,
        Wire::LatencyMs => Metric::LatencyMs,
        Wire::NetRxBytes => Metric::NetRxBytes,
        Wire::NetTxBytes => Metric::NetTxBytes,
    })
}

/// One instance's readings checked and turned into raw rows, appended to
/// `rows` (the instance's strings are decoded once and moved into its last
/// row: ingest is the service's hot path); nothing is appended when a
/// field is wrong, and the problems go to `errors`, each named
/// `instances[i].field` or `instances[i].readings[j].field`.
fn parse_instance(
    index: usize,
    group: InstanceReadings,
    now: i64,
    node_caller: Option<&str>,
    errors: &mut Vec<FieldError>,
    rows: &mut Vec<Row>,
) {
    let field = |name: &str| format!("instances[{index}].{name}");
    let before = errors.len();
    let InstanceReadings {
        app,
        instance_id,
        node_id,
        at_ms,
        readings,
    } = group;
    let app = AppName::try_from(app)
        .map_err(|reason| errors.push(FieldError::new(field("app"), reason)))
        .ok();
    let instance = InstanceId::try_from(instance_id)
        .map_err(|reason| errors.push(FieldError::new(field("instance_id"), reason)))
        .ok();
    if let Some(node) = node_caller
        && node_id != node
    {
        errors.push(FieldError::new(
            field("node_id"),
            format!("an agent reports only its own node `{node}`"),
        ));
    } else if !node_id.is_empty()
        && let Err(reason) = capstan_types::spec::check_dns_label(&node_id)
    {
        errors.push(FieldError::new(field("node_id"), reason));
    }
    if at_ms < now - MAX_AGE_MS || at_ms > now + MAX_SKEW_MS {
        errors.push(FieldError::new(
            field("at_ms"),
            format!("must be within the last hour and at most a minute ahead of now ({now})"),
        ));
    }
    let mut parsed = Vec::with_capacity(readings.len());
    for (j, reading) in readings.into_iter().enumerate() {
        let field = |name: &str| format!("instances[{index}].readings[{j}].{name}");
        let Some(metric) = metric_from_wire(reading.metric) else {
            errors.push(FieldError::new(
                field("metric"),
                format!("unknown metric {}", reading.metric),
            ));
            continue;
        };
        if !reading.value.is_finite() || reading.value < 0.0 {
            errors.push(FieldError::new(
                field("value"),
                "must be a finite number >= 0",
            ));
            continue;
        }
        let want = if metric == Metric::LatencyMs {
            LATENCY_BUCKETS
        } else {
            0
        };
        if reading.buckets.len() != want {
            errors.push(FieldError::new(
                field("buckets"),
                format!(
                    "{} takes {want} bucket counts, not {}",
                    metric.name(),
                    reading.buckets.len()
                ),
            ));
            continue;
        }
        parsed.push((metric, reading.value, reading.buckets));
    }
    let (Some(app), Some(instance)) = (app, instance) else {
        return;
    };
    if errors.len() > before {
        return;
    }
    let (mut app, mut instance, mut node): (String, String, String) =
        (app.into(), instance.into(), node_id);
    let last = parsed.len().saturating_sub(1);
    for (k, (metric, value, buckets)) in parsed.into_iter().enumerate() {
        let (app, instance, node) = if k == last {
            (
                std::mem::take(&mut app),
                std::mem::take(&mut instance),
                std::mem::take(&mut node),
            )
        } else {
            (app.clone(), instance.clone(), node.clone())
        };
        rows.push(Row {
            key: SeriesKey {
                app,
                metric,
                instance,
            },
            start_ms: at_ms,
            writer: String::new(),
            node,
            rollup: Rollup::of(value, buckets),
        });
    }
}

/// A stored raw row as `Watch` streams it.
fn sample_of(row: &Row) -> Sample {
    Sample {
        app: row.key.app.clone(),
        instance_id: row.key.instance.clone(),
        node_id: row.node.clone(),
        at_ms: row.start_ms,
        metric: row.key.metric.name().to_string(),
        value: row.rollup.sum,
        buckets: row.rollup.buckets.clone(),
    }
}

fn aggregate_from_wire(value: i32) -> Result<Aggregate, Error> {
    match WireAggregate::try_from(value) {
        Ok(WireAggregate::Avg) => Ok(Aggregate::Avg),
        Ok(WireAggregate::Max) => Ok(Aggregate::Max),
        Ok(WireAggregate::Min) => Ok(Aggregate::Min),
        Ok(WireAggregate::Sum) => Ok(Aggregate::Sum),
        Ok(WireAggregate::Rate) => Ok(Aggregate::Rate),
        Ok(WireAggregate::P50) => Ok(Aggregate::Quantile(50)),
        Ok(WireAggregate::P95) => Ok(Aggregate::Quantile(95)),
        Ok(WireAggregate::P99) => Ok(Aggregate::Quantile(99)),
        _ => Err(Error::invalid(
            "aggregate",
            "required: avg, max, min, sum, rate, p50, p95 or p99",
        )),
    }
}

impl MetricsService {
    async fn ingest(
        &self,
        instances: Vec<InstanceReadings>,
        node_caller: Option<&str>,
    ) -> Result<u32, Error> {
        let readings: usize = instances.iter().map(|i| i.readings.len()).sum();
        if readings > MAX_BATCH || instances.len() > MAX_BATCH {
            return Err(Error::invalid(
                "instances",
                format!("{readings} readings in one batch; at most {MAX_BATCH}"),
            ));
        }
        let now = now_ms();
        let mut errors = Vec::new();
        let mut rows = Vec::with_capacity(readings);
        for (i, group) in instances.into_iter().enumerate() {
            parse_instance(i, group, now, node_caller, &mut errors, &mut rows);
        }
        if !errors.is_empty() {
            errors.truncate(20);
            return Err(Error::Invalid(errors));
        }
        self.store.write(Resolution::Raw, &rows).await?;
        {
            let mut accumulator = self.accumulator.lock().expect("accumulator lock poisoned");
            for row in &rows {
                accumulator.add(row);
            }
        }
        // Watchers get the samples; made only when someone watches.
        if self.live.receiver_count() > 0 {
            let _ = self
                .live
                .send(Arc::new(rows.iter().map(sample_of).collect()));
        }
        capstan_server::metrics::metrics()
            .metric_samples
            .inc_by(rows.len() as u64);
        Ok(rows.len() as u32)
    }

    /// Writes the rollups that changed since the last flush.
    async fn flush(&self) -> Result<usize, Error> {
        let rows = self
            .accumulator
            .lock()
            .expect("accumulator lock poisoned")
            .take(&self.writer, now_ms());
        let mut by_resolution: BTreeMap<Resolution, Vec<Row>> = BTreeMap::new();
        for (resolution, row) in rows {
            by_resolution.entry(resolution).or_default().push(row);
        }
        let mut written = 0;
        for (resolution, rows) in by_resolution {
            if let Err(e) = self.store.write(resolution, &rows).await {
                // Mark them changed again, so the next flush retries.
                let mut accumulator = self.accumulator.lock().expect("accumulator lock poisoned");
                for row in &rows {
                    accumulator.retry(resolution, row);
                }
                return Err(e);
            }
            written += rows.len();
        }
        Ok(written)
    }

    async fn query(&self, r: &QueryRequest) -> Result<QueryResponse, Error> {
        AppName::parse("app", &r.app)?;
        if !r.instance_id.is_empty() {
            InstanceId::parse("instance_id", &r.instance_id)?;
        }
        let metric = Metric::parse("metric", &r.metric)?;
        let aggregate = aggregate_from_wire(r.aggregate)?;
        aggregate.check(metric)?;
        let now = now_ms();
        let until = if r.until_ms == 0 { now } else { r.until_ms };
        if r.since_ms <= 0 {
            return Err(Error::invalid(
                "since_ms",
                "required: the start of the range, in ms since the epoch",
            ));
        }
        if r.since_ms >= until {
            return Err(Error::invalid("since_ms", "must be before until_ms"));
        }
        if until - r.since_ms > query::MAX_RANGE_MS {
            return Err(Error::invalid(
                "since_ms",
                "the range spans more than 90 days",
            ));
        }
        let (resolution, step) = query::plan(r.since_ms, until, r.step_ms, now);
        let selector = Selector {
            app: r.app.clone(),
            metric,
            instance: (!r.instance_id.is_empty()).then(|| r.instance_id.clone()),
        };
        let rows = self
            .store
            .read(resolution, &selector, r.since_ms, until)
            .await?;
        let series = query::points(&rows, r.since_ms, step, aggregate, r.by_instance)
            .into_iter()
            .map(|(instance, points)| Series {
                app: r.app.clone(),
                instance_id: if r.by_instance {
                    instance
                } else {
                    r.instance_id.clone()
                },
                metric: metric.name().to_string(),
                points: points
                    .into_iter()
                    .map(|(at_ms, value, count)| Point {
                        at_ms,
                        value,
                        count,
                    })
                    .collect(),
            })
            .collect();
        Ok(QueryResponse {
            series,
            resolution: resolution.name().to_string(),
            step_ms: step as u64,
        })
    }

    /// The latest readings of one app's instances.
    async fn top_of(&self, app: &str, now: i64) -> Result<Vec<InstanceUsage>, Error> {
        let from = now - TOP_WINDOW_MS;
        let mut usage: BTreeMap<String, InstanceUsage> = BTreeMap::new();
        for metric in [
            Metric::CpuPercent,
            Metric::MemoryBytes,
            Metric::Requests,
            Metric::LatencyMs,
            Metric::Restarts,
        ] {
            let selector = Selector {
                app: app.to_string(),
                metric,
                instance: None,
            };
            let from = if metric == Metric::Restarts {
                now - 3_600_000
            } else {
                from
            };
            let rows = self
                .store
                .read(Resolution::Raw, &selector, from, now + MAX_SKEW_MS)
                .await?;
            let mut latency: BTreeMap<String, Rollup> = BTreeMap::new();
            for row in rows {
                let entry =
                    usage
                        .entry(row.key.instance.clone())
                        .or_insert_with(|| InstanceUsage {
                            app: app.to_string(),
                            instance_id: row.key.instance.clone(),
                            ..Default::default()
                        });
                if !row.node.is_empty() {
                    entry.node_id = row.node.clone();
                }
                match metric {
                    Metric::CpuPercent => entry.cpu_percent = row.rollup.sum,
                    Metric::MemoryBytes => {
                        entry.memory_bytes = row.rollup.sum as u64;
                        entry.at_ms = entry.at_ms.max(row.start_ms);
                    }
                    Metric::Requests => entry.rps += row.rollup.sum * 1000.0 / TOP_WINDOW_MS as f64,
                    Metric::Restarts => entry.restarts += row.rollup.sum as u64,
                    Metric::LatencyMs => {
                        latency
                            .entry(row.key.instance.clone())
                            .and_modify(|r| r.merge(&row.rollup))
                            .or_insert(row.rollup);
                    }
                    _ => {}
                }
            }
            for (instance, rollup) in latency {
                if let Some(entry) = usage.get_mut(&instance) {
                    entry.p95_ms = rollup.quantile(0.95).unwrap_or_default();
                }
            }
        }
        // An instance the agents stopped reporting is gone (it is sampled
        // every period; two missed periods and some slack).
        Ok(usage
            .into_values()
            .filter(|u| u.at_ms >= now - TOP_LIVE_MS)
            .collect())
    }
}

impl MetricsService {
    /// PERMISSION_DENIED unless `caller` may read app `app`'s metrics: its
    /// project's, for a caller confined to one (an app that is gone is
    /// NOT_FOUND to such a caller).
    async fn check_app(&self, caller: &capstan_authn::Claims, app: &str) -> Result<(), Error> {
        let Some(own) = caller.project_scope() else {
            return Ok(());
        };
        match self.projects.get(&self.platform, Some(app)).await?.get(app) {
            Some(project) if project == own => Ok(()),
            Some(_) => Err(Error::PermissionDenied(format!(
                "app `{app}` is not in project `{own}`, the only one this key may read"
            ))),
            None => Err(Error::NotFound(format!("app `{app}`"))),
        }
    }
}

#[tonic::async_trait]
impl Metrics for MetricsService {
    async fn ingest(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        let claims = caller(&request).map_err(capstan_proto::status)?;
        let node = (claims.role == Role::Node).then(|| claims.sub.clone());
        let accepted = self
            .ingest(request.into_inner().instances, node.as_deref())
            .await
            .map_err(capstan_proto::status)?;
        Ok(Response::new(IngestResponse { accepted }))
    }

    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let caller = caller(&request).map_err(capstan_proto::status)?;
        AppName::parse("app", &request.get_ref().app).map_err(capstan_proto::status)?;
        self.check_app(caller, &request.get_ref().app)
            .await
            .map_err(capstan_proto::status)?;
        self.query(request.get_ref())
            .await
            .map(Response::new)
            .map_err(capstan_proto::status)
    }

    async fn top(&self, request: Request<TopRequest>) -> Result<Response<TopResponse>, Status> {
        let caller = caller(&request).map_err(capstan_proto::status)?;
        let app = &request.get_ref().app;
        let apps = if app.is_empty() {
            // Every app the caller may see.
            let mut apps: Vec<String> = self
                .projects
                .get(&self.platform, None)
                .await
                .map_err(capstan_proto::status)?
                .iter()
                .filter(|(_, project)| caller.in_project(project))
                .map(|(app, _)| app.clone())
                .collect();
            apps.sort();
            apps
        } else {
            AppName::parse("app", app).map_err(capstan_proto::status)?;
            self.check_app(caller, app)
                .await
                .map_err(capstan_proto::status)?;
            vec![app.clone()]
        };
        let now = now_ms();
        let mut instances = Vec::new();
        for app in apps {
            instances.extend(
                self.top_of(&app, now)
                    .await
                    .map_err(capstan_proto::status)?,
            );
        }
        Ok(Response::new(TopResponse { instances }))
    }

    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<Sample, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // A stream lives no longer than the token that opened it.
        let caller = caller(&request).map_err(capstan_proto::status)?.clone();
        let expires_ms = caller.exp.saturating_mul(1000);
        let app = request.into_inner().app;
        if !app.is_empty() {
            AppName::parse("app", &app).map_err(capstan_proto::status)?;
            self.check_app(&caller, &app)
                .await
                .map_err(capstan_proto::status)?;
        }
        // A caller confined to a project watching every app sees its
        // project's: the map is read again when a sample names an app it
        // does not hold.
        let confined = caller.project_scope().map(|own| {
            (
                own.to_string(),
                self.projects.clone(),
                self.platform.clone(),
            )
        });
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_WATCHERS} watchers are open already; retry later"
            ))
        })?;
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(expires_ms.saturating_sub(now_ms()).max(0) as u64);
        let live = self.live.subscribe();
        let state = (
            live,
            app,
            deadline,
            std::collections::VecDeque::<Sample>::new(),
            false,
            (permit, confined),
        );
        let stream = futures::stream::unfold(state, |mut state| async move {
            let (live, app, deadline, pending, ended, (_, confined)) = &mut state;
            if *ended {
                return None;
            }
            loop {
                if let Some(sample) = pending.pop_front() {
                    return Some((Ok(sample), state));
                }
                let received = tokio::select! {
                    received = live.recv() => received,
                    _ = tokio::time::sleep_until(*deadline) => {
                        *ended = true;
                        return Some((Err(Status::unauthenticated("token expired; watch again with a fresh token")), state));
                    }
                };
                match received {
                    Ok(batch) => {
                        let mut visible: Vec<Sample> = batch
                            .iter()
                            .filter(|s| app.is_empty() || s.app == *app)
                            .cloned()
                            .collect();
                        if let (true, Some((own, projects, platform))) = (app.is_empty(), &confined)
                        {
                            let unknown = visible
                                .iter()
                                .find(|s| !s.app.is_empty())
                                .map(|s| s.app.clone());
                            match projects.get(platform, unknown.as_deref()).await {
                                Ok(map) => visible.retain(|s| map.get(&s.app) == Some(own)),
                                Err(_) => visible.clear(),
                            }
                        }
                        pending.extend(visible);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        return Some((
                            Err(Status::data_loss(format!(
                                "missed {n} batches; watch again"
                            ))),
                            state,
                        ));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Agents and the edge proxy report; readers read; the orchestrator's
/// autoscaler queries as a service.
pub fn policy() -> Policy {
    Policy::new()
        .reporters("/capstan.v1.Metrics/Ingest")
        .users(
            "/capstan.v1.Metrics/Query",
            capstan_authn::Access::Read,
            true,
        )
        .read("/capstan.v1.Metrics/Top")
        .read("/capstan.v1.Metrics/Watch")
}

/// Serves the metrics service on `listener` until `shutdown`, storing in
/// `store`; flushes rollups every [`FLUSH_EVERY`] and once more on the way
/// out.
pub async fn run(
    platform: Platform,
    store: Arc<dyn MetricsStore>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let service = MetricsService {
        platform: platform.clone(),
        store,
        writer: capstan_server::new_id("metrics"),
        accumulator: Arc::default(),
        live: tokio::sync::broadcast::channel(256).0,
        watchers: Arc::new(tokio::sync::Semaphore::new(MAX_WATCHERS)),
        projects: Arc::default(),
    };
    let flusher = service.clone();
    let flush_shutdown = shutdown.clone();
    let flushing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = flush_shutdown.cancelled() => true,
                _ = tick.tick() => false,
            };
            if let Err(e) = flusher.flush().await {
                tracing::warn!("metric rollups not written, retrying: {e}");
            }
            if stopping {
                return;
            }
        }
    });
    let grpc = Service {
        name: "metrics",
        instance_id: service.writer.clone(),
        grpc_names: vec!["capstan.v1.Metrics"],
        routes: tonic::service::Routes::new(MetricsServer::new(service)),
        auth: RequireAuthLayer::new(platform.verifier(), policy()),
    };
    let result = capstan_server::serve(&platform, grpc, listener, shutdown).await;
    let _ = flushing.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(readings: Vec<(i32, f64)>) -> InstanceReadings {
        InstanceReadings {
            app: "web".into(),
            instance_id: "web-1".into(),
            node_id: "node-1".into(),
            at_ms: now_ms(),
            readings: readings
                .into_iter()
                .map(|(metric, value)| capstan_proto::v1::Reading {
                    metric,
                    value,
                    buckets: if metric == MetricName::LatencyMs as i32 {
                        vec![0; LATENCY_BUCKETS]
                    } else {
                        vec![]
                    },
                })
                .collect(),
        }
    }

    fn parse(
        index: usize,
        group: InstanceReadings,
        node_caller: Option<&str>,
    ) -> (Vec<Row>, Vec<String>) {
        let (mut errors, mut rows) = (Vec::new(), Vec::new());
        parse_instance(index, group, now_ms(), node_caller, &mut errors, &mut rows);
        (rows, errors.into_iter().map(|e| e.field).collect())
    }

    use capstan_proto::v1::MetricName;
    const CPU: i32 = MetricName::CpuPercent as i32;

    #[test]
    fn bad_readings_are_named_by_index_and_field() {
        let mut bad = instance(vec![(CPU, f64::NAN), (42, 1.0), (CPU, 1.0)]);
        bad.app = "Bad App".into();
        bad.at_ms = now_ms() - 2 * MAX_AGE_MS;
        let (rows, fields) = parse(4, bad, None);
        assert!(rows.is_empty());
        assert_eq!(
            fields,
            vec![
                "instances[4].app",
                "instances[4].at_ms",
                "instances[4].readings[0].value",
                "instances[4].readings[1].metric"
            ]
        );

        let mut short = instance(vec![(MetricName::LatencyMs as i32, 1.0)]);
        short.readings[0].buckets.pop();
        let (rows, fields) = parse(0, short, None);
        assert!(rows.is_empty());
        assert_eq!(fields, vec!["instances[0].readings[0].buckets"]);

        let mut traversal = instance(vec![(CPU, 1.0)]);
        traversal.instance_id = "../../etc".into();
        traversal.node_id = "Node 1".into();
        let (_, fields) = parse(0, traversal, None);
        assert_eq!(
            fields,
            vec!["instances[0].instance_id", "instances[0].node_id"]
        );

        let (rows, fields) = parse(0, instance(vec![(CPU, 5.0)]), Some("node-2"));
        assert!(rows.is_empty());
        assert_eq!(
            fields,
            vec!["instances[0].node_id"],
            "an agent reports only its own node"
        );

        let (rows, fields) = parse(
            0,
            instance(vec![(CPU, 5.0), (MetricName::MemoryBytes as i32, 7.0)]),
            Some("node-1"),
        );
        assert!(fields.is_empty(), "{fields:?}");
        let seen: Vec<_> = rows
            .iter()
            .map(|row| {
                (
                    row.key.app.as_str(),
                    row.key.instance.as_str(),
                    row.node.as_str(),
                    row.key.metric,
                    row.rollup.sum,
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("web", "web-1", "node-1", Metric::CpuPercent, 5.0),
                ("web", "web-1", "node-1", Metric::MemoryBytes, 7.0)
            ],
            "every reading gets the instance's names, the last one too"
        );
    }

    #[test]
    fn every_wire_metric_maps_to_one_metric() {
        let mapped: Vec<Metric> = (1..=9).filter_map(metric_from_wire).collect();
        assert_eq!(mapped, Metric::ALL.to_vec());
        assert_eq!(metric_from_wire(0), None);
        assert_eq!(metric_from_wire(10), None);
    }

    #[test]
    fn the_accumulator_writes_what_changed_once() {
        let mut accumulator = Accumulator::default();
        let key = SeriesKey {
            app: "web".into(),
            metric: Metric::Requests,
            instance: "web-1".into(),
        };
        let now = 10 * 3_600_000 + 5_000;
        let row = |at: i64, value: f64| Row {
            key: key.clone(),
            start_ms: at,
            writer: String::new(),
            node: "n".into(),
            rollup: Rollup::of(value, Vec::new()),
        };
        accumulator.add(&row(now, 3.0));
        accumulator.add(&row(now + 1_000, 4.0));
        let rows = accumulator.take("w", now);
        assert_eq!(rows.len(), 2, "one minute row and one hour row");
        assert!(
            rows.iter()
                .all(|(_, r)| r.rollup.sum == 7.0 && r.rollup.count == 2 && r.writer == "w")
        );
        assert!(
            accumulator.take("w", now).is_empty(),
            "nothing changed since"
        );
        accumulator.add(&row(now + 2_000, 1.0));
        let again = accumulator.take("w", now);
        assert!(
            again.iter().all(|(_, r)| r.rollup.sum == 8.0),
            "a rollup row is cumulative"
        );
        // A row that could not be written goes out again.
        accumulator.retry(
            Resolution::Minute,
            &again
                .iter()
                .find(|(r, _)| *r == Resolution::Minute)
                .unwrap()
                .1,
        );
        assert_eq!(accumulator.take("w", now).len(), 1);
        // Long after its bucket closed, a written row is forgotten.
        accumulator.take("w", now + 2 * 3_600_000 + MAX_AGE_MS);
        assert!(accumulator.series.is_empty());
    }
}
