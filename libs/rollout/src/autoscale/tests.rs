use proptest::prelude::*;

use super::*;

fn policy() -> Policy {
    Policy {
        min: 1,
        max: 10,
        target_cpu_percent: None,
        target_rps_per_instance: Some(200.0),
        target_p95_ms: None,
        scale_up_cooldown_ms: 15_000,
        scale_down_cooldown_ms: 120_000,
        stabilization_ms: 60_000,
        scale_to_zero_after_ms: None,
    }
}

fn seen(at_ms: i64, current: u32, rps_per_instance: f64) -> Observation {
    Observation {
        at_ms,
        current,
        cpu_percent: None,
        rps_per_instance: Some(rps_per_instance),
        p95_ms: None,
        idle_ms: None,
    }
}

#[test]
fn the_ratio_rule_scales_up_and_says_why() {
    let mut state = State::default();
    let decision = decide(&policy(), &mut state, &seen(0, 2, 400.0), false);
    let Decision::Scale {
        from,
        to,
        reason,
        rule,
    } = decision
    else {
        panic!("{decision:?}");
    };
    assert_eq!((from, to), (2, 4));
    assert_eq!(reason, "scaled 2 -> 4: rps 400/instance > target 200");
    assert!(rule.contains("within [1, 10]"), "{rule}");
}

#[test]
fn the_tolerance_band_holds_and_the_largest_target_wins() {
    let mut state = State::default();
    let decision = decide(&policy(), &mut state, &seen(0, 4, 215.0), false);
    assert!(matches!(decision, Decision::Hold { .. }), "{decision:?}");
    let both = Policy {
        target_cpu_percent: Some(50.0),
        ..policy()
    };
    let observation = Observation {
        cpu_percent: Some(150.0),
        ..seen(0, 2, 250.0)
    };
    let Decision::Scale { to, reason, .. } =
        decide(&both, &mut State::default(), &observation, false)
    else {
        panic!("no scale");
    };
    assert_eq!(to, 6, "cpu asks 6, rps asks 3: {reason}");
    assert!(reason.contains("cpu 150%"), "{reason}");
}

#[test]
fn bounds_rollouts_and_missing_readings() {
    let mut state = State::default();
    let Decision::Scale { to, .. } = decide(&policy(), &mut state, &seen(0, 8, 2_000.0), false)
    else {
        panic!("no scale");
    };
    assert_eq!(to, 10, "never past max");
    let decision = decide(&policy(), &mut State::default(), &seen(0, 3, 5_000.0), true);
    assert_eq!(
        decision,
        Decision::Hold {
            reason: "paused: a rollout is in progress".into()
        }
    );
    let blind = Observation {
        rps_per_instance: None,
        ..seen(0, 3, 0.0)
    };
    assert!(matches!(
        decide(&policy(), &mut State::default(), &blind, false),
        Decision::Hold { .. }
    ));
    // Outside the bounds (min raised by a deploy): back inside at once.
    let raised = Policy { min: 4, ..policy() };
    let Decision::Scale { to, reason, .. } =
        decide(&raised, &mut State::default(), &seen(0, 2, 0.0), false)
    else {
        panic!("no scale");
    };
    assert_eq!(to, 4);
    assert!(reason.contains("below min"), "{reason}");
}

#[test]
fn scale_down_waits_for_the_stabilisation_window_and_the_cooldown() {
    let policy = policy();
    let mut state = State::default();
    // Busy, then idle: the scale-up is immediate.
    assert!(matches!(
        decide(&policy, &mut state, &seen(0, 2, 500.0), false),
        Decision::Scale { to: 5, .. }
    ));
    // Idle from 5 s on: held through the down cooldown (2 min), since the
    // window still remembers the high recommendation at first.
    let mut t = 5_000;
    while t < 120_000 {
        let decision = decide(&policy, &mut state, &seen(t, 5, 10.0), false);
        assert!(
            matches!(decision, Decision::Hold { .. }),
            "at {t}: {decision:?}"
        );
        t += 5_000;
    }
    let decision = decide(&policy, &mut state, &seen(t, 5, 10.0), false);
    let Decision::Scale { to, reason, .. } = decision else {
        panic!("no scale-down at {t}: {decision:?}");
    };
    assert_eq!(to, 1);
    assert!(
        reason.starts_with("scaled 5 -> 1: rps 10/instance < target 200 for "),
        "{reason}"
    );
}

/// A load trace: total requests per second at each 5 s sample.
fn trace() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(
        prop_oneof![0.0..50.0f64, 50.0..2_000.0f64, 2_000.0..10_000.0f64],
        1..120,
    )
}

proptest! {
    #[test]
    fn a_load_trace_never_flaps_and_keeps_the_bounds(
        load in trace(),
        min in 1u32..4,
        span in 0u32..8,
        start in 1u32..12,
        rolling_every in prop::option::of(3usize..20),
    ) {
        let policy = Policy { min, max: min + span, ..policy() };
        let mut state = State::default();
        let mut current = start.clamp(policy.min, policy.max);
        let mut changes: Vec<(i64, bool)> = Vec::new();
        for (step, total) in load.iter().enumerate() {
            let at = step as i64 * 5_000;
            let rolling_out = rolling_every.is_some_and(|n| step % n == 0);
            let decision = decide(&policy, &mut state, &seen(at, current, total / f64::from(current)), rolling_out);
            if let Decision::Scale { from, to, .. } = decision {
                prop_assert!(!rolling_out, "scaled during a rollout");
                prop_assert_eq!(from, current);
                prop_assert!((policy.min..=policy.max).contains(&to), "{} outside [{}, {}]", to, policy.min, policy.max);
                let up = to > from;
                if let Some((last, was_up)) = changes.last() {
                    let cooldown = if up { policy.scale_up_cooldown_ms } else { policy.scale_down_cooldown_ms };
                    prop_assert!(at - last >= cooldown, "changed {} ms after the last change", at - last);
                    if *was_up != up {
                        prop_assert!(at - last >= policy.stabilization_ms, "flapped within {} ms", at - last);
                    }
                }
                changes.push((at, up));
                current = to;
            }
        }
    }
}

#[test]
fn an_idle_app_goes_to_zero_only_after_scale_to_zero_after_and_wakes_on_demand() {
    let zero = Policy {
        min: 0,
        scale_to_zero_after_ms: Some(300_000),
        ..policy()
    };
    let mut state = State::default();
    // No traffic, but not idle long enough: the ratio rule keeps one.
    let quiet = Observation {
        idle_ms: Some(200_000),
        ..seen(1_000_000, 2, 0.0)
    };
    match decide(&zero, &mut state, &quiet, false) {
        Decision::Hold { .. } => {}
        Decision::Scale { to, .. } => assert_eq!(to, 1, "never below one by ratio"),
    }
    let idle = Observation {
        idle_ms: Some(300_000),
        ..seen(1_100_000, 1, 0.0)
    };
    let Decision::Scale { to, reason, .. } = decide(&zero, &mut state, &idle, false) else {
        panic!("an idle app stays up");
    };
    assert_eq!(to, 0);
    assert_eq!(
        reason,
        "scaled 1 -> 0: no requests for 300 s (scale_to_zero_after 300 s)"
    );
    // At zero without requests it holds; the first request wakes it at
    // once, cooldowns notwithstanding.
    assert!(matches!(
        decide(&zero, &mut state, &seen(1_105_000, 0, 0.0), false),
        Decision::Hold { .. }
    ));
    let Decision::Scale {
        from, to, reason, ..
    } = decide(&zero, &mut state, &seen(1_106_000, 0, 3.0), false)
    else {
        panic!("a request does not wake the app");
    };
    assert_eq!((from, to), (0, 1));
    assert!(reason.contains("arrived while at zero"), "{reason}");
    // Without scale_to_zero_after nothing goes to zero.
    let idle_forever = Observation {
        idle_ms: Some(10_000_000),
        ..seen(2_000_000, 1, 0.0)
    };
    let Decision::Hold { .. } = decide(&policy(), &mut State::default(), &idle_forever, false)
    else {
        panic!("min 1 went to zero");
    };
}

/// At exactly the band's edge (22 rps against 20: a ratio of 1.1 that
/// floating point puts a hair either side of 1 + 10 %), the count and the
/// reason must come from the same comparison: no scaling that says `~`.
#[test]
fn the_count_and_its_reason_agree_at_the_tolerance_edge() {
    for (observed, target) in [(22.0, 20.0), (18.0, 20.0), (110.0, 100.0), (90.0, 100.0)] {
        let (count, reason) = wanted(4, observed, target, "rps", "/instance");
        assert_eq!(count, 4, "{reason}");
        assert!(reason.contains(" ~ target"), "{reason}");
    }
    let (count, reason) = wanted(1, 23.0, 20.0, "rps", "/instance");
    assert_eq!((count, reason.as_str()), (2, "rps 23/instance > target 20"));
}
