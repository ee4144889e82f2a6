//! The README's first command, `scripts/demo.sh`, run as a new user would (twice, in a
//! directory of its own through `DISKCHAIN_DEMO_DIR`): it builds diskchain, makes the demo
//! chains, plans, applies, shows status, takes a backup, lists and verifies it. Every kept
//! point, the active images and the backup point are compared with views the test builds
//! itself from the writes the script makes (`qemu-img compare`), and `qemu-img check` must be
//! clean. The second run plans nothing and its backup is an incremental of nothing.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn demo(dir: &Path) -> String {
    let mut c = Command::new("bash");
    c.arg(root().join("scripts/demo.sh"))
        .env("DISKCHAIN_DEMO_DIR", dir);
    // As from a user's shell: without the variables cargo sets for a test, which would also
    // rebuild the release binary (a dependency's build script watches CARGO_MANIFEST_DIR).
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k == "CARGO" || (k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR")
        {
            c.env_remove(k);
        }
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "demo.sh failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A raw image of `size` bytes holding the writes `(pattern, offset MiB, length MiB)` in order
/// (pattern 0: zeros), built with qemu-io: the view the demo's chain must read as.
fn reference(dir: &Path, name: &str, writes: &[(u8, u64, u64)]) -> PathBuf {
    let p = dir.join(format!("{name}.raw"));
    assert!(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&p)
            .arg("1G")
            .status()
            .unwrap()
            .success()
    );
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for (pat, off, len) in writes {
        if *pat == 0 {
            c.arg("-c").arg(format!("write -z {off}M {len}M"));
        } else {
            c.arg("-c").arg(format!("write -P {pat} {off}M {len}M"));
        }
    }
    assert!(c.arg(&p).output().unwrap().status.success());
    p
}

fn same_view(image: &Path, reference: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
        .arg(image)
        .arg(reference)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{} does not read as {}: {}",
        image.display(),
        reference.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn check_clean(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "-f", "qcow2"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}",
        image.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn diskchain(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(root().join("target/release/diskchain"))
        .arg("--allowed-root")
        .arg(dir)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(args)
        .output()
        .unwrap()
}

/// Point name (or "active") to file, per disk, from `status -o json`.
fn files(dir: &Path, disk: &str) -> Vec<(String, PathBuf)> {
    let out = diskchain(dir, &["status", "-o", "json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == disk)
        .unwrap_or_else(|| panic!("status lists no disk {disk}"));
    d["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["point"].as_str().unwrap_or("active").to_string(),
                PathBuf::from(l["file"].as_str().unwrap()),
            )
        })
        .collect()
}

fn check_views(dir: &Path, refs: &Path) {
    let golden = reference(refs, "golden", &[(0x11, 0, 48)]);
    let before = reference(
        refs,
        "before-upgrade",
        &[(0x11, 0, 48), (0x21, 0, 24), (0x22, 8, 4), (0, 40, 8)],
    );
    let web01 = reference(
        refs,
        "web01",
        &[
            (0x11, 0, 48),
            (0x21, 0, 24),
            (0x22, 8, 4),
            (0, 40, 8),
            (0x23, 0, 2),
            (0x24, 100, 1),
        ],
    );
    let db01 = reference(refs, "db01", &[(0x11, 0, 48), (0x31, 0, 16), (0x32, 4, 1)]);
    let web = files(dir, "web01-vda");
    let names: Vec<&str> = web.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(names, ["golden", "before-upgrade", "nightly", "active"]);
    for (point, file) in &web {
        check_clean(file);
        let want = match point.as_str() {
            "golden" => &golden,
            "before-upgrade" => &before,
            _ => &web01,
        };
        same_view(file, want);
    }
    assert_eq!(web[3].1, dir.join("images/web01.qcow2"));
    let db = files(dir, "db01-vda");
    assert_eq!(
        db,
        [
            ("golden".to_string(), dir.join("fast/golden.qcow2")),
            ("active".to_string(), dir.join("images/db01.qcow2")),
        ]
    );
    same_view(&db[0].1, &golden);
    same_view(&db[1].1, &db01);
    // The golden base is shared: db01's copy left the original as it was.
    same_view(&dir.join("images/golden.qcow2"), &golden);
    for (_, f) in &db {
        check_clean(f);
    }
    // The newest backup point restores to web01's view.
    let listed = diskchain(
        dir,
        &[
            "backups",
            "-o",
            "json",
            "-f",
            dir.join("specs").to_str().unwrap(),
        ],
    );
    assert!(listed.status.success());
    let v: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let points = v["disks"][0]["points"].as_array().unwrap().clone();
    let newest = points.last().unwrap()["point"]
        .as_str()
        .unwrap()
        .to_string();
    let to = refs.join(format!("restored-{}.qcow2", points.len()));
    let out = diskchain(
        dir,
        &[
            "restore",
            "-f",
            dir.join("specs").to_str().unwrap(),
            "--disk",
            "web01-vda",
            "--point",
            &newest,
            "--to",
            to.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    same_view(&to, &web01);
}

#[test]
fn the_demo_plans_applies_and_backs_up_and_a_second_run_has_nothing_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let refs = tempfile::tempdir().unwrap();
    let first = demo(dir.path());
    assert!(first.contains("every disk matches its spec"), "{first}");
    assert!(first.contains("disk web01-vda: full backup"), "{first}");
    assert!(first.contains("sound, every checksum matches"), "{first}");
    assert!(!first.contains("nothing to do"), "{first}");
    check_views(dir.path(), refs.path());

    let second = demo(dir.path());
    assert_eq!(
        second
            .matches("nothing to do: the chain matches the spec")
            .count(),
        2,
        "{second}"
    );
    assert!(
        second.contains("disk web01-vda: incremental backup") && second.contains("(0 B written)"),
        "{second}"
    );
    assert!(
        second.contains("2 point(s)") && second.contains("sound, every checksum matches"),
        "{second}"
    );
    check_views(dir.path(), refs.path());
}
