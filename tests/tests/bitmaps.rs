//! Bitmaps in the model (issue 10, item 2): the observer reads each layer's persistent dirty
//! bitmaps (name, granularity, flags); `plan` and `status` show them, and a bitmap whose in-use
//! flag was left by a QEMU that died is reported as inconsistent, not shown as sound.

use std::process::{Command, Stdio};
use std::time::Duration;

use diskchain_tests::env::{Env, spec_yaml};
use diskchain_tests::qemu::{create, io, run};
use serde_json::Value;

#[test]
fn plan_and_status_show_bitmaps_and_report_an_inconsistent_one() {
    let env = Env::new();
    let base = env.img("base.qcow2");
    let top = env.img("top.qcow2");
    create(&base, 64 << 20, None, &[]);
    io(&base, "qcow2", &["write -P 1 0 1M".into()]);
    create(&top, 0, Some((&base, "qcow2")), &[]);
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--granularity", "128K"])
        .arg(&top)
        .arg("b0"));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--disable"])
        .arg(&top)
        .arg("b1"));
    let spec = env.spec(
        "d.yaml",
        &spec_yaml("d", &top, &[("golden".into(), Some(base.clone()))], ""),
    );
    let notes = |env: &Env| -> Vec<String> {
        env.plan_json(&spec)["disks"][0]["notes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    };
    let n = notes(&env);
    assert!(
        n.iter()
            .any(|l| l.contains("bitmap b0 (128.0 KiB granularity, recording)")),
        "{n:?}"
    );
    assert!(
        n.iter()
            .any(|l| l.contains("bitmap b1 (64.0 KiB granularity, disabled)")),
        "{n:?}"
    );
    assert!(!n.iter().any(|l| l.contains("INCONSISTENT")), "{n:?}");

    // A QEMU that had the image open read-write dies: the in-use flags stay set.
    let mut q = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&top)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    q.kill().unwrap();
    q.wait().unwrap();
    let n = notes(&env);
    assert!(
        n.iter()
            .any(|l| l.contains("bitmap b0") && l.contains("INCONSISTENT")),
        "{n:?}"
    );

    // `status` shows them too (the disk is recorded by an apply that has nothing to do).
    env.apply_ok(&spec, &[]);
    let st = env.diskchain(&["status", "-o", "json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&st.stdout).unwrap();
    let layers = v["disks"][0]["chain"].as_array().unwrap();
    let bitmaps = layers.last().unwrap()["bitmaps"].as_array().unwrap();
    let state = |name: &str| {
        bitmaps
            .iter()
            .find(|b| b["name"] == name)
            .map(|b| (b["state"].clone(), b["granularity"].clone()))
    };
    assert_eq!(
        state("b0"),
        Some(("inconsistent".into(), 131072.into())),
        "{v}"
    );
    // QEMU marks every bitmap it loads read-write in use, disabled ones too.
    assert_eq!(
        state("b1"),
        Some(("inconsistent".into(), 65536.into())),
        "{v}"
    );
    let text = env.diskchain(&["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("bitmap b0") && text.contains("INCONSISTENT"),
        "{text}"
    );
}

/// Issue 10, item 3: a persistent bitmap started before some writes, in every layer as libvirt
/// keeps it; diskchain removes a point (a stream), adds one (a snapshot), moves the chain to
/// another directory (copies) and flattens it (a commit that takes over the active path). After
/// each, the union of the bitmap over the chain is exactly the set of clusters written since it
/// was started (not fewer: an incremental backup would miss them; not more: it would copy data
/// that did not change), the top records, and every layer passes `qemu-img check`.
#[test]
fn every_offline_step_keeps_the_bitmap_exact() {
    use diskchain_tests::bitmap::{bitmaps, union_over_chain};
    use diskchain_tests::env::{backing_chain, check};
    const M: u64 = 1 << 20;
    let env = Env::new();
    let scratch = tempfile::tempdir().unwrap();
    let (base, mid, top) = (
        env.img("base.qcow2"),
        env.img("mid.qcow2"),
        env.img("top.qcow2"),
    );
    let add = |f: &std::path::Path| diskchain_tests::bitmap::add(f, "ck1");
    let w = |f: &std::path::Path, pattern: u8, at: u64, len: u64| {
        io(f, "qcow2", &[format!("write -P {pattern} {at} {len}")]);
    };
    create(&base, 64 * M, None, &[]);
    w(&base, 9, 8 * M, 8 * M); // before the checkpoint: never dirty
    add(&base);
    let mut written = vec![(0, M)];
    w(&base, 1, 0, M);
    create(&mid, 0, Some((&base, "qcow2")), &[]);
    add(&mid);
    w(&mid, 2, 2 * M, 4 * M);
    written.push((2 * M, 4 * M));
    create(&top, 0, Some((&mid, "qcow2")), &[]);
    add(&top);
    w(&top, 3, 2 * M, 3 * M);
    w(&top, 4, 20 * M, M);
    written.push((20 * M, M));
    let expect = |extra: &[(u64, u64)]| {
        let mut all: Vec<(u64, u64)> = written.iter().chain(extra).copied().collect();
        all.sort();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, l) in all {
            match merged.last_mut() {
                Some(m) if m.0 + m.1 >= s => m.1 = m.1.max(s + l - m.0),
                _ => merged.push((s, l)),
            }
        }
        merged
    };
    let verify = |env: &Env, what: &str, extra: &[(u64, u64)]| {
        let chain = backing_chain(&top);
        for f in &chain {
            assert_eq!(check(f), 0, "{what}: {} fails qemu-img check", f.display());
        }
        assert_eq!(
            bitmaps(&top),
            vec![("ck1".to_string(), true)],
            "{what}: the active image must record ck1"
        );
        assert_eq!(
            union_over_chain(&top, "ck1", 64 * M, scratch.path()),
            expect(extra),
            "{what}: the bitmap over {chain:?} is not the set of writes since it started"
        );
        let _ = env;
    };
    verify(&env, "before", &[]);

    let ops = |env: &Env, spec: &std::path::Path| -> Vec<String> {
        env.plan_json(spec)["disks"][0]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["op"].as_str().unwrap().to_string())
            .collect()
    };
    let spec_with = |points: &[(&str, Option<&std::path::Path>)], extra: &str| {
        env.spec(
            "d.yaml",
            &diskchain_tests::env::spec_yaml_source(
                "d",
                &format!("file: {}", top.display()),
                points,
                extra,
            ),
        )
    };

    // Removing mid: most of it is hidden by top, so its rest is streamed into top.
    let spec = spec_with(&[("p0", Some(&base))], "");
    let o = ops(&env, &spec);
    assert!(o.contains(&"stream".to_string()), "{o:?}");
    env.apply_ok(&spec, &[]);
    verify(&env, "after removing a point", &[]);

    // A new point: the new top records from now on.
    let spec = spec_with(&[("p0", Some(&base)), ("p2", None)], "");
    assert!(ops(&env, &spec).contains(&"snapshot".to_string()));
    env.apply_ok(&spec, &[]);
    w(&top, 5, 30 * M, M);
    verify(&env, "after adding a point and writing", &[(30 * M, M)]);

    // Flattening: the layer below takes over the active path after a commit into it.
    let spec = spec_with(&[], "");
    let o = ops(&env, &spec);
    assert!(o.contains(&"take-over".to_string()), "{o:?}");
    env.apply_ok(&spec, &[]);
    assert_eq!(backing_chain(&top), vec![top.clone()]);
    verify(&env, "after flattening", &[(30 * M, M)]);
    // A new point, then moved to another directory: the copy carries the bitmap.
    let spec = spec_with(&[("p3", None)], "");
    env.apply_ok(&spec, &[]);
    w(&top, 6, 40 * M, M);
    verify(
        &env,
        "after a new point and a write",
        &[(30 * M, M), (40 * M, M)],
    );
    let moved = env.root().join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    let spec = spec_with(
        &[("p3", None)],
        &format!("  placement:\n    directory: {}\n", moved.display()),
    );
    let o = ops(&env, &spec);
    assert!(o.contains(&"copy".to_string()), "{o:?}");
    env.apply_ok(&spec, &[]);
    assert!(
        backing_chain(&top)[..1]
            .iter()
            .all(|f| f.starts_with(&moved)),
        "{:?}",
        backing_chain(&top)
    );
    verify(&env, "after moving the point", &[(30 * M, M), (40 * M, M)]);
}

/// SIGKILL at spread-out moments of a flatten whose layers carry a bitmap (a commit into the
/// layer below, a stream, the take-over): the rerun converges, the guest view is unchanged, and
/// the bitmap over the chain still covers every write since it started (exactly, unless the
/// kill fell between a finished copy and the rebuild of the layer's bitmaps), recording on top.
#[test]
fn a_killed_bitmap_carrying_plan_converges_exactly() {
    use diskchain_tests::bitmap::{bitmaps, union_over_chain};
    use diskchain_tests::env::{apply_killed_after, backing_chain, check};
    use diskchain_tests::qemu::view_sha256;
    const M: u64 = 1 << 20;
    let (mut landed, mut exact) = (0, 0);
    for delay_ms in [0u64, 3, 8, 15, 25, 40, 60, 90, 130, 200] {
        let env = Env::new();
        let scratch = tempfile::tempdir().unwrap();
        let (base, mid, top) = (
            env.img("base.qcow2"),
            env.img("mid.qcow2"),
            env.img("top.qcow2"),
        );
        let add = |f: &std::path::Path| diskchain_tests::bitmap::add(f, "ck");
        create(&base, 256 * M, None, &[]);
        io(&base, "qcow2", &["write -P 9 0 48M".into()]);
        add(&base);
        io(&base, "qcow2", &["write -P 1 64M 2M".into()]);
        create(&mid, 0, Some((&base, "qcow2")), &[]);
        add(&mid);
        io(&mid, "qcow2", &["write -P 2 100M 24M".into()]);
        create(&top, 0, Some((&mid, "qcow2")), &[]);
        add(&top);
        io(&top, "qcow2", &["write -P 3 200M 1M".into()]);
        let want = vec![(64 * M, 2 * M), (100 * M, 24 * M), (200 * M, M)];
        let view = view_sha256(&top, "qcow2", scratch.path());
        let spec = env.spec("d.yaml", &spec_yaml("d", &top, &[], ""));
        if apply_killed_after(&env, &spec, &[], std::time::Duration::from_millis(delay_ms)) {
            landed += 1;
        }
        env.apply_ok(&spec, &[]);
        assert_eq!(
            backing_chain(&top),
            vec![top.clone()],
            "delay {delay_ms} ms"
        );
        assert_eq!(check(&top), 0, "delay {delay_ms} ms");
        assert_eq!(
            view_sha256(&top, "qcow2", scratch.path()),
            view,
            "delay {delay_ms} ms"
        );
        assert_eq!(
            bitmaps(&top),
            vec![("ck".to_string(), true)],
            "delay {delay_ms} ms"
        );
        // Every write since the bitmap started is covered. A kill in the few milliseconds
        // between a finished copy and the rebuild of the written layer's bitmaps may leave
        // them counting what the copy wrote (base's 48 MiB): safe, never fewer; the rerun
        // keeps whatever the images recorded meanwhile.
        let got = union_over_chain(&top, "ck", 256 * M, scratch.path());
        let covers = |ranges: &[(u64, u64)], (s, l): (u64, u64)| {
            ranges.iter().any(|&(a, b)| a <= s && s + l <= a + b)
        };
        for &w in &want {
            assert!(
                covers(&got, w),
                "delay {delay_ms} ms: {w:?} missing from {got:?}"
            );
        }
        let allowed: Vec<(u64, u64)> = want.iter().copied().chain([(0, 48 * M)]).collect();
        for &g in &got {
            assert!(
                covers(&allowed, g),
                "delay {delay_ms} ms: {g:?} in {got:?} was never written"
            );
        }
        exact += usize::from(got == want);
        let leftovers: Vec<_> = std::fs::read_dir(env.root())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".bitmaps"))
            .collect();
        assert!(leftovers.is_empty(), "delay {delay_ms} ms: {leftovers:?}");
    }
    assert!(landed >= 3, "only {landed} kills landed mid-plan");
    assert!(exact >= 7, "only {exact} of 10 rounds ended exact");
}

/// A revert keeps only the bitmaps that existed at the point reverted to: `old` (started before
/// the point) goes on recording in the new top and still covers every write since it started
/// that the reverted view holds; `new` (started after the point, so it cannot describe what
/// the revert undid) is not carried, so a backup tool finds no bitmap of that name on top, and
/// `plan` says so.
#[test]
fn a_revert_keeps_only_the_bitmaps_that_existed_at_its_point() {
    use diskchain_tests::bitmap::{bitmaps, union_over_chain};
    use diskchain_tests::env::{backing_chain, check};
    const M: u64 = 1 << 20;
    let env = Env::new();
    let scratch = tempfile::tempdir().unwrap();
    let (golden, vm) = (env.img("golden.qcow2"), env.img("vm.qcow2"));
    create(&golden, 64 * M, None, &[]);
    io(&golden, "qcow2", &["write -P 1 0 4M".into()]);
    diskchain_tests::bitmap::add(&golden, "old");
    io(&golden, "qcow2", &["write -P 2 8M 1M".into()]);
    create(&vm, 0, Some((&golden, "qcow2")), &[]);
    for name in ["old", "new"] {
        diskchain_tests::bitmap::add(&vm, name);
    }
    io(&vm, "qcow2", &["write -P 3 16M 1M".into()]);
    let spec = env.spec(
        "d.yaml",
        &spec_yaml(
            "d",
            &vm,
            &[("golden".into(), Some(golden.clone()))],
            "  revert:\n    to: golden\n    id: r1\n",
        ),
    );
    let notes = env.plan_json(&spec)["disks"][0]["notes"].to_string();
    assert!(
        notes.contains("bitmap new did not exist at point golden"),
        "{notes}"
    );
    env.apply_ok(&spec, &[]);
    let chain = backing_chain(&vm);
    assert_eq!(chain.len(), 2, "{chain:?}");
    for f in &chain {
        assert_eq!(check(f), 0);
    }
    assert_eq!(bitmaps(&vm), vec![("old".to_string(), true)]);
    assert_eq!(
        union_over_chain(&vm, "old", 64 * M, scratch.path()),
        vec![(8 * M, M)]
    );
    io(&vm, "qcow2", &["write -P 4 32M 1M".into()]);
    assert_eq!(
        union_over_chain(&vm, "old", 64 * M, scratch.path()),
        vec![(8 * M, M), (32 * M, M)]
    );
}
