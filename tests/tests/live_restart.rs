//! A live block job survives a SIGKILL of the agent and a restart of libvirtd: the restarted
//! agent finds the job in libvirt's own state, waits for it across the daemon's restart, and
//! completes the plan. (Its own test binary: restarting libvirtd must not disturb other live
//! tests.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use diskchain_tests::env::{Env, spec_yaml_source};
use diskchain_tests::libvirt::{Domain, URI, live_view, open_up, sha};
use diskchain_tests::qemu::{create, io};

const MIB: u64 = 1 << 20;

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn restart_libvirtd() {
    let _ = Command::new("pkill")
        .args(["-TERM", "-x", "libvirtd"])
        .status();
    let running = || {
        Command::new("pgrep")
            .args(["-x", "libvirtd"])
            .status()
            .is_ok_and(|s| s.success())
    };
    // A clean stop waits for libvirtd's in-flight calls; on a loaded machine that can take
    // long. Domains and their block jobs live in QEMU and survive a killed libvirtd just the
    // same, so after 5 s the restart is made with SIGKILL.
    let t = Instant::now();
    while running() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if running() {
        let _ = Command::new("pkill")
            .args(["-KILL", "-x", "libvirtd"])
            .status();
    }
    wait_for("libvirtd to stop", 30, || !running());
    let st = Command::new("libvirtd")
        .arg("-d")
        .status()
        .expect("start libvirtd");
    assert!(st.success(), "libvirtd -d failed");
    wait_for("libvirtd to answer", 30, || {
        Command::new("virsh")
            .args(["-c", URI, "version"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
}

fn layer(env: &Env, name: &str, backing: Option<&Path>, writes: &[(u8, u64, u64)]) -> PathBuf {
    let p = env.img(&format!("{name}.qcow2"));
    create(&p, 64 * MIB, backing.map(|b| (b, "qcow2")), &[]);
    let cmds: Vec<String> = writes
        .iter()
        .map(|(pat, off, len)| format!("write -P {pat} {} {}", off * MIB, len * MIB))
        .collect();
    io(&p, "qcow2", &cmds);
    p
}

#[test]
fn live_jobs_survive_a_killed_agent_and_libvirtd_restarts() {
    let env = Env::new();
    open_up(env.dir.path());
    open_up(&env.root());
    let base = layer(&env, "base", None, &[(1, 0, 1)]);
    let x = layer(&env, "x", Some(&base), &[(2, 1, 1)]);
    let p = layer(&env, "p", Some(&x), &[(3, 2, 40)]);
    let top = layer(&env, "top", Some(&p), &[(4, 50, 1)]);
    let views: Vec<String> = [&base, &x, &p, &top]
        .iter()
        .map(|f| sha(&live_view(f)))
        .collect();
    let name = format!("dc-restart-{}", std::process::id());
    let dom = Domain::start(&name, &top);
    let spec = env.spec(
        "r.yaml",
        &spec_yaml_source(
            "r",
            &format!("libvirt: {{ domain: {name}, target: vda }}"),
            &[("golden", Some(&base)), ("p", Some(&p))],
            "",
        ),
    );
    let specs = spec.parent().unwrap().to_path_buf();
    let agent = |extra: &[&str]| {
        env.diskchain(&["agent", "--resync", "1s", "--debounce", "100ms", "--specs"])
            .arg(&specs)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the agent")
    };
    // Removing x commits p's 40 MiB into it: at 2 MiB/s a job of about twenty seconds, which
    // outlasts the libvirtd restart below.
    let mut first = agent(&["--max-bytes-per-sec", "2097152"]);
    wait_for("the block commit to start", 20, || {
        !dom.blockjob().is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    first.kill().expect("SIGKILL the agent");
    first.wait().unwrap();
    assert!(
        !dom.blockjob().is_empty(),
        "the job runs on without diskchain"
    );

    let second = agent(&[]);
    std::thread::sleep(Duration::from_secs(1));
    restart_libvirtd();
    assert!(
        !dom.blockjob().is_empty(),
        "libvirt keeps the job across its restart"
    );
    wait_for("the agent to finish the plan", 60, || {
        dom.blockjob().is_empty() && dom.chain().len() == 3
    });
    // Let the agent record the result, then stop it as an operator would.
    let state = env.record("r");
    wait_for("the state to record the plan", 30, || {
        std::fs::read_to_string(&state).is_ok_and(|t| t.contains(&*x.to_string_lossy()))
            && !env.journal("r").exists()
    });
    let _ = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status();
    let out = second.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "the agent exits 0 on SIGTERM:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chain: Vec<PathBuf> = dom
        .chain()
        .iter()
        .map(|f| f.canonicalize().unwrap())
        .collect();
    let expected: Vec<PathBuf> = [&base, &x, &top]
        .iter()
        .map(|f| f.canonicalize().unwrap())
        .collect();
    assert_eq!(chain, expected, "x now holds point p");
    assert_eq!(sha(&live_view(&base)), views[0], "golden unchanged");
    assert_eq!(sha(&live_view(&x)), views[2], "x reads as point p");
    dom.flush();
    assert_eq!(sha(&live_view(&top)), views[3], "the guest view unchanged");
    assert_eq!(
        dom.persistent_source().canonicalize().unwrap(),
        top.canonicalize().unwrap()
    );
    let again = env.apply(&spec, &[]);
    assert_eq!(again.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("every disk matches"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );

    // A mirror (the active layer's move of a storage migration) across a libvirtd restart: the
    // guest's 1 MiB plus what the test writes now, at 1 MiB/s, so about 25 s: a restart on a
    // loaded machine (up to 5 s of a clean stop, then libvirtd's own start) ends well before it.
    dom.guest_write(7, 20 * MIB, 24 * MIB);
    dom.flush();
    let guest = sha(&live_view(&top));
    let moved = env.root().join("moved");
    std::fs::create_dir(&moved).unwrap();
    open_up(&moved);
    let spec = env.spec(
        "r.yaml",
        &spec_yaml_source(
            "r",
            &format!("libvirt: {{ domain: {name}, target: vda }}"),
            &[("golden", None), ("p", None)],
            &format!("  placement: {{ directory: {} }}\n", moved.display()),
        ),
    );
    let apply = env
        .diskchain(&["apply", "--max-bytes-per-sec", "1048576", "-f"])
        .arg(&spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run diskchain");
    wait_for("the block copy to start", 30, || !dom.blockjob().is_empty());
    restart_libvirtd();
    assert!(
        !dom.blockjob().is_empty(),
        "libvirt keeps the copy across its restart"
    );
    let out = apply.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "the apply waits through the restart and pivots:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let chain = dom.chain();
    assert_eq!(chain.len(), 3, "{chain:?}");
    for f in &chain {
        assert_eq!(
            f.canonicalize().unwrap().parent(),
            Some(moved.canonicalize().unwrap().as_path())
        );
    }
    assert_eq!(
        sha(&live_view(&chain[0])),
        views[0],
        "golden after the move"
    );
    assert_eq!(sha(&live_view(&chain[1])), views[2], "p after the move");
    dom.flush();
    assert_eq!(
        sha(&live_view(&chain[2])),
        guest,
        "the guest view after the move"
    );
}
