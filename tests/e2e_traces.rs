//! One deploy is one trace, from the CLI through the orchestrator, the
//! reconciler, the scheduler and the agent, with W3C trace context on gRPC
//! metadata: the spans arrive at a real OTLP/gRPC receiver (a tonic server
//! implementing the OpenTelemetry collector's TraceService) with their
//! parent links.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use capstan_testkit::otlp::{OtlpReceiver, ReceivedSpan};
use common::*;

#[test]
fn a_deploy_is_one_trace_from_the_cli_to_the_agent() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let receiver = runtime.block_on(OtlpReceiver::start());
    let endpoint = receiver.endpoint();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        // Export batches every 200 ms instead of 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let dev = Dev::start_with_env(None, &[], &env);
    let spec = spec_file(dev.data_dir(), "t.toml", &whoami_spec("traced", 1, "hi"));
    dev.ok(&["app", "deploy", "-f", &spec]);

    let wanted = [
        "/capstan.v1.Orchestrator/ApplyApp",
        "reconcile.start_instances",
        "/capstan.v1.Scheduler/Place",
        "/capstan.v1.Agent/StartInstance",
    ];
    let mut trace: Vec<ReceivedSpan> = Vec::new();
    wait_until("the deploy's spans arrive", Duration::from_secs(30), || {
        let spans = receiver.spans();
        let Some(root) = spans
            .iter()
            .find(|s| s.name == "capstan app deploy" && s.service == "capstan")
        else {
            return false;
        };
        trace = spans
            .iter()
            .filter(|s| s.trace_id == root.trace_id)
            .cloned()
            .collect();
        wanted
            .iter()
            .all(|name| trace.iter().any(|s| s.name == *name))
    });

    // One root, the CLI's; every other span's parent is in the same trace.
    let by_id: BTreeMap<&str, &ReceivedSpan> =
        trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let roots: Vec<&ReceivedSpan> = trace
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root: {trace:#?}");
    assert_eq!(roots[0].name, "capstan app deploy");
    for span in &trace {
        assert!(
            span.parent_span_id.is_empty() || by_id.contains_key(span.parent_span_id.as_str()),
            "{} has a parent outside the trace: {trace:#?}",
            span.name
        );
    }
    // The chain: CLI -> ApplyApp (orchestrator) -> the rollout's start ->
    // Place (scheduler) and StartInstance (agent).
    let parent_of = |name: &str| {
        let span = trace.iter().find(|s| s.name == name).unwrap();
        by_id
            .get(span.parent_span_id.as_str())
            .map(|p| p.name.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        parent_of("/capstan.v1.Orchestrator/ApplyApp"),
        "capstan app deploy"
    );
    assert_eq!(
        parent_of("reconcile.start_instances"),
        "/capstan.v1.Orchestrator/ApplyApp"
    );
    assert_eq!(
        parent_of("/capstan.v1.Scheduler/Place"),
        "reconcile.start_instances"
    );
    assert_eq!(
        parent_of("/capstan.v1.Agent/StartInstance"),
        "reconcile.start_instances"
    );
    let server = trace
        .iter()
        .find(|s| s.name == "/capstan.v1.Scheduler/Place")
        .unwrap();
    assert_eq!(server.service, "capstan-dev");
    assert!(
        server
            .attributes
            .iter()
            .any(|(k, v)| k == "rpc.service" && v == "scheduler"),
        "{server:?}"
    );
    drop(dev);
    drop(runtime);
}
