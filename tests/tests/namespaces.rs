//! Disks are keyed by namespace and name: two specs named alike in two namespaces are two disks
//! with their own state, journal and lock; state written before namespaces is read and moved,
//! and never guessed onto the wrong disk.

use std::path::{Path, PathBuf};

use diskchain_tests::env::{Env, apply_killed_mid_step, check, spec_yaml};
use diskchain_tests::qemu::{create, io, view_sha256};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// base (`big` MiB) <- mid (64 KiB) <- top (64 KiB), named `{tag}-*.qcow2`, each layer with a
/// pattern of its own.
fn chain(env: &Env, tag: &str, big: u64, seed: u64) -> [PathBuf; 3] {
    let [b, m, t] = ["base", "mid", "top"].map(|n| env.img(&format!("{tag}-{n}.qcow2")));
    create(&b, 64 * MIB, None, &[]);
    io(&b, "qcow2", &[format!("write -P {seed} 0 {big}M")]);
    create(&m, 0, Some((&b, "qcow2")), &[]);
    io(&m, "qcow2", &[format!("write -P {} 1M 64k", seed + 1)]);
    create(&t, 0, Some((&m, "qcow2")), &[]);
    io(&t, "qcow2", &[format!("write -P {} 2M 64k", seed + 2)]);
    [b, m, t]
}

/// A spec document of disk `name` in `namespace` keeping `mid` as point `p`.
fn doc(namespace: Option<&str>, name: &str, [_, mid, top]: &[PathBuf; 3]) -> String {
    let y = spec_yaml(name, top, &[("p".into(), Some(mid.clone()))], "");
    match namespace {
        Some(ns) => y.replace(
            &format!("  name: {name}\n"),
            &format!("  name: {name}\n  namespace: {ns}\n"),
        ),
        None => y,
    }
}

fn sha(env: &Env, f: &Path) -> String {
    view_sha256(f, "qcow2", env.dir.path())
}

fn status_json(env: &Env) -> Value {
    let out = env.diskchain(&["status", "-o", "json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["disks"].clone()
}

#[test]
fn one_name_in_two_namespaces_is_two_disks_with_their_own_state_and_journal() {
    let env = Env::new();
    let a = chain(&env, "a", 4, 10);
    let b = chain(&env, "b", 4, 20);
    let views = |c: &[PathBuf; 3]| (sha(&env, &c[1]), sha(&env, &c[2]));
    let (va, vb) = (views(&a), views(&b));
    let spec = env.spec(
        "disks.yaml",
        &format!(
            "{}---\n{}",
            doc(Some("team-a"), "vda", &a),
            doc(Some("team-b"), "vda", &b)
        ),
    );
    let plan = env.plan_json(&spec);
    let disks = plan["disks"].as_array().unwrap();
    let keys: Vec<(String, String)> = disks
        .iter()
        .map(|d| {
            (
                d["namespace"].as_str().unwrap().to_string(),
                d["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        vec![
            ("team-a".into(), "vda".into()),
            ("team-b".into(), "vda".into())
        ]
    );

    // Killed in its first step, one disk's journal is its own: the other's is not there.
    assert!(
        apply_killed_mid_step(&env, &spec, &[]),
        "the apply ended before a step ran"
    );
    let journals: Vec<bool> = ["team-a", "team-b"]
        .iter()
        .map(|ns| env.state().join(format!("journal/{ns}/vda.json")).exists())
        .collect();
    assert_eq!(
        journals.iter().filter(|j| **j).count(),
        1,
        "exactly the disk killed mid-step has a journal: {journals:?}"
    );
    assert!(!env.state().join("journal/vda.json").exists());

    let out = env.apply_ok(&spec, &[]);
    // The CLI's observer names each disk by its key, one line per step (stdout is a pipe).
    let text = String::from_utf8_lossy(&out.stdout);
    for ns in ["team-a", "team-b"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{ns}/vda: ")) && l.contains(" done: ")),
            "{text}"
        );
    }
    // Both converged: each keeps its point and active view, in its own files.
    for (c, (mid, top)) in [(&a, &va), (&b, &vb)] {
        let chain = diskchain_tests::env::backing_chain(&c[2]);
        assert_eq!(chain.len(), 2, "{chain:?}");
        assert_eq!(&sha(&env, &chain[0]), mid);
        assert_eq!(&sha(&env, &c[2]), top);
        for f in &chain {
            assert_eq!(check(f), 0, "{}", f.display());
        }
    }
    for (ns, c) in [("team-a", &a), ("team-b", &b)] {
        let rec: Value = serde_json::from_str(
            &std::fs::read_to_string(env.state().join(format!("disks/{ns}/vda.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(rec["namespace"], ns);
        assert_eq!(rec["active"], c[2].to_str().unwrap());
        assert!(!env.state().join(format!("journal/{ns}/vda.json")).exists());
    }
    let st = status_json(&env);
    let shown: Vec<(String, String)> = st
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["namespace"].as_str().unwrap().to_string(),
                d["active"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        vec![
            ("team-a".into(), a[2].display().to_string()),
            ("team-b".into(), b[2].display().to_string())
        ]
    );
    let text = env.diskchain(&["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("disk team-a/vda ") && text.contains("disk team-b/vda "),
        "{text}"
    );
    // Nothing left to do for either.
    let again = env.plan_json(&spec);
    for d in again["disks"].as_array().unwrap() {
        assert_eq!(d["steps"].as_array().unwrap().len(), 0, "{again}");
    }
}

/// Applies `spec` (point `p` moves from mid into base: committing 64 KiB is cheaper than
/// streaming 4 MiB), then rewrites the state directory as the version before namespaces left it.
fn legacy_state(env: &Env, spec: &Path, ns: &str) {
    env.apply_ok(spec, &[]);
    let keyed = env.state().join(format!("disks/{ns}/vda.json"));
    let mut rec: Value = serde_json::from_str(&std::fs::read_to_string(&keyed).unwrap()).unwrap();
    rec.as_object_mut().unwrap().remove("namespace");
    std::fs::write(
        env.state().join("disks/vda.json"),
        serde_json::to_string(&rec).unwrap(),
    )
    .unwrap();
    std::fs::remove_dir_all(env.state().join("disks").join(ns)).unwrap();
}

#[test]
fn state_from_before_namespaces_is_read_and_moved_to_its_key() {
    let env = Env::new();
    let c = chain(&env, "d", 4, 30);
    let spec = env.spec("d.yaml", &doc(Some("prod"), "vda", &c));
    legacy_state(&env, &spec, "prod");
    // The point now lives in the base file; only the record says so (the spec still names mid).
    assert_eq!(diskchain_tests::env::backing_chain(&c[2])[0], c[0]);
    let plan = env.plan_json(&spec);
    assert_eq!(
        plan["disks"][0]["steps"].as_array().unwrap().len(),
        0,
        "the legacy record was not read: {plan}"
    );
    env.apply_ok(&spec, &[]);
    assert!(env.state().join("disks/prod/vda.json").exists());
    assert!(!env.state().join("disks/vda.json").exists());
    let st = status_json(&env);
    assert_eq!(st.as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st[0]["namespace"], "prod");
    assert_eq!(st[0]["chain"][0]["point"], "p");
}

#[test]
fn state_from_before_namespaces_shared_by_two_names_is_not_guessed() {
    let env = Env::new();
    let c = chain(&env, "d", 4, 40);
    let other = chain(&env, "o", 4, 50);
    let spec = env.spec("d.yaml", &doc(None, "vda", &c));
    legacy_state(&env, &spec, "default");
    let both = env.spec(
        "d.yaml",
        &format!(
            "{}---\n{}",
            doc(None, "vda", &c),
            doc(Some("prod"), "vda", &other)
        ),
    );
    let before = env.fingerprints();
    let out = env.apply(&both, &[]);
    assert_eq!(out.status.code(), Some(2), "bad input, nothing touched");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("disks/vda.json") && err.contains("written before namespaces"),
        "{err}"
    );
    assert_eq!(env.fingerprints(), before, "an image was touched");
    assert!(env.state().join("disks/vda.json").exists());
}

#[test]
fn a_journal_from_before_namespaces_is_resumed_and_moved() {
    let env = Env::new();
    let c = chain(&env, "j", 8, 60);
    let (mid, top) = (sha(&env, &c[1]), sha(&env, &c[2]));
    let spec = env.spec("j.yaml", &doc(None, "vda", &c));
    assert!(
        apply_killed_mid_step(&env, &spec, &[]),
        "the apply ended before a step ran"
    );
    // As the version before namespaces left it: journal/NAME.json, no namespace in it.
    let keyed = env.journal("vda");
    let mut j: Value = serde_json::from_str(&std::fs::read_to_string(&keyed).unwrap()).unwrap();
    j.as_object_mut().unwrap().remove("namespace");
    let legacy = env.state().join("journal/vda.json");
    std::fs::write(&legacy, serde_json::to_string(&j).unwrap()).unwrap();
    std::fs::remove_file(&keyed).unwrap();
    let plan = env.diskchain(&["plan", "-f"]).arg(&spec).output().unwrap();
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains("an earlier plan is in flight"), "{text}");
    env.apply_ok(&spec, &[]);
    assert!(!legacy.exists() && !keyed.exists());
    let chain = diskchain_tests::env::backing_chain(&c[2]);
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(sha(&env, &chain[0]), mid);
    assert_eq!(sha(&env, &c[2]), top);
    for f in &chain {
        assert_eq!(check(f), 0, "{}", f.display());
    }
    assert!(env.record("vda").exists());
}

#[test]
fn set_aside_refuses_a_disk_name_that_leaves_the_state_directory() {
    let env = Env::new();
    for bad in ["../../escaped", "../x/../../escaped", "Prod/vda", "a/b/c"] {
        let out = env
            .diskchain(&["set-aside", "--disk", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}: bad input");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--disk"), "{bad}: {err}");
    }
    // Nothing was created outside the state directory (nor inside it).
    assert!(!env.dir.path().join("escaped.lock").exists());
    assert!(!env.state().exists(), "the state directory was touched");
}
