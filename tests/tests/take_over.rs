//! The active run hosted below the active layer, offline (issue 10, item 1): "flatten this
//! disk" (a private base with much data under an active layer with little, `snapshots: []`)
//! commits the active layer into the base, which then takes the active image's path with the
//! old file's owner, mode and extended attributes, instead of streaming the whole base into the
//! active layer. SIGKILL at any moment converges with the active path always holding a valid
//! image of the active view; an image held open by a process is never renamed or written.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use diskchain_tests::env::{Env, apply_killed_mid_step, backing_chain, check, spec_yaml};
use diskchain_tests::qemu::{create, hold_open, io, view_sha256};

const MIB: u64 = 1 << 20;

/// `base` (96 MiB of data) <- `vm` (2 MiB, the active layer), with an owner, a mode and an
/// extended attribute on the active file; the spec keeps no point.
fn flatten_case(env: &Env) -> (PathBuf, PathBuf, PathBuf) {
    let base = env.img("base.qcow2");
    let vm = env.img("vm.qcow2");
    create(&base, 128 * MIB, None, &[]);
    io(&base, "qcow2", &["write -P 1 0 96M".into()]);
    create(&vm, 0, Some((&base, "qcow2")), &[]);
    io(&vm, "qcow2", &["write -P 2 10M 2M".into()]);
    std::os::unix::fs::chown(&vm, Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(&vm, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    set_xattr(&vm, "kept");
    let spec = env.spec("vm.yaml", &spec_yaml("vm", &vm, &[], ""));
    (base, vm, spec)
}

const XATTR: &[u8] = b"user.diskchain-test\0";

fn cpath(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(p: &Path, value: &str) {
    let path = cpath(p);
    // SAFETY: NUL-terminated name and path; `value` is read for its length.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            XATTR.as_ptr().cast(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
}

fn xattr(p: &Path) -> String {
    let path = cpath(p);
    let mut buf = [0u8; 64];
    // SAFETY: NUL-terminated name and path; `buf` has room for its length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            XATTR.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return String::new();
    }
    String::from_utf8_lossy(&buf[..n as usize]).into_owned()
}

#[test]
fn flattening_commits_into_the_base_which_takes_the_active_path() {
    let env = Env::new();
    let (base, vm, spec) = flatten_case(&env);
    let view = view_sha256(&vm, "qcow2", env.dir.path());
    let plan = env.plan_json(&spec);
    let d = &plan["disks"][0];
    let ops: Vec<&str> = d["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["commit", "take-over"], "{plan}");
    let bytes = d["total_bytes"].as_u64().unwrap();
    assert!(
        (2 * MIB..=2 * MIB + 4 * 65536).contains(&bytes),
        "within a few clusters of the active layer's own 2 MiB: {bytes}"
    );
    assert!(
        d["decisions"][0]["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["bytes"].as_u64() == Some(94 * MIB)),
        "streaming the base's 94 MiB is the rejected alternative: {plan}"
    );
    env.apply_ok(&spec, &[]);
    assert_eq!(
        backing_chain(&vm),
        vec![vm.clone()],
        "one file, at the active path"
    );
    assert!(!base.exists(), "the base took the active path");
    assert_eq!(view_sha256(&vm, "qcow2", env.dir.path()), view);
    assert_eq!(check(&vm), 0);
    let m = std::fs::metadata(&vm).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1234, 5678, 0o640));
    assert_eq!(xattr(&vm), "kept");
    assert!(
        env.plan_json(&spec)["disks"][0]["steps"]
            .as_array()
            .unwrap()
            .is_empty(),
        "a second plan has nothing to do"
    );
}

#[test]
fn a_kill_at_any_moment_of_a_take_over_plan_converges_with_the_active_path_valid() {
    let mut landed = 0;
    for round in 0..6 {
        let env = Env::new();
        let (_, vm, spec) = flatten_case(&env);
        let view = view_sha256(&vm, "qcow2", env.dir.path());
        if apply_killed_mid_step(&env, &spec, &["--max-bytes-per-sec", "2000000"]) {
            landed += 1;
        }
        // Whatever moment the kill hit, the active path holds a valid image of the view.
        assert_eq!(check(&vm), 0, "round {round}");
        assert_eq!(
            view_sha256(&vm, "qcow2", env.dir.path()),
            view,
            "round {round}: the active view after the kill"
        );
        let out = env.apply(&spec, &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(backing_chain(&vm), vec![vm.clone()], "round {round}");
        assert_eq!(
            view_sha256(&vm, "qcow2", env.dir.path()),
            view,
            "round {round}"
        );
        assert_eq!(check(&vm), 0, "round {round}");
        assert_eq!(xattr(&vm), "kept", "round {round}");
    }
    assert!(landed >= 3, "only {landed} kills landed mid-plan");
}

#[test]
fn an_active_image_held_open_is_never_renamed_or_written() {
    let env = Env::new();
    let (base, vm, spec) = flatten_case(&env);
    let before = env.fingerprints();
    let _held = hold_open(&vm, env.dir.path());
    let out = env.apply(&spec, &[]);
    assert_ne!(out.status.code(), Some(0));
    assert!(base.exists());
    assert_eq!(env.fingerprints(), before, "nothing was written or renamed");
}

/// A holder deeper than the layer right below the active one: `base` (16 MiB) <- `big` (64
/// MiB) <- `small` (1 MiB) <- `vm` (1 MiB). Flattening is cheapest by committing `small` and
/// `vm` into `big` (2 MiB), pulling in what `base` holds that they do not (14 MiB), and letting
/// `big` take the active path: 16 MiB. Committing all into `base` costs 66 MiB, and the layer
/// right below (the only holder before) or the active layer 79 MiB. Killed at several moments,
/// the rerun converges with the view unchanged.
#[test]
fn a_deeper_layer_takes_over_when_that_writes_least() {
    use diskchain_tests::env::apply_killed_after;
    let mut landed = 0;
    for delay_ms in [0u64, 30, 80, 150, 300, 1000] {
        let env = Env::new();
        let names = ["base", "big", "small", "vm"];
        let writes = [
            "write -P 1 0 16M",
            "write -P 2 32M 64M",
            "write -P 3 1M 1M",
            "write -P 4 4M 1M",
        ];
        let mut layers: Vec<PathBuf> = Vec::new();
        for (n, w) in names.iter().zip(writes) {
            let p = env.img(&format!("{n}.qcow2"));
            create(
                &p,
                128 * MIB,
                layers.last().map(|b| (b.as_path(), "qcow2")),
                &[],
            );
            io(&p, "qcow2", &[w.to_string()]);
            layers.push(p);
        }
        let vm = layers[3].clone();
        let view = view_sha256(&vm, "qcow2", env.dir.path());
        let spec = env.spec("vm.yaml", &spec_yaml("vm", &vm, &[], ""));
        let plan = env.plan_json(&spec);
        let d = &plan["disks"][0];
        let steps: Vec<(String, String)> = d["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["op"].as_str().unwrap().to_string(),
                    s["holder"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        assert_eq!(
            steps.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
            ["commit", "stream", "take-over"],
            "{d}"
        );
        assert!(steps[2].1.ends_with("big.qcow2"), "{d}");
        assert_eq!(d["total_bytes"], 16 * MIB, "{d}");
        if apply_killed_after(
            &env,
            &spec,
            &["--max-bytes-per-sec", "50000000"],
            std::time::Duration::from_millis(delay_ms),
        ) {
            landed += 1;
        }
        assert_eq!(check(&vm), 0, "delay {delay_ms} ms");
        assert_eq!(
            view_sha256(&vm, "qcow2", env.dir.path()),
            view,
            "delay {delay_ms} ms: after the kill"
        );
        env.apply_ok(&spec, &[]);
        assert_eq!(backing_chain(&vm), vec![vm.clone()], "delay {delay_ms} ms");
        assert_eq!(
            view_sha256(&vm, "qcow2", env.dir.path()),
            view,
            "delay {delay_ms} ms"
        );
        assert_eq!(check(&vm), 0, "delay {delay_ms} ms");
        assert!(!layers[1].exists(), "big took the active path");
        // The layer that was between (retired, kept) still opens and checks clean.
        env.assert_images_clean(&format!("delay {delay_ms} ms"));
    }
    assert!(landed >= 3, "only {landed} kills landed mid-plan");
}
