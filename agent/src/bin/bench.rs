//! `diskchain-bench`: the planner and observer benchmarks. Figures go to a JSON file (default
//! `bench-results/plan.json`) and a short summary to stdout. Runs are interleaved and summarised
//! by their median, so a noisy shared machine skews both sides alike.
//!
//! 1. Allocation map of one large, fragmented qcow2 image (64 GiB virtual, hundreds of thousands
//!    of extents): diskchain's observer against `qemu-img map --output=json` on the same file.
//! 2. Planning time: one chain of 1,000 layers; 10,000 disks of 8 layers each (one host graph).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Parser;
use diskchain::observe::{Roots, observe_chain};
use diskchain_planner::{Allocation, DiskRequest, Format, ImageGraph, KeptPoint, Layer, plan_disk};
use serde_json::json;

/// Benchmarks of the observer and the planner.
#[derive(Parser)]
struct Args {
    /// Where to write the figures.
    #[arg(long, default_value = "bench-results/plan.json")]
    out: PathBuf,
    /// Scratch directory for the large image (about 1 GiB of data is written once, then reused).
    #[arg(long, default_value = "target/bench-scratch")]
    workdir: PathBuf,
    /// Repetitions per measurement.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A small deterministic generator (xorshift), so figures are reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Builds the fragmented image: every 4th cluster gets an explicit zero, every 64th data.
fn build_large_image(path: &Path) -> u64 {
    let size: u64 = 64 << 30;
    let cluster: u64 = 65536;
    if !path.exists() {
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(size.to_string())
            .status()
            .expect("qemu-img");
        assert!(ok.success());
        let mut child = Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-io");
        {
            let mut w = std::io::BufWriter::new(child.stdin.take().expect("stdin"));
            let clusters = size / cluster;
            let mut c = 0;
            while c < clusters {
                if c % 64 == 0 {
                    writeln!(w, "write -P {} {} {}", c % 251, c * cluster, cluster).unwrap();
                } else {
                    writeln!(w, "write -z {} {}", c * cluster, cluster).unwrap();
                }
                c += 4;
            }
            writeln!(w, "quit").unwrap();
        }
        assert!(child.wait().expect("qemu-io").success());
    }
    size
}

fn qemu_img_map(path: &Path) -> (f64, usize) {
    let spec =
        json!({"driver": "qcow2", "backing": null, "file": {"driver": "file", "filename": path}});
    let t = Instant::now();
    let out = Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(format!("json:{spec}"))
        .output()
        .expect("qemu-img map");
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success());
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("qemu-img map prints JSON");
    (secs, v.as_array().map_or(0, Vec::len))
}

fn observer_bench(args: &Args) -> serde_json::Value {
    std::fs::create_dir_all(&args.workdir).unwrap();
    let path = args
        .workdir
        .canonicalize()
        .unwrap()
        .join("fragmented-64g.qcow2");
    let t = Instant::now();
    let size = build_large_image(&path);
    let build_secs = t.elapsed().as_secs_f64();
    let roots = Roots::new(std::slice::from_ref(&args.workdir)).unwrap();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut extents = 0;
    let mut clusters = (0, 0);
    for _ in 0..args.runs {
        let t = Instant::now();
        let chain = observe_chain(&roots, &path).unwrap();
        ours.push(t.elapsed().as_secs_f64());
        let a = chain.layers[0].layer.alloc.as_ref().unwrap();
        clusters = (a.data.len(), a.zero.len());
        let (s, e) = qemu_img_map(&path);
        theirs.push(s);
        extents = e;
    }
    let (o, q) = (median(ours.clone()), median(theirs.clone()));
    println!(
        "allocation map, 64 GiB image, {extents} extents: diskchain {:.1} ms, qemu-img map {:.1} ms, {:.0}x faster",
        o * 1e3,
        q * 1e3,
        q / o
    );
    json!({
        "image": {"virtual_bytes": size, "cluster_bytes": 65536, "extents_in_qemu_img_map": extents,
                  "data_clusters": clusters.0, "zero_clusters": clusters.1, "build_seconds": build_secs},
        "diskchain_seconds": ours, "qemu_img_map_seconds": theirs,
        "diskchain_median_seconds": o, "qemu_img_map_median_seconds": q,
        "speedup_median": q / o,
    })
}

fn synthetic_layer(
    rng: &mut Rng,
    path: PathBuf,
    backing: Option<PathBuf>,
    clusters: u64,
    writes: u64,
) -> Layer {
    let mut a = Allocation::empty(65536, clusters * 65536);
    for _ in 0..writes {
        let start = rng.below(clusters);
        let len = 1 + rng.below(16).min(clusters - start - 1);
        if rng.below(5) == 0 {
            a.zero.insert_range(start..start + len);
        } else {
            a.data.insert_range(start..start + len);
        }
    }
    a.zero -= &a.data;
    Layer {
        path,
        format: Format::Qcow2,
        backing,
        alloc: Some(a),
    }
}

fn long_chain_bench(runs: usize) -> serde_json::Value {
    let mut rng = Rng(0x1000_1a7e);
    let n = 1000;
    let clusters = 1 << 18; // a 16 GiB disk
    let layers: Vec<Layer> = (0..n)
        .map(|i| {
            let backing = (i > 0).then(|| PathBuf::from(format!("/img/l{}.qcow2", i - 1)));
            synthetic_layer(
                &mut rng,
                PathBuf::from(format!("/img/l{i}.qcow2")),
                backing,
                clusters,
                200,
            )
        })
        .collect();
    let graph = ImageGraph::build(layers).unwrap();
    let req = DiskRequest {
        name: "long".into(),
        active: PathBuf::from(format!("/img/l{}.qcow2", n - 1)),
        keep: (0..n - 1)
            .filter(|i| i % 10 == 9)
            .map(|i| KeptPoint {
                name: format!("p{i}"),
                file: PathBuf::from(format!("/img/l{i}.qcow2")),
            })
            .collect(),
        ..Default::default()
    };
    let mut times = Vec::new();
    let mut steps = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let plan = plan_disk(&graph, &req).unwrap();
        times.push(t.elapsed().as_secs_f64());
        steps = plan.steps.len();
    }
    let m = median(times.clone());
    println!(
        "plan one chain of {n} layers (keep every 10th): {:.1} ms, {steps} steps",
        m * 1e3
    );
    json!({"layers": n, "kept": req.keep.len(), "steps": steps, "seconds": times, "median_seconds": m})
}

fn many_disks_bench(runs: usize) -> serde_json::Value {
    let mut rng = Rng(0xd15c_5eed);
    let disks = 10_000;
    let depth = 8;
    let clusters = 1 << 15; // 2 GiB disks
    let mut layers = Vec::with_capacity(disks * depth);
    let mut requests = Vec::with_capacity(disks);
    for d in 0..disks {
        for i in 0..depth {
            let backing = (i > 0).then(|| PathBuf::from(format!("/img/d{d}/l{}.qcow2", i - 1)));
            layers.push(synthetic_layer(
                &mut rng,
                PathBuf::from(format!("/img/d{d}/l{i}.qcow2")),
                backing,
                clusters,
                20,
            ));
        }
        let keep = (0..depth - 1)
            .filter(|_| rng.below(2) == 0)
            .map(|i| KeptPoint {
                name: format!("p{i}"),
                file: PathBuf::from(format!("/img/d{d}/l{i}.qcow2")),
            })
            .collect();
        requests.push(DiskRequest {
            name: format!("d{d}"),
            active: PathBuf::from(format!("/img/d{d}/l{}.qcow2", depth - 1)),
            keep,
            ..Default::default()
        });
    }
    let (mut build, mut plan) = (Vec::new(), Vec::new());
    let mut total_bytes = 0u64;
    for _ in 0..runs {
        let t = Instant::now();
        let graph = ImageGraph::build(layers.clone()).unwrap();
        build.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        total_bytes = requests
            .iter()
            .map(|r| plan_disk(&graph, r).unwrap().total_bytes)
            .sum();
        plan.push(t.elapsed().as_secs_f64());
    }
    let (b, p) = (median(build.clone()), median(plan.clone()));
    println!(
        "plan {disks} disks x {depth} layers: graph {:.0} ms + plans {:.0} ms",
        b * 1e3,
        p * 1e3
    );
    json!({"disks": disks, "layers_per_disk": depth, "graph_build_seconds": build, "plan_seconds": plan,
           "graph_build_median_seconds": b, "plan_median_seconds": p, "total_planned_bytes": total_bytes})
}

fn main() {
    let args = Args::parse();
    let observer = observer_bench(&args);
    let long = long_chain_bench(args.runs);
    let many = many_disks_bench(args.runs);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let qemu = Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let out = json!({
        "command": "cargo run --release -p diskchain --bin diskchain-bench",
        "machine": {"cpu": cpu, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "qemu": qemu},
        "runs": args.runs,
        "allocation_map": observer,
        "plan_long_chain": long,
        "plan_many_disks": many,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("figures written to {}", args.out.display());
}
