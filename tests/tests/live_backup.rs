//! Backups of a running domain's disk through libvirt's backup API, on a real libvirtd: a TCG
//! domain (no OS) whose guest writes arrive through its own virtio device. Oracles: the guest
//! view read with `qemu-img convert -U` after a flush, restores hashed here, `qemu-img map` of
//! each backup layer, and libvirt's own list of checkpoints.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use diskchain_tests::env::{Env, spec_yaml_source};
use diskchain_tests::libvirt::{Domain, URI, live_view, open_up, sha, virsh};
use diskchain_tests::qemu::{cluster_states, create, io};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 * 1024;

struct Live {
    env: Env,
    base: PathBuf,
    repo: PathBuf,
    spec: PathBuf,
    dom: Domain,
}

fn yaml(l: &Live, name: &str, points: &[(&str, Option<&Path>)]) -> String {
    spec_yaml_source(
        name,
        &format!(
            "libvirt: {{ uri: \"{URI}\", domain: {}, target: vda }}",
            l.dom.name
        ),
        points,
        &format!("  backup:\n    repository: {}\n", l.repo.display()),
    )
}

/// A running domain on base (4 MiB of data) <- top, and a spec keeping the base as `golden`
/// with a backup policy.
fn live(tag: &str) -> Live {
    let env = Env::new();
    open_up(env.dir.path());
    open_up(&env.root());
    let base = env.img("base.qcow2");
    create(&base, 64 * MIB, None, &[]);
    io(&base, "qcow2", &["write -P 1 0 4M".into()]);
    let top = env.img("top.qcow2");
    create(&top, 0, Some((&base, "qcow2")), &[]);
    let dom = Domain::start(&format!("dc-bk-{tag}-{}", std::process::id()), &top);
    let repo = env.img("backups/vda");
    let mut l = Live {
        spec: PathBuf::new(),
        env,
        base,
        repo,
        dom,
    };
    let y = yaml(&l, "vda", &[("golden", Some(&l.base))]);
    l.spec = l.env.spec("vda.yaml", &y);
    l
}

fn backup(l: &Live) -> Value {
    backup_expecting(l, guest_view(l))
}

/// `backup -o json`, which must succeed and whose new point must read as `want`.
fn backup_expecting(l: &Live, want: String) -> Value {
    let out = l
        .env
        .diskchain(&["backup", "-o", "json", "-f"])
        .arg(&l.spec)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = PathBuf::from(r["backups"][0]["file"].as_str().unwrap());
    assert_eq!(
        sha(&live_view(&file)),
        want,
        "the new point reads as the guest did when its backup started: {r}"
    );
    r
}

/// The guest's view now (after a flush), hashed: the chain under the active image libvirt
/// reports (a live snapshot puts a new file on top).
fn guest_view(l: &Live) -> String {
    l.dom.flush();
    let active = l.dom.chain().pop().expect("the domain has a disk");
    sha(&live_view(&active))
}

fn restored(l: &Live, point: &str) -> String {
    let to = l
        .env
        .dir
        .path()
        .join(format!("r-{}.raw", point.replace(':', "")));
    let out = l
        .env
        .diskchain(&[
            "restore", "--disk", "vda", "--point", point, "--format", "raw", "--to",
        ])
        .arg(&to)
        .arg("-f")
        .arg(&l.spec)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "restore {point}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = sha(&std::fs::read(&to).unwrap());
    std::fs::remove_file(&to).unwrap();
    s
}

fn own_clusters(f: &Path) -> BTreeSet<u64> {
    cluster_states(f, "qcow2", CLUSTER)
        .iter()
        .enumerate()
        .filter(|(_, s)| **s != 0)
        .map(|(i, _)| i as u64)
        .collect()
}

fn checkpoints(dom: &Domain) -> Vec<String> {
    virsh(&["checkpoint-list", "--name", &dom.name])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn a_running_domain_is_backed_up_full_then_incremental_then_resynced_after_a_crash() {
    let l = live("rounds");
    l.dom.guest_write(2, 16 * MIB, MIB);
    let mut views = vec![];
    let want = guest_view(&l);
    let r = backup(&l);
    assert_eq!(r["backups"][0]["kind"], "full", "{r}");
    views.push((r["backups"][0]["point"].as_str().unwrap().to_string(), want));
    assert_eq!(checkpoints(&l.dom).len(), 1);

    // Guest writes, then an incremental: only the written clusters.
    l.dom.guest_write(3, 20 * MIB, 128 * 1024);
    let want = guest_view(&l);
    let r = backup(&l);
    assert_eq!(r["backups"][0]["kind"], "incremental", "{r}");
    let file = PathBuf::from(r["backups"][0]["file"].as_str().unwrap());
    let wrote: BTreeSet<u64> = (20 * MIB / CLUSTER..(20 * MIB + 128 * 1024) / CLUSTER).collect();
    assert_eq!(
        own_clusters(&file),
        wrote,
        "the incremental holds only what the guest wrote"
    );
    views.push((r["backups"][0]["point"].as_str().unwrap().to_string(), want));
    let cks = checkpoints(&l.dom);
    assert_eq!(
        cks.len(),
        1,
        "only the last good backup's checkpoint is kept: {cks:?}"
    );

    // A live chain step (a new point: an external snapshot through libvirt) between backups.
    std::fs::write(
        &l.spec,
        yaml(&l, "vda", &[("golden", Some(&l.base)), ("s1", None)]),
    )
    .unwrap();
    let out = l.env.apply(&l.spec, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    l.dom.guest_write(4, 30 * MIB, 64 * 1024);
    let want = guest_view(&l);
    let r = backup(&l);
    assert_eq!(r["backups"][0]["kind"], "incremental", "{r}");
    views.push((r["backups"][0]["point"].as_str().unwrap().to_string(), want));

    // QEMU crashes: the checkpoint's bitmap cannot be trusted. The next backup says so and
    // resyncs, writing only what differs.
    l.dom.crash();
    virsh(&["start", &l.dom.name]);
    l.dom.guest_write(5, 40 * MIB, 64 * 1024);
    let want = guest_view(&l);
    let r = backup(&l);
    assert_eq!(r["backups"][0]["kind"], "resync", "{r}");
    assert!(
        r["backups"][0]["reason"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{r}"
    );
    let file = PathBuf::from(r["backups"][0]["file"].as_str().unwrap());
    assert!(
        own_clusters(&file).len() <= 2,
        "a resync writes only what differs: {:?}",
        own_clusters(&file)
    );
    views.push((r["backups"][0]["point"].as_str().unwrap().to_string(), want));
    // After the resync, incrementals again.
    l.dom.guest_write(6, 50 * MIB, 64 * 1024);
    let want = guest_view(&l);
    let r = backup(&l);
    assert_eq!(r["backups"][0]["kind"], "incremental", "{r}");
    views.push((r["backups"][0]["point"].as_str().unwrap().to_string(), want));

    for (point, want) in &views {
        assert_eq!(&restored(&l, point), want, "restore of {point}");
    }
    let v = l
        .env
        .diskchain(&["verify", "--deep", "-f"])
        .arg(&l.spec)
        .output()
        .unwrap();
    assert_eq!(
        v.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&v.stderr)
    );
    assert_eq!(checkpoints(&l.dom).len(), 1);
}

fn listed(l: &Live) -> Vec<Value> {
    let out = l
        .env
        .diskchain(&["backups", "-o", "json", "-f"])
        .arg(&l.spec)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["disks"][0]["points"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `backup` until it succeeds (a job of the killed run may still be running in libvirt: the
/// backup refuses to start beside it), up to `tries` times.
fn backup_when_free(l: &Live, tries: usize) -> Value {
    for _ in 0..tries {
        let out = l
            .env
            .diskchain(&["backup", "-o", "json", "-f"])
            .arg(&l.spec)
            .output()
            .unwrap();
        if out.status.code() == Some(0) {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("a job"), "{err}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("the backup never got the domain free");
}

#[test]
fn diskchain_or_qemu_killed_under_a_live_backup_loses_nothing() {
    use std::os::unix::process::CommandExt;
    let l = live("kill");
    l.dom.guest_write(2, 8 * MIB, 40 * MIB);
    let first = backup(&l);
    let mut views = vec![(
        first["backups"][0]["point"].as_str().unwrap().to_string(),
        guest_view(&l),
    )];
    // diskchain SIGKILLed (with its process group) while its backup job runs in libvirt.
    l.dom.guest_write(3, 8 * MIB, 40 * MIB);
    let child = l
        .env
        .diskchain(&["backup", "-f"])
        .arg(&l.spec)
        .process_group(0)
        .spawn()
        .unwrap();
    let started = (0..400).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(5));
        std::fs::read_dir(&l.repo).is_ok_and(|r| {
            r.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".partial-"))
        })
    });
    assert!(started, "the backup never started");
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    let mut child = child;
    child.wait().unwrap();
    assert_eq!(listed(&l).len(), 1, "a killed backup is never listed");
    let want = guest_view(&l);
    let r = backup_when_free(&l, 100);
    views.push((r["backups"][0]["point"].as_str().unwrap().to_string(), want));
    assert_eq!(
        checkpoints(&l.dom).len(),
        1,
        "the killed run's checkpoint is gone"
    );

    // QEMU killed under a backup job: the backup fails with the job's error (the domain stopped
    // under it), nothing is recorded; after a restart the next backup resyncs.
    l.dom.guest_write(4, 8 * MIB, 40 * MIB);
    let child = l
        .env
        .diskchain(&["backup", "-f"])
        .arg(&l.spec)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = (0..400).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(5));
        std::fs::read_dir(&l.repo).is_ok_and(|r| {
            r.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".partial-"))
        })
    });
    assert!(started, "the backup never started");
    l.dom.crash();
    let out = child.wait_with_output().unwrap();
    let n = listed(&l).len();
    assert!(
        (out.status.code() == Some(1) && n == 2) || (out.status.code() == Some(0) && n == 3),
        "a backup whose QEMU died is not recorded: exit {:?}, {n} points, {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    if n == 2 {
        // B13: the job's own failure is reported, not what a retry on the stopped domain says.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("stopped during the backup") && !err.contains("the resync that followed"),
            "{err}"
        );
    }
    if n == 3 {
        // The job finished before QEMU died: its point is good.
        let p = listed(&l)[2]["point"].as_str().unwrap().to_string();
        views.push((p, String::new()));
    }
    virsh(&["start", &l.dom.name]);
    l.dom.guest_write(5, 60 * MIB, 64 * 1024);
    let want = guest_view(&l);
    let r = backup_when_free(&l, 100);
    views.push((r["backups"][0]["point"].as_str().unwrap().to_string(), want));
    assert!(
        listed(&l)
            .iter()
            .all(|p| !p["file"].as_str().unwrap().contains(".partial")),
        "no partial is listed"
    );
    for (point, want) in &views {
        let got = restored(&l, point);
        if !want.is_empty() {
            assert_eq!(&got, want, "restore of {point}");
        }
    }
    let v = l
        .env
        .diskchain(&["verify", "--deep", "-f"])
        .arg(&l.spec)
        .output()
        .unwrap();
    assert_eq!(
        v.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&v.stderr)
    );
}

/// A domain backed up while running, then shut off and written offline, then running again.
/// The offline backup is an incremental: QEMU's backup job over the checkpoint's bitmap, checked
/// against the disk at rest; it records its own bitmap as a libvirt checkpoint (redefined). The
/// next live backup is a resync: that bitmap went through the image while no QEMU held it, where
/// it can be changed unseen; the resync writes only what differs from the previous point.
#[test]
fn backups_across_a_shut_off_domain_are_checked_or_resynced() {
    let l = live("offon");
    l.dom.guest_write(2, 16 * MIB, MIB);
    let r = backup(&l);
    let mut views = vec![(
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        String::new(),
    )];
    views[0].1 = guest_view(&l);
    // Powered off (QEMU stores its bitmaps as it exits), then written by a QEMU tool.
    let active = l.dom.chain().pop().unwrap();
    virsh(&["destroy", &l.dom.name]);
    io(&active, "qcow2", &["write -P 7 24M 64k".into()]);
    let want = sha(&live_view(&active));
    let r = backup_expecting(&l, want.clone());
    assert_eq!(r["backups"][0]["kind"], "incremental", "{r}");
    let file = PathBuf::from(r["backups"][0]["file"].as_str().unwrap());
    let wrote: BTreeSet<u64> = (24 * MIB / CLUSTER..(24 * MIB + 64 * 1024) / CLUSTER).collect();
    assert_eq!(own_clusters(&file), wrote);
    views.push((r["backups"][0]["point"].as_str().unwrap().to_string(), want));
    let cks = checkpoints(&l.dom);
    assert_eq!(cks.len(), 1, "{cks:?}");
    // Running again: the checkpoint the offline one recorded is not built on; only what
    // differs from it is written.
    virsh(&["start", &l.dom.name]);
    l.dom.guest_write(3, 32 * MIB, 128 * 1024);
    let r = backup(&l);
    assert_eq!(r["backups"][0]["kind"], "resync", "{r}");
    assert!(
        r["backups"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not the process that made"),
        "{r}"
    );
    let file = PathBuf::from(r["backups"][0]["file"].as_str().unwrap());
    let wrote: BTreeSet<u64> = (32 * MIB / CLUSTER..(32 * MIB + 128 * 1024) / CLUSTER).collect();
    assert_eq!(own_clusters(&file), wrote);
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        guest_view(&l),
    ));
    for (point, want) in &views {
        assert_eq!(&restored(&l, point), want, "restore of {point}");
    }
}

/// A checkpoint's bitmap cleared in the image while the domain is shut off (`qemu-img bitmap
/// --clear`: it still looks sound to libvirt and QEMU), then the domain started again: the next
/// backup is not an incremental over it, which would miss the writes made before the shutdown;
/// it is a resync, and every point restores as the guest read. Backups while the same QEMU runs
/// stay incremental.
#[test]
fn a_bitmap_cleared_while_the_domain_is_off_is_not_built_on() {
    let l = live("clear");
    l.dom.guest_write(2, 16 * MIB, MIB);
    let mut views = Vec::new();
    let r = backup(&l);
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        guest_view(&l),
    ));
    l.dom.guest_write(4, 20 * MIB, MIB);
    let r = backup(&l);
    assert_eq!(r["backups"][0]["kind"], "incremental", "the same QEMU: {r}");
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        guest_view(&l),
    ));
    // Written before the shutdown, then the bitmap recording it cleared offline.
    l.dom.guest_write(5, 40 * MIB, MIB);
    let active = l.dom.chain().pop().unwrap();
    let cks = checkpoints(&l.dom);
    assert_eq!(cks.len(), 1, "{cks:?}");
    virsh(&["destroy", &l.dom.name]);
    let out = std::process::Command::new("qemu-img")
        .args(["bitmap", "--clear"])
        .arg(&active)
        .arg(&cks[0])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    virsh(&["start", &l.dom.name]);
    l.dom.guest_write(6, 48 * MIB, MIB);
    let r = backup(&l);
    assert_eq!(r["backups"][0]["kind"], "resync", "{r}");
    views.push((
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        guest_view(&l),
    ));
    for (point, want) in &views {
        assert_eq!(&restored(&l, point), want, "restore of {point}");
    }
}

/// The disks of one running domain, each with its own spec and repository, are backed up in one
/// libvirt job with one checkpoint (one instant for the whole machine): a full each, then an
/// incremental each holding only what the guest wrote to that disk.
#[test]
fn the_disks_of_one_domain_are_backed_up_in_one_job() {
    let env = Env::new();
    open_up(env.dir.path());
    open_up(&env.root());
    let mut tops = vec![];
    for n in ["a", "b"] {
        let f = env.img(&format!("{n}.qcow2"));
        create(&f, 64 * MIB, None, &[]);
        tops.push(f);
    }
    let dom = Domain::start_two(
        &format!("dc-bk-two-{}", std::process::id()),
        &tops[0],
        &tops[1],
    );
    let specs = env.dir.path().join("two-specs");
    std::fs::create_dir(&specs).unwrap();
    for (name, target) in [("sys", "vda"), ("data", "vdb")] {
        let y = spec_yaml_source(
            name,
            &format!(
                "libvirt: {{ uri: \"{URI}\", domain: {}, target: {target} }}",
                dom.name
            ),
            &[],
            &format!(
                "  backup:\n    repository: {}\n",
                env.img(&format!("backups/{name}")).display()
            ),
        );
        std::fs::write(specs.join(format!("{name}.yaml")), y).unwrap();
    }
    let backup = || -> Value {
        let out = env
            .diskchain(&["backup", "-o", "json", "-f"])
            .arg(&specs)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let manifest = |name: &str| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(env.img(&format!("backups/{name}/manifest.json"))).unwrap(),
        )
        .unwrap()
    };
    dom.guest_write_to(0, 2, 4 * MIB, MIB);
    dom.guest_write_to(1, 3, 8 * MIB, MIB);
    let r = backup();
    assert_eq!(r["backups"].as_array().unwrap().len(), 2, "{r}");
    let (s, d) = (manifest("sys"), manifest("data"));
    assert_eq!(
        s["points"][0]["checkpoint"], d["points"][0]["checkpoint"],
        "one checkpoint covers both disks"
    );
    assert_eq!(checkpoints(&dom).len(), 1);
    dom.guest_write_to(0, 4, 20 * MIB, 64 * 1024);
    dom.guest_write_to(1, 5, 30 * MIB, 128 * 1024);
    let want: Vec<String> = tops.iter().map(|t| sha(&live_view(t))).collect();
    let r = backup();
    for b in r["backups"].as_array().unwrap() {
        assert_eq!(b["kind"], "incremental", "{r}");
    }
    let (s, d) = (manifest("sys"), manifest("data"));
    assert_eq!(s["points"][1]["checkpoint"], d["points"][1]["checkpoint"]);
    assert_eq!(
        checkpoints(&dom).len(),
        1,
        "the previous checkpoint is gone"
    );
    for (i, (name, m, at, len)) in [
        ("sys", &s, 20 * MIB, 64 * 1024),
        ("data", &d, 30 * MIB, 128 * 1024),
    ]
    .into_iter()
    .enumerate()
    {
        let file = env
            .img(&format!("backups/{name}"))
            .join(m["points"][1]["file"].as_str().unwrap());
        let wrote: BTreeSet<u64> = (at / CLUSTER..(at + len) / CLUSTER).collect();
        assert_eq!(
            own_clusters(&file),
            wrote,
            "{name}: only what the guest wrote to it"
        );
        assert_eq!(
            sha(&live_view(&file)),
            want[i],
            "{name}: the point reads as the disk"
        );
    }

    // The agent takes them together too: both specs get a daily schedule, and their newest
    // points are made three days old, so a backup of each is due when the agent starts.
    for name in ["sys", "data"] {
        let f = specs.join(format!("{name}.yaml"));
        let y = std::fs::read_to_string(&f)
            .unwrap()
            .replace("  backup:\n", "  backup:\n    schedule: \"0 2 * * *\"\n");
        std::fs::write(&f, y).unwrap();
        let path = env.img(&format!("backups/{name}/manifest.json"));
        let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let t = m["points"][1]["time_unix"].as_i64().unwrap();
        m["points"][1]["time_unix"] = (t - 3 * 86_400).into();
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    }
    dom.guest_write_to(0, 6, 40 * MIB, 64 * 1024);
    dom.guest_write_to(1, 7, 44 * MIB, 64 * 1024);
    let want: Vec<String> = tops.iter().map(|t| sha(&live_view(t))).collect();
    let mut agent = env
        .diskchain(&["agent", "--resync", "1s", "--specs"])
        .arg(&specs)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(env.dir.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !(manifest("sys")["points"].as_array().unwrap().len() == 3
        && manifest("data")["points"].as_array().unwrap().len() == 3)
    {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "the agent's catch-up backups: {}",
            std::fs::read_to_string(env.dir.path().join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let (s, d) = (manifest("sys"), manifest("data"));
    assert_eq!(
        s["points"][2]["checkpoint"], d["points"][2]["checkpoint"],
        "the agent took both disks of the domain in one job, with one checkpoint"
    );
    assert_eq!(checkpoints(&dom).len(), 1);
    for (i, (name, m)) in [("sys", &s), ("data", &d)].into_iter().enumerate() {
        assert_eq!(m["points"][2]["kind"], "incremental", "{m}");
        let file = env
            .img(&format!("backups/{name}"))
            .join(m["points"][2]["file"].as_str().unwrap());
        assert_eq!(sha(&live_view(&file)), want[i], "{name}: the agent's point");
    }
}

/// B12: the disks of one domain are recorded one after the other after their one job. A backup
/// killed after the first disk's point is recorded and before the second's leaves the second
/// disk its previous checkpoint (it is dropped only once every disk of the job is recorded), so
/// the second disk's next backup is still an incremental, and reads as the disk.
#[test]
fn a_backup_killed_between_the_records_of_two_disks_keeps_the_second_incremental() {
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    open_up(env.dir.path());
    open_up(&env.root());
    let mut tops = vec![];
    for n in ["a", "b"] {
        let f = env.img(&format!("{n}.qcow2"));
        create(&f, 128 * MIB, None, &[]);
        tops.push(f);
    }
    let dom = Domain::start_two(
        &format!("dc-bk-twokill-{}", std::process::id()),
        &tops[0],
        &tops[1],
    );
    let specs = env.dir.path().join("two-specs");
    std::fs::create_dir(&specs).unwrap();
    let names = ["sys", "data"];
    for (name, target) in [("sys", "vda"), ("data", "vdb")] {
        let y = spec_yaml_source(
            name,
            &format!(
                "libvirt: {{ uri: \"{URI}\", domain: {}, target: {target} }}",
                dom.name
            ),
            &[],
            &format!(
                "  backup:\n    repository: {}\n",
                env.img(&format!("backups/{name}")).display()
            ),
        );
        std::fs::write(specs.join(format!("{name}.yaml")), y).unwrap();
    }
    let points = |name: &str| -> Vec<Value> {
        std::fs::read_to_string(env.img(&format!("backups/{name}/manifest.json")))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|m| m["points"].as_array().cloned())
            .unwrap_or_default()
    };
    let backup = || -> Value {
        let out = env
            .diskchain(&["backup", "-o", "json", "-f"])
            .arg(&specs)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    backup();
    let mut landed = None;
    for round in 0..4u8 {
        // Large points: the second disk's record (its checksum) takes a moment after the first.
        dom.guest_write_to(0, 10 + round, 0, 48 * MIB);
        dom.guest_write_to(1, 20 + round, 0, 48 * MIB);
        let before: Vec<usize> = names.iter().map(|n| points(n).len()).collect();
        let mut child = env
            .diskchain(&["backup", "-f"])
            .arg(&specs)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut one = None;
        loop {
            let now: Vec<usize> = names.iter().map(|n| points(n).len()).collect();
            let grown: Vec<usize> = (0..2).filter(|&i| now[i] > before[i]).collect();
            if grown.len() == 1 {
                // A moment after the first record (its checkpoint work done), before the second.
                std::thread::sleep(std::time::Duration::from_millis(30));
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
                let _ = child.wait();
                // Recorded by the time the kill landed?
                let after: Vec<usize> = names.iter().map(|n| points(n).len()).collect();
                if after[1 - grown[0]] == before[1 - grown[0]] {
                    one = Some(1 - grown[0]);
                }
                break;
            }
            if grown.len() == 2 || child.try_wait().unwrap().is_some() {
                let _ = child.wait();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        if one.is_some() {
            landed = one;
            break;
        }
    }
    let Some(unrecorded) = landed else {
        panic!("no kill landed between the two records");
    };
    dom.guest_write_to(unrecorded, 7, 64 * MIB, 64 * 1024);
    let want = sha(&live_view(&tops[unrecorded]));
    let r = backup();
    let b = r["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["disk"] == names[unrecorded])
        .cloned()
        .unwrap();
    assert_eq!(b["kind"], "incremental", "{r}");
    let file = PathBuf::from(b["file"].as_str().unwrap());
    assert_eq!(sha(&live_view(&file)), want, "the point reads as the disk");
    assert_eq!(checkpoints(&dom).len(), 1, "{:?}", checkpoints(&dom));
}

/// B3, live: a running domain's disk shrunk and grown back (`virsh blockresize`) between two
/// backups reads zeros past the shrink point; the next point reads as the disk does, not as
/// the previous point did there.
#[test]
fn a_live_disk_shrunk_and_grown_back_is_backed_up_as_it_reads() {
    let l = live("shrink");
    l.dom.guest_write(2, 40 * MIB, 8 * MIB);
    let r = backup(&l);
    let first = (
        r["backups"][0]["point"].as_str().unwrap().to_string(),
        guest_view(&l),
    );
    virsh(&["blockresize", &l.dom.name, "vda", "--size", "32M"]);
    virsh(&["blockresize", &l.dom.name, "vda", "--size", "64M"]);
    let now = guest_view(&l);
    assert_ne!(now, first.1, "the data past 32 MiB is gone");
    let r = backup(&l);
    assert_eq!(r["backups"][0]["kind"], "resync", "{r}");
    let second = (r["backups"][0]["point"].as_str().unwrap().to_string(), now);
    for (point, want) in [&first, &second] {
        assert_eq!(&restored(&l, point), want, "restore of {point}");
    }
}
