//! `diskchain-bench`: the planner and observer benchmarks. Figures go to a JSON file (default
//! `bench-results/plan.json`) and a short summary to stdout. Runs are interleaved and summarised
//! by their median, so a noisy shared machine skews both sides alike.
//!
//! `plan` (the default; `bench-results/plan.json`):
//! 1. Allocation map of one large, fragmented qcow2 image (64 GiB virtual, hundreds of thousands
//!    of extents): diskchain's observer against `qemu-img map --output=json` on the same file.
//! 2. Planning time: one chain of 1,000 layers; 10,000 disks of 8 layers each (one host graph).
//!
//! `agent` (`bench-results/agent.json`): 1,000 specs of small disks; the time the real agent
//! process takes to converge them, then the cost of its no-op resyncs: wall time per pass (from
//! its own debug log), CPU seconds per pass (`/proc/PID/stat`), peak memory (`VmHWM`).
//!
//! `apply` (`bench-results/apply.json`): removing points from a chain of real images holding a
//! few GiB written by qemu-io, with `diskchain apply` against the naive one-commit-per-point
//! sequence (each removed point takes its overlay's content, as `virsh blockcommit --top OVERLAY
//! --base POINT` does; below the active layer the point is pulled into it), in bytes QEMU wrote
//! and seconds, side by side on fresh copies; and the disk's own sequential write speed measured
//! in the same run (the physical limit).
//!
//! `bytes` (`bench-results/bytes.json`): bytes planned, no apply. The flatten case (a private
//! base holding 254 MiB under an active layer holding 2 MiB, `snapshots: []`) and a mix of random
//! chains (2-8 layers, random whole-cluster writes, random kept points): diskchain's plan against
//! libvirt's commit-down (every removed run committed into the layer below it, the active run
//! too, as `blockcommit --active --pivot`) and against always-stream (every removed run pulled
//! into the layer above), both as the plan reports them (`baselines`).
//!
//! `engines` (`bench-results/engines.json`): where an offline apply's time goes: QEMU's engines
//! for a pull side by side, and two commits in sequence against side by side (see
//! `engines_bench`).
//!
//! `live` (`bench-results/live.json`; needs a running libvirtd, see `scripts/setup.sh --live`):
//! removing four points of a running TCG domain's chain with `diskchain apply` (libvirt block
//! jobs) against one `virsh blockcommit` per point (each removed point takes its overlay's
//! content, bottom-up, so every kept point stays intact) and against that same per-point
//! sequence run by diskchain, in bytes the domain's QEMU wrote and seconds, on fresh copies of
//! the same chain attached to the same domain, the order of the sides rotating.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use diskchain::observe::{Roots, observe_chain};
use diskchain_planner::{Allocation, DiskRequest, Format, ImageGraph, KeptPoint, Layer, plan_disk};
use serde_json::json;

/// Benchmarks of the observer, the planner and apply.
#[derive(Parser)]
struct Args {
    /// Which benchmark: `plan`, `apply`, `agent`, `live`, `bytes`, `backup` or `engines`.
    #[arg(default_value = "plan")]
    which: String,
    /// Where to write the figures (default: `bench-results/<which>.json`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Scratch directory for the large image (about 1 GiB of data is written once, then reused).
    #[arg(long, default_value = "target/bench-scratch")]
    workdir: PathBuf,
    /// Repetitions per measurement.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// `agent`: how many disks (default 1,000).
    #[arg(long)]
    disks: Option<usize>,
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
    // `cargo run --bin diskchain-bench` builds this binary only, and a `diskchain` beside it
    // built from older sources would measure old code. Under cargo, build it (a no-op when it
    // is up to date); run by hand, refuse one older than the bench.
    let me = std::env::current_exe().expect("the bench's own path");
    let bin = me.with_file_name("diskchain");
    if args.which != "plan" {
        let profile = me
            .parent()
            .and_then(|d| d.file_name())
            .and_then(|d| d.to_str())
            .unwrap_or("release")
            .to_string();
        if let Some(cargo) = std::env::var_os("CARGO") {
            let mut c = Command::new(cargo);
            c.args(["build", "-q", "-p", "diskchain", "--bin", "diskchain"]);
            if profile == "release" {
                c.arg("--release");
            }
            if !c.status().is_ok_and(|s| s.success()) {
                eprintln!("error: building {} failed", bin.display());
                std::process::exit(2);
            }
        } else {
            let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            if modified(&bin) < modified(&me) {
                eprintln!(
                    "error: {} is missing or older than this bench; build it first: cargo build --release -p diskchain --bins",
                    bin.display()
                );
                std::process::exit(2);
            }
        }
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("bench-results/{}.json", args.which)));
    let figures = match args.which.as_str() {
        "plan" => plan_benches(&args),
        "apply" => apply_bench(&args),
        "agent" => agent_bench(&args),
        "live" => live_bench(&args),
        "bytes" => bytes_bench(&args),
        "backup" => backup_bench(&args),
        "engines" => engines_bench(&args),
        other => {
            eprintln!(
                "unknown benchmark {other:?}: use plan, apply, agent, live, bytes, backup or engines"
            );
            std::process::exit(2);
        }
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&out, serde_json::to_string_pretty(&figures).unwrap()).unwrap();
    println!("figures written to {}", out.display());
}

fn machine() -> serde_json::Value {
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
    json!({"cpu": cpu, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "qemu": qemu})
}

fn plan_benches(args: &Args) -> serde_json::Value {
    let observer = observer_bench(args);
    let long = long_chain_bench(args.runs);
    let many = many_disks_bench(args.runs);
    json!({
        "command": "cargo run --release -p diskchain --bin diskchain-bench -- plan",
        "machine": machine(),
        "runs": args.runs,
        "allocation_map": observer,
        "plan_long_chain": long,
        "plan_many_disks": many,
    })
}

/// Runs a command to completion; returns its seconds and the bytes it wrote (`wchar` of
/// `/proc/PID/io`, read after it exits but before it is reaped: the executor's own method).
fn run_counted(mut cmd: Command) -> (f64, u64) {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let t = Instant::now();
    let child = cmd.stdout(Stdio::null()).spawn().expect("spawn");
    let pid = child.id();
    let _ = waitid(
        Id::Pid(nix::unistd::Pid::from_raw(pid as i32)),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
    );
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let wchar = io
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{cmd:?} failed");
    (t.elapsed().as_secs_f64(), wchar)
}

/// Builds the benchmark chain in `dir`: one layer per entry of `mib`, 8 GiB virtual, each
/// writing that many MiB in 64 MiB runs at offsets that shift per layer (layers partly shadow
/// each other).
fn build_apply_chain(dir: &Path, mib: &[u64]) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut layers: Vec<PathBuf> = Vec::new();
    for (i, m) in mib.iter().enumerate() {
        let p = dir.join(format!("l{i}.qcow2"));
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", "qcow2"]);
        if let Some(b) = layers.last() {
            c.arg("-b").arg(b).args(["-F", "qcow2"]);
        }
        c.arg(&p).arg((8u64 << 30).to_string());
        assert!(c.status().unwrap().success());
        let mut child = Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(&p)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        {
            let mut w = std::io::BufWriter::new(child.stdin.take().unwrap());
            for k in 0..m / 64 {
                let off = ((k * 96 + i as u64 * 40) % (8 * 1024 - 64)) << 20;
                writeln!(w, "write -P {} {off} 64M", (i as u64 * 31 + k) % 250 + 1).unwrap();
            }
            writeln!(w, "quit").unwrap();
        }
        assert!(child.wait().unwrap().success());
        layers.push(p);
    }
    layers
}

/// A fresh copy of the chain in `to`, re-pointed at its own files.
fn copy_chain(from: &[PathBuf], to: &Path) -> Vec<PathBuf> {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    let mut out: Vec<PathBuf> = Vec::new();
    for f in from {
        let dst = to.join(f.file_name().unwrap());
        assert!(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(f)
                .arg(&dst)
                .status()
                .unwrap()
                .success()
        );
        if let Some(prev) = out.last() {
            let ok = Command::new("qemu-img")
                .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(prev)
                .arg(&dst)
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
        out.push(dst);
    }
    let _ = Command::new("sync").status();
    out
}

/// The naive sequence: each removed point, bottom-up, takes its overlay's content (`qemu-img
/// commit -d` of the overlay into it, then the layer above is re-pointed); when its overlay is
/// the active layer, the point is pulled into the active layer instead (offline, an active commit
/// cannot keep the active path).
fn naive(chain: &[PathBuf], keep: &[usize]) -> (f64, u64) {
    let mut cur: Vec<PathBuf> = chain.to_vec();
    // Which original point each current file stands for.
    let mut ids: Vec<usize> = (0..chain.len()).collect();
    let (mut secs, mut bytes) = (0.0, 0);
    for x in 0..chain.len() - 1 {
        if keep.contains(&x) {
            continue;
        }
        let pos = ids.iter().position(|&i| i == x).unwrap();
        let overlay = pos + 1;
        let mut c = Command::new("qemu-img");
        if overlay == cur.len() - 1 {
            c.args(["rebase", "-f", "qcow2"]);
            match pos.checked_sub(1) {
                Some(b) => c.arg("-b").arg(&cur[b]).args(["-F", "qcow2"]),
                None => c.args(["-b", ""]),
            };
            c.arg(&cur[overlay]);
            let (s, b) = run_counted(c);
            secs += s;
            bytes += b;
            cur.remove(pos);
            ids.remove(pos);
        } else {
            c.args(["commit", "-q", "-d", "-f", "qcow2", "-b"])
                .arg(&cur[pos])
                .arg(&cur[overlay]);
            let (s, b) = run_counted(c);
            secs += s;
            bytes += b;
            let mut c = Command::new("qemu-img");
            c.args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&cur[pos])
                .arg(&cur[overlay + 1]);
            let (s, b) = run_counted(c);
            secs += s;
            bytes += b;
            ids[pos] = ids[overlay];
            cur.remove(overlay);
            ids.remove(overlay);
        }
    }
    (secs, bytes)
}

/// SHA-256 of each file's guest view.
fn views_sha(chain: &[PathBuf]) -> Vec<String> {
    // (Piping `qemu-img convert` to stdout does not work: it cannot resize a pipe, and the hash
    // of nothing compared equal everywhere. The view is read through `qemu-img map` instead.)
    chain
        .iter()
        .map(|f| {
            diskchain::backup::repo::view_sha256(f)
                .unwrap_or_else(|e| panic!("the view of {}: {e}", f.display()))
        })
        .collect()
}

/// Starts a measurement from the same place each time: dirty pages written back, and (when
/// allowed) the page cache dropped, so neither side reads what the other left cached.
fn settle() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Sequential write speed of the disk under `dir`: 1 GiB written with O_DIRECT, then fsync.
fn disk_write_speed(dir: &Path) -> f64 {
    let f = dir.join("ddtest");
    let t = Instant::now();
    let ok = Command::new("dd")
        .args([
            "if=/dev/zero",
            "bs=4M",
            "count=256",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ])
        .arg(format!("of={}", f.display()))
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&f);
    (1u64 << 30) as f64 / secs
}

fn apply_bench(args: &Args) -> serde_json::Value {
    let work = args.workdir.join("apply");
    std::fs::create_dir_all(&work).unwrap();
    let work = work.canonicalize().unwrap();
    let mib: [u64; 8] = [1024, 512, 256, 512, 128, 384, 256, 64];
    let keep = [2usize, 5];
    let t = Instant::now();
    let master = build_apply_chain(&work.join("master"), &mib);
    let build_seconds = t.elapsed().as_secs_f64();
    let bin = std::env::current_exe().unwrap().with_file_name("diskchain");
    let (mut planned_s, mut planned_b, mut naive_s, mut naive_b, mut speeds) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut predicted = 0;
    let state = work.join("state");
    // `qemu-img convert` writing the bytes the plan writes: a source holding that much data in
    // the chain's own 64 MiB runs, built once the plan is known (run 0), converted cold.
    let convert_src = work.join("convert-src.qcow2");
    let mut convert_s = vec![];
    // The same convert with `-t writeback`: its data flushed to the disk before it exits, as
    // every diskchain step's is (convert's default cache, `unsafe`, never flushes: the data may
    // still be in the page cache when it exits).
    let mut durable_s = vec![];
    for run in 0..args.runs {
        settle();
        speeds.push(disk_write_speed(&work));
        if run > 0 {
            let dst = work.join("convert-dst.qcow2");
            let order: [&[&str]; 2] = if run % 2 == 0 {
                [&[], &["-t", "writeback"]]
            } else {
                [&["-t", "writeback"], &[]]
            };
            for cache in order {
                let _ = std::fs::remove_file(&dst);
                settle();
                let mut c = Command::new("qemu-img");
                c.args(["convert", "-f", "qcow2", "-O", "qcow2"])
                    .args(cache)
                    .arg(&convert_src)
                    .arg(&dst);
                let (secs, _) = run_counted(c);
                let _ = std::fs::remove_file(&dst);
                if cache.is_empty() {
                    convert_s.push(secs);
                } else {
                    durable_s.push(secs);
                }
            }
        }
        // Alternate which side runs first, so drift in the machine's load hits both alike.
        for side in if run % 2 == 0 {
            ["diskchain", "naive"]
        } else {
            ["naive", "diskchain"]
        } {
            if side == "naive" {
                let chain = copy_chain(&master, &work.join("naive"));
                settle();
                let (s, b) = naive(&chain, &keep);
                naive_s.push(s);
                naive_b.push(b);
                continue;
            }
            let chain = copy_chain(&master, &work.join("planned"));
            let spec = work.join("spec.yaml");
            let mut y = format!(
                "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: bench\nspec:\n  source:\n    file: {}\n  snapshots:\n",
                chain.last().unwrap().display()
            );
            for k in keep {
                y.push_str(&format!(
                    "    - name: p{k}\n      file: {}\n",
                    chain[k].display()
                ));
            }
            std::fs::write(&spec, y).unwrap();
            let before = (run == 0)
                .then(|| views_sha(&[chain[2].clone(), chain[5].clone(), chain[7].clone()]));
            let _ = std::fs::remove_dir_all(&state);
            let dc = |sub: &[&str]| {
                let mut c = Command::new(&bin);
                c.arg("--allowed-root")
                    .arg(&work)
                    .arg("--state-dir")
                    .arg(&state)
                    .args(sub)
                    .arg(&spec);
                c
            };
            let plan = dc(&["plan", "-o", "json", "-f"]).output().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
            predicted = v["disks"][0]["total_bytes"].as_u64().unwrap();
            if !convert_src.exists() {
                let _ = Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&convert_src)
                    .arg((8u64 << 30).to_string())
                    .status();
                let chunk = 64u64 << 20;
                let runs: Vec<(u64, u64)> = (0..predicted.div_ceil(chunk))
                    .map(|k| ((k * 96) << 20, chunk.min(predicted - k * chunk)))
                    .collect();
                write_runs(&convert_src, &runs, 7);
            }
            settle();
            let t = Instant::now();
            assert!(
                dc(&["apply", "-f"])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap()
                    .success(),
                "diskchain apply failed"
            );
            planned_s.push(t.elapsed().as_secs_f64());
            let rec: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(state.join("disks/default/bench.json")).unwrap(),
            )
            .unwrap();
            planned_b.push(rec["last_apply"]["written_bytes"].as_u64().unwrap());
            if let Some(before) = before {
                let out = Command::new("qemu-img")
                    .args(["info", "-U", "--backing-chain", "--output=json"])
                    .arg(chain.last().unwrap())
                    .output()
                    .unwrap();
                let infos: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let mut files: Vec<PathBuf> = infos
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| PathBuf::from(i["filename"].as_str().unwrap()))
                    .collect();
                files.reverse();
                assert_eq!(
                    views_sha(&files),
                    before,
                    "diskchain apply changed a kept view"
                );
            }
        }
        println!(
            "run {run}: diskchain {:.2} s {} MiB, naive {:.2} s {} MiB, convert {:?} s, disk {:.0} MiB/s",
            planned_s[run],
            planned_b[run] >> 20,
            naive_s[run],
            naive_b[run] >> 20,
            convert_s.last(),
            speeds[run] / 1048576.0
        );
    }
    let _ = std::fs::remove_dir_all(work.join("planned"));
    let _ = std::fs::remove_dir_all(work.join("naive"));
    let medb = |v: &[u64]| median(v.iter().map(|&x| x as f64).collect());
    let (ps, pb) = (median(planned_s.clone()), medb(&planned_b));
    let (ns, nb) = (median(naive_s.clone()), medb(&naive_b));
    let sp = median(speeds.clone());
    let limit = predicted as f64 / sp;
    let _ = std::fs::remove_file(&convert_src);
    // Run 0 built the convert source, so convert has one run fewer.
    let cs = if convert_s.is_empty() {
        f64::NAN
    } else {
        median(convert_s.clone())
    };
    let ds = if durable_s.is_empty() {
        f64::NAN
    } else {
        median(durable_s.clone())
    };
    println!(
        "qemu-img convert of the same {:.0} MiB: {cs:.2} s (flushed, -t writeback: {ds:.2} s, {:.2}x the unflushed one); diskchain apply takes {:.2}x that ({:.2}x the flushed one)",
        predicted as f64 / 1048576.0,
        ds / cs,
        ps / cs,
        ps / ds
    );
    println!(
        "apply: diskchain {ps:.1} s / {:.0} MiB, naive {ns:.1} s / {:.0} MiB: naive writes {:.2}x the bytes and takes {:.2}x the time; the disk writes {:.0} MiB/s, so {limit:.1} s is the limit for the planned bytes (diskchain takes {:.2}x that)",
        pb / 1048576.0,
        nb / 1048576.0,
        nb / pb,
        ns / ps,
        sp / 1048576.0,
        ps / limit
    );
    json!({
        "command": "cargo run --release -p diskchain --bin diskchain-bench -- apply",
        "machine": machine(),
        "runs": args.runs,
        "chain": {"layers": mib.len(), "written_mib_per_layer": mib, "kept_points": keep, "virtual_bytes": 8u64 << 30, "build_seconds": build_seconds},
        "predicted_bytes": predicted,
        "diskchain": {"seconds": planned_s, "written_bytes": planned_b, "median_seconds": ps, "median_written_bytes": pb},
        "naive_commit_per_point": {"seconds": naive_s, "written_bytes": naive_b, "median_seconds": ns, "median_written_bytes": nb},
        "disk_sequential_write_bytes_per_sec": {"runs": speeds, "median": sp},
        "qemu_img_convert_of_the_planned_bytes": {"seconds": convert_s, "median_seconds": cs},
        "qemu_img_convert_flushed_of_the_planned_bytes": {"cache": "writeback", "seconds": durable_s, "median_seconds": ds},
        "ratios": {"naive_over_diskchain_bytes": nb / pb, "naive_over_diskchain_seconds": ns / ps, "diskchain_seconds_over_disk_limit": ps / limit, "diskchain_seconds_over_convert": ps / cs, "diskchain_seconds_over_flushed_convert": ps / ds, "flushed_convert_over_convert": ds / cs},
    })
}

/// Writes `runs` of `(offset, length)` bytes of a pattern into the qcow2 `file` with qemu-io.
fn write_runs(file: &Path, runs: &[(u64, u64)], pattern: u64) {
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        let mut w = std::io::BufWriter::new(child.stdin.take().unwrap());
        for (off, len) in runs {
            writeln!(w, "write -P {} {off} {len}", pattern % 250 + 1).unwrap();
        }
        writeln!(w, "quit").unwrap();
    }
    assert!(child.wait().unwrap().success());
}

/// `diskchain plan -o json` of one spec: (total bytes, always-commit, always-stream, ops).
fn planned_bytes(bin: &Path, root: &Path, spec: &Path) -> (u64, u64, u64, Vec<String>) {
    let out = Command::new(bin)
        .arg("--allowed-root")
        .arg(root)
        .arg("--state-dir")
        .arg(root.join("state"))
        .args(["plan", "-o", "json", "-f"])
        .arg(spec)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &v["disks"][0];
    assert!(
        d.is_object(),
        "plan failed: {v} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ops = d["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["op"].as_str().unwrap().to_string())
        .collect();
    (
        d["total_bytes"].as_u64().unwrap(),
        d["baselines"]["always_commit"].as_u64().unwrap(),
        d["baselines"]["always_stream"].as_u64().unwrap(),
        ops,
    )
}

fn bytes_bench(args: &Args) -> serde_json::Value {
    let work = args.workdir.join("bytes");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let work = work.canonicalize().unwrap();
    let bin = std::env::current_exe().unwrap().with_file_name("diskchain");
    let create = |p: &Path, backing: Option<&Path>, size: u64| {
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", "qcow2"]);
        if let Some(b) = backing {
            c.arg("-b").arg(b).args(["-F", "qcow2"]);
        }
        c.arg(p).arg(size.to_string());
        assert!(c.status().unwrap().success());
    };
    let spec = |dir: &Path, active: &Path, keep: &[&Path]| {
        let mut y = format!(
            "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: bench\nspec:\n  source:\n    file: {}\n  snapshots:",
            active.display()
        );
        if keep.is_empty() {
            y.push_str(" []\n");
        } else {
            y.push('\n');
            for (i, k) in keep.iter().enumerate() {
                y.push_str(&format!("    - name: p{i}\n      file: {}\n", k.display()));
            }
        }
        let f = dir.join("spec.yaml");
        std::fs::write(&f, y).unwrap();
        f
    };
    const M: u64 = 1 << 20;

    // The flatten case.
    let dir = work.join("flatten");
    std::fs::create_dir_all(&dir).unwrap();
    let (base, active) = (dir.join("base.qcow2"), dir.join("active.qcow2"));
    create(&base, None, 256 * M);
    write_runs(&base, &[(0, 254 * M)], 1);
    create(&active, Some(&base), 256 * M);
    write_runs(&active, &[(100 * M, 2 * M)], 2);
    let (fb, fc, fs, fops) = planned_bytes(&bin, &work, &spec(&dir, &active, &[]));
    println!(
        "flatten: diskchain {} KiB ({fops:?}), libvirt commit-down {} KiB, always-stream {} KiB",
        fb >> 10,
        fc >> 10,
        fs >> 10
    );

    // The random mix.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let cases = 60;
    let mut rows = Vec::new();
    let (mut sum_d, mut sum_c, mut sum_s) = (0u64, 0u64, 0u64);
    let (mut below_c, mut below_s, mut above_min) = (0, 0, 0);
    for case in 0..cases {
        let dir = work.join(format!("mix{case}"));
        std::fs::create_dir_all(&dir).unwrap();
        let n = 2 + rng.below(7) as usize;
        let mut layers: Vec<PathBuf> = Vec::new();
        for i in 0..n {
            let p = dir.join(format!("l{i}.qcow2"));
            create(&p, layers.last().map(|b| b.as_path()), 64 * M);
            let mut runs = Vec::new();
            for _ in 0..1 + rng.below(4) {
                let len = (1 + rng.below(if i == 0 { 24 } else { 8 })) * M;
                let off = rng.below(64 - len / M) * M;
                runs.push((off, len));
            }
            write_runs(&p, &runs, case * 10 + i as u64);
            layers.push(p);
        }
        let keep: Vec<&Path> = layers[..n - 1]
            .iter()
            .filter(|_| rng.below(3) == 0)
            .map(|p| p.as_path())
            .collect();
        let (d, c, s, ops) = planned_bytes(&bin, &work, &spec(&dir, &layers[n - 1], &keep));
        sum_d += d;
        sum_c += c;
        sum_s += s;
        below_c += usize::from(d < c);
        below_s += usize::from(d < s);
        above_min += usize::from(d > c.min(s));
        rows.push(json!({"layers": n, "kept": keep.len(), "diskchain": d, "commit_down": c, "always_stream": s, "ops": ops}));
    }
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "random mix of {cases} chains: diskchain {} MiB, commit-down {} MiB ({:.2}x), always-stream {} MiB ({:.2}x); diskchain below commit-down in {below_c}, below always-stream in {below_s}, above the better of the two in {above_min}",
        sum_d >> 20,
        sum_c >> 20,
        sum_c as f64 / sum_d as f64,
        sum_s >> 20,
        sum_s as f64 / sum_d as f64
    );
    json!({
        "command": "cargo run --release -p diskchain --bin diskchain-bench -- bytes",
        "machine": machine(),
        "flatten": {"base_data_bytes": 254 * M, "active_data_bytes": 2 * M, "diskchain": fb, "ops": fops, "libvirt_commit_down": fc, "always_stream": fs, "always_stream_over_diskchain": fs as f64 / fb as f64},
        "random_mix": {
            "cases": cases,
            "total": {"diskchain": sum_d, "commit_down": sum_c, "always_stream": sum_s},
            "ratios": {"commit_down_over_diskchain": sum_c as f64 / sum_d as f64, "always_stream_over_diskchain": sum_s as f64 / sum_d as f64},
            "cases_diskchain_below_commit_down": below_c,
            "cases_diskchain_below_always_stream": below_s,
            "cases_diskchain_above_the_better_baseline": above_min,
            "rows": rows,
        },
    })
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The file-mode agent over `--disks` two-layer disks (one directory each, in one root), as a
/// host with many disks meets it: the first pass from an empty state directory over specs that
/// already match (each keeps its base as a point), no-op resyncs, then every spec adding a point
/// (one snapshot each) until all converge; the agent's peak memory over the whole run.
fn agent_bench(args: &Args) -> serde_json::Value {
    let disks = args.disks.unwrap_or(1000);
    let work = args.workdir.join("agent");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("img")).unwrap();
    std::fs::create_dir_all(work.join("specs")).unwrap();
    let work = work.canonicalize().unwrap();
    let t = Instant::now();
    let spec = |d: usize, extra: &str| {
        format!(
            "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: d{d}\nspec:\n  source:\n    file: {}\n  snapshots:\n    - name: base\n      file: {}\n{extra}",
            work.join(format!("img/d{d}/top.qcow2")).display(),
            work.join(format!("img/d{d}/base.qcow2")).display(),
        )
    };
    for d in 0..disks {
        let dir = work.join(format!("img/d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
        assert!(
            qimg(&["create", "-q", "-f", "qcow2"], &[&base])
                .arg("1M")
                .status()
                .unwrap()
                .success()
        );
        assert!(
            qimg(
                &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"],
                &[&base, &top]
            )
            .status()
            .unwrap()
            .success()
        );
        std::fs::write(work.join(format!("specs/d{d}.yaml")), spec(d, "")).unwrap();
    }
    let setup_seconds = t.elapsed().as_secs_f64();
    let bin = std::env::current_exe().unwrap().with_file_name("diskchain");
    let log = work.join("agent.log");
    let t = Instant::now();
    let mut child = Command::new(&bin)
        .env("DISKCHAIN_LOG", "diskchain=debug")
        .args(["--log-format", "json", "--allowed-root"])
        .arg(work.join("img"))
        .arg("--state-dir")
        .arg(work.join("state"))
        .args(["agent", "--resync", "2s", "--max-parallel", "2", "--specs"])
        .arg(work.join("specs"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let count = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(what))
            .count()
    };
    let wait_synced = |n: usize, what: &str| loop {
        std::thread::sleep(Duration::from_millis(200));
        if count("in sync with its spec") >= n {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3600),
            "{what}: not done in an hour"
        );
    };
    wait_synced(disks, "the first pass");
    let first_pass_seconds = t.elapsed().as_secs_f64();
    // No-op resyncs: every disk is in sync and recorded now.
    let passes_before = count("pass done");
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2 * (args.runs as u64 + 1)));
    let cpu1 = cpu_seconds(pid);
    let elapsed = t0.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let pass_seconds: Vec<f64> = text
        .lines()
        .filter(|l| l.contains("pass done"))
        .skip(passes_before)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["seconds"].as_f64())
        .collect();
    let passes = pass_seconds.len().max(1) as f64;
    let wall = median(pass_seconds.clone());
    let cpu_per_pass = (cpu1 - cpu0) / passes;
    // Every spec adds a point: one snapshot per disk.
    let synced_before = count("in sync with its spec");
    let t1 = Instant::now();
    for d in 0..disks {
        std::fs::write(
            work.join(format!("specs/d{d}.yaml")),
            spec(d, "    - name: snap\n"),
        )
        .unwrap();
    }
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if count("in sync with its spec") >= synced_before + disks {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(3600),
            "the snapshots did not converge in an hour"
        );
    }
    let converge_seconds = t1.elapsed().as_secs_f64();
    let peak_kib = vm_hwm_kib(pid);
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    println!(
        "agent, {disks} disks: first pass from an empty state directory {first_pass_seconds:.1} s; a no-op resync {wall:.2} s wall (median of {}), {cpu_per_pass:.2} CPU s; one snapshot each converged in {converge_seconds:.1} s; peak memory {} MiB",
        pass_seconds.len(),
        peak_kib / 1024
    );
    json!({
        "command": format!("cargo run --release -p diskchain --bin diskchain-bench -- agent --disks {disks}"),
        "machine": machine(),
        "disks": disks,
        "setup_seconds": setup_seconds,
        "first_pass_seconds": first_pass_seconds,
        "noop_resync_wall_seconds": pass_seconds,
        "noop_resync_wall_median_seconds": wall,
        "noop_resync_cpu_seconds_per_pass": cpu_per_pass,
        "measured_for_seconds": elapsed,
        "snapshot_converge_seconds": converge_seconds,
        "peak_rss_kib": peak_kib,
    })
}

/// `qemu-img ARGS FILES...`
fn qimg(args: &[&str], files: &[&Path]) -> Command {
    let mut c = Command::new("qemu-img");
    c.args(args);
    for f in files {
        c.arg(f);
    }
    c
}

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("virsh");
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (Re)defines and starts the benchmark domain on `active`; returns its QEMU's pid.
fn start_domain(name: &str, active: &Path) -> u32 {
    let _ = Command::new("virsh")
        .args(["-c", "qemu:///system", "destroy", name])
        .output();
    let _ = Command::new("virsh")
        .args(["-c", "qemu:///system", "undefine", name])
        .output();
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        active.display()
    );
    let f = std::env::temp_dir().join(format!("{name}.xml"));
    std::fs::write(&f, xml).unwrap();
    virsh(&["define", &f.to_string_lossy()]);
    virsh(&["start", name]);
    diskchain::libvirt::qemu_pid(name).expect("the domain's QEMU pid")
}

fn qemu_wchar(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One `virsh blockcommit` per removed point, bottom-up: the point takes its overlay's content
/// (`--top OVERLAY --base POINT`), so the kept points above stay intact.
fn live_naive(name: &str, chain: &[PathBuf], keep: &[usize]) {
    let mut cur: Vec<PathBuf> = chain.to_vec();
    let mut ids: Vec<usize> = (0..chain.len()).collect();
    for x in 0..chain.len() - 1 {
        if keep.contains(&x) {
            continue;
        }
        let pos = ids.iter().position(|&i| i == x).unwrap();
        let overlay = pos + 1;
        let (top, base) = (
            cur[overlay].to_string_lossy().into_owned(),
            cur[pos].to_string_lossy().into_owned(),
        );
        if overlay == cur.len() - 1 {
            virsh(&[
                "blockcommit",
                name,
                "vda",
                "--active",
                "--pivot",
                "--wait",
                "--base",
                &base,
            ]);
        } else {
            virsh(&[
                "blockcommit",
                name,
                "vda",
                "--wait",
                "--top",
                &top,
                "--base",
                &base,
            ]);
        }
        ids[pos] = ids[overlay];
        cur.remove(overlay);
        ids.remove(overlay);
    }
}

/// `diskchain apply` of a spec keeping the points `keep` of `chain` (bound by name: the first
/// apply binds them to their files, later ones find them in the state).
fn live_apply(bin: &Path, dir: &Path, domain: &str, chain: &[PathBuf], keep: &[usize]) {
    let spec = dir.join("spec.yaml");
    let mut y = format!(
        "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: live\nspec:\n  source:\n    libvirt: {{ domain: {domain}, target: vda }}\n  snapshots:\n"
    );
    for &k in keep {
        y.push_str(&format!(
            "    - {{ name: p{k}, file: {} }}\n",
            chain[k].display()
        ));
    }
    std::fs::write(&spec, y).unwrap();
    let out = Command::new(bin)
        .arg("--allowed-root")
        .arg(dir)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["apply", "-f"])
        .arg(&spec)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn live_bench(args: &Args) -> serde_json::Value {
    // QEMU runs as libvirt's user: the images live where it can reach them.
    let work = PathBuf::from("/var/tmp/diskchain-bench-live");
    std::fs::create_dir_all(&work).unwrap();
    let _ = Command::new("chmod").arg("755").arg(&work).status();
    let mib: [u64; 8] = [512, 256, 192, 256, 128, 256, 192, 64];
    let keep = [0usize, 3, 6];
    let removed: Vec<usize> = (0..mib.len() - 1).filter(|i| !keep.contains(i)).collect();
    let master = build_apply_chain(&work.join("master"), &mib);
    let bin = std::env::current_exe().unwrap().with_file_name("diskchain");
    let name = "diskchain-bench-live";
    let sides = ["diskchain", "virsh-per-point", "diskchain-per-point"];
    let mut secs: Vec<Vec<f64>> = vec![vec![]; sides.len()];
    let mut bytes: Vec<Vec<f64>> = vec![vec![]; sides.len()];
    for run in 0..args.runs {
        // Rotate which side runs first, so drift in the machine's load hits all alike.
        for k in 0..sides.len() {
            let side_i = (run + k) % sides.len();
            let side = sides[side_i];
            let dir = work.join(side);
            let chain = copy_chain(&master, &dir);
            let _ = std::fs::remove_dir_all(dir.join("state"));
            let _ = Command::new("chmod")
                .arg("-R")
                .arg("a+rX")
                .arg(&dir)
                .status();
            let views: Vec<String> = keep
                .iter()
                .map(|&k| views_sha(&chain[k..=k])[0].clone())
                .collect();
            let pid = start_domain(name, chain.last().unwrap());
            settle();
            let before = qemu_wchar(pid);
            let t = Instant::now();
            match side {
                "diskchain" => live_apply(&bin, &dir, name, &chain, &keep),
                "virsh-per-point" => live_naive(name, &chain, &keep),
                _ => {
                    // The same one-point-at-a-time sequence, each step run by diskchain: a plan
                    // that drops one more point, bottom-up.
                    let mut kept: Vec<usize> = (0..mib.len() - 1).collect();
                    for r in &removed {
                        kept.retain(|k| k != r);
                        live_apply(&bin, &dir, name, &chain, &kept);
                    }
                }
            }
            let secs_run = t.elapsed().as_secs_f64();
            let bytes_run = qemu_wchar(pid) - before;
            // Every side ends with the kept points, in order, each reading as before (checked,
            // not assumed).
            let mut files: Vec<PathBuf> = virsh(&["dumpxml", name])
                .lines()
                .filter_map(|l| {
                    l.trim()
                        .strip_prefix("<source file='")
                        .and_then(|r| r.split('\'').next())
                        .map(PathBuf::from)
                })
                .collect();
            files.reverse();
            assert_eq!(files.len(), keep.len() + 1, "{side}: {files:?}");
            let now = views_sha(&files[..keep.len()]);
            assert_eq!(now, views, "{side}: the kept points read as before");
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", "destroy", name])
                .output();
            eprintln!("{side}: {} MB in {secs_run:.2} s", bytes_run / 1_000_000);
            secs[side_i].push(secs_run);
            bytes[side_i].push(bytes_run as f64);
        }
    }
    let _ = Command::new("virsh")
        .args(["-c", "qemu:///system", "undefine", name])
        .output();
    let med = |v: &Vec<f64>| median(v.clone());
    let (ps, pb) = (med(&secs[0]), med(&bytes[0]));
    let (ns, nb) = (med(&secs[1]), med(&bytes[1]));
    let (ds, db) = (med(&secs[2]), med(&bytes[2]));
    println!(
        "live removal of {} points: diskchain {:.0} MB in {ps:.2} s; one virsh blockcommit per point {:.0} MB in {ns:.2} s ({:.2}x the bytes, {:.2}x the time); the same per-point sequence through diskchain {:.0} MB in {ds:.2} s ({:.2}x, {:.2}x)",
        removed.len(),
        pb / 1e6,
        nb / 1e6,
        nb / pb,
        ns / ps,
        db / 1e6,
        db / pb,
        ds / ps
    );
    let side = |i: usize| json!({ "bytes_median": med(&bytes[i]), "seconds_median": med(&secs[i]), "bytes": bytes[i], "seconds": secs[i] });
    json!({
        "machine": machine(),
        "chain_mib_written_per_layer": mib,
        "kept_layers": keep,
        "removed_layers": removed,
        "runs": args.runs,
        "diskchain": side(0),
        "virsh_blockcommit_per_point": side(1),
        "diskchain_per_point": side(2),
        "ratio_bytes_virsh_per_point_over_diskchain": nb / pb,
        "ratio_seconds_virsh_per_point_over_diskchain": ns / ps,
        "ratio_bytes_diskchain_per_point_over_diskchain": db / pb,
        "ratio_seconds_diskchain_per_point_over_diskchain": ds / ps,
    })
}

/// Total size of the regular files under `dir` (what a backup tool has written there).
fn dir_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                n += dir_bytes(&e.path());
            } else if m.is_file() {
                n += m.len();
            }
        }
    }
    n
}

/// A guest write through the domain's own virtio disk (HMP `qemu-io` on its block backend).
fn guest_write(name: &str, pattern: u64, offset: u64, len: u64) {
    virsh(&[
        "qemu-monitor-command",
        name,
        "--hmp",
        &format!(
            "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"write -P {pattern} {offset} {len}\""
        ),
    ]);
}

/// The active image of the domain's `vda`.
fn domain_active(name: &str) -> PathBuf {
    virsh(&["dumpxml", name])
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("<source file='")
                .and_then(|r| r.split('\'').next())
                .map(PathBuf::from)
        })
        .expect("the domain's disk")
}

fn timed(mut c: Command) -> f64 {
    let t = Instant::now();
    let out = c.output().expect("run");
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed().as_secs_f64()
}

/// Live backups of one running domain, the sides on fresh copies of the same chain, the order
/// rotating per run: diskchain (libvirt push mode, a checkpoint per backup, incrementals onto the
/// previous point), virtnbdbackup (pull mode over NBD, its own format), and a full `qemu-img
/// convert` per backup. Per side: a full, 64 MiB of guest writes in 16 places, an incremental,
/// then a restore of the incremental to a standalone image, checked against the guest's view.
/// Then, offline, retention: after six backups, keeping the last two, the bytes diskchain's
/// merges write against a new full (virtnbdbackup's only way to drop old increments) and against
/// always-stream.
fn backup_bench(args: &Args) -> serde_json::Value {
    let work = PathBuf::from("/var/tmp/diskchain-bench-backup");
    std::fs::create_dir_all(&work).unwrap();
    let _ = Command::new("chmod").arg("755").arg(&work).status();
    let master = build_apply_chain(&work.join("master"), &[512, 64]);
    let bin = std::env::current_exe().unwrap().with_file_name("diskchain");
    let name = "diskchain-bench-backup";
    let sides = ["diskchain", "virtnbdbackup", "qemu-img-convert"];
    // Per side: full seconds, full bytes, incremental seconds, incremental bytes, restore seconds.
    let mut m: Vec<[Vec<f64>; 5]> = (0..sides.len()).map(|_| Default::default()).collect();
    // diskchain's own part of its incremental's time: the SHA-256 of the point's whole view,
    // taken at backup time (the other tools check nothing).
    let mut hash_secs: Vec<f64> = Vec::new();
    for run in 0..args.runs {
        for k in 0..sides.len() {
            let side_i = (run + k) % sides.len();
            let side = sides[side_i];
            let dir = work.join(side);
            let chain = copy_chain(&master, &dir);
            let _ = Command::new("chmod")
                .arg("-R")
                .arg("a+rX")
                .arg(&dir)
                .status();
            start_domain(name, chain.last().unwrap());
            let out = dir.join("backups");
            let spec = dir.join("spec.yaml");
            std::fs::write(
                &spec,
                format!(
                    "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: vda\nspec:\n  source:\n    libvirt: {{ uri: \"qemu:///system\", domain: {name}, target: vda }}\n  snapshots:\n    - name: base\n      file: {}\n  backup:\n    repository: {}\n",
                    chain[0].display(),
                    out.display()
                ),
            )
            .unwrap();
            let dc = |a: &[&str]| {
                let mut c = Command::new(&bin);
                c.arg("--allowed-root")
                    .arg(&dir)
                    .arg("--state-dir")
                    .arg(dir.join("state"))
                    .args(a);
                c
            };
            let backup_cmd = |level: &str, n: usize| -> Command {
                match side {
                    "diskchain" => {
                        let mut c = dc(&["backup", "-f"]);
                        c.arg(&spec);
                        c
                    }
                    "virtnbdbackup" => {
                        let mut c = Command::new("virtnbdbackup");
                        c.args(["-d", name, "-l", level, "-o"]).arg(&out);
                        c
                    }
                    _ => {
                        std::fs::create_dir_all(&out).unwrap();
                        let mut c = Command::new("qemu-img");
                        c.args(["convert", "-U", "-f", "qcow2", "-O", "qcow2"])
                            .arg(domain_active(name))
                            .arg(out.join(format!("full-{n}.qcow2")));
                        c
                    }
                }
            };
            settle();
            let fs = timed(backup_cmd("full", 0));
            let fb = dir_bytes(&out) as f64;
            for i in 0..16u64 {
                guest_write(name, 100 + i, (i * 480 + 7) << 20, 4 << 20);
            }
            virsh(&[
                "qemu-monitor-command",
                name,
                "--hmp",
                "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"flush\"",
            ]);
            let want = views_sha(&[domain_active(name)])[0].clone();
            settle();
            let is = timed(backup_cmd("inc", 1));
            let ib = dir_bytes(&out) as f64 - fb;
            // Restore the incremental to a standalone image, and check it.
            let restored = dir.join("restored");
            let _ = std::fs::remove_dir_all(&restored);
            std::fs::create_dir_all(&restored).unwrap();
            settle();
            let (rs, image) = match side {
                "diskchain" => {
                    let listed = dc(&["backups", "-o", "json", "-f"])
                        .arg(&spec)
                        .output()
                        .unwrap();
                    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
                    let point = v["disks"][0]["points"][1]["point"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    let file = PathBuf::from(v["disks"][0]["points"][1]["file"].as_str().unwrap());
                    settle();
                    let t = Instant::now();
                    let _ = diskchain::backup::repo::view_checksums(&file);
                    hash_secs.push(t.elapsed().as_secs_f64());
                    settle();
                    let to = restored.join("vda.qcow2");
                    let mut c = dc(&["restore", "--disk", "vda", "--point", &point, "--to"]);
                    c.arg(&to).arg("-f").arg(&spec);
                    (timed(c), to)
                }
                "virtnbdbackup" => {
                    let mut c = Command::new("virtnbdrestore");
                    c.arg("-i").arg(&out).arg("-o").arg(&restored);
                    let t = timed(c);
                    // virtnbdrestore returns while the qemu-nbd it started may still write.
                    let image = std::fs::read_dir(&restored)
                        .unwrap()
                        .flatten()
                        .map(|e| e.path())
                        .find(|p| p.extension().is_some_and(|e| e == "qcow2"))
                        .expect("virtnbdrestore wrote an image");
                    let t0 = Instant::now();
                    while Command::new("fuser")
                        .arg(&image)
                        .output()
                        .is_ok_and(|o| o.status.success())
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    (t + t0.elapsed().as_secs_f64(), image)
                }
                _ => (0.0, out.join("full-1.qcow2")),
            };
            let got = views_sha(std::slice::from_ref(&image))[0].clone();
            assert_eq!(
                got, want,
                "{side}: the restored incremental reads as the guest did"
            );
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", "destroy", name])
                .output();
            let _ = Command::new("virsh")
                .args([
                    "-c",
                    "qemu:///system",
                    "undefine",
                    "--checkpoints-metadata",
                    name,
                ])
                .output();
            eprintln!(
                "{side}: full {:.0} MB in {fs:.2} s, incremental {:.1} MB in {is:.2} s, restore {rs:.2} s",
                fb / 1e6,
                ib / 1e6
            );
            for (v, x) in m[side_i].iter_mut().zip([fs, fb, is, ib, rs]) {
                v.push(x);
            }
        }
    }
    let med = |v: &Vec<f64>| median(v.clone());
    let side = |i: usize| {
        json!({
            "full_seconds_median": med(&m[i][0]), "full_bytes_median": med(&m[i][1]),
            "incremental_seconds_median": med(&m[i][2]), "incremental_bytes_median": med(&m[i][3]),
            "restore_seconds_median": med(&m[i][4]),
            "full_seconds": m[i][0], "full_bytes": m[i][1], "incremental_seconds": m[i][2],
            "incremental_bytes": m[i][3], "restore_seconds": m[i][4],
        })
    };
    let retention = retention_bytes(&work, &bin);
    println!(
        "live backups: diskchain full {:.0} MB {:.2} s, incremental {:.1} MB {:.2} s, restore {:.2} s; virtnbdbackup full {:.0} MB {:.2} s, incremental {:.1} MB {:.2} s, restore {:.2} s; qemu-img convert per backup {:.0} MB {:.2} s",
        med(&m[0][1]) / 1e6,
        med(&m[0][0]),
        med(&m[0][3]) / 1e6,
        med(&m[0][2]),
        med(&m[0][4]),
        med(&m[1][1]) / 1e6,
        med(&m[1][0]),
        med(&m[1][3]) / 1e6,
        med(&m[1][2]),
        med(&m[1][4]),
        med(&m[2][3]) / 1e6,
        med(&m[2][2]),
    );
    println!(
        "diskchain's incremental includes the checksums of the point's view (sha256 of the whole raw view, and the sparse one): {:.2} s of it",
        med(&hash_secs)
    );
    println!("retention: {retention}");
    json!({
        "machine": machine(),
        "chain_mib_written_per_layer": [512, 64],
        "guest_writes_mib": 64,
        "runs": args.runs,
        "diskchain": side(0),
        "virtnbdbackup": side(1),
        "qemu_img_convert_per_backup": side(2),
        "diskchain_incremental_view_hash_seconds_median": med(&hash_secs),
        "diskchain_incremental_view_hash_seconds": hash_secs,
        "ratio_incremental_bytes_virtnbdbackup_over_diskchain": med(&m[1][3]) / med(&m[0][3]),
        "ratio_incremental_seconds_virtnbdbackup_over_diskchain": med(&m[1][2]) / med(&m[0][2]),
        "ratio_incremental_bytes_convert_over_diskchain": med(&m[2][3]) / med(&m[0][3]),
        "ratio_restore_seconds_virtnbdrestore_over_diskchain": med(&m[1][4]) / med(&m[0][4]),
        "retention": retention,
    })
}

/// Offline: six backups of a disk with 8 MiB of writes between them, then a policy keeping the
/// last two. The bytes diskchain's merges write, against writing a new full of the newest point
/// (virtnbdbackup's only way to drop increments) and against always-stream.
fn retention_bytes(work: &Path, bin: &Path) -> serde_json::Value {
    let dir = work.join("retention");
    let chain = copy_chain(&build_apply_chain(&work.join("master"), &[512, 64]), &dir);
    let repo = dir.join("backups");
    let spec = dir.join("spec.yaml");
    let write_spec = |retention: &str| {
        std::fs::write(
            &spec,
            format!(
                "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: vda\nspec:\n  source:\n    file: {}\n  snapshots:\n    - name: base\n      file: {}\n  backup:\n    repository: {}\n{retention}",
                chain[1].display(),
                chain[0].display(),
                repo.display()
            ),
        )
        .unwrap();
    };
    write_spec("");
    let dc = |a: &[&str]| {
        let mut c = Command::new(bin);
        c.arg("--allowed-root")
            .arg(&dir)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(a)
            .arg("-f")
            .arg(&spec);
        c
    };
    for i in 0..6u64 {
        if i > 0 {
            let mut q = Command::new("qemu-io");
            q.args(["-f", "qcow2"]).arg(&chain[1]);
            for k in 0..8u64 {
                q.arg("-c").arg(format!(
                    "write -P {} {}M 1M",
                    10 + i,
                    (i * 700 + k * 97) % 8000
                ));
            }
            assert!(q.output().unwrap().status.success());
        }
        assert!(dc(&["backup"]).output().unwrap().status.success());
    }
    write_spec("    retention:\n      keepLast: 2\n");
    let out = dc(&["plan", "-o", "json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let diskchain = v["retention"][0]["total_bytes"].as_u64().unwrap_or(0);
    // The plan's own comparison: stream every removed run into the point above it.
    let listed = dc(&["backups", "-o", "json"]).output().unwrap();
    let l: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let points: Vec<diskchain::backup::repo::Point> = serde_json::from_value(
        serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(repo.join("manifest.json")).unwrap(),
        )
        .unwrap()["points"]
            .clone(),
    )
    .unwrap();
    let keep: std::collections::BTreeSet<String> = points[points.len() - 2..]
        .iter()
        .map(|p| p.point.clone())
        .collect();
    let roots = Roots::new(std::slice::from_ref(&dir)).unwrap();
    let key = diskchain_crd::DiskKey::new(None, "vda");
    let (plan, _) = diskchain::backup::merge::plan(&repo, &points, &keep, &roots, &key)
        .unwrap()
        .expect("points to remove");
    let always_stream = plan.baselines.always_stream.unwrap_or(0);
    let always_commit = plan.baselines.always_commit.unwrap_or(0);
    // A new full of the newest point: its view's data.
    let newest = l["disks"][0]["points"][5]["file"].as_str().unwrap();
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(newest)
        .output()
        .unwrap();
    let extents: Vec<serde_json::Value> = serde_json::from_slice(&map.stdout).unwrap();
    let full: u64 = extents
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(
        diskchain, plan.total_bytes,
        "plan shows what the merge planner plans"
    );
    json!({
        "backups": 6, "kept": 2,
        "diskchain_merge_bytes": diskchain,
        "new_full_bytes": full,
        "always_stream_bytes": always_stream,
        "always_commit_bytes": always_commit,
        "ratio_new_full_over_diskchain": full as f64 / diskchain.max(1) as f64,
        "ratio_always_stream_over_diskchain": always_stream as f64 / diskchain.max(1) as f64,
    })
}

/// A minimal QMP client on the unix socket `sock` (retried until the daemon listens): sends
/// `qmp_capabilities`, then returns a function running one command and returning its reply.
fn qmp_connect(sock: &Path) -> impl FnMut(&str, serde_json::Value) -> serde_json::Value + use<> {
    use std::io::BufRead;
    let started = Instant::now();
    let s = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if started.elapsed() > Duration::from_secs(30) => panic!("QMP socket: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let mut call = move |cmd: &str, args: serde_json::Value| -> serde_json::Value {
        writeln!(w, "{}", json!({"execute": cmd, "arguments": args})).unwrap();
        loop {
            let mut line = String::new();
            assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    };
    call("qmp_capabilities", json!({}));
    call
}

/// The extents of `top`'s view that a pull into `top` copies: `(start, length)` of each data
/// extent allocated below it (`qemu-img map`).
fn pulled_extents(top: &Path) -> Vec<(u64, u64)> {
    let out = qimg(&["map", "--output=json", "-f", "qcow2"], &[top])
        .output()
        .unwrap();
    let m: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    m.iter()
        .filter(|e| e["depth"].as_u64().unwrap() > 0 && e["data"].as_bool().unwrap())
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// Pulls everything below `chain`'s top into it with QEMU's `block-stream` job in a
/// qemu-storage-daemon (the engine diskchain uses), or with `qemu-img rebase -b ''`, or by
/// parallel copy-on-read reads of exactly the extents to pull: `qemu-io -C` with one `aio_read`
/// per 2 MiB, or an NBD export of a `copy-on-read` node read by `qemu-img convert -m 16 -W`
/// into `null-co`. Each ends with its data flushed.
fn pull(engine: &str, chain: &[PathBuf], dir: &Path) {
    let top = chain.last().unwrap();
    let daemon = |extra: &[String]| {
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let mut c = Command::new("qemu-storage-daemon");
        for (i, l) in chain.iter().enumerate() {
            let node = json!({"driver": "qcow2", "node-name": format!("n{i}"),
                "file": {"driver": "file", "filename": l},
                "read-only": i + 1 < chain.len(),
                "backing": if i == 0 { serde_json::Value::Null } else { json!(format!("n{}", i - 1)) }});
            c.arg("--blockdev").arg(node.to_string());
        }
        c.args(extra)
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qmp",
                sock.display()
            ))
            .args(["--monitor", "chardev=qmp"])
            .stdout(Stdio::null());
        let child = c.spawn().unwrap();
        (child, qmp_connect(&sock))
    };
    let top_node = format!("n{}", chain.len() - 1);
    match engine {
        "block-stream" => {
            let (mut child, mut call) = daemon(&[]);
            let r = call(
                "block-stream",
                json!({"job-id": "s", "device": top_node, "auto-dismiss": false}),
            );
            assert!(r.get("return").is_some(), "{r}");
            loop {
                let jobs = call("query-jobs", json!({}));
                if jobs["return"][0]["status"] == "concluded" {
                    assert!(jobs["return"][0].get("error").is_none(), "{jobs}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            call("quit", json!({}));
            assert!(child.wait().unwrap().success());
        }
        "rebase" => {
            assert!(
                qimg(&["rebase", "-f", "qcow2", "-b", ""], &[top])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        "cor-aio" => {
            let mut c = Command::new("qemu-io");
            c.args(["-C", "-t", "writeback", "-f", "qcow2"]);
            for (start, len) in pulled_extents(top) {
                let mut at = start;
                while at < start + len {
                    let n = (start + len - at).min(2 << 20);
                    c.arg("-c").arg(format!("aio_read -q {at} {n}"));
                    at += n;
                }
            }
            c.args(["-c", "aio_flush", "-c", "flush"])
                .arg(top)
                .stdout(Stdio::null());
            assert!(c.status().unwrap().success());
        }
        "cor-nbd" => {
            let nbd = dir.join("nbd.sock");
            let cor = json!({"driver": "copy-on-read", "node-name": "cor", "file": top_node});
            let (mut child, mut call) = daemon(&[
                "--blockdev".into(),
                cor.to_string(),
                "--nbd-server".into(),
                format!("addr.type=unix,addr.path={}", nbd.display()),
                "--export".into(),
                "type=nbd,id=e,node-name=cor,name=e,writable=off".into(),
            ]);
            let ok = Command::new("qemu-img")
                .args(["convert", "-n", "-m", "16", "-W", "-f", "raw"])
                .arg(format!("nbd+unix:///e?socket={}", nbd.display()))
                .args(["--target-image-opts", "driver=null-co,size=8589934592"])
                .status()
                .unwrap()
                .success();
            assert!(ok);
            call("quit", json!({}));
            assert!(child.wait().unwrap().success());
        }
        other => panic!("no engine {other}"),
    }
    // Every engine's data on the disk before the clock stops.
    assert!(
        Command::new("sync")
            .arg("-f")
            .arg(top)
            .status()
            .unwrap()
            .success()
    );
}

/// `engines` (`bench-results/engines.json`): where an offline apply's time goes, engine by
/// engine. (1) Pulling 1 GiB into the top of a 3-layer chain (1,024, 512 and 256 MiB written)
/// with each engine of [`pull`]: the pulled top must read as before (`qemu-img compare`) and
/// have nothing left below it. (2) Two 640 MiB `qemu-img commit`s on two copies of that chain,
/// one after the other and side by side: whether independent steps in parallel would gain.
/// The order of the sides rotates per run; fresh copies, caches dropped.
fn engines_bench(args: &Args) -> serde_json::Value {
    let work = args.workdir.join("engines");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let work = work.canonicalize().unwrap();
    let master = build_apply_chain(&work.join("master"), &[1024, 512, 256]);
    let pulled_bytes: u64 = pulled_extents(master.last().unwrap())
        .iter()
        .map(|(_, l)| l)
        .sum();
    let engines = ["block-stream", "rebase", "cor-aio", "cor-nbd"];
    let mut times: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for run in 0..args.runs {
        let mut order = engines.to_vec();
        order.rotate_left(run % engines.len());
        for e in order {
            let dir = work.join("pull");
            let chain = copy_chain(&master, &dir);
            settle();
            let t = Instant::now();
            pull(e, &chain, &dir);
            times.entry(e).or_default().push(t.elapsed().as_secs_f64());
            let top = chain.last().unwrap();
            assert!(
                pulled_extents(top).is_empty(),
                "{e} left data below the top"
            );
            let same = qimg(&["compare", "-f", "qcow2", "-F", "qcow2"], &[top])
                .arg(master.last().unwrap())
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(same.success(), "{e} changed the top's view");
        }
        for side in if run % 2 == 0 {
            ["sequential", "parallel"]
        } else {
            ["parallel", "sequential"]
        } {
            let chains: Vec<Vec<PathBuf>> = ["a", "b"]
                .iter()
                .map(|d| copy_chain(&master, &work.join(d)))
                .collect();
            settle();
            let commit = |c: &[PathBuf]| {
                let mut cmd = qimg(&["commit", "-q", "-d", "-f", "qcow2", "-b"], &[&c[0]]);
                cmd.arg(&c[2]);
                cmd
            };
            let t = Instant::now();
            if side == "sequential" {
                for c in &chains {
                    assert!(commit(c).status().unwrap().success());
                }
            } else {
                let kids: Vec<_> = chains.iter().map(|c| commit(c).spawn().unwrap()).collect();
                for mut k in kids {
                    assert!(k.wait().unwrap().success());
                }
            }
            let key = if side == "sequential" {
                "two_commits_sequential"
            } else {
                "two_commits_parallel"
            };
            times
                .entry(key)
                .or_default()
                .push(t.elapsed().as_secs_f64());
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let medians: serde_json::Map<String, serde_json::Value> = times
        .iter()
        .map(|(k, v)| (k.to_string(), json!(median(v.clone()))))
        .collect();
    let m = |k: &str| medians[k].as_f64().unwrap();
    println!(
        "pull {} MiB: block-stream {:.2} s, rebase {:.2} s, copy-on-read aio {:.2} s, copy-on-read over NBD {:.2} s; two 640 MiB commits: one after the other {:.2} s, side by side {:.2} s",
        pulled_bytes >> 20,
        m("block-stream"),
        m("rebase"),
        m("cor-aio"),
        m("cor-nbd"),
        m("two_commits_sequential"),
        m("two_commits_parallel")
    );
    json!({
        "command": "cargo run --release -p diskchain --bin diskchain-bench -- engines",
        "machine": machine(),
        "runs": args.runs,
        "chain": {"written_mib_per_layer": [1024, 512, 256], "virtual_bytes": 8u64 << 30},
        "pulled_bytes": pulled_bytes,
        "seconds": times,
        "median_seconds": medians,
    })
}
