//! `diskchain plan` end to end on real qcow2 chains built with qemu-img/qemu-io.
//!
//! The expected minimum comes from `qemu-img map` (each layer alone) fed to the brute-force
//! oracle; the binary's `total_bytes` must equal it. Every bad input exits 2 and touches nothing.

use std::path::{Path, PathBuf};

use diskchain_tests::env::{CLUSTER, Env, random_chain, spec_yaml};
use diskchain_tests::oracle::{Cell, Problem, min_cost};
use diskchain_tests::qemu::{cluster_states, create, cycle, hold_open, io};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The oracle's problem for a chain, from qemu-img map.
fn problem_of(layers: &[PathBuf], shared_upto: Option<usize>, keep: &[usize]) -> Problem {
    let mut id = 0;
    let cells = layers
        .iter()
        .map(|p| {
            cluster_states(p, "qcow2", CLUSTER)
                .into_iter()
                .map(|s| match s {
                    1 => {
                        id += 1;
                        Cell::D(id)
                    }
                    2 => Cell::Z,
                    _ => Cell::U,
                })
                .collect()
        })
        .collect();
    Problem {
        layers: cells,
        shared: (0..layers.len())
            .map(|i| shared_upto.is_some_and(|s| i <= s))
            .collect(),
        keep: keep.to_vec(),
    }
}

#[test]
fn plan_reports_exactly_the_minimum_on_random_real_chains() {
    let mut rng = StdRng::seed_from_u64(0x5eed_2026);
    let (mut planned, mut blocked, mut nonzero) = (0, 0, 0);
    for case in 0..30 {
        let env = Env::new();
        let n = rng.random_range(2..=8);
        let clusters = rng.random_range(4..24);
        let layers = random_chain(&env, &mut rng, "d", n, clusters, 4);
        // Sometimes a disk that no spec declares shares a layer of this chain.
        let shared_upto = rng.random_bool(0.35).then(|| rng.random_range(0..n - 1));
        if let Some(s) = shared_upto {
            create(
                &env.img("other-disk.qcow2"),
                0,
                Some((&layers[s], "qcow2")),
                &[],
            );
        }
        let keep: Vec<usize> = (0..n - 1).filter(|_| rng.random_bool(0.5)).collect();
        let mut points: Vec<(String, Option<PathBuf>)> = keep
            .iter()
            .map(|&k| (format!("p{k}"), Some(layers[k].clone())))
            .collect();
        if rng.random_bool(0.3) {
            points.push(("new-snap".into(), None));
        }
        let spec = env.spec("disk.yaml", &spec_yaml("disk", &layers[n - 1], &points, ""));
        let before = env.fingerprints();
        let truth = min_cost(&problem_of(&layers, shared_upto, &keep));
        let out = env.plan(&spec);
        assert_eq!(
            env.fingerprints(),
            before,
            "case {case}: plan touched a file"
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match truth {
            Some(min) => {
                assert_eq!(out.status.code(), Some(0), "case {case}: {stderr}");
                let v: Value = serde_json::from_str(&stdout).unwrap();
                let disk = &v["disks"][0];
                assert_eq!(disk["name"], "disk");
                assert_eq!(
                    disk["total_bytes"].as_u64(),
                    Some(min * CLUSTER),
                    "case {case}: {stdout}"
                );
                let sum: u64 = disk["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["bytes"].as_u64().unwrap())
                    .sum();
                assert_eq!(sum, min * CLUSTER);
                for s in disk["steps"].as_array().unwrap() {
                    let op = s["op"].as_str().unwrap();
                    assert!(
                        [
                            "snapshot",
                            "stream",
                            "commit",
                            "copy",
                            "mirror",
                            "rebase",
                            "delete",
                            "take-over"
                        ]
                        .contains(&op),
                        "{op}"
                    );
                }
                planned += 1;
                nonzero += usize::from(min > 0);
            }
            None => {
                assert_eq!(
                    out.status.code(),
                    Some(2),
                    "case {case}: expected a refusal: {stdout}"
                );
                assert!(
                    stderr.contains("shared"),
                    "case {case}: the error names the shared layer: {stderr}"
                );
                blocked += 1;
            }
        }
    }
    assert!(
        planned >= 15 && nonzero >= 10,
        "planned {planned}, nonzero {nonzero}, blocked {blocked}"
    );
}

/// A small valid setup: base <- mid <- top <- active, a golden point on base.
fn setup(env: &Env) -> Vec<PathBuf> {
    let mut layers: Vec<PathBuf> = Vec::new();
    for i in 0..4u64 {
        let p = env.img(&format!("w-{i}.qcow2"));
        create(
            &p,
            8 * CLUSTER,
            layers.last().map(|b| (b.as_path(), "qcow2")),
            &[],
        );
        io(
            &p,
            "qcow2",
            &[format!(
                "write -P {} {} {}",
                i + 1,
                i * CLUSTER,
                2 * CLUSTER
            )],
        );
        layers.push(p);
    }
    layers
}

fn assert_refused(env: &Env, spec: &Path, needle: &str) {
    let before = env.fingerprints();
    let out = env.plan(spec);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2 for {needle:?}: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "stderr should mention {needle:?}: {stderr}"
    );
    assert_eq!(env.fingerprints(), before, "a refused plan touched a file");
}

#[test]
fn bad_specs_are_refused_with_the_file_and_field_named() {
    let env = Env::new();
    let l = setup(&env);
    let good = spec_yaml("web", &l[3], &[("golden".into(), Some(l[0].clone()))], "");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "malformed.yaml",
            "apiVersion: [unclosed\n".into(),
            "malformed YAML",
        ),
        (
            "unknown.yaml",
            good.replace("  source:", "  retain: 3\n  source:"),
            "spec.retain",
        ),
        (
            "twice.yaml",
            spec_yaml(
                "web",
                &l[3],
                &[
                    ("a".into(), Some(l[0].clone())),
                    ("a".into(), Some(l[1].clone())),
                ],
                "",
            ),
            "spec.snapshots[1].name",
        ),
        (
            "samefile.yaml",
            spec_yaml(
                "web",
                &l[3],
                &[
                    ("a".into(), Some(l[0].clone())),
                    ("b".into(), Some(l[0].clone())),
                ],
                "",
            ),
            "spec.snapshots[1].file",
        ),
        (
            "notinchain.yaml",
            spec_yaml("web", &l[1], &[("a".into(), Some(l[2].clone()))], ""),
            "not a backing layer",
        ),
        (
            "order.yaml",
            spec_yaml(
                "web",
                &l[3],
                &[
                    ("a".into(), Some(l[1].clone())),
                    ("b".into(), Some(l[0].clone())),
                ],
                "",
            ),
            "oldest (base) first",
        ),
        (
            "newbelow.yaml",
            spec_yaml(
                "web",
                &l[3],
                &[("fresh".into(), None), ("b".into(), Some(l[0].clone()))],
                "",
            ),
            "spec.snapshots[0]",
        ),
        (
            "missing.yaml",
            spec_yaml("web", &env.img("nope.qcow2"), &[], ""),
            "does not exist",
        ),
        (
            "outside.yaml",
            spec_yaml("web", Path::new("/etc/hostname"), &[], ""),
            "outside the allowed roots",
        ),
    ];
    for (file, text, needle) in cases {
        let p = env.spec(file, &text);
        assert_refused(&env, &p, needle);
        assert!(
            String::from_utf8_lossy(&env.plan(&p).stderr).contains(file),
            "{file}: the error names the spec file"
        );
        std::fs::remove_file(p).unwrap();
    }
}

#[test]
fn two_specs_claiming_one_disk_through_a_symlink_are_refused() {
    let env = Env::new();
    let l = setup(&env);
    let link = env.img("alias.qcow2");
    std::os::unix::fs::symlink(&l[3], &link).unwrap();
    env.spec("a.yaml", &spec_yaml("a", &l[3], &[], ""));
    env.spec("b.yaml", &spec_yaml("b", &link, &[], ""));
    assert_refused(&env, &env.dir.path().join("specs"), "already claims");
}

#[test]
fn a_backing_reference_leaving_the_roots_is_refused() {
    let env = Env::new();
    let outside = tempfile::tempdir().unwrap();
    let base = outside.path().join("base.qcow2");
    create(&base, 1 << 20, None, &[]);
    let top = env.img("top.qcow2");
    create(&top, 0, Some((&base, "qcow2")), &[]);
    let spec = env.spec("s.yaml", &spec_yaml("web", &top, &[], ""));
    assert_refused(&env, &spec, "outside the allowed roots");
}

#[test]
fn a_backing_cycle_is_refused() {
    let env = Env::new();
    let (_, b) = cycle(&env.root());
    let spec = env.spec("s.yaml", &spec_yaml("web", &b, &[], ""));
    assert_refused(&env, &spec, "backing cycle");
}

#[test]
fn removing_points_below_a_shared_layer_is_refused_naming_it() {
    let env = Env::new();
    let l = setup(&env);
    create(&env.img("other.qcow2"), 0, Some((&l[1], "qcow2")), &[]);
    let spec = env.spec(
        "s.yaml",
        &spec_yaml("web", &l[3], &[("mid".into(), Some(l[1].clone()))], ""),
    );
    assert_refused(&env, &spec, &format!("{} is used by", l[1].display()));
}

#[test]
fn an_image_in_use_by_qemu_is_refused() {
    let env = Env::new();
    let l = setup(&env);
    let held = hold_open(&l[3], env.dir.path());
    let spec = env.spec("s.yaml", &spec_yaml("web", &l[3], &[], ""));
    let before = env.fingerprints();
    let out = env.plan(&spec);
    drop(held);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    // qemu-storage-daemon itself may have touched the active image; the others are unchanged.
    let after = env.fingerprints();
    for p in &l[..3] {
        assert_eq!(before[p], after[p], "{} changed", p.display());
    }
}

#[test]
fn the_text_output_explains_the_choice() {
    let env = Env::new();
    // The talk's example: A <- B <- C <- D, remove B; B is big and C small: commit C into B.
    let (a, b, c, d) = (
        env.img("a.qcow2"),
        env.img("b.qcow2"),
        env.img("c.qcow2"),
        env.img("d.qcow2"),
    );
    create(&a, 16 * CLUSTER, None, &[]);
    create(&b, 0, Some((&a, "qcow2")), &[]);
    io(&b, "qcow2", &["write -P 1 0 512k".into()]);
    create(&c, 0, Some((&b, "qcow2")), &[]);
    io(&c, "qcow2", &["write -P 2 0 64k".into()]);
    create(&d, 0, Some((&c, "qcow2")), &[]);
    let spec = env.spec(
        "s.yaml",
        &spec_yaml(
            "web",
            &d,
            &[("a".into(), Some(a.clone())), ("c".into(), Some(c.clone()))],
            "",
        ),
    );
    let out = env
        .diskchain(&[])
        .args(["plan", "-f"])
        .arg(&spec)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("commit into"), "{text}");
    assert!(
        text.contains("rejected: stream into c (448.0 KiB)"),
        "{text}"
    );
    assert!(text.contains("total: 64.0 KiB written"), "{text}");
}
