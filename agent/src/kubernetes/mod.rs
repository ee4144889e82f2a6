//! Kubernetes mode: `DiskChain` resources of this node reconciled by a kube-rs `Controller`
//! through the same per-disk reconcile as file mode ([`crate::apply::reconcile_disk`]).
//!
//! Per resource: a finalizer (`diskchain.dev/cleanup`) so a deletion is seen; the spec taken
//! past the boundary ([`DesiredDisk::from_object`], the same checks as a file); the reconcile run
//! on a blocking thread; the status written by server-side apply on the status subresource
//! (`observedGeneration`, `Ready`/`Progressing`/`Degraded` conditions with the outcome as
//! reason, the points and bindings, the last plan); an event when the outcome changes (not one
//! per resync). A deletion deletes no image: the finalizer drops the disk's record (an unfinished
//! plan's journal stays, so a spec for the same disk resumes it) and lets the resource go.
//! A resource without `spec.nodeName`, or of another node, is never acted on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use diskchain_crd::{Condition, DesiredDisk, DiskChain, DiskChainStatus, DiskKey, PlanSummary};
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};

use crate::apply::{ApplyOptions, reconcile_disk};
use crate::execute::ExecOptions;
use crate::observe::Roots;
use crate::outcome::Outcome;
use crate::plan::Host;
use crate::state::StateDir;

pub mod claims;
pub mod events;
pub mod lease;
pub mod lenient;
pub mod ownership;
pub mod tenancy;

/// The finalizer diskchain puts on every resource it manages.
pub const FINALIZER: &str = "diskchain.dev/cleanup";

/// The field manager of diskchain's status writes.
const MANAGER: &str = "diskchain";

/// What every reconcile of this node's agent shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// This node's name.
    pub node: String,
    /// Where images may be.
    pub roots: Roots,
    /// Records, journals and locks.
    pub state: StateDir,
    /// Passed to the executors.
    pub exec: ExecOptions,
    /// How long a disk in sync waits before it is observed again.
    pub resync: Duration,
    /// Publishes events.
    pub recorder: Arc<events::Events>,
    /// Failed reconciles in a row, per resource (`namespace/name`): the requeue backs off.
    pub failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// Set on SIGTERM: no new step starts (a plan stays journaled and resumes on the next start).
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// The metrics and readiness the HTTP endpoints serve.
    pub shared: Arc<crate::reconcile::Shared>,
    /// The node's resources as the controller's watch sees them (set when it starts): a disk
    /// claimed by two of them is managed by the older.
    pub resources: std::sync::OnceLock<kube::runtime::reflector::Store<DiskChain>>,
    /// Which resource manages which disk, and which disks reconciles are working on.
    pub claims: claims::Claims,
    /// The cluster-wide claims on images (`None` in tests that do not exercise them).
    pub ownership: Option<ownership::Ownership>,
    /// Which namespaces may use which roots.
    pub tenancy: tenancy::Tenancy,
    /// The resources this agent keeps a record of (a disk it reconciled): one that leaves the
    /// node or disappears is released.
    pub records: std::sync::Mutex<std::collections::BTreeSet<DiskKey>>,
    /// Resources released (deleted, or gone from the node): their metric series are removed
    /// once the reconcile that released them is counted.
    pub released: std::sync::Mutex<std::collections::BTreeSet<DiskKey>>,
    /// The resources a reconcile or a release is working on now.
    pub busy: std::sync::Mutex<std::collections::BTreeSet<DiskKey>>,
    /// The node's lease (`None` in tests: always held). While it is not held, reconciles start
    /// nothing and write nothing.
    pub lease: Option<Arc<lease::NodeLease>>,
}

impl Context {
    /// How long resource `key` waits after another failure: 5 s doubling to 5 min.
    fn failed(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(key.to_string()).or_default();
        *n = n.saturating_add(1);
        Duration::from_secs(5u64 << (*n - 1).min(6)).min(Duration::from_secs(300))
    }

    /// Publishes `ev` about `obj`. Events are for people: one the API server refuses is logged,
    /// and the reconcile (or the deletion) goes on.
    async fn publish(&self, ev: &Event, obj: &DiskChain) {
        if !self.may_act() {
            tracing::warn!(resource = %obj.name_any(), reason = ev.reason, "not holding this node's lease: event not published");
            return;
        }
        if let Err(e) = self.recorder.publish(ev, &obj.object_ref(&())).await {
            tracing::warn!(resource = %obj.name_any(), reason = ev.reason, error = %e, "cannot publish an event");
        }
    }

    /// The roots namespace `ns` may use, and the run of `disks` over them: confined to the
    /// namespace's roots, other users of a layer looked for under every root, and the guard of
    /// shared roots on.
    fn host(&self, ns: &str, disks: &[DesiredDisk]) -> Host {
        let roots = self.tenancy.roots_for(ns, &self.roots);
        let mut host = Host::new(&roots, &self.state, disks);
        host.scan_roots = self.roots.clone();
        host.shared_roots = Some(self.tenancy.shared(&self.roots));
        host
    }

    /// True while this agent holds the node's lease: it may start steps and write to the API.
    pub fn may_act(&self) -> bool {
        self.lease.as_ref().is_none_or(|l| l.holding())
    }

    fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// Why a reconcile failed (the controller requeues it with a backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// The disk's reconcile did not end well; the status says why.
    #[error("{0}")]
    Disk(String),
    /// The finalizer could not be added or removed.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

/// The event for a retention merge.
fn retention_merged(r: &crate::backup::RetentionReport) -> Event {
    Event {
        type_: EventType::Normal,
        reason: "RetentionMerged".into(),
        note: Some(format!(
            "the retention policy merged {} backup point(s) away ({}): {} written",
            r.done.removed.len(),
            r.done.removed.join(", "),
            crate::units::human_bytes(r.done.total_bytes),
        )),
        action: "Backup".into(),
        secondary: None,
    }
}

/// The conditions `obj`'s status shows now.
fn previous(obj: &DiskChain) -> &[Condition] {
    obj.status.as_ref().map_or(&[], |s| s.conditions.as_slice())
}

/// When `obj` was created (Unix seconds; 0 when unknown).
fn created_of(obj: &DiskChain) -> i64 {
    obj.metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second())
}

/// True when `obj` is this node's to manage.
fn ours(obj: &DiskChain, node: &str) -> bool {
    obj.spec.node_name.as_deref() == Some(node)
}

/// Reconciles one `DiskChain`.
pub async fn reconcile(obj: Arc<DiskChain>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.may_act() {
        // Fenced (the node's lease is not renewed): nothing starts, nothing is written.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    if !ours(&obj, &ctx.node) {
        // Another node's (or nobody's): never touched, not even the finalizer.
        return Ok(Action::await_change());
    }
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let key = DiskKey::new(Some(&ns), &obj.name_any());
    let Some(_busy) = Busy::take(&ctx, &key) else {
        // Being released (it left the node and came back): looked at again shortly.
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    if obj.metadata.deletion_timestamp.is_none()
        && let Some(action) = claim_first(&obj, &ctx).await?
    {
        return Ok(action);
    }
    let api: Api<DiskChain> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(obj) => apply(obj, ctx.clone()).await,
            Finalizer::Cleanup(obj) => cleanup(obj, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// The conditions for an outcome. A condition whose status is the one in `before` keeps its
/// `lastTransitionTime` (the Kubernetes convention: the time it last changed).
fn conditions(
    outcome: Outcome,
    message: &str,
    generation: Option<i64>,
    before: &[Condition],
) -> Vec<Condition> {
    let (ready, progressing, degraded, reason) = match outcome {
        Outcome::InSync | Outcome::Ok => ("True", "False", "False", "InSync"),
        Outcome::Running => ("False", "True", "False", "Running"),
        Outcome::Suspended => ("False", "False", "False", "Suspended"),
        Outcome::BadInput => ("False", "False", "True", "BadInput"),
        Outcome::InUse => ("False", "False", "True", "InUse"),
        Outcome::Failed => ("False", "False", "True", "Failed"),
        Outcome::Stopped => ("False", "True", "False", "Stopped"),
        Outcome::NeedsOperator => ("False", "False", "True", "NeedsOperator"),
    };
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    [
        ("Ready", ready),
        ("Progressing", progressing),
        ("Degraded", degraded),
    ]
    .into_iter()
    .map(|(t, status)| Condition {
        type_: t.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.to_string(),
        last_transition_time: before
            .iter()
            .find(|c| c.type_ == t && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .or_else(|| Some(now.clone())),
        observed_generation: generation,
    })
    .collect()
}

/// The chain as the status shows it: each layer with the point it holds, its data and bitmaps.
fn chain_status(
    disk: &DesiredDisk,
    roots: &Roots,
    state: &StateDir,
) -> Vec<diskchain_crd::StatusLayer> {
    let Some(record) = state.load(&disk.key).ok().flatten() else {
        return Vec::new();
    };
    let Ok(chain) = crate::observe::observe_chain(roots, &record.active) else {
        return Vec::new();
    };
    chain
        .layers
        .iter()
        .map(|l| diskchain_crd::StatusLayer {
            point: record
                .bindings
                .iter()
                .find(|b| b.file == l.layer.path)
                .map(|b| b.name.clone()),
            file: l.layer.path.clone(),
            data_bytes: l.layer.alloc.as_ref().map_or(0, |a| a.data_bytes()),
            bitmaps: l.extras.bitmaps.iter().map(|b| b.name.clone()).collect(),
        })
        .collect()
}

/// True when the disk's backup schedule has an occurrence between its newest point (or, with no
/// point yet, when the resource was created: `created`) and now, so a backup missed while the
/// agent was down runs once.
fn backup_due(disk: &DesiredDisk, roots: &Roots, created: i64) -> bool {
    let Some(policy) = disk.spec().backup.as_ref() else {
        return false;
    };
    let Some(cron) = policy.schedule.as_deref() else {
        return false;
    };
    let Ok(dir) = roots.confine_dir(&policy.repository, "spec.backup.repository".into()) else {
        return false;
    };
    let last = crate::backup::repo::Manifest::of(&dir)
        .and_then(|m| m.points.last().map(|p| p.time_unix))
        .unwrap_or(created);
    crate::reconcile::schedule::due(cron, last, chrono::Utc::now().timestamp())
}

/// True when the disk's verify schedule has an occurrence since its last deep verify (or, before
/// the first, since the resource was created) and the repository has a point.
fn verify_due(disk: &DesiredDisk, host: &Host, created: i64) -> bool {
    let Some(cron) = disk
        .spec()
        .backup
        .as_ref()
        .and_then(|b| b.verify.as_ref())
        .map(|v| v.schedule.clone())
    else {
        return false;
    };
    let Ok(dir) = host.roots.confine_dir(
        &disk
            .spec()
            .backup
            .as_ref()
            .map(|b| b.repository.clone())
            .unwrap_or_default(),
        "spec.backup.repository".into(),
    ) else {
        return false;
    };
    if !dir.join("manifest.json").exists() {
        return false;
    }
    let last = crate::backup::last_verified(disk, host).unwrap_or(created);
    crate::reconcile::schedule::due(&cron, last, chrono::Utc::now().timestamp())
}

/// The disk's backups as the status shows them: the newest point, when the next is due, how
/// many points the repository holds.
fn backup_status(disk: &DesiredDisk, roots: &Roots) -> Option<diskchain_crd::BackupStatus> {
    let policy = disk.spec().backup.as_ref()?;
    let dir = roots
        .confine_dir(&policy.repository, "spec.backup.repository".into())
        .ok()?;
    let points = crate::backup::repo::Manifest::of(&dir)
        .map(|m| m.points)
        .unwrap_or_default();
    let last = points.last();
    // A point dated ahead of the clock (taken while it was ahead) does not push the next run.
    let now = chrono::Utc::now().timestamp();
    let after = last.map_or(now, |p| p.time_unix.min(now));
    Some(diskchain_crd::BackupStatus {
        last: last.map(|p| p.point.clone()),
        next: policy
            .schedule
            .as_deref()
            .and_then(|c| crate::reconcile::schedule::next_after(c, after))
            .and_then(|t| chrono::DateTime::<chrono::Utc>::from_timestamp(t, 0))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        points: points.len() as u32,
    })
}

/// Kubernetes mode's observer of a reconcile: an event when a plan is made and when each step
/// starts and ends (with its bytes), published in order by one task while the steps run; each
/// step's bytes and time into the metrics, as in file mode; the steps kept for the summary event.
struct KubeProgress {
    events: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<Event>>>,
    ran: std::sync::Mutex<Vec<crate::progress::StepRecord>>,
    metrics: crate::reconcile::MetricsProgress,
}

impl KubeProgress {
    /// An observer for `obj`'s reconcile, and the task publishing its events (it ends once
    /// [`KubeProgress::close`] is called and every event is sent).
    fn start(ctx: &Context, obj: &DiskChain) -> (Arc<KubeProgress>, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
        let recorder = ctx.recorder.clone();
        let reference = obj.object_ref(&());
        let lease = ctx.lease.clone();
        let publisher = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if lease.as_ref().is_some_and(|l| !l.holding()) {
                    tracing::warn!(
                        reason = ev.reason,
                        "not holding this node's lease: event not published"
                    );
                    continue;
                }
                if let Err(e) = recorder.publish(&ev, &reference).await {
                    tracing::warn!(error = %e, reason = ev.reason, "cannot publish an event");
                }
            }
        });
        let progress = KubeProgress {
            events: std::sync::Mutex::new(Some(tx)),
            ran: Default::default(),
            metrics: crate::reconcile::MetricsProgress {
                shared: ctx.shared.clone(),
            },
        };
        (Arc::new(progress), publisher)
    }

    fn send(&self, type_: EventType, reason: &str, action: &str, note: String) {
        if let Some(tx) = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = tx.send(Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: action.into(),
                secondary: None,
            });
        }
    }

    /// No more events: the publisher ends once it has sent those queued.
    fn close(&self) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn take(&self) -> Vec<crate::progress::StepRecord> {
        std::mem::take(&mut *self.ran.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl crate::progress::Progress for KubeProgress {
    fn planned(&self, _disk: &DiskKey, steps: &[diskchain_planner::Step]) {
        let total: u64 = steps.iter().map(|s| s.bytes).sum();
        self.send(
            EventType::Normal,
            "Planned",
            "Plan",
            format!(
                "{} step(s), {} predicted: {}",
                steps.len(),
                crate::units::human_bytes(total),
                steps
                    .iter()
                    .map(|s| format!(
                        "{} ({}): {}",
                        s.action.op(),
                        crate::units::human_bytes(s.bytes),
                        s.reason
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        );
    }

    fn step_started(&self, _disk: &DiskKey, index: usize, total: usize, op: &str, bytes: u64) {
        self.send(
            EventType::Normal,
            "StepStarted",
            "Apply",
            format!(
                "step {index}/{total} {op}: {} predicted",
                crate::units::human_bytes(bytes)
            ),
        );
    }

    fn step_done(
        &self,
        disk: &DiskKey,
        index: usize,
        total: usize,
        record: &crate::progress::StepRecord,
    ) {
        self.metrics.step_done(disk, index, total, record);
        self.send(
            EventType::Normal,
            "StepDone",
            "Apply",
            format!(
                "step {index}/{total} {}: {} predicted, {} written, {:.2} s",
                record.op,
                crate::units::human_bytes(record.predicted_bytes),
                crate::units::human_bytes(record.written_bytes),
                record.seconds
            ),
        );
        self.ran
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record.clone());
    }

    fn note(&self, _disk: &DiskKey, message: &str) {
        // A plan set aside, a retention merge: worth a look.
        self.send(EventType::Warning, "Note", "Reconcile", message.to_string());
    }
}

/// The metrics file mode exports for a disk, from one reconcile (and the backup it ran).
fn record_metrics(
    ctx: &Context,
    key: &DiskKey,
    result: &crate::outcome::DiskResult,
    chain_len: usize,
    backup: Option<Result<&crate::backup::BackupDone, &crate::backup::BackupError>>,
    backups: Option<&diskchain_crd::BackupStatus>,
) {
    use crate::reconcile::metrics::{DiskLabels, ResultLabels};
    let m = &ctx.shared.metrics;
    let labels = DiskLabels {
        disk: key.to_string(),
    };
    let in_sync = matches!(result.outcome, Outcome::Ok | Outcome::InSync);
    // What is left to write: nothing once the chain is the spec's; the plan that did not
    // finish otherwise.
    m.plan_bytes.get_or_create(&labels).set(if in_sync {
        0
    } else {
        result.predicted_bytes as i64
    });
    m.drift.get_or_create(&labels).set(i64::from(!in_sync));
    if chain_len > 0 {
        m.chain_length.get_or_create(&labels).set(chain_len as i64);
    }
    if let Some(b) = backup {
        let what = match b {
            Ok(done) => {
                m.backup_bytes.get_or_create(&labels).inc_by(done.bytes);
                m.backup_last_success
                    .get_or_create(&labels)
                    .set(chrono::Utc::now().timestamp());
                done.kind.as_str()
            }
            Err(_) => "backup_failed",
        };
        m.backups
            .get_or_create(&ResultLabels {
                disk: key.to_string(),
                result: what.into(),
            })
            .inc();
    }
    if let Some(b) = backups {
        m.backup_points
            .get_or_create(&labels)
            .set(i64::from(b.points));
        let next = b
            .next
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map_or(0, |t| t.timestamp());
        m.backup_next.get_or_create(&labels).set(next);
    }
}

/// Writes `status` by server-side apply on the status subresource.
async fn patch_status(
    api: &Api<DiskChain>,
    name: &str,
    status: DiskChainStatus,
) -> Result<(), Error> {
    let body = serde_json::json!({
        "apiVersion": diskchain_crd::API_VERSION,
        "kind": diskchain_crd::KIND,
        "status": status,
    });
    // The answer is not read as a `DiskChain`: a status some other writer shaped differently
    // must not fail the write.
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        api.clone().into_client(),
        api.namespace().unwrap_or(diskchain_crd::DEFAULT_NAMESPACE),
        &kube::api::ApiResource::erase::<DiskChain>(&()),
    );
    raw.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Publishes an event about `obj` when its `Ready` reason changes (not once per resync).
async fn event_on_change(
    ctx: &Context,
    obj: &DiskChain,
    reason: &str,
    note: String,
    warning: bool,
) {
    let before = obj
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.reason.clone());
    if before.as_deref() == Some(reason) {
        return;
    }
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    ctx.publish(&ev, obj).await;
}

/// A resource a reconcile or a release works on; let go on drop.
struct Busy<'a> {
    ctx: &'a Context,
    key: DiskKey,
}

impl<'a> Busy<'a> {
    /// Marks `key` busy, or `None` when something else works on it.
    fn take(ctx: &'a Context, key: &DiskKey) -> Option<Busy<'a>> {
        ctx.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
            .then(|| Busy {
                ctx,
                key: key.clone(),
            })
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.ctx
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Takes the cluster-wide claim on the disk `obj` names before anything is written for it (its
/// finalizer included): `Some` is what to do instead of reconciling (wait for another node to
/// release it, or refused: another resource manages it). A spec that does not validate, or a
/// chain that cannot be observed, is left to the reconcile to report.
async fn claim_first(obj: &DiskChain, ctx: &Arc<Context>) -> Result<Option<Action>, Error> {
    let Some(own) = &ctx.ownership else {
        return Ok(None);
    };
    let Ok(disk) = DesiredDisk::from_object(obj) else {
        return Ok(None);
    };
    if disk
        .live
        .as_ref()
        .is_some_and(|l| !ctx.tenancy.domain_allowed(&disk.key.namespace, &l.domain))
    {
        // Refused by the reconcile, before any libvirt call.
        return Ok(None);
    }
    let roots = ctx.tenancy.roots_for(&disk.key.namespace, &ctx.roots);
    let (state, d) = (ctx.state.clone(), disk.clone());
    let image = tokio::task::spawn_blocking(move || claims::resolve(&d, &roots, &state))
        .await
        .map_err(|e| Error::Disk(format!("the claim task failed: {e}")))?;
    let Some(image) = image else {
        return Ok(None);
    };
    let uid = obj.metadata.uid.clone().unwrap_or_default();
    let claim = own
        .claim(&image, &disk.key, &uid)
        .await
        .map_err(Error::Disk)?;
    let Some(message) = claim.message(&disk.key, &disk.origin(), &image) else {
        return Ok(None);
    };
    match claim {
        ownership::Claim::Waiting { .. } => {
            // Nothing is written while the other node may still write the resource.
            tracing::info!(disk = %disk.key, message, "waiting for the disk's claim");
            Ok(Some(Action::requeue(Duration::from_secs(5))))
        }
        _ => {
            refuse(ctx, obj, cap(&message)).await?;
            // The other resource may be deleted or edited: looked at again at the resync.
            Ok(Some(Action::requeue(ctx.resync)))
        }
    }
}

/// The longest message a status or an event carries: a path of a megabyte must not make a
/// status the API server refuses.
const MESSAGE_MAX: usize = 2048;

/// `m`, cut to [`MESSAGE_MAX`] bytes (at a character boundary) with a mark saying so.
pub fn cap(m: &str) -> String {
    if m.len() <= MESSAGE_MAX {
        return m.to_string();
    }
    let mut end = MESSAGE_MAX;
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes cut)", &m[..end], m.len() - end)
}

/// Seeds the record of a disk this node has none of from the resource's status (the bindings
/// another node, or this one before its state was lost, wrote there): which file holds each
/// point is never guessed again, so a point is never taken again with later content.
fn seed_from_status(obj: &DiskChain, disk: &DesiredDisk, state: &StateDir, roots: &Roots) {
    let Some(st) = obj.status.as_ref() else {
        return;
    };
    if st.bindings.is_empty() || state.load(&disk.key).ok().flatten().is_some() {
        return;
    }
    let Some(active) = claims::resolve(disk, roots, state) else {
        return;
    };
    let mut record = crate::state::DiskState::empty(&disk.key);
    record.active = active;
    record.bindings = st
        .bindings
        .iter()
        .filter_map(|b| {
            Some(crate::state::Binding {
                name: b.name.clone(),
                file: b.file.clone()?,
                adopted_from: None,
            })
        })
        .collect();
    match state.save(&record) {
        Ok(()) => {
            tracing::info!(disk = %disk.key, points = record.bindings.len(), "recorded the disk's bindings from its status (another node, or a lost state directory, had them)")
        }
        Err(e) => {
            tracing::warn!(disk = %disk.key, error = %e, "cannot record the bindings from the status")
        }
    }
}

/// Writes `obj`'s status as refused (`Degraded`, `BadInput`, `message`) and publishes the event
/// when that is new. Nothing else is done for it.
async fn refuse(ctx: &Context, obj: &DiskChain, message: String) -> Result<(), Error> {
    let generation = obj.metadata.generation;
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let api: Api<DiskChain> = Api::namespaced(ctx.client.clone(), &ns);
    patch_status(
        &api,
        &obj.name_any(),
        DiskChainStatus {
            observed_generation: generation,
            conditions: conditions(Outcome::BadInput, &message, generation, previous(obj)),
            message: Some(message.clone()),
            ..Default::default()
        },
    )
    .await?;
    event_on_change(ctx, obj, "BadInput", message, true).await;
    Ok(())
}

async fn apply(obj: Arc<DiskChain>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = obj.name_any();
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let api: Api<DiskChain> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = obj.metadata.generation;
    let disk = match DesiredDisk::from_object(&obj) {
        Ok(d) => d,
        Err(e) => {
            let message = cap(&e.to_string());
            refuse(&ctx, &obj, message).await?;
            // Nothing to retry until the spec changes.
            return Ok(Action::await_change());
        }
    };
    if let Some(l) = disk
        .live
        .as_ref()
        .filter(|l| !ctx.tenancy.domain_allowed(&disk.key.namespace, &l.domain))
    {
        let message = cap(&format!(
            "{}: spec.source.libvirt.domain: {:?} is not a domain this namespace may use; the node's operator assigns domains to namespaces (--namespace-domain, the chart's namespaceDomains). Nothing was done",
            disk.origin(),
            l.domain
        ));
        refuse(&ctx, &obj, message).await?;
        return Ok(Action::requeue(ctx.resync));
    }
    let started = std::time::Instant::now();
    // The node's other resources, for the claims on disks (and the legacy record check).
    // With cluster-wide claims (the agent), the claim taken before settled that; the node-local
    // comparison remains for a context without them.
    let others: Vec<(DesiredDisk, claims::Order)> = ctx
        .resources
        .get()
        .filter(|_| ctx.ownership.is_none())
        .map(|store| {
            store
                .state()
                .iter()
                .filter(|o| ours(o, &ctx.node) && o.metadata.deletion_timestamp.is_none())
                .filter_map(|o| {
                    let d = DesiredDisk::from_object(o).ok()?;
                    (d.key != disk.key).then(|| {
                        let order = (created_of(o), d.key.clone());
                        (d, order)
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let order = (created_of(&obj), disk.key.clone());
    let mut all = vec![disk.clone()];
    all.extend(others.iter().map(|(d, _)| d.clone()));
    let host = ctx.host(&ns, &all);
    let (steps, publisher) = KubeProgress::start(&ctx, &obj);
    let options = ApplyOptions {
        exec: ctx.exec,
        progress: steps.clone(),
        stop: Some(ctx.stop.clone()),
    };
    let key = disk.key.clone();
    let roots = host.roots.clone();
    let state = ctx.state.clone();
    let created = created_of(&obj);
    let exec = ctx.exec;
    let c = ctx.clone();
    let seen = obj.clone();
    ctx.records
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.clone());
    let (result, conflict, backup, retained, verify, chain, backups) =
        tokio::task::spawn_blocking(move || {
            // A disk new to this node starts from the bindings its status carries.
            seed_from_status(&seen, &disk, &state, &roots);
            // One disk, one resource: held until the reconcile and its backup are done.
            let claim = c.claims.take(&disk, &order, &others, &roots, &state);
            let (result, conflict) = match &claim {
                Ok(_) => (reconcile_disk(&disk, &host, options), false),
                Err(refused) => {
                    let mut r =
                        crate::outcome::DiskResult::failed(&disk.key, refused.message(&disk));
                    r.outcome = match refused {
                        claims::Refused::Older { .. } => Outcome::BadInput,
                        claims::Refused::Busy { .. } => Outcome::InUse,
                    };
                    (r, matches!(refused, claims::Refused::Older { .. }))
                }
            };
            // A scheduled backup that is due runs after the reconcile, in the same task: never two
            // at once for a disk.
            let backup = (matches!(result.outcome, Outcome::Ok | Outcome::InSync)
                && backup_due(&disk, &roots, created))
            .then(|| {
                crate::backup::backup_disk(
                    &disk,
                    &host,
                    exec,
                    chrono::Utc::now().timestamp(),
                    &crate::progress::Silent,
                )
            });
            // Without a backup now, the merges a lowered retention asks for (a backup merges
            // after itself).
            let retained = (matches!(result.outcome, Outcome::Ok | Outcome::InSync)
                && backup.is_none()
                && disk.spec().backup.is_some())
            .then(|| crate::backup::retain_now(&disk, &host, exec));
            // And a scheduled deep verify, when due since the last one (or the resource's creation).
            let verify = (matches!(result.outcome, Outcome::Ok | Outcome::InSync)
                && verify_due(&disk, &host, created))
            .then(|| crate::backup::verify(&disk, &host, true));
            drop(claim);
            (
                result,
                conflict,
                backup,
                retained,
                verify,
                chain_status(&disk, &roots, &state),
                backup_status(&disk, &roots),
            )
        })
        .await
        .map_err(|e| Error::Disk(format!("the reconcile task failed: {e}")))?;
    // Every step's event is out before the status says the reconcile ended.
    steps.close();
    let _ = publisher.await;
    let record = ctx.state.load(&key).ok().flatten();
    let chain_len = chain.len();
    let message = cap(&result.message.clone().unwrap_or_else(|| {
        if result.steps.is_empty() {
            "in sync with its spec".into()
        } else {
            format!("{} step(s) ran", result.steps.len())
        }
    }));
    let status = DiskChainStatus {
        observed_generation: generation,
        conditions: conditions(result.outcome, &message, generation, previous(&obj)),
        points: record.as_ref().map(|r| r.bindings.len() as u32),
        bindings: record
            .as_ref()
            .map(|r| {
                r.bindings
                    .iter()
                    .map(|b| diskchain_crd::SnapshotSpec {
                        name: b.name.clone(),
                        file: Some(b.file.clone()),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        chain,
        backups: backups.clone(),
        last_plan: Some(PlanSummary {
            steps: result.steps.iter().map(|s| s.op.clone()).collect(),
            total_bytes: result.predicted_bytes,
        }),
        last_apply: record
            .as_ref()
            .and_then(|r| r.last_apply.as_ref())
            .map(|a| diskchain_crd::ApplySummary {
                finished: chrono::DateTime::<chrono::Utc>::from_timestamp(
                    a.finished_unix as i64,
                    0,
                )
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                steps: a.steps.clone(),
                predicted_bytes: a.predicted_bytes,
                written_bytes: a.written_bytes,
            }),
        message: Some(message.clone()),
    };
    if !ctx.may_act() {
        // Fenced while the reconcile ran: its status is written by the next one.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    // A status write that fails (a conflict, an outage) does not lose the events of what ran:
    // they are published, then the error requeues the reconcile.
    // Quiet at rest: a status that says what the resource's status says already is not written
    // again (a resync of a disk in sync costs no request).
    let patched = if obj.status.as_ref() == Some(&status) {
        Ok(())
    } else {
        patch_status(&api, &name, status).await
    };
    let ok = matches!(result.outcome, Outcome::Ok | Outcome::InSync);
    record_metrics(
        &ctx,
        &key,
        &result,
        chain_len,
        backup.as_ref().map(|b| b.as_ref().map(|(done, _)| done)),
        backups.as_ref(),
    );
    let reason = conditions(result.outcome, "", None, &[])[0].reason.clone();
    // The steps that ran (one event per reconcile that changed the chain, with each step's
    // bytes), then the outcome when it changed.
    let ran = steps.take();
    if !ran.is_empty() {
        let was_in_sync = obj
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.reason == "InSync" && c.observed_generation == generation);
        let ev = Event {
            type_: EventType::Normal,
            // In sync for this generation before: the chain drifted and was put back.
            reason: if was_in_sync {
                "DriftCorrected"
            } else {
                "Applied"
            }
            .into(),
            note: Some(
                ran.iter()
                    .map(|r| {
                        format!(
                            "{} ({} predicted, {} written, {:.2} s)",
                            r.op,
                            crate::units::human_bytes(r.predicted_bytes),
                            crate::units::human_bytes(r.written_bytes),
                            r.seconds
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            action: "Apply".into(),
            secondary: None,
        };
        ctx.publish(&ev, &obj).await;
    }
    event_on_change(&ctx, &obj, &reason, message.clone(), !ok).await;
    if let Some(b) = backup {
        match b {
            Ok((done, retention)) => {
                let ev = Event {
                    type_: EventType::Normal,
                    reason: "BackupTaken".into(),
                    note: Some(format!(
                        "{} backup {} ({} written)",
                        done.kind.as_str(),
                        done.point,
                        crate::units::human_bytes(done.bytes),
                    )),
                    action: "Backup".into(),
                    secondary: None,
                };
                ctx.publish(&ev, &obj).await;
                if let Some(r) = retention {
                    ctx.publish(&retention_merged(&r), &obj).await;
                }
            }
            Err(e) => {
                let ev = Event {
                    type_: EventType::Warning,
                    reason: "BackupFailed".into(),
                    note: Some(e.error),
                    action: "Backup".into(),
                    secondary: None,
                };
                ctx.publish(&ev, &obj).await;
            }
        }
    }
    match retained {
        Some(Ok(Some(r))) => ctx.publish(&retention_merged(&r), &obj).await,
        Some(Err(e)) => {
            let ev = Event {
                type_: EventType::Warning,
                reason: "RetentionFailed".into(),
                note: Some(e.error),
                action: "Backup".into(),
                secondary: None,
            };
            ctx.publish(&ev, &obj).await;
        }
        _ => {}
    }
    if let Some(v) = verify {
        let ev = match v {
            Ok(v) if v.damaged.is_empty() => Event {
                type_: EventType::Normal,
                reason: "Verified".into(),
                note: Some(format!(
                    "{} point(s) read back with the checksums recorded when they were taken",
                    v.points
                )),
                action: "Verify".into(),
                secondary: None,
            },
            Ok(v) => Event {
                type_: EventType::Warning,
                reason: "BackupDamaged".into(),
                note: Some(
                    v.damaged
                        .iter()
                        .map(|d| format!("point {}: {}", d.point, d.problem))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
                action: "Verify".into(),
                secondary: None,
            },
            Err(e) => Event {
                type_: EventType::Warning,
                reason: "VerifyFailed".into(),
                note: Some(e.error),
                action: "Verify".into(),
                secondary: None,
            },
        };
        ctx.publish(&ev, &obj).await;
    }
    ctx.shared
        .metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    patched?;
    if ok {
        ctx.succeeded(&format!("{ns}/{name}"));
        // Observed again at the resync, or when the next backup is due if that is sooner.
        let due_in = backups
            .as_ref()
            .and_then(|b| b.next.as_deref())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| (t.timestamp() - chrono::Utc::now().timestamp()).max(1) as u64)
            .map(Duration::from_secs);
        Ok(Action::requeue(
            due_in.map_or(ctx.resync, |d| d.min(ctx.resync)),
        ))
    } else if conflict {
        // The older resource may be edited or deleted: looked at again at the resync.
        Ok(Action::requeue(ctx.resync))
    } else if result.outcome == Outcome::BadInput || result.outcome == Outcome::NeedsOperator {
        // The cause may be the host (an image not there yet, a point destroyed by hand, a
        // journal the operator sets aside), not the spec: looked at again at the resync.
        Ok(Action::requeue(ctx.resync))
    } else {
        Err(Error::Disk(message))
    }
}

async fn cleanup(obj: Arc<DiskChain>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = DiskKey::new(obj.namespace().as_deref(), &obj.name_any());
    let uid = obj.metadata.uid.clone().unwrap_or_default();
    let dropped = release(&ctx, &key, &uid).await?;
    let ev = Event {
        type_: EventType::Normal,
        reason: "Released".into(),
        note: Some(if dropped {
            "the resource was deleted: diskchain dropped its record of the disk; no image was deleted".into()
        } else {
            "the resource was deleted; no image was deleted".into()
        }),
        action: "Finalize".into(),
        secondary: None,
    };
    ctx.publish(&ev, &obj).await;
    Ok(Action::await_change())
}

/// Lets disk `key` (resource uid `uid`) go from this node: the disk's lock is taken (a step of
/// it in another process reaches its end first), its record dropped, its cluster-wide claim
/// released and its metrics removed. No image is deleted. True when a record was dropped.
async fn release(ctx: &Arc<Context>, key: &DiskKey, uid: &str) -> Result<bool, Error> {
    ctx.claims.forget(key);
    let state = ctx.state.clone();
    let k = key.clone();
    let (dropped, active) =
        tokio::task::spawn_blocking(move || -> Result<(bool, Option<PathBuf>), String> {
            let _lock = loop {
                match state.lock_disk(&k) {
                    Ok(Some(l)) => break l,
                    Ok(None) => std::thread::sleep(Duration::from_millis(200)),
                    Err(e) => return Err(e.to_string()),
                }
            };
            let active = state.load(&k).ok().flatten().map(|r| r.active);
            Ok((state.forget(&k).map_err(|e| e.to_string())?, active))
        })
        .await
        .map_err(|e| Error::Disk(format!("the release task failed: {e}")))?
        .map_err(Error::Disk)?;
    if let Some(own) = &ctx.ownership {
        let mut images = own.held_for(uid);
        images.extend(active);
        for image in images {
            own.release_image(&image, uid).await?;
        }
    }
    ctx.records
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(key);
    ctx.shared.metrics.forget_disk(&key.to_string());
    ctx.released
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.clone());
    Ok(dropped)
}

/// Releases the disks of resources that left this node: deleted (the finalizer gone, or
/// forced), or moved to another node or to none with `spec.nodeName` (the watch of this node's
/// resources no longer shows them, and no reconcile runs for them). Each is released once no
/// reconcile works on it: its finalizer removed while the claim is still this node's (so the
/// next node, which waits for the claim, adds its own), a `Released` event, its record and
/// claim dropped. Runs every few seconds; compares in memory, and asks the API only about
/// resources that left.
async fn sweep(ctx: Arc<Context>) {
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let Some(store) = ctx.resources.get() else {
            continue;
        };
        if !ctx.may_act() {
            continue;
        }
        let present: std::collections::BTreeSet<DiskKey> = store
            .state()
            .iter()
            .map(|o| DiskKey::new(o.namespace().as_deref(), &o.name_any()))
            .collect();
        let gone: Vec<DiskKey> = ctx
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            let Some(_busy) = Busy::take(&ctx, &key) else {
                continue;
            };
            if let Err(e) = left(&ctx, &key).await {
                tracing::warn!(disk = %key, error = %e, "cannot release a resource that left this node; retrying");
            }
        }
    }
}

/// Releases `key`, which this node's watch no longer shows.
async fn left(ctx: &Arc<Context>, key: &DiskKey) -> Result<(), Error> {
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &key.namespace,
        &kube::api::ApiResource::erase::<DiskChain>(&()),
    );
    // A list by name rather than a get: the agent's role grants list and watch, no get.
    let obj = api
        .list(&kube::api::ListParams::default().fields(&format!("metadata.name={}", key.name)))
        .await?
        .items
        .into_iter()
        .next();
    let node = obj
        .as_ref()
        .and_then(|o| o.data.pointer("/spec/nodeName"))
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    if obj.is_some() && node == ctx.node {
        // Still ours: the watch has not caught up.
        return Ok(());
    }
    let uid = obj
        .as_ref()
        .and_then(|o| o.metadata.uid.clone())
        .unwrap_or_default();
    // The finalizer goes first, while this node still holds the claim: the next node adds its
    // own only once it holds the claim.
    if let Some(o) = &obj {
        let fins = o.metadata.finalizers.clone().unwrap_or_default();
        let claim_ours = ctx.ownership.is_none()
            || ctx
                .ownership
                .as_ref()
                .is_some_and(|own| !own.held_for(&uid).is_empty());
        if fins.iter().any(|f| f == FINALIZER) && claim_ours {
            let keep: Vec<&String> = fins.iter().filter(|f| *f != FINALIZER).collect();
            let patch = serde_json::json!({"metadata": {
                "finalizers": keep,
                "resourceVersion": o.metadata.resource_version,
            }});
            api.patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
    }
    let dropped = release(ctx, key, &uid).await?;
    if let Some(o) = &obj {
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(diskchain_crd::API_VERSION.into()),
            kind: Some(diskchain_crd::KIND.into()),
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            uid: o.metadata.uid.clone(),
            ..Default::default()
        };
        let ev = Event {
            type_: EventType::Normal,
            reason: "Released".into(),
            note: Some(format!(
                "the resource left node {} ({}): {}; no image was deleted",
                ctx.node,
                if node.is_empty() {
                    "spec.nodeName is empty".to_string()
                } else {
                    format!("spec.nodeName is now {node}")
                },
                if dropped {
                    "this node dropped its record of the disk and released its claim"
                } else {
                    "this node released its claim"
                }
            )),
            action: "Finalize".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            tracing::warn!(disk = %key, error = %e, "cannot publish an event");
        }
    }
    tracing::info!(disk = %key, node, "released a resource that left this node");
    Ok(())
}

/// What makes a resource's reconcile run again: its generation (the spec), its deletion, its
/// finalizer (removed by hand: put back) and its node. Status writes (the agent's own) do not.
fn trigger(obj: &DiskChain) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    obj.metadata.generation.hash(&mut h);
    obj.metadata.deletion_timestamp.is_some().hash(&mut h);
    obj.finalizers().iter().any(|f| f == FINALIZER).hash(&mut h);
    obj.spec.node_name.hash(&mut h);
    obj.metadata.uid.hash(&mut h);
    Some(h.finish())
}

/// A watch event of objects as the API returns them, as `DiskChain`s of this node: objects read
/// leniently ([`lenient::read`]); one that does not read is reported on its status and left out;
/// without a field selector, another node's object is dropped (as leaving the selection).
fn typed(
    ev: watcher::Event<kube::api::DynamicObject>,
    node: &str,
    ctx: &Arc<Context>,
) -> Option<watcher::Event<DiskChain>> {
    let read = |o: kube::api::DynamicObject| -> Option<DiskChain> {
        match lenient::read(&o) {
            Ok((d, dropped)) => {
                if !dropped.is_empty() {
                    tracing::debug!(resource = %o.name_any(), ?dropped, "fields this agent does not know were ignored");
                }
                Some(d)
            }
            Err(e) => {
                tokio::spawn(unreadable(ctx.clone(), o, e));
                None
            }
        }
    };
    let mine = |d: &DiskChain| d.spec.node_name.as_deref() == Some(node);
    match ev {
        watcher::Event::Init => Some(watcher::Event::Init),
        watcher::Event::InitDone => Some(watcher::Event::InitDone),
        watcher::Event::InitApply(o) => read(o).filter(|d| mine(d)).map(watcher::Event::InitApply),
        watcher::Event::Apply(o) => read(o).map(|d| {
            if mine(&d) {
                watcher::Event::Apply(d)
            } else {
                watcher::Event::Delete(d)
            }
        }),
        watcher::Event::Delete(o) => read(o).map(watcher::Event::Delete),
    }
}

/// Reports an object of this node that does not read (`why` names the field) on its status:
/// `Degraded`, `BadInput`. Nothing else is done with it until it changes.
async fn unreadable(ctx: Arc<Context>, o: kube::api::DynamicObject, why: String) {
    let node = o
        .data
        .pointer("/spec/nodeName")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    if node != ctx.node || !ctx.may_act() {
        return;
    }
    let key = DiskKey::new(o.metadata.namespace.as_deref(), &o.name_any());
    let message = cap(&format!(
        "DiskChain {key}: {why}; fix the field (nothing was done)"
    ));
    tracing::warn!(disk = %key, message, "a DiskChain does not read");
    let generation = o.metadata.generation;
    let status = DiskChainStatus {
        observed_generation: generation,
        conditions: conditions(Outcome::BadInput, &message, generation, &[]),
        message: Some(message),
        ..Default::default()
    };
    let api: Api<DiskChain> = Api::namespaced(ctx.client.clone(), &key.namespace);
    if let Err(e) = patch_status(&api, &key.name, status).await {
        tracing::warn!(disk = %key, error = %e, "cannot write the status of a DiskChain that does not read");
    }
}

/// The `DiskChain` resources of the whole cluster without `spec.nodeName`: no agent acts on
/// them (the field selector keeps them out of every node's watch), so they are counted.
pub async fn count_unassigned(api: &Api<DiskChain>) -> Result<usize, kube::Error> {
    // Only those: a field selector matches an absent field as empty; their metadata alone.
    let list = api
        .list_metadata(&kube::api::ListParams::default().fields("spec.nodeName="))
        .await?;
    Ok(list.items.len())
}

/// How long a failing resource waits before it is tried again: 5 s, doubling with each failure
/// in a row, up to 5 min.
pub fn error_policy(obj: Arc<DiskChain>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!(
        "{}/{}",
        obj.namespace().unwrap_or_else(|| "default".into()),
        obj.name_any()
    );
    let wait = ctx.failed(&key);
    tracing::warn!(disk = %key, error = %error, retry_in = %humantime::format_duration(wait), "reconcile failed");
    Action::requeue(wait)
}

impl KubeOptions {
    /// The disks the state directory keeps a record of.
    fn state_keys(&self) -> Vec<DiskKey> {
        self.state
            .all()
            .unwrap_or_default()
            .iter()
            .map(|r| r.key())
            .collect()
    }
}

/// What `diskchain agent --kube` is told.
pub struct KubeOptions {
    /// This node's name.
    pub node: String,
    /// Allowed roots.
    pub roots: Vec<std::path::PathBuf>,
    /// The state directory.
    pub state: StateDir,
    /// Re-observe every disk this often.
    pub resync: Duration,
    /// Disks reconciled at once.
    pub max_parallel: usize,
    /// Passed to the executors.
    pub exec: ExecOptions,
    /// Where to serve `/healthz`, `/readyz` and `/metrics`.
    pub listen: Option<std::net::SocketAddr>,
    /// The namespace of the node's Lease (the agent's own).
    pub lease_namespace: String,
    /// This agent's identity in the Lease (its pod's name).
    pub identity: String,
    /// On shutdown, how long running steps may take to finish.
    pub grace: Duration,
    /// `NAMESPACE=DIR`: roots the operator assigned to namespaces.
    pub namespace_roots: Vec<String>,
    /// `NAMESPACE=PATTERN`: libvirt domains the operator assigned to namespaces.
    pub namespace_domains: Vec<String>,
}

/// Runs the controller until SIGTERM or SIGINT. Returns the exit code.
pub fn run(opts: KubeOptions) -> i32 {
    let (roots, rt) = match crate::reconcile::start(&opts.roots) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let tenancy = match tenancy::Tenancy::new(&opts.namespace_roots, &roots)
        .and_then(|t| t.with_domains(&opts.namespace_domains))
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let shared_roots = tenancy.shared(&roots);
    if !shared_roots.is_empty() {
        tracing::warn!(roots = ?shared_roots, "these roots are assigned to no namespace (--namespace-root): every namespace's DiskChains may use them, and there a DiskChain only changes the layers it adopted by naming them; in a cluster shared by tenants, assign each root to its namespaces");
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let code = rt.block_on(async move {
        // SIGTERM or SIGINT, whether this agent holds the node's lease or waits for it: no new
        // step starts; a running step gets `grace` to end, then its QEMU process is stopped (the
        // journal resumes it on the next start), as in file mode.
        let (shutdown_tx, mut shutdown) = tokio::sync::watch::channel(false);
        {
            let stop = stop.clone();
            let grace = opts.grace;
            tokio::spawn(async move {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = shutdown_tx.send(true);
                tracing::info!(grace = %humantime::format_duration(grace), "shutting down: no new steps start; running steps may finish");
                tokio::time::sleep(grace).await;
                let n = crate::execute::terminate_running();
                if n > 0 {
                    tracing::warn!(stopped = n, "grace period over: stopped the running QEMU processes; their steps resume on the next start");
                }
            });
        }
        let client = match Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: cannot reach the Kubernetes API (in-cluster config or kubeconfig): {e}");
                return 1;
            }
        };
        // `/healthz`, `/readyz` (ready once the controller lists this node's resources) and
        // `/metrics`, as in file mode.
        let shared = Arc::new(crate::reconcile::Shared::new(Duration::from_secs(300)));
        if let Some(addr) = opts.listen
            && let Err(e) = crate::reconcile::http::listen(addr, shared.clone()).await
        {
            eprintln!("error: {e}");
            return 2;
        }
        // One agent per node: wait for the node's lease (or a shutdown), then keep renewing it.
        let node_lease = Arc::new(lease::NodeLease::new(
            client.clone(),
            &opts.lease_namespace,
            &opts.node,
            &opts.identity,
            LEASE_DURATION,
        ));
        let mut told = false;
        loop {
            // Bounded by the lease's duration: a slow API server (seconds per request) still
            // lets an agent take a free lease.
            match node_lease.try_hold(node_lease.duration()).await {
                Ok(lease::Hold::Held) => break,
                Ok(lease::Hold::Other(holder)) => {
                    if !told {
                        tracing::info!(node = %opts.node, holder, "another agent holds this node's lease; waiting");
                        told = true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read or take this node's lease; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(node_lease.renew_every()) => {}
                _ = shutdown.changed() => return 0,
            }
        }
        tracing::info!(node = %opts.node, identity = %opts.identity, "holding this node's lease");
        let known = opts.state_keys();
        let ctx = Arc::new(Context {
            recorder: Arc::new(events::Events::new(client.clone(), "diskchain", &opts.node)),
            client: client.clone(),
            node: opts.node.clone(),
            roots,
            state: opts.state,
            exec: opts.exec,
            resync: opts.resync,
            failures: Default::default(),
            stop: stop.clone(),
            shared: shared.clone(),
            resources: Default::default(),
            claims: Default::default(),
            tenancy,
            ownership: Some(ownership::Ownership::new(
                client.clone(),
                &opts.lease_namespace,
                &opts.node,
            )),
            // The disks this node kept a record of before (a resource that left the node while
            // the agent was down is released once the watch shows it gone).
            records: std::sync::Mutex::new(known.into_iter().collect()),
            busy: Default::default(),
            released: Default::default(),
            lease: Some(node_lease.clone()),
        });
        tokio::spawn(sweep(ctx.clone()));
        tokio::spawn(keep_lease(node_lease.clone(), opts.node.clone()));
        let api: Api<DiskChain> = Api::all(client);
        {
            let (api, shared, every) = (api.clone(), shared.clone(), opts.resync);
            tokio::spawn(async move {
                loop {
                    match count_unassigned(&api).await {
                        Ok(n) => {
                            shared.metrics.unassigned.set(n as i64);
                        }
                        Err(e) => tracing::debug!(error = %e, "cannot count unassigned resources"),
                    }
                    tokio::time::sleep(every).await;
                }
            });
        }
        tracing::info!(node = %opts.node, "Kubernetes mode: watching this node's DiskChain resources");
        control(api, ctx, opts.max_parallel).await;
        // A clean shutdown: the running reconciles are done; the next agent takes the lease at
        // once.
        node_lease.release(node_lease.renew_every()).await;
        0
    });
    // Reconciles still blocked (in a QEMU step past the grace, or a call that never answers)
    // are not waited for.
    rt.shutdown_background();
    code
}

/// How long the node's lease lasts without a renewal.
const LEASE_DURATION: Duration = Duration::from_secs(15);

/// Renews the node's lease for as long as the agent runs. Each renewal is bounded by the time
/// left before another agent may take the lease; past the renew deadline the agent is fenced
/// ([`lease::NodeLease::holding`]): it starts nothing and writes nothing to the API. It exits
/// (1), stopping its QEMU processes (their steps resume from the journal under the next
/// holder), once it learns another agent holds the lease, or once its lease has expired while
/// the API answers other requests. While the API answers nothing, it waits: the steps running
/// go on, and a renewal that gets through makes it the holder again.
async fn keep_lease(lease: Arc<lease::NodeLease>, node: String) {
    let mut fenced_told = false;
    loop {
        let started = std::time::Instant::now();
        let since = lease.since_renewal().unwrap_or(lease.duration());
        // Until others may take the lease over, and never less than the renew deadline: on a
        // slow API server one request takes seconds.
        let bound = lease
            .duration()
            .saturating_sub(since)
            .max(lease.renew_deadline());
        match lease.try_hold(bound).await {
            Ok(lease::Hold::Held) => {
                if fenced_told {
                    tracing::info!(node = %node, "renewed this node's lease again: acting again");
                    fenced_told = false;
                }
            }
            Ok(lease::Hold::Other(holder)) => {
                let n = crate::execute::terminate_running();
                tracing::error!(node = %node, holder, stopped = n, "another agent holds this node's lease: exiting, so that only one agent works on this node");
                std::process::exit(1);
            }
            Err(e) => {
                let since = lease.since_renewal().unwrap_or(lease.duration());
                if since >= lease.renew_deadline() && !fenced_told {
                    tracing::warn!(node = %node, error = %e, "this node's lease could not be renewed in time: no step starts and nothing is written to the API until it is");
                    fenced_told = true;
                }
                if since >= lease.duration() && lease.api_answers(lease.renew_every()).await {
                    let n = crate::execute::terminate_running();
                    tracing::error!(node = %node, error = %e, stopped = n, "this node's lease expired while the API answers other requests: another agent may hold it now; exiting");
                    std::process::exit(1);
                }
            }
        }
        tokio::time::sleep(lease.renew_every().saturating_sub(started.elapsed())).await;
    }
}

/// The controller over this node's `DiskChain` resources (a watch with the field selector
/// `spec.nodeName=NODE`), reconciling at most `max_parallel` at once, until SIGTERM or SIGINT.
/// Feeds the watch and reconcile metrics, and `/readyz` (ready while the node's resources are
/// listed; not ready while listing fails).
///
/// Objects are read one by one ([`lenient::read`]): an unknown field is dropped, an object that
/// does not read is reported on its own status and left out, and the watch goes on. An API
/// server that does not serve CRD field selectors (Kubernetes before 1.31) answers the selector
/// 400: then every resource is watched and this node's are kept (said once in the log).
/// Reconciles are triggered by what a reconcile must see (the spec's generation, a deletion,
/// the finalizer), not by the agent's own status writes.
pub async fn control(api: Api<DiskChain>, ctx: Arc<Context>, max_parallel: usize) {
    use kube::api::{ApiResource, DynamicObject, ListParams};
    use kube::runtime::{WatchStreamExt, reflector};
    let shared = ctx.shared.clone();
    let ar = ApiResource::erase::<DiskChain>(&());
    let dyn_api: Api<DynamicObject> = Api::all_with(api.into_client(), &ar);
    let selector = format!("spec.nodeName={}", ctx.node);
    let filtered = match dyn_api
        .list_metadata(&ListParams::default().fields(&selector).limit(1))
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 400 => {
            tracing::warn!(node = %ctx.node, error = %s.message, "this API server does not serve the CRD field selector spec.nodeName (it needs Kubernetes 1.31 or later, with the CRD's selectableFields): watching every DiskChain and keeping this node's");
            false
        }
        _ => true,
    };
    let config = if filtered {
        watcher::Config::default().fields(&selector)
    } else {
        watcher::Config::default()
    };
    let (reader, writer) = reflector::store::<DiskChain>();
    let node = ctx.node.clone();
    let (ready, bad_ctx) = (shared.clone(), ctx.clone());
    let objects = watcher(dyn_api, config)
        .default_backoff()
        .filter_map(move |ev| {
            let out = match ev {
                Err(e) => {
                    ready.ready.store(false, std::sync::atomic::Ordering::SeqCst);
                    ready.metrics.watch_errors.inc();
                    tracing::warn!(error = %e, "the watch on this node's DiskChain resources failed; retrying");
                    Some(Err(e))
                }
                Ok(ev) => {
                    if matches!(ev, watcher::Event::InitDone) {
                        ready.ready.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    typed(ev, &node, &bad_ctx).map(Ok)
                }
            };
            std::future::ready(out)
        })
        .reflect(writer)
        .applied_objects()
        .predicate_filter(trigger, Default::default());
    let controller = Controller::for_stream(objects, reader).with_config(
        kube::runtime::controller::Config::default().concurrency(max_parallel.max(1) as u16),
    );
    // The watch cache: the node's resources for the claims on disks, and its size every few
    // seconds.
    let store = controller.store();
    let _ = ctx.resources.set(store.clone());
    let gauge = {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                shared.metrics.watched.set(store.state().len() as i64);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|r| {
            let m = shared.clone();
            let ctx = ctx.clone();
            async move {
                let (disk, result) = match &r {
                    Ok((obj, _)) => (
                        DiskKey::new(obj.namespace.as_deref(), &obj.name).to_string(),
                        "ok",
                    ),
                    Err(kube::runtime::controller::Error::QueueError(e)) => {
                        tracing::warn!(error = %e, "the watch on this node's DiskChain resources failed; retrying");
                        m.metrics.watch_errors.inc();
                        return;
                    }
                    Err(kube::runtime::controller::Error::ReconcilerFailed(_, obj)) => (
                        DiskKey::new(obj.namespace.as_deref(), &obj.name).to_string(),
                        "failed",
                    ),
                    Err(e) => {
                        tracing::debug!(error = %e, "reconcile");
                        ("-".to_string(), "failed")
                    }
                };
                // A resource released by this reconcile (deleted) leaves no series behind.
                if let Ok(key) = DiskKey::parse(&disk)
                    && ctx
                        .released
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key)
                {
                    m.metrics.forget_disk(&disk);
                    return;
                }
                m.metrics
                    .reconciles
                    .get_or_create(&crate::reconcile::metrics::ResultLabels {
                        disk,
                        result: result.into(),
                    })
                    .inc();
            }
        })
        .await;
    gauge.abort();
}
