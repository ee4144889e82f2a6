//! Issue 10, item 4: `--max-bytes-per-sec` holds every offline step that copies data to QEMU's
//! own rate limit: a commit (`qemu-img commit -r`) and a stream (a `block-stream` job in a
//! `qemu-storage-daemon`, since `qemu-img rebase` has no limit). Each step's rate, bytes planned
//! over the step's wall time as `apply -o json` reports it, is within 20% of the limit; the
//! result reads as before.

use std::path::Path;

use diskchain_tests::env::{Env, half_hidden_chain, keep_base_and_top, mid_heavy_chain, spec_yaml};
use diskchain_tests::qemu::view_sha256;
use serde_json::Value;

const LIMIT: u64 = 8_000_000;

/// Applies `spec` at the limit; returns (op, planned bytes, seconds) of each step, from the
/// "step done" lines of its JSON log.
fn throttled(env: &Env, spec: &Path) -> Vec<(String, u64, f64)> {
    let out = env
        .diskchain(&["--log-format", "json", "apply", "--max-bytes-per-sec"])
        .arg(LIMIT.to_string())
        .arg("-f")
        .arg(spec)
        .env("DISKCHAIN_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "step done")
        .map(|v| {
            let f = &v["fields"];
            (
                f["op"].as_str().unwrap_or_default().to_string(),
                f["predicted"].as_u64().unwrap_or_default(),
                f["seconds"].as_f64().unwrap_or_default(),
            )
        })
        .collect()
}

fn assert_rate(what: &str, bytes: u64, seconds: f64) {
    let rate = bytes as f64 / seconds;
    let ratio = rate / LIMIT as f64;
    assert!(
        (0.8..=1.2).contains(&ratio),
        "{what}: {bytes} bytes in {seconds:.2} s is {rate:.0} B/s, {ratio:.2}x the limit"
    );
}

#[test]
fn a_throttled_stream_holds_the_limit() {
    let env = Env::new();
    // Dropping mid streams its 24 MiB that top does not hide.
    let [base, _, top] = half_hidden_chain(&env);
    let view = view_sha256(&top, "qcow2", env.dir.path());
    let spec = env.spec(
        "d.yaml",
        &spec_yaml("d", &top, &[("p0".into(), Some(base.clone()))], ""),
    );
    let steps = throttled(&env, &spec);
    let (op, bytes, seconds) = steps
        .iter()
        .find(|s| s.1 > 0)
        .unwrap_or_else(|| panic!("{steps:?}"));
    assert_eq!(op, "stream", "{steps:?}");
    assert_eq!(*bytes, 24 << 20, "{steps:?}");
    assert_rate("stream", *bytes, *seconds);
    assert_eq!(view_sha256(&top, "qcow2", env.dir.path()), view);
    assert_eq!(
        diskchain_tests::env::backing_chain(&top),
        vec![base.clone(), top.clone()]
    );
}

#[test]
fn a_throttled_commit_holds_the_limit() {
    let env = Env::new();
    let layers = mid_heavy_chain(&env, 24);
    let view = view_sha256(&layers[3], "qcow2", env.dir.path());
    let spec = env.spec("d.yaml", &keep_base_and_top("d", &layers));
    let steps = throttled(&env, &spec);
    let (op, bytes, seconds) = steps
        .iter()
        .find(|s| s.1 > 0)
        .unwrap_or_else(|| panic!("{steps:?}"));
    assert_eq!(op, "commit", "{steps:?}");
    assert_rate("commit", *bytes, *seconds);
    assert_eq!(view_sha256(&layers[3], "qcow2", env.dir.path()), view);
}
