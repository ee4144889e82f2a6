//! Offline hardening: each test is a finding of the adversarial review (F3, F4, F7, F8, F9,
//! F16) turned into a promise. No view of any image changes unless the spec asks for it, an image
//! that fails `qemu-img check` is never written, bad input exits 2 naming the file and changes
//! nothing, and nothing crashes.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskchain_tests::env::{Env, backing_chain, spec_yaml};
use diskchain_tests::qemu::{create, io, run, view_sha256};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// F3: a revert never replaces an active image that another image uses as its backing file.
#[test]
fn revert_refuses_an_active_image_another_image_is_backed_by() {
    let env = Env::new();
    let golden = env.img("golden.qcow2");
    let vm = env.img("vm.qcow2");
    let clone = env.img("clone.qcow2");
    create(&golden, 64 << 20, None, &[]);
    io(&golden, "qcow2", &["write -P 1 0 4M".into()]);
    create(&vm, 64 << 20, Some((&golden, "qcow2")), &[]);
    io(&vm, "qcow2", &["write -P 2 8M 4M".into()]);
    create(&clone, 64 << 20, Some((&vm, "qcow2")), &[]);
    io(&clone, "qcow2", &["write -P 3 20M 1M".into()]);
    let before = env.fingerprints();
    let spec = env.spec(
        "vm.yaml",
        &spec_yaml(
            "vm",
            &vm,
            &[("golden".into(), Some(golden.clone()))],
            "  revert:\n    to: golden\n    id: r1\n  prune: true\n",
        ),
    );
    let out = env.apply(&spec, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("clone.qcow2"), "{}", stderr(&out));
    assert_eq!(env.fingerprints(), before, "nothing changed");
}

/// Sets the refcount of the first data cluster of a qcow2 image (16-bit refcounts) to zero:
/// `qemu-img check` reports it, and QEMU would hand the cluster out again.
fn zero_a_refcount(path: &Path) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = [0u8; 104];
    f.read_exact_at(&mut h, 0).unwrap();
    let cs = 1u64 << u32::from_be_bytes(h[20..24].try_into().unwrap());
    let l1_offset = be64(&h, 40);
    let rt_offset = be64(&h, 48);
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, l1_offset).unwrap();
    let l2 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
    f.read_exact_at(&mut e, l2).unwrap();
    let data = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(data, 0, "guest cluster 0 holds data");
    let ci = data / cs;
    let per_block = cs / 2;
    f.read_exact_at(&mut e, rt_offset + 8 * (ci / per_block))
        .unwrap();
    let rb = u64::from_be_bytes(e);
    f.write_all_at(&[0, 0], rb + 2 * (ci % per_block)).unwrap();
}

/// F4: an image whose refcounts are damaged is never written: the step is refused naming it.
#[test]
fn a_layer_that_fails_qemu_img_check_is_never_written() {
    let env = Env::new();
    let l: Vec<PathBuf> = (0..3).map(|i| env.img(&format!("l{i}.qcow2"))).collect();
    create(&l[0], 64 << 20, None, &[]);
    io(&l[0], "qcow2", &["write -P 1 0 8M".into()]);
    create(&l[1], 64 << 20, Some((&l[0], "qcow2")), &[]);
    io(&l[1], "qcow2", &["write -P 2 0 1M".into()]);
    create(&l[2], 64 << 20, Some((&l[1], "qcow2")), &[]);
    io(&l[2], "qcow2", &["write -P 3 2M 1M".into()]);
    zero_a_refcount(&l[0]);
    let status = Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2"])
        .arg(&l[0])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2), "the fixture is corrupt");
    let before = env.fingerprints();
    let spec = env.spec(
        "d.yaml",
        &spec_yaml("d", &l[2], &[("p1".into(), Some(l[1].clone()))], ""),
    );
    let out = env.apply(&spec, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("l0.qcow2") && err.contains("qemu-img check"),
        "{err}"
    );
    assert_eq!(env.fingerprints(), before, "nothing was written");
}

/// F7: internal snapshots are never dropped silently: a plan that would move or merge away the
/// layer holding them is refused, naming them. (Persistent bitmaps are carried by every step
/// since issue 10: see `bitmaps.rs`.)
#[test]
fn a_plan_that_would_drop_internal_snapshots_is_refused_naming_them() {
    let env = Env::new();
    let fast = env.img("fast");
    std::fs::create_dir(&fast).unwrap();
    let l: Vec<PathBuf> = (0..3).map(|i| env.img(&format!("l{i}.qcow2"))).collect();
    create(&l[0], 64 << 20, None, &[]);
    io(&l[0], "qcow2", &["write -P 1 0 4M".into()]);
    create(&l[1], 64 << 20, Some((&l[0], "qcow2")), &[]);
    io(&l[1], "qcow2", &["write -P 2 8M 1M".into()]);
    run(Command::new("qemu-img")
        .args(["snapshot", "-c", "before-upgrade"])
        .arg(&l[1]));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&l[1])
        .arg("inc0"));
    create(&l[2], 64 << 20, Some((&l[1], "qcow2")), &[]);
    let before = env.fingerprints();
    let points = [
        ("p0".to_string(), Some(l[0].clone())),
        ("p1".to_string(), Some(l[1].clone())),
    ];
    let moved = format!(
        "  placement:\n    directory: {}\n  prune: true\n",
        fast.display()
    );
    // (Dropping p1 no longer merges l1 away: l1, right below the active layer, takes the
    // active image's path with its snapshot and bitmap; see the end of this test.)
    {
        let what = "placement";
        let spec = env.spec("d.yaml", &spec_yaml("d", &l[2], &points, &moved));
        let out = env.apply(&spec, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains("before-upgrade") && err.contains("l1.qcow2"),
            "{what}: {err}"
        );
        assert_eq!(env.fingerprints(), before, "{what}: nothing changed");
    }
    // Keeping the layer where it is, nothing is dropped: the plan runs.
    let spec = env.spec("d.yaml", &spec_yaml("d", &l[2], &points, ""));
    let out = env.apply(&spec, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Dropping p1: l1 takes the active path, and its snapshot and bitmap with it.
    let spec = env.spec("d.yaml", &spec_yaml("d", &l[2], &points[..1], ""));
    let out = env.apply(&spec, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!l[1].exists(), "l1 took the active path");
    let info = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&l[2]));
    assert!(
        info.contains("before-upgrade") && info.contains("inc0"),
        "the active image holds l1's snapshot and bitmap: {info}"
    );
}

/// F8: a kept point keeps its virtual size: it is never moved into a larger base.
#[test]
fn a_kept_point_never_changes_size() {
    let env = Env::new();
    let l: Vec<PathBuf> = (0..3).map(|i| env.img(&format!("l{i}.qcow2"))).collect();
    create(&l[0], 64 << 20, None, &[]);
    io(&l[0], "qcow2", &["write -P 1 0 64M".into()]);
    // `create` takes the backing file's size; these layers are smaller than their base.
    for i in 1..3 {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&l[i - 1])
            .arg(&l[i])
            .arg("32M"));
    }
    io(&l[1], "qcow2", &["write -P 2 0 1M".into()]);
    io(&l[2], "qcow2", &["write -P 3 1M 1M".into()]);
    let p1 = view_sha256(&l[1], "qcow2", env.dir.path());
    let act = view_sha256(&l[2], "qcow2", env.dir.path());
    let spec = env.spec(
        "d.yaml",
        &spec_yaml("d", &l[2], &[("p1".into(), Some(l[1].clone()))], ""),
    );
    let out = env.apply(&spec, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let chain = backing_chain(&l[2]);
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(
        view_sha256(&chain[0], "qcow2", env.dir.path()),
        p1,
        "p1's view"
    );
    assert_eq!(
        view_sha256(&l[2], "qcow2", env.dir.path()),
        act,
        "active view"
    );
}

/// F9: a header claiming an L1 table larger than QEMU accepts is refused with exit 2, without
/// reading it into memory.
#[test]
fn a_crafted_huge_l1_table_is_refused_not_allocated() {
    let env = Env::new();
    let l0 = env.img("l0.qcow2");
    let l1 = env.img("l1.qcow2");
    create(&l0, 64 << 20, None, &[]);
    create(&l1, 64 << 20, Some((&l0, "qcow2")), &[]);
    let f = std::fs::OpenOptions::new().write(true).open(&l0).unwrap();
    let (cs, n) = (65536u64, 0xFFFF_FFF0u64);
    f.write_all_at(&(n * (cs / 8) * cs).to_be_bytes(), 24)
        .unwrap();
    f.write_all_at(&(n as u32).to_be_bytes(), 36).unwrap();
    f.write_all_at(&(1u64 << 30).to_be_bytes(), 40).unwrap();
    f.set_len((1 << 30) + n * 8).unwrap();
    drop(f);
    let spec = env.spec("d.yaml", &spec_yaml("d", &l1, &[], ""));
    let out = env.plan(&spec);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("l0.qcow2") && err.contains("L1"), "{err}");
}

/// F16: a backing name with an explicit `file:` prefix is a plain file name.
#[test]
fn a_file_protocol_backing_name_in_the_chain_is_followed() {
    let env = Env::new();
    let l0 = env.img("l0.qcow2");
    let l1 = env.img("l1.qcow2");
    create(&l0, 64 << 20, None, &[]);
    io(&l0, "qcow2", &["write -P 1 0 4M".into()]);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b"])
        .arg(format!("file:{}", l0.display()))
        .arg(&l1)
        .arg("64M"));
    io(&l1, "qcow2", &["write -P 2 8M 1M".into()]);
    let view = view_sha256(&l1, "qcow2", env.dir.path());
    let spec = env.spec("d.yaml", &spec_yaml("d", &l1, &[], ""));
    let out = env.apply(&spec, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(backing_chain(&l1), vec![l1.clone()]);
    assert_eq!(view_sha256(&l1, "qcow2", env.dir.path()), view);
}

/// F6: a disk declared raw is never read as a qcow2 header, even when its guest wrote one there
/// naming another tenant's image as its backing file.
#[test]
fn a_disk_declared_raw_is_refused_and_its_content_never_read_as_a_header() {
    let env = Env::new();
    let secret = env.img("tenant-b.qcow2");
    create(&secret, 16 << 20, None, &[]);
    io(&secret, "qcow2", &["write -P 0x5a 0 1M".into()]);
    // Tenant A's raw disk: its guest wrote a qcow2 header into sector 0, backed by tenant B.
    let a = env.img("tenant-a.img");
    let header = env.dir.path().join("header.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b"])
        .arg(&secret)
        .arg(&header)
        .arg("16M"));
    let mut bytes = std::fs::read(&header).unwrap();
    bytes.resize(16 << 20, 0);
    std::fs::write(&a, &bytes).unwrap();
    let before = env.fingerprints();
    let spec = env.spec(
        "a.yaml",
        &diskchain_tests::env::spec_yaml_source(
            "tenant-a",
            &format!("file: {}\n    format: raw", a.display()),
            &[],
            "",
        ),
    );
    let out = env.apply(&spec, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("spec.source.format"), "{err}");
    assert_eq!(env.fingerprints(), before, "nothing changed");
    let plan = env.plan(&spec);
    assert_eq!(plan.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&plan.stdout).contains("tenant-b"));
}

/// F8 at random: chains whose layers have different virtual sizes (smaller and larger than
/// their backing file), random kept points: after apply every kept point and the active layer
/// read exactly as before, with their own virtual sizes, and every image checks clean.
#[test]
fn random_chains_of_mixed_sizes_keep_every_point_and_its_size() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xf8f8);
    let mut applied = 0;
    for case in 0..24 {
        let env = Env::new();
        let n = rng.random_range(2..=6);
        let mut layers: Vec<PathBuf> = Vec::new();
        let mut pattern = 0u32;
        for i in 0..n {
            let p = env.img(&format!("m-{i}.qcow2"));
            let mib: u64 = [16, 24, 32][rng.random_range(0..3)];
            let mut c = Command::new("qemu-img");
            c.args(["create", "-q", "-f", "qcow2"]);
            if let Some(b) = layers.last() {
                c.arg("-b").arg(b).args(["-F", "qcow2"]);
            }
            run(c.arg(&p).arg(format!("{mib}M")));
            let clusters = mib * 16;
            let mut cmds = Vec::new();
            // Lower layers hold more, so that commits into them (and their size) are in play.
            let max_run = if i == 0 { clusters } else { 8 };
            for _ in 0..rng.random_range(1..5) {
                let start = rng.random_range(0..clusters);
                let len = rng.random_range(1..=(clusters - start).min(max_run));
                pattern += 1;
                if rng.random_bool(0.25) {
                    cmds.push(format!("write -z {}k {}k", start * 64, len * 64));
                } else {
                    cmds.push(format!(
                        "write -P {} {}k {}k",
                        pattern % 250 + 1,
                        start * 64,
                        len * 64
                    ));
                }
            }
            io(&p, "qcow2", &cmds);
            layers.push(p);
        }
        let keep: Vec<usize> = (0..n - 1).filter(|_| rng.random_bool(0.5)).collect();
        let points: Vec<(String, Option<PathBuf>)> = keep
            .iter()
            .map(|&k| (format!("p{k}"), Some(layers[k].clone())))
            .collect();
        let spec = env.spec("d.yaml", &spec_yaml("d", &layers[n - 1], &points, ""));
        let mut expected: Vec<usize> = keep.clone();
        expected.push(n - 1);
        let views: Vec<String> = expected
            .iter()
            .map(|&i| view_sha256(&layers[i], "qcow2", env.dir.path()))
            .collect();
        let sizes: Vec<u64> = expected.iter().map(|&i| virtual_size(&layers[i])).collect();
        let before = env.fingerprints();
        let out = env.apply(&spec, &[]);
        match out.status.code() {
            Some(0) => {
                applied += 1;
                let chain = backing_chain(&layers[n - 1]);
                assert_eq!(chain.len(), expected.len(), "case {case}: {chain:?}");
                for (j, f) in chain.iter().enumerate() {
                    assert_eq!(
                        view_sha256(f, "qcow2", env.dir.path()),
                        views[j],
                        "case {case}: point {j} ({}) changed",
                        f.display()
                    );
                    assert_eq!(virtual_size(f), sizes[j], "case {case}: point {j} size");
                }
                env.assert_images_clean(&format!("case {case}"));
            }
            other => {
                assert_eq!(other, Some(2), "case {case}: {}", stderr(&out));
                assert_eq!(env.fingerprints(), before, "case {case}: a refusal wrote");
            }
        }
    }
    assert!(applied >= 18, "only {applied} of 24 cases were applied");
}

fn virtual_size(p: &Path) -> u64 {
    let out = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(p));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// Issue 11: exit 2 promises nothing was touched. A plan stopped by a condition found at run
/// time after its first step ran (here: the layer its second step writes fails `qemu-img
/// check`) exits 1, says which steps ran, and stays journaled.
#[test]
fn a_plan_stopped_after_a_step_ran_exits_1_and_says_which_steps_ran() {
    let env = Env::new();
    let l: Vec<PathBuf> = (0..5).map(|i| env.img(&format!("l{i}.qcow2"))).collect();
    let writes = [
        "write -P 1 0 1M",
        "write -P 2 4M 1M",
        "write -P 3 0 16M",
        "write -P 4 20M 1M",
        "write -P 5 24M 1M",
    ];
    for (i, w) in writes.iter().enumerate() {
        create(
            &l[i],
            64 << 20,
            i.checked_sub(1).map(|b| (l[b].as_path(), "qcow2")),
            &[],
        );
        io(&l[i], "qcow2", &[w.to_string()]);
    }
    // l2 holds most data: the active run is cheapest hosted by it, so step 2 writes it.
    zero_a_refcount(&l[2]);
    let spec = env.spec(
        "d.yaml",
        &spec_yaml("d", &l[4], &[("p1".into(), Some(l[1].clone()))], ""),
    );
    let plan = env.plan_json(&spec);
    let steps = plan["disks"][0]["steps"].as_array().unwrap().clone();
    assert!(
        steps.len() >= 2 && steps[1]["base"].as_str() == Some(l[2].to_str().unwrap()),
        "{steps:?}"
    );
    let out = env.apply(&spec, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("step 2 (commit), after step 1 (") && err.contains("l2.qcow2"),
        "{err}"
    );
    assert!(env.journal("d").exists());
}
