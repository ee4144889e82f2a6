//! `diskchain backup`, `backups`, `restore` and `verify` on offline disks, end to end on real
//! qcow2 chains. The oracles are QEMU's: `qemu-img convert` to raw (a point's view, hashed here),
//! `qemu-img map` (what a layer holds) and `qemu-img check`.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use diskchain_tests::env::{Env, backing_chain, check, spec_yaml};
use diskchain_tests::qemu::{cluster_states, create, io, view_sha256, view_sparse_sha256};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 * 1024;

/// A disk: a 64 MiB base with 8 MiB of data under an active overlay; its spec keeps the base as
/// point `golden` and backs up into `img/backups/NAME` with `retention` (YAML lines under
/// `retention:`, or empty).
struct Disk {
    top: PathBuf,
    base: PathBuf,
    repo: PathBuf,
    spec: PathBuf,
}

fn disk(env: &Env, name: &str, retention: &str) -> Disk {
    let base = env.img(&format!("{name}-base.qcow2"));
    create(&base, 64 * MIB, None, &[]);
    io(&base, "qcow2", &["write -P 1 0 8M".into()]);
    let top = env.img(&format!("{name}.qcow2"));
    create(&top, 0, Some((&base, "qcow2")), &[]);
    let repo = env.img(&format!("backups/{name}"));
    let d = Disk {
        spec: PathBuf::new(),
        top,
        base,
        repo,
    };
    let spec = env.spec(
        &format!("{name}.yaml"),
        &yaml(&d, name, &[("golden", true)], retention),
    );
    Disk { spec, ..d }
}

/// The spec of disk `name`: `points` (name, bound to the base file or not), its backup policy.
fn yaml(d: &Disk, name: &str, points: &[(&str, bool)], retention: &str) -> String {
    let points: Vec<(String, Option<PathBuf>)> = points
        .iter()
        .map(|(n, bound)| (n.to_string(), bound.then(|| d.base.clone())))
        .collect();
    let mut backup = format!("  backup:\n    repository: {}\n", d.repo.display());
    if !retention.is_empty() {
        backup.push_str("    retention:\n");
        for l in retention.lines() {
            backup.push_str(&format!("      {l}\n"));
        }
    }
    spec_yaml(name, &d.top, &points, &backup)
}

fn run(env: &Env, args: &[&str], spec: &Path) -> Output {
    env.diskchain(args).arg("-f").arg(spec).output().unwrap()
}

/// `backup -o json`, which must succeed.
fn backup(env: &Env, spec: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["backup", "-o", "json"];
    args.extend_from_slice(extra);
    let out = run(env, &args, spec);
    assert_eq!(
        out.status.code(),
        Some(0),
        "backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `backups -o json`: the points of the first disk.
fn points(env: &Env, spec: &Path) -> Vec<Value> {
    let out = run(env, &["backups", "-o", "json"], spec);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["disks"][0]["points"].as_array().unwrap().clone()
}

/// Restores point `point` of disk `disk` as raw and hashes it.
fn restored_sha(env: &Env, spec: &Path, disk: &str, point: &str) -> String {
    use sha2::Digest;
    let to = env
        .dir
        .path()
        .join(format!("restore-{}.raw", point.replace(':', "")));
    let out = env
        .diskchain(&[
            "restore", "--disk", disk, "--point", point, "--format", "raw", "--to",
        ])
        .arg(&to)
        .arg("-f")
        .arg(spec)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "restore {point}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sha = format!("{:x}", sha2::Sha256::digest(std::fs::read(&to).unwrap()));
    std::fs::remove_file(&to).unwrap();
    sha
}

fn view(env: &Env, f: &Path) -> String {
    view_sha256(f, "qcow2", env.dir.path())
}

/// Runs `qemu-img ARGS...`, which must succeed (a change made behind diskchain's back).
fn qemu_img<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The clusters (of 64 KiB) a layer itself holds, data or explicit zero.
fn own_clusters(f: &Path) -> BTreeSet<u64> {
    cluster_states(f, "qcow2", CLUSTER)
        .iter()
        .enumerate()
        .filter(|(_, s)| **s != 0)
        .map(|(i, _)| i as u64)
        .collect()
}

/// The 64 KiB clusters a write of `len` bytes at `at` touches.
fn touched(at: u64, len: u64) -> BTreeSet<u64> {
    (at / CLUSTER..(at + len).div_ceil(CLUSTER)).collect()
}

/// SIGKILLs `child`'s process group, its QEMU tools included (as a host crash would stop them),
/// and waits until the group is gone.
fn kill_group(mut child: std::process::Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    child.wait().unwrap();
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while pgrep -g {} >/dev/null; do sleep 0.02; done",
            child.id()
        ))
        .status();
}

fn repo_files(repo: &Path) -> BTreeSet<String> {
    std::fs::read_dir(repo)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".qcow2"))
        .collect()
}

#[test]
fn rounds_of_writes_and_backups_restore_every_point_and_incrementals_hold_only_what_changed() {
    let env = Env::new();
    let d = disk(&env, "vda", "");
    // (offset, length, pattern; 0 writes zeros): each round's guest writes.
    let rounds: [&[(u64, u64, u8)]; 4] = [
        &[(16 * MIB, MIB, 2)],
        &[(20 * MIB, 128 * 1024, 3), (100 * 1024, 4096, 4)],
        &[(MIB, 2 * MIB, 0)],
        &[(16 * MIB, 64 * 1024, 2), (40 * MIB, 3 * MIB, 5)],
    ];
    let mut views = Vec::new();
    let mut sparse_views = Vec::new();
    for (i, writes) in rounds.iter().enumerate() {
        let cmds: Vec<String> = writes
            .iter()
            .map(|(at, len, p)| {
                if *p == 0 {
                    format!("write -z {at} {len}")
                } else {
                    format!("write -P {p} {at} {len}")
                }
            })
            .collect();
        io(&d.top, "qcow2", &cmds);
        let want = view(&env, &d.top);
        let r = backup(&env, &d.spec, &[]);
        let b = &r["backups"][0];
        assert_eq!(
            b["kind"],
            if i == 0 { "full" } else { "incremental" },
            "{r}"
        );
        let file = PathBuf::from(b["file"].as_str().unwrap());
        assert_eq!(
            view(&env, &file),
            want,
            "round {i}: the new point reads as the disk did"
        );
        if i > 0 {
            // Only what this round wrote; an identical rewrite (round 3's first write) may
            // even be left out.
            let wrote: BTreeSet<u64> = writes
                .iter()
                .flat_map(|(a, l, _)| touched(*a, *l))
                .collect();
            let own = own_clusters(&file);
            assert!(
                own.is_subset(&wrote),
                "round {i}: the incremental holds clusters nobody wrote: {:?}",
                own.difference(&wrote).collect::<Vec<_>>()
            );
            assert!(!own.is_empty(), "round {i}: the incremental holds nothing");
        }
        views.push((b["point"].as_str().unwrap().to_string(), want));
        sparse_views.push(view_sparse_sha256(&d.top, "qcow2", env.dir.path()));
        // Two backups in one second get distinct names; keep them apart anyway.
        std::thread::sleep(Duration::from_millis(50));
    }
    let listed = points(&env, &d.spec);
    assert_eq!(listed.len(), 4);
    for (((name, want), p), sparse) in views.iter().zip(&listed).zip(&sparse_views) {
        assert_eq!(p["point"], name.as_str());
        assert_eq!(
            p["sparse_sha256"],
            sparse.as_str(),
            "the manifest's checksum of {name}"
        );
        // The whole view's SHA-256 is not taken at backup time (it would read the zeros of
        // the disk's whole size); the restore below is checked against it independently.
        assert!(p["sha256"].is_null(), "{p}");
        assert_eq!(
            &restored_sha(&env, &d.spec, "vda", name),
            want,
            "restore of {name}"
        );
    }
    for f in repo_files(&d.repo) {
        assert_eq!(check(&d.repo.join(&f)), 0, "qemu-img check {f}");
    }
    env.run_ok(&["verify", "--deep"], &d.spec);
    // The disk itself was only read.
    assert_eq!(backing_chain(&d.top), vec![d.base.clone(), d.top.clone()]);
}

#[test]
fn chain_steps_between_backups_keep_the_next_backup_incremental_and_correct() {
    let env = Env::new();
    let d = disk(&env, "vdb", "");
    io(&d.top, "qcow2", &["write -P 2 16M 1M".into()]);
    let mut views = vec![];
    let r = backup(&env, &d.spec, &[]);
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        view(&env, &d.top),
    ));
    // A new point (a snapshot), more writes, a backup.
    std::fs::write(
        &d.spec,
        yaml(&d, "vdb", &[("golden", true), ("s1", false)], ""),
    )
    .unwrap();
    env.apply_ok(&d.spec, &[]);
    assert_eq!(backing_chain(&d.top).len(), 3);
    io(&d.top, "qcow2", &["write -P 6 30M 256k".into()]);
    let r = backup(&env, &d.spec, &[]);
    assert_eq!(r["backups"][0]["kind"], "incremental");
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        view(&env, &d.top),
    ));
    // The base point merged away (a commit or stream), more writes, a backup.
    std::fs::write(&d.spec, yaml(&d, "vdb", &[("s1", false)], "")).unwrap();
    env.apply_ok(&d.spec, &[]);
    assert_eq!(backing_chain(&d.top).len(), 2);
    io(&d.top, "qcow2", &["write -P 7 0 64k".into()]);
    let r = backup(&env, &d.spec, &[]);
    assert_eq!(r["backups"][0]["kind"], "incremental");
    let file = PathBuf::from(r["backups"][0]["file"].as_str().unwrap());
    assert_eq!(
        own_clusters(&file),
        touched(0, 64 * 1024),
        "the chain steps moved data between layers, yet the guest view changed only there"
    );
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        view(&env, &d.top),
    ));
    for (name, want) in &views {
        assert_eq!(
            &restored_sha(&env, &d.spec, "vdb", name),
            want,
            "restore of {name}"
        );
    }
    env.assert_images_clean("after chain steps and backups");
}

#[test]
fn lowering_retention_merges_points_away_and_every_remaining_point_restores() {
    let env = Env::new();
    let d = disk(&env, "vdc", "");
    let mut views = vec![];
    for i in 0..5u64 {
        io(
            &d.top,
            "qcow2",
            &[format!("write -P {} {}M 1M", 10 + i, 10 + 4 * i)],
        );
        let r = backup(&env, &d.spec, &[]);
        views.push((
            r["backups"][0]["point"].as_str().unwrap().to_string(),
            view(&env, &d.top),
        ));
    }
    assert_eq!(repo_files(&d.repo).len(), 5);
    std::fs::write(&d.spec, yaml(&d, "vdc", &[("golden", true)], "keepLast: 2")).unwrap();
    io(&d.top, "qcow2", &["write -P 30 60M 64k".into()]);
    let r = backup(&env, &d.spec, &[]);
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        view(&env, &d.top),
    ));
    let ret = &r["retention"][0];
    let removed: Vec<&str> = ret["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        removed,
        views[..4]
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        "{r}"
    );
    // Each of the removed points' 1 MiB is merged at most once: the planner never moves more
    // than the points being removed hold.
    let total = ret["total_bytes"].as_u64().unwrap();
    assert!(
        total > 0 && total <= 8 * MIB + 5 * MIB,
        "retention moved {total} bytes: {r}"
    );
    let listed = points(&env, &d.spec);
    let names: Vec<&str> = listed
        .iter()
        .map(|p| p["point"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec![views[4].0.as_str(), views[5].0.as_str()]);
    assert_eq!(
        repo_files(&d.repo).len(),
        2,
        "the merged-away files are deleted"
    );
    for (name, want) in &views[4..] {
        assert_eq!(
            &restored_sha(&env, &d.spec, "vdc", name),
            want,
            "restore of {name}"
        );
    }
    env.run_ok(&["verify", "--deep"], &d.spec);
    env.assert_images_clean("after retention");
}

#[test]
fn verify_deep_names_the_point_whose_byte_was_flipped() {
    let env = Env::new();
    let d = disk(&env, "vdd", "");
    let r1 = backup(&env, &d.spec, &[]);
    io(&d.top, "qcow2", &["write -P 9 32M 64k".into()]);
    let r2 = backup(&env, &d.spec, &[]);
    env.run_ok(&["verify", "--deep"], &d.spec);
    // One byte of the second point's data, found where QEMU says it is.
    let file = PathBuf::from(r2["backups"][0]["file"].as_str().unwrap());
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(&file)
        .output()
        .unwrap();
    let map: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let at = map
        .iter()
        .find(|e| e["depth"] == 0 && e["data"] == true)
        .and_then(|e| e["offset"].as_u64())
        .expect("the incremental holds data");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[at as usize + 100] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let v = run(&env, &["verify", "--deep"], &d.spec);
    let err = String::from_utf8_lossy(&v.stderr);
    assert_eq!(v.status.code(), Some(1), "{err}");
    let second = r2["backups"][0]["point"].as_str().unwrap();
    let first = r1["backups"][0]["point"].as_str().unwrap();
    assert!(err.contains(&format!("point {second}:")), "{err}");
    // (Two points taken in one second are named `T` and `T-2`: match the whole name.)
    assert!(
        !err.contains(&format!("point {first}:")),
        "the sound point is not blamed: {err}"
    );
    // A restore of the damaged point is refused; nothing is written.
    let to = env.dir.path().join("bad.qcow2");
    let out = env
        .diskchain(&["restore", "--disk", "vdd", "--point", second, "--to"])
        .arg(&to)
        .arg("-f")
        .arg(&d.spec)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!to.exists());
}

#[test]
fn a_backup_killed_midway_leaves_no_point_and_the_next_one_succeeds() {
    let env = Env::new();
    let d = disk(&env, "vde", "");
    io(&d.top, "qcow2", &["write -P 4 8M 40M".into()]);
    let want = view(&env, &d.top);
    // 48 MiB at 8 MB/s: about 6 s.
    let child = env
        .diskchain(&["backup", "--max-bytes-per-sec", "8000000", "-f"])
        .arg(&d.spec)
        .process_group(0)
        .spawn()
        .unwrap();
    let partial_seen = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        std::fs::read_dir(&d.repo).is_ok_and(|r| {
            r.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".partial-"))
        })
    });
    assert!(partial_seen, "the backup never started writing");
    std::thread::sleep(Duration::from_millis(500));
    kill_group(child);
    assert!(
        points(&env, &d.spec).is_empty(),
        "a killed backup is not a point"
    );
    let r = backup(&env, &d.spec, &[]);
    assert_eq!(r["backups"][0]["kind"], "full");
    assert!(
        std::fs::read_dir(&d.repo)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with(".partial-")),
        "the partial is removed"
    );
    let p = r["backups"][0]["point"].as_str().unwrap();
    assert_eq!(restored_sha(&env, &d.spec, "vde", p), want);
}

#[test]
fn a_retention_merge_killed_midway_is_finished_by_the_next_command() {
    let env = Env::new();
    let d = disk(&env, "vdf", "");
    let mut views = vec![];
    for i in 0..3u64 {
        io(
            &d.top,
            "qcow2",
            &[format!("write -P {} {}M 16M", 20 + i, 8 + 16 * i)],
        );
        let r = backup(&env, &d.spec, &[]);
        views.push((
            r["backups"][0]["point"].as_str().unwrap().to_string(),
            view(&env, &d.top),
        ));
    }
    std::fs::write(&d.spec, yaml(&d, "vdf", &[("golden", true)], "keepLast: 1")).unwrap();
    io(&d.top, "qcow2", &["write -P 40 60M 64k".into()]);
    let newest_view = view(&env, &d.top);
    // The merges run at 4 MB/s: tens of MiB take seconds.
    let child = env
        .diskchain(&["backup", "--max-bytes-per-sec", "4000000", "-f"])
        .arg(&d.spec)
        .process_group(0)
        .spawn()
        .unwrap();
    let journal = d.repo.join("retention.json");
    let running = (0..400).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        std::fs::read_to_string(&journal).is_ok_and(|j| j.contains("\"running\""))
    });
    assert!(running, "the retention merge never started");
    std::thread::sleep(Duration::from_millis(300));
    kill_group(child);
    assert!(journal.exists(), "killed mid-merge, the journal stays");
    let listed = run(&env, &["backups"], &d.spec);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("retention merge was interrupted"),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );
    // verify finishes the merge first, then finds the repository sound.
    env.run_ok(&["verify", "--deep"], &d.spec);
    assert!(!journal.exists());
    let listed = points(&env, &d.spec);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let p = listed[0]["point"].as_str().unwrap();
    assert_eq!(restored_sha(&env, &d.spec, "vdf", p), newest_view);
    assert_eq!(repo_files(&d.repo).len(), 1);
    env.assert_images_clean("after a killed merge");
}

#[test]
fn bad_backup_specs_are_refused_naming_the_field_and_touch_nothing() {
    let env = Env::new();
    let d = disk(&env, "vdg", "");
    let outside = env.dir.path().join("elsewhere");
    let good = yaml(&d, "vdg", &[("golden", true)], "");
    let cases: [(&str, String, &str); 5] = [
        (
            "outside the roots",
            good.replace(
                &format!("repository: {}", d.repo.display()),
                &format!("repository: {}", outside.display()),
            ),
            "spec.backup.repository",
        ),
        (
            "negative retention",
            yaml(&d, "vdg", &[("golden", true)], "keepLast: -1"),
            "keepLast",
        ),
        (
            "bad cron",
            good.replace("  backup:\n", "  backup:\n    schedule: \"every day\"\n"),
            "spec.backup.schedule",
        ),
        (
            "six-field cron",
            good.replace("  backup:\n", "  backup:\n    schedule: \"0 0 2 * * *\"\n"),
            "spec.backup.schedule",
        ),
        (
            "unknown field",
            good.replace("  backup:\n", "  backup:\n    keep: 3\n"),
            "keep",
        ),
    ];
    let before = env.fingerprints();
    for (what, text, field) in cases {
        std::fs::write(&d.spec, &text).unwrap();
        for cmd in ["plan", "apply", "backup"] {
            let out = run(&env, &[cmd], &d.spec);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what}: {cmd}: {err}");
            assert!(err.contains(field), "{what}: {cmd} names {field}: {err}");
        }
        assert!(
            !d.repo.exists() && !outside.exists(),
            "{what}: a repository was made"
        );
        assert_eq!(env.fingerprints(), before, "{what}: an image was touched");
    }
}

/// The `method` the manifest records for point `i`.
fn method(repo: &Path, i: usize) -> Value {
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join("manifest.json")).unwrap())
            .unwrap();
    m["points"][i]["method"].clone()
}

/// Offline incrementals come from the previous backup's persistent bitmap. A bitmap removed by
/// a tool outside diskchain, or left in use by a QEMU that died with the image open, is never
/// trusted: the next backup is a resync that says why and writes only what differs, and the
/// one after is an incremental again.
#[test]
fn an_untrustworthy_bitmap_makes_a_resync_never_a_wrong_incremental() {
    use std::io::Write;
    let env = Env::new();
    let d = disk(&env, "vdh", "");
    let mut views = vec![];
    let r = backup(&env, &d.spec, &[]);
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        view(&env, &d.top),
    ));
    io(&d.top, "qcow2", &["write -P 2 16M 64k".into()]);
    let r = backup(&env, &d.spec, &[]);
    assert_eq!(r["backups"][0]["kind"], "incremental");
    assert_eq!(method(&d.repo, 1), "bitmap");
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        view(&env, &d.top),
    ));

    // A tool removes diskchain's bitmap; then the guest writes.
    let bitmap = serde_json::from_str::<Value>(
        &std::fs::read_to_string(d.repo.join("manifest.json")).unwrap(),
    )
    .unwrap()["points"][1]["checkpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let st = Command::new("qemu-img")
        .args(["bitmap", "--remove", "-f", "qcow2"])
        .arg(&d.top)
        .arg(&bitmap)
        .status()
        .unwrap();
    assert!(st.success());
    io(&d.top, "qcow2", &["write -P 3 20M 64k".into()]);
    let r = backup(&env, &d.spec, &[]);
    assert_eq!(r["backups"][0]["kind"], "resync", "{r}");
    assert!(
        r["backups"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("has no bitmap"),
        "{r}"
    );
    let file = PathBuf::from(r["backups"][0]["file"].as_str().unwrap());
    assert_eq!(own_clusters(&file), touched(20 * MIB, 64 * 1024));
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        view(&env, &d.top),
    ));

    // A QEMU dies with the image open (its bitmap stays marked in use) after writing.
    let mut q = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&d.top)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    writeln!(q.stdin.as_mut().unwrap(), "write -P 4 24M 64k").unwrap();
    writeln!(q.stdin.as_mut().unwrap(), "flush").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    q.kill().unwrap();
    q.wait().unwrap();
    let r = backup(&env, &d.spec, &[]);
    assert_eq!(r["backups"][0]["kind"], "resync", "{r}");
    assert!(
        r["backups"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("in use"),
        "{r}"
    );
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        view(&env, &d.top),
    ));

    // And incrementals again.
    io(&d.top, "qcow2", &["write -P 5 28M 64k".into()]);
    let r = backup(&env, &d.spec, &[]);
    assert_eq!(r["backups"][0]["kind"], "incremental", "{r}");
    let file = PathBuf::from(r["backups"][0]["file"].as_str().unwrap());
    assert_eq!(own_clusters(&file), touched(28 * MIB, 64 * 1024));
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        view(&env, &d.top),
    ));
    for (name, want) in &views {
        assert_eq!(
            &restored_sha(&env, &d.spec, "vdh", name),
            want,
            "restore of {name}"
        );
    }
    // One bitmap of diskchain's is left: the newest point's.
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(&d.top)
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// Lowering retention: `plan` shows the merges with their bytes and changes nothing; their bytes
/// are the brute-force oracle's minimum for the repository chain; `apply` carries them out and
/// every remaining point restores to its view.
#[test]
fn a_lowered_retention_is_planned_at_the_oracle_minimum_and_applied() {
    use diskchain_tests::oracle::{Cell, Problem, min_cost};
    let env = Env::new();
    let d = disk(&env, "vdi", "");
    let mut views = vec![];
    // Overlapping writes of different sizes, so that commit and stream cost differently.
    let rounds: [&[(u64, u64)]; 5] = [
        &[(8, 4)],
        &[(9, 1), (20, 2)],
        &[(8, 1), (30, 3)],
        &[(21, 1)],
        &[(31, 2), (40, 1)],
    ];
    for (i, writes) in rounds.iter().enumerate() {
        let cmds: Vec<String> = writes
            .iter()
            .map(|(at, len)| format!("write -P {} {at}M {len}M", 50 + i))
            .collect();
        io(&d.top, "qcow2", &cmds);
        let r = backup(&env, &d.spec, &[]);
        views.push((
            r["backups"][0]["point"].as_str().unwrap().to_string(),
            view(&env, &d.top),
        ));
    }
    // keepLast 2: the fourth point and the newest stay.
    std::fs::write(&d.spec, yaml(&d, "vdi", &[("golden", true)], "keepLast: 2")).unwrap();
    let files: Vec<PathBuf> = points(&env, &d.spec)
        .iter()
        .map(|p| PathBuf::from(p["file"].as_str().unwrap()))
        .collect();
    let before: Vec<_> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let out = env.run_ok(&["plan", "-o", "json"], &d.spec);
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ret = &plan["retention"][0];
    assert_eq!(ret["removed"].as_array().unwrap().len(), 3, "{plan}");
    let planned = ret["total_bytes"].as_u64().unwrap();
    // The merges are steps of the disk too, counted in its total_bytes.
    let disk = &plan["disks"][0];
    let steps = disk["retention"]
        .as_array()
        .expect("retention steps in the disk");
    assert_eq!(
        steps
            .iter()
            .map(|s| s["bytes"].as_u64().unwrap())
            .sum::<u64>(),
        planned,
        "{plan}"
    );
    let chain: u64 = disk["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(
        disk["total_bytes"].as_u64().unwrap(),
        chain + planned,
        "{plan}"
    );
    for (f, b) in files.iter().zip(&before) {
        assert_eq!(
            &std::fs::read(f).unwrap(),
            b,
            "plan changed {}",
            f.display()
        );
    }
    // The oracle: each repository layer's own clusters, data identified by (layer, cluster).
    let layers: Vec<Vec<Cell>> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            cluster_states(f, "qcow2", CLUSTER)
                .iter()
                .enumerate()
                .map(|(c, s)| match s {
                    0 => Cell::U,
                    1 => Cell::D((i * 100_000 + c) as u32),
                    _ => Cell::Z,
                })
                .collect()
        })
        .collect();
    let p = Problem {
        shared: vec![false; layers.len()],
        keep: vec![3],
        layers,
    };
    let minimum = min_cost(&p).expect("the oracle reaches the goal") * CLUSTER;
    assert_eq!(
        planned, minimum,
        "planned {planned} bytes, the oracle's minimum is {minimum}"
    );
    // apply merges them.
    let out = env.run_ok(&["apply"], &d.spec);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("retention removed 3 backup point(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let listed = points(&env, &d.spec);
    assert_eq!(listed.len(), 2);
    for (name, want) in &views[3..] {
        assert_eq!(
            &restored_sha(&env, &d.spec, "vdi", name),
            want,
            "restore of {name}"
        );
    }
    assert_eq!(repo_files(&d.repo).len(), 2);
    // Nothing left to plan.
    let out = run(&env, &["plan", "-o", "json"], &d.spec);
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(plan.get("retention").is_none(), "{plan}");
}

/// A manifest edited to name a file outside its repository is refused, never read or merged:
/// its points are the repository's own files, by name.
#[test]
fn a_manifest_naming_a_file_outside_the_repository_is_refused() {
    let env = Env::new();
    let d = disk(&env, "vdj", "");
    backup(&env, &d.spec, &[]);
    let path = d.repo.join("manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // The disk's own base, reached from the repository, with its view's checksum.
    m["points"][0]["file"] = json!("../../vdj-base.qcow2");
    m["points"][0]["sparse_sha256"] = json!(view_sparse_sha256(&d.base, "qcow2", env.dir.path()));
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let to = env.dir.path().join("out.raw");
    let out = env
        .diskchain(&["restore", "--disk", "vdj", "--format", "raw", "--to"])
        .arg(&to)
        .arg("--point")
        .arg(m["points"][0]["point"].as_str().unwrap())
        .arg("-f")
        .arg(&d.spec)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("manifest.json") && err.contains("../../vdj-base.qcow2"),
        "{err}"
    );
    assert!(!to.exists());
}

/// The repository stays movable (copied to another host, say) after retention merged points
/// away: every point is backed by the one before it by file name, as a backup writes it, not by
/// the absolute path the merge's QEMU steps were given; moved, every point restores.
#[test]
fn a_repository_merged_by_retention_stays_movable() {
    let env = Env::new();
    let d = disk(&env, "vdm", "");
    let mut views = vec![];
    for i in 0..5u64 {
        io(
            &d.top,
            "qcow2",
            &[format!("write -P {} {}M 1M", 40 + i, 4 * i)],
        );
        let r = backup(&env, &d.spec, &[]);
        views.push((
            r["backups"][0]["point"].as_str().unwrap().to_string(),
            view(&env, &d.top),
        ));
    }
    // keepLast 3: the two oldest points are merged away (a stream into the third, or a commit
    // and a take-over: either way QEMU writes a new backing reference).
    std::fs::write(&d.spec, yaml(&d, "vdm", &[("golden", true)], "keepLast: 3")).unwrap();
    env.run_ok(&["apply"], &d.spec);
    let listed = points(&env, &d.spec);
    assert_eq!(listed.len(), 3);
    let files: Vec<PathBuf> = listed
        .iter()
        .map(|p| PathBuf::from(p["file"].as_str().unwrap()))
        .collect();
    for (i, f) in files.iter().enumerate() {
        let info: Value = serde_json::from_slice(
            &std::process::Command::new("qemu-img")
                .args(["info", "--output=json"])
                .arg(f)
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let want = (i > 0).then(|| {
            files[i - 1]
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        });
        assert_eq!(
            info["backing-filename"].as_str().map(str::to_string),
            want,
            "{}: {info}",
            f.display()
        );
    }
    // Moved elsewhere, every point restores to its view.
    let moved = env.img("backups/vdm-moved");
    std::fs::rename(&d.repo, &moved).unwrap();
    let m = Disk {
        repo: moved,
        top: d.top.clone(),
        base: d.base.clone(),
        spec: d.spec.clone(),
    };
    std::fs::write(&d.spec, yaml(&m, "vdm", &[("golden", true)], "keepLast: 3")).unwrap();
    for (name, want) in &views[2..] {
        assert_eq!(
            &restored_sha(&env, &d.spec, "vdm", name),
            want,
            "restore of {name} from the moved repository"
        );
    }
}

/// A repository whose points record the whole-view SHA-256 (written before the sparse checksum
/// existed) still verifies and restores against it; a wrong one is still caught.
#[test]
fn a_repository_with_whole_view_checksums_still_verifies_and_restores() {
    let env = Env::new();
    let d = disk(&env, "vdo", "");
    io(&d.top, "qcow2", &["write -P 7 12M 1M".into()]);
    let r = backup(&env, &d.spec, &[]);
    let name = r["backups"][0]["point"].as_str().unwrap().to_string();
    let want = view(&env, &d.top);
    // As an older diskchain wrote it.
    let path = d.repo.join("manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["points"][0]
        .as_object_mut()
        .unwrap()
        .remove("sparse_sha256");
    m["points"][0]["sha256"] = json!(want);
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    env.run_ok(&["verify", "--deep"], &d.spec);
    assert_eq!(restored_sha(&env, &d.spec, "vdo", &name), want);
    // A new backup records its sparse checksum beside the old point.
    io(&d.top, "qcow2", &["write -P 8 20M 64k".into()]);
    backup(&env, &d.spec, &[]);
    let listed = points(&env, &d.spec);
    assert!(listed[0]["sparse_sha256"].is_null() && listed[0]["sha256"] == json!(want));
    assert_eq!(
        listed[1]["sparse_sha256"],
        json!(view_sparse_sha256(&d.top, "qcow2", env.dir.path()))
    );
    assert!(listed[1]["sha256"].is_null());
    // A wrong whole-view checksum is found.
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["points"][0]["sha256"] = json!("0".repeat(64));
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let v = run(&env, &["verify", "--deep"], &d.spec);
    assert_eq!(v.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&v.stdout).contains(&name)
            || String::from_utf8_lossy(&v.stderr).contains(&name),
        "{} {}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    // A point that records no checksum at all is refused as damaged.
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["points"][0].as_object_mut().unwrap().remove("sha256");
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let v = run(&env, &["verify"], &d.spec);
    assert_ne!(v.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&v.stderr).contains("records no checksum"),
        "{}",
        String::from_utf8_lossy(&v.stderr)
    );
}

/// An offline incremental is checked against the disk it was taken of (B3, B4, B5): a disk
/// shrunk and grown back (QEMU does not mark the regrown area dirty), a bitmap cleared behind
/// diskchain's back, and a previous point damaged since it was taken each make the next backup a
/// resync whose point reads exactly as the disk, never a point that lies.
#[test]
fn an_offline_point_always_reads_as_the_disk_it_was_taken_of() {
    let env = Env::new();
    let d = disk(&env, "vdc", "");
    io(&d.top, "qcow2", &["write -P 2 40M 4M".into()]);
    backup(&env, &d.spec, &[]);
    let bitmap = |f: &Path| -> String {
        let out = Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(f)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["format-specific"]["data"]["bitmaps"][0]["name"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let check_newest = |what: &str| {
        let listed = points(&env, &d.spec);
        let newest = listed.last().unwrap();
        assert_eq!(newest["kind"], "resync", "{what}: {newest}");
        assert_eq!(
            restored_sha(&env, &d.spec, "vdc", newest["point"].as_str().unwrap()),
            view(&env, &d.top),
            "{what}: the newest point reads as the disk"
        );
    };
    // Shrunk and grown back: the disk now reads zeros at 40 MiB.
    for size in ["16M", "64M"] {
        qemu_img([
            "resize".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "--shrink".as_ref(),
            d.top.as_os_str(),
            size.as_ref(),
        ]);
    }
    backup(&env, &d.spec, &[]);
    check_newest("shrunk and grown back");
    // The bitmap cleared by hand, then a write it did not see.
    let name = bitmap(&d.top);
    let clear = || {
        qemu_img([
            "bitmap".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "--clear".as_ref(),
            d.top.as_os_str(),
            name.as_ref(),
        ])
    };
    clear();
    io(&d.top, "qcow2", &["write -P 3 20M 1M".into()]);
    clear();
    backup(&env, &d.spec, &[]);
    check_newest("bitmap cleared");
    // A byte of the full's data flipped: the next point still reads as the disk.
    let full = d
        .repo
        .join(points(&env, &d.spec)[0]["file"].as_str().unwrap());
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(&full)
        .output()
        .unwrap();
    let extents: Vec<Value> = serde_json::from_slice(&map.stdout).unwrap();
    let off = extents
        .iter()
        .find(|e| e["data"] == true && e["depth"] == 0)
        .and_then(|e| e["offset"].as_u64())
        .unwrap();
    let mut bytes = std::fs::read(&full).unwrap();
    bytes[off as usize + 100] ^= 0xff;
    std::fs::write(&full, bytes).unwrap();
    io(&d.top, "qcow2", &["write -P 4 30M 64k".into()]);
    backup(&env, &d.spec, &[]);
    check_newest("a damaged full");
}

/// Every file of a repository is hostile input (B6, B7, B8): a point file replaced by a symlink
/// to an image outside the roots, or rewritten to be backed by one, is never read (restore
/// refuses and writes nothing, verify names it); symlinks planted at the manifest's temporary
/// name or at the lock are never written through; a FIFO as the manifest does not hang.
#[test]
fn a_repository_never_reaches_outside_itself() {
    let env = Env::new();
    let d = disk(&env, "vdh", "");
    backup(&env, &d.spec, &[]);
    io(&d.top, "qcow2", &["write -P 5 20M 1M".into()]);
    backup(&env, &d.spec, &[]);
    let listed = points(&env, &d.spec);
    let (p2, f2) = (
        listed[1]["point"].as_str().unwrap().to_string(),
        d.repo.join(listed[1]["file"].as_str().unwrap()),
    );
    let outside = env.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let secret = outside.join("tenant.qcow2");
    create(&secret, 64 * MIB, None, &[]);
    io(&secret, "qcow2", &["write -P 94 0 1M".into()]);
    let saved = env.dir.path().join("p2.saved");
    std::fs::rename(&f2, &saved).unwrap();
    std::os::unix::fs::symlink(&secret, &f2).unwrap();
    let to = env.dir.path().join("stolen.raw");
    let restore = |to: &Path| {
        env.diskchain(&[
            "restore", "--disk", "vdh", "--point", &p2, "--format", "raw", "--to",
        ])
        .arg(to)
        .arg("-f")
        .arg(&d.spec)
        .output()
        .unwrap()
    };
    let out = restore(&to);
    assert_ne!(out.status.code(), Some(0));
    assert!(!to.exists(), "nothing written to --to");
    assert!(
        std::fs::read_dir(env.dir.path())
            .unwrap()
            .flatten()
            .all(|e| !e
                .file_name()
                .to_string_lossy()
                .contains("diskchain-restore")),
        "no scratch file left"
    );
    let v = run(&env, &["verify"], &d.spec);
    assert_eq!(v.status.code(), Some(1));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(
        said.contains("symbolic link") && said.contains(&p2),
        "{said}"
    );
    // Backed by a file outside the repository.
    std::fs::remove_file(&f2).unwrap();
    std::fs::rename(&saved, &f2).unwrap();
    let rebase_unsafe = |backing: &std::ffi::OsStr| {
        qemu_img([
            "rebase".as_ref(),
            "-u".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            backing,
            f2.as_os_str(),
        ])
    };
    rebase_unsafe(secret.as_os_str());
    let out = restore(&to);
    assert_ne!(out.status.code(), Some(0));
    assert!(!to.exists());
    rebase_unsafe(listed[0]["file"].as_str().unwrap().as_ref());
    // Planted symlinks at the manifest's temporary name and the lock.
    let victim = outside.join("victim");
    std::fs::write(&victim, "victim").unwrap();
    std::os::unix::fs::symlink(&victim, d.repo.join(".manifest.json.tmp")).unwrap();
    io(&d.top, "qcow2", &["write -P 6 24M 1M".into()]);
    backup(&env, &d.spec, &[]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
    assert!(
        !d.repo
            .join("manifest.json")
            .symlink_metadata()
            .unwrap()
            .is_symlink()
    );
    std::fs::remove_file(d.repo.join(".lock")).unwrap();
    std::os::unix::fs::symlink(outside.join("by-lock"), d.repo.join(".lock")).unwrap();
    let _ = run(&env, &["verify"], &d.spec);
    assert!(
        !outside.join("by-lock").exists(),
        "nothing created through .lock"
    );
    std::fs::remove_file(d.repo.join(".lock")).unwrap();
    // A FIFO as the manifest: answered, not hung.
    let m = d.repo.join("manifest.json");
    std::fs::rename(&m, env.dir.path().join("manifest.saved")).unwrap();
    assert!(Command::new("mkfifo").arg(&m).status().unwrap().success());
    let t = std::time::Instant::now();
    let out = run(&env, &["backups"], &d.spec);
    assert_ne!(out.status.code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(10));
}

/// A disk only its owner may read keeps backups only its owner may read (B9): the repository
/// diskchain creates, its points, its manifest and a restored image.
#[test]
fn a_private_disk_has_private_backups() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let d = disk(&env, "vdp", "");
    std::fs::set_permissions(&d.top, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = backup(&env, &d.spec, &[]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.repo), 0o700);
    assert_eq!(
        mode(Path::new(r["backups"][0]["file"].as_str().unwrap())),
        0o600
    );
    assert_eq!(mode(&d.repo.join("manifest.json")), 0o600);
    let to = env.dir.path().join("restored.qcow2");
    let out = env
        .diskchain(&["restore", "--disk", "vdp", "--point"])
        .arg(r["backups"][0]["point"].as_str().unwrap())
        .arg("--to")
        .arg(&to)
        .arg("-f")
        .arg(&d.spec)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&to), 0o600);
}
