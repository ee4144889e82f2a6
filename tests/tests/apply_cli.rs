//! `diskchain apply` end to end on real qcow2 chains: the chain becomes the spec's, every kept
//! point and the active layer read back byte-identical, `qemu-img check` is clean, QEMU writes
//! what the plan predicted, a second apply does nothing, shared layers are never touched, a
//! SIGKILL at any moment loses nothing, and bad input changes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use diskchain_tests::env::{
    CLUSTER, Env, backing_chain, check, keep_base_and_top, mid_heavy_chain, random_chain, spec_yaml,
};
use diskchain_tests::qemu::{create, cycle, hold_open, io, view_sha256};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn views(env: &Env, files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|f| view_sha256(f, "qcow2", env.dir.path()))
        .collect()
}

fn last_apply(env: &Env, disk: &str) -> Value {
    let text = std::fs::read_to_string(env.record(disk)).expect("state record");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["last_apply"].clone()
}

/// A spec for the chain `layers` keeping each point with probability `keep_p` and asking for a
/// new snapshot with probability `snap_p`; with the views the resulting chain must have, base
/// first, active last.
fn random_spec(
    env: &Env,
    rng: &mut StdRng,
    layers: &[PathBuf],
    keep_p: f64,
    snap_p: f64,
) -> (PathBuf, Vec<String>) {
    let n = layers.len();
    let keep: Vec<usize> = (0..n - 1).filter(|_| rng.random_bool(keep_p)).collect();
    let mut points: Vec<(String, Option<PathBuf>)> = keep
        .iter()
        .map(|&k| (format!("p{k}"), Some(layers[k].clone())))
        .collect();
    let snapshot = rng.random_bool(snap_p);
    if snapshot {
        points.push(("fresh".into(), None));
    }
    let spec = env.spec("disk.yaml", &spec_yaml("disk", &layers[n - 1], &points, ""));
    let all_views = views(env, layers);
    let mut expected: Vec<String> = keep.iter().map(|&k| all_views[k].clone()).collect();
    if snapshot {
        expected.push(all_views[n - 1].clone());
    }
    expected.push(all_views[n - 1].clone());
    (spec, expected)
}

/// After apply: the chain is the kept points (plus new snapshots) and the active layer, in order,
/// each reading as before.
fn assert_converged(env: &Env, active: &Path, expected_views: &[String], what: &str) {
    let chain = backing_chain(active);
    assert_eq!(chain.len(), expected_views.len(), "{what}: chain {chain:?}");
    assert_eq!(
        chain.last().map(PathBuf::as_path),
        Some(active),
        "{what}: the active layer keeps its path"
    );
    assert_eq!(
        &views(env, &chain),
        expected_views,
        "{what}: a view changed"
    );
}

#[test]
fn apply_reaches_the_spec_on_random_chains_and_loses_nothing() {
    let mut rng = StdRng::seed_from_u64(0xa991_7001);
    let mut total_predicted = 0u64;
    for case in 0..24 {
        let env = Env::new();
        let n = rng.random_range(2..=8);
        let clusters = rng.random_range(8..40);
        let layers = random_chain(&env, &mut rng, "d", n, clusters, 8);
        let active = layers[n - 1].clone();
        let (spec, expected) = random_spec(&env, &mut rng, &layers, 0.5, 0.3);
        let plan = env.plan_json(&spec);
        let predicted = plan["disks"][0]["total_bytes"].as_u64().unwrap();
        let zeros = plan["disks"][0]["total_zero_bytes"].as_u64().unwrap();
        let steps = plan["disks"][0]["steps"].as_array().unwrap().len() as u64;

        let out = env.apply(&spec, &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "case {case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_converged(&env, &active, &expected, &format!("case {case}"));
        env.assert_images_clean(&format!("case {case}"));
        if steps > 0 {
            // QEMU writes the predicted data, plus metadata and zeros it may write as data.
            let la = last_apply(&env, "disk");
            assert_eq!(la["predicted_bytes"].as_u64(), Some(predicted));
            let written = la["written_bytes"].as_u64().unwrap();
            let slack = zeros + steps * (1 << 20) + predicted / 10;
            assert!(
                written >= predicted && written <= predicted + slack,
                "case {case}: predicted {predicted} (+{zeros} zeros), QEMU wrote {written}"
            );
        }
        total_predicted += predicted;
        // A second apply plans nothing and changes nothing.
        let before = env.fingerprints();
        assert_eq!(
            env.plan_json(&spec)["disks"][0]["steps"]
                .as_array()
                .unwrap()
                .len(),
            0,
            "case {case}"
        );
        let out = env.apply(&spec, &[]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(
            env.fingerprints(),
            before,
            "case {case}: the second apply touched a file"
        );
    }
    assert!(total_predicted > 0, "the cases moved data");
}

#[test]
fn removing_points_of_one_disk_never_touches_a_base_it_shares() {
    let env = Env::new();
    let golden = env.img("golden.qcow2");
    create(&golden, 32 * CLUSTER, None, &[]);
    io(
        &golden,
        "qcow2",
        &["write -P 1 0 1M".into(), "write -z 1M 256k".into()],
    );
    let mut a = vec![golden.clone()];
    for (i, cmd) in [
        "write -P 2 0 512k",
        "write -P 3 256k 512k",
        "write -P 4 1M 64k",
    ]
    .iter()
    .enumerate()
    {
        let p = env.img(&format!("a{i}.qcow2"));
        create(&p, 0, Some((a.last().unwrap(), "qcow2")), &[]);
        io(&p, "qcow2", &[cmd.to_string()]);
        a.push(p);
    }
    let b1 = env.img("b1.qcow2");
    create(&b1, 0, Some((&golden, "qcow2")), &[]);
    io(&b1, "qcow2", &["write -P 9 0 128k".into()]);
    let b2 = env.img("b2.qcow2");
    create(&b2, 0, Some((&b1, "qcow2")), &[]);
    let b_views = views(&env, &[golden.clone(), b1.clone(), b2.clone()]);
    let a_views = views(&env, &a);
    // Disk a drops golden and a1; disk b keeps everything it has.
    env.spec(
        "a.yaml",
        &spec_yaml("a", &a[3], &[("mid".into(), Some(a[2].clone()))], ""),
    );
    env.spec(
        "b.yaml",
        &spec_yaml(
            "b",
            &b2,
            &[
                ("golden".into(), Some(golden.clone())),
                ("b1".into(), Some(b1.clone())),
            ],
            "",
        ),
    );
    let shared_before: BTreeMap<_, _> = env
        .fingerprints()
        .into_iter()
        .filter(|(p, _)| p == &golden || p == &b1 || p == &b2)
        .collect();
    env.apply_ok(&env.dir.path().join("specs"), &[]);
    let after = env.fingerprints();
    for (p, fp) in &shared_before {
        assert_eq!(&after[p], fp, "{} changed", p.display());
    }
    assert_eq!(views(&env, &backing_chain(&b2)), b_views);
    assert_converged(
        &env,
        &a[3],
        &[a_views[2].clone(), a_views[3].clone()],
        "disk a",
    );
    assert!(
        !backing_chain(&a[3]).contains(&golden),
        "disk a no longer reads golden"
    );
}

#[test]
fn apply_killed_at_random_moments_converges_and_loses_nothing() {
    use std::os::unix::process::CommandExt;
    let mut rng = StdRng::seed_from_u64(0xdead_0009);
    let mut kills_mid_plan = 0;
    for case in 0..20 {
        let env = Env::new();
        let n = rng.random_range(3..=6);
        let mut layers: Vec<PathBuf> = Vec::new();
        for i in 0..n {
            let p = env.img(&format!("k-{i}.qcow2"));
            create(
                &p,
                64 << 20,
                layers.last().map(|b| (b.as_path(), "qcow2")),
                &[],
            );
            let off = rng.random_range(0..12u64) * (4 << 20);
            io(
                &p,
                "qcow2",
                &[format!(
                    "write -P {} {off} {}",
                    i + 1,
                    rng.random_range(1..5u64) * (4 << 20)
                )],
            );
            layers.push(p);
        }
        let active = layers[n - 1].clone();
        let (spec, expected) = random_spec(&env, &mut rng, &layers, 0.4, 0.4);

        // Kill apply once or twice at random moments: the whole process tree (a crash takes
        // qemu-img down too), or only diskchain (its qemu-img runs on, orphaned). Then let it
        // finish.
        for _ in 0..rng.random_range(1..=2) {
            let mut child = env
                .diskchain(&["apply", "--max-bytes-per-sec", "4000000", "-f"])
                .arg(&spec)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap();
            let pgid = child.id().to_string();
            // Once a plan is in flight (its journal exists), or a step is running, kill at a
            // random moment.
            let journal = env.journal("disk");
            let mid_step = rng.random_bool(0.5);
            for _ in 0..1000 {
                let text = std::fs::read_to_string(&journal).unwrap_or_default();
                let ready = if mid_step {
                    text.contains("\"running\"")
                } else {
                    !text.is_empty()
                };
                if ready || child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            // Streams are quick, throttled commits slow: mostly short delays, sometimes long ones.
            let delay = if rng.random_bool(0.7) {
                rng.random_range(0..60)
            } else {
                rng.random_range(0..1500)
            };
            std::thread::sleep(Duration::from_millis(delay));
            if rng.random_bool(0.7) {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pgid}")])
                    .stderr(Stdio::null())
                    .status();
            } else {
                let _ = Command::new("kill")
                    .args(["-KILL", &pgid])
                    .stderr(Stdio::null())
                    .status();
            }
            let status = child.wait().unwrap();
            // Wait for an orphaned qemu-img of this run to finish on its own.
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "while pgrep -g {pgid} >/dev/null; do sleep 0.05; done"
                ))
                .status();
            if status.code().is_none() && env.journal("disk").exists() {
                kills_mid_plan += 1;
            }
        }
        let out = env.apply(&spec, &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "case {case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_converged(&env, &active, &expected, &format!("case {case}"));
        for f in backing_chain(&active) {
            assert_eq!(check(&f), 0, "case {case}: qemu-img check {}", f.display());
        }
        assert!(
            !env.journal("disk").exists(),
            "case {case}: the journal is finished"
        );
    }
    assert!(
        kills_mid_plan >= 8,
        "only {kills_mid_plan} kills landed mid-plan"
    );
}

/// Regression: a `qemu-img rebase` killed mid-way can leave the new backing reference written
/// while some copied clusters' L2 entries are lost (QEMU 10.0). Resuming must restore the view.
#[test]
fn an_interrupted_stream_is_resumed_without_losing_data() {
    use std::os::unix::process::CommandExt;
    let mut rng = StdRng::seed_from_u64(0x57_4ea3);
    let mut interrupted = 0;
    for round in 0..12 {
        let env = Env::new();
        let base = env.img("base.qcow2");
        create(&base, 64 << 20, None, &[]);
        io(&base, "qcow2", &["write -P 7 0 24M".into()]);
        let top = env.img("top.qcow2");
        create(&top, 0, Some((&base, "qcow2")), &[]);
        // More data above than below: streaming base into top is the cheaper way.
        io(&top, "qcow2", &["write -P 9 28M 32M".into()]);
        let active = env.img("active.qcow2");
        create(&active, 0, Some((&top, "qcow2")), &[]);
        let want = views(&env, &[top.clone(), active.clone()]);
        // Keep `top`, drop `base`: one stream of base into top, with no base left.
        let spec = env.spec(
            "s.yaml",
            &spec_yaml("s", &active, &[("top".into(), Some(top.clone()))], ""),
        );
        let mut child = env
            .diskchain(&["apply", "-f"])
            .arg(&spec)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let journal = env.journal("s");
        env.wait_for_step("s", Duration::from_secs(2), || {
            child.try_wait().ok().flatten().is_some()
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(0..40)));
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .stderr(Stdio::null())
            .status();
        let killed = child.wait().unwrap().code().is_none();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while pgrep -g {} >/dev/null; do sleep 0.02; done",
                child.id()
            ))
            .status();
        if killed && journal.exists() {
            interrupted += 1;
        }
        let out = env.apply(&spec, &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            backing_chain(&active),
            vec![top.clone(), active.clone()],
            "round {round}"
        );
        assert_eq!(
            views(&env, &[top.clone(), active.clone()]),
            want,
            "round {round}: a view changed"
        );
        assert_eq!(check(&top), 0, "round {round}");
    }
    assert!(
        interrupted >= 6,
        "only {interrupted} rounds were interrupted mid-plan"
    );
}

fn assert_untouched(env: &Env, spec: &Path, code: i32, needle: &str) {
    let before = env.fingerprints();
    let out = env.apply(spec, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{needle}: {stderr}");
    assert!(
        stderr.contains(needle),
        "stderr should mention {needle:?}: {stderr}"
    );
    assert_eq!(env.fingerprints(), before, "{needle}: a file changed");
}

#[test]
fn bad_input_changes_nothing() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(3);
    let l = random_chain(&env, &mut rng, "w", 4, 16, 4);
    assert_untouched(
        &env,
        &env.spec("bad.yaml", "kind: [unclosed\n"),
        2,
        "malformed YAML",
    );
    std::fs::remove_file(env.dir.path().join("specs/bad.yaml")).unwrap();
    let s = env.spec(
        "s.yaml",
        &spec_yaml("w", &l[1], &[("x".into(), Some(l[2].clone()))], ""),
    );
    assert_untouched(&env, &s, 2, "not a backing layer");
    let s = env.spec(
        "s.yaml",
        &spec_yaml("w", &env.img("missing.qcow2"), &[], ""),
    );
    assert_untouched(&env, &s, 2, "does not exist");
    // A backing reference outside the roots.
    let outside = tempfile::tempdir().unwrap();
    let ob = outside.path().join("base.qcow2");
    create(&ob, 1 << 20, None, &[]);
    let top = env.img("escape.qcow2");
    create(&top, 0, Some((&ob, "qcow2")), &[]);
    let s = env.spec("s.yaml", &spec_yaml("w", &top, &[], ""));
    assert_untouched(&env, &s, 2, "outside the allowed roots");
    std::fs::remove_file(&top).unwrap();
    // A cycle.
    let (_, c2) = cycle(&env.root());
    let s = env.spec("s.yaml", &spec_yaml("w", &c2, &[], ""));
    assert_untouched(&env, &s, 2, "backing cycle");
}

#[test]
fn an_image_in_use_is_never_written_and_apply_exits_1() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(4);
    let l = random_chain(&env, &mut rng, "u", 3, 16, 4);
    let spec = env.spec("s.yaml", &spec_yaml("u", &l[2], &[], ""));
    let held = hold_open(&l[2], env.dir.path());
    let before = env.fingerprints();
    let out = env.apply(&spec, &[]);
    drop(held);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    let after = env.fingerprints();
    for p in &l[..2] {
        assert_eq!(before[p], after[p], "{} changed", p.display());
    }
}

#[test]
fn two_processes_never_work_on_one_disk_at_once() {
    let env = Env::new();
    let l = mid_heavy_chain(&env, 8);
    let act = l[3].clone();
    let v = views(&env, &[l[0].clone(), l[2].clone(), act.clone()]);
    // Dropping mid commits top (8 MiB) into it; at 2 MB/s that takes about 4 s.
    let spec = env.spec("s.yaml", &keep_base_and_top("s", &l));
    let mut first = env
        .diskchain(&["apply", "--max-bytes-per-sec", "2000000", "-f"])
        .arg(&spec)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    env.wait_for_step("s", Duration::from_secs(5), || false);
    let second = env.apply(&spec, &[]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another diskchain process"), "{stderr}");
    assert_eq!(first.wait().unwrap().code(), Some(0));
    assert_converged(&env, &act, &v, "after the first apply");
}

#[test]
fn placement_moves_every_point_and_prune_deletes_the_old_files() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(5);
    let l = random_chain(&env, &mut rng, "m", 5, 32, 8);
    let fast = env.img("fast");
    let vs = views(&env, &l);
    let spec = env.spec(
        "s.yaml",
        &spec_yaml(
            "m",
            &l[4],
            &[
                ("one".into(), Some(l[1].clone())),
                ("three".into(), Some(l[3].clone())),
                ("new".into(), None),
            ],
            &format!(
                "  placement:\n    directory: {}\n  prune: true\n",
                fast.display()
            ),
        ),
    );
    env.apply_ok(&spec, &[]);
    let chain = backing_chain(&l[4]);
    assert_eq!(
        views(&env, &chain),
        vec![vs[1].clone(), vs[3].clone(), vs[4].clone(), vs[4].clone()]
    );
    for f in &chain[..3] {
        assert_eq!(
            f.parent(),
            Some(fast.as_path()),
            "{} is not in the placement directory",
            f.display()
        );
    }
    for old in &l[..4] {
        assert!(!old.exists(), "{} should have been pruned", old.display());
    }
    env.assert_images_clean("after apply");
    let before = env.fingerprints();
    assert_eq!(env.apply(&spec, &[]).status.code(), Some(0));
    assert_eq!(
        env.fingerprints(),
        before,
        "the second apply touched a file"
    );
}

#[test]
fn a_foreign_file_where_a_copy_goes_is_never_taken_for_the_copy() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(6);
    let l = random_chain(&env, &mut rng, "f", 3, 16, 4);
    let fast = env.img("fast");
    std::fs::create_dir(&fast).unwrap();
    // Something that is not the copy sits where the copy of f-1 would go.
    std::fs::write(fast.join("f-1.qcow2"), b"not an image").unwrap();
    let spec = env.spec(
        "s.yaml",
        &spec_yaml(
            "f",
            &l[2],
            &[("one".into(), Some(l[1].clone()))],
            &format!("  placement:\n    directory: {}\n", fast.display()),
        ),
    );
    let before = views(&env, &backing_chain(&l[2]));
    let out = env.apply(&spec, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The name is taken, so the copy goes under a free one; the foreign file is left alone.
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        std::fs::read(fast.join("f-1.qcow2")).unwrap(),
        b"not an image"
    );
    let chain = backing_chain(&l[2]);
    assert_eq!(chain[0], fast.join("f-1-1.qcow2"), "{chain:?}");
    assert_eq!(
        views(&env, &chain),
        before[1..].to_vec(),
        "the kept point and the active layer read as before"
    );
}

#[test]
fn turning_prune_on_deletes_files_an_earlier_plan_left_even_when_they_reference_each_other() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(9);
    // base <- a <- b <- top: keeping only the base leaves a and b behind, b still recording a.
    let l = random_chain(&env, &mut rng, "p", 4, 32, 8);
    let vs = views(&env, &l);
    let points = [("golden".to_string(), Some(l[0].clone()))];
    let spec = env.spec("p.yaml", &spec_yaml("p", &l[3], &points, ""));
    env.apply_ok(&spec, &[]);
    assert!(
        l[1].exists() && l[2].exists(),
        "without prune the old layers stay"
    );
    // Prune on: both go in one plan, the one the other references included.
    let spec = env.spec("p.yaml", &spec_yaml("p", &l[3], &points, "  prune: true\n"));
    let out = env.apply(&spec, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !l[1].exists() && !l[2].exists(),
        "the retired layers are pruned"
    );
    assert_converged(&env, &l[3], &[vs[0].clone(), vs[3].clone()], "after prune");
}

/// A new point of a disk with a placement directory on the same file system is made there (a
/// hard link of the active image: nothing copied), not beside the active image and then copied.
#[test]
fn a_new_point_is_made_in_the_placement_directory() {
    let env = Env::new();
    let base = env.img("pl-base.qcow2");
    create(&base, 64 << 20, None, &[]);
    io(&base, "qcow2", &["write -P 1 0 4M".into()]);
    let top = env.img("pl.qcow2");
    create(&top, 0, Some((&base, "qcow2")), &[]);
    io(&top, "qcow2", &["write -P 2 8M 16M".into()]);
    let fast = env.img("fast");
    std::fs::create_dir(&fast).unwrap();
    let view = view_sha256(&top, "qcow2", env.dir.path());
    let spec = env.spec(
        "pl.yaml",
        &spec_yaml(
            "pl",
            &top,
            &[("p0".into(), Some(base.clone())), ("fresh".into(), None)],
            &format!("  placement:\n    directory: {}\n", fast.display()),
        ),
    );
    let plan = env.plan_json(&spec);
    let steps = plan["disks"][0]["steps"].as_array().unwrap();
    let snap = steps
        .iter()
        .find(|s| s["op"] == "snapshot")
        .expect("a snapshot");
    assert!(
        snap["file"]
            .as_str()
            .unwrap()
            .starts_with(fast.to_str().unwrap()),
        "{plan}"
    );
    env.apply_ok(&spec, &[]);
    let chain = backing_chain(&top);
    assert_eq!(chain.len(), 3, "{chain:?}");
    assert!(
        chain[1].starts_with(&fast) && chain[0].starts_with(&fast),
        "{chain:?}"
    );
    assert_eq!(view_sha256(&chain[1], "qcow2", env.dir.path()), view);
    assert_eq!(view_sha256(&top, "qcow2", env.dir.path()), view);
    // Nothing left to move.
    let again = env.plan_json(&spec);
    assert_eq!(
        again["disks"][0]["steps"].as_array().unwrap().len(),
        0,
        "{again}"
    );
}
