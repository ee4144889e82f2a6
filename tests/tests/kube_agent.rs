//! Kubernetes mode end to end: the `diskchain` binary as agents of one or two nodes against a
//! Kubernetes API server written for these checks (`tests/kube/testapiserver.py`, with fault
//! injection), on real qcow2 chains. Each scenario (`tests/kube/NN_*.sh`, from the adversarial
//! review of Kubernetes mode) prints `OK`/`FAIL` lines; a scenario passes when it prints no
//! `FAIL` and exits 0. They cover what a shared cluster meets: a tenant's libvirt URI (no
//! program runs), tenant isolation on a shared root, two nodes on one image (one writer), a
//! resource moved between nodes (the old node releases, the new one waits and keeps the
//! points), resources that leave a node, hostile and unreadable objects, API outages and lease
//! renewals that hang, status truthfulness, an API server without CRD field selectors, the
//! lease released on SIGTERM, metrics removed with their resource, and least-privilege RBAC.
//!
//! They need Python 3 with PyYAML (`scripts/setup.sh` installs it) and run one at a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One scenario at a time: they time agents against deadlines on a small machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn kube_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kube")
}

/// Runs scenario `name` (a script in `tests/kube`) against the built binary; panics with its
/// output unless it exits 0 and prints no `FAIL`.
fn scenario(name: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let work = tempfile::tempdir().expect("tempdir");
    // QEMU under libvirt (a live scenario) and the agents reach the images there.
    let _ = Command::new("chmod").arg("755").arg(work.path()).status();
    let script = kube_dir().join(name);
    let out = Command::new("bash")
        .arg(&script)
        .env("DISKCHAIN_BIN", diskchain_tests::qemu::diskchain_bin())
        .env("KP_DIR", work.path())
        .env(
            "CHART_DIR",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/diskchain"),
        )
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        out.status.success() && failed.is_empty() && stdout.contains(" OK, 0 FAIL"),
        "{name}: exit {:?}, failed checks:\n{}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status.code(),
        failed.join("\n")
    );
}

#[test]
fn a_tenants_libvirt_uri_runs_no_program_and_stalls_nothing() {
    scenario("10_libvirt_uri.sh");
}

#[test]
fn a_tenant_cannot_reach_another_tenants_disk_nor_one_nobody_manages() {
    scenario("11_tenant_isolation.sh");
}

#[test]
fn two_nodes_on_one_image_have_one_writer() {
    scenario("08_two_nodes_one_image.sh");
}

#[test]
fn a_resource_moved_to_another_node_is_released_and_keeps_its_points() {
    scenario("04_nodename_move.sh");
}

#[test]
fn resources_that_leave_a_node_are_released_and_deletions_finish() {
    scenario("03_delete_agent_down.sh");
}

#[test]
fn hostile_and_unreadable_objects_never_stop_the_node() {
    scenario("09_bad_input.sh");
}

#[test]
fn api_outages_and_hung_renewals_keep_one_writer_and_running_steps() {
    scenario("12_api_faults.sh");
}

#[test]
fn the_status_tells_the_truth() {
    scenario("14_status_truth.sh");
}

#[test]
fn an_api_server_without_crd_field_selectors_is_served() {
    scenario("15_old_apiserver_fieldselector.sh");
}

#[test]
fn the_lease_is_released_on_sigterm() {
    scenario("16_lease_release_on_sigterm.sh");
}

#[test]
fn a_deleted_resources_metrics_go_with_it() {
    scenario("18_metrics_after_delete.sh");
}

#[test]
fn the_agent_calls_exactly_what_its_rbac_grants() {
    scenario("01_rbac.sh");
}
