//! The reconciler's decisions for one app: a pure function from desired and
//! observed state to actions. No I/O, deterministic (ties broken by instance
//! id), and idempotent: for a converged app it returns nothing.

use capstan_types::InstanceState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppView {
    pub replicas: u32,
    pub target_hash: String,
    pub max_surge: u32,
    pub max_unavailable: u32,
    pub deleting: bool,
    /// False while restart backoff holds new starts back.
    pub may_start: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    pub id: String,
    pub spec_hash: String,
    pub state: InstanceState,
    pub routable: bool,
    /// Leaving: out of rotation, being stopped.
    pub stopping: bool,
    /// On a draining node: replaced like an instance of an old template,
    /// health-gated, then drained.
    pub migrating: bool,
}

impl InstanceView {
    fn is_live(&self) -> bool {
        !self.stopping && !self.state.is_terminal()
    }

    /// Serving traffic: healthy and in the routing table.
    pub fn is_available(&self) -> bool {
        self.is_live() && self.state == InstanceState::Healthy && self.routable
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Place and start this many new instances of the target template.
    Start(u32),
    /// Add a healthy instance to the routing table.
    Route(String),
    /// Take out of rotation, let requests finish, stop, forget.
    Drain(String),
    /// Clean up an instance that failed, was lost or stopped by itself.
    Forget(String),
}

pub fn plan(app: &AppView, instances: &[InstanceView]) -> Vec<Action> {
    let mut sorted: Vec<&InstanceView> = instances.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut actions = Vec::new();

    for i in &sorted {
        if i.stopping {
            // A drain interrupted by a restart is finished, not forgotten.
            actions.push(Action::Drain(i.id.clone()));
        } else if i.state.is_terminal() {
            actions.push(Action::Forget(i.id.clone()));
        }
    }
    let mut live: Vec<&InstanceView> = sorted.iter().copied().filter(|i| i.is_live()).collect();
    if app.deleting {
        actions.extend(live.iter().map(|i| Action::Drain(i.id.clone())));
        return actions;
    }
    // Unhealthy instances leave; the count deficit replaces them.
    for i in live.iter().filter(|i| i.state == InstanceState::Unhealthy) {
        actions.push(Action::Drain(i.id.clone()));
    }
    live.retain(|i| i.state != InstanceState::Unhealthy);
    for i in &live {
        if i.state == InstanceState::Healthy && !i.routable {
            actions.push(Action::Route(i.id.clone()));
        }
    }

    let replicas = app.replicas as usize;
    let (current, old): (Vec<&InstanceView>, Vec<&InstanceView>) = live
        .iter()
        .copied()
        .partition(|i| i.spec_hash == app.target_hash && !i.migrating);

    if old.is_empty() {
        if current.len() < replicas && app.may_start {
            actions.push(Action::Start((replicas - current.len()) as u32));
        }
        if current.len() > replicas {
            // Remove the least useful first: not serving, then newest id.
            let mut extras = current.clone();
            extras.sort_by(|a, b| (a.is_available(), &b.id).cmp(&(b.is_available(), &a.id)));
            actions.extend(
                extras
                    .iter()
                    .take(current.len() - replicas)
                    .map(|i| Action::Drain(i.id.clone())),
            );
        }
        return actions;
    }

    // A rolling update: surge new instances, retire old ones while enough serve.
    let max_total = replicas + app.max_surge as usize;
    let deficit = replicas.saturating_sub(current.len());
    let room = max_total.saturating_sub(live.len());
    let starts = deficit.min(room);
    if starts > 0 && app.may_start {
        actions.push(Action::Start(starts as u32));
    }
    let min_available = replicas.saturating_sub(app.max_unavailable as usize);
    let mut available = live.iter().filter(|i| i.is_available()).count();
    for o in old.iter().filter(|i| !i.is_available()) {
        actions.push(Action::Drain(o.id.clone()));
    }
    for o in old.iter().filter(|i| i.is_available()) {
        if available > min_available {
            available -= 1;
            actions.push(Action::Drain(o.id.clone()));
        }
    }
    actions
}

/// A rollout is done when exactly `replicas` instances of the target
/// template serve traffic and nothing else is left.
pub fn rollout_done(app: &AppView, instances: &[InstanceView]) -> bool {
    let all_current_available = instances
        .iter()
        .all(|i| i.spec_hash == app.target_hash && i.is_available());
    all_current_available && instances.len() == app.replicas as usize
}

/// Instances of the target template that serve traffic.
pub fn updated(app: &AppView, instances: &[InstanceView]) -> u32 {
    instances
        .iter()
        .filter(|i| i.spec_hash == app.target_hash && i.is_available())
        .count() as u32
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn app(replicas: u32, surge: u32, unavailable: u32) -> AppView {
        AppView {
            replicas,
            target_hash: "new".into(),
            max_surge: surge,
            max_unavailable: unavailable,
            deleting: false,
            may_start: true,
        }
    }

    fn inst(id: &str, hash: &str, state: InstanceState, routable: bool) -> InstanceView {
        InstanceView {
            id: id.into(),
            spec_hash: hash.into(),
            state,
            routable,
            stopping: false,
            migrating: false,
        }
    }

    fn serving(id: &str, hash: &str) -> InstanceView {
        inst(id, hash, InstanceState::Healthy, true)
    }

    /// Checks `plan` for a table of situations.
    fn check(app: &AppView, instances: &[InstanceView], expected: &[Action]) {
        assert_eq!(plan(app, instances), expected, "instances: {instances:#?}");
    }

    #[test]
    fn a_drain_replaces_before_it_removes() {
        use Action::*;
        let a = app(2, 1, 0);
        let on_drained_node = |id: &str| InstanceView {
            migrating: true,
            ..serving(id, "new")
        };
        // Surge a replacement first; nothing leaves while only 2 serve.
        check(
            &a,
            &[on_drained_node("a"), serving("b", "new")],
            &[Start(1)],
        );
        // The replacement serves: now the migrating one may go.
        check(
            &a,
            &[
                on_drained_node("a"),
                serving("b", "new"),
                serving("c", "new"),
            ],
            &[Drain("a".into())],
        );
    }

    #[test]
    fn decisions_for_common_situations() {
        use Action::*;
        use InstanceState::*;
        let a = app(3, 1, 0);
        check(&a, &[], &[Start(3)]);
        check(
            &a,
            &[
                serving("a", "new"),
                serving("b", "new"),
                serving("c", "new"),
            ],
            &[],
        );
        check(
            &a,
            &[
                serving("a", "new"),
                inst("b", "new", Failed, true),
                serving("c", "new"),
            ],
            &[Forget("b".into()), Start(1)],
        );
        check(
            &a,
            &[
                serving("a", "new"),
                inst("b", "new", Healthy, false),
                serving("c", "new"),
            ],
            &[Route("b".into())],
        );
        check(
            &app(1, 1, 0),
            &[serving("a", "new"), inst("b", "new", Starting, false)],
            &[Drain("b".into())],
        );
        // Rolling: surge one new instance, retire nothing yet.
        check(
            &a,
            &[
                serving("a", "old"),
                serving("b", "old"),
                serving("c", "old"),
            ],
            &[Start(1)],
        );
        // The new one serves: one old may go.
        check(
            &a,
            &[
                serving("a", "old"),
                serving("b", "old"),
                serving("c", "old"),
                serving("d", "new"),
            ],
            &[Drain("a".into())],
        );
        // Healthy but not routed yet does not count as serving.
        check(
            &a,
            &[
                serving("a", "old"),
                serving("b", "old"),
                serving("c", "old"),
                inst("d", "new", Healthy, false),
            ],
            &[Route("d".into())],
        );
        let mut deleting = a.clone();
        deleting.deleting = true;
        check(
            &deleting,
            &[serving("a", "new"), inst("b", "new", Failed, false)],
            &[Forget("b".into()), Drain("a".into())],
        );
        let mut backing_off = a.clone();
        backing_off.may_start = false;
        check(&backing_off, &[serving("a", "new")], &[]);
        check(
            &a,
            &[InstanceView {
                stopping: true,
                ..serving("a", "new")
            }],
            &[Drain("a".into()), Start(3)],
        );
        check(
            &a,
            &[
                serving("a", "new"),
                serving("b", "new"),
                inst("c", "new", Unhealthy, true),
            ],
            &[Drain("c".into()), Start(1)],
        );
    }

    /// One step of a simulated world: started instances come up healthy one
    /// step after they start; a drained instance leaves rotation at once and
    /// is stopped (removed) one step later, as the reconciler does it.
    fn step(
        planner: &dyn Fn(&AppView, &[InstanceView]) -> Vec<Action>,
        app: &AppView,
        world: &mut Vec<InstanceView>,
        next_id: &mut u32,
    ) -> Vec<Action> {
        world.retain(|i| !i.stopping);
        for i in world.iter_mut() {
            if i.state == InstanceState::Starting {
                i.state = InstanceState::Healthy;
            }
        }
        let actions = planner(app, world);
        for action in &actions {
            match action {
                Action::Start(n) => {
                    for _ in 0..*n {
                        *next_id += 1;
                        world.push(inst(
                            &format!("i{next_id:04}"),
                            &app.target_hash,
                            InstanceState::Starting,
                            false,
                        ));
                    }
                }
                Action::Route(id) => world
                    .iter_mut()
                    .filter(|i| &i.id == id)
                    .for_each(|i| i.routable = true),
                Action::Drain(id) => world.iter_mut().filter(|i| &i.id == id).for_each(|i| {
                    i.stopping = true;
                    i.routable = false;
                }),
                Action::Forget(id) => world.retain(|i| &i.id != id),
            }
        }
        actions
    }

    /// Runs `planner` on `world` until it plans nothing, checking on every
    /// step that availability stays at `floor` and that no more than
    /// `ceiling` instances run outside a drain; then that the result is what
    /// was asked for and that planning it again does nothing (idempotence).
    fn simulate(
        planner: &dyn Fn(&AppView, &[InstanceView]) -> Vec<Action>,
        app: &AppView,
        mut world: Vec<InstanceView>,
        floor: usize,
        ceiling: usize,
    ) -> Result<(), String> {
        let mut next_id = 0;
        for _ in 0..200 {
            let actions = step(planner, app, &mut world, &mut next_id);
            let available = world.iter().filter(|i| i.is_available()).count();
            if available < floor {
                return Err(format!("availability {available} fell below {floor}"));
            }
            let running = world.iter().filter(|i| !i.stopping).count();
            if running > ceiling {
                return Err(format!(
                    "{running} instances run, more than the surge ceiling {ceiling}"
                ));
            }
            if actions.is_empty() && world.iter().all(|i| !i.stopping) {
                if !rollout_done(app, &world) || world.len() != app.replicas as usize {
                    return Err(format!("settled short of the goal: {world:?}"));
                }
                let again = planner(app, &world);
                if !again.is_empty() {
                    return Err(format!(
                        "not idempotent: a converged world still plans {again:?}"
                    ));
                }
                return Ok(());
            }
        }
        Err(format!("did not converge within 200 steps: {world:?}"))
    }

    fn world_of(specs: &[(u8, bool, bool)]) -> Vec<InstanceView> {
        specs
            .iter()
            .enumerate()
            .map(|(n, (s, routable, old))| {
                let state = [
                    InstanceState::Starting,
                    InstanceState::Healthy,
                    InstanceState::Unhealthy,
                    InstanceState::Failed,
                ][*s as usize % 4];
                let routable = *routable && state == InstanceState::Healthy;
                inst(
                    &format!("w{n:04}"),
                    if *old { "old" } else { "new" },
                    state,
                    routable,
                )
            })
            .collect()
    }

    #[test]
    fn the_simulation_catches_a_planner_that_surges_too_far() {
        let app = app(3, 1, 0);
        let greedy = |app: &AppView, world: &[InstanceView]| {
            let mut actions = plan(app, world);
            if actions.iter().any(|a| matches!(a, Action::Start(_))) {
                actions.push(Action::Start(2));
            }
            actions
        };
        let old: Vec<_> = (0..3).map(|i| serving(&format!("o{i}"), "old")).collect();
        let verdict = simulate(&greedy, &app, old, 3, 4);
        assert!(
            verdict.is_err_and(|e| e.contains("surge ceiling")),
            "the bound cannot fail"
        );
    }

    #[test]
    fn the_simulation_catches_a_planner_that_drops_availability() {
        let app = app(3, 1, 0);
        let hasty = |app: &AppView, world: &[InstanceView]| {
            let mut actions = plan(app, world);
            // Drains every old instance at once.
            for i in world
                .iter()
                .filter(|i| i.spec_hash != app.target_hash && !i.stopping)
            {
                if !actions.contains(&Action::Drain(i.id.clone())) {
                    actions.push(Action::Drain(i.id.clone()));
                }
            }
            actions
        };
        let old: Vec<_> = (0..3).map(|i| serving(&format!("o{i}"), "old")).collect();
        let verdict = simulate(&hasty, &app, old, 3, 4);
        assert!(
            verdict.is_err_and(|e| e.contains("availability")),
            "the floor cannot fail"
        );
    }

    #[test]
    fn the_simulation_catches_a_planner_that_is_not_idempotent() {
        let app = app(2, 1, 0);
        let restless = |app: &AppView, world: &[InstanceView]| {
            let actions = plan(app, world);
            if actions.is_empty() {
                // Re-routes what is already routed, forever.
                world.iter().map(|i| Action::Route(i.id.clone())).collect()
            } else {
                actions
            }
        };
        let verdict = simulate(&restless, &app, Vec::new(), 0, 3);
        assert!(verdict.is_err(), "idempotence cannot fail");
    }

    proptest! {
        #[test]
        fn rolling_updates_converge_within_the_floor_and_the_surge(
            replicas in 0u32..8,
            surge in 0u32..4,
            unavailable in 0u32..4,
            old_count in 0u32..10,
        ) {
            prop_assume!(surge + unavailable > 0);
            let app = app(replicas, surge, unavailable);
            let world: Vec<InstanceView> = (0..old_count).map(|i| serving(&format!("o{i:04}"), "old")).collect();
            let floor = (replicas.saturating_sub(unavailable) as usize).min(old_count as usize);
            let ceiling = (replicas.max(old_count) + surge) as usize;
            prop_assert_eq!(simulate(&plan, &app, world, floor, ceiling), Ok(()));
        }

        /// From any mix of states, templates and routes, planning converges
        /// to the goal, and a converged world plans nothing.
        #[test]
        fn any_world_converges_and_then_plans_nothing(
            replicas in 0u32..6,
            surge in 1u32..3,
            specs in proptest::collection::vec((0u8..4, any::<bool>(), any::<bool>()), 0..10),
        ) {
            let app = app(replicas, surge, 0);
            let world = world_of(&specs);
            let ceiling = (replicas as usize).max(world.len()) + surge as usize;
            prop_assert_eq!(simulate(&plan, &app, world, 0, ceiling), Ok(()));
        }

        #[test]
        fn plans_are_deterministic_in_instance_order(
            states in proptest::collection::vec((0u8..4, any::<bool>(), any::<bool>()), 0..10),
        ) {
            let app = app(3, 1, 1);
            let world: Vec<InstanceView> = states.iter().enumerate().map(|(n, (s, routable, old))| {
                let state = [InstanceState::Starting, InstanceState::Healthy, InstanceState::Unhealthy, InstanceState::Failed][*s as usize];
                inst(&format!("i{n}"), if *old { "old" } else { "new" }, state, *routable)
            }).collect();
            let mut reversed = world.clone();
            reversed.reverse();
            prop_assert_eq!(plan(&app, &world), plan(&app, &reversed));
        }
    }
}
