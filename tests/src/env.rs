//! A scratch host for end-to-end tests: an allowed root with images, a spec directory, a state
//! directory, and helpers to build chains and run the `diskchain` binary against them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::Value;

use crate::qemu::{create, diskchain_bin, fingerprint, io, run};

/// The cluster size test chains use.
pub const CLUSTER: u64 = 65536;

/// A scratch host.
pub struct Env {
    /// The temporary directory holding everything.
    pub dir: tempfile::TempDir,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    /// A new scratch host with `img/` (the allowed root) and `specs/`.
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("img")).expect("img dir");
        std::fs::create_dir(dir.path().join("specs")).expect("specs dir");
        Env { dir }
    }

    /// The allowed root.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("img")
    }

    /// A path under the allowed root.
    pub fn img(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    /// The journal of disk `disk` (default namespace), present while a plan is in flight.
    pub fn journal(&self, disk: &str) -> PathBuf {
        self.state()
            .join("journal/default")
            .join(format!("{disk}.json"))
    }

    /// The state record of disk `disk` (default namespace).
    pub fn record(&self, disk: &str) -> PathBuf {
        self.state()
            .join("disks/default")
            .join(format!("{disk}.json"))
    }

    /// True when disk `disk` has a step running (its journal says so).
    pub fn step_running(&self, disk: &str) -> bool {
        std::fs::read_to_string(self.journal(disk))
            .unwrap_or_default()
            .contains("\"running\"")
    }

    /// Waits up to `limit` until disk `disk` has a step running, or `done()` says to stop
    /// waiting (the process driving it ended, say); true when a step runs.
    pub fn wait_for_step(
        &self,
        disk: &str,
        limit: std::time::Duration,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        let t = std::time::Instant::now();
        while t.elapsed() < limit {
            if self.step_running(disk) {
                return true;
            }
            if done() {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    }

    /// Asserts that every image under the root passes `qemu-img check` (`what`: for the
    /// message).
    pub fn assert_images_clean(&self, what: &str) {
        for f in self.images() {
            assert_eq!(check(&f), 0, "{what}: qemu-img check {}", f.display());
        }
    }

    /// Writes a spec file.
    pub fn spec(&self, file: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join("specs").join(file);
        std::fs::write(&p, text).expect("write spec");
        p
    }

    /// The state directory.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `diskchain --allowed-root img --state-dir state ARGS...`
    pub fn diskchain(&self, args: &[&str]) -> Command {
        let mut c = Command::new(diskchain_bin());
        c.arg("--allowed-root")
            .arg(self.root())
            .arg("--state-dir")
            .arg(self.state())
            .args(args);
        c
    }

    /// `plan -o json -f PATH`.
    pub fn plan(&self, path: &Path) -> Output {
        self.diskchain(&["plan", "-o", "json", "-f"])
            .arg(path)
            .output()
            .expect("run diskchain")
    }

    /// `plan -o json -f PATH`, which must succeed, parsed.
    pub fn plan_json(&self, path: &Path) -> Value {
        let out = self.plan(path);
        assert_eq!(
            out.status.code(),
            Some(0),
            "plan failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("plan prints JSON")
    }

    /// `apply -f PATH EXTRA...`.
    pub fn apply(&self, path: &Path, extra: &[&str]) -> Output {
        self.diskchain(&["apply"])
            .args(extra)
            .arg("-f")
            .arg(path)
            .output()
            .expect("run diskchain")
    }

    /// `apply -f PATH EXTRA...`, which must exit 0 (the test fails showing stderr otherwise).
    pub fn apply_ok(&self, path: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["apply"];
        args.extend_from_slice(extra);
        self.run_ok(&args, path)
    }

    /// `diskchain ARGS... -f PATH`, which must exit 0 (the test fails showing the command and
    /// its stderr otherwise).
    pub fn run_ok(&self, args: &[&str], path: &Path) -> Output {
        let out = self
            .diskchain(args)
            .arg("-f")
            .arg(path)
            .output()
            .expect("run diskchain");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// SHA-256 and mtime of every file under the root (recursively).
    pub fn fingerprints(&self) -> BTreeMap<PathBuf, (String, std::time::SystemTime)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.root()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read dir").flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.insert(p.clone(), fingerprint(&p));
                }
            }
        }
        out
    }

    /// Every image file under the root (recursively).
    pub fn images(&self) -> Vec<PathBuf> {
        self.fingerprints()
            .into_keys()
            .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
            .collect()
    }
}

/// A spec document. `extra` is appended under `spec:` (e.g. "  prune: true\n").
pub fn spec_yaml(
    name: &str,
    active: &Path,
    points: &[(String, Option<PathBuf>)],
    extra: &str,
) -> String {
    let points: Vec<(&str, Option<&Path>)> = points
        .iter()
        .map(|(n, f)| (n.as_str(), f.as_deref()))
        .collect();
    spec_yaml_source(name, &format!("file: {}", active.display()), &points, extra)
}

/// A spec document with `source` (one YAML line under `spec.source:`, e.g. `file: /x`).
pub fn spec_yaml_source(
    name: &str,
    source: &str,
    points: &[(&str, Option<&Path>)],
    extra: &str,
) -> String {
    let mut s = format!(
        "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: {name}\nspec:\n  source:\n    {source}\n"
    );
    if !points.is_empty() {
        s.push_str("  snapshots:\n");
        for (n, f) in points {
            s.push_str(&format!("    - name: {n}\n"));
            if let Some(f) = f {
                s.push_str(&format!("      file: {}\n", f.display()));
            }
        }
    }
    s.push_str(extra);
    s
}

/// Builds a chain of `n` layers named `{tag}-{i}.qcow2` with random whole-cluster writes (data
/// with a pattern never used before in the chain, or explicit zeros). `max_run` bounds each
/// write's length in clusters. Returns the layers, base first.
pub fn random_chain(
    env: &Env,
    rng: &mut StdRng,
    tag: &str,
    n: usize,
    clusters: u64,
    max_run: u64,
) -> Vec<PathBuf> {
    let mut layers: Vec<PathBuf> = Vec::new();
    let mut pattern = 0u32;
    for i in 0..n {
        let p = env.img(&format!("{tag}-{i}.qcow2"));
        create(
            &p,
            clusters * CLUSTER,
            layers.last().map(|b| (b.as_path(), "qcow2")),
            &[],
        );
        let mut cmds = Vec::new();
        for _ in 0..rng.random_range(0..6) {
            let start = rng.random_range(0..clusters);
            let len = rng.random_range(1..=(clusters - start).min(max_run));
            let (off, bytes) = (start * CLUSTER, len * CLUSTER);
            if rng.random_bool(0.3) {
                cmds.push(format!("write -z {off} {bytes}"));
            } else {
                pattern += 1;
                cmds.push(format!("write -P {} {off} {bytes}", pattern % 255 + 1));
            }
        }
        io(&p, "qcow2", &cmds);
        layers.push(p);
    }
    layers
}

/// The chain under `active` as `qemu-img info --backing-chain` reports it, base first.
pub fn backing_chain(active: &Path) -> Vec<PathBuf> {
    let out = run(Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(active));
    let v: Value = serde_json::from_str(&out).expect("qemu-img info prints JSON");
    let mut files: Vec<PathBuf> = v
        .as_array()
        .expect("an array")
        .iter()
        .map(|i| PathBuf::from(i["filename"].as_str().expect("filename")))
        .collect();
    files.reverse();
    files
}

/// Like [`backing_chain`], for polling while diskchain works on the chain: `None` when
/// `qemu-img info` fails. A take-over renames a layer over the active path, so a reader that
/// opened the old active file just before finds its backing file's name gone just after (the
/// old file is unlinked: no reader of the path ever sees a broken chain, but this one read two
/// moments).
pub fn try_backing_chain(active: &Path) -> Option<Vec<PathBuf>> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(active)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut files: Vec<PathBuf> = v
        .as_array()?
        .iter()
        .filter_map(|i| i["filename"].as_str().map(PathBuf::from))
        .collect();
    files.reverse();
    Some(files)
}

/// Runs `qemu-img check` on a qcow2 file; returns its exit code (0: clean, 2: errors, 3: leaks).
pub fn check(path: &Path) -> i32 {
    Command::new("qemu-img")
        .args(["check", "-U", "-q", "-f", "qcow2"])
        .arg(path)
        .status()
        .expect("run qemu-img check")
        .code()
        .unwrap_or(-1)
}

/// `base <- mid <- top <- act` under the root, 128 MiB virtual: base holds 16 MiB, mid 64 MiB,
/// top `top_mib` MiB (less than mid's, so that dropping mid while keeping base and top commits
/// top into mid: a step `--max-bytes-per-sec` can slow down). Returns the four layers.
pub fn mid_heavy_chain(env: &Env, top_mib: u64) -> Vec<PathBuf> {
    let names = ["base", "mid", "top", "act"];
    let writes = [
        "write -P 1 0 16M".to_string(),
        "write -P 2 32M 64M".into(),
        format!("write -P 3 100M {top_mib}M"),
    ];
    let mut layers: Vec<PathBuf> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let p = env.img(&format!("{n}.qcow2"));
        create(
            &p,
            128 << 20,
            layers.last().map(|b| (b.as_path(), "qcow2")),
            &[],
        );
        if let Some(w) = writes.get(i) {
            io(&p, "qcow2", std::slice::from_ref(w));
        }
        layers.push(p);
    }
    layers
}

/// `base` (8 MiB) <- `mid` (48 MiB) <- `top` (24 MiB hiding half of mid) under the root, 128 MiB
/// virtual: dropping mid while keeping base streams mid's other 24 MiB into top (cheaper than
/// committing all of mid). Returns the three layers.
pub fn half_hidden_chain(env: &Env) -> [PathBuf; 3] {
    let l = [
        env.img("base.qcow2"),
        env.img("mid.qcow2"),
        env.img("top.qcow2"),
    ];
    create(&l[0], 128 << 20, None, &[]);
    io(&l[0], "qcow2", &["write -P 1 0 8M".into()]);
    create(&l[1], 0, Some((&l[0], "qcow2")), &[]);
    io(&l[1], "qcow2", &["write -P 2 16M 48M".into()]);
    create(&l[2], 0, Some((&l[1], "qcow2")), &[]);
    io(&l[2], "qcow2", &["write -P 3 16M 24M".into()]);
    l
}

/// A spec for [`mid_heavy_chain`] keeping base and top (mid is dropped).
pub fn keep_base_and_top(name: &str, layers: &[PathBuf]) -> String {
    spec_yaml(
        name,
        &layers[3],
        &[
            ("base".into(), Some(layers[0].clone())),
            ("top".into(), Some(layers[2].clone())),
        ],
        "",
    )
}

/// Starts `apply EXTRA... -f SPEC` in its own process group and SIGKILLs the whole group (QEMU
/// tools included) once a step is running, then waits for the group to be gone. Returns true
/// when the kill landed mid-plan (a journal is left).
pub fn apply_killed_mid_step(env: &Env, spec: &Path, extra: &[&str]) -> bool {
    apply_killed_after(env, spec, extra, std::time::Duration::from_millis(20))
}

/// [`apply_killed_mid_step`], killing `delay` after a step started running.
pub fn apply_killed_after(
    env: &Env,
    spec: &Path,
    extra: &[&str],
    delay: std::time::Duration,
) -> bool {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    use std::time::Duration;
    let mut child = env
        .diskchain(&["apply"])
        .args(extra)
        .arg("-f")
        .arg(spec)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("run diskchain");
    // Journals live in a directory per namespace.
    let journals = env.state().join("journal");
    for _ in 0..5000 {
        let running = std::fs::read_dir(&journals).ok().is_some_and(|d| {
            d.flatten().any(|ns| {
                std::fs::read_dir(ns.path()).ok().is_some_and(|d| {
                    d.flatten().any(|e| {
                        std::fs::read_to_string(e.path())
                            .unwrap_or_default()
                            .contains("\"running\"")
                    })
                })
            })
        });
        if running || child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(delay);
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let killed = child.wait().expect("wait").code().is_none();
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while pgrep -g {} >/dev/null; do sleep 0.02; done",
            child.id()
        ))
        .status();
    killed
        && std::fs::read_dir(&journals).is_ok_and(|d| {
            d.flatten()
                .any(|ns| std::fs::read_dir(ns.path()).is_ok_and(|d| d.count() > 0))
        })
}
