//! A file system that fills up mid-step (ENOSPC) loses nothing: the step fails with QEMU's
//! message (exit 1), every view reads as before, the plan stays journaled, and once space is
//! freed the next apply converges and leaves no partial file behind. The images live on a small
//! tmpfs mounted over the test's root.

use std::path::{Path, PathBuf};
use std::process::Command;

use diskchain_tests::env::{Env, backing_chain, check, spec_yaml};
use diskchain_tests::qemu::{create, io, run, view_sha256};

/// A tmpfs of `mib` MiB mounted on `dir`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Tmpfs {
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir));
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, mib: u64) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.0));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `base` (24 MiB) <- `mid` (8 MiB) <- `top` (1 MiB, active) on a 40 MiB tmpfs.
fn full_chain(env: &Env) -> (Tmpfs, Vec<PathBuf>) {
    let fs = Tmpfs::mount(&env.root(), 40);
    let l: Vec<PathBuf> = ["base", "mid", "top"]
        .iter()
        .map(|n| env.img(&format!("{n}.qcow2")))
        .collect();
    create(&l[0], 64 << 20, None, &[]);
    io(&l[0], "qcow2", &["write -P 1 0 24M".into()]);
    create(&l[1], 0, Some((&l[0], "qcow2")), &[]);
    io(&l[1], "qcow2", &["write -P 2 24M 8M".into()]);
    create(&l[2], 0, Some((&l[1], "qcow2")), &[]);
    io(&l[2], "qcow2", &["write -P 3 40M 1M".into()]);
    (fs, l)
}

#[test]
fn a_full_file_system_mid_step_loses_nothing_and_converges_once_space_is_freed() {
    // (what the spec keeps, by index, expected chain length afterwards)
    let cases: [(&[usize], usize); 2] = [
        // Stream base and mid into top: needs 32 MiB more than the 33 MiB there.
        (&[], 1),
        // Keep mid: commit mid into base (8 MiB) does not fit either.
        (&[1], 2),
    ];
    for (keep, len) in cases {
        let env = Env::new();
        let (fs, l) = full_chain(&env);
        let v: Vec<String> = l
            .iter()
            .map(|f| view_sha256(f, "qcow2", env.dir.path()))
            .collect();
        let points: Vec<(String, Option<PathBuf>)> = keep
            .iter()
            .map(|&k| (format!("p{k}"), Some(l[k].clone())))
            .collect();
        let spec = env.spec("d.yaml", &spec_yaml("d", &l[2], &points, ""));
        let out = env.apply(&spec, &[]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "keep {keep:?}: {err}");
        assert!(
            err.contains("No space left on device"),
            "keep {keep:?}: QEMU's message: {err}"
        );
        // Every kept point and the active layer read as before (a layer the spec drops may
        // already hold part of a commit: it is no point any more).
        for &k in keep.iter().chain([2].iter()) {
            assert_eq!(
                view_sha256(&l[k], "qcow2", env.dir.path()),
                v[k],
                "keep {keep:?}: {} changed",
                l[k].display()
            );
        }
        assert!(
            env.journal("d").exists(),
            "keep {keep:?}: the plan stays journaled"
        );
        fs.resize(160);
        let out = env.apply(&spec, &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "keep {keep:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let chain = backing_chain(&l[2]);
        assert_eq!(chain.len(), len, "keep {keep:?}: {chain:?}");
        for (&k, f) in keep.iter().zip(&chain) {
            assert_eq!(view_sha256(f, "qcow2", env.dir.path()), v[k]);
        }
        assert_eq!(view_sha256(&l[2], "qcow2", env.dir.path()), v[2]);
        for f in env.images() {
            assert_eq!(
                check(&f),
                0,
                "keep {keep:?}: qemu-img check {}",
                f.display()
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(env.root())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "keep {keep:?}: {leftovers:?}");
        drop(fs);
    }
}
