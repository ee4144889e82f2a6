//! Bitmaps in the model (issue 10, item 2): the observer reads each layer's persistent dirty
//! bitmaps (name, granularity, flags); `plan` and `status` show them, and a bitmap whose in-use
//! flag was left by a QEMU that died is reported as inconsistent, not shown as sound.

use std::process::{Command, Stdio};
use std::time::Duration;

use diskchain_tests::env::{Env, spec_yaml};
use diskchain_tests::qemu::{create, io, run};
use serde_json::Value;

#[test]
fn plan_and_status_show_bitmaps_and_report_an_inconsistent_one() {
    let env = Env::new();
    let base = env.img("base.qcow2");
    let top = env.img("top.qcow2");
    create(&base, 64 << 20, None, &[]);
    io(&base, "qcow2", &["write -P 1 0 1M".into()]);
    create(&top, 0, Some((&base, "qcow2")), &[]);
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--granularity", "128K"])
        .arg(&top)
        .arg("b0"));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--disable"])
        .arg(&top)
        .arg("b1"));
    let spec = env.spec(
        "d.yaml",
        &spec_yaml("d", &top, &[("golden".into(), Some(base.clone()))], ""),
    );
    let notes = |env: &Env| -> Vec<String> {
        env.plan_json(&spec)["disks"][0]["notes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    };
    let n = notes(&env);
    assert!(
        n.iter()
            .any(|l| l.contains("bitmap b0 (128.0 KiB granularity, recording)")),
        "{n:?}"
    );
    assert!(
        n.iter()
            .any(|l| l.contains("bitmap b1 (64.0 KiB granularity, disabled)")),
        "{n:?}"
    );
    assert!(!n.iter().any(|l| l.contains("INCONSISTENT")), "{n:?}");

    // A QEMU that had the image open read-write dies: the in-use flags stay set.
    let mut q = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&top)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    q.kill().unwrap();
    q.wait().unwrap();
    let n = notes(&env);
    assert!(
        n.iter()
            .any(|l| l.contains("bitmap b0") && l.contains("INCONSISTENT")),
        "{n:?}"
    );

    // `status` shows them too (the disk is recorded by an apply that has nothing to do).
    env.apply_ok(&spec, &[]);
    let st = env.diskchain(&["status", "-o", "json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&st.stdout).unwrap();
    let layers = v["disks"][0]["chain"].as_array().unwrap();
    let bitmaps = layers.last().unwrap()["bitmaps"].as_array().unwrap();
    let state = |name: &str| {
        bitmaps
            .iter()
            .find(|b| b["name"] == name)
            .map(|b| (b["state"].clone(), b["granularity"].clone()))
    };
    assert_eq!(
        state("b0"),
        Some(("inconsistent".into(), 131072.into())),
        "{v}"
    );
    // QEMU marks every bitmap it loads read-write in use, disabled ones too.
    assert_eq!(
        state("b1"),
        Some(("inconsistent".into(), 65536.into())),
        "{v}"
    );
    let text = env.diskchain(&["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("bitmap b0") && text.contains("INCONSISTENT"),
        "{text}"
    );
}
