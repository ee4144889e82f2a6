//! Fixtures on real images: build chains with `qemu-img`/`qemu-io`, read allocation maps with
//! `qemu-img map --output=json` (one layer at a time, `"backing": null`), checksum guest views.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Runs a command and panics with its output on failure (test fixtures only).
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates a qcow2 image (`backing`: file and format).
pub fn create(path: &Path, size: u64, backing: Option<(&Path, &str)>, extra: &[&str]) {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2"]);
    c.args(extra);
    if let Some((b, f)) = backing {
        c.arg("-b").arg(b).args(["-F", f]);
    }
    c.arg(path);
    if backing.is_none() {
        c.arg(size.to_string());
    }
    run(&mut c);
}

/// Runs qemu-io commands against one image (its backing chain opened as recorded).
pub fn io(path: &Path, format: &str, cmds: &[String]) {
    if cmds.is_empty() {
        return;
    }
    let mut c = Command::new("qemu-io");
    c.args(["-f", format]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(path);
    run(&mut c);
}

/// One extent of `qemu-img map` on a single layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Allocated in this layer (data or explicit zero).
    pub present: bool,
    /// Holds data (false with `present`: an explicit zero).
    pub data: bool,
}

/// `qemu-img map --output=json` of one layer, without its backing file.
pub fn map_layer(path: &Path, format: &str) -> Vec<Extent> {
    let spec = if format == "qcow2" {
        serde_json::json!({"driver": "qcow2", "backing": null, "file": {"driver": "file", "filename": path}})
    } else {
        serde_json::json!({"driver": format, "file": {"driver": "file", "filename": path}})
    };
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-U"])
        .arg(format!("json:{spec}")));
    let v: Value = serde_json::from_str(&out).expect("qemu-img map prints JSON");
    v.as_array()
        .expect("an array of extents")
        .iter()
        .map(|e| Extent {
            start: e["start"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            present: e["present"].as_bool().unwrap_or(true),
            data: e["data"].as_bool().unwrap(),
        })
        .collect()
}

/// Per cluster of `cluster` bytes: 0 unallocated, 1 data, 2 explicit zero, from `qemu-img map`.
/// A cluster is data if any byte of it is data, else zero if any byte is zero.
pub fn cluster_states(path: &Path, format: &str, cluster: u64) -> Vec<u8> {
    let extents = map_layer(path, format);
    let size = extents.last().map_or(0, |e| e.start + e.length);
    let mut out = vec![0u8; size.div_ceil(cluster) as usize];
    for e in extents.iter().filter(|e| e.present) {
        let first = e.start / cluster;
        let last = (e.start + e.length - 1) / cluster;
        for c in first..=last {
            let cell = &mut out[c as usize];
            if e.data {
                *cell = 1;
            } else if *cell == 0 {
                *cell = 2;
            }
        }
    }
    out
}

/// The guest view of an image (its whole chain), via `qemu-img convert` to raw in `scratch`.
fn raw_view(path: &Path, format: &str, scratch: &Path) -> Vec<u8> {
    let out: PathBuf = scratch.join(format!(
        "view-{}.raw",
        path.file_name().unwrap().to_string_lossy()
    ));
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-f", format, "-O", "raw"])
        .arg(path)
        .arg(&out));
    let bytes = std::fs::read(&out).expect("read converted view");
    let _ = std::fs::remove_file(&out);
    bytes
}

/// SHA-256 of the guest view of an image (its whole chain), via `qemu-img convert` to raw.
pub fn view_sha256(path: &Path, format: &str, scratch: &Path) -> String {
    use sha2::Digest;
    format!(
        "{:x}",
        sha2::Sha256::digest(raw_view(path, format, scratch))
    )
}

/// The sparse view checksum a backup point records (`sparse_sha256`), computed here on its own
/// from the whole raw view (`qemu-img convert` to raw, every byte read): SHA-256 over
/// `diskchain-sparse-sha256-v1\0`, the size (u64 LE), then each 64 KiB block that is not all
/// zeros as its index (u64 LE) and its bytes.
pub fn view_sparse_sha256(path: &Path, format: &str, scratch: &Path) -> String {
    use sha2::Digest;
    let bytes = raw_view(path, format, scratch);
    let mut h = sha2::Sha256::new();
    h.update(b"diskchain-sparse-sha256-v1\0");
    h.update((bytes.len() as u64).to_le_bytes());
    for (i, block) in bytes.chunks(64 * 1024).enumerate() {
        if block.iter().any(|&b| b != 0) {
            h.update((i as u64).to_le_bytes());
            h.update(block);
        }
    }
    format!("{:x}", h.finalize())
}

/// Like [`view_sha256`], for polling while diskchain works on the chain: `None` when the view
/// cannot be read at this moment (a layer renamed between opening one file and its backing).
pub fn try_view_sha256(path: &Path, format: &str, scratch: &Path) -> Option<String> {
    use sha2::Digest;
    let out: PathBuf = scratch.join(format!(
        "try-view-{}.raw",
        path.file_name()?.to_string_lossy()
    ));
    let ok = Command::new("qemu-img")
        .args(["convert", "-U", "-f", format, "-O", "raw"])
        .arg(path)
        .arg(&out)
        .output()
        .is_ok_and(|o| o.status.success());
    let bytes = ok.then(|| std::fs::read(&out).ok()).flatten();
    let _ = std::fs::remove_file(&out);
    bytes.map(|b| format!("{:x}", sha2::Sha256::digest(&b)))
}

/// SHA-256 and mtime of a file, to prove it was not touched.
pub fn fingerprint(path: &Path) -> (String, std::time::SystemTime) {
    use sha2::Digest;
    let bytes = std::fs::read(path).expect("read file");
    let mtime = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("mtime");
    (format!("{:x}", sha2::Sha256::digest(&bytes)), mtime)
}

/// The built `diskchain` binary (cargo puts test binaries in `target/<profile>/deps`).
pub fn diskchain_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DISKCHAIN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join("diskchain");
    assert!(
        bin.exists(),
        "{} not built; run `cargo build -p diskchain` first (or set DISKCHAIN_BIN)",
        bin.display()
    );
    bin
}

/// A qemu-storage-daemon holding an image open, with QEMU's image lock, as a running VM would.
/// Stopped when dropped.
pub struct HeldOpen(std::process::Child);

impl Drop for HeldOpen {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Opens `image` (qcow2, writable) in a qemu-storage-daemon exporting it over NBD on a socket
/// in `scratch`, and waits until the daemon holds it.
pub fn hold_open(image: &Path, scratch: &Path) -> HeldOpen {
    let sock = scratch.join(format!("qsd-{}.sock", std::process::id()));
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            image.display()
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q,file=f")
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .arg("--export")
        .arg("type=nbd,id=e,node-name=q,writable=on")
        .spawn()
        .expect("start qemu-storage-daemon");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(sock.exists(), "qemu-storage-daemon did not start");
    HeldOpen(child)
}

/// Two images in `dir` that back each other (a corrupt chain): returns (a, b), b on a, a on b.
pub fn cycle(dir: &Path) -> (PathBuf, PathBuf) {
    let (a, b) = (dir.join("cycle-a.qcow2"), dir.join("cycle-b.qcow2"));
    create(&a, 1 << 20, None, &[]);
    create(&b, 0, Some((&a, "qcow2")), &[]);
    run(Command::new("qemu-img")
        .args(["rebase", "-u", "-F", "qcow2", "-b"])
        .arg(&b)
        .arg(&a));
    (a, b)
}
