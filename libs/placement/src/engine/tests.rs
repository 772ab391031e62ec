use std::collections::{BTreeMap, HashMap};

use proptest::prelude::{ProptestConfig, any, prop, prop_assert, prop_assert_eq, proptest};
use proptest::strategy::Strategy as _;

use super::*;
use crate::{Constraint, NodeSpec, Resources, Spread};

fn res(cpu_millis: u64, memory_mb: u64) -> Resources {
    Resources {
        cpu_millis,
        memory_mb,
    }
}

fn node(id: &str, cpu: u64, mem: u64, attributes: &[(&str, &str)]) -> NodeSpec {
    NodeSpec {
        id: id.into(),
        capacity: res(cpu, mem),
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        eligibility: Eligibility::Eligible,
    }
}

fn request(strategy: crate::Strategy, count: u32, need: Resources) -> Request {
    Request {
        strategy,
        ..Request::new("web", count, need)
    }
}

fn ids(snapshot: &Snapshot, plan: &Plan) -> Vec<String> {
    plan.nodes
        .iter()
        .map(|&i| snapshot.node_id(i).to_string())
        .collect()
}

#[test]
fn binpack_fills_the_tightest_node_first() {
    let mut s = Snapshot::new(vec![
        node("a", 4000, 4096, &[]),
        node("b", 4000, 4096, &[]),
        node("c", 4000, 4096, &[]),
    ]);
    s.add(1, "other", res(1000, 2048), &[]);
    for mode in [Mode::Fast, Mode::Exhaustive] {
        let mut snapshot = s.clone();
        let mut r = request(crate::Strategy::Binpack, 2, res(500, 1024));
        r.anti_affinity = false;
        let plan = Engine::new(1, mode).place(&mut snapshot, &r);
        assert_eq!(ids(&snapshot, &plan), ["b", "b"], "{mode:?}");
    }
}

#[test]
fn least_loaded_and_spread_use_the_emptiest_nodes() {
    let mut s = Snapshot::new(vec![
        node("a", 4000, 4096, &[]),
        node("b", 4000, 4096, &[]),
        node("c", 4000, 4096, &[]),
    ]);
    s.add(0, "other", res(3000, 3000), &[]);
    let plan = Engine::new(1, Mode::Fast).place(
        &mut s.clone(),
        &request(crate::Strategy::LeastLoaded, 1, res(100, 100)),
    );
    assert_ne!(ids(&s, &plan), ["a"]);
    let mut spread = s.clone();
    let plan = Engine::new(1, Mode::Fast).place(
        &mut spread,
        &request(crate::Strategy::Spread, 3, res(100, 100)),
    );
    let mut placed = ids(&spread, &plan);
    placed.sort();
    assert_eq!(placed, ["a", "b", "c"]);
}

#[test]
fn round_robin_rotates_across_requests_and_apps() {
    let mut s = Snapshot::new(vec![
        node("a", 4000, 4096, &[]),
        node("b", 4000, 4096, &[]),
        node("c", 4000, 4096, &[]),
    ]);
    // Make "a" the least loaded by far: round-robin must not care.
    s.add(1, "other", res(2000, 2000), &[]);
    s.add(2, "other", res(2000, 2000), &[]);
    let mut engine = Engine::new(7, Mode::Fast);
    let mut order = Vec::new();
    for app in ["x", "y", "z", "w"] {
        let r = Request {
            strategy: crate::Strategy::RoundRobin,
            ..Request::new(app, 1, res(100, 100))
        };
        let plan = engine.place(&mut s, &r);
        order.extend(ids(&s, &plan));
    }
    assert_eq!(order, ["a", "b", "c", "a"]);
    // The cursor survives the engine: a new one continues the rotation.
    let mut next = Engine::new(8, Mode::Fast).with_cursor(engine.cursor().map(str::to_string));
    let plan = next.place(&mut s, &request(crate::Strategy::RoundRobin, 1, res(1, 1)));
    assert_eq!(ids(&s, &plan), ["b"]);
}

#[test]
fn explanation_counts_nodes_per_filter() {
    let mut s = Snapshot::new(vec![
        node("a", 4000, 512, &[("zone", "eu")]),
        node("b", 4000, 4096, &[("zone", "us")]),
        node("c", 4000, 4096, &[("zone", "us")]),
        node("d", 4000, 4096, &[("zone", "eu")]),
        node("e", 100, 4096, &[("zone", "eu")]),
    ]);
    s.set_eligibility(3, Eligibility::Down);
    let mut r = request(crate::Strategy::Binpack, 2, res(500, 1024));
    r.constraints = vec![Constraint::parse("zone == eu").unwrap()];
    let plan = Engine::new(1, Mode::Fast).place(&mut s, &r);
    assert!(plan.nodes.is_empty());
    let explanation = plan.explanation.unwrap();
    assert_eq!(
        explanation.to_string(),
        "placed 0 of 2 instances of web: of 5 nodes, 1 down; \
         2 filtered by constraint zone == eu; 1 exhausted memory; 1 exhausted cpu"
    );
}

#[test]
fn ports_and_distinct_hosts_are_hard() {
    let mut s = Snapshot::new(vec![node("a", 8000, 8192, &[]), node("b", 8000, 8192, &[])]);
    let mut r = request(crate::Strategy::Binpack, 3, res(100, 100));
    r.ports = vec![8080];
    let plan = Engine::new(1, Mode::Fast).place(&mut s, &r);
    assert_eq!(plan.nodes.len(), 2);
    assert_eq!(
        plan.explanation.unwrap().rejected,
        vec![("have host port 8080 in use".to_string(), 2)]
    );
    let mut s = Snapshot::new(vec![node("a", 8000, 8192, &[]), node("b", 8000, 8192, &[])]);
    let mut r = request(crate::Strategy::Binpack, 3, res(100, 100));
    r.distinct_hosts = true;
    let plan = Engine::new(1, Mode::Exhaustive).place(&mut s, &r);
    assert_eq!(plan.nodes.len(), 2);
    assert!(
        plan.explanation
            .unwrap()
            .to_string()
            .contains("distinct_hosts")
    );
}

#[test]
fn spread_targets_split_by_percentage() {
    let mut specs = Vec::new();
    for i in 0..10 {
        let zone = if i < 5 { "eu" } else { "us" };
        specs.push(node(&format!("n{i}"), 100_000, 100_000, &[("zone", zone)]));
    }
    let mut s = Snapshot::new(specs);
    let mut r = request(crate::Strategy::Spread, 100, res(10, 10));
    r.spread = Some(Spread {
        attribute: "zone".into(),
        targets: vec![("eu".into(), 70)],
    });
    let plan = Engine::new(3, Mode::Fast).place(&mut s, &r);
    let eu = plan
        .nodes
        .iter()
        .filter(|&&i| s.attribute(i, "zone") == Some("eu"))
        .count();
    assert_eq!(eu, 70);
}

/// A random cluster: a few node classes, some down or draining, some
/// existing load, ports in use.
fn cluster() -> impl proptest::strategy::Strategy<Value = Snapshot> {
    let node = (
        0u64..4,
        0u64..3,
        0usize..3,
        prop::sample::select(vec!["5.4", "5.10", "6.1"]),
        0u8..10,
        (0u64..3000, 0u64..6000),
    );
    prop::collection::vec(node, 1..40).prop_map(|nodes| {
        let specs = nodes
            .iter()
            .enumerate()
            .map(|(i, (size, zone, rack, kernel, health, _))| NodeSpec {
                id: format!("node-{i:03}"),
                capacity: res(2000 * (size + 1), 4096 * (size + 1)),
                attributes: [
                    (
                        "zone".to_string(),
                        ["eu", "us", "ap"][*zone as usize].to_string(),
                    ),
                    ("rack".to_string(), format!("r{rack}")),
                    ("kernel.version".to_string(), kernel.to_string()),
                ]
                .into_iter()
                .collect(),
                eligibility: match health {
                    0 => Eligibility::Down,
                    1 => Eligibility::Draining,
                    _ => Eligibility::Eligible,
                },
            })
            .collect();
        let mut s = Snapshot::new(specs);
        for (i, (.., load)) in nodes.iter().enumerate() {
            let cap = s.capacity(i);
            let load = res(load.0.min(cap.cpu_millis), load.1.min(cap.memory_mb));
            s.add(i, "existing", load, &[9000]);
        }
        s
    })
}

fn any_strategy() -> impl proptest::strategy::Strategy<Value = crate::Strategy> {
    prop::sample::select(crate::Strategy::ALL.to_vec())
}

fn constraints() -> impl proptest::strategy::Strategy<Value = Vec<Constraint>> {
    prop::collection::vec(
        prop::sample::select(vec![
            "zone != ap",
            "zone in [eu, us]",
            "kernel.version >= 5.10",
            "rack =~ ^r[01]$",
            "node.id !~ 7$",
            "zone == eu",
        ]),
        0..3,
    )
    .prop_map(|cs| {
        cs.into_iter()
            .map(|c| Constraint::parse(c).unwrap())
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn plans_never_overcommit_and_honour_hard_constraints(
        snapshot in cluster(),
        strategy in any_strategy(),
        constraints in constraints(),
        count in 1u32..30,
        cpu in 1u64..2000,
        mem in 1u64..4000,
        distinct in any::<bool>(),
        port in prop::option::of(prop::sample::select(vec![8080u16, 9000])),
        exhaustive in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut s = snapshot.clone();
        let r = Request {
            constraints: constraints.clone(),
            distinct_hosts: distinct,
            ports: port.into_iter().collect(),
            ..request(strategy, count, res(cpu, mem))
        };
        let mode = if exhaustive { Mode::Exhaustive } else { Mode::Fast };
        let plan = Engine::new(seed, mode).place(&mut s, &r);
        prop_assert_eq!(plan.nodes.len() < count as usize, plan.explanation.is_some());
        let mut per_node: HashMap<usize, u64> = HashMap::new();
        for &i in &plan.nodes {
            *per_node.entry(i).or_default() += 1;
            prop_assert_eq!(s.nodes[i].eligibility, Eligibility::Eligible);
            for c in &constraints {
                prop_assert!(c.holds(s.attribute(i, &c.attribute)), "{} broken on {}", c, s.node_id(i));
            }
        }
        for (&i, &n) in &per_node {
            let before = snapshot.allocated(i);
            let cap = s.capacity(i);
            prop_assert!(before.cpu_millis + n * cpu <= cap.cpu_millis);
            prop_assert!(before.memory_mb + n * mem <= cap.memory_mb);
            prop_assert_eq!(s.allocated(i).memory_mb, before.memory_mb + n * mem);
            if distinct || port.is_some() {
                prop_assert_eq!(n, 1);
            }
            if port == Some(9000) {
                prop_assert!(false, "port 9000 is in use on every node");
            }
        }
        // A shortfall is real: the exhaustive engine cannot place one more.
        if plan.explanation.is_some() {
            let more = Request { count: 1, ..r.clone() };
            let extra = Engine::new(seed, Mode::Exhaustive).place(&mut s.clone(), &more);
            prop_assert!(extra.nodes.is_empty());
        }
    }

    #[test]
    fn same_input_and_seed_give_the_same_plan(
        snapshot in cluster(),
        strategy in any_strategy(),
        constraints in constraints(),
        count in 1u32..20,
        seed in any::<u64>(),
    ) {
        let r = Request { constraints, ..request(strategy, count, res(100, 256)) };
        let a = Engine::new(seed, Mode::Fast).place(&mut snapshot.clone(), &r);
        let b = Engine::new(seed, Mode::Fast).place(&mut snapshot.clone(), &r);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn spread_is_within_one_of_ideal(
        nodes in 1usize..30,
        zones in 1usize..4,
        count in 1u32..120,
        by_zone in any::<bool>(),
        exhaustive in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let specs = (0..nodes)
            .map(|i| {
                let zone = format!("z{}", i % zones);
                node(&format!("n{i:02}"), 1_000_000, 1_000_000, &[("zone", zone.as_str())])
            })
            .collect();
        let mut s = Snapshot::new(specs);
        let mut r = request(crate::Strategy::Spread, count, res(10, 10));
        if by_zone {
            r.spread = Some(Spread { attribute: "zone".into(), targets: vec![] });
        }
        let mode = if exhaustive { Mode::Exhaustive } else { Mode::Fast };
        let plan = Engine::new(seed, mode).place(&mut s, &r);
        prop_assert_eq!(plan.nodes.len(), count as usize);
        let mut per_group: BTreeMap<String, i64> = BTreeMap::new();
        for i in 0..nodes {
            let group = if by_zone { s.attribute(i, "zone").unwrap().to_string() } else { s.node_id(i).to_string() };
            per_group.entry(group).or_insert(0);
        }
        for &i in &plan.nodes {
            let group = if by_zone { s.attribute(i, "zone").unwrap().to_string() } else { s.node_id(i).to_string() };
            *per_group.get_mut(&group).unwrap() += 1;
        }
        let max = per_group.values().max().unwrap();
        let min = per_group.values().min().unwrap();
        prop_assert!(max - min <= 1, "{:?}", per_group);
        if by_zone {
            // Within a zone, nodes are spread too.
            let mut per_node: BTreeMap<usize, i64> = BTreeMap::new();
            for &i in &plan.nodes { *per_node.entry(i).or_default() += 1; }
            for zone in per_group.keys() {
                let counts: Vec<i64> = (0..nodes)
                    .filter(|&i| s.attribute(i, "zone") == Some(zone.as_str()))
                    .map(|i| per_node.get(&i).copied().unwrap_or(0))
                    .collect();
                prop_assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1);
            }
        }
    }
}

#[test]
fn fast_binpack_packs_like_exhaustive() {
    let specs: Vec<NodeSpec> = (0..500)
        .map(|i| {
            node(
                &format!("n{i:03}"),
                16_000,
                65_536,
                &[("zone", ["a", "b"][i % 2])],
            )
        })
        .collect();
    let mut fast = Snapshot::new(specs.clone());
    let mut full = Snapshot::new(specs);
    let mut fe = Engine::new(1, Mode::Fast);
    let mut ee = Engine::new(1, Mode::Exhaustive);
    for i in 0..3000u64 {
        let need = res(100 + (i * 37) % 900, 256 + (i * 101) % 3000);
        let r = Request {
            strategy: crate::Strategy::Binpack,
            ..Request::new(format!("app{}", i % 300), 1, need)
        };
        fe.place(&mut fast, &r);
        ee.place(&mut full, &r);
    }
    let (f, e) = (fast.used_utilisation(), full.used_utilisation());
    assert!(e - f < 0.02, "fast {f:.3} vs exhaustive {e:.3}");
}
