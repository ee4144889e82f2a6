//! `diskchain agent` end to end: a real agent process against a temporary spec directory and real
//! images. Specs are added, edited (drop a point, add a snapshot, change placement), deleted and
//! replaced git-style; chains changed by hand are corrected or reported; `/metrics` parses and
//! `/healthz` answers during a long step; SIGKILL at random moments then a restart converges;
//! SIGTERM exits 0.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diskchain_tests::env::{
    Env, backing_chain, keep_base_and_top, mid_heavy_chain, random_chain, spec_yaml,
    try_backing_chain,
};
use diskchain_tests::qemu::{create, io, run, try_view_sha256, view_sha256};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn views(env: &Env, files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|f| view_sha256(f, "qcow2", env.dir.path()))
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running agent, killed when dropped.
struct Agent {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Agent {
    fn start(env: &Env, specs: &Path, extra: &[&str]) -> Agent {
        let port = free_port();
        let log = env.dir.path().join(format!("agent-{port}.log"));
        let child = env
            .diskchain(&[
                "--log-format",
                "json",
                "agent",
                "--resync",
                "1s",
                "--debounce",
                "200ms",
                "--listen",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--specs")
            .arg(specs)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let a = Agent { child, port, log };
        wait_until(Duration::from_secs(10), "the agent to listen", || {
            a.get("/healthz").is_some()
        });
        a
    }

    /// `GET path`: (status, body), or None when nothing answers.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Waits until the chain under `active` reads as `expected` (views, base first).
fn converges(env: &Env, active: &Path, expected: &[String], what: &str) {
    wait_until(Duration::from_secs(30), what, || {
        try_backing_chain(active).is_some_and(|chain| {
            chain.len() == expected.len()
                && chain
                    .iter()
                    .map(|f| try_view_sha256(f, "qcow2", env.dir.path()))
                    .collect::<Option<Vec<String>>>()
                    .as_deref()
                    == Some(expected)
        })
    });
}

#[test]
fn the_agent_converges_as_specs_come_and_go() {
    let env = Env::new();
    let specs = env.dir.path().join("specs");
    let mut rng = StdRng::seed_from_u64(41);
    let a = random_chain(&env, &mut rng, "a", 4, 16, 4);
    let va = views(&env, &a);
    let agent = Agent::start(&env, &specs, &[]);

    // Add: keep a1 only.
    env.spec(
        "a.yaml",
        &spec_yaml("a", &a[3], &[("one".into(), Some(a[1].clone()))], ""),
    );
    converges(
        &env,
        &a[3],
        &[va[1].clone(), va[3].clone()],
        "disk a to drop a0 and a2",
    );
    // Edit: add a snapshot.
    env.spec(
        "a.yaml",
        &spec_yaml(
            "a",
            &a[3],
            &[("one".into(), Some(a[1].clone())), ("fresh".into(), None)],
            "",
        ),
    );
    converges(
        &env,
        &a[3],
        &[va[1].clone(), va[3].clone(), va[3].clone()],
        "disk a to take a snapshot",
    );
    // Edit: drop the first point, move the rest to img/fast.
    let fast = env.img("fast");
    env.spec(
        "a.yaml",
        &spec_yaml(
            "a",
            &a[3],
            &[("fresh".into(), None)],
            &format!("  placement:\n    directory: {}\n", fast.display()),
        ),
    );
    converges(
        &env,
        &a[3],
        &[va[3].clone(), va[3].clone()],
        "disk a to drop a point",
    );
    wait_until(
        Duration::from_secs(30),
        "the point to move to img/fast",
        || try_backing_chain(&a[3]).is_some_and(|c| c[0].parent() == Some(fast.as_path())),
    );
    // Delete: the disk is released; nothing is deleted.
    let files_before = env.images();
    std::fs::remove_file(specs.join("a.yaml")).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        env.images(),
        files_before,
        "removing a spec deleted or created files"
    );
    assert!(agent.get("/healthz").is_some(), "the agent survives");

    // A git-style replacement of the whole directory brings a new disk.
    let b = random_chain(&env, &mut rng, "b", 3, 16, 4);
    let vb = views(&env, &b);
    let fresh_dir = env.dir.path().join("specs.new");
    std::fs::create_dir(&fresh_dir).unwrap();
    std::fs::write(fresh_dir.join("b.yaml"), spec_yaml("b", &b[2], &[], "")).unwrap();
    std::fs::rename(&specs, env.dir.path().join("specs.old")).unwrap();
    std::fs::rename(&fresh_dir, &specs).unwrap();
    converges(
        &env,
        &b[2],
        &[vb[2].clone()],
        "disk b from the replaced directory",
    );
    assert_eq!(
        backing_chain(&a[3]).len(),
        2,
        "the released disk was left alone"
    );
}

#[test]
fn drift_by_hand_is_corrected_or_reported() {
    let env = Env::new();
    let specs = env.dir.path().join("specs");
    let mut rng = StdRng::seed_from_u64(42);
    let l = random_chain(&env, &mut rng, "d", 3, 16, 4);
    let v = views(&env, &l);
    env.spec(
        "d.yaml",
        &spec_yaml("d", &l[2], &[("one".into(), Some(l[1].clone()))], ""),
    );
    let agent = Agent::start(&env, &specs, &[]);
    converges(
        &env,
        &l[2],
        &[v[1].clone(), v[2].clone()],
        "the first reconcile",
    );

    // Someone takes an external snapshot by hand: the unnamed point is merged away.
    let hand = env.img("hand.qcow2");
    std::fs::rename(&l[2], &hand).unwrap();
    create(&l[2], 0, Some((&hand, "qcow2")), &[]);
    io(&l[2], "qcow2", &["write -P 77 0 64k".into()]);
    let now = views(&env, &[l[2].clone()])[0].clone();
    converges(
        &env,
        &l[2],
        &[v[1].clone(), now.clone()],
        "the hand-made point to be merged",
    );

    // Someone pulls the kept point into the active layer: putting it back is impossible, so the
    // agent reports it and touches nothing.
    run(Command::new("qemu-img")
        .args(["rebase", "-f", "qcow2", "-b", ""])
        .arg(&l[2]));
    let before = env.fingerprints();
    let record = env.state().join("agent.json");
    wait_until(
        Duration::from_secs(10),
        "the lost point to be reported",
        || {
            let text = std::fs::read_to_string(&record).unwrap_or_default();
            text.contains("\"bad_input\"") && text.contains("not a backing layer")
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        env.fingerprints(),
        before,
        "the agent touched a disk it reported"
    );
    let (code, metrics) = agent.get("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("diskchain_reconciles_total{disk=\"d\",result=\"bad_input\"}"),
        "{metrics}"
    );
}

/// Every sample line of an OpenMetrics/Prometheus text exposition: `name{labels} value`.
fn assert_parses_as_prometheus_text(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            assert!(
                line.is_empty()
                    || line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line == "# EOF",
                "{line}"
            );
            continue;
        }
        let (name_labels, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = name_labels.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name: {line}"
        );
        if let Some(labels) = name_labels.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels: {line}"
            );
        }
        samples.push((name_labels.to_string(), value));
    }
    samples
}

#[test]
fn metrics_parse_and_healthz_answers_during_a_long_step() {
    let env = Env::new();
    let specs = env.dir.path().join("specs");
    let l = mid_heavy_chain(&env, 8);
    let act = l[3].clone();
    let v = views(&env, &[l[0].clone(), l[2].clone(), act.clone()]);
    // Dropping mid commits top (8 MiB) into it; throttled to 2 MB/s it takes about 4 s.
    env.spec("s.yaml", &keep_base_and_top("s", &l));
    let agent = Agent::start(&env, &specs, &["--max-bytes-per-sec", "2000000"]);
    wait_until(Duration::from_secs(10), "a step to run", || {
        env.step_running("s")
    });
    let t = Instant::now();
    let (code, body) = agent.get("/healthz").expect("healthz answers");
    assert_eq!((code, body.trim()), (200, "ok"));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "healthz took {:?} during a step",
        t.elapsed()
    );
    assert!(env.step_running("s"), "the step was still running");
    converges(&env, &act, &v, "the throttled plan");
    // Gauges are "as last observed": the pass after the reconcile sees the new chain.
    wait_until(
        Duration::from_secs(20),
        "the reconcile to be counted and the chain re-observed",
        || {
            agent.get("/metrics").is_some_and(|(_, m)| {
                m.contains("result=\"ok\"") && m.contains("diskchain_chain_length{disk=\"s\"} 3")
            })
        },
    );
    let (code, text) = agent.get("/metrics").unwrap();
    assert_eq!(code, 200);
    let samples = assert_parses_as_prometheus_text(&text);
    let value = |prefix: &str| {
        samples
            .iter()
            .find(|(n, _)| n.starts_with(prefix))
            .map(|(_, v)| *v)
    };
    assert_eq!(
        value("diskchain_reconciles_total{disk=\"s\",result=\"ok\"}"),
        Some(1.0)
    );
    assert!(value("diskchain_written_bytes_total{op=\"commit\"}").unwrap() >= 8.0 * 1048576.0);
    assert_eq!(value("diskchain_chain_length{disk=\"s\"}"), Some(3.0));
    assert_eq!(value("diskchain_drift{disk=\"s\"}"), Some(0.0));
    assert!(value("diskchain_step_duration_seconds_count{op=\"commit\"}").is_some());
    assert_eq!(agent.get("/readyz").unwrap().0, 200);
    // JSON logs: every line is an object; step lines name the disk and the step.
    let log = agent.log();
    let mut step_lines = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == "step done" {
            assert_eq!(v["fields"]["disk"], "s");
            assert!(v["fields"]["step"].is_number());
            step_lines += 1;
        }
    }
    assert!(step_lines >= 1, "{log}");
}

#[test]
fn sigkill_then_restart_converges_and_sigterm_exits_0() {
    let env = Env::new();
    let specs = env.dir.path().join("specs");
    let mut rng = StdRng::seed_from_u64(43);
    let mut layers: Vec<PathBuf> = Vec::new();
    for i in 0..5u64 {
        let p = env.img(&format!("k-{i}.qcow2"));
        create(
            &p,
            64 << 20,
            layers.last().map(|b| (b.as_path(), "qcow2")),
            &[],
        );
        io(
            &p,
            "qcow2",
            &[format!("write -P {} {} 8M", i + 1, (i % 4) * (16 << 20))],
        );
        layers.push(p);
    }
    let v = views(&env, &layers);
    env.spec(
        "k.yaml",
        &spec_yaml(
            "k",
            &layers[4],
            &[("p2".into(), Some(layers[2].clone())), ("new".into(), None)],
            "",
        ),
    );
    let journal = env.journal("k");
    for round in 0..3 {
        let mut agent = Agent::start(&env, &specs, &["--max-bytes-per-sec", "8000000"]);
        wait_until(Duration::from_secs(10), "a plan in flight or done", || {
            journal.exists() || try_backing_chain(&layers[4]).is_some_and(|c| c.len() == 3)
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(0..800)));
        agent.signal("KILL");
        let _ = agent.child.wait();
        // Its qemu-img, if any, runs on; wait for it to finish so its lock is released.
        let _ = Command::new("sh")
            .arg("-c")
            .arg("while pgrep -f \"[q]emu-img.*k-\" >/dev/null; do sleep 0.05; done")
            .status();
        let _ = round;
    }
    let mut agent = Agent::start(&env, &specs, &[]);
    converges(
        &env,
        &layers[4],
        &[v[2].clone(), v[4].clone(), v[4].clone()],
        "convergence after kills",
    );
    agent.signal("TERM");
    let t = Instant::now();
    let status = agent.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(agent.log().contains("agent stopped"));
}

#[test]
fn sigterm_during_a_step_stops_at_a_resumable_point_and_exits_0() {
    let env = Env::new();
    let specs = env.dir.path().join("specs");
    let l = mid_heavy_chain(&env, 16);
    let act = l[3].clone();
    let v = views(&env, &[l[0].clone(), l[2].clone(), act.clone()]);
    // Dropping mid commits top (16 MiB) into it; at 2 MB/s that takes about 8 s.
    env.spec("s.yaml", &keep_base_and_top("s", &l));
    let mut agent = Agent::start(
        &env,
        &specs,
        &["--max-bytes-per-sec", "2000000", "--grace", "1s"],
    );
    let journal = env.journal("s");
    wait_until(Duration::from_secs(10), "a step to run", || {
        env.step_running("s")
    });
    agent.signal("TERM");
    let t = Instant::now();
    let status = agent.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0: {}", agent.log());
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "the grace period bounds the shutdown: {:?}",
        t.elapsed()
    );
    assert!(journal.exists(), "the interrupted plan stays journaled");
    let _ = Command::new("sh")
        .arg("-c")
        .arg("while pgrep -x qemu-img >/dev/null; do sleep 0.05; done")
        .status();
    let _agent = Agent::start(&env, &specs, &[]);
    converges(&env, &act, &v, "the resumed plan");
    wait_until(
        Duration::from_secs(10),
        "the journal to be finished",
        || !journal.exists(),
    );
}

#[test]
fn a_hundred_specs_converge() {
    let env = Env::new();
    let specs = env.dir.path().join("specs");
    let mut expected = Vec::new();
    for d in 0..100 {
        let base = env.img(&format!("d{d}-base.qcow2"));
        create(&base, 1 << 20, None, &[]);
        io(
            &base,
            "qcow2",
            &[format!("write -P {} 0 128k", d % 200 + 1)],
        );
        let top = env.img(&format!("d{d}.qcow2"));
        create(&top, 0, Some((&base, "qcow2")), &[]);
        env.spec(
            &format!("d{d}.yaml"),
            &spec_yaml(&format!("d{d}"), &top, &[("snap".into(), None)], ""),
        );
        expected.push(top);
    }
    let _agent = Agent::start(&env, &specs, &["--max-parallel", "4"]);
    wait_until(Duration::from_secs(90), "100 disks to converge", || {
        expected.iter().all(|t| {
            try_backing_chain(t).is_some_and(|c| {
                c.len() == 2
                    && c[0]
                        != env.img(&format!(
                            "{}-base.qcow2",
                            t.file_stem().unwrap().to_string_lossy()
                        ))
            })
        })
    });
}

/// F10, F17: a FIFO appearing in the spec directory never wedges the agent: it is reported, a
/// spec change made after it is still applied (once, despite a symlink loop), and SIGTERM still
/// ends the agent.
#[test]
fn a_fifo_in_the_spec_directory_never_wedges_the_agent() {
    let env = Env::new();
    let specs = env.dir.path().join("specs");
    let mut rng = StdRng::seed_from_u64(47);
    let a = random_chain(&env, &mut rng, "f", 3, 16, 4);
    let va = views(&env, &a);
    // A symlink loop and a symlink to the whole tree are neither walked nor watched.
    std::os::unix::fs::symlink(".", specs.join("loop")).unwrap();
    std::os::unix::fs::symlink("/", specs.join("everything")).unwrap();
    let mut agent = Agent::start(&env, &specs, &[]);
    let made = Command::new("mkfifo")
        .arg(specs.join("zz.yaml"))
        .status()
        .unwrap();
    assert!(made.success());
    wait_until(Duration::from_secs(10), "the FIFO to be reported", || {
        agent.log().contains("FIFO")
    });
    // A spec added after the FIFO is acted on.
    env.spec(
        "f.yaml",
        &spec_yaml("f", &a[2], &[("one".into(), Some(a[1].clone()))], ""),
    );
    converges(
        &env,
        &a[2],
        &[va[1].clone(), va[2].clone()],
        "disk f to drop f-0 despite the FIFO",
    );
    let (code, _) = agent.get("/readyz").expect("readyz answers");
    assert_eq!(code, 200);
    agent.signal("TERM");
    let t = Instant::now();
    let status = agent.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// F10: a pass stuck on something that never answers (here a libvirt socket that accepts and
/// stays silent, as a hung libvirtd does) turns /readyz not-ready after --stuck-after, is logged,
/// and SIGTERM still ends the agent promptly.
#[test]
fn a_stuck_pass_turns_readyz_not_ready_and_sigterm_still_ends_the_agent() {
    let env = Env::new();
    let specs = env.dir.path().join("specs");
    let sock = env.dir.path().join("hung-libvirtd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // Accept and hold every connection without a word.
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in listener.incoming() {
            match c {
                Ok(c) => conns.push(c),
                Err(_) => break,
            }
        }
    });
    env.spec(
        "h.yaml",
        &format!(
            "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: h\nspec:\n  source:\n    libvirt:\n      domain: hung\n      target: vda\n      uri: \"qemu:///system?socket={}\"\n",
            sock.display()
        ),
    );
    // The operator allows this URI (a spec alone cannot name a socket).
    let uri = format!("qemu:///system?socket={}", sock.display());
    let mut agent = Agent::start(
        &env,
        &specs,
        &["--stuck-after", "2s", "--allowed-libvirt-uri", &uri],
    );
    wait_until(
        Duration::from_secs(20),
        "/readyz to report the stuck pass",
        || {
            agent
                .get("/readyz")
                .is_some_and(|(code, body)| code == 503 && body.contains("stuck"))
        },
    );
    assert_eq!(
        agent.get("/healthz").map(|(c, _)| c),
        Some(200),
        "the process itself is alive"
    );
    wait_until(
        Duration::from_secs(10),
        "the stuck pass to be logged",
        || agent.log().contains("stuck"),
    );
    agent.signal("TERM");
    let t = Instant::now();
    let status = agent.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "SIGTERM ended a stuck agent in {:?}",
        t.elapsed()
    );
    drop(held);
}

/// F13, item 2: a commit interrupted inside a file the spec now keeps as a point cannot be
/// finished or set aside without the operator. `plan` and `apply` say so with the way out; the
/// agent reports it once and stops retrying while the spec and journal stay as they are; after
/// `diskchain set-aside` it carries on, with the points the commit did not touch intact.
#[test]
fn a_stuck_journal_is_reported_once_and_set_aside_by_the_operator() {
    use diskchain_tests::env::apply_killed_mid_step;
    let mut landed = false;
    for _ in 0..4 {
        let env = Env::new();
        let specs = env.dir.path().join("specs");
        let l: Vec<PathBuf> = ["golden", "mid", "top", "vm"]
            .iter()
            .map(|n| env.img(&format!("{n}.qcow2")))
            .collect();
        create(&l[0], 1 << 30, None, &[]);
        io(&l[0], "qcow2", &["write -P 1 0 64M".into()]);
        create(&l[1], 0, Some((&l[0], "qcow2")), &[]);
        io(&l[1], "qcow2", &["write -P 2 100M 200M".into()]);
        create(&l[2], 0, Some((&l[1], "qcow2")), &[]);
        io(&l[2], "qcow2", &["write -P 3 400M 48M".into()]);
        create(&l[3], 0, Some((&l[2], "qcow2")), &[]);
        io(&l[3], "qcow2", &["write -P 4 500M 1M".into()]);
        let v = views(&env, &l);
        // Drop mid: committing top (48 MiB) into it is cheaper than streaming mid (200 MiB).
        let keep = |names: &[usize]| -> Vec<(String, Option<PathBuf>)> {
            names
                .iter()
                .map(|&i| (["golden", "mid", "top"][i].to_string(), Some(l[i].clone())))
                .collect()
        };
        let v1 = env.spec("d.yaml", &spec_yaml("d", &l[3], &keep(&[0, 2]), ""));
        if !apply_killed_mid_step(&env, &v1, &["--max-bytes-per-sec", "16000000"]) {
            continue;
        }
        let journal = std::fs::read_to_string(env.journal("d")).unwrap();
        if !journal.contains("\"running\"") || !journal.contains("commit") {
            continue;
        }
        landed = true;
        // Now the spec keeps mid too: the interrupted commit was writing into it.
        let v2 = env.spec("d.yaml", &spec_yaml("d", &l[3], &keep(&[0, 1, 2]), ""));
        let plan = env.diskchain(&["plan", "-f"]).arg(&v2).output().unwrap();
        let text = String::from_utf8_lossy(&plan.stdout);
        assert!(
            text.contains("without you") && text.contains("set-aside --disk d"),
            "plan names the way out: {text}"
        );
        let out = env.apply(&v2, &[]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("set-aside --disk d"));
        let status = env.diskchain(&["status"]).output().unwrap();
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(
            text.contains("needs you") && text.contains("set-aside --disk d"),
            "status names the way out: {text}"
        );

        let agent = Agent::start(&env, &specs, &[]);
        wait_until(
            Duration::from_secs(20),
            "needs_operator in agent.json",
            || {
                std::fs::read_to_string(env.state().join("agent.json"))
                    .unwrap_or_default()
                    .contains("needs_operator")
            },
        );
        std::thread::sleep(Duration::from_secs(4));
        let reported = agent.log().matches("the disk needs you").count();
        assert_eq!(reported, 1, "reported once, not retried: {}", agent.log());

        let out = env
            .diskchain(&["set-aside", "--disk", "d"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until(Duration::from_secs(30), "the agent to carry on", || {
            let rec = std::fs::read_to_string(env.state().join("agent.json")).unwrap_or_default();
            !rec.contains("needs_operator") && !env.journal("d").exists()
        });
        let status = env.diskchain(&["status"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&status.stdout).contains("needs you"));
        // golden, top and the active view never changed; mid is what the operator accepted.
        assert_eq!(views(&env, &[l[0].clone()]), vec![v[0].clone()]);
        let chain = backing_chain(&l[3]);
        assert_eq!(chain.len(), 4, "{chain:?}");
        assert_eq!(views(&env, &[chain[2].clone()]), vec![v[2].clone()]);
        assert_eq!(views(&env, &[l[3].clone()]), vec![v[3].clone()]);
        break;
    }
    assert!(landed, "no kill landed inside the commit");
}

/// Finding o_: the agent resumes what `apply` would resume. A placement plan whose snapshot
/// step failed (the image directory was immutable) after its stream had moved the chain leaves
/// the spec's `file:` binding pointing at the old place, so planning again fails; the agent
/// must still finish the journaled plan, as `apply` does.
#[test]
fn the_agent_resumes_a_journal_whose_moves_outdated_the_spec_bindings() {
    /// `chattr +i` on a directory, undone when dropped.
    struct Immutable(PathBuf);
    impl Drop for Immutable {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
    let env = Env::new();
    let specs = env.dir.path().join("specs");
    let l: Vec<PathBuf> = ["base", "l1", "top"]
        .iter()
        .map(|n| env.img(&format!("{n}.qcow2")))
        .collect();
    create(&l[0], 64 << 20, None, &[]);
    io(&l[0], "qcow2", &["write -P 1 0 6M".into()]);
    create(&l[1], 0, Some((&l[0], "qcow2")), &[]);
    io(&l[1], "qcow2", &["write -P 2 8M 6M".into()]);
    create(&l[2], 0, Some((&l[1], "qcow2")), &[]);
    io(&l[2], "qcow2", &["write -P 3 20M 1M".into()]);
    let v = views(&env, &l);
    let moved = env.img("moved");
    std::fs::create_dir(&moved).unwrap();
    let spec = env.spec(
        "d.yaml",
        &spec_yaml(
            "d",
            &l[2],
            &[("golden".into(), Some(l[0].clone())), ("snap".into(), None)],
            &format!("  placement:\n    directory: {}\n", moved.display()),
        ),
    );
    {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(env.root())
            .status()
            .unwrap();
        assert!(ok.success(), "chattr +i");
        let _guard = Immutable(env.root());
        let out = env.apply(&spec, &[]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(env.journal("d").exists());
    let plan = env.plan(&spec);
    assert_eq!(
        plan.status.code(),
        Some(2),
        "planning again fails on the binding"
    );
    let _agent = Agent::start(&env, &specs, &[]);
    wait_until(
        Duration::from_secs(30),
        "the agent to finish the plan",
        || !env.journal("d").exists(),
    );
    let chain = backing_chain(&l[2]);
    assert_eq!(chain.len(), 3, "{chain:?}");
    assert!(chain[0].starts_with(&moved), "{chain:?}");
    assert_eq!(
        views(&env, &chain),
        vec![v[0].clone(), v[2].clone(), v[2].clone()]
    );
}

/// Issue 10, item 4: SIGTERM during a throttled stream (a `block-stream` job in a
/// `qemu-storage-daemon`): the grace period runs out, the daemon is told to stop and cancels the
/// job, the agent exits 0 with the plan journaled and no daemon left behind holding the images;
/// the next start finishes it with every view intact.
#[test]
fn sigterm_during_a_throttled_stream_cancels_it_and_the_next_start_finishes() {
    let env = Env::new();
    let specs = env.dir.path().join("specs");
    // Dropping mid streams its 24 MiB that top does not hide: about 12 s at 2 MB/s.
    let [base, _, top] = diskchain_tests::env::half_hidden_chain(&env);
    let v = views(&env, &[base.clone(), top.clone()]);
    env.spec(
        "s.yaml",
        &spec_yaml("s", &top, &[("p0".into(), Some(base.clone()))], ""),
    );
    // A qemu-storage-daemon working on this test's images (others may run beside it).
    let daemon_running = || {
        Command::new("pgrep")
            .arg("-f")
            .arg(format!("qemu-storage-daemon.*{}", top.display()))
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut agent = Agent::start(
        &env,
        &specs,
        &["--max-bytes-per-sec", "2000000", "--grace", "1s"],
    );
    let journal = env.journal("s");
    wait_until(Duration::from_secs(10), "the stream to run", || {
        env.step_running("s") && daemon_running()
    });
    agent.signal("TERM");
    let status = agent.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0: {}", agent.log());
    assert!(journal.exists(), "the interrupted plan stays journaled");
    wait_until(Duration::from_secs(10), "the daemon to be gone", || {
        !daemon_running()
    });
    assert_eq!(
        views(&env, &[base.clone(), top.clone()]),
        v,
        "views after the stop"
    );
    let _agent = Agent::start(&env, &specs, &[]);
    converges(&env, &top, &v, "the resumed plan");
    wait_until(
        Duration::from_secs(10),
        "the journal to be finished",
        || !journal.exists(),
    );
}

/// Two specs named alike in two namespaces are two disks to the agent too: both converge, each
/// with its own record, and `status` pairs each with the agent's own result for it.
#[test]
fn the_agent_keeps_one_name_in_two_namespaces_apart() {
    let env = Env::new();
    let specs = env.dir.path().join("ns-specs");
    std::fs::create_dir(&specs).unwrap();
    let mut tops = Vec::new();
    for (i, ns) in ["team-a", "team-b"].iter().enumerate() {
        let [b, m, t] = ["base", "mid", "top"].map(|n| env.img(&format!("{ns}-{n}.qcow2")));
        create(&b, 16 << 20, None, &[]);
        io(&b, "qcow2", &[format!("write -P {} 0 2M", 10 + i)]);
        create(&m, 0, Some((&b, "qcow2")), &[]);
        io(&m, "qcow2", &[format!("write -P {} 1M 64k", 20 + i)]);
        create(&t, 0, Some((&m, "qcow2")), &[]);
        io(&t, "qcow2", &[format!("write -P {} 2M 64k", 30 + i)]);
        let expected = views(&env, &[m.clone(), t.clone()]);
        let y = spec_yaml("vda", &t, &[("p".into(), Some(m.clone()))], "").replace(
            "  name: vda\n",
            &format!("  name: vda\n  namespace: {ns}\n"),
        );
        std::fs::write(specs.join(format!("{ns}.yaml")), y).unwrap();
        tops.push((ns.to_string(), t, expected));
    }
    let agent = Agent::start(&env, &specs, &[]);
    for (ns, t, expected) in &tops {
        converges(&env, t, expected, ns);
    }
    wait_until(Duration::from_secs(30), "both disks in sync", || {
        let out = env.diskchain(&["status", "-o", "json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let disks = v["disks"].as_array().cloned().unwrap_or_default();
        disks.len() == 2
            && disks.iter().zip(&tops).all(|(d, (ns, t, _))| {
                d["namespace"] == ns.as_str()
                    && d["active"] == t.to_str().unwrap()
                    && d["agent"]["namespace"] == ns.as_str()
                    && d["agent"]["result"] == "in_sync"
            })
    });
    let (_, metrics) = agent.get("/metrics").unwrap();
    for ns in ["team-a", "team-b"] {
        assert!(metrics.contains(&format!("disk=\"{ns}/vda\"")), "{metrics}");
    }
    // Each step's bytes reach the metrics (the agent's observer of the reconcile).
    let written: f64 = assert_parses_as_prometheus_text(&metrics)
        .iter()
        .filter(|(name, _)| name.starts_with("diskchain_written_bytes_total"))
        .map(|(_, v)| v)
        .sum();
    assert!(written >= 2.0 * 65536.0, "{metrics}");
}

/// Issue 11: two offline disks share a base and both move their point into one placement
/// directory. The agent works on the first (a throttled copy of the base); the second's spec
/// arrives while it runs, and then an `apply` of a third disk on the same base runs beside the
/// agent. Every step locks the files it writes and reads, so no file is written by two at once:
/// every disk converges with its point in the directory reading as the base did, every guest
/// view as before, every image clean.
#[test]
fn disks_sharing_a_base_moved_by_the_agent_and_apply_at_once_never_collide() {
    let env = Env::new();
    let specs = env.dir.path().join("share-specs");
    std::fs::create_dir(&specs).unwrap();
    let base = env.img("base.qcow2");
    create(&base, 64 << 20, None, &[]);
    io(&base, "qcow2", &["write -P 9 0 16M".into()]);
    let golden = views(&env, std::slice::from_ref(&base)).remove(0);
    let fast = env.img("fast");
    std::fs::create_dir(&fast).unwrap();
    let mut disks = Vec::new();
    for (i, d) in ["a", "b", "c"].iter().enumerate() {
        let top = env.img(&format!("{d}.qcow2"));
        create(&top, 0, Some((&base, "qcow2")), &[]);
        io(&top, "qcow2", &[format!("write -P {} 32M 64k", 20 + i)]);
        let view = views(&env, std::slice::from_ref(&top)).remove(0);
        let y = spec_yaml(
            d,
            &top,
            &[("golden".into(), Some(base.clone()))],
            &format!("  placement:\n    directory: {}\n", fast.display()),
        );
        disks.push((d.to_string(), top, view, y));
    }
    std::fs::write(specs.join("a.yaml"), &disks[0].3).unwrap();
    // 16 MiB at 4 MB/s: each copy of the base takes about 4 s.
    let agent = Agent::start(&env, &specs, &["--max-bytes-per-sec", "4000000"]);
    assert!(
        env.wait_for_step("a", Duration::from_secs(20), || false),
        "the agent never started a's step"
    );
    // b drifts while a's copy runs; c is applied by hand beside the agent.
    std::fs::write(specs.join("b.yaml"), &disks[1].3).unwrap();
    let c_spec = env.spec("c.yaml", &disks[2].3);
    let apply_c = || {
        env.diskchain(&["apply", "--max-bytes-per-sec", "4000000", "-f"])
            .arg(&c_spec)
            .output()
            .unwrap()
    };
    // While a step of the agent reads the base, `apply` of c is refused, untouched, saying that
    // diskchain itself holds it (its QEMU lock cannot tell a copy from a VM); once the agent's
    // steps are done, it goes through.
    let mut c = apply_c();
    let mut tries = 0;
    while c.status.code() == Some(1) && tries < 60 {
        let err = String::from_utf8_lossy(&c.stderr);
        assert!(
            err.contains("being read or written by a diskchain step of another disk"),
            "apply c: {err}"
        );
        tries += 1;
        std::thread::sleep(Duration::from_millis(500));
        c = apply_c();
    }
    assert_eq!(
        c.status.code(),
        Some(0),
        "apply c: {}",
        String::from_utf8_lossy(&c.stderr)
    );
    for (d, top, view, _) in &disks[..2] {
        wait_until(Duration::from_secs(90), d, || {
            try_backing_chain(top).is_some_and(|ch| ch.len() == 2 && ch[0].starts_with(&fast))
        });
        let chain = backing_chain(top);
        assert_eq!(views(&env, &chain[..1])[0], golden, "{d}: its point");
        assert_eq!(
            &views(&env, std::slice::from_ref(top))[0],
            view,
            "{d}: its view"
        );
    }
    let chain = backing_chain(&disks[2].1);
    assert!(chain[0].starts_with(&fast), "c: {chain:?}");
    assert_eq!(views(&env, &chain[..1])[0], golden, "c: its point");
    assert_eq!(
        views(&env, std::slice::from_ref(&disks[2].1))[0],
        disks[2].2
    );
    drop(agent);
    env.assert_images_clean("after three moves of one base");
}

/// A second spec that reaches a disk the agent is working on through another path (a symlink to
/// its active image) is refused as claiming that disk, while the first disk's plan runs and
/// after: it never plans against a chain another reconcile is changing.
#[test]
fn a_spec_claiming_a_disk_the_agent_is_working_on_is_refused() {
    let env = Env::new();
    let specs = env.dir.path().join("claim-specs");
    std::fs::create_dir(&specs).unwrap();
    let base = env.img("base.qcow2");
    create(&base, 64 << 20, None, &[]);
    io(&base, "qcow2", &["write -P 9 0 16M".into()]);
    let top = env.img("a.qcow2");
    create(&top, 0, Some((&base, "qcow2")), &[]);
    io(&top, "qcow2", &["write -P 3 32M 64k".into()]);
    let golden = views(&env, std::slice::from_ref(&base)).remove(0);
    let view = views(&env, std::slice::from_ref(&top)).remove(0);
    let fast = env.img("fast");
    std::fs::create_dir(&fast).unwrap();
    let a = spec_yaml(
        "a",
        &top,
        &[("golden".into(), Some(base.clone()))],
        &format!("  placement:\n    directory: {}\n", fast.display()),
    );
    std::fs::write(specs.join("a.yaml"), &a).unwrap();
    // 16 MiB at 2 MB/s: the copy of the base takes about 8 s.
    let agent = Agent::start(&env, &specs, &["--max-bytes-per-sec", "2000000"]);
    assert!(
        env.wait_for_step("a", Duration::from_secs(20), || false),
        "the agent never started a's step"
    );
    let link = env.img("link.qcow2");
    std::os::unix::fs::symlink(&top, &link).unwrap();
    std::fs::write(specs.join("b.yaml"), spec_yaml("b", &link, &[], "")).unwrap();
    let record = env.state().join("agent.json");
    wait_until(
        Duration::from_secs(10),
        "b to be refused as claiming a's disk while a's step runs",
        || {
            let text = std::fs::read_to_string(&record).unwrap_or_default();
            text.contains("already claims")
        },
    );
    assert!(
        env.step_running("a"),
        "a's step ended before b was judged: the test proves nothing"
    );
    wait_until(Duration::from_secs(60), "a to converge", || {
        try_backing_chain(&top).is_some_and(|ch| ch.len() == 2 && ch[0].starts_with(&fast))
    });
    std::thread::sleep(Duration::from_millis(1500));
    let chain = backing_chain(&top);
    assert_eq!(chain.len(), 2, "b flattened a's disk: {chain:?}");
    assert_eq!(views(&env, &chain[..1])[0], golden, "a's point");
    assert_eq!(views(&env, std::slice::from_ref(&top))[0], view, "a's view");
    assert!(!env.journal("b").exists(), "b ran a plan on a's disk");
    drop(agent);
    env.assert_images_clean("after a refused claim");
}

/// The points listed in repository `repo`'s manifest.
fn manifest_points(repo: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(repo.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|m| m["points"].as_array().cloned())
        .unwrap_or_default()
}

/// A disk (a 64 MiB base with data under an empty overlay) whose spec backs it up into
/// `img/backups/NAME` with `backup` (YAML lines under `backup:`, the repository added).
fn backed_up_disk(env: &Env, specs: &Path, name: &str, backup: &str) -> (PathBuf, PathBuf) {
    let base = env.img(&format!("{name}-base.qcow2"));
    create(&base, 64 << 20, None, &[]);
    io(&base, "qcow2", &["write -P 1 0 4M".into()]);
    let top = env.img(&format!("{name}.qcow2"));
    create(&top, 0, Some((&base, "qcow2")), &[]);
    let repo = env.img(&format!("backups/{name}"));
    let mut extra = format!("  backup:\n    repository: {}\n", repo.display());
    for l in backup.lines() {
        extra.push_str(&format!("    {l}\n"));
    }
    let y = spec_yaml(name, &top, &[("golden".into(), Some(base))], &extra);
    std::fs::write(specs.join(format!("{name}.yaml")), y).unwrap();
    (top, repo)
}

/// A backup missed while the agent was down (the newest point is older than the schedule's last
/// occurrence) runs once when the agent starts, not once per missed occurrence; `status` and
/// `/metrics` show the points and the next due time.
#[test]
fn a_backup_missed_while_the_agent_was_down_runs_once_at_start() {
    let env = Env::new();
    let specs = env.dir.path().join("backup-specs");
    std::fs::create_dir(&specs).unwrap();
    let (top, repo) = backed_up_disk(&env, &specs, "vdb", "schedule: \"0 2 * * *\"");
    env.run_ok(&["backup"], &specs);
    // As if that backup had been taken three days ago.
    let path = repo.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let t = m["points"][0]["time_unix"].as_i64().unwrap();
    m["points"][0]["time_unix"] = (t - 3 * 86_400).into();
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    io(&top, "qcow2", &["write -P 5 8M 64k".into()]);
    let agent = Agent::start(&env, &specs, &[]);
    wait_until(Duration::from_secs(30), "the missed backup", || {
        manifest_points(&repo).len() == 2
    });
    let points = manifest_points(&repo);
    assert_eq!(points[1]["kind"], "incremental");
    // The disk had no record yet, so the agent also reconciles it (to record it): never beside
    // its backup, which would have failed on the disk's lock and waited two minutes.
    assert!(
        !agent.log().contains("scheduled backup failed")
            && !agent.log().contains("reconcile failed"),
        "{}",
        agent.log()
    );
    // Due once, not three times: nothing more comes.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        manifest_points(&repo).len(),
        2,
        "more than one catch-up backup"
    );
    let (_, metrics) = agent.get("/metrics").unwrap();
    assert!(
        metrics.contains("diskchain_backup_points{disk=\"vdb\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("diskchain_backups_total{disk=\"vdb\",result=\"incremental\"} 1"),
        "{metrics}"
    );
    let status = env.diskchain(&["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("backups: 2 point(s)"), "{text}");
    assert!(text.contains("next due"), "{text}");
    drop(agent);
    env.assert_images_clean("after a scheduled backup");
}

/// With an every-minute schedule the agent takes a full, then incrementals; a scheduled deep
/// verify finds the repository sound.
#[test]
fn scheduled_backups_and_verifies_run_when_due() {
    let env = Env::new();
    let specs = env.dir.path().join("backup-specs");
    std::fs::create_dir(&specs).unwrap();
    let (top, repo) = backed_up_disk(
        &env,
        &specs,
        "vdc",
        "schedule: \"* * * * *\"\nverify:\n  schedule: \"* * * * *\"",
    );
    let agent = Agent::start(&env, &specs, &[]);
    wait_until(
        Duration::from_secs(75),
        "the first scheduled backup",
        || !manifest_points(&repo).is_empty(),
    );
    assert_eq!(manifest_points(&repo)[0]["kind"], "full");
    io(&top, "qcow2", &["write -P 6 12M 64k".into()]);
    wait_until(
        Duration::from_secs(75),
        "the second scheduled backup",
        || manifest_points(&repo).len() >= 2,
    );
    assert_eq!(manifest_points(&repo)[1]["kind"], "incremental");
    let record = env.state().join("agent.json");
    wait_until(Duration::from_secs(75), "a scheduled verify", || {
        std::fs::read_to_string(&record)
            .unwrap_or_default()
            .contains("\"verify_ok\": true")
    });
    drop(agent);
}

/// A lowered retention is merged by the agent once it sees the new spec, not at the next
/// scheduled backup (a day away, here): the operator lowered it to get the space back.
#[test]
fn a_lowered_retention_is_merged_without_waiting_for_the_next_backup() {
    let env = Env::new();
    let specs = env.dir.path().join("backup-specs");
    std::fs::create_dir(&specs).unwrap();
    let (top, repo) = backed_up_disk(&env, &specs, "vdr", "schedule: \"0 2 * * *\"");
    for i in 0..4u8 {
        io(
            &top,
            "qcow2",
            &[format!("write -P {} {}M 1M", 20 + i, 8 + i)],
        );
        env.run_ok(&["backup"], &specs);
    }
    assert_eq!(manifest_points(&repo).len(), 4);
    let newest = manifest_points(&repo)[3]["point"].clone();
    let agent = Agent::start(&env, &specs, &[]);
    // The agent runs with the policy as it was: nothing to merge, no backup due.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(manifest_points(&repo).len(), 4);
    // The operator lowers it.
    let path = specs.join("vdr.yaml");
    let y = std::fs::read_to_string(&path).unwrap().replace(
        "    schedule: \"0 2 * * *\"\n",
        "    schedule: \"0 2 * * *\"\n    retention:\n      keepLast: 1\n",
    );
    std::fs::write(&path, y).unwrap();
    wait_until(
        Duration::from_secs(30),
        "the lowered retention merged",
        || manifest_points(&repo).len() == 1,
    );
    assert_eq!(
        manifest_points(&repo)[0]["point"],
        newest,
        "the newest point is kept"
    );
    let files = std::fs::read_dir(&repo)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".qcow2")
        })
        .count();
    assert_eq!(files, 1, "the merged-away files are deleted");
    let out = env
        .diskchain(&["verify", "--deep", "-f"])
        .arg(&specs)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(agent);
    env.assert_images_clean("after a lowered retention");
}

/// A relative `--specs` path (as a user types `--specs demo/specs`) is watched like an absolute
/// one: a new spec is acted on at once, not at the next resync (here an hour away).
#[test]
fn a_relative_spec_directory_is_watched() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(7);
    let a = random_chain(&env, &mut rng, "r", 3, 16, 4);
    let va = views(&env, &a);
    let port = free_port();
    let log = env.dir.path().join("agent.log");
    let mut child = env
        .diskchain(&["agent", "--resync", "1h", "--debounce", "200ms", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--specs", "specs"])
        .current_dir(env.dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // The first pass (an empty directory) is over once the agent is ready.
    wait_until(Duration::from_secs(20), "the agent to be ready", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
            let _ = write!(
                s,
                "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            let mut t = String::new();
            let _ = s.read_to_string(&mut t);
            t.contains(" 200 ")
        })
    });
    env.spec(
        "r.yaml",
        &spec_yaml("r", &a[2], &[("one".into(), Some(a[1].clone()))], ""),
    );
    converges(
        &env,
        &a[2],
        &[va[1].clone(), va[2].clone()],
        "the new spec to be acted on",
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// `diskchain status` without `--allowed-root` reads the chains with the roots the agent runs
/// with (it said "no allowed root exists" for every disk).
#[test]
fn status_reads_chains_with_the_roots_the_agent_records() {
    let env = Env::new();
    let specs = env.dir.path().join("specs");
    let mut rng = StdRng::seed_from_u64(9);
    let a = random_chain(&env, &mut rng, "s", 2, 16, 4);
    let va = views(&env, &a);
    env.spec(
        "s.yaml",
        &spec_yaml("s", &a[1], &[("one".into(), Some(a[0].clone()))], ""),
    );
    let agent = Agent::start(&env, &specs, &[]);
    converges(&env, &a[1], &va, "disk s to be adopted");
    wait_until(Duration::from_secs(20), "status to show the chain", || {
        let out = Command::new(diskchain_tests::qemu::diskchain_bin())
            .arg("--state-dir")
            .arg(env.state())
            .args(["status", "-o", "json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["disks"][0]["chain"]
            .as_array()
            .is_some_and(|c| c.len() == 2)
    });
    drop(agent);
}
