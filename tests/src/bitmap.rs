//! Reading persistent dirty bitmaps back, as an oracle independent of diskchain: the union of a
//! bitmap over every layer of a chain (what a backup tool takes as "changed since the
//! checkpoint"), read through `qemu-nbd`'s dirty-bitmap export and `qemu-img map`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::qemu::run;

/// The bitmaps of one qcow2 file: name and whether it is enabled (`auto`).
pub fn bitmaps(file: &Path) -> Vec<(String, bool)> {
    let out = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(file));
    let v: Value = serde_json::from_str(&out).expect("qemu-img info JSON");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let auto = b["flags"]
                        .as_array()
                        .is_some_and(|f| f.iter().any(|x| x == "auto"));
                    (b["name"].as_str().unwrap_or_default().to_string(), auto)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The dirty ranges `(start, length)` of bitmap `name` in the qcow2 `file` alone.
pub fn dirty(file: &Path, name: &str, scratch: &Path) -> Vec<(u64, u64)> {
    let sock = scratch.join(format!("nbd-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut nbd = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", name, "-k"])
        .arg(&sock)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-nbd");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts"])
        .arg(format!(
            "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
            sock.display()
        ))
        .output()
        .expect("qemu-img map");
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert!(
        out.status.success(),
        "reading bitmap {name} of {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("map JSON");
    // With `x-dirty-bitmap`, a dirty range reads as `"data": false`.
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("a list") {
        if e["data"] == false {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += l,
                _ => ranges.push((s, l)),
            }
        }
    }
    ranges
}

/// The union of bitmap `name` over every layer of the chain under `top` that holds it, as
/// merged ranges. Each layer is merged into a scratch image, one `qemu-img bitmap --merge` per
/// layer.
pub fn union_over_chain(top: &Path, name: &str, size: u64, scratch: &Path) -> Vec<(u64, u64)> {
    let u = scratch.join("union.qcow2");
    let _ = std::fs::remove_file(&u);
    crate::qemu::create(&u, size, None, &[]);
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--disable", "-g", "64K"])
        .arg(&u)
        .arg("u"));
    for f in crate::env::backing_chain(top) {
        if bitmaps(&f).iter().any(|(n, _)| n == name) {
            run(Command::new("qemu-img")
                .args(["bitmap", "--merge", name, "-F", "qcow2", "-b"])
                .arg(&f)
                .arg(&u)
                .arg("u"));
        }
    }
    dirty(&u, "u", scratch)
}

/// Adds an enabled persistent bitmap `name` (64 KiB granularity) to the qcow2 `file`, as a
/// checkpoint or a backup tool would.
pub fn add(file: &Path, name: &str) {
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "-g", "64K"])
        .arg(file)
        .arg(name));
}
