//! Spec input is bounded and stays inside its directory (F10, F11, F12, F17): only regular files
//! are read, each at most 1 MiB, without ever blocking on a FIFO; a symlink that leaves the spec
//! directory is refused unread, so its target's content never reaches an error message; symlink
//! loops and aliases load each file once. Bad input exits 2, names the file and changes nothing.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use diskchain_tests::env::{Env, spec_yaml};
use diskchain_tests::qemu::create;

/// Runs the command, killing it if it has not finished within `limit` (then the test fails).
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run diskchain");
    let t = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "diskchain still running after {limit:?} (hung); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A valid two-layer disk `d` whose spec is `specs/d.yaml`.
fn valid_disk(env: &Env) {
    create(&env.img("l0.qcow2"), 64 << 20, None, &[]);
    create(
        &env.img("l1.qcow2"),
        64 << 20,
        Some((&env.img("l0.qcow2"), "qcow2")),
        &[],
    );
    env.spec(
        "d.yaml",
        &spec_yaml(
            "d",
            &env.img("l1.qcow2"),
            &[("p0".into(), Some(env.img("l0.qcow2")))],
            "",
        ),
    );
}

fn plan(env: &Env, path: &Path) -> Output {
    let mut c = env.diskchain(&["plan", "-o", "json", "-f"]);
    c.arg(path);
    run_bounded(c, Duration::from_secs(30))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn specs(env: &Env) -> std::path::PathBuf {
    env.dir.path().join("specs")
}

#[test]
fn a_fifo_in_the_spec_directory_is_refused_not_waited_on() {
    let env = Env::new();
    valid_disk(&env);
    let fifo = specs(&env).join("zz.yaml");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let before = env.fingerprints();
    let out = plan(&env, &specs(&env));
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("zz.yaml") && err.contains("FIFO"),
        "the error names the FIFO: {err}"
    );
    // Named directly, too.
    let out = plan(&env, &fifo);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert_eq!(env.fingerprints(), before, "bad input changed an image");
}

#[test]
fn a_symlink_to_a_device_is_refused_unread() {
    let env = Env::new();
    valid_disk(&env);
    std::os::unix::fs::symlink("/dev/zero", specs(&env).join("z.yaml")).unwrap();
    let out = plan(&env, &specs(&env));
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("z.yaml") && err.contains("outside the spec directory"),
        "{err}"
    );
    // A device named directly is refused as one, not read.
    let out = plan(&env, Path::new("/dev/zero"));
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("character device"),
        "{}",
        stderr(&out)
    );
    // A device inside the spec directory (a symlink to one placed there) is refused too.
    let inner = specs(&env).join("dev");
    std::fs::create_dir(&inner).unwrap();
    std::os::unix::fs::symlink("/dev/urandom", inner.join("r.yaml")).unwrap();
    let out = plan(&env, &inner);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
}

#[test]
fn an_oversized_spec_file_is_refused_naming_its_size() {
    let env = Env::new();
    valid_disk(&env);
    let big = specs(&env).join("big.yaml");
    let mut text = String::from("# padding\n");
    while text.len() < (1 << 20) + 10 {
        text.push_str("# a comment line that is padding and nothing else, repeated\n");
    }
    std::fs::write(&big, text).unwrap();
    let out = plan(&env, &specs(&env));
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("big.yaml") && err.contains("at most 1048576 bytes"),
        "{err}"
    );
}

#[test]
fn a_symlink_leaving_the_spec_directory_never_leaks_its_target() {
    let env = Env::new();
    valid_disk(&env);
    let secret_dir = env.dir.path().join("home");
    std::fs::create_dir(&secret_dir).unwrap();
    let secret = secret_dir.join("config.json");
    // Valid JSON is valid YAML that fails as a spec: its first line would be printed.
    std::fs::write(
        &secret,
        "{\"auths\":{\"registry.example\":{\"auth\":\"dXNlcjpnaHBfU0VDUkVUMTIzNA==\"}}}\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(&secret, specs(&env).join("innocent.yaml")).unwrap();
    // And a symlinked directory that leaves it.
    std::os::unix::fs::symlink(&secret_dir, specs(&env).join("more")).unwrap();
    std::fs::write(secret_dir.join("x.yaml"), "secret: SECRET-IN-A-DIR\n").unwrap();
    let out = plan(&env, &specs(&env));
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let all = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    assert!(
        !all.contains("dXNlcjpnaHBfU0VDUkVUMTIzNA") && !all.contains("registry.example"),
        "the target's content leaked: {all}"
    );
    assert!(!all.contains("SECRET-IN-A-DIR"), "{all}");
    assert!(
        all.contains("innocent.yaml") && all.contains("outside the spec directory"),
        "{all}"
    );
    assert!(
        all.contains("more"),
        "the directory symlink is named: {all}"
    );
}

#[test]
fn a_symlink_loop_and_aliases_load_each_spec_once() {
    let env = Env::new();
    valid_disk(&env);
    std::os::unix::fs::symlink(".", specs(&env).join("loop")).unwrap();
    std::os::unix::fs::symlink("d.yaml", specs(&env).join("alias.yaml")).unwrap();
    let sub = specs(&env).join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::os::unix::fs::symlink("..", sub.join("up")).unwrap();
    let out = plan(&env, &specs(&env));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let disks = v["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 1, "one disk, planned once: {v}");
    assert!(stderr(&out).is_empty(), "no errors: {}", stderr(&out));
}

#[test]
fn a_symlink_inside_the_spec_directory_is_followed() {
    let env = Env::new();
    valid_disk(&env);
    let real = specs(&env).join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::rename(specs(&env).join("d.yaml"), real.join("d.yaml")).unwrap();
    std::os::unix::fs::symlink("real/d.yaml", specs(&env).join("d.yaml")).unwrap();
    let out = plan(&env, &specs(&env));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["disks"].as_array().map(Vec::len), Some(1), "{v}");
}
