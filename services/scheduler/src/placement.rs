//! Placement: a pure function from a snapshot of nodes to a node per
//! instance. No I/O; ties broken by node id, so the same input always gives
//! the same plan.

use std::collections::BTreeMap;

use capstan_types::Resources;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub id: String,
    pub capacity: Resources,
    pub allocated: Resources,
    /// Instances of each app already on the node.
    pub apps: BTreeMap<String, u32>,
}

/// Places `count` instances of `app`, each needing `need`. Returns one node
/// index per placed instance, and why the rest could not be placed.
pub fn place(
    nodes: &[NodeSnapshot],
    app: &str,
    need: Resources,
    count: usize,
) -> (Vec<usize>, Option<String>) {
    let mut allocated: Vec<Resources> = nodes.iter().map(|n| n.allocated).collect();
    let mut app_counts: Vec<u32> = nodes
        .iter()
        .map(|n| n.apps.get(app).copied().unwrap_or(0))
        .collect();
    let mut placed = Vec::with_capacity(count);
    for _ in 0..count {
        let fits = |i: usize| {
            let free_cpu = nodes[i]
                .capacity
                .cpu_millis
                .saturating_sub(allocated[i].cpu_millis);
            let free_mem = nodes[i]
                .capacity
                .memory_mb
                .saturating_sub(allocated[i].memory_mb);
            free_cpu >= need.cpu_millis && free_mem >= need.memory_mb
        };
        // Spread first (fewest of this app), then least loaded, then node id.
        let best = (0..nodes.len()).filter(|&i| fits(i)).min_by(|&a, &b| {
            let load = |i: usize| {
                let cap = u64::from(nodes[i].capacity.memory_mb.max(1));
                u64::from(allocated[i].memory_mb) * 1_000_000 / cap
            };
            (app_counts[a], load(a), &nodes[a].id).cmp(&(app_counts[b], load(b), &nodes[b].id))
        });
        let Some(i) = best else {
            return (placed, Some(explain(nodes, &allocated, need)));
        };
        allocated[i].cpu_millis += need.cpu_millis;
        allocated[i].memory_mb += need.memory_mb;
        app_counts[i] += 1;
        placed.push(i);
    }
    (placed, None)
}

fn explain(nodes: &[NodeSnapshot], allocated: &[Resources], need: Resources) -> String {
    if nodes.is_empty() {
        return "no ready nodes: start an agent (capstan dev starts one)".into();
    }
    let (mut cpu, mut mem) = (0, 0);
    for (node, used) in nodes.iter().zip(allocated) {
        if node.capacity.cpu_millis.saturating_sub(used.cpu_millis) < need.cpu_millis {
            cpu += 1;
        } else if node.capacity.memory_mb.saturating_sub(used.memory_mb) < need.memory_mb {
            mem += 1;
        }
    }
    let mut reasons = Vec::new();
    if cpu > 0 {
        reasons.push(format!("{cpu} exhausted cpu (need {}m)", need.cpu_millis));
    }
    if mem > 0 {
        reasons.push(format!(
            "{mem} exhausted memory (need {} MB)",
            need.memory_mb
        ));
    }
    format!(
        "no node fits: {} of {} ready nodes: {}",
        cpu + mem,
        nodes.len(),
        reasons.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn node(id: &str, cpu: u32, mem: u32) -> NodeSnapshot {
        NodeSnapshot {
            id: id.into(),
            capacity: Resources {
                cpu_millis: cpu,
                memory_mb: mem,
            },
            allocated: Resources {
                cpu_millis: 0,
                memory_mb: 0,
            },
            apps: BTreeMap::new(),
        }
    }

    const NEED: Resources = Resources {
        cpu_millis: 100,
        memory_mb: 64,
    };

    #[test]
    fn spreads_replicas_across_nodes() {
        let nodes = [
            node("a", 4000, 4096),
            node("b", 4000, 4096),
            node("c", 4000, 4096),
        ];
        let (placed, why) = place(&nodes, "web", NEED, 6);
        assert_eq!(why, None);
        let mut per_node = [0; 3];
        for i in placed {
            per_node[i] += 1;
        }
        assert_eq!(per_node, [2, 2, 2]);
    }

    #[test]
    fn explains_what_is_exhausted() {
        let nodes = [node("a", 50, 4096), node("b", 4000, 32)];
        let (placed, why) = place(&nodes, "web", NEED, 1);
        assert!(placed.is_empty());
        let why = why.unwrap();
        assert!(
            why.contains("1 exhausted cpu") && why.contains("1 exhausted memory"),
            "{why}"
        );
        assert!(
            place(&[], "web", NEED, 1)
                .1
                .unwrap()
                .contains("no ready nodes")
        );
    }

    proptest! {
        #[test]
        fn never_exceeds_capacity_and_is_deterministic(
            caps in proptest::collection::vec((0u32..2000, 0u32..2000), 1..8),
            count in 0usize..40,
        ) {
            let nodes: Vec<_> = caps.iter().enumerate().map(|(i, (c, m))| node(&format!("n{i}"), *c, *m)).collect();
            let (placed, why) = place(&nodes, "app", NEED, count);
            prop_assert_eq!(place(&nodes, "app", NEED, count), (placed.clone(), why.clone()));
            prop_assert!(placed.len() == count || why.is_some());
            let mut used = vec![(0u32, 0u32); nodes.len()];
            for i in placed {
                used[i].0 += NEED.cpu_millis;
                used[i].1 += NEED.memory_mb;
            }
            for (n, (cpu, mem)) in nodes.iter().zip(used) {
                prop_assert!(cpu <= n.capacity.cpu_millis && mem <= n.capacity.memory_mb);
            }
        }
    }
}
