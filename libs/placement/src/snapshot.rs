//! The cluster as the engine sees it: nodes (capacity, attributes,
//! eligibility), what is allocated on them, and the indexes that make a
//! placement cost O(log N) candidates instead of O(N) nodes.
//!
//! Memory is kept small on purpose (the benchmark reports bytes per node):
//! attribute strings are interned and shared by every node of a class, and a
//! node holds only its id, numbers and the ports in use on it.

use std::collections::{BTreeMap, HashMap};

use crate::Resources;
use crate::constraint::NODE_ID;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eligibility {
    Eligible,
    /// Being drained: keeps what runs there, gets nothing new.
    Draining,
    /// Missed its heartbeat TTL.
    Down,
}

/// A node as a caller describes it.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: String,
    pub capacity: Resources,
    pub attributes: BTreeMap<String, String>,
    pub eligibility: Eligibility,
}

/// Buckets per dimension of the free-resource grid.
pub(crate) const SIDE: usize = 48;

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub id: Box<str>,
    pub class: u32,
    pub eligibility: Eligibility,
    pub capacity: Resources,
    pub allocated: Resources,
    /// Host ports in use, sorted.
    pub ports: Vec<u16>,
    /// Where the node sits in the free-resource grid.
    pub cell: u16,
    pub cell_pos: u32,
}

/// Nodes with the same attributes (except their id) form a class: a
/// constraint that does not look at `node.id` holds for all of them or none.
#[derive(Debug, Clone)]
pub(crate) struct Class {
    /// (key, value) string ids, sorted by key.
    pub attributes: Vec<(u32, u32)>,
    pub nodes: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Interner {
    ids: HashMap<Box<str>, u32>,
    strings: Vec<Box<str>>,
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.strings.len() as u32;
        self.strings.push(s.into());
        self.ids.insert(s.into(), id);
        id
    }

    pub fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    pub fn resolve(&self, id: u32) -> &str {
        &self.strings[id as usize]
    }
}

/// A cluster snapshot. Nodes are kept sorted by id, so a node's index is
/// stable for the life of the snapshot and iteration order is deterministic.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub(crate) nodes: Vec<Node>,
    pub(crate) classes: Vec<Class>,
    pub(crate) strings: Interner,
    pub(crate) apps: Interner,
    /// Per app id: instances per node index. Sorted, for determinism.
    pub(crate) app_nodes: Vec<BTreeMap<u32, u32>>,
    /// Free-resource grid: `cells[c * SIDE + m]` holds the nodes whose free
    /// CPU falls in bucket `c` and free memory in bucket `m` (see
    /// [`bucket_of`]). A request only ever looks at cells at or above its
    /// own buckets, so full nodes cost nothing.
    pub(crate) cells: Vec<Vec<u32>>,
    /// Bit `m` of `rows[c]` is set when cell (c, m) holds a node.
    pub(crate) rows: [u64; SIDE],
    pub(crate) eligible: u32,
}

/// Log-scale bucket of a free amount, two per power of two; monotonic, so
/// `free < need` implies `bucket_of(free) <= bucket_of(need)`.
pub(crate) fn bucket_of(free: u64) -> usize {
    if free == 0 {
        return 0;
    }
    let log = 63 - free.leading_zeros() as u64;
    let half = if log >= 1 { (free >> (log - 1)) & 1 } else { 0 };
    (1 + log * 2 + half).min(SIDE as u64 - 1) as usize
}

fn cell_of(node: &Node) -> usize {
    let free_cpu = node
        .capacity
        .cpu_millis
        .saturating_sub(node.allocated.cpu_millis);
    let free_mem = node
        .capacity
        .memory_mb
        .saturating_sub(node.allocated.memory_mb);
    bucket_of(free_cpu) * SIDE + bucket_of(free_mem)
}

impl Snapshot {
    /// Builds a snapshot. A repeated node id keeps its first description.
    pub fn new(mut specs: Vec<NodeSpec>) -> Snapshot {
        specs.sort_by(|a, b| a.id.cmp(&b.id));
        specs.dedup_by(|a, b| a.id == b.id);
        let mut snapshot = Snapshot {
            nodes: Vec::with_capacity(specs.len()),
            classes: Vec::new(),
            strings: Interner::default(),
            apps: Interner::default(),
            app_nodes: Vec::new(),
            cells: vec![Vec::new(); SIDE * SIDE],
            rows: [0; SIDE],
            eligible: 0,
        };
        let mut class_ids: HashMap<Vec<(u32, u32)>, u32> = HashMap::new();
        for (index, spec) in specs.into_iter().enumerate() {
            let mut attributes: Vec<(u32, u32)> = spec
                .attributes
                .iter()
                .filter(|(k, _)| k.as_str() != NODE_ID)
                .map(|(k, v)| (snapshot.strings.intern(k), snapshot.strings.intern(v)))
                .collect();
            attributes.sort_unstable();
            let class = *class_ids.entry(attributes.clone()).or_insert_with(|| {
                snapshot.classes.push(Class {
                    attributes,
                    nodes: Vec::new(),
                });
                (snapshot.classes.len() - 1) as u32
            });
            snapshot.classes[class as usize].nodes.push(index as u32);
            if spec.eligibility == Eligibility::Eligible {
                snapshot.eligible += 1;
            }
            let mut node = Node {
                id: spec.id.into(),
                class,
                eligibility: spec.eligibility,
                capacity: spec.capacity,
                allocated: Resources::default(),
                ports: Vec::new(),
                cell: 0,
                cell_pos: 0,
            };
            let cell = cell_of(&node);
            node.cell = cell as u16;
            node.cell_pos = snapshot.cells[cell].len() as u32;
            snapshot.cells[cell].push(index as u32);
            snapshot.rows[cell / SIDE] |= 1 << (cell % SIDE);
            snapshot.nodes.push(node);
        }
        snapshot
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.binary_search_by(|n| (*n.id).cmp(id)).ok()
    }

    pub fn node_id(&self, index: usize) -> &str {
        &self.nodes[index].id
    }

    pub fn allocated(&self, index: usize) -> Resources {
        self.nodes[index].allocated
    }

    pub fn capacity(&self, index: usize) -> Resources {
        self.nodes[index].capacity
    }

    /// Instances of `app` on node `index`.
    pub fn instances_of(&self, app: &str, index: usize) -> u32 {
        self.apps
            .get(app)
            .and_then(|a| self.app_nodes[a as usize].get(&(index as u32)))
            .copied()
            .unwrap_or(0)
    }

    /// The value of `attribute` on node `index` (`node.id` included).
    pub fn attribute(&self, index: usize, attribute: &str) -> Option<&str> {
        let node = &self.nodes[index];
        if attribute == NODE_ID {
            return Some(&node.id);
        }
        let key = self.strings.get(attribute)?;
        let class = &self.classes[node.class as usize];
        class
            .attributes
            .binary_search_by_key(&key, |&(k, _)| k)
            .ok()
            .map(|i| self.strings.resolve(class.attributes[i].1))
    }

    pub(crate) fn app_id(&mut self, app: &str) -> u32 {
        let id = self.apps.intern(app);
        if id as usize == self.app_nodes.len() {
            self.app_nodes.push(BTreeMap::new());
        }
        id
    }

    /// Records an allocation on node `index`. Capacity is not checked: an
    /// existing allocation is a fact, even on an over-committed node.
    pub fn add(&mut self, index: usize, app: &str, resources: Resources, ports: &[u16]) {
        let app = self.app_id(app);
        self.add_by_id(index, app, resources, ports);
    }

    pub(crate) fn add_by_id(
        &mut self,
        index: usize,
        app: u32,
        resources: Resources,
        ports: &[u16],
    ) {
        let node = &mut self.nodes[index];
        node.allocated.cpu_millis += resources.cpu_millis;
        node.allocated.memory_mb += resources.memory_mb;
        for &port in ports {
            let at = node.ports.partition_point(|&p| p < port);
            node.ports.insert(at, port);
        }
        *self.app_nodes[app as usize]
            .entry(index as u32)
            .or_default() += 1;
        self.rebucket(index);
    }

    /// Removes an allocation recorded with [`Snapshot::add`]; false when
    /// node `index` holds no instance of `app`.
    pub fn remove(&mut self, index: usize, app: &str, resources: Resources, ports: &[u16]) -> bool {
        let Some(app) = self.apps.get(app) else {
            return false;
        };
        let counts = &mut self.app_nodes[app as usize];
        match counts.get_mut(&(index as u32)) {
            Some(1) => {
                counts.remove(&(index as u32));
            }
            Some(n) => *n -= 1,
            None => return false,
        }
        let node = &mut self.nodes[index];
        node.allocated.cpu_millis = node
            .allocated
            .cpu_millis
            .saturating_sub(resources.cpu_millis);
        node.allocated.memory_mb = node.allocated.memory_mb.saturating_sub(resources.memory_mb);
        for port in ports {
            if let Ok(at) = node.ports.binary_search(port) {
                node.ports.remove(at);
            }
        }
        self.rebucket(index);
        true
    }

    pub fn set_eligibility(&mut self, index: usize, eligibility: Eligibility) {
        let node = &mut self.nodes[index];
        if node.eligibility == Eligibility::Eligible {
            self.eligible -= 1;
        }
        node.eligibility = eligibility;
        if eligibility == Eligibility::Eligible {
            self.eligible += 1;
        }
    }

    fn rebucket(&mut self, index: usize) {
        let node = &self.nodes[index];
        let cell = cell_of(node);
        if cell == node.cell as usize {
            return;
        }
        let (old, pos) = (node.cell as usize, node.cell_pos as usize);
        self.cells[old].swap_remove(pos);
        if let Some(&moved) = self.cells[old].get(pos) {
            self.nodes[moved as usize].cell_pos = pos as u32;
        }
        if self.cells[old].is_empty() {
            self.rows[old / SIDE] &= !(1 << (old % SIDE));
        }
        let node = &mut self.nodes[index];
        node.cell = cell as u16;
        node.cell_pos = self.cells[cell].len() as u32;
        self.cells[cell].push(index as u32);
        self.rows[cell / SIDE] |= 1 << (cell % SIDE);
    }

    /// Sum of capacity and of allocations over nodes that hold at least one
    /// allocation: how tightly the used part of the cluster is packed.
    pub fn used_utilisation(&self) -> f64 {
        let (mut cap, mut used) = ((0u64, 0u64), (0u64, 0u64));
        for n in self.nodes.iter().filter(|n| n.allocated.memory_mb > 0) {
            cap.0 += n.capacity.cpu_millis;
            cap.1 += n.capacity.memory_mb;
            used.0 += n.allocated.cpu_millis.min(n.capacity.cpu_millis);
            used.1 += n.allocated.memory_mb.min(n.capacity.memory_mb);
        }
        if cap.0 == 0 || cap.1 == 0 {
            return 0.0;
        }
        (used.0 as f64 / cap.0 as f64 + used.1 as f64 / cap.1 as f64) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_grow_with_free_memory() {
        let mut last = 0;
        for free in [0u64, 1, 2, 3, 4, 5, 6, 7, 8, 100, 1000, 1 << 20, u64::MAX] {
            let b = bucket_of(free);
            assert!(b >= last, "bucket_of({free}) = {b} < {last}");
            last = b;
        }
        assert!(bucket_of(1024) < bucket_of(1536));
    }

    #[test]
    fn add_and_remove_keep_the_index_consistent() {
        let spec = |id: &str| NodeSpec {
            id: id.into(),
            capacity: Resources {
                cpu_millis: 4000,
                memory_mb: 8192,
            },
            attributes: BTreeMap::new(),
            eligibility: Eligibility::Eligible,
        };
        let mut s = Snapshot::new(vec![spec("b"), spec("a"), spec("c")]);
        assert_eq!(s.node_id(0), "a");
        let r = Resources {
            cpu_millis: 100,
            memory_mb: 5000,
        };
        s.add(1, "web", r, &[8080]);
        s.add(2, "web", r, &[]);
        assert!(s.remove(1, "web", r, &[8080]));
        assert!(!s.remove(1, "web", r, &[8080]));
        for (cell, nodes) in s.cells.iter().enumerate() {
            assert_eq!(
                s.rows[cell / SIDE] & (1 << (cell % SIDE)) != 0,
                !nodes.is_empty()
            );
            for (pos, &n) in nodes.iter().enumerate() {
                assert_eq!(s.nodes[n as usize].cell as usize, cell);
                assert_eq!(s.nodes[n as usize].cell_pos as usize, pos);
            }
        }
        assert_eq!(s.instances_of("web", 2), 1);
        assert_eq!(s.allocated(1), Resources::default());
    }
}
