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
use kube::runtime::events::{Recorder, Reporter};
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
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "diskchain".into(),
                instance: Some("node-a".into()),
            },
        ),
        client,
        node: "node-a".into(),
        roots: Roots::new(&[h.dir.path().join("img")]).unwrap(),
        state: StateDir::new(h.dir.path().join("state")),
        exec: Default::default(),
        resync: Duration::from_secs(300),
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
    let golden = view_sha256(&h.base, "qcow2", h.dir.path());
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
        let (m, uri, body, send) = next(&mut api).await;
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
        let (m, uri, body, send) = next(&mut api).await;
        assert_eq!(m, "POST");
        assert!(
            uri.starts_with("/apis/events.k8s.io/v1/namespaces/default/events"),
            "{uri}"
        );
        assert_eq!(body["reason"], "InSync", "{body}");
        reply(send, &body);
        api
    });
    let action = reconcile(Arc::new(obj), ctx.clone()).await;
    assert!(action.is_ok(), "{action:?}");
    server.await.unwrap();
    assert_eq!(backing_chain(&h.top), vec![h.top.clone()], "flattened");
    assert_eq!(view_sha256(&h.top, "qcow2", h.dir.path()), view);
    // The base was private: it may have taken the data; the view is what counts.
    let _ = golden;
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
    let r = reconcile(Arc::new(obj), ctx.clone()).await;
    server.await.unwrap();
    assert!(
        r.is_err(),
        "a failure is returned, so the controller requeues with backoff"
    );
    assert_eq!(backing_chain(&h.top).len(), 2, "nothing was written");
}
