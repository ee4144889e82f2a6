//! The shared-layer scan fails closed: whatever kind of image uses a layer, and however it names
//! it, that layer is never written or deleted (findings F1, F1b, F5 of the adversarial review).
//!
//! Each test builds `l0 <- l1 <- l2` (active), keeps `p1 = l1`, and puts a foreign image on `l0`
//! (or `l1`) that the old scan could not see. Without the fix diskchain commits `l1` into `l0`
//! (or prunes `l1`), changing or breaking the foreign image.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskchain_tests::env::{Env, spec_yaml};
use diskchain_tests::qemu::{create, fingerprint, io, run, view_sha256};

/// `l0 <- l1 <- l2` with data in each; returns the layers.
fn chain(env: &Env) -> Vec<PathBuf> {
    let l: Vec<PathBuf> = (0..3).map(|i| env.img(&format!("l{i}.qcow2"))).collect();
    create(&l[0], 64 << 20, None, &[]);
    io(&l[0], "qcow2", &["write -P 1 0 8M".into()]);
    create(&l[1], 64 << 20, Some((&l[0], "qcow2")), &[]);
    io(&l[1], "qcow2", &["write -P 2 0 1M".into()]);
    create(&l[2], 64 << 20, Some((&l[1], "qcow2")), &[]);
    io(&l[2], "qcow2", &["write -P 3 2M 1M".into()]);
    l
}

/// The spec `d`: keep l1 as point p1 (so l0 is dropped), prune on.
fn keep_p1_and_prune(env: &Env, l: &[PathBuf]) -> PathBuf {
    env.spec(
        "d.yaml",
        &spec_yaml(
            "d",
            &l[2],
            &[("p1".into(), Some(l[1].clone()))],
            "  prune: true\n",
        ),
    )
}

fn qemu_img(args: &[&str], paths: &[&Path]) {
    let mut c = Command::new("qemu-img");
    c.args(args);
    c.args(paths);
    run(&mut c);
}

/// Puts a foreign image of `kind` on `target`; returns the file whose view must not change (and
/// its format), or `None` when its view cannot be read without a secret.
fn foreign(env: &Env, kind: &str, target: &Path) -> Option<(PathBuf, &'static str)> {
    let t = target.to_str().unwrap();
    let o = env.img("clone.qcow2");
    match kind {
        "extl2" => qemu_img(
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on",
                "-F",
                "qcow2",
                "-b",
                t,
            ],
            &[&o],
        ),
        "datafile" => {
            let data = env.img("clone.data");
            let opt = format!("data_file={}", data.display());
            qemu_img(
                &[
                    "create", "-q", "-f", "qcow2", "-o", &opt, "-F", "qcow2", "-b", t,
                ],
                &[&o],
            )
        }
        "qed" => {
            let o = env.img("clone.qed");
            qemu_img(
                &["create", "-q", "-f", "qed", "-F", "qcow2", "-b", t],
                &[&o],
            );
            return Some((o, "qed"));
        }
        "json" => {
            let b =
                format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{t}"}}}}"#);
            qemu_img(
                &["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", &b],
                &[&o, Path::new("64M")],
            )
        }
        "fileproto" => {
            let b = format!("file:{t}");
            qemu_img(
                &["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", &b],
                &[&o, Path::new("64M")],
            )
        }
        "dirty" => {
            create(&o, 64 << 20, Some((target, "qcow2")), &[]);
            // The dirty bit (incompatible feature bit 0, byte 79 of the header).
            let f = std::fs::OpenOptions::new().write(true).open(&o).unwrap();
            std::os::unix::fs::FileExt::write_at(&f, &[1], 79).unwrap();
        }
        "luks" => {
            qemu_img(
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "--object",
                    "secret,id=sec0,data=hunter2",
                    "-o",
                    "encrypt.format=luks,encrypt.key-secret=sec0",
                    "-F",
                    "qcow2",
                    "-b",
                    t,
                ],
                &[&o],
            );
            return None;
        }
        "hardlink" => {
            let link = env.img("golden.qcow2");
            std::fs::hard_link(target, &link).unwrap();
            create(&o, 64 << 20, Some((&link, "qcow2")), &[]);
        }
        "hardlink-alone" => {
            // Another name for the layer, nothing on top: whoever opens it by that name reads it.
            std::fs::hard_link(target, env.img("golden.qcow2")).unwrap();
            return None;
        }
        "symlink" => {
            let link = env.img("golden-link.qcow2");
            std::os::unix::fs::symlink(target, &link).unwrap();
            create(&o, 64 << 20, Some((&link, "qcow2")), &[]);
        }
        "non-utf8" => {
            let dir = env.img("sub");
            std::fs::create_dir(&dir).unwrap();
            let odd = dir.join(std::ffi::OsStr::from_bytes(b"base-\xff.qcow2"));
            std::fs::hard_link(target, &odd).unwrap();
            let o = dir.join("clone.qcow2");
            let name = std::ffi::OsStr::from_bytes(b"base-\xff.qcow2");
            let mut c = Command::new("qemu-img");
            c.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(name)
                .arg(&o);
            run(&mut c);
            return Some((o, "qcow2"));
        }
        "unreadable" => {
            // A qcow2 whose backing name runs past the end of the file: nobody can say what it
            // uses, so every layer of its root counts as used.
            let mut h = vec![0u8; 512];
            h[..4].copy_from_slice(b"QFI\xfb");
            h[7] = 3;
            h[8..16].copy_from_slice(&100_000u64.to_be_bytes());
            h[16..20].copy_from_slice(&64u32.to_be_bytes());
            std::fs::write(&o, h).unwrap();
            return None;
        }
        other => panic!("unknown kind {other}"),
    }
    Some((o, "qcow2"))
}

/// Keeping `p1 = l1` with a foreign image on `l0`: `l0` is never written, the foreign view and
/// every kept view read as before, and the plan streams into `l1` instead.
fn a_foreign_image_keeps_its_backing_unwritten(kind: &str) {
    let env = Env::new();
    let l = chain(&env);
    let watched = foreign(&env, kind, &l[0]);
    let before = watched
        .as_ref()
        .map(|(f, fmt)| view_sha256(f, fmt, env.dir.path()));
    let l0_bytes = fingerprint(&l[0]).0;
    let (p1, act) = (
        view_sha256(&l[1], "qcow2", env.dir.path()),
        view_sha256(&l[2], "qcow2", env.dir.path()),
    );
    let spec = keep_p1_and_prune(&env, &l);
    let out = env.apply(&spec, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{kind}: {stderr}");
    assert_eq!(fingerprint(&l[0]).0, l0_bytes, "{kind}: l0 was written");
    assert!(l[0].exists(), "{kind}: l0 was deleted");
    if let (Some((f, fmt)), Some(b)) = (&watched, &before) {
        assert_eq!(
            &view_sha256(f, fmt, env.dir.path()),
            b,
            "{kind}: the foreign view changed"
        );
    }
    assert_eq!(
        view_sha256(&l[1], "qcow2", env.dir.path()),
        p1,
        "{kind}: p1 changed"
    );
    assert_eq!(
        view_sha256(&l[2], "qcow2", env.dir.path()),
        act,
        "{kind}: active changed"
    );
}

#[test]
fn an_extended_l2_overlay_keeps_its_backing_unwritten() {
    a_foreign_image_keeps_its_backing_unwritten("extl2");
}

#[test]
fn an_overlay_with_a_data_file_keeps_its_backing_unwritten() {
    a_foreign_image_keeps_its_backing_unwritten("datafile");
}

#[test]
fn a_qed_overlay_keeps_its_backing_unwritten() {
    a_foreign_image_keeps_its_backing_unwritten("qed");
}

#[test]
fn a_json_backing_name_keeps_its_target_unwritten() {
    a_foreign_image_keeps_its_backing_unwritten("json");
}

#[test]
fn a_file_protocol_backing_name_keeps_its_target_unwritten() {
    a_foreign_image_keeps_its_backing_unwritten("fileproto");
}

#[test]
fn a_dirty_overlay_keeps_its_backing_unwritten() {
    a_foreign_image_keeps_its_backing_unwritten("dirty");
}

#[test]
fn a_luks_encrypted_overlay_keeps_its_backing_unwritten() {
    a_foreign_image_keeps_its_backing_unwritten("luks");
}

#[test]
fn an_overlay_on_a_hard_link_keeps_the_layer_unwritten() {
    a_foreign_image_keeps_its_backing_unwritten("hardlink");
}

#[test]
fn a_hard_link_to_a_layer_keeps_it_unwritten() {
    a_foreign_image_keeps_its_backing_unwritten("hardlink-alone");
}

#[test]
fn an_overlay_on_a_symlink_keeps_the_layer_unwritten() {
    a_foreign_image_keeps_its_backing_unwritten("symlink");
}

#[test]
fn an_overlay_with_a_non_utf8_backing_name_keeps_it_unwritten() {
    a_foreign_image_keeps_its_backing_unwritten("non-utf8");
}

/// A file whose references cannot be read could use any layer of its root: the plan refuses,
/// naming it, and nothing changes.
#[test]
fn an_image_whose_references_cannot_be_read_keeps_every_layer_of_its_root_unwritten() {
    let env = Env::new();
    let l = chain(&env);
    foreign(&env, "unreadable", &l[0]);
    let before = env.fingerprints();
    let spec = keep_p1_and_prune(&env, &l);
    let out = env.apply(&spec, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("clone.qcow2"),
        "the unreadable file is named: {stderr}"
    );
    assert_eq!(env.fingerprints(), before, "nothing under the root changed");
}

/// F1b: prune never deletes a layer a foreign image uses, whatever its kind.
#[test]
fn prune_never_deletes_a_layer_a_foreign_image_uses() {
    for kind in ["extl2", "qed", "json", "hardlink-alone", "datafile"] {
        let env = Env::new();
        let l = chain(&env);
        let watched = foreign(&env, kind, &l[1]);
        let before = watched
            .as_ref()
            .map(|(f, fmt)| view_sha256(f, fmt, env.dir.path()));
        let act = view_sha256(&l[2], "qcow2", env.dir.path());
        let spec = env.spec("d.yaml", &spec_yaml("d", &l[2], &[], "  prune: true\n"));
        let out = env.apply(&spec, &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            l[1].exists(),
            "{kind}: l1 was deleted although an image uses it"
        );
        assert!(
            l[0].exists(),
            "{kind}: l0 was deleted although an image reads it"
        );
        if let (Some((f, fmt)), Some(b)) = (&watched, &before) {
            assert_eq!(
                &view_sha256(f, fmt, env.dir.path()),
                b,
                "{kind}: foreign view"
            );
        }
        assert_eq!(
            view_sha256(&l[2], "qcow2", env.dir.path()),
            act,
            "{kind}: active"
        );
    }
}

/// F5: a symlink where a copy goes is never taken for the finished copy; the copy gets a free
/// name and every view reads as before.
#[test]
fn a_symlink_at_a_planned_copy_name_is_never_taken_for_the_copy() {
    let env = Env::new();
    let l = chain(&env);
    let fast = env.img("fast");
    std::fs::create_dir(&fast).unwrap();
    std::os::unix::fs::symlink("../l0.qcow2", fast.join("l1.qcow2")).unwrap();
    let (p1, act) = (
        view_sha256(&l[1], "qcow2", env.dir.path()),
        view_sha256(&l[2], "qcow2", env.dir.path()),
    );
    let extra = format!(
        "  placement:\n    directory: {}\n  prune: true\n",
        fast.display()
    );
    let spec = env.spec(
        "d.yaml",
        &spec_yaml("d", &l[2], &[("p1".into(), Some(l[1].clone()))], &extra),
    );
    env.apply_ok(&spec, &[]);
    assert_eq!(
        view_sha256(&l[2], "qcow2", env.dir.path()),
        act,
        "active view changed"
    );
    let chain = diskchain_tests::env::backing_chain(&l[2]);
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_ne!(
        chain[0],
        fast.join("l1.qcow2"),
        "the symlink was taken for the copy"
    );
    assert_eq!(chain[0].parent(), Some(fast.as_path()));
    assert_eq!(
        view_sha256(&chain[0], "qcow2", env.dir.path()),
        p1,
        "p1 changed"
    );
    assert!(
        std::fs::symlink_metadata(fast.join("l1.qcow2"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the foreign symlink is left as it was"
    );
}
