//! An interrupted plan never contradicts the spec as it is now (F2, F13), and a closed stdout
//! never stops a plan halfway (F18).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use diskchain_tests::env::{Env, apply_killed_mid_step, backing_chain, spec_yaml};
use diskchain_tests::qemu::{create, io, view_sha256};

/// `golden <- mid <- vm` with enough data that a stream takes a moment. With `vm_mib` past
/// golden's 300 MiB, dropping every point streams golden and mid into vm; with little, golden
/// holds the disk (a commit into it, then it takes the active path).
fn three(env: &Env, vm_mib: u64) -> Vec<PathBuf> {
    let l = vec![
        env.img("golden.qcow2"),
        env.img("mid.qcow2"),
        env.img("vm.qcow2"),
    ];
    create(&l[0], 1 << 30, None, &[]);
    io(&l[0], "qcow2", &["write -P 1 0 300M".into()]);
    create(&l[1], 0, Some((&l[0], "qcow2")), &[]);
    io(&l[1], "qcow2", &["write -P 2 500M 1M".into()]);
    create(&l[2], 0, Some((&l[1], "qcow2")), &[]);
    io(&l[2], "qcow2", &[format!("write -P 3 600M {vm_mib}M")]);
    l
}

/// F2: a plan killed mid-stream under "drop everything, prune", then the spec rolled back to
/// keep `golden` without prune: the old deletes never run, and the disk ends as the new spec
/// says with every view intact.
#[test]
fn a_resumed_plan_never_deletes_a_point_the_spec_now_keeps() {
    let mut landed = 0;
    for round in 0..4 {
        let env = Env::new();
        let l = three(&env, 310);
        let (golden, vm) = (
            view_sha256(&l[0], "qcow2", env.dir.path()),
            view_sha256(&l[2], "qcow2", env.dir.path()),
        );
        let v1 = env.spec("vm.yaml", &spec_yaml("vm", &l[2], &[], "  prune: true\n"));
        if !apply_killed_mid_step(&env, &v1, &[]) {
            continue;
        }
        landed += 1;
        let v2 = env.spec(
            "vm.yaml",
            &spec_yaml("vm", &l[2], &[("golden".into(), Some(l[0].clone()))], ""),
        );
        let plan = env.plan(&v2);
        assert!(
            String::from_utf8_lossy(&plan.stdout).contains("contradicts the spec"),
            "round {round}: plan says what apply will do: {}",
            String::from_utf8_lossy(&plan.stdout)
        );
        let out = env.apply(&v2, &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(l[0].exists(), "round {round}: golden was deleted");
        assert_eq!(
            backing_chain(&l[2]),
            vec![l[0].clone(), l[2].clone()],
            "round {round}"
        );
        assert_eq!(
            view_sha256(&l[0], "qcow2", env.dir.path()),
            golden,
            "round {round}"
        );
        assert_eq!(
            view_sha256(&l[2], "qcow2", env.dir.path()),
            vm,
            "round {round}"
        );
        assert!(
            std::fs::read_dir(env.state().join("journal/default"))
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().contains("set-aside")),
            "round {round}: the old journal is kept for the record"
        );
    }
    assert!(landed >= 2, "only {landed} kills landed mid-plan");
}

/// F13: the active image replaced while a plan runs: the finished plan does not leave the disk
/// stuck; the next apply plans from the chain as it is, and the moved file keeps its data.
#[test]
fn a_chain_changed_behind_a_running_plan_never_leaves_the_disk_stuck() {
    let env = Env::new();
    let l = three(&env, 1);
    let vm = view_sha256(&l[2], "qcow2", env.dir.path());
    let spec = env.spec("vm.yaml", &spec_yaml("vm", &l[2], &[], ""));
    let child = env
        .diskchain(&["apply", "-f"])
        .arg(&spec)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    env.wait_for_step("vm", Duration::from_secs(5), || false);
    let moved = env.img("vm.moved.qcow2");
    std::fs::rename(&l[2], &moved).unwrap();
    create(&l[2], 0, Some((&l[1], "qcow2")), &[]);
    // The run that saw the change fails, or finishes on the moved file; a finished plan whose
    // chain changed is set aside, never retried forever.
    let first = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&first.stderr);
    if err.contains("was planned") {
        assert!(err.contains("set aside"), "{err}");
    }
    // The next applies plan from the chain as it is and converge.
    let mut last = String::new();
    let converged = (0..2).any(|_| {
        let out = env.apply(&spec, &[]);
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        out.status.code() == Some(0)
    });
    assert!(converged, "stuck: {last}");
    assert_eq!(backing_chain(&l[2]), vec![l[2].clone()]);
    assert_eq!(
        view_sha256(&moved, "qcow2", env.dir.path()),
        vm,
        "the moved file's data"
    );
}

/// F18: apply's stdout closed mid-plan (a pipe whose reader left): no panic, the plan is
/// carried out to the end, and the exit code says output failed.
#[test]
fn a_closed_stdout_never_stops_a_plan_halfway() {
    let env = Env::new();
    let l = three(&env, 1);
    let vm = view_sha256(&l[2], "qcow2", env.dir.path());
    let spec = env.spec("vm.yaml", &spec_yaml("vm", &l[2], &[], "  prune: true\n"));
    let mut child = env
        .diskchain(&["apply", "-f"])
        .arg(&spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!env.journal("vm").exists(), "the plan finished");
    assert_eq!(backing_chain(&l[2]), vec![l[2].clone()]);
    assert_eq!(view_sha256(&l[2], "qcow2", env.dir.path()), vm);
}

/// A commit interrupted after writing into a layer that a point the spec now keeps reads
/// through: that point no longer reads as it did, so the plan is neither resumed nor silently
/// set aside; the operator is asked (the same way out as a commit into the kept file itself).
#[test]
fn a_commit_interrupted_below_a_point_kept_again_needs_the_operator() {
    let mut landed = 0;
    for round in 0..4 {
        let env = Env::new();
        let l = [
            env.img("golden.qcow2"),
            env.img("mid.qcow2"),
            env.img("vm.qcow2"),
        ];
        create(&l[0], 1 << 30, None, &[]);
        io(&l[0], "qcow2", &["write -P 1 0 400M".into()]);
        create(&l[1], 0, Some((&l[0], "qcow2")), &[]);
        io(&l[1], "qcow2", &["write -P 2 500M 100M".into()]);
        create(&l[2], 0, Some((&l[1], "qcow2")), &[]);
        io(&l[2], "qcow2", &["write -P 3 700M 1M".into()]);
        // Drop every point: the cheapest holder is golden (the data of mid and vm is committed
        // into it, 101 MiB, rather than golden's 400 MiB moved up).
        let v1 = env.spec("vm.yaml", &spec_yaml("vm", &l[2], &[], ""));
        let plan = env.plan_json(&v1);
        let first = &plan["disks"][0]["steps"][0];
        assert!(
            first["op"] == "commit" && first["base"] == l[0].to_str().unwrap(),
            "round {round}: expected a commit into golden first: {plan}"
        );
        if !apply_killed_mid_step(&env, &v1, &["--max-bytes-per-sec", "104857600"]) {
            continue;
        }
        landed += 1;
        // The spec keeps mid again: mid reads through golden, which the commit wrote.
        let v2 = env.spec(
            "vm.yaml",
            &spec_yaml("vm", &l[2], &[("mid".into(), Some(l[1].clone()))], ""),
        );
        let out = env.apply(&v2, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "round {round}: {err}");
        assert!(
            err.contains("reads through") && err.contains("set-aside"),
            "round {round}: {err}"
        );
        assert!(
            env.journal("vm").exists(),
            "round {round}: the journal is kept"
        );
    }
    assert!(landed > 0, "no kill landed mid-commit");
}
