//! `capstan-scheduler-bench`: the placement engine against its own
//! exhaustive scorer, side by side in one process, on a simulated cluster.
//!
//! For each strategy it replays the same request stream (apps of 1-8
//! instances, mixed sizes, constraints on zone, kernel, disk, rack and node
//! class, some with `distinct_hosts` or a host port) on two copies of the
//! cluster: one placed by the fast path, one by the exhaustive scorer. When
//! the cluster passes 60% of its CPU or memory, the oldest instances are removed
//! first (churn), so small clusters stay in a steady state instead of
//! filling up. It prints one JSON object per strategy.
//!
//! Decision latency is per request (one app, 4.5 instances on average).
//! `bytes_per_node` is the heap of a snapshot of the final state (the
//! nodes and every instance still placed), measured by a counting
//! allocator, divided by the node count.

// A counting allocator is the one way to measure the snapshot's heap, and it
// needs `unsafe impl GlobalAlloc`; it only forwards to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use capstan_placement::{
    Constraint, Eligibility, Engine, Mode, NodeSpec, Request, Resources, Snapshot, Spread, Strategy,
};
use clap::Parser;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates to the system allocator and only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Benchmarks the placement engine against the exhaustive scorer.
#[derive(Parser)]
#[command(name = "capstan-scheduler-bench", version)]
struct Args {
    /// Nodes in the simulated cluster.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Instances to place per strategy.
    #[arg(long, default_value_t = 100_000)]
    placements: usize,
    /// binpack, spread, least-loaded, round-robin, or all.
    #[arg(long, default_value = "all")]
    strategy: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn cluster(nodes: usize, seed: u64) -> Vec<NodeSpec> {
    let mut rng = Rng(seed);
    let sizes = [
        (4_000, 16_384),
        (8_000, 32_768),
        (16_000, 65_536),
        (32_000, 131_072),
    ];
    (0..nodes)
        .map(|i| {
            let (cpu, mem) = *rng.pick(&sizes);
            let attributes = [
                ("zone", format!("z{}", rng.below(6))),
                ("rack", format!("r{}", rng.below(20))),
                (
                    "kernel.version",
                    rng.pick(&["5.4", "5.10", "6.1"]).to_string(),
                ),
                ("disk", rng.pick(&["ssd", "nvme", "hdd"]).to_string()),
                (
                    "node.class",
                    rng.pick(&["general", "compute", "memory"]).to_string(),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let eligibility = match rng.below(100) {
                0..5 => Eligibility::Down,
                5..7 => Eligibility::Draining,
                _ => Eligibility::Eligible,
            };
            NodeSpec {
                id: format!("node-{i:06}"),
                capacity: Resources {
                    cpu_millis: cpu,
                    memory_mb: mem,
                },
                attributes,
                eligibility,
            }
        })
        .collect()
}

fn requests(placements: usize, strategy: Strategy, seed: u64) -> Vec<Request> {
    let mut rng = Rng(seed ^ 0xA5A5);
    let constraints = [
        "zone != z5",
        "kernel.version >= 5.10",
        "disk in [ssd, nvme]",
        "rack =~ ^r1",
        "node.class != memory",
    ];
    let mut out = Vec::new();
    let mut total = 0;
    let mut app = 0;
    while total < placements {
        let count = (1 + rng.below(8) as usize).min(placements - total);
        let resources = Resources {
            cpu_millis: *rng.pick(&[100, 250, 500, 1000, 2000]),
            memory_mb: *rng.pick(&[128, 256, 512, 1024, 2048, 4096]),
        };
        let mut request = Request::new(format!("app-{app}"), count as u32, resources);
        request.strategy = strategy;
        for _ in 0..1 + rng.below(2) {
            let c =
                Constraint::parse(rng.pick::<&str>(&constraints)).expect("bench constraints parse");
            request.constraints.push(c);
        }
        request.distinct_hosts = rng.below(5) == 0;
        if rng.below(20) == 0 {
            request.ports = vec![8000 + (app % 100) as u16];
        }
        if strategy == Strategy::Spread && rng.below(2) == 0 {
            request.spread = Some(Spread {
                attribute: "zone".into(),
                targets: Vec::new(),
            });
        }
        out.push(request);
        total += count;
        app += 1;
    }
    out
}

struct Run {
    placements_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    utilisation: f64,
    failed: usize,
    /// (node, request) of every instance still placed at the end.
    live: Vec<(usize, usize)>,
}

fn run(mut snapshot: Snapshot, requests: &[Request], mode: Mode, seed: u64) -> Run {
    let total = |f: &dyn Fn(usize) -> Resources| {
        (0..snapshot.len()).fold((0u64, 0u64), |(cpu, mem), i| {
            (cpu + f(i).cpu_millis, mem + f(i).memory_mb)
        })
    };
    let capacity = total(&|i| snapshot.capacity(i));
    let mut allocated = total(&|i| snapshot.allocated(i));
    let mut engine = Engine::new(seed, mode);
    let mut live: VecDeque<(usize, usize)> = VecDeque::new();
    let mut latencies = Vec::with_capacity(requests.len());
    let (mut placed, mut failed) = (0usize, 0usize);
    let mut busy = std::time::Duration::ZERO;
    for (r, request) in requests.iter().enumerate() {
        while allocated.0 * 5 > capacity.0 * 3 || allocated.1 * 5 > capacity.1 * 3 {
            let Some((node, req)) = live.pop_front() else {
                break;
            };
            let old = &requests[req];
            snapshot.remove(node, &old.app, old.resources, &old.ports);
            allocated.0 -= old.resources.cpu_millis;
            allocated.1 -= old.resources.memory_mb;
        }
        let started = Instant::now();
        let plan = engine.place(&mut snapshot, request);
        let took = started.elapsed();
        busy += took;
        latencies.push(took.as_secs_f64() * 1e6);
        placed += plan.nodes.len();
        failed += request.count as usize - plan.nodes.len();
        let n = plan.nodes.len() as u64;
        allocated.0 += request.resources.cpu_millis * n;
        allocated.1 += request.resources.memory_mb * n;
        live.extend(plan.nodes.iter().map(|&n| (n, r)));
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    Run {
        placements_per_sec: placed as f64 / busy.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        utilisation: snapshot.used_utilisation(),
        failed,
        live: live.into(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let strategies: Vec<Strategy> = if args.strategy == "all" {
        Strategy::ALL.to_vec()
    } else {
        match Strategy::parse(&args.strategy) {
            Ok(s) => vec![s],
            Err(e) => {
                eprintln!("error: --strategy: {e}");
                return ExitCode::from(2);
            }
        }
    };
    if args.nodes == 0 || args.placements == 0 {
        eprintln!("error: --nodes and --placements must be > 0");
        return ExitCode::from(2);
    }
    let specs = cluster(args.nodes, args.seed);
    let base = Snapshot::new(specs.clone());
    for strategy in strategies {
        let requests = requests(args.placements, strategy, args.seed);
        let fast = run(base.clone(), &requests, Mode::Fast, args.seed);
        let exhaustive = run(base.clone(), &requests, Mode::Exhaustive, args.seed);
        // What the scheduler builds for a decision: the nodes plus what
        // runs on them now.
        let before = LIVE.load(Ordering::Relaxed);
        let mut snapshot = Snapshot::new(specs.clone());
        for &(node, r) in &fast.live {
            let request = &requests[r];
            snapshot.add(node, &request.app, request.resources, &request.ports);
        }
        let bytes = LIVE.load(Ordering::Relaxed) - before;
        drop(snapshot);
        println!(
            "{{\"nodes\":{},\"strategy\":\"{}\",\"placements\":{},\"placements_per_sec\":{:.0},\
             \"exhaustive_placements_per_sec\":{:.0},\"speedup\":{:.1},\"utilisation\":{:.4},\
             \"exhaustive_utilisation\":{:.4},\"p50_us\":{:.1},\"p99_us\":{:.1},\
             \"exhaustive_p99_us\":{:.1},\"bytes_per_node\":{},\"failed\":{},\
             \"exhaustive_failed\":{},\"seed\":{}}}",
            args.nodes,
            strategy.name(),
            args.placements,
            fast.placements_per_sec,
            exhaustive.placements_per_sec,
            fast.placements_per_sec / exhaustive.placements_per_sec,
            fast.utilisation,
            exhaustive.utilisation,
            fast.p50_us,
            fast.p99_us,
            exhaustive.p99_us,
            bytes as usize / args.nodes,
            fast.failed,
            exhaustive.failed,
            args.seed,
        );
    }
    ExitCode::SUCCESS
}
