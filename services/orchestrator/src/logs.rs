//! `AppLogs`: what an app's instances printed, from the agents that run
//! them, merged by time.
//!
//! History first: the last `tail` lines of each instance (since
//! `since_ms`), from every agent at once, sorted by time. With `follow`,
//! each instance's agent is then asked again from the last line seen (the
//! lines of that same millisecond already sent are skipped), and new lines
//! go out as they arrive, until the token that opened the stream expires.
//! Instances started after the stream began are not followed.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;

use capstan_proto::v1::agent_client::AgentClient;
use capstan_proto::v1::scheduler_client::SchedulerClient;
use capstan_proto::v1::{AppLogsRequest, InstanceLogsRequest, ListNodesRequest, LogLine};
use capstan_rollout::records::InstanceRecord;
use capstan_server::Platform;
use capstan_types::{AppName, Error, InstanceId};
use futures::StreamExt;
use tonic::Status;

pub type LogStream = Pin<Box<dyn futures::Stream<Item = Result<LogLine, Status>> + Send>>;

/// Lines of each instance when `tail` is 0, and at most.
pub const DEFAULT_TAIL: u32 = 100;
pub const MAX_TAIL: u32 = 10_000;

/// The request checked: field errors name the field.
pub fn check(r: &AppLogsRequest) -> Result<(), Error> {
    AppName::parse("app", &r.app)?;
    if !r.instance_id.is_empty() {
        InstanceId::parse("instance_id", &r.instance_id)?;
    }
    if r.tail > MAX_TAIL {
        return Err(Error::invalid(
            "tail",
            format!("{} lines; at most {MAX_TAIL}", r.tail),
        ));
    }
    if r.since_ms < 0 {
        return Err(Error::invalid(
            "since_ms",
            "must be >= 0 (ms since the epoch)",
        ));
    }
    Ok(())
}

/// The instances of `app` to read (`only`: that one), each with the
/// address of its node's agent.
pub async fn targets(
    platform: &Platform,
    records: Vec<InstanceRecord>,
    app: &str,
    only: &str,
) -> Result<Vec<(String, String)>, Error> {
    let mut mine: Vec<InstanceRecord> = records.into_iter().filter(|r| r.app == app).collect();
    if !only.is_empty() {
        mine.retain(|r| r.id == only);
        if mine.is_empty() {
            return Err(Error::NotFound(format!("instance `{only}` of app `{app}`")));
        }
    }
    let nodes = SchedulerClient::new(platform.client("scheduler").await?)
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(capstan_proto::into_error)?
        .into_inner()
        .nodes;
    let address: HashMap<String, String> = nodes.into_iter().map(|n| (n.id, n.address)).collect();
    Ok(mine
        .into_iter()
        .filter_map(|r| Some((r.id, address.get(&r.node_id)?.clone())))
        .collect())
}

async fn open(
    platform: &Platform,
    address: &str,
    request: InstanceLogsRequest,
) -> Result<tonic::Streaming<LogLine>, Status> {
    let channel = platform
        .client_at(address)
        .await
        .map_err(capstan_proto::status)?;
    Ok(AgentClient::new(channel).logs(request).await?.into_inner())
}

/// The history of every target, merged by time; unreachable agents are
/// left out (their instances have no lines to show now).
async fn history(
    platform: &Platform,
    targets: &[(String, String)],
    tail: u32,
    since_ms: i64,
) -> Vec<LogLine> {
    let reads = targets.iter().map(|(instance, address)| async move {
        let request = InstanceLogsRequest {
            instance_id: instance.clone(),
            tail,
            since_ms,
            follow: false,
        };
        match open(platform, address, request).await {
            Ok(stream) => {
                stream
                    .filter_map(|l| async move { l.ok() })
                    .collect::<Vec<_>>()
                    .await
            }
            Err(e) => {
                tracing::debug!(instance = %instance, "logs not read: {}", e.message());
                Vec::new()
            }
        }
    });
    let mut lines: Vec<LogLine> = futures::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .collect();
    // Stable: each instance's lines keep their order within a millisecond.
    lines.sort_by_key(|l| l.at_ms);
    lines
}

/// The stream `AppLogs` answers with.
pub async fn stream(
    platform: Platform,
    targets: Vec<(String, String)>,
    r: AppLogsRequest,
    deadline: tokio::time::Instant,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> LogStream {
    let tail = if r.tail == 0 { DEFAULT_TAIL } else { r.tail };
    let past = history(&platform, &targets, tail, r.since_ms).await;
    if !r.follow {
        return Box::pin(futures::stream::iter(past.into_iter().map(Ok)));
    }
    // Where each instance's history ended, and what of that millisecond it held.
    let mut last: HashMap<String, (i64, HashSet<String>)> = HashMap::new();
    for line in &past {
        let entry = last
            .entry(line.instance_id.clone())
            .or_insert((line.at_ms, HashSet::new()));
        if line.at_ms > entry.0 {
            *entry = (line.at_ms, HashSet::new());
        }
        entry.1.insert(line.text.clone());
    }
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<LogLine, Status>>(256);
    for (instance, address) in targets {
        let (from, mut seen) = last
            .remove(&instance)
            .unwrap_or((r.since_ms.max(capstan_server::now_ms()), HashSet::new()));
        let (platform, sender) = (platform.clone(), sender.clone());
        tokio::spawn(async move {
            let request = InstanceLogsRequest {
                instance_id: instance.clone(),
                tail: 0,
                since_ms: from,
                follow: true,
            };
            let Ok(mut lines) = open(&platform, &address, request).await else {
                return;
            };
            loop {
                let line = tokio::select! {
                    _ = sender.closed() => return,
                    line = lines.next() => line,
                };
                match line {
                    Some(Ok(line)) => {
                        if line.at_ms == from && seen.remove(&line.text) {
                            continue;
                        }
                        if sender.send(Ok(line)).await.is_err() {
                            return;
                        }
                    }
                    // The instance went away, or its agent did.
                    _ => return,
                }
            }
        });
    }
    drop(sender);
    let live = futures::stream::unfold(
        (receiver, deadline, false, permit),
        |(mut receiver, deadline, ended, permit)| async move {
            if ended {
                return None;
            }
            tokio::select! {
                line = receiver.recv() => line.map(|l| (l, (receiver, deadline, false, permit))),
                _ = tokio::time::sleep_until(deadline) => Some((
                    Err(Status::unauthenticated("token expired; ask again with a fresh token")),
                    (receiver, deadline, true, permit),
                )),
            }
        },
    );
    Box::pin(futures::stream::iter(past.into_iter().map(Ok)).chain(live))
}
