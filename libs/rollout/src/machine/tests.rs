use capstan_types::spec::SpecFormat;
use capstan_types::{AppSpec, InstanceState};
use proptest::prelude::*;

use super::*;
use crate::records::Backoff;

fn spec(greeting: &str) -> AppSpec {
    AppSpec::parse(
        &format!(
            "name = \"web\"\nreplicas = 2\n[run]\ncommand = [\"serve\"]\n[env]\nG = \"{greeting}\"\n[update]\nprogress_deadline = \"60s\"\n"
        ),
        SpecFormat::Toml,
    )
    .unwrap()
}

/// An app mid-rollout from `stable` (if any) to `greeting`'s template.
fn rolling(greeting: &str, stable: Option<&str>) -> AppRecord {
    let target = spec(greeting);
    AppRecord {
        spec_hash: target.template_hash(),
        rollout: Rollout::start(target.template_hash(), 0),
        spec: target,
        stable: stable.map(spec),
        deleting: false,
        backoff: Backoff::default(),
        placement_error: String::new(),
        created_ms: 0,
        updated_ms: 0,
        autoscale_override: None,
        previous: Vec::new(),
    }
}

fn serving(id: &str, hash: &str) -> InstanceView {
    InstanceView {
        id: id.into(),
        spec_hash: hash.into(),
        state: InstanceState::Healthy,
        routable: true,
        stopping: false,
        migrating: false,
    }
}

fn written(next: Next) -> (AppRecord, Vec<(EventKind, String)>) {
    match next {
        Next::Write { app, events } => (*app, events),
        other => panic!("expected a write, got {other:?}"),
    }
}

#[test]
fn a_rollout_completes_when_every_replica_of_the_target_serves() {
    let app = rolling("v2", Some("v1"));
    let hash = app.spec_hash.clone();
    let (next, events) = written(advance(
        &app,
        &[serving("a", &hash), serving("b", &hash)],
        &Progress::default(),
        1_000,
    ));
    assert_eq!(next.rollout.state, RolloutState::Completed);
    assert_eq!(next.stable.as_ref(), Some(&next.spec));
    assert_eq!(events[0].0, EventKind::RolloutCompleted);
    // Advancing the completed app again does nothing.
    let hashes = [serving("a", &hash), serving("b", &hash)];
    assert_eq!(
        advance(&next, &hashes, &Progress::default(), 2_000),
        Next::Unchanged
    );
}

#[test]
fn three_failures_roll_back_to_the_stable_template_or_fail_without_one() {
    let app = rolling("v2", Some("v1"));
    let failing = Progress {
        failures: ROLLOUT_MAX_FAILURES,
        ..Progress::default()
    };
    let (next, events) = written(advance(&app, &[], &failing, 1_000));
    assert_eq!(next.rollout.state, RolloutState::RolledBack);
    assert_eq!(next.spec, spec("v1"));
    assert_eq!(next.spec_hash, spec("v1").template_hash());
    assert_eq!(events[0].0, EventKind::RolloutRolledBack);

    let first = rolling("v1", None);
    let (next, events) = written(advance(&first, &[], &failing, 1_000));
    assert_eq!(next.rollout.state, RolloutState::Failed);
    assert_eq!(events[0].0, EventKind::RolloutFailed);
}

#[test]
fn a_stalled_rollout_rolls_back() {
    let app = rolling("v2", Some("v1"));
    let (next, _) = written(advance(&app, &[], &Progress::default(), 61_000));
    assert_eq!(next.rollout.state, RolloutState::RolledBack);
    assert!(
        next.rollout.message.contains("no progress within 60s"),
        "{}",
        next.rollout.message
    );
}

#[test]
fn a_deleted_app_goes_once_its_instances_have() {
    let mut app = rolling("v1", None);
    app.deleting = true;
    assert_eq!(
        advance(&app, &[serving("a", "x")], &Progress::default(), 0),
        Next::Unchanged
    );
    assert_eq!(advance(&app, &[], &Progress::default(), 0), Next::Delete);
}

proptest! {
    #[test]
    fn backoff_grows_and_stays_bounded(failures in 0u32..10_000) {
        prop_assert!(backoff_ms(failures) <= BACKOFF_MAX_MS);
        prop_assert!(backoff_ms(failures) <= backoff_ms(failures.saturating_add(1)));
        prop_assert!(backoff_ms(failures) >= 500);
    }

    /// Whatever happened, advancing again with nothing new at the same time
    /// changes nothing: the machine is idempotent.
    #[test]
    fn advancing_twice_with_nothing_new_changes_nothing(
        failures in 0u32..5,
        became_healthy in any::<bool>(),
        with_stable in any::<bool>(),
        serving_new in 0u32..4,
        serving_old in 0u32..3,
        now in 0i64..200_000,
    ) {
        let app = rolling("v2", with_stable.then_some("v1"));
        let target = app.spec_hash.clone();
        let mut instances: Vec<InstanceView> =
            (0..serving_new).map(|i| serving(&format!("n{i}"), &target)).collect();
        instances.extend((0..serving_old).map(|i| serving(&format!("o{i}"), "old")));
        let progress = Progress { failures, became_healthy, placement_error: None };
        let once = match advance(&app, &instances, &progress, now) {
            Next::Write { app, .. } => *app,
            Next::Unchanged => app.clone(),
            Next::Delete => unreachable!("not deleting"),
        };
        prop_assert_eq!(advance(&once, &instances, &Progress::default(), now), Next::Unchanged);
        prop_assert!(once.backoff.until_ms <= now + BACKOFF_MAX_MS);
        // A rollback always lands on a template that existed before.
        if once.rollout.state == RolloutState::RolledBack {
            prop_assert_eq!(Some(&once.spec), app.stable.as_ref());
        }
    }
}
