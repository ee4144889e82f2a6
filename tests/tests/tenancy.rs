//! What a spec may reach is the node operator's decision (K1, K4): a spec's libvirt URI must be
//! one the operator allows, so no spec makes diskchain run a program or open a network
//! connection; and an error never tells whether a path outside the allowed roots exists.

use std::time::{Duration, Instant};

use diskchain_tests::env::{Env, spec_yaml, spec_yaml_source};

/// A spec whose libvirt URI is `uri`.
fn libvirt_spec(env: &Env, uri: &str) -> std::path::PathBuf {
    env.spec(
        "d.yaml",
        &spec_yaml_source(
            "d",
            &format!("libvirt: {{ uri: \"{uri}\", domain: anything, target: vda }}"),
            &[],
            "",
        ),
    )
}

#[test]
fn a_spec_cannot_make_diskchain_run_a_program_through_a_libvirt_uri() {
    let env = Env::new();
    let canary = env.dir.path().join("canary.out");
    let script = env.dir.path().join("canary.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho ran >> {}\nexit 0\n", canary.display()),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("755")
        .arg(&script)
        .status()
        .unwrap();
    for uri in [
        format!("qemu+ext:///system?command={}", script.display()),
        format!("qemu+ssh://127.0.0.1/system?command={}", script.display()),
        "qemu+tcp://127.0.0.1:1/system".to_string(),
        format!("qemu:///system?socket={}", script.display()),
        "qemu:///session".to_string(),
    ] {
        let spec = libvirt_spec(&env, &uri);
        let t = Instant::now();
        let out = env.plan(&spec);
        let err = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{uri}: {err} {stdout}");
        assert!(
            stdout.contains("spec.source.libvirt.uri")
                && stdout.contains("not a libvirt URI this node allows"),
            "{uri}: {stdout}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{uri}: refused at once"
        );
        assert!(!canary.exists(), "{uri}: the program ran");
    }
}

#[test]
fn the_operator_may_allow_only_local_libvirt_uris() {
    let env = Env::new();
    let spec = libvirt_spec(&env, "qemu:///system");
    for bad in [
        "qemu+ext:///system?command=/bin/true",
        "qemu+ssh://host/system",
        "qemu+tls://host/system",
        "qemu:///system?keyfile=/root/k",
    ] {
        let out = env
            .diskchain(&["--allowed-libvirt-uri", bad, "plan", "-f"])
            .arg(&spec)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("--allowed-libvirt-uri"), "{bad}: {err}");
    }
}

#[test]
fn an_error_does_not_tell_whether_a_path_outside_the_roots_exists() {
    let env = Env::new();
    let outside = env.dir.path().join("outside.qcow2");
    diskchain_tests::qemu::create(&outside, 1 << 20, None, &[]);
    let missing = env.dir.path().join("missing.qcow2");
    let mut messages = Vec::new();
    for (name, path) in [("exists", &outside), ("missing", &missing)] {
        let spec = env.spec("d.yaml", &spec_yaml("d", path, &[], ""));
        let out = env.plan(&spec);
        assert_eq!(out.status.code(), Some(2));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let m = v["errors"][0]["error"].as_str().unwrap().to_string();
        assert!(m.contains("spec.source.file"), "{name}: {m}");
        messages.push(m.replace(&path.display().to_string(), "P"));
    }
    assert_eq!(messages[0], messages[1]);
}
