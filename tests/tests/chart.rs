//! The Helm chart `charts/diskchain`: its CRD is `diskchain crd`'s, and every template renders,
//! for the default values, to Kubernetes objects the API types accept.
//!
//! No Helm binary can be installed here, so the templates are rendered with gtmpl, a Rust
//! implementation of Go's text/template (the language Helm templates are written in). The chart
//! uses only text/template itself (`.Values`, `.Release`, `if`, `range`, whitespace trimming),
//! none of Helm's added functions, so both render it alike; a template using anything gtmpl does
//! not know fails this test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskchain_tests::qemu::diskchain_bin;
use serde_json::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/diskchain")
}

/// A JSON value as a template value.
fn to_gtmpl(v: &Value) -> gtmpl::Value {
    match v {
        Value::Null => gtmpl::Value::Nil,
        Value::Bool(b) => gtmpl::Value::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => gtmpl::Value::from(i),
            None => gtmpl::Value::from(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => gtmpl::Value::String(s.clone()),
        Value::Array(a) => gtmpl::Value::Array(a.iter().map(to_gtmpl).collect()),
        Value::Object(o) => gtmpl::Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), to_gtmpl(v)))
                .collect::<HashMap<_, _>>(),
        ),
    }
}

fn render(template: &Path, values: &Value) -> String {
    let text = std::fs::read_to_string(template).unwrap();
    let ctx = serde_json::json!({
        "Values": values,
        "Release": {"Name": "diskchain", "Namespace": "diskchain-system"},
        "Chart": {"Name": "diskchain", "Version": "0.1.0", "AppVersion": "0.1.0"},
    });
    let mut t = gtmpl::Template::default();
    t.parse(text)
        .unwrap_or_else(|e| panic!("{}: {e}", template.display()));
    t.render(&gtmpl::Context::from(to_gtmpl(&ctx)))
        .unwrap_or_else(|e| panic!("{}: {e}", template.display()))
}

fn values() -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap()).unwrap()
}

/// Every rendered object, by kind.
fn objects(values: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    let mut templates: Vec<PathBuf> = std::fs::read_dir(chart().join("templates"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    templates.sort();
    for t in templates {
        let text = render(&t, values);
        for doc in text.split("\n---") {
            let v: Value = serde_saphyr::from_str(doc).unwrap_or_else(|e| {
                panic!(
                    "{} renders to YAML that does not parse: {e}\n{doc}",
                    t.display()
                )
            });
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

#[test]
fn the_charts_crd_is_the_one_diskchain_prints() {
    let out = Command::new(diskchain_bin()).arg("crd").output().unwrap();
    assert!(out.status.success());
    let chart_crd = std::fs::read_to_string(chart().join("crds/diskchain.yaml")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        chart_crd,
        "charts/diskchain/crds/diskchain.yaml differs from `diskchain crd`: regenerate it with `diskchain crd > charts/diskchain/crds/diskchain.yaml`"
    );
}

#[test]
fn every_template_renders_to_valid_objects_for_the_default_values() {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::core::v1::{Service, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let objs = objects(&values());
    let kinds: Vec<&str> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ],
        "the ServiceMonitor is off by default"
    );
    for o in &objs {
        let ok = match o["kind"].as_str().unwrap() {
            "ClusterRole" => serde_json::from_value::<ClusterRole>(o.clone()).map(|_| ()),
            "ClusterRoleBinding" => {
                serde_json::from_value::<ClusterRoleBinding>(o.clone()).map(|_| ())
            }
            "DaemonSet" => serde_json::from_value::<DaemonSet>(o.clone()).map(|_| ()),
            "Role" => serde_json::from_value::<Role>(o.clone()).map(|_| ()),
            "RoleBinding" => serde_json::from_value::<RoleBinding>(o.clone()).map(|_| ()),
            "Service" => serde_json::from_value::<Service>(o.clone()).map(|_| ()),
            "ServiceAccount" => serde_json::from_value::<ServiceAccount>(o.clone()).map(|_| ()),
            "ValidatingAdmissionPolicy" => {
                serde_json::from_value::<ValidatingAdmissionPolicy>(o.clone()).map(|_| ())
            }
            "ValidatingAdmissionPolicyBinding" => {
                serde_json::from_value::<ValidatingAdmissionPolicyBinding>(o.clone()).map(|_| ())
            }
            other => panic!("unexpected kind {other}"),
        };
        ok.unwrap_or_else(|e| panic!("{}: {e}\n{o:#}", o["kind"]));
    }
    let ds: DaemonSet = serde_json::from_value(
        objs.iter()
            .find(|o| o["kind"] == "DaemonSet")
            .unwrap()
            .clone(),
    )
    .unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    for want in [
        "agent",
        "--kube",
        "--listen=0.0.0.0:9184",
        "--allowed-root=/var/lib/diskchain",
        "--allowed-libvirt-uri=qemu:///system",
        "--state-dir=/var/lib/diskchain/state",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
    }
    // Least privilege: the agent's ClusterRole grants what it calls, no get, no update.
    let cr = objs.iter().find(|o| o["kind"] == "ClusterRole").unwrap();
    for rule in cr["rules"].as_array().unwrap() {
        for verb in rule["verbs"].as_array().unwrap() {
            assert!(
                ["list", "watch", "patch", "create"].contains(&verb.as_str().unwrap()),
                "{rule}"
            );
        }
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--max-bytes-per-sec")),
        "{args:?}"
    );
    let env = c.env.clone().unwrap();
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    let mounts: Vec<String> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.clone())
        .collect();
    assert_eq!(
        mounts,
        [
            "/var/lib/diskchain",
            "/var/lib/diskchain/state",
            "/run/libvirt"
        ]
    );
    // The binary accepts the arguments the chart gives it.
    let out = Command::new(diskchain_bin())
        .args(&args[..args.iter().position(|a| a == "agent").unwrap()])
        .args(["agent", "--help"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kube",
        "--listen",
        "--resync",
        "--max-parallel",
        "--node",
        "--grace",
    ] {
        assert!(help.contains(flag), "{flag} in agent --help");
    }
    // On SIGTERM the agent gives running steps `--grace`, then stops their QEMU processes
    // itself; the kubelet must not kill the pod before that (Kubernetes' default is 30 s).
    let grace = args
        .iter()
        .find_map(|a| a.strip_prefix("--grace="))
        .expect("--grace in the args");
    let grace = humantime::parse_duration(grace).unwrap().as_secs() as i64;
    let kill_after = pod
        .termination_grace_period_seconds
        .expect("terminationGracePeriodSeconds");
    assert!(
        kill_after >= grace + 10,
        "the pod is killed after {kill_after} s, the agent's grace is {grace} s"
    );
}

/// The chart says which Kubernetes it needs: the CRD's field selector (spec.nodeName) needs
/// 1.31 (K11).
#[test]
fn the_chart_declares_the_kubernetes_it_needs() {
    let chart: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(chart["kubeVersion"], ">=1.31.0-0");
}

#[test]
fn values_turn_the_optional_parts_on() {
    let mut v = values();
    v["metrics"]["serviceMonitor"]["enabled"] = Value::Bool(true);
    v["maxBytesPerSec"] = Value::from(10_000_000);
    v["roots"] = serde_json::json!(["/srv/a", "/srv/b"]);
    v["namespaceRoots"] = serde_json::json!([{"namespace": "team-a", "root": "/srv/a"}]);
    v["namespaceDomains"] = serde_json::json!([{"namespace": "team-a", "domain": "team-a-*"}]);
    let objs = objects(&v);
    let sm = objs
        .iter()
        .find(|o| o["kind"] == "ServiceMonitor")
        .expect("a ServiceMonitor when enabled");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    let ds = objs.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap();
    assert!(
        args.iter().any(|a| a == "--max-bytes-per-sec=10000000"),
        "{args:?}"
    );
    assert!(
        args.iter().any(|a| a == "--allowed-root=/srv/b"),
        "{args:?}"
    );
    assert!(
        args.iter().any(|a| a == "--namespace-root=team-a=/srv/a"),
        "{args:?}"
    );
    assert!(
        args.iter()
            .any(|a| a == "--namespace-domain=team-a=team-a-*"),
        "{args:?}"
    );
    let vols: Vec<&str> = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vols, ["root-0", "root-1", "state", "libvirt"]);
}
