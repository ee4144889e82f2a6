//! Live disks on a real libvirtd: a running TCG domain (no OS) whose disk diskchain changes
//! through libvirt while a guest writer keeps writing through the guest's own virtio device.
//! Oracles: the chain in the domain's XML, `qemu-img convert` views of every kept point, and the
//! guest view rebuilt from what the writer wrote.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use diskchain_tests::env::{Env, spec_yaml_source};
use diskchain_tests::libvirt::{Domain, URI, live_view, open_up, sha, virsh};
use diskchain_tests::qemu::{create, io, run};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A chain in the env's root: `(name, writes)` per layer, base first; writes are
/// `(pattern, offset MiB, length MiB)`.
/// One layer to build: its name and its writes.
type LayerWrites<'a> = (&'a str, &'a [(u8, u64, u64)]);

fn build(env: &Env, layers: &[LayerWrites<'_>]) -> Vec<PathBuf> {
    open_up(env.dir.path());
    open_up(&env.root());
    let mut out: Vec<PathBuf> = Vec::new();
    for (name, writes) in layers {
        let p = env.img(&format!("{name}.qcow2"));
        create(&p, SIZE, out.last().map(|b| (b.as_path(), "qcow2")), &[]);
        let cmds: Vec<String> = writes
            .iter()
            .map(|(pat, off, len)| format!("write -P {pat} {} {}", off * MIB, len * MIB))
            .collect();
        io(&p, "qcow2", &cmds);
        out.push(p);
    }
    out
}

fn spec(disk: &str, domain: &str, points: &[(&str, Option<&Path>)], extra: &str) -> String {
    spec_with(disk, domain, "", points, extra)
}

/// `source_extra` goes inside `spec.source.libvirt` (", key: value").
fn spec_with(
    disk: &str,
    domain: &str,
    source_extra: &str,
    points: &[(&str, Option<&Path>)],
    extra: &str,
) -> String {
    spec_yaml_source(
        disk,
        &format!("libvirt: {{ uri: \"{URI}\", domain: {domain}, target: vda{source_extra} }}"),
        points,
        extra,
    )
}

/// Keeps writing 1 MiB chunks through the guest until stopped; returns what it wrote, in order.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(u8, u64)>>,
}

impl Writer {
    fn start(domain: &str, first_pattern: u8) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let d = Domain {
            name: domain.to_string(),
        };
        let handle = std::thread::spawn(move || {
            let mut wrote = Vec::new();
            let mut i: u64 = 0;
            while !s.load(Ordering::SeqCst) {
                let pat = first_pattern.wrapping_add((i % 50) as u8);
                let off = (40 + i % 16) * MIB;
                d.guest_write(pat, off, MIB);
                wrote.push((pat, off));
                i += 1;
            }
            std::mem::forget(d); // the test owns the domain
            wrote
        });
        Writer { stop, handle }
    }

    fn finish(self) -> Vec<(u8, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("writer thread")
    }
}

/// What the guest reads after the writer's writes, in order, on top of `view`.
fn apply_writes(view: &mut [u8], wrote: &[(u8, u64)]) {
    for (pat, off) in wrote {
        view[*off as usize..(*off + MIB) as usize].fill(*pat);
    }
}

/// A chain built in a fresh scratch host, each layer's view, and a running domain
/// `dc-<tag>-<pid>` on its top layer.
fn running_chain(
    tag: &str,
    layers: &[LayerWrites<'_>],
) -> (Env, Vec<PathBuf>, Vec<String>, Domain) {
    let env = Env::new();
    let l = build(&env, layers);
    let original: Vec<String> = l.iter().map(|p| view_of(p)).collect();
    let dom = Domain::start(
        &format!("dc-{tag}-{}", std::process::id()),
        l.last().expect("a chain has layers"),
    );
    (env, l, original, dom)
}

fn apply_ok(env: &Env, path: &Path, extra: &[&str]) {
    let out = env.apply(path, extra);
    assert_eq!(
        out.status.code(),
        Some(0),
        "apply failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The plan's result: (point name, file) per kept point.
fn points(env: &Env, path: &Path) -> Vec<(String, PathBuf)> {
    let plan: Value = env.plan_json(path);
    let d = &plan["disks"][0];
    assert_eq!(
        d["steps"].as_array().map(Vec::len),
        Some(0),
        "after apply the plan must be empty: {d}"
    );
    d["result"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| {
            Some((
                l["point"].as_str()?.to_string(),
                PathBuf::from(l["file"].as_str()?),
            ))
        })
        .collect()
}

fn view_of(file: &Path) -> String {
    sha(&live_view(file))
}

fn canon(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// The chain in the domain's XML is exactly the plan's result, and the persistent definition
/// names the same active image.
fn assert_chain(dom: &Domain, expected: &[PathBuf]) {
    let found: Vec<PathBuf> = dom.chain().iter().map(|p| canon(p)).collect();
    let expected: Vec<PathBuf> = expected.iter().map(|p| canon(p)).collect();
    assert_eq!(found, expected, "the domain's chain");
    assert_eq!(
        canon(&dom.persistent_source()),
        *found.last().unwrap(),
        "the persistent definition names the live active image"
    );
}

#[test]
fn live_points_are_removed_added_moved_and_reverted_through_the_spec() {
    let (env, l, original, dom) = running_chain(
        "live",
        &[
            ("base", &[(1, 0, 8)]),
            ("l1", &[(2, 4, 4), (12, 20, 2)]),
            ("l2", &[(3, 8, 4)]),
            ("l3", &[(4, 2, 2), (14, 24, 3)]),
            ("top", &[(5, 12, 1)]),
        ],
    );
    let name = dom.name.clone();
    let s = env.spec(
        "d.yaml",
        &spec(
            "web",
            &name,
            &[("golden", Some(&l[0])), ("mid", Some(&l[2]))],
            "",
        ),
    );

    // 1. Remove l1 (between two kept points) and l3 (below the active layer) while the guest writes.
    let mut guest = live_view(&l[4]);
    let w = Writer::start(&name, 100);
    std::thread::sleep(std::time::Duration::from_millis(300));
    apply_ok(&env, &s, &[]);
    let wrote = w.finish();
    assert!(!wrote.is_empty(), "the guest writer wrote during the apply");
    apply_writes(&mut guest, &wrote);
    dom.flush();
    let pts = points(&env, &s);
    assert_eq!(
        pts.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
        ["golden", "mid"]
    );
    assert_eq!(view_of(&pts[0].1), original[0], "golden unchanged");
    assert_eq!(view_of(&pts[1].1), original[2], "mid unchanged");
    let chain = dom.chain();
    assert_eq!(chain.len(), 3, "golden <- mid <- active: {chain:?}");
    assert_chain(
        &dom,
        &[pts[0].1.clone(), pts[1].1.clone(), chain[2].clone()],
    );
    assert_eq!(
        sha(&live_view(&chain[2])),
        sha(&guest),
        "the guest reads what it had plus everything it wrote"
    );

    // 2. A new snapshot: it holds the guest view at that moment.
    let before = sha(&live_view(&chain[2]));
    let s = env.spec(
        "d.yaml",
        &spec(
            "web",
            &name,
            &[("golden", None), ("mid", None), ("fresh", None)],
            "",
        ),
    );
    apply_ok(&env, &s, &[]);
    let pts = points(&env, &s);
    assert_eq!(pts.len(), 3);
    assert_eq!(
        view_of(&pts[2].1),
        before,
        "the new point holds the guest view"
    );
    let chain = dom.chain();
    assert_chain(
        &dom,
        &[
            pts[0].1.clone(),
            pts[1].1.clone(),
            pts[2].1.clone(),
            chain[3].clone(),
        ],
    );

    // 3. Live storage migration of the whole chain, the guest writing on.
    let moved = env.root().join("moved");
    std::fs::create_dir(&moved).unwrap();
    open_up(&moved);
    let mut guest = live_view(&chain[3]);
    let views: Vec<String> = pts.iter().map(|p| view_of(&p.1)).collect();
    let s = env.spec(
        "d.yaml",
        &spec(
            "web",
            &name,
            &[("golden", None), ("mid", None), ("fresh", None)],
            &format!(
                "  placement: {{ directory: {} }}\n  prune: true\n",
                moved.display()
            ),
        ),
    );
    let w = Writer::start(&name, 160);
    std::thread::sleep(std::time::Duration::from_millis(300));
    apply_ok(&env, &s, &[]);
    let wrote = w.finish();
    apply_writes(&mut guest, &wrote);
    dom.flush();
    let pts = points(&env, &s);
    let chain = dom.chain();
    assert_eq!(chain.len(), 4);
    for f in &chain {
        assert_eq!(
            canon(f).parent(),
            Some(canon(&moved).as_path()),
            "{f:?} moved"
        );
    }
    for (p, v) in pts.iter().zip(&views) {
        assert_eq!(&view_of(&p.1), v, "point {} unchanged by the move", p.0);
    }
    assert_chain(
        &dom,
        &[
            pts[0].1.clone(),
            pts[1].1.clone(),
            pts[2].1.clone(),
            chain[3].clone(),
        ],
    );
    assert_eq!(
        sha(&live_view(&chain[3])),
        sha(&guest),
        "guest view after the move"
    );

    // 4. Revert to "mid": a fresh active on it, the domain restarted, the old active kept.
    let discarded_view = sha(&guest);
    let s = env.spec(
        "d.yaml",
        &spec(
            "web",
            &name,
            &[("golden", None), ("mid", None)],
            &format!(
                "  placement: {{ directory: {} }}\n  revert: {{ to: mid, id: undo-1, restart: true, shutdownTimeout: 1s }}\n",
                moved.display()
            ),
        ),
    );
    apply_ok(&env, &s, &[]);
    assert!(dom.running(), "the domain runs again after the revert");
    let pts = points(&env, &s);
    let chain = dom.chain();
    assert_chain(
        &dom,
        &[pts[0].1.clone(), pts[1].1.clone(), chain[2].clone()],
    );
    assert_eq!(view_of(&chain[2]), original[2], "the guest reads point mid");
    let kept: Vec<PathBuf> = std::fs::read_dir(&moved)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("reverted"))
        .collect();
    assert_eq!(
        kept.len(),
        1,
        "the discarded active content is kept: {kept:?}"
    );
    assert_eq!(
        view_of(&kept[0]),
        discarded_view,
        "and reads as the guest had it"
    );
    // The same revert id does not revert again.
    apply_ok(&env, &s, &[]);
    assert_eq!(dom.chain(), chain);
    let out = run(std::process::Command::new("qemu-img")
        .args(["check", "-U", "-q"])
        .arg(&chain[1]));
    assert!(out.is_empty(), "{out}");
}

#[test]
fn an_active_commit_that_cannot_catch_up_is_cancelled_cleanly_or_throttled_to_the_end() {
    let (env, l, original, dom) = running_chain(
        "conv",
        &[
            ("base", &[(1, 0, 4)]),
            ("mid", &[(2, 0, 24)]),
            ("top", &[(3, 30, 6)]),
        ],
    );
    let name = dom.name.clone();
    let original_top = live_view(&l[2]);
    // Keep only the base: the cheapest live plan commits the active layer into mid and pivots,
    // a job that must catch up with the guest. At 1 MiB/s it cannot within one second.
    let yaml = |then: &str| {
        spec_with(
            "conv",
            &name,
            &format!(", converge: {{ within: 1s, then: {then}, throttleBytesPerSec: 1048576 }}"),
            &[("golden", Some(&l[0]))],
            "",
        )
    };
    let s = env.spec("c.yaml", &yaml("abort"));
    let plan = env.plan_json(&s);
    let ops: Vec<&str> = plan["disks"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["commit"], "{plan}");
    let w = Writer::start(&name, 50);
    let out = env.apply(&s, &["--max-bytes-per-sec", "1048576"]);
    let wrote = w.finish();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not catch up") && err.contains("cancelled"),
        "{err}"
    );
    assert_eq!(dom.blockjob(), "", "no job is left running");
    assert_chain(&dom, &l);
    assert_eq!(view_of(&l[0]), original[0], "the kept point keeps its view");
    // The guest reads what it had plus what it wrote (mid, which the plan removes, may already
    // hold part of the committed data: that changes no view above it).
    dom.flush();
    let mut guest = live_view(&l[2]);
    let mut expected = original_top;
    apply_writes(&mut expected, &wrote);
    assert_eq!(
        sha(&guest),
        sha(&expected),
        "the guest view after the cancel"
    );
    assert!(!wrote.is_empty());

    // Throttle instead: the guest is limited until the pivot, then the disk's I/O tuning is
    // put back as it was, every field of it (finding b_: only the write limit was kept).
    virsh(&[
        "blkdeviotune",
        &name,
        "vda",
        "--read-bytes-sec",
        "52428800",
        "--write-iops-sec",
        "4000",
        "--live",
    ]);
    let s = env.spec("c.yaml", &yaml("throttle"));
    let w = Writer::start(&name, 120);
    apply_ok(&env, &s, &["--max-bytes-per-sec", "4194304"]);
    let wrote = w.finish();
    dom.flush();
    apply_writes(&mut guest, &wrote);
    let tune = virsh(&["blkdeviotune", &name, "vda"]);
    assert!(
        tune.lines()
            .any(|l| l.starts_with("write_bytes_sec") && l.trim_end().ends_with(": 0")),
        "the guest write limit is lifted after the pivot:\n{tune}"
    );
    for (field, value) in [("read_bytes_sec", "52428800"), ("write_iops_sec", "4000")] {
        assert!(
            tune.lines()
                .any(|l| l.starts_with(field) && l.trim_end().ends_with(&format!(": {value}"))),
            "{field} is as it was before the throttle:\n{tune}"
        );
    }
    let chain = dom.chain();
    assert_eq!(chain.len(), 2, "golden <- active: {chain:?}");
    assert_eq!(view_of(&chain[0]), original[0]);
    assert_eq!(sha(&live_view(&chain[1])), sha(&guest), "the guest view");
}

#[test]
fn a_shut_off_domain_is_an_offline_disk_and_its_definition_follows_the_chain() {
    let (env, l, _, dom) = running_chain(
        "off",
        &[
            ("base", &[(1, 0, 8)]),
            ("l1", &[(2, 4, 4)]),
            ("l2", &[(3, 8, 4)]),
            ("top", &[(4, 2, 2)]),
        ],
    );
    let name = dom.name.clone();
    // A snapshot taken by hand through libvirt records the chain in the persistent definition.
    let snap = env.img("snap.qcow2");
    virsh(&[
        "snapshot-create-as",
        &name,
        "--disk-only",
        "--no-metadata",
        "--diskspec",
        &format!("vda,file={}", snap.display()),
    ]);
    dom.guest_write(9, 30 * MIB, MIB);
    dom.flush();
    virsh(&["destroy", &name]);
    assert!(!dom.running());
    let original: Vec<String> = l.iter().chain([&snap]).map(|p| view_of(p)).collect();
    let s = env.spec(
        "off.yaml",
        &spec(
            "off",
            &name,
            &[
                ("golden", Some(&l[0])),
                ("two", Some(&l[2])),
                ("later", None),
            ],
            "",
        ),
    );
    let plan = env.plan_json(&s);
    assert_eq!(plan["disks"][0]["live"], false, "{plan}");
    apply_ok(&env, &s, &[]);
    let pts = points(&env, &s);
    assert_eq!(pts.len(), 3);
    assert_eq!(view_of(&pts[0].1), original[0], "golden");
    assert_eq!(view_of(&pts[1].1), original[2], "two");
    assert_eq!(
        view_of(&pts[2].1),
        original[4],
        "later holds the disk as it was"
    );
    // The definition still names the (stable) active image, and libvirt reads the new chain
    // when the domain starts.
    assert_eq!(canon(&dom.persistent_source()), canon(&snap));
    virsh(&["start", &name]);
    let mut expected: Vec<PathBuf> = pts.iter().map(|p| p.1.clone()).collect();
    expected.push(snap.clone());
    assert_chain(&dom, &expected);
    dom.flush();
    assert_eq!(view_of(&snap), original[4], "the guest reads the same disk");

    // A revert while it is off needs no restart, and does not start it.
    virsh(&["destroy", &name]);
    let s = env.spec(
        "off.yaml",
        &spec(
            "off",
            &name,
            &[("golden", None), ("two", None)],
            "  revert: { to: two, id: back-1 }\n",
        ),
    );
    apply_ok(&env, &s, &[]);
    assert!(!dom.running());
    assert_eq!(view_of(&snap), original[2], "the disk reads as point two");
    virsh(&["start", &name]);
    let pts = points(&env, &s);
    assert_chain(&dom, &[pts[0].1.clone(), pts[1].1.clone(), snap.clone()]);
}

#[test]
fn a_guest_write_limit_left_by_a_killed_run_is_lifted_by_the_next() {
    let (env, l, original, dom) = running_chain(
        "thr",
        &[
            ("base", &[(1, 0, 4)]),
            ("mid", &[(2, 0, 24)]),
            ("top", &[(3, 30, 8)]),
        ],
    );
    let name = dom.name.clone();
    let s = env.spec(
        "t.yaml",
        &spec_with(
            "thr",
            &name,
            ", converge: { within: 1s, then: throttle, throttleBytesPerSec: 2097152 }",
            &[("golden", Some(&l[0]))],
            "",
        ),
    );
    let limit = || {
        virsh(&["blkdeviotune", &name, "vda"])
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes_sec"))
            .map(|v| v.trim_start_matches([' ', ':']).trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(limit(), "0");
    // The active commit of 8 MiB at 1 MiB/s outlasts its 1 s budget: the guest gets throttled.
    let mut first = env
        .diskchain(&["apply", "--max-bytes-per-sec", "1048576", "-f"])
        .arg(&s)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while limit() != "2097152" {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "the guest was never throttled"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(limit(), "2097152", "the limit outlives the killed run");
    // The next run adopts the job, waits for it, pivots, and lifts the limit.
    apply_ok(&env, &s, &[]);
    assert_eq!(limit(), "0", "the limit is lifted");
    let chain = dom.chain();
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(view_of(&chain[0]), original[0]);
    dom.flush();
    assert_eq!(view_of(&chain[1]), original[2], "the guest view");
}

#[test]
fn bad_live_input_is_refused_naming_the_field_and_changes_nothing() {
    let (env, l, _, dom) = running_chain(
        "bad",
        &[
            ("base", &[(1, 0, 2)]),
            ("mid", &[(2, 2, 2)]),
            ("top", &[(3, 4, 2)]),
        ],
    );
    let name = dom.name.clone();
    let before = env.fingerprints();
    let refused = |file: &str, yaml: String, needle: &str| {
        let s = env.spec(file, &yaml);
        for cmd in [&["plan", "-f"][..], &["apply", "-f"][..]] {
            let out = env.diskchain(cmd).arg(&s).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd:?} {file}: {err}");
            assert!(
                err.contains(needle) && err.contains(file),
                "{cmd:?} {file}: {err}"
            );
        }
        std::fs::remove_file(&s).unwrap();
    };
    refused(
        "nodomain.yaml",
        spec("a", "no-such-domain", &[("golden", Some(&l[0]))], ""),
        "has no domain",
    );
    refused(
        "notarget.yaml",
        spec("b", &name, &[("golden", Some(&l[0]))], "").replace("target: vda", "target: vdz"),
        "no disk with target \"vdz\"",
    );
    refused(
        "norestart.yaml",
        spec(
            "c",
            &name,
            &[("golden", Some(&l[0])), ("mid", Some(&l[1]))],
            "  revert: { to: golden, id: r1 }\n",
        ),
        "spec.revert",
    );
    refused(
        "badbudget.yaml",
        spec_with(
            "d",
            &name,
            ", converge: { within: soon }",
            &[("golden", Some(&l[0]))],
            "",
        ),
        "spec.source.libvirt.converge.within",
    );
    refused(
        "noagent.yaml",
        spec_with(
            "f",
            &name,
            ", quiesce: true",
            &[("golden", Some(&l[0])), ("fresh", None)],
            "",
        ),
        "spec.source.libvirt.quiesce",
    );
    refused(
        "badshutdown.yaml",
        spec(
            "e",
            &name,
            &[("golden", Some(&l[0]))],
            "  revert: { to: golden, id: r2, restart: true, shutdownTimeout: later }\n",
        ),
        "spec.revert.shutdownTimeout",
    );
    assert_eq!(env.fingerprints(), before, "no image was touched");
    assert_eq!(dom.chain().len(), 3);
    assert!(dom.running());
}

#[test]
fn random_live_removals_keep_every_point_and_the_guest_view() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x11fe);
    for round in 0..4 {
        let env = Env::new();
        let n = rng.random_range(3..=6usize);
        let writes: Vec<Vec<(u8, u64, u64)>> = (0..n)
            .map(|i| {
                (0..rng.random_range(1..=3))
                    .map(|k| {
                        (
                            (10 * i + k + 1) as u8,
                            rng.random_range(0..30u64),
                            rng.random_range(1..=4u64),
                        )
                    })
                    .collect()
            })
            .collect();
        let names: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
        let layers: Vec<LayerWrites<'_>> = names
            .iter()
            .zip(&writes)
            .map(|(n, w)| (n.as_str(), w.as_slice()))
            .collect();
        let l = build(&env, &layers);
        let original: Vec<String> = l.iter().map(|p| view_of(p)).collect();
        let keep: Vec<usize> = (0..n - 1).filter(|_| rng.random_bool(0.4)).collect();
        eprintln!("round {round}: {n} layers, keep {keep:?}");
        let name = format!("dc-rnd-{}-{round}", std::process::id());
        let dom = Domain::start(&name, &l[n - 1]);
        let wanted: Vec<(String, PathBuf)> = keep
            .iter()
            .map(|&k| (format!("k{k}"), l[k].clone()))
            .collect();
        let pts_ref: Vec<(&str, Option<&Path>)> = wanted
            .iter()
            .map(|(n, f)| (n.as_str(), Some(f.as_path())))
            .collect();
        let s = env.spec("r.yaml", &spec("rnd", &name, &pts_ref, ""));
        let mut guest = live_view(&l[n - 1]);
        let w = Writer::start(&name, 200);
        apply_ok(&env, &s, &[]);
        let wrote = w.finish();
        apply_writes(&mut guest, &wrote);
        dom.flush();
        let got = points(&env, &s);
        assert_eq!(got.len(), keep.len(), "round {round}: keep {keep:?}");
        for ((_, file), &k) in got.iter().zip(&keep) {
            assert_eq!(view_of(file), original[k], "round {round}: point k{k}");
        }
        let chain = dom.chain();
        let mut expected: Vec<PathBuf> = got.iter().map(|p| p.1.clone()).collect();
        expected.push(chain.last().unwrap().clone());
        assert_chain(&dom, &expected);
        assert_eq!(
            sha(&live_view(chain.last().unwrap())),
            sha(&guest),
            "round {round}: the guest view (keep {keep:?} of {n})"
        );
    }
}

#[test]
fn killing_diskchain_at_random_moments_of_a_live_plan_loses_nothing() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xd1e);
    for round in 0..5 {
        let (env, l, original, dom) = running_chain(
            &format!("kill-{round}"),
            &[
                ("base", &[(1, 0, 6)]),
                ("l1", &[(2, 4, 8)]),
                ("l2", &[(3, 10, 6)]),
                ("l3", &[(4, 14, 6)]),
                ("top", &[(5, 2, 4)]),
            ],
        );
        let name = dom.name.clone();
        let moved = env.root().join("moved");
        std::fs::create_dir(&moved).unwrap();
        open_up(&moved);
        // Remove l1 and l3, take a snapshot, and move everything: commits, a pull or an active
        // commit, a snapshot, copies and a mirror, at 8 MiB/s so that kills land inside jobs.
        let s = env.spec(
            "k.yaml",
            &spec(
                "kill",
                &name,
                &[
                    ("golden", Some(&l[0])),
                    ("two", Some(&l[2])),
                    ("snap", None),
                ],
                &format!("  placement: {{ directory: {} }}\n", moved.display()),
            ),
        );
        let guest_before = view_of(&l[4]);
        let delay = rng.random_range(50..2500u64);
        let mut child = env
            .diskchain(&["apply", "--max-bytes-per-sec", "8388608", "-f"])
            .arg(&s)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("round {round}: killed after {delay} ms (finished before: {finished})");
        apply_ok(&env, &s, &[]);
        let pts = points(&env, &s);
        assert_eq!(
            pts.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
            ["golden", "two", "snap"]
        );
        assert_eq!(view_of(&pts[0].1), original[0], "round {round}: golden");
        assert_eq!(view_of(&pts[1].1), original[2], "round {round}: two");
        assert_eq!(view_of(&pts[2].1), guest_before, "round {round}: snap");
        let chain = dom.chain();
        assert_eq!(chain.len(), 4, "round {round}: {chain:?}");
        for f in &chain {
            assert_eq!(
                canon(f).parent(),
                Some(canon(&moved).as_path()),
                "round {round}: {f:?} moved"
            );
        }
        assert_chain(
            &dom,
            &[
                pts[0].1.clone(),
                pts[1].1.clone(),
                pts[2].1.clone(),
                chain[3].clone(),
            ],
        );
        dom.flush();
        assert_eq!(
            view_of(&chain[3]),
            guest_before,
            "round {round}: the guest view"
        );
        assert_eq!(dom.blockjob(), "", "round {round}: no job left");
    }
}

/// F6: a libvirt disk whose driver type is raw is never parsed as a qcow2 header, even when its
/// content is one (a tenant wrote a header naming another tenant's image): plan and apply exit
/// 2 naming the driver, and nothing changes.
#[test]
fn a_libvirt_disk_with_a_raw_driver_is_never_read_as_a_header() {
    let env = Env::new();
    open_up(env.dir.path());
    let other = env.img("tenant-b.qcow2");
    create(&other, 64 << 20, None, &[]);
    io(&other, "qcow2", &["write -P 9 0 4M".into()]);
    let evil = env.dir.path().join("evil.qcow2");
    create(&evil, 0, Some((&other, "qcow2")), &[]);
    // tenant-a's raw disk holds, as guest data, a qcow2 header backed by tenant-b's image.
    let disk = env.img("tenant-a.img");
    std::fs::write(&disk, std::fs::read(&evil).unwrap()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let dom = Domain::define_with_driver("dc-raw-driver", &disk, "raw");
    let s = env.spec("a.yaml", &spec("tenant-a", &dom.name, &[], ""));
    let before = env.fingerprints();
    for cmd in [&["plan", "-f"][..], &["apply", "-f"][..]] {
        let out = env.diskchain(cmd).arg(&s).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {err}");
        assert!(
            err.contains("driver type=\"raw\"") && err.contains("a.yaml"),
            "{cmd:?}: {err}"
        );
        assert!(
            !err.contains("tenant-b"),
            "the raw content was parsed: {err}"
        );
    }
    assert_eq!(env.fingerprints(), before, "bad input changed a file");
}

/// A crash of the guest's QEMU right after diskchain reports a live pull done loses nothing
/// (finding g_/f_): QEMU's block pull rewrites the backing reference before the pulled clusters
/// reach the file, so diskchain makes the step durable before it counts as done. Also after a
/// commit and an active commit (h_, h3_). Nothing flushes the guest disk here.
#[test]
fn a_qemu_crash_right_after_a_live_step_loses_nothing() {
    // (keep, what the plan does to drop l3)
    for (round, keep_l3_top) in [(0, false), (1, false), (2, true)] {
        let (env, l, original, dom) = running_chain(
            &format!("crash{round}"),
            &[
                ("base", &[(1, 0, 6)]),
                ("l3", &[(4, 14, 6)]),
                ("top", &[(5, 2, 4), (6, 30, 20)]),
            ],
        );
        // Keep base only: l3 is pulled into the active layer (or, with top kept as a point,
        // the plan may commit); either way the guest must read what it read.
        let mut points: Vec<(&str, Option<&Path>)> = vec![("golden", Some(&l[0]))];
        if keep_l3_top {
            points.push(("snap", None));
        }
        let s = env.spec("d.yaml", &spec("d", &dom.name, &points, ""));
        apply_ok(&env, &s, &[]);
        let active = dom.chain().last().cloned().unwrap();
        dom.crash();
        assert_eq!(
            view_of(&active),
            original[2],
            "round {round}: the guest view after QEMU crashed"
        );
        assert_eq!(view_of(&l[0]), original[0], "round {round}: golden");
        for f in dom.chain() {
            assert_eq!(
                diskchain_tests::env::check(&f),
                0,
                "round {round}: qemu-img check {}",
                f.display()
            );
        }
        // The domain starts again on the planned chain and the rerun has nothing to do.
        virsh(&["start", &dom.name]);
        apply_ok(&env, &s, &[]);
        assert_eq!(
            view_of(&active),
            original[2],
            "round {round}: after restart"
        );
    }
}

/// Finding k_/j_/l_: a layer another libvirt domain's disk reads is shared, wherever that
/// domain's overlay lives (here outside the allowed roots) and whether it runs or not: a plan
/// that drops it routes around it (B's view never changes), and a revert of an active image
/// another domain reads is refused naming that domain and disk.
#[test]
fn other_domains_layers_are_shared_even_outside_the_roots() {
    for b_runs in [false, true] {
        let tag = if b_runs { "shrun" } else { "shoff" };
        let (env, l, original, dom) = running_chain(
            tag,
            &[
                ("base", &[(1, 0, 4)]),
                ("mid", &[(2, 4, 30)]),
                ("top", &[(3, 40, 1)]),
            ],
        );
        let outside = env.dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        open_up(&outside);
        let top_b = outside.join("topB.qcow2");
        create(&top_b, 0, Some((&l[1], "qcow2")), &[]);
        io(&top_b, "qcow2", &["write -P 9 50M 1M".into()]);
        let b_view = view_of(&top_b);
        let b_name = format!("dc-{tag}b-{}", std::process::id());
        let dom_b = if b_runs {
            Domain::start(&b_name, &top_b)
        } else {
            Domain::define(&b_name, &top_b)
        };
        // A drops mid: committing A's small top into mid would be cheapest, but B reads mid.
        let s = env.spec(
            "a.yaml",
            &spec("a", &dom.name, &[("golden", Some(&l[0]))], ""),
        );
        let plan = env.diskchain(&["plan", "-f"]).arg(&s).output().unwrap();
        let text = String::from_utf8_lossy(&plan.stdout).into_owned();
        assert!(
            text.contains(&format!("libvirt domain {b_name} disk vda")),
            "{tag}: the plan names B as mid's user: {text}"
        );
        apply_ok(&env, &s, &[]);
        assert_eq!(view_of(&l[1]), original[1], "{tag}: mid was written");
        if b_runs {
            dom_b.flush();
        }
        assert_eq!(view_of(&top_b), b_view, "{tag}: domain B's view changed");
        assert_eq!(
            view_of(dom.chain().last().unwrap()),
            original[2],
            "{tag}: A's view"
        );
        drop(dom_b);
    }

    // A revert of an active image another (shut-off) domain reads is refused, naming it.
    let (env, l, _, dom) = running_chain("shrev", &[("base", &[(1, 0, 4)]), ("top", &[(2, 4, 4)])]);
    let outside = env.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    open_up(&outside);
    let top_b = outside.join("topB.qcow2");
    create(&top_b, 0, Some((&l[1], "qcow2")), &[]);
    let b_view = view_of(&top_b);
    let b_name = format!("dc-shrevb-{}", std::process::id());
    let _dom_b = Domain::define(&b_name, &top_b);
    let s = env.spec(
        "r.yaml",
        &spec(
            "a",
            &dom.name,
            &[("golden", Some(&l[0]))],
            "  revert: { to: golden, id: r1, restart: true, shutdownTimeout: 0s }\n",
        ),
    );
    let before = env.fingerprints();
    let out = env.apply(&s, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("libvirt domain {b_name} disk vda")),
        "{err}"
    );
    assert!(
        dom.running(),
        "the domain was not shut down for a refused revert"
    );
    assert_eq!(env.fingerprints(), before);
    assert_eq!(view_of(&top_b), b_view);
}

/// Finding a_: a block job someone else started is never adopted or pivoted: a placement move
/// while an operator's own `virsh blockcopy` runs, and a pull while their `virsh blockpull`
/// runs, each exit 1 naming the foreign job, leave the domain on its chain (and its persistent
/// definition as it was), and converge once the operator's job is gone.
#[test]
fn a_foreign_block_job_is_never_adopted() {
    let (env, l, original, dom) = running_chain(
        "foreign",
        &[
            ("base", &[(1, 0, 4)]),
            ("mid", &[(2, 4, 4)]),
            ("top", &[(3, 8, 4)]),
        ],
    );
    let outside = env.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    open_up(&outside);
    let moved = env.img("moved");
    std::fs::create_dir(&moved).unwrap();
    open_up(&moved);
    let mine = outside.join("mine.qcow2");
    virsh(&[
        "blockcopy",
        &dom.name,
        "vda",
        &mine.to_string_lossy(),
        "--shallow",
        "--transient-job",
        "--bandwidth",
        "1",
    ]);
    let place = env.spec(
        "d.yaml",
        &spec(
            "d",
            &dom.name,
            &[("golden", Some(&l[0])), ("mid", Some(&l[1]))],
            &format!("  placement:\n    directory: {}\n", moved.display()),
        ),
    );
    let out = env.apply(&place, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("did not start"), "{err}");
    assert_eq!(
        canon(dom.chain().last().unwrap()),
        canon(&l[2]),
        "pivoted onto a foreign file"
    );
    assert_eq!(canon(&dom.persistent_source()), canon(&l[2]));
    assert!(
        !dom.blockjob().is_empty(),
        "the operator's job was left alone"
    );
    virsh(&["blockjob", &dom.name, "vda", "--abort"]);
    apply_ok(&env, &place, &[]);
    let chain = dom.chain();
    assert!(chain.iter().all(|f| f.starts_with(&moved)), "{chain:?}");
    assert_eq!(view_of(chain.last().unwrap()), original[2]);

    // A pull the operator started is not taken for this plan's pull either.
    let active = chain.last().unwrap().clone();
    virsh(&["blockpull", &dom.name, "vda", "--bandwidth", "1"]);
    let drop_mid = env.spec(
        "d.yaml",
        &spec(
            "d",
            &dom.name,
            &[("golden", Some(&chain[0]))],
            &format!("  placement:\n    directory: {}\n", moved.display()),
        ),
    );
    let out = env.apply(&drop_mid, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("did not start"), "{err}");
    virsh(&["blockjob", &dom.name, "vda", "--abort"]);
    apply_ok(&env, &drop_mid, &[]);
    assert_eq!(view_of(&active), original[2]);
    assert_eq!(dom.chain().len(), 2);
}

/// Finding t_/s_: SIGTERM ends the agent within its grace period even while a live job cannot
/// converge (the guest keeps writing, `converge.then: wait`): the job is left to QEMU with the
/// step journaled, the agent exits 0, and the next start adopts the job and finishes the plan
/// with nothing lost.
#[test]
fn sigterm_ends_the_agent_within_its_grace_during_a_live_job() {
    let (env, l, original, dom) = running_chain(
        "grace",
        &[
            ("base", &[(1, 0, 4)]),
            ("mid", &[(2, 0, 24)]),
            ("top", &[(3, 30, 6)]),
        ],
    );
    let name = dom.name.clone();
    let original_top = live_view(&l[2]);
    let specs = env.dir.path().join("specs");
    env.spec(
        "g.yaml",
        &spec_with(
            "g",
            &name,
            ", converge: { within: 1s, then: wait }",
            &[("golden", Some(&l[0]))],
            "",
        ),
    );
    let agent = |log: &str| {
        env.diskchain(&[
            "agent",
            "--resync",
            "1s",
            "--grace",
            "1s",
            "--max-bytes-per-sec",
            "1048576",
            "--specs",
        ])
        .arg(&specs)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(env.dir.path().join(log)).unwrap())
        .spawn()
        .unwrap()
    };
    let w = Writer::start(&name, 60);
    let mut a = agent("agent1.log");
    let journal = env.journal("g");
    let t = std::time::Instant::now();
    while !dom.blockjob().contains("Commit") && t.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(journal.exists(), "a live step runs");
    std::thread::sleep(std::time::Duration::from_secs(2));
    run(std::process::Command::new("kill").args(["-TERM", &a.id().to_string()]));
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = a.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > std::time::Duration::from_secs(8) {
            let _ = a.kill();
            panic!("the agent still runs 8 s after SIGTERM with --grace 1s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0));
    assert!(journal.exists(), "the interrupted step stays journaled");
    let wrote = w.finish();
    dom.flush();
    // The next start adopts the job and completes the plan.
    let mut a = agent("agent2.log");
    let t = std::time::Instant::now();
    while (journal.exists() || dom.chain().len() != 2)
        && t.elapsed() < std::time::Duration::from_secs(120)
    {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = a.kill();
    let _ = a.wait();
    let chain = dom.chain();
    assert_eq!(chain.len(), 2, "golden <- active: {chain:?}");
    assert_eq!(view_of(&chain[0]), original[0]);
    let mut expected = original_top;
    apply_writes(&mut expected, &wrote);
    dom.flush();
    assert_eq!(sha(&live_view(&chain[1])), sha(&expected), "the guest view");
}

/// Defines and starts a domain from `devices` XML (beside the usual VNC display); destroyed
/// and undefined when the returned handle drops.
fn start_with_devices(name: &str, devices: &str) -> Domain {
    diskchain_tests::libvirt::require();
    let _ = std::process::Command::new("virsh")
        .args(["-c", URI, "destroy", name])
        .output();
    let _ = std::process::Command::new("virsh")
        .args(["-c", URI, "undefine", name])
        .output();
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><devices>\
         <emulator>/usr/bin/qemu-system-x86_64</emulator>{devices}\
         <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/></devices></domain>"
    );
    let file = std::env::temp_dir().join(format!("{name}.xml"));
    std::fs::write(&file, xml).unwrap();
    virsh(&["define", &file.to_string_lossy()]);
    let _ = std::fs::remove_file(&file);
    let d = Domain {
        name: name.to_string(),
    };
    virsh(&["start", name]);
    d
}

/// Finding i_/r_: a snapshot leaves every other device of the domain alone (a writable floppy,
/// a CD-ROM), and an empty `<backingStore/>` (QEMU runs the image without its backing file) is
/// bad input, exit 2, naming it.
#[test]
fn odd_devices_are_left_alone_and_an_empty_backing_store_is_bad_input() {
    let env = Env::new();
    let l = build(&env, &[("base", &[(1, 0, 4)]), ("top", &[(2, 4, 4)])]);
    let other = env.dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    open_up(&other);
    let floppy = other.join("floppy.img");
    std::fs::File::create(&floppy)
        .unwrap()
        .set_len(1440 << 10)
        .unwrap();
    open_up(&floppy);
    let name = format!("dc-odd-{}", std::process::id());
    let dom = start_with_devices(
        &name,
        &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <disk type='file' device='floppy'><driver name='qemu' type='raw'/><source file='{}'/><target dev='fda' bus='fdc'/></disk>\
             <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/><readonly/></disk>",
            l[1].display(),
            floppy.display()
        ),
    );
    let s = env.spec(
        "d.yaml",
        &spec("d", &name, &[("golden", Some(&l[0])), ("snap", None)], ""),
    );
    apply_ok(&env, &s, &[]);
    let vda: Vec<PathBuf> = dom
        .chain()
        .into_iter()
        .filter(|p| p.starts_with(env.root()))
        .collect();
    assert_eq!(vda.len(), 3, "golden <- snap <- active: {vda:?}");
    let files: Vec<_> = std::fs::read_dir(&other)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        files.len(),
        1,
        "nothing was created beside the floppy: {files:?}"
    );
    let blk = virsh(&["domblklist", &name]);
    assert!(blk.contains(&floppy.display().to_string()), "{blk}");
    drop(dom);

    // An empty <backingStore/>: QEMU reads top alone.
    let name = format!("dc-nobs-{}", std::process::id());
    let _dom = start_with_devices(
        &name,
        &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><backingStore/><target dev='vda' bus='virtio'/></disk>",
            l[1].display()
        ),
    );
    let s = env.spec("e.yaml", &spec("e", &name, &[("snap2", None)], ""));
    let before = env.fingerprints();
    let out = env.apply(&s, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("empty <backingStore/>") && err.contains("spec.source.libvirt"),
        "{err}"
    );
    assert_eq!(env.fingerprints(), before);
}

/// Finding g_, where it already happened: diskchain is killed during a live pull, QEMU finishes
/// the job on its own and then crashes before anything flushed, so the active image names the
/// new base while the pulled clusters never reached it. The next run finds it: with the domain
/// running it refuses to call the step done (exit 1, saying to shut the domain down); with the
/// domain off it points the image back at the layers it pulled from, so the guest reads what it
/// read; once the domain runs again the pull is redone and made durable.
#[test]
fn a_pull_lost_in_a_crash_before_this_fix_is_found_and_repaired() {
    let (env, l, original, dom) = running_chain(
        "lostpull",
        &[
            ("base", &[(1, 0, 6)]),
            ("l3", &[(4, 14, 6)]),
            ("top", &[(5, 2, 4), (6, 30, 20)]),
        ],
    );
    let s = env.spec(
        "d.yaml",
        &spec("d", &dom.name, &[("golden", Some(&l[0]))], ""),
    );
    let mut landed = false;
    for _ in 0..3 {
        if !diskchain_tests::env::apply_killed_mid_step(
            &env,
            &s,
            &["--max-bytes-per-sec", "2097152"],
        ) {
            continue;
        }
        landed = true;
        break;
    }
    assert!(landed, "no kill landed inside the pull");
    // QEMU finishes the pull on its own, then dies before any flush.
    let t = std::time::Instant::now();
    while !dom.blockjob().is_empty() && t.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    dom.crash();
    assert_ne!(
        view_of(&l[2]),
        original[2],
        "the scenario: QEMU's pull lost its data in the crash"
    );
    // Started again by the operator: the loss is found, not called done.
    virsh(&["start", &dom.name]);
    let out = env.apply(&s, &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Shut the domain down"), "{err}");
    // Shut down: the image is pointed back at l3 and reads as before.
    virsh(&["destroy", &dom.name]);
    let out = env.apply(&s, &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(view_of(&l[2]), original[2], "the guest view is repaired");
    virsh(&["start", &dom.name]);
    apply_ok(&env, &s, &[]);
    dom.crash();
    assert_eq!(
        view_of(&l[2]),
        original[2],
        "after the redone pull and another crash"
    );
    assert_eq!(view_of(&l[0]), original[0], "golden");
}

/// Finding d_: a live plan killed during its first step (a block commit, left running in QEMU)
/// and resumed after the spec started keeping a layer a later step would commit into: the later
/// step never runs (the kept point's view is unchanged), the interrupted step, which the spec
/// still agrees with, is finished first, and the disk ends as the new spec says.
#[test]
fn a_live_journal_never_overrides_a_spec_that_now_keeps_more() {
    let (env, l, original, dom) = running_chain(
        "stale",
        &[
            ("base", &[(1, 0, 4)]),
            ("a", &[(2, 4, 4)]),
            ("b", &[(3, 8, 16)]),
            ("c", &[(4, 30, 4)]),
            ("top", &[(5, 40, 1)]),
        ],
    );
    let v1 = env.spec(
        "d.yaml",
        &spec(
            "d",
            &dom.name,
            &[("golden", Some(&l[0])), ("bee", Some(&l[2]))],
            "",
        ),
    );
    let plan = env.plan_json(&v1);
    let ops: Vec<&str> = plan["disks"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops.first(), Some(&"commit"), "{plan}");
    let mut landed = false;
    for _ in 0..3 {
        if diskchain_tests::env::apply_killed_mid_step(
            &env,
            &v1,
            &["--max-bytes-per-sec", "2097152"],
        ) && env.step_running("d")
        {
            landed = true;
            break;
        }
    }
    assert!(landed, "no kill landed inside the first step");
    // Finding w_: with `suspend: true`, apply leaves the journal alone: no step of it runs.
    let journal = env.journal("d");
    let recorded = std::fs::read_to_string(&journal).unwrap();
    let keeping_cee = |extra: &str| {
        spec(
            "d",
            &dom.name,
            &[
                ("golden", Some(&l[0])),
                ("bee", Some(&l[2])),
                ("cee", Some(&l[3])),
            ],
            extra,
        )
    };
    let suspended = env.spec("d.yaml", &keeping_cee("  suspend: true\n"));
    let out = env.apply(&suspended, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&journal).unwrap(), recorded);
    let v2 = env.spec("d.yaml", &keeping_cee(""));
    let out = env.apply(&v2, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(view_of(&l[3]), original[3], "point cee's view");
    assert_eq!(view_of(&l[0]), original[0], "golden");
    let chain = dom.chain();
    assert_eq!(chain.len(), 4, "golden <- bee <- cee <- active: {chain:?}");
    assert_eq!(view_of(&chain[1]), original[2], "bee's view");
    assert_eq!(canon(&chain[2]), canon(&l[3]), "cee stays where it was");
    assert_eq!(
        canon(&chain[3]),
        canon(&l[4]),
        "the guest stays on its active image"
    );
    dom.flush();
    assert_eq!(view_of(&l[4]), original[4], "the guest view");
    assert!(
        env.plan_json(&v2)["disks"][0]["steps"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// A live active commit (of `b` and the active layer into `a`, the spec dropping both) killed
/// mid-job, then the spec keeps `b` again: `b` reads through `a`, which the job already wrote,
/// so the plan needs the operator (a failed apply, the journal kept, the job left to finish if the spec
/// is put back). When the operator accepts the loss with `diskchain set-aside`, diskchain
/// cancels its own leftover job (no pivot: the chain stays), and the next apply converges.
#[test]
fn setting_aside_a_live_plan_cancels_its_own_leftover_job() {
    let (env, l, original, dom) = running_chain(
        "abandon",
        &[
            ("base", &[(1, 0, 4)]),
            ("a", &[(2, 4, 32)]),
            ("b", &[(3, 40, 8)]),
            ("top", &[(5, 50, 8)]),
        ],
    );
    let v1 = env.spec(
        "d.yaml",
        &spec("d", &dom.name, &[("golden", Some(&l[0]))], ""),
    );
    let plan = env.plan_json(&v1);
    let first = &plan["disks"][0]["steps"][0];
    assert!(
        first["op"] == "commit" && first["base"] == l[1].to_str().unwrap(),
        "expected an active commit into a first: {plan}"
    );
    let mut landed = false;
    for _ in 0..3 {
        if diskchain_tests::env::apply_killed_mid_step(
            &env,
            &v1,
            &["--max-bytes-per-sec", "1048576"],
        ) && env.step_running("d")
            && !dom.blockjob().is_empty()
        {
            landed = true;
            break;
        }
    }
    assert!(landed, "no kill landed inside the active commit");
    let v2 = env.spec(
        "d.yaml",
        &spec(
            "d",
            &dom.name,
            &[("golden", Some(&l[0])), ("bee", Some(&l[2]))],
            "",
        ),
    );
    let out = env.apply(&v2, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("reads through") && err.contains("set-aside"),
        "{err}"
    );
    assert!(env.journal("d").exists(), "the journal is kept");
    assert!(
        !dom.blockjob().is_empty(),
        "the job is left while the operator decides"
    );
    let out = env
        .diskchain(&["set-aside", "--disk", "d"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!env.journal("d").exists(), "set aside");
    assert_eq!(
        dom.blockjob(),
        "",
        "diskchain cancelled its own leftover job"
    );
    assert_chain(&dom, &l);
    apply_ok(&env, &v2, &[]);
    assert_eq!(view_of(&l[0]), original[0], "golden");
    dom.flush();
    assert_eq!(
        view_of(dom.chain().last().unwrap()),
        original[3],
        "the guest view"
    );
    assert!(
        env.plan_json(&v2)["disks"][0]["steps"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// A push-mode backup of `vda` into `target` with a new checkpoint `checkpoint`: a full one
/// (`since: None`, libvirt creates the file), or an incremental since checkpoint `since` into a
/// target pre-created on the previous backup (reuse-external, as BACKUPS.md measured). Waits
/// until the job is over.
fn backup(dom: &Domain, target: &Path, since: Option<(&str, &Path)>, checkpoint: &str) {
    let dir = target.parent().unwrap();
    let mut flags = vec![];
    let incremental = match since {
        Some((ck, prev)) => {
            create(
                target,
                SIZE,
                None,
                &["-b", &prev.to_string_lossy(), "-F", "qcow2"],
            );
            flags.push("--reuse-external");
            format!("<incremental>{ck}</incremental>")
        }
        None => String::new(),
    };
    let bx = dir.join(format!("{checkpoint}.backup.xml"));
    let cx = dir.join(format!("{checkpoint}.checkpoint.xml"));
    std::fs::write(
        &bx,
        format!(
            "<domainbackup>{incremental}<disks><disk name='vda' type='file'><target file='{}'/><driver type='qcow2'/></disk></disks></domainbackup>",
            target.display()
        ),
    )
    .unwrap();
    std::fs::write(
        &cx,
        format!("<domaincheckpoint><name>{checkpoint}</name><disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>"),
    )
    .unwrap();
    let (b, c) = (bx.to_string_lossy(), cx.to_string_lossy());
    let mut args = vec!["backup-begin", &dom.name, &b, &c];
    args.extend(flags);
    virsh(&args);
    for _ in 0..600 {
        if virsh(&["domjobinfo", &dom.name]).contains("None") {
            let done = virsh(&["domjobinfo", "--completed", &dom.name]);
            assert!(done.contains("Completed"), "backup {checkpoint}: {done}");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("backup {checkpoint} did not finish");
}

/// Issue 10, item 3, live: a running domain backed up by libvirt (a full backup with a
/// checkpoint, then incrementals into a chain of backups); after each kind of step diskchain
/// takes through libvirt (removing a point by a commit and by a pull, adding one, moving the
/// points with pre-copied layers and a mirror), the guest writes, and the next incremental,
/// restored with QEMU alone, reads exactly as the guest's disk. Before diskchain carried the
/// bitmaps of the copied layers, the incremental after the move missed writes.
#[test]
fn incremental_backups_after_each_live_step_restore_the_guest_view() {
    let (env, l, _, dom) = running_chain(
        "bitmaps",
        &[
            ("base", &[(1, 0, 16)]),
            ("big", &[(2, 16, 12)]),
            ("small", &[(3, 30, 1)]),
            ("top", &[(4, 34, 4), (5, 28, 1)]),
        ],
    );
    let name = dom.name.clone();
    let repo = env.dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    open_up(&repo);
    backup(&dom, &repo.join("b0.qcow2"), None, "ck0");
    let mut prev = (String::from("ck0"), repo.join("b0.qcow2"));
    let mut ops_seen = std::collections::BTreeSet::new();
    let mut round = 0u8;
    // One diskchain plan, with guest writes before and after it; then, when `backup_after`, an
    // incremental backup that must restore to the guest's view. Plans between two backups put
    // the writes since the last checkpoint into lower layers, whose bitmaps the next plan moves.
    let mut step = |what: &str, s: &Path, backup_after: bool| {
        let plan = env.plan_json(s);
        for st in plan["disks"][0]["steps"].as_array().unwrap() {
            ops_seen.insert(st["op"].as_str().unwrap().to_string());
        }
        round += 1;
        dom.guest_write(60 + round, (40 + round as u64) * MIB, MIB);
        apply_ok(&env, s, &[]);
        dom.guest_write(80 + round, (52 + round as u64) * MIB, MIB);
        dom.flush();
        if !backup_after {
            return;
        }
        let target = repo.join(format!("b{round}.qcow2"));
        let ck = format!("ck{round}");
        backup(&dom, &target, Some((&prev.0, &prev.1)), &ck);
        let active = dom.chain().last().unwrap().clone();
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
            .arg(&target)
            .arg(&active)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "after {what}: the incremental backup does not restore the guest view: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        prev = (ck, target);
    };
    let pts =
        |p: &[(&str, Option<&Path>)], extra: &str| env.spec("d.yaml", &spec("d", &name, p, extra));
    let moved = env.root().join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    open_up(&moved);
    let placed = format!("  placement:\n    directory: {}\n", moved.display());
    let s = pts(
        &[
            ("p0", Some(&l[0])),
            ("p1", Some(&l[1])),
            ("p2", Some(&l[2])),
        ],
        "",
    );
    step("naming the points", &s, true);
    step(
        "removing a point below a big one (commit)",
        &pts(&[("p0", None), ("p1", None)], ""),
        true,
    );
    step(
        "adding a point (snapshot)",
        &pts(&[("p0", None), ("p1", None), ("p3", None)], ""),
        false,
    );
    step(
        "moving the points (copies and a mirror)",
        &pts(&[("p0", None), ("p1", None), ("p3", None)], &placed),
        true,
    );
    step(
        "adding a point",
        &pts(
            &[("p0", None), ("p1", None), ("p3", None), ("p4", None)],
            &placed,
        ),
        false,
    );
    step(
        "removing the two points above p1",
        &pts(&[("p0", None), ("p1", None)], &placed),
        true,
    );
    step(
        "adding a point",
        &pts(&[("p0", None), ("p1", None), ("p5", None)], &placed),
        false,
    );
    step(
        "removing p1 into the layer above (pull)",
        &pts(&[("p0", None), ("p5", None)], &placed),
        true,
    );
    for op in ["commit", "snapshot", "copy", "mirror", "stream"] {
        assert!(
            ops_seen.contains(op),
            "no {op} step was exercised: {ops_seen:?}"
        );
    }
}

/// Issue 11: two running domains share a base, and both move their points into one placement
/// directory, `apply` of the second starting while the first copies the base (QEMU's image
/// locks cannot tell them apart here: both domains hold the base open). Each step now locks
/// the files it writes and reads, so the second waits for the first's copy and takes it, instead
/// of removing its half-written `.partial` and racing it. Every view intact, every image clean.
#[test]
fn two_live_disks_moving_a_shared_base_never_write_the_same_file() {
    let env = Env::new();
    open_up(env.dir.path());
    open_up(&env.root());
    let base = env.img("base.qcow2");
    create(&base, SIZE, None, &[]);
    io(&base, "qcow2", &["write -P 1 0 24M".into()]);
    let (a, b) = (env.img("a.qcow2"), env.img("b.qcow2"));
    for (f, p) in [(&a, 2), (&b, 3)] {
        create(f, SIZE, Some((&base, "qcow2")), &[]);
        io(f, "qcow2", &[format!("write -P {p} 32M 1M")]);
    }
    let golden = view_of(&base);
    let pid = std::process::id();
    let (da, db) = (
        Domain::start(&format!("dc-sa-{pid}"), &a),
        Domain::start(&format!("dc-sb-{pid}"), &b),
    );
    let (va, vb) = (view_of(&a), view_of(&b));
    let fast = env.root().join("fast");
    std::fs::create_dir_all(&fast).unwrap();
    open_up(&fast);
    let placed = format!("  placement:\n    directory: {}\n", fast.display());
    let sa = env.spec(
        "a.yaml",
        &spec("a", &da.name, &[("golden", Some(&base))], &placed),
    );
    let sb = env.spec(
        "b.yaml",
        &spec("b", &db.name, &[("golden", Some(&base))], &placed),
    );
    // 24 MiB at 8 MB/s: the first copy takes about 3 s.
    let first = env
        .diskchain(&["apply", "--max-bytes-per-sec", "8000000", "-f"])
        .arg(&sa)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    env.wait_for_step("a", std::time::Duration::from_secs(5), || false);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let second = env
        .diskchain(&["apply", "--max-bytes-per-sec", "8000000", "-f"])
        .arg(&sb)
        .output()
        .unwrap();
    // Before each step locked its files, the first could hang on its mirror forever.
    let mut first = first;
    let t = std::time::Instant::now();
    while first.try_wait().unwrap().is_none() {
        if t.elapsed() > std::time::Duration::from_secs(180) {
            let _ = first.kill();
            panic!("apply a did not finish within 180 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let first = first.wait_with_output().unwrap();
    for (what, out) in [("a", &first), ("b", &second)] {
        assert_eq!(
            out.status.code(),
            Some(0),
            "apply {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (dom, view, what) in [(&da, &va, "a"), (&db, &vb, "b")] {
        let chain = dom.chain();
        assert!(chain[0].starts_with(&fast), "{what}: {chain:?}");
        assert_eq!(view_of(&chain[0]), golden, "{what}: its point");
        assert_eq!(
            &view_of(chain.last().unwrap()),
            view,
            "{what}: the guest view"
        );
    }
    env.assert_images_clean("after both moves");
}
