//! Kubernetes mode's reconcile against a mocked API server that checks each request in order
//! (kube-rs controller-rs's `ApiServerVerifier` pattern), on real qcow2 chains.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use diskchain::kubernetes::{Context, FINALIZER, reconcile};
use diskchain::observe::Roots;
use diskchain::state::StateDir;
use diskchain_crd::DiskChain;
use diskchain_tests::env::backing_chain;
use diskchain_tests::qemu::{create, fingerprint, io, view_sha256};
use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A scratch host: `img/` (the allowed root) with base <- top, 8 MiB in the base and 1 MiB in
/// the top, and a state directory.
struct Host {
    dir: tempfile::TempDir,
    base: PathBuf,
    top: PathBuf,
}

fn host() -> Host {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("img")).unwrap();
    let base = dir.path().join("img/base.qcow2");
    create(&base, 64 << 20, None, &[]);
    io(&base, "qcow2", &["write -P 1 0 8M".into()]);
    let top = dir.path().join("img/top.qcow2");
    create(&top, 0, Some((&base, "qcow2")), &[]);
    io(&top, "qcow2", &["write -P 2 16M 1M".into()]);
    Host { dir, base, top }
}

fn context(h: &Host) -> (Arc<Context>, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let ctx = Context {
        recorder: Arc::new(diskchain::kubernetes::events::Events::new(
            client.clone(),
            "diskchain",
            "node-a",
        )),
        client,
        node: "node-a".into(),
        roots: Roots::new(&[h.dir.path().join("img")]).unwrap(),
        state: StateDir::new(h.dir.path().join("state")),
        exec: Default::default(),
        resync: Duration::from_secs(300),
        failures: Default::default(),
        stop: Default::default(),
        shared: Arc::new(diskchain::reconcile::Shared::new(Duration::from_secs(300))),
        resources: Default::default(),
        claims: Default::default(),
        // The operator assigned the root to the namespace these tests use.
        tenancy: diskchain::kubernetes::tenancy::Tenancy::new(
            &[format!("default={}", h.dir.path().join("img").display())],
            &Roots::new(&[h.dir.path().join("img")]).unwrap(),
        )
        .unwrap(),
        ownership: None,
        records: Default::default(),
        busy: Default::default(),
        released: Default::default(),
        lease: None,
    };
    (Arc::new(ctx), handle)
}

/// A `DiskChain` named `vda` in `default` for node `node` on `top`, keeping `points` (name,
/// file).
fn object(
    node: &str,
    top: &Path,
    points: &[(&str, &Path)],
    finalizer: bool,
    deleted: bool,
) -> DiskChain {
    let snapshots: Vec<Value> = points
        .iter()
        .map(|(n, f)| json!({"name": n, "file": f}))
        .collect();
    let mut v = json!({
        "apiVersion": "diskchain.dev/v1alpha1",
        "kind": "DiskChain",
        "metadata": {"name": "vda", "namespace": "default", "uid": "u-1", "generation": 3,
                     "resourceVersion": "7"},
        "spec": {"nodeName": node, "source": {"file": top}, "snapshots": snapshots},
    });
    if finalizer {
        v["metadata"]["finalizers"] = json!([FINALIZER]);
    }
    if deleted {
        v["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
    }
    serde_json::from_value(v).unwrap()
}

/// The next request: its method, path and query, and its body as JSON.
async fn next(
    handle: &mut Handle,
) -> (
    String,
    String,
    Value,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(60), handle.next_request())
        .await
        .expect("a request within a minute")
        .expect("the client is alive");
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (method, uri, body, send)
}

/// The events a reconcile publishes while its steps run (`Planned`, then `StepStarted` and
/// `StepDone` per step), each answered, and the first request after them.
async fn step_events(
    handle: &mut Handle,
) -> (
    Vec<Value>,
    (
        String,
        String,
        Value,
        tower_test::mock::SendResponse<Response<Body>>,
    ),
) {
    let mut events = Vec::new();
    loop {
        let (m, uri, body, send) = next(handle).await;
        let is_step = m == "POST"
            && uri.contains("/events")
            && ["Planned", "StepStarted", "StepDone"]
                .contains(&body["reason"].as_str().unwrap_or(""));
        if !is_step {
            return (events, (m, uri, body, send));
        }
        reply(send, &body);
        events.push(body);
    }
}

/// Checks the step events of a plan of at least one step: `Planned` with its bytes, then a
/// `StepStarted` and a `StepDone` with bytes written for each step, in order.
fn assert_step_events(events: &[Value]) {
    let reasons: Vec<&str> = events
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.len() >= 3, "{reasons:?}");
    assert_eq!(reasons[0], "Planned", "{events:?}");
    assert!(
        events[0]["note"].as_str().unwrap().contains("predicted"),
        "{}",
        events[0]
    );
    for (i, pair) in reasons[1..].chunks(2).enumerate() {
        assert_eq!(
            pair,
            ["StepStarted", "StepDone"],
            "step {}: {reasons:?}",
            i + 1
        );
    }
    for e in events.iter().filter(|e| e["reason"] == "StepDone") {
        assert!(e["note"].as_str().unwrap().contains("written"), "{e}");
        assert_eq!(e["type"], "Normal");
    }
}

fn reply(send: tower_test::mock::SendResponse<Response<Body>>, body: &Value) {
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

fn status(body: &Value, kind: &str) -> (String, String) {
    let c = body["status"]["conditions"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == kind))
        .unwrap_or_else(|| panic!("no {kind} condition in {body}"));
    (
        c["status"].as_str().unwrap().to_string(),
        c["reason"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_resource_gets_the_finalizer_then_status_and_an_event_and_its_disk_converges() {
    let h = host();
    let (ctx, mut api) = context(&h);
    let view = view_sha256(&h.top, "qcow2", h.dir.path());
    // A new resource: the finalizer first, nothing else.
    let obj = object("node-a", &h.top, &[], false, false);
    let obj_json = serde_json::to_value(&obj).unwrap();
    let server = tokio::spawn(async move {
        let (m, uri, body, send) = next(&mut api).await;
        assert_eq!(m, "PATCH");
        assert!(
            uri.starts_with("/apis/diskchain.dev/v1alpha1/namespaces/default/diskchains/vda?"),
            "{uri}"
        );
        assert!(body.to_string().contains(FINALIZER), "{body}");
        reply(send, &obj_json);
        api
    });
    let action = reconcile(Arc::new(obj), ctx.clone()).await;
    assert!(action.is_ok(), "{action:?}");
    let mut api = server.await.unwrap();
    assert_eq!(
        backing_chain(&h.top).len(),
        2,
        "nothing ran before the finalizer was on"
    );

    // With the finalizer: the disk is reconciled (flattened: no point kept), the status written
    // by server-side apply with observedGeneration and conditions, and an event.
    let obj = object("node-a", &h.top, &[], true, false);
    let obj_json = serde_json::to_value(&obj).unwrap();
    let server = tokio::spawn(async move {
        // The plan and each step as they run, then the status.
        let (events, (m, uri, body, send)) = step_events(&mut api).await;
        assert_step_events(&events);
        assert_eq!(m, "PATCH");
        assert!(
            uri.starts_with(
                "/apis/diskchain.dev/v1alpha1/namespaces/default/diskchains/vda/status?"
            ),
            "{uri}"
        );
        assert!(
            uri.contains("fieldManager=diskchain") && uri.contains("force=true"),
            "{uri}"
        );
        assert_eq!(body["status"]["observedGeneration"], 3, "{body}");
        assert_eq!(status(&body, "Ready"), ("True".into(), "InSync".into()));
        assert_eq!(status(&body, "Degraded").0, "False");
        assert!(
            body["status"]["lastPlan"]["totalBytes"].as_u64().unwrap() > 0,
            "{body}"
        );
        reply(send, &obj_json);
        // The steps that ran, with their bytes, then the outcome.
        let (m, uri, body, send) = next(&mut api).await;
        assert_eq!(m, "POST");
        assert!(
            uri.starts_with("/apis/events.k8s.io/v1/namespaces/default/events"),
            "{uri}"
        );
        assert_eq!(body["reason"], "Applied", "{body}");
        assert!(
            body["note"].as_str().unwrap().contains("predicted"),
            "{body}"
        );
        reply(send, &body);
        let (m, _, body, send) = next(&mut api).await;
        assert_eq!(m, "POST");
        assert_eq!(body["reason"], "InSync", "{body}");
        reply(send, &body);
        api
    });
    let action = reconcile(Arc::new(obj), ctx.clone()).await;
    assert!(action.is_ok(), "{action:?}");
    server.await.unwrap();
    assert_eq!(backing_chain(&h.top), vec![h.top.clone()], "flattened");
    assert_eq!(view_sha256(&h.top, "qcow2", h.dir.path()), view);
    // The metrics file mode exports, from this reconcile.
    let metrics = ctx.shared.metrics.encode();
    for line in [
        "diskchain_chain_length{disk=\"vda\"} 1",
        "diskchain_drift{disk=\"vda\"} 0",
        "diskchain_plan_bytes{disk=\"vda\"} 0",
        "diskchain_reconcile_duration_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert!(
        metrics.contains("diskchain_written_bytes_total{op="),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resource_of_another_node_is_never_acted_on() {
    let h = host();
    let (ctx, mut api) = context(&h);
    let before = fingerprint(&h.top);
    for node in [Some("node-b"), None] {
        let mut obj = object(node.unwrap_or("x"), &h.top, &[], true, false);
        obj.spec.node_name = node.map(str::to_string);
        let action = reconcile(Arc::new(obj), ctx.clone()).await;
        assert!(action.is_ok(), "{action:?}");
    }
    let nothing = tokio::time::timeout(Duration::from_millis(300), api.next_request()).await;
    assert!(
        nothing.is_err(),
        "a request was made for another node's resource"
    );
    assert_eq!(fingerprint(&h.top), before);
    assert_eq!(backing_chain(&h.top).len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deletion_runs_the_finalizer_drops_the_record_and_touches_no_image() {
    let h = host();
    let (ctx, mut api) = context(&h);
    // Converge first (keeping the base), so there is a record.
    let obj = object("node-a", &h.top, &[("golden", &h.base)], true, false);
    let obj_json = serde_json::to_value(&obj).unwrap();
    let server = tokio::spawn(async move {
        let (_, _, _, send) = next(&mut api).await;
        reply(send, &obj_json);
        let (_, _, body, send) = next(&mut api).await;
        reply(send, &body);
        api
    });
    reconcile(Arc::new(obj), ctx.clone()).await.unwrap();
    let mut api = server.await.unwrap();
    let record = h.dir.path().join("state/disks/default/vda.json");
    assert!(record.exists());
    let images: Vec<_> = [&h.base, &h.top].iter().map(|f| fingerprint(f)).collect();
    let obj = object("node-a", &h.top, &[("golden", &h.base)], true, true);
    let obj_json = serde_json::to_value(&obj).unwrap();
    let server = tokio::spawn(async move {
        let (m, uri, body, send) = next(&mut api).await;
        assert_eq!(m, "POST");
        assert!(uri.contains("/events"), "{uri}");
        assert_eq!(body["reason"], "Released", "{body}");
        reply(send, &body);
        let (m, uri, body, send) = next(&mut api).await;
        assert_eq!(m, "PATCH", "the finalizer is removed");
        assert!(uri.contains("/diskchains/vda?"), "{uri}");
        assert!(!body.to_string().contains("\"add\""), "{body}");
        reply(send, &obj_json);
    });
    reconcile(Arc::new(obj), ctx.clone()).await.unwrap();
    server.await.unwrap();
    assert!(!record.exists(), "the record is dropped");
    let after: Vec<_> = [&h.base, &h.top].iter().map(|f| fingerprint(f)).collect();
    assert_eq!(images, after, "no image touched");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_disk_is_degraded_with_the_reason_and_requeued() {
    let h = host();
    let (ctx, mut api) = context(&h);
    // The top image is held open by another QEMU process: the disk is in use.
    let _held = diskchain_tests::qemu::hold_open(&h.top, h.dir.path());
    let obj = object("node-a", &h.top, &[], true, false);
    let obj_json = serde_json::to_value(&obj).unwrap();
    let server = tokio::spawn(async move {
        let (m, uri, body, send) = next(&mut api).await;
        assert_eq!(m, "PATCH");
        assert!(uri.contains("/status?"), "{uri}");
        assert_eq!(status(&body, "Degraded"), ("True".into(), "InUse".into()));
        assert_eq!(status(&body, "Ready").0, "False");
        reply(send, &obj_json);
        let (m, _, body, send) = next(&mut api).await;
        assert_eq!(m, "POST");
        assert_eq!(body["reason"], "InUse");
        assert_eq!(body["type"], "Warning");
        reply(send, &body);
    });
    let obj = Arc::new(obj);
    let r = reconcile(obj.clone(), ctx.clone()).await;
    server.await.unwrap();
    let err = r.expect_err("a failure is returned, so the controller requeues");
    // With a backoff that grows with each failure in a row.
    use kube::runtime::controller::Action;
    let first = diskchain::kubernetes::error_policy(obj.clone(), &err, ctx.clone());
    let second = diskchain::kubernetes::error_policy(obj, &err, ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(5)));
    assert_eq!(second, Action::requeue(Duration::from_secs(10)));
    assert_eq!(backing_chain(&h.top).len(), 2, "nothing was written");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spec_edit_replans_and_an_unchanged_outcome_sends_no_event() {
    let h = host();
    let (ctx, mut api) = context(&h);
    let view = view_sha256(&h.top, "qcow2", h.dir.path());
    // Generation 3 keeps the base: in sync, nothing to do; the status shows the chain.
    let obj = object("node-a", &h.top, &[("golden", &h.base)], true, false);
    let obj_json = serde_json::to_value(&obj).unwrap();
    let server = tokio::spawn(async move {
        let (_, uri, body, send) = next(&mut api).await;
        assert!(uri.contains("/status?"), "{uri}");
        let chain: Vec<&str> = body["status"]["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["point"].as_str().unwrap_or("(active)"))
            .collect();
        assert_eq!(chain, ["golden", "(active)"], "{body}");
        let status = body["status"].clone();
        reply(send, &obj_json);
        let (m, _, body, send) = next(&mut api).await;
        assert_eq!(m, "POST");
        reply(send, &body);
        (api, status)
    });
    reconcile(Arc::new(obj), ctx.clone()).await.unwrap();
    let (mut api, status) = server.await.unwrap();
    assert_eq!(backing_chain(&h.top).len(), 2);
    // Generation 4 drops the point: replanned and flattened; the outcome (InSync) is the one
    // the status already shows, so no event.
    let mut obj = object("node-a", &h.top, &[], true, false);
    obj.metadata.generation = Some(4);
    // (The conditions have held since long ago.)
    let mut status = status;
    assert!(status["lastApply"].is_null(), "nothing ran yet: {status}");
    for c in status["conditions"].as_array_mut().unwrap() {
        c["lastTransitionTime"] = json!("2026-01-01T00:00:00Z");
    }
    obj.status = Some(serde_json::from_value(status).unwrap());
    let obj_json = serde_json::to_value(&obj).unwrap();
    let server = tokio::spawn(async move {
        let (events, (_, uri, body, send)) = step_events(&mut api).await;
        assert_step_events(&events);
        assert!(uri.contains("/status?"), "{uri}");
        assert_eq!(body["status"]["observedGeneration"], 4, "{body}");
        assert!(
            body["status"]["lastPlan"]["steps"]
                .as_array()
                .is_some_and(|s| !s.is_empty()),
            "the edit was planned and carried out: {body}"
        );
        let applied = &body["status"]["lastApply"];
        assert_eq!(
            applied["steps"], body["status"]["lastPlan"]["steps"],
            "{body}"
        );
        assert!(applied["writtenBytes"].as_u64().unwrap() > 0, "{body}");
        assert!(
            applied["finished"].as_str().unwrap().starts_with("20"),
            "{body}"
        );
        // Ready stayed True, Degraded False: their transition times are kept.
        for c in body["status"]["conditions"].as_array().unwrap() {
            assert_eq!(c["lastTransitionTime"], "2026-01-01T00:00:00Z", "{c}");
        }
        reply(send, &obj_json);
        // The steps of the new generation, but no second InSync.
        let (_, _, body, send) = next(&mut api).await;
        assert_eq!(body["reason"], "Applied", "{body}");
        reply(send, &body);
        api
    });
    reconcile(Arc::new(obj), ctx.clone()).await.unwrap();
    let mut api = server.await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(300), api.next_request()).await;
    assert!(
        nothing.is_err(),
        "an event for an outcome that did not change"
    );
    assert_eq!(backing_chain(&h.top), vec![h.top.clone()]);
    assert_eq!(view_sha256(&h.top, "qcow2", h.dir.path()), view);
}

/// Answers every request like an API server that accepts it: a status patch with the object
/// named in the path (from `objects`), an event with itself. Returns each status written.
fn auto_server(
    api: Handle,
    objects: std::collections::HashMap<String, Value>,
) -> tokio::task::JoinHandle<Vec<Value>> {
    let server = auto_server_with_events(api, objects);
    tokio::spawn(async move { server.await.unwrap().0 })
}

/// File mode (`apply`) and Kubernetes mode over the same specs on identical chains: the same
/// outcome per disk, and the same chains after.
#[tokio::test(flavor = "multi_thread")]
async fn file_mode_and_kubernetes_mode_reach_the_same_outcomes() {
    // Per disk: (name, keep the base?, held open by another process?).
    let disks = [
        ("keep", true, false),
        ("flat", false, false),
        ("busy", false, true),
    ];
    let build = || {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("img")).unwrap();
        for (n, ..) in &disks {
            let base = dir.path().join(format!("img/{n}-base.qcow2"));
            create(&base, 64 << 20, None, &[]);
            io(&base, "qcow2", &["write -P 1 0 4M".into()]);
            let top = dir.path().join(format!("img/{n}.qcow2"));
            create(&top, 0, Some((&base, "qcow2")), &[]);
            io(&top, "qcow2", &["write -P 2 8M 1M".into()]);
        }
        dir
    };
    let spec_of = |dir: &Path, n: &str, keep: bool| -> DiskChain {
        let top = dir.join(format!("img/{n}.qcow2"));
        let base = dir.join(format!("img/{n}-base.qcow2"));
        let mut o = if keep {
            object("node-a", &top, &[("golden", &base)], true, false)
        } else {
            object("node-a", &top, &[], true, false)
        };
        o.metadata.name = Some(n.to_string());
        o
    };

    // File mode.
    let file_host = build();
    let held_f = diskchain_tests::qemu::hold_open(
        &file_host.path().join("img/busy.qcow2"),
        file_host.path(),
    );
    let desired: Vec<diskchain_crd::DesiredDisk> = disks
        .iter()
        .map(|(n, keep, _)| {
            diskchain_crd::DesiredDisk::from_object(&spec_of(file_host.path(), n, *keep)).unwrap()
        })
        .collect();
    let roots = Roots::new(&[file_host.path().join("img")]).unwrap();
    let state = StateDir::new(file_host.path().join("state"));
    let report = diskchain::apply::apply_loaded(
        &desired,
        &roots,
        &state,
        diskchain::apply::ApplyOptions {
            exec: Default::default(),
            progress: Arc::new(diskchain::progress::Silent),
            stop: None,
        },
    )
    .unwrap();
    drop(held_f);
    let file_outcomes: Vec<String> = desired
        .iter()
        .map(|d| format!("{:?}", report.result_of(&d.key).outcome))
        .collect();

    // Kubernetes mode.
    let kube_host = build();
    let held_k = diskchain_tests::qemu::hold_open(
        &kube_host.path().join("img/busy.qcow2"),
        kube_host.path(),
    );
    let h = Host {
        base: PathBuf::new(),
        top: PathBuf::new(),
        dir: kube_host,
    };
    let (ctx, api) = context(&h);
    let objs: Vec<DiskChain> = disks
        .iter()
        .map(|(n, keep, _)| spec_of(h.dir.path(), n, *keep))
        .collect();
    let by_name = objs
        .iter()
        .map(|o| {
            (
                o.metadata.name.clone().unwrap(),
                serde_json::to_value(o).unwrap(),
            )
        })
        .collect();
    let server = auto_server(api, by_name);
    for o in &objs {
        let _ = reconcile(Arc::new(o.clone()), ctx.clone()).await;
    }
    drop(ctx);
    let statuses = server.await.unwrap();
    drop(held_k);
    let kube_outcomes: Vec<String> = disks
        .iter()
        .map(|(n, ..)| {
            let s = statuses.iter().rev().find(|s| s["name"] == *n).unwrap();
            let ready = s["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .unwrap();
            ready["reason"].as_str().unwrap().to_string()
        })
        .collect();
    // The outcome names of the two drivers, side by side.
    let as_reason = |o: &str| match o {
        "Ok" | "InSync" => "InSync".to_string(),
        other => other.to_string(),
    };
    let file_reasons: Vec<String> = file_outcomes.iter().map(|o| as_reason(o)).collect();
    assert_eq!(file_reasons, kube_outcomes, "file mode {file_outcomes:?}");
    assert_eq!(kube_outcomes, ["InSync", "InSync", "InUse"]);
    for (n, ..) in &disks {
        let f = backing_chain(&file_host.path().join(format!("img/{n}.qcow2"))).len();
        let k = backing_chain(&h.dir.path().join(format!("img/{n}.qcow2"))).len();
        assert_eq!(f, k, "{n}: the same chain after both drivers");
    }
}

/// An API server that keeps one Lease in memory, as Kubernetes does: a create of an existing
/// lease and a write carrying an old `resourceVersion` are answered 409.
fn lease_server(
    mut api: Handle,
    store: Arc<std::sync::Mutex<Option<Value>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((req, send)) = api.next_request().await {
            let method = req.method().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let status = |code: u16, reason: &str| {
                (
                    code,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": reason, "code": code, "message": reason}),
                )
            };
            let (code, out) = {
                let mut s = store.lock().unwrap();
                match method.as_str() {
                    "GET" => match s.as_ref() {
                        Some(l) => (200, l.clone()),
                        None => status(404, "NotFound"),
                    },
                    "POST" if s.is_some() => status(409, "AlreadyExists"),
                    "POST" => {
                        let mut l = body;
                        l["metadata"]["resourceVersion"] = json!("1");
                        *s = Some(l.clone());
                        (201, l)
                    }
                    "PUT" => {
                        let current = s.as_ref().map(|l| l["metadata"]["resourceVersion"].clone());
                        if current.as_ref() != Some(&body["metadata"]["resourceVersion"]) {
                            status(409, "Conflict")
                        } else {
                            let n: u64 = current.unwrap().as_str().unwrap().parse().unwrap();
                            let mut l = body;
                            l["metadata"]["resourceVersion"] = json!((n + 1).to_string());
                            *s = Some(l.clone());
                            (200, l)
                        }
                    }
                    other => panic!("unexpected {other}"),
                }
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&out).unwrap()))
                    .unwrap(),
            );
        }
    })
}

/// Two agents for one node: only one holds the node's lease; the other takes it only once the
/// holder stops renewing for longer than the lease's duration, and the old holder then learns
/// it lost it.
#[tokio::test(flavor = "multi_thread")]
async fn two_agents_for_one_node_only_one_holds_the_lease() {
    use diskchain::kubernetes::lease::NodeLease;
    let store = Arc::new(std::sync::Mutex::new(None));
    let agent = |id: &str| {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = lease_server(handle, store.clone());
        let lease = NodeLease::new(
            Client::new(svc, "default"),
            "diskchain-system",
            "node-a",
            id,
            Duration::from_secs(1),
        );
        (lease, server)
    };
    let (a, _sa) = agent("pod-a");
    let (b, _sb) = agent("pod-b");
    let d = Duration::from_secs(5);
    use diskchain::kubernetes::lease::Hold;
    assert_eq!(
        a.try_hold(d).await.unwrap(),
        Hold::Held,
        "a takes the free lease"
    );
    assert!(a.holding());
    assert_eq!(
        b.try_hold(d).await.unwrap(),
        Hold::Other("pod-a".into()),
        "b waits while a holds it"
    );
    assert_eq!(a.try_hold(d).await.unwrap(), Hold::Held, "a renews");
    assert!(matches!(b.try_hold(d).await.unwrap(), Hold::Other(_)));
    assert_eq!(b.holder().await.unwrap().as_deref(), Some("pod-a"));
    // a stops renewing (it died): after the lease's duration b takes it over; a stopped
    // writing before that (its renew deadline is two thirds of the duration).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !a.holding(),
        "a is fenced once its last renewal is past the renew deadline"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        b.try_hold(d).await.unwrap(),
        Hold::Held,
        "b takes the expired lease"
    );
    assert_eq!(
        a.try_hold(d).await.unwrap(),
        Hold::Other("pod-b".into()),
        "a, come back, learns it lost the lease"
    );
    assert!(a.lost() && !a.holding());
    assert_eq!(a.holder().await.unwrap().as_deref(), Some("pod-b"));
    // b shuts down cleanly: it releases the lease, and a new agent takes it at once.
    b.release(d).await;
    assert_eq!(b.holder().await.unwrap(), None);
    let (c, _sc) = agent("pod-c");
    assert_eq!(
        c.try_hold(d).await.unwrap(),
        Hold::Held,
        "c takes the released lease at once"
    );
    let l = store.lock().unwrap().clone().unwrap();
    assert_eq!(l["metadata"]["name"], "diskchain-node-a");
    assert_eq!(l["spec"]["leaseTransitions"], 2);
}

/// A scheduled backup due since the resource was created (the agent was down at 02:00) runs
/// once after the reconcile: the status shows the point and when the next is due, and a
/// `BackupTaken` event says what was written.
#[tokio::test(flavor = "multi_thread")]
async fn a_due_scheduled_backup_runs_after_the_reconcile() {
    let h = host();
    let (ctx, mut api) = context(&h);
    let repo = h.dir.path().join("img/backups/vda");
    let mut v = serde_json::to_value(object(
        "node-a",
        &h.top,
        &[("golden", &h.base)],
        true,
        false,
    ))
    .unwrap();
    v["spec"]["backup"] = json!({"repository": repo, "schedule": "0 2 * * *",
                                 "verify": {"schedule": "0 5 * * 0"}});
    v["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    let obj: DiskChain = serde_json::from_value(v.clone()).unwrap();
    let server = tokio::spawn(async move {
        let (_, uri, body, send) = next(&mut api).await;
        assert!(uri.contains("/status?"), "{uri}");
        assert_eq!(body["status"]["backups"]["points"], 1, "{body}");
        assert!(body["status"]["backups"]["next"].is_string(), "{body}");
        reply(send, &v);
        let (_, _, body, send) = next(&mut api).await;
        assert_eq!(body["reason"], "InSync");
        reply(send, &body);
        let (_, _, body, send) = next(&mut api).await;
        assert_eq!(body["reason"], "BackupTaken", "{body}");
        assert!(
            body["note"].as_str().unwrap().starts_with("full backup"),
            "{body}"
        );
        reply(send, &body);
        // The verify due since the resource was created reads every point back.
        let (_, _, body, send) = next(&mut api).await;
        assert_eq!(body["reason"], "Verified", "{body}");
        reply(send, &body);
    });
    reconcile(Arc::new(obj), ctx.clone()).await.unwrap();
    server.await.unwrap();
    assert!(repo.join("last-verify.json").exists());
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join("manifest.json")).unwrap())
            .unwrap();
    let point = repo.join(m["points"][0]["file"].as_str().unwrap());
    assert_eq!(
        view_sha256(&point, "qcow2", h.dir.path()),
        view_sha256(&h.top, "qcow2", h.dir.path()),
        "the point reads as the disk"
    );
}

/// A chain changed by hand behind a resource in sync for its generation is put back, and the
/// event says the drift was corrected.
#[tokio::test(flavor = "multi_thread")]
async fn drift_by_hand_is_corrected_and_said_so() {
    let h = host();
    let (ctx, mut api) = context(&h);
    let view = view_sha256(&h.top, "qcow2", h.dir.path());
    // Someone slips an empty layer between the base and the top.
    let mid = h.dir.path().join("img/mid.qcow2");
    create(&mid, 0, Some((&h.base, "qcow2")), &[]);
    let ok = std::process::Command::new("qemu-img")
        .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&mid)
        .arg(&h.top)
        .status()
        .unwrap();
    assert!(ok.success());
    let mut obj = object("node-a", &h.top, &[("golden", &h.base)], true, false);
    obj.status = Some(
        serde_json::from_value(json!({"observedGeneration": 3, "conditions": [
            {"type": "Ready", "status": "True", "reason": "InSync", "message": "", "observedGeneration": 3}
        ]}))
        .unwrap(),
    );
    let obj_json = serde_json::to_value(&obj).unwrap();
    let server = tokio::spawn(async move {
        let (events, (_, uri, _, send)) = step_events(&mut api).await;
        assert_step_events(&events);
        assert!(uri.contains("/status?"), "{uri}");
        reply(send, &obj_json);
        let (_, _, body, send) = next(&mut api).await;
        assert_eq!(body["reason"], "DriftCorrected", "{body}");
        reply(send, &body);
        api
    });
    reconcile(Arc::new(obj), ctx.clone()).await.unwrap();
    let mut api = server.await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(300), api.next_request()).await;
    assert!(nothing.is_err(), "InSync again: no second event");
    assert_eq!(backing_chain(&h.top), vec![h.base.clone(), h.top.clone()]);
    assert_eq!(view_sha256(&h.top, "qcow2", h.dir.path()), view);
}

/// Resources without `spec.nodeName` are counted (no agent acts on them).
#[tokio::test(flavor = "multi_thread")]
async fn resources_without_a_node_are_counted() {
    let h = host();
    let (ctx, mut api) = context(&h);
    let mut lost = object("x", &h.top, &[], false, false);
    lost.spec.node_name = None;
    lost.metadata.name = Some("lost".into());
    // The API server answers only the resources without a node (the field selector); the
    // agent asks for their metadata alone, not for every resource of the cluster.
    let list = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                      "metadata": {"resourceVersion": "9"},
                      "items": [{"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                                 "metadata": serde_json::to_value(&lost).unwrap()["metadata"]}]});
    let server = tokio::spawn(async move {
        let (m, uri, _, send) = next(&mut api).await;
        assert_eq!(m, "GET");
        assert!(
            uri.starts_with("/apis/diskchain.dev/v1alpha1/diskchains")
                && uri.contains("fieldSelector=spec.nodeName%3D"),
            "{uri}"
        );
        reply(send, &list);
    });
    let api: kube::Api<DiskChain> = kube::Api::all(ctx.client.clone());
    let n = diskchain::kubernetes::count_unassigned(&api).await.unwrap();
    server.await.unwrap();
    assert_eq!(n, 1);
}

/// A resource deleted while the agent was down waits on diskchain's finalizer; when the agent
/// comes back, its controller lists the node's resources (by the `spec.nodeName` field
/// selector), finds it and finalizes it: the record is dropped, an event says so, the finalizer
/// is removed, and no image is touched.
#[tokio::test(flavor = "multi_thread")]
async fn a_resource_deleted_while_the_agent_was_down_is_finalized_when_it_comes_back() {
    let h = host();
    // The agent converged the disk (keeping the base), then stopped.
    let kept = object("node-a", &h.top, &[("golden", &h.base)], true, false);
    {
        let (ctx, api) = context(&h);
        let server = auto_server(
            api,
            [("vda".to_string(), serde_json::to_value(&kept).unwrap())].into(),
        );
        reconcile(Arc::new(kept), ctx.clone()).await.unwrap();
        drop(ctx);
        server.await.unwrap();
    }
    let record = h.dir.path().join("state/disks/default/vda.json");
    assert!(record.exists());
    let images: Vec<_> = [&h.base, &h.top].iter().map(|f| fingerprint(f)).collect();

    // While it was down, the resource was deleted: the API server keeps it, with a deletion
    // time, until the finalizer is gone. A new agent starts its controller.
    let (ctx, mut api) = context(&h);
    let deleted = object("node-a", &h.top, &[("golden", &h.base)], true, true);
    let mut released = serde_json::to_value(&deleted).unwrap();
    released["metadata"]["finalizers"] = json!([]);
    let list = json!({"apiVersion": "diskchain.dev/v1alpha1", "kind": "DiskChainList",
                      "metadata": {"resourceVersion": "12"},
                      "items": [serde_json::to_value(&deleted).unwrap()]});
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut watches = Vec::new();
        loop {
            let (m, uri, body, send) = next(&mut api).await;
            if m == "GET" {
                assert!(
                    uri.starts_with("/apis/diskchain.dev/v1alpha1/diskchains?"),
                    "{uri}"
                );
                assert!(
                    uri.contains("fieldSelector=spec.nodeName%3Dnode-a"),
                    "only this node's resources are watched: {uri}"
                );
                if uri.contains("watch=true") {
                    // Held open: nothing more happens to the resource.
                    watches.push(send);
                } else {
                    reply(send, &list);
                }
                continue;
            }
            assert!(
                !uri.contains("/status"),
                "no status for a deleted resource: {uri}"
            );
            if m == "POST" && uri.contains("/events") {
                seen.push(format!("event {}", body["reason"].as_str().unwrap()));
                reply(send, &body);
                continue;
            }
            assert_eq!(m, "PATCH", "{uri}");
            assert!(
                uri.starts_with("/apis/diskchain.dev/v1alpha1/namespaces/default/diskchains/vda?"),
                "{uri}"
            );
            assert!(
                body.to_string().contains("remove"),
                "the finalizer is removed: {body}"
            );
            seen.push("finalizer removed".to_string());
            reply(send, &released);
            return seen;
        }
    });
    let controller = tokio::spawn(diskchain::kubernetes::control(
        kube::Api::all(ctx.client.clone()),
        ctx.clone(),
        2,
    ));
    let seen = server.await.unwrap();
    controller.abort();
    assert_eq!(seen, ["event Released", "finalizer removed"]);
    assert!(!record.exists(), "the record is dropped");
    let after: Vec<_> = [&h.base, &h.top].iter().map(|f| fingerprint(f)).collect();
    assert_eq!(images, after, "no image touched");
}

/// The same event again (same reason and note) raises the first one's series count; another
/// note is a new event, even with the same reason (kube-runtime's `Recorder` would fold it into
/// the first and keep the first note).
#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_event_is_counted_and_a_new_note_is_a_new_event() {
    use kube::runtime::events::{Event, EventType};
    let h = host();
    let (ctx, mut api) = context(&h);
    let obj = object("node-a", &h.top, &[], true, false);
    let reference = kube::Resource::object_ref(&obj, &());
    let ev = |note: &str| Event {
        type_: EventType::Warning,
        reason: "BackupFailed".into(),
        note: Some(note.into()),
        action: "Backup".into(),
        secondary: None,
    };
    let server = tokio::spawn(async move {
        let (m, uri, first, send) = next(&mut api).await;
        assert_eq!(m, "POST");
        assert!(uri.starts_with("/apis/events.k8s.io/v1/namespaces/default/events"));
        assert_eq!(first["note"], "the repository is full");
        assert_eq!(first["reportingController"], "diskchain");
        assert_eq!(first["reportingInstance"], "node-a");
        assert_eq!(first["regarding"]["name"], "vda");
        reply(send, &first);
        let (m, uri, body, send) = next(&mut api).await;
        assert_eq!(m, "PATCH", "the same event again is counted");
        let name = first["metadata"]["name"].as_str().unwrap();
        assert!(uri.contains(&format!("/events/{name}?")), "{uri}");
        assert_eq!(body["series"]["count"], 2, "{body}");
        reply(send, &first);
        let (m, _, body, send) = next(&mut api).await;
        assert_eq!(m, "POST", "another note is another event");
        assert_eq!(body["note"], "the repository is gone");
        reply(send, &body);
    });
    for note in [
        "the repository is full",
        "the repository is full",
        "the repository is gone",
    ] {
        ctx.recorder.publish(&ev(note), &reference).await.unwrap();
    }
    server.await.unwrap();
}

/// Two resources of the node name one disk: the newer one, which would flatten away the older one's kept point, is refused naming the older
/// and looked at again at the resync; nothing is written. While a reconcile works on the disk,
/// even the older one waits (`InUse`).
#[tokio::test(flavor = "multi_thread")]
async fn a_disk_claimed_by_two_resources_is_managed_by_the_older_only() {
    let h = host();
    let (ctx, api) = context(&h);
    let mut older = object("node-a", &h.top, &[("golden", &h.base)], true, false);
    older.metadata.creation_timestamp =
        Some(serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap());
    let mut newer = object("node-a", &h.top, &[], true, false);
    newer.metadata.name = Some("vdb".into());
    newer.metadata.uid = Some("u-2".into());
    newer.metadata.creation_timestamp =
        Some(serde_json::from_value(json!("2026-06-01T00:00:00Z")).unwrap());
    let (reader, mut writer) = kube::runtime::reflector::store::<DiskChain>();
    for o in [&older, &newer] {
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(o.clone()));
    }
    assert!(ctx.resources.set(reader).is_ok());
    let images: Vec<_> = [&h.base, &h.top].iter().map(|f| fingerprint(f)).collect();
    let server = auto_server(
        api,
        [
            ("vda".to_string(), serde_json::to_value(&older).unwrap()),
            ("vdb".to_string(), serde_json::to_value(&newer).unwrap()),
        ]
        .into(),
    );

    // The newer one first: refused, nothing written, retried at the resync.
    let action = reconcile(Arc::new(newer.clone()), ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(ctx.resync)
    );
    let after: Vec<_> = [&h.base, &h.top].iter().map(|f| fingerprint(f)).collect();
    assert_eq!(images, after, "the newer resource wrote nothing");
    assert_eq!(
        backing_chain(&h.top).len(),
        2,
        "the older one's point is kept"
    );

    // The older one manages the disk.
    reconcile(Arc::new(older.clone()), ctx.clone())
        .await
        .unwrap();

    // While a reconcile of another resource works on the disk (its claim held), even the
    // older one waits.
    let newer_disk = diskchain_crd::DesiredDisk::from_object(&newer).unwrap();
    let busy = ctx
        .claims
        .take(
            &newer_disk,
            &(0, newer_disk.key.clone()),
            &[],
            &ctx.roots,
            &ctx.state,
        )
        .expect("nothing else works on the disk now");
    let r = reconcile(Arc::new(older.clone()), ctx.clone()).await;
    assert!(r.is_err(), "InUse is requeued with a backoff: {r:?}");
    drop(busy);
    drop(ctx);
    let statuses = server.await.unwrap();
    let reasons: Vec<(String, String, String)> = statuses
        .iter()
        .map(|s| {
            let ready = s["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Degraded")
                .unwrap()
                .clone();
            (
                s["name"].as_str().unwrap().to_string(),
                ready["reason"].as_str().unwrap().to_string(),
                s["status"]["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert_eq!(
        (reasons[0].0.as_str(), reasons[0].1.as_str()),
        ("vdb", "BadInput")
    );
    assert!(
        reasons[0].2.contains("older DiskChain \"vda\"") && reasons[0].2.contains("top.qcow2"),
        "{}",
        reasons[0].2
    );
    assert_eq!(
        (reasons[1].0.as_str(), reasons[1].1.as_str()),
        ("vda", "InSync")
    );
    assert_eq!(
        (reasons[2].0.as_str(), reasons[2].1.as_str()),
        ("vda", "InUse")
    );
    assert!(
        reasons[2].2.contains("\"vdb\" is working"),
        "{}",
        reasons[2].2
    );
    let after: Vec<_> = [&h.base, &h.top].iter().map(|f| fingerprint(f)).collect();
    assert_eq!(images, after);
}

/// A live disk in Kubernetes mode, on a real libvirtd: a running domain's disk is flattened
/// through libvirt while the guest runs, and its scheduled backup is taken through libvirt's
/// backup API, as in file mode. The guest's view is unchanged and the backup reads as it.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_disk_is_reconciled_through_libvirt_and_backed_up() {
    use diskchain_tests::libvirt::{Domain, URI, open_up};
    let h = host();
    open_up(h.dir.path());
    open_up(&h.dir.path().join("img"));
    let dom = Domain::start("dc-kube-live", &h.top);
    dom.guest_write(9, 40 << 20, 1 << 20);
    dom.flush();
    let (ctx, api) = context(&h);
    let repo = h.dir.path().join("img/backups/vda");
    let v = json!({
        "apiVersion": "diskchain.dev/v1alpha1",
        "kind": "DiskChain",
        "metadata": {"name": "vda", "namespace": "default", "uid": "u-1", "generation": 1,
                     "resourceVersion": "7", "finalizers": [FINALIZER],
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": "node-a",
                 "source": {"libvirt": {"uri": URI, "domain": "dc-kube-live", "target": "vda"}},
                 "snapshots": [],
                 "backup": {"repository": repo, "schedule": "0 2 * * *"}},
    });
    let obj: DiskChain = serde_json::from_value(v.clone()).unwrap();
    let view = view_sha256(&h.top, "qcow2", h.dir.path());
    let server = auto_server_with_events(api, [("vda".to_string(), v)].into());
    let action = reconcile(Arc::new(obj), ctx.clone()).await;
    assert!(action.is_ok(), "{action:?}");
    drop(ctx);
    let (statuses, events) = server.await.unwrap();
    let last = statuses.last().unwrap();
    assert_eq!(
        status(last, "Ready"),
        ("True".into(), "InSync".into()),
        "{last}"
    );
    assert_eq!(last["status"]["backups"]["points"], 1, "{last}");
    assert!(
        events.iter().any(|e| e == "BackupTaken"),
        "a backup event: {events:?}"
    );
    assert!(events.iter().any(|e| e == "StepDone"), "{events:?}");
    // Flattened live: the running domain's chain is one file, at the active image's path, and
    // the guest reads what it wrote.
    dom.flush();
    let chain = dom.chain();
    assert_eq!(chain.len(), 1, "{chain:?}");
    let active = chain[0].clone();
    assert_eq!(view_sha256(&active, "qcow2", h.dir.path()), view);
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join("manifest.json")).unwrap())
            .unwrap();
    // Taken through libvirt's backup API: its checkpoint is the domain's.
    let checkpoint = m["points"][0]["checkpoint"].as_str().unwrap();
    assert!(
        diskchain_tests::libvirt::virsh(&["checkpoint-list", "--name", "dc-kube-live"])
            .contains(checkpoint),
        "{m}"
    );
    let point = repo.join(m["points"][0]["file"].as_str().unwrap());
    assert_eq!(view_sha256(&point, "qcow2", h.dir.path()), view);
}

/// Like [`auto_server`], and also returns every event's reason (waiting up to 2 min for each
/// request: a live step may take that long).
fn auto_server_with_events(
    mut api: Handle,
    objects: std::collections::HashMap<String, Value>,
) -> tokio::task::JoinHandle<(Vec<Value>, Vec<String>)> {
    tokio::spawn(async move {
        let (mut statuses, mut events) = (Vec::new(), Vec::new());
        while let Ok(Some((req, send))) =
            tokio::time::timeout(Duration::from_secs(120), api.next_request()).await
        {
            let uri = req.uri().path().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if uri.ends_with("/status") {
                let name = uri.trim_end_matches("/status").rsplit('/').next().unwrap();
                statuses.push(json!({"name": name, "status": body["status"].clone()}));
                reply(send, &objects[name]);
            } else {
                if uri.contains("/events") {
                    events.push(body["reason"].as_str().unwrap_or("").to_string());
                }
                reply(send, &body);
            }
        }
        (statuses, events)
    })
}

/// Events are for people: an API server that refuses them (RBAC without `events`, say) does not
/// fail a reconcile whose disk converged, nor hold a deletion's finalizer.
#[tokio::test(flavor = "multi_thread")]
async fn refused_events_fail_neither_a_reconcile_nor_a_deletion() {
    let h = host();
    let (ctx, mut api) = context(&h);
    let obj = object("node-a", &h.top, &[], true, false);
    let obj_json = serde_json::to_value(&obj).unwrap();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some((req, send))) =
            tokio::time::timeout(Duration::from_secs(5), api.next_request()).await
        {
            let uri = req.uri().path().to_string();
            let method = req.method().to_string();
            if uri.contains("/events") {
                seen.push("event refused".to_string());
                send.send_response(
                    Response::builder()
                        .status(403)
                        .body(Body::from(
                            serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1",
                                "status": "Failure", "reason": "Forbidden", "code": 403,
                                "message": "events.events.k8s.io is forbidden"}))
                            .unwrap(),
                        ))
                        .unwrap(),
                );
            } else {
                seen.push(format!("{method} {}", uri.rsplit('/').next().unwrap()));
                reply(send, &obj_json);
            }
        }
        seen
    });
    let r = reconcile(Arc::new(obj), ctx.clone()).await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(backing_chain(&h.top), vec![h.top.clone()], "converged");
    let deleted = object("node-a", &h.top, &[], true, true);
    let r = reconcile(Arc::new(deleted), ctx.clone()).await;
    assert!(r.is_ok(), "{r:?}");
    drop(ctx);
    let seen = server.await.unwrap();
    assert!(seen.contains(&"PATCH status".to_string()), "{seen:?}");
    assert_eq!(
        seen.last().map(String::as_str),
        Some("PATCH vda"),
        "the finalizer is removed: {seen:?}"
    );
}

/// A lowered retention is merged at the next reconcile, without waiting for a backup: a
/// `RetentionMerged` event says what went, and the status counts the points left.
#[tokio::test(flavor = "multi_thread")]
async fn a_lowered_retention_is_merged_at_the_next_reconcile() {
    let h = host();
    let (ctx, api) = context(&h);
    let repo = h.dir.path().join("img/backups/vda");
    let mut v = serde_json::to_value(object(
        "node-a",
        &h.top,
        &[("golden", &h.base)],
        true,
        false,
    ))
    .unwrap();
    v["spec"]["backup"] = json!({"repository": repo});
    let obj: DiskChain = serde_json::from_value(v.clone()).unwrap();
    // Three backups taken by hand (`diskchain backup`), a write between each.
    let disk = diskchain_crd::DesiredDisk::from_object(&obj).unwrap();
    let host = diskchain::plan::Host::new(&ctx.roots, &ctx.state, std::slice::from_ref(&disk));
    for i in 0..3u8 {
        io(
            &h.top,
            "qcow2",
            &[format!("write -P {} {}M 1M", 30 + i, 20 + i)],
        );
        diskchain::backup::backup_disk(
            &disk,
            &host,
            Default::default(),
            chrono::Utc::now().timestamp() + i64::from(i),
            &diskchain::progress::Silent,
        )
        .map_err(|e| e.error)
        .unwrap();
    }
    // Lowered to one point.
    v["spec"]["backup"]["retention"] = json!({"keepLast": 1});
    let obj: DiskChain = serde_json::from_value(v.clone()).unwrap();
    let server = auto_server_with_events(api, [("vda".to_string(), v)].into());
    reconcile(Arc::new(obj), ctx.clone()).await.unwrap();
    drop(ctx);
    let (statuses, events) = server.await.unwrap();
    assert!(events.iter().any(|e| e == "RetentionMerged"), "{events:?}");
    assert!(!events.iter().any(|e| e == "BackupTaken"), "{events:?}");
    let last = statuses.last().unwrap();
    assert_eq!(last["status"]["backups"]["points"], 1, "{last}");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join("manifest.json")).unwrap())
            .unwrap();
    let point = repo.join(m["points"][0]["file"].as_str().unwrap());
    assert_eq!(
        view_sha256(&point, "qcow2", h.dir.path()),
        view_sha256(&h.top, "qcow2", h.dir.path()),
        "the newest point is kept and reads as the disk"
    );
}

/// On a root the operator assigned to no namespace, a resource changes only what it adopted by
/// naming it (K4): one naming no layer of an existing chain neither merges it away nor deletes
/// it, and one adopting an existing point does not revert to it; its status says why. With the
/// root assigned to its namespace, the same spec flattens the chain.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_shared_root_a_resource_changes_only_what_it_adopted() {
    let h = host();
    let (ctx, mut api) = context(&h);
    let mut shared = Arc::try_unwrap(ctx).ok().unwrap();
    shared.tenancy = Default::default();
    let ctx = Arc::new(shared);
    let before = (fingerprint(&h.base), fingerprint(&h.top));
    let view = view_sha256(&h.top, "qcow2", h.dir.path());
    let mut v = serde_json::to_value(object("node-a", &h.top, &[], true, false)).unwrap();
    v["spec"]["prune"] = json!(true);
    let flatten: DiskChain = serde_json::from_value(v).unwrap();
    let mut v =
        serde_json::to_value(object("node-a", &h.top, &[("b", &h.base)], true, false)).unwrap();
    v["spec"]["prune"] = json!(true);
    v["spec"]["revert"] = json!({"to": "b", "id": "x1"});
    let revert: DiskChain = serde_json::from_value(v).unwrap();
    for (obj, field) in [(flatten, "spec.snapshots"), (revert, "spec.revert.to")] {
        let answer = serde_json::to_value(&obj).unwrap();
        let server = tokio::spawn(async move {
            let (_, uri, body, send) = next(&mut api).await;
            assert!(uri.contains("/status?"), "{uri}");
            assert_eq!(status(&body, "Ready"), ("False".into(), "BadInput".into()));
            let m = body["status"]["message"].as_str().unwrap().to_string();
            assert!(m.contains(field) && m.contains("--namespace-root"), "{m}");
            reply(send, &answer);
            let (_, _, body, send) = next(&mut api).await;
            assert_eq!(body["reason"], "BadInput");
            reply(send, &body);
            api
        });
        reconcile(Arc::new(obj), ctx.clone()).await.unwrap();
        api = server.await.unwrap();
        assert_eq!(
            (fingerprint(&h.base), fingerprint(&h.top)),
            before,
            "{field}"
        );
        assert_eq!(backing_chain(&h.top), vec![h.base.clone(), h.top.clone()]);
        assert_eq!(view_sha256(&h.top, "qcow2", h.dir.path()), view);
    }
}
