//! `diskchain apply`: plan, then execute step by step through a journal, re-observing after each
//! step, until the real chains match their specs; then record bindings in the state.
//!
//! Order of work: finish any journal left by an interrupted run (the in-flight step is run again;
//! steps are idempotent and check their preconditions, so nothing is guessed), plan, execute, and
//! plan again, until a plan has nothing to do.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use diskchain_crd::{DesiredDisk, DiskKey};
use diskchain_planner::{Format, StepAction};

use crate::execute::offline::Offline;
use crate::execute::{ExecError, ExecOptions, Executor};
use crate::journal::{Journal, JournalStep, StepState, now_unix};
use crate::observe::{Roots, observe_chain};
use crate::plan::{DiskError, DiskReport, ErrorKind, Host, PlanRunError, plan_loaded};
use crate::progress::Progress;
pub use crate::progress::StepRecord;
use crate::state::{Binding, DiskState, LastApply, StateDir, StateError};

/// How many plan-and-execute rounds before giving up (a snapshot with a placement elsewhere
/// needs two: the new point is made beside the active image, then moved).
const MAX_ROUNDS: usize = 4;

/// Options of `apply`.
#[derive(Clone)]
pub struct ApplyOptions {
    /// Passed to the executors.
    pub exec: ExecOptions,
    /// Told what each step does as it goes (the CLI's bar, the agent's metrics).
    pub progress: std::sync::Arc<dyn Progress>,
    /// When set, no new step starts (the plan stays journaled and resumes on the next run).
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// What `apply` did to one disk.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DiskOutcome {
    /// The disk's namespace and name.
    #[serde(flatten)]
    pub key: DiskKey,
    /// Steps run, as `op` names.
    pub steps: Vec<String>,
    /// Data bytes the plans predicted.
    pub predicted_bytes: u64,
    /// Bytes the QEMU processes wrote.
    pub written_bytes: u64,
    /// Each step as it ran.
    pub records: Vec<StepRecord>,
}

/// What `apply` did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ApplyReport {
    /// Disks with steps run.
    pub disks: Vec<DiskOutcome>,
    /// Disks that could not be applied.
    pub errors: Vec<DiskError>,
    /// Backup repositories whose retention merged points away.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retention: Vec<crate::backup::RetentionReport>,
}

impl ApplyReport {
    /// How disk `key` ended in this apply: the first error recorded for it decides, steps that
    /// ran are listed either way (a failure after a step ran is never bad input).
    pub fn result_of(&self, key: &DiskKey) -> crate::outcome::DiskResult {
        let done = self.disks.iter().find(|d| d.key == *key);
        let error = self.errors.iter().find(|e| e.key == *key);
        crate::outcome::DiskResult {
            key: key.clone(),
            outcome: error.map_or(crate::outcome::Outcome::Ok, |e| e.kind.into()),
            message: error.map(|e| e.error.clone()),
            steps: done.map(|d| d.records.clone()).unwrap_or_default(),
            predicted_bytes: done.map_or(0, |d| d.predicted_bytes),
            written_bytes: done.map_or(0, |d| d.written_bytes),
        }
    }

    /// 0 all converged; 2 bad input somewhere (those disks untouched); 1 other failures (an image
    /// in use, a QEMU tool failing, no convergence).
    pub fn exit_code(&self) -> i32 {
        if self.errors.is_empty() {
            0
        } else if self.errors.iter().any(|e| e.kind == ErrorKind::BadInput) {
            2
        } else {
            1
        }
    }
}

/// Why a disk's journal could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A step failed.
    #[error("step {index} ({op}){}: {source}", ran_note(ran))]
    Step {
        /// 1-based step number.
        index: usize,
        /// The operation.
        op: &'static str,
        /// The failure.
        source: Box<ExecError>,
        /// The steps that had run before it (`N op`), this run or an interrupted one: the chain
        /// is no longer as it was, so the failure is never reported as untouched bad input.
        ran: Vec<String>,
    },
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The chain after the plan is not the planned one.
    #[error(
        "after the plan the chain is {found}, but {expected} was planned: it was changed outside diskchain while the plan ran. The finished plan's journal was set aside as {set_aside}; nothing more was done. Run `diskchain plan` to see what the next plan does from the chain as it is"
    )]
    Mismatch {
        /// What is there.
        found: String,
        /// What was planned.
        expected: String,
        /// Where the journal went.
        set_aside: String,
    },
    /// A shutdown was requested: the plan stays journaled and resumes on the next run.
    #[error("stopped before step {index} for shutdown; the plan resumes on the next start")]
    Stopped {
        /// 1-based step number not started.
        index: usize,
    },
    /// The chain cannot be observed after a step.
    #[error("after step {index} the chain cannot be read: {source}")]
    Observe {
        /// 1-based step number.
        index: usize,
        /// The failure.
        source: crate::observe::ObserveError,
    },
}

/// ", after steps 1 (copy), 2 (rebase) had run; the plan stays journaled", or nothing.
fn ran_note(ran: &[String]) -> String {
    if ran.is_empty() {
        String::new()
    } else {
        format!(
            ", after step{} {} had run (the plan stays journaled and resumes there)",
            if ran.len() == 1 { "" } else { "s" },
            ran.join(", ")
        )
    }
}

/// The steps of `journal` that have run so far, as `N (op)`.
fn steps_ran(journal: &Journal) -> Vec<String> {
    journal
        .steps
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s.state {
            StepState::Done => Some(format!("{} ({})", i + 1, s.step.action.op())),
            // Started in an earlier run that was interrupted: it may have written.
            StepState::Running if s.attempts > 1 => Some(format!(
                "{} ({}, interrupted earlier)",
                i + 1,
                s.step.action.op()
            )),
            _ => None,
        })
        .collect()
}

impl ApplyError {
    fn kind(&self) -> ErrorKind {
        match self {
            ApplyError::Step { source, .. } if matches!(**source, ExecError::InUse { .. }) => {
                ErrorKind::InUse
            }
            // Bad input (exit 2) promises nothing was touched: only before any step ran.
            ApplyError::Step { source, ran, .. } if source.is_bad_input() && ran.is_empty() => {
                ErrorKind::BadInput
            }
            ApplyError::Mismatch { .. } => ErrorKind::Failed,
            ApplyError::Stopped { .. } => ErrorKind::Stopped,
            ApplyError::Step { source, .. } if matches!(**source, ExecError::Abandoned { .. }) => {
                ErrorKind::Stopped
            }
            _ => ErrorKind::Failed,
        }
    }
}

/// Applies every spec under `specs`.
pub fn run(
    specs: &Path,
    roots: &[PathBuf],
    state: &StateDir,
    options: ApplyOptions,
) -> Result<ApplyReport, PlanRunError> {
    let loaded = diskchain_crd::load_path(specs).map_err(PlanRunError::Specs)?;
    let roots = Roots::new(roots).map_err(PlanRunError::Roots)?;
    apply_loaded(&loaded, &roots, state, options)
}

/// Applies already loaded specs: the checks that span disks once (no two specs claim one
/// active image), then each disk's reconcile in turn.
pub fn apply_loaded(
    loaded: &[DesiredDisk],
    roots: &Roots,
    state: &StateDir,
    options: ApplyOptions,
) -> Result<ApplyReport, PlanRunError> {
    let mut c = Collect::default();
    // One process works on a disk at a time (an agent and a hand-run apply, say): each disk's
    // lock is held until this apply is done with it.
    let _locks: Vec<_> = loaded
        .iter()
        .filter_map(|spec| lock(spec, state, &mut c))
        .collect();
    let mut host = Host::new(roots, state, loaded);
    for e in host.claim(loaded) {
        c.failed.insert(e.key.clone());
        c.report.errors.push(e);
    }
    for spec in loaded {
        if !c.failed.contains(&spec.key) {
            reconcile_into(spec, &host, &options, &mut c)?;
        }
        // A lowered retention merges its repository's dropped points now (under the disk's
        // lock, so never beside a backup of the disk).
        if spec.spec().backup.is_some() && !c.failed.contains(&spec.key) {
            match crate::backup::retain_now(spec, &host, options.exec) {
                Ok(Some(r)) => {
                    options.progress.note(
                        &spec.key,
                        &format!(
                            "retention merged {} backup point(s) away ({})",
                            r.done.removed.len(),
                            r.done.removed.join(", ")
                        ),
                    );
                    c.report.retention.push(r);
                }
                Ok(None) => {}
                Err(e) => c.fail(spec, e.error, e.kind),
            }
        }
    }
    Ok(c.into_report())
}

/// Takes disk `spec`'s lock for this process, or records in `c` why it cannot.
fn lock(
    spec: &DesiredDisk,
    state: &StateDir,
    c: &mut Collect,
) -> Option<nix::fcntl::Flock<std::fs::File>> {
    match state.lock_disk(&spec.key) {
        Ok(Some(lock)) => Some(lock),
        Ok(None) => {
            c.fail(
                spec,
                format!(
                    "{}: another diskchain process (an agent or an apply) is working on disk {:?}; try again when it is done",
                    spec.origin(),
                    spec.key.to_string()
                ),
                ErrorKind::InUse,
            );
            None
        }
        Err(e) => {
            c.fail(spec, e.to_string(), ErrorKind::Failed);
            None
        }
    }
}

/// Reconciles one desired disk: observe, validate, bind, plan, and execute journaled (an
/// unfinished plan first), in rounds until the chain is the spec's, then record. `apply` calls
/// it for each of its disks, the agent for each disk that has work (and a Kubernetes driver
/// will); `plan` runs its planning stage ([`plan_loaded`]) alone. `host` carries the checks
/// that span the run's disks.
pub fn reconcile_disk(
    disk: &DesiredDisk,
    host: &Host,
    options: ApplyOptions,
) -> crate::outcome::DiskResult {
    let mut c = Collect::default();
    let Some(_lock) = lock(disk, &host.state, &mut c) else {
        return c.into_report().result_of(&disk.key);
    };
    if let Err(e) = reconcile_into(disk, host, &options, &mut c) {
        return crate::outcome::DiskResult::failed(&disk.key, e.to_string());
    }
    c.into_report().result_of(&disk.key)
}

/// [`reconcile_disk`] of a disk whose lock the caller holds, into `c`.
fn reconcile_into(
    spec: &DesiredDisk,
    host: &Host,
    options: &ApplyOptions,
    c: &mut Collect,
) -> Result<(), PlanRunError> {
    let (roots, state) = (&host.roots, &host.state);
    for round in 0..=MAX_ROUNDS {
        // Finish what an interrupted run left.
        'resume: {
            if c.failed.contains(&spec.key) {
                break 'resume;
            }
            match Journal::load(state, &spec.key) {
                Ok(None) => {}
                Ok(Some(_)) if spec.spec().suspend => {
                    // A suspended disk is not touched, not even to finish an earlier plan.
                    break 'resume;
                }
                Ok(Some(mut journal)) => {
                    match crate::resume::check(&journal, spec, roots, state) {
                        crate::resume::Verdict::Resume => {}
                        crate::resume::Verdict::SetAside { why, first } => {
                            tracing::warn!(disk = %spec.key, why, "the plan an earlier run left contradicts the spec as it is now: setting it aside and planning again");
                            // A live block job of the interrupted step runs on in QEMU: when the
                            // spec still agrees with that step, it is finished (and recorded)
                            // first, so the chain is whole and its points known when the rest
                            // of the plan is set aside.
                            if let Some(r) = journal.next()
                                && journal.live
                                && journal.steps[r].state == StepState::Running
                                && first.is_some_and(|f| f > r)
                                && let Err(e) = finish_step(&mut journal, r, roots, state, options)
                            {
                                c.fail(
                                    spec,
                                    format!(
                                        "{}: the unfinished earlier plan contradicts the spec ({why}); its interrupted step {} is still running in QEMU and could not be finished first: {e}; nothing more was done",
                                        spec.origin(),
                                        r + 1
                                    ),
                                    ErrorKind::Failed,
                                );
                                break 'resume;
                            }
                            match set_aside(&journal, roots, state, options) {
                                Ok(to) => options.progress.note(
                                    &spec.key,
                                    &format!(
                                        "the unfinished earlier plan contradicts the spec as it is now ({why}); set aside as {} and planned again",
                                        to.display()
                                    ),
                                ),
                                Err(e) => c.fail(
                                    spec,
                                    format!(
                                        "{}: the unfinished earlier plan contradicts the spec ({why}), and setting it aside failed: {e}; nothing more was done",
                                        spec.origin()
                                    ),
                                    ErrorKind::Failed,
                                ),
                            }
                            break 'resume;
                        }
                        crate::resume::Verdict::Stuck { why } => {
                            Journal::set_needs_operator(state, &spec.key, &why);
                            c.fail(
                                spec,
                                format!("{}: {why}", spec.origin()),
                                ErrorKind::NeedsOperator,
                            );
                            break 'resume;
                        }
                    }
                    tracing::info!(disk = %spec.key, "resuming the plan an earlier run left unfinished");
                    // How live jobs behave (quiesce, the time budget) follows the spec as it is
                    // now, for the same disk.
                    // (A setting that does not cross the boundary was refused at load.)
                    if let (Some(old), Some(new)) = (&mut journal.libvirt, &spec.live)
                        && (&old.uri, &old.domain, &old.target)
                            == (&new.uri, &new.domain, &new.target)
                    {
                        *old = new.clone();
                    }
                    c.run(spec, journal, false, roots, state, options);
                }
                Err(e) => c.fail(spec, e.to_string(), ErrorKind::BadInput),
            }
        }
        if c.failed.contains(&spec.key) {
            break;
        }
        let planned = plan_loaded(std::slice::from_ref(spec), host)?;
        for e in planned.errors {
            c.failed.insert(e.key.clone());
            c.report.errors.push(e);
        }
        let mut worked = false;
        for disk in planned.disks {
            if disk.suspended {
                continue;
            }
            if disk.plan.steps.is_empty() {
                if let Err(e) = record_bindings(&disk, spec, roots, state) {
                    c.fail(spec, e.to_string(), ErrorKind::Failed);
                }
                continue;
            }
            if round == MAX_ROUNDS {
                c.fail(
                    spec,
                    format!(
                        "{}: the chain still differs from the spec after {MAX_ROUNDS} rounds of plans; see `diskchain plan`",
                        spec.origin()
                    ),
                    ErrorKind::Failed,
                );
                continue;
            }
            worked = true;
            options.progress.planned(&spec.key, &disk.plan.steps);
            c.run(
                spec,
                new_journal(&disk, spec, roots),
                true,
                roots,
                state,
                options,
            );
        }
        if !worked {
            break;
        }
    }
    Ok(())
}

/// What one apply collects across its disks.
#[derive(Default)]
struct Collect {
    report: ApplyReport,
    outcomes: BTreeMap<DiskKey, DiskOutcome>,
    /// Disks not to touch again in this apply.
    failed: HashSet<DiskKey>,
}

impl Collect {
    /// The report: every error, and the disks that ran steps.
    fn into_report(self) -> ApplyReport {
        let mut report = self.report;
        report.disks = self
            .outcomes
            .into_values()
            .filter(|o| !o.steps.is_empty())
            .collect();
        report
    }

    fn fail(&mut self, spec: &DesiredDisk, error: String, kind: ErrorKind) {
        self.failed.insert(spec.key.clone());
        self.report.errors.push(DiskError {
            key: spec.key.clone(),
            spec: spec.origin(),
            error,
            kind,
        });
    }

    /// Runs `journal` to its end (saving it first when it is new), recording what it did or why
    /// it stopped.
    fn run(
        &mut self,
        spec: &DesiredDisk,
        journal: Journal,
        new: bool,
        roots: &Roots,
        state: &StateDir,
        options: &ApplyOptions,
    ) {
        let out = self
            .outcomes
            .entry(spec.key.clone())
            .or_insert_with(|| DiskOutcome {
                key: spec.key.clone(),
                ..Default::default()
            });
        let saved = if new {
            journal.save(state).map_err(ApplyError::from)
        } else {
            Ok(())
        };
        if let Err(e) = saved.and_then(|()| finish(journal, roots, state, options, out)) {
            let kind = e.kind();
            self.fail(spec, format!("{}: {e}", spec.origin()), kind);
        }
    }
}

/// The bindings a completed plan leaves: each result point and the file holding it.
fn bindings_of(disk: &DiskReport, spec: &DesiredDisk, roots: &Roots) -> Vec<Binding> {
    disk.plan
        .result
        .iter()
        .filter_map(|l| {
            let name = l.point.clone()?;
            let adopted_from = spec
                .spec()
                .snapshots
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.file.as_ref())
                .and_then(|f| roots.confine_dir(f, String::new()).ok());
            Some(Binding {
                name,
                file: l.file.clone(),
                adopted_from,
            })
        })
        .collect()
}

fn new_journal(disk: &DiskReport, spec: &DesiredDisk, roots: &Roots) -> Journal {
    let mut formats = disk.formats.clone();
    for s in &disk.plan.steps {
        match &s.action {
            StepAction::Copy { to, .. } => {
                formats.insert(to.clone(), Format::Qcow2);
            }
            StepAction::Snapshot { file, active, .. } => {
                formats.insert(file.clone(), Format::Qcow2);
                formats.insert(active.clone(), Format::Qcow2);
            }
            StepAction::Mirror { to, .. } => {
                formats.insert(to.clone(), Format::Qcow2);
            }
            StepAction::Revert { discarded, .. } => {
                formats.insert(discarded.clone(), Format::Qcow2);
            }
            _ => {}
        }
    }
    let active = disk.plan.chain.last().cloned().unwrap_or_default();
    Journal {
        active_id: disk
            .libvirt
            .is_none()
            .then(|| crate::journal::file_id(&active))
            .flatten(),
        namespace: disk.key.namespace.clone(),
        disk: disk.key.name.clone(),
        active,
        started_unix: now_unix(),
        formats,
        steps: disk
            .plan
            .steps
            .iter()
            .map(|s| JournalStep {
                step: s.clone(),
                state: StepState::Pending,
                written_bytes: 0,
                seconds: 0.0,
                attempts: 0,
            })
            .collect(),
        result: disk.plan.result.clone(),
        bindings: bindings_of(disk, spec, roots),
        leaving: disk.plan.leaving.clone(),
        predicted_bytes: disk.plan.total_bytes,
        libvirt: disk.libvirt.clone(),
        live: disk.live,
        revert: disk.revert.clone(),
    }
}

/// Records the bindings of a disk whose chain already matches (adoption, or a name change).
/// Records disk `disk`, whose plan has no step, as `apply` does (its record and bindings),
/// holding its lock. `Ok(false)`: another process works on it (nothing written).
pub(crate) fn record_in_sync(
    disk: &DiskReport,
    spec: &DesiredDisk,
    host: &Host,
) -> Result<bool, String> {
    let Some(_lock) = host.state.lock_disk(&spec.key).map_err(|e| e.to_string())? else {
        return Ok(false);
    };
    // (A plan may have started between the pass's plan and the lock.)
    if matches!(Journal::load(&host.state, &spec.key), Ok(Some(_))) {
        return Ok(false);
    }
    record_bindings(disk, spec, &host.roots, &host.state).map_err(|e| e.to_string())?;
    Ok(true)
}

fn record_bindings(
    disk: &DiskReport,
    spec: &DesiredDisk,
    roots: &Roots,
    state: &StateDir,
) -> Result<(), StateError> {
    let bindings = bindings_of(disk, spec, roots);
    let mut st = state
        .load(&disk.key)?
        .unwrap_or_else(|| DiskState::empty(&disk.key));
    let active = disk.plan.chain.last().cloned().unwrap_or_default();
    if st.bindings == bindings && st.active == active && state.has_keyed_record(&disk.key) {
        return Ok(());
    }
    st.active = active;
    st.bindings = bindings;
    state.save(&st)
}

/// The backend for a journal: libvirt for a libvirt disk, `qemu-img` otherwise.
#[cfg_attr(not(feature = "libvirt"), allow(unused_variables))]
fn executor(
    journal: &Journal,
    roots: &Roots,
    state: &StateDir,
    dead: HashSet<PathBuf>,
    options: &ApplyOptions,
) -> Result<Box<dyn Executor>, ApplyError> {
    match &journal.libvirt {
        None => Ok(Box::new(Offline::new(
            roots.clone(),
            journal.formats.clone(),
            dead,
            options.exec,
        ))),
        #[cfg(feature = "libvirt")]
        Some(src) => Ok(Box::new(crate::libvirt::Libvirt::new(
            src.clone(),
            roots.clone(),
            journal.formats.clone(),
            dead,
            options.exec,
            journal.live,
            journal.revert.clone(),
            Some(throttle_record(state, journal)),
        ))),
        #[cfg(not(feature = "libvirt"))]
        Some(_) => Err(ApplyError::Step {
            index: 1,
            op: "libvirt",
            source: Box::new(ExecError::from(crate::libvirt::LiveError::NotBuilt)),
            ran: steps_ran(journal),
        }),
    }
}

/// Where the guest write limit a live job set on this disk is remembered until lifted
/// (`throttled/NAMESPACE/NAME.limit`). One left by a version before namespaces
/// (`throttled/NAME.limit`) moves there first: it belongs to the disk whose journal it was left
/// with, and that journal was this disk's (two keys sharing a legacy name are refused earlier).
#[cfg(feature = "libvirt")]
fn throttle_record(state: &StateDir, journal: &Journal) -> PathBuf {
    let dir = state.path().join("throttled");
    let keyed = dir
        .join(&journal.namespace)
        .join(format!("{}.limit", crate::state::file_stem(&journal.disk)));
    let legacy = dir.join(format!("{}.limit", journal.disk));
    if !keyed.exists() && legacy.exists() {
        let _ = std::fs::create_dir_all(dir.join(&journal.namespace));
        let _ = std::fs::rename(&legacy, &keyed);
    }
    keyed
}

/// The disk's active image now (a live disk's moves with snapshots, pivots and mirrors).
fn active_now(journal: &Journal) -> Result<PathBuf, ApplyError> {
    match &journal.libvirt {
        None => Ok(journal.active.clone()),
        Some(src) => crate::libvirt::locate(src)
            .map(|d| d.disk.active)
            .map_err(|e| ApplyError::Step {
                index: journal.steps.len(),
                op: "observe",
                source: Box::new(ExecError::from(e)),
                ran: steps_ran(journal),
            }),
    }
}

/// Runs the journal's remaining steps, checks the result, records it, removes the journal.
fn finish(
    mut journal: Journal,
    roots: &Roots,
    state: &StateDir,
    options: &ApplyOptions,
    out: &mut DiskOutcome,
) -> Result<(), ApplyError> {
    // Files leaving the chain, and files this plan deletes, do not keep their backing files alive.
    let dead: HashSet<PathBuf> = journal
        .leaving
        .iter()
        .cloned()
        .chain(journal.steps.iter().filter_map(|s| match &s.step.action {
            StepAction::Delete { file } => Some(file.clone()),
            _ => None,
        }))
        .collect();
    let exec = executor(&journal, roots, state, dead, options)?;
    let total = journal.steps.len();
    while let Some(i) = journal.next() {
        if options
            .stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst))
        {
            return Err(ApplyError::Stopped { index: i + 1 });
        }
        let step = journal.steps[i].step.clone();
        let op = step.action.op();
        // Every file the step writes or reads is locked for it: no other reconcile (another
        // disk sharing a layer, in this process or another) works on them meanwhile.
        let disk = journal.disk.clone();
        let stop = options.stop.clone();
        let Some(_files) = state.lock_files(
            &step.action.writes(),
            &step.action.reads(),
            &mut |f| {
                tracing::info!(disk = %disk, step = i + 1, op, file = %f.display(), "waiting: another step is working on this file");
            },
            &|| {
                stop.as_ref()
                    .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst))
            },
        )?
        else {
            return Err(ApplyError::Stopped { index: i + 1 });
        };
        if journal.active_replaced() {
            return Err(ApplyError::Step {
                index: i + 1,
                op,
                source: Box::new(ExecError::Precondition {
                    op,
                    file: journal.active.clone(),
                    what: "another file was put at the active image's path since this plan started; the plan no longer fits the chain and is set aside on the next run, which plans from the chain as it is".into(),
                }),
                ran: steps_ran(&journal),
            });
        }
        if journal.steps[i].state == StepState::Running {
            // Interrupted earlier: tidy up, then run it again (steps are idempotent).
            tracing::info!(disk = %journal.disk, step = i + 1, op, "resuming an interrupted step");
            exec.prepare_resume(&step.action)
                .map_err(|source| ApplyError::Step {
                    index: i + 1,
                    op,
                    source: Box::new(source),
                    ran: steps_ran(&journal),
                })?;
        }
        journal.steps[i].state = StepState::Running;
        journal.steps[i].attempts += 1;
        journal.save(state)?;
        let key = journal.key();
        options
            .progress
            .step_started(&key, i + 1, total, op, step.bytes);
        let result = exec.run(&step.action, &mut |f| options.progress.step_progress(f));
        if result.is_err() {
            options.progress.step_abandoned();
        }
        let r = result.map_err(|source| ApplyError::Step {
            index: i + 1,
            op,
            source: Box::new(source),
            ran: steps_ran(&journal),
        })?;
        journal.steps[i].state = StepState::Done;
        // Only a step that itself puts another file at the active path moves the identity on;
        // after any other, a different file there was put by someone else.
        if journal.active_id.is_some() && step.action.replaces_active() {
            journal.active_id = crate::journal::file_id(&journal.active);
        }
        journal.steps[i].written_bytes = r.written_bytes;
        journal.steps[i].seconds = r.seconds;
        journal.save(state)?;
        tracing::info!(disk = %key, step = i + 1, op, predicted = step.bytes, written = r.written_bytes, seconds = r.seconds, "step done");
        let record = StepRecord {
            op: op.to_string(),
            predicted_bytes: step.bytes,
            written_bytes: r.written_bytes,
            seconds: r.seconds,
        };
        options.progress.step_done(&key, i + 1, total, &record);
        out.records.push(record);
        out.steps.push(op.to_string());
        out.predicted_bytes += step.bytes;
        out.written_bytes += r.written_bytes;
        // The chain must still read after every step.
        observe_chain(roots, &active_now(&journal)?).map_err(|source| ApplyError::Observe {
            index: i + 1,
            source,
        })?;
    }
    let active = active_now(&journal)?;
    let chain = observe_chain(roots, &active).map_err(|source| ApplyError::Observe {
        index: total,
        source,
    })?;
    let found: Vec<PathBuf> = chain.layers.iter().map(|l| l.layer.path.clone()).collect();
    let expected: Vec<PathBuf> = journal.result.iter().map(|l| l.file.clone()).collect();
    if found != expected {
        let show = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" <- ")
        };
        // Every step ran; the chain was changed behind diskchain's back meanwhile. Nothing is
        // left to resume: the journal is set aside, so the next plan starts from the chain as
        // it is instead of failing on this journal forever.
        let set_aside = set_aside(&journal, roots, state, options)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| format!("(could not be set aside: {e})"));
        return Err(ApplyError::Mismatch {
            found: show(&found),
            expected: show(&expected),
            set_aside,
        });
    }
    let key = journal.key();
    let mut st: DiskState = state.load(&key)?.unwrap_or_else(|| DiskState::empty(&key));
    st.active = active;
    st.bindings = journal.bindings.clone();
    if let Some(r) = &journal.revert {
        st.last_revert = Some(r.id.clone());
    }
    st.retired.extend(journal.leaving.iter().cloned());
    st.retired.sort();
    st.retired.dedup();
    st.retired.retain(|p| p.exists() && !found.contains(p));
    st.last_apply = Some(LastApply {
        finished_unix: now_unix(),
        steps: journal
            .steps
            .iter()
            .map(|s| s.step.action.op().to_string())
            .collect(),
        predicted_bytes: journal.predicted_bytes,
        written_bytes: journal.steps.iter().map(|s| s.written_bytes).sum(),
    });
    state.save(&st)?;
    journal.remove(state)?;
    Ok(())
}

/// Runs the interrupted step `r` of `journal` to its end (adopting its block job) and records it
/// done.
fn finish_step(
    journal: &mut Journal,
    r: usize,
    roots: &Roots,
    state: &StateDir,
    options: &ApplyOptions,
) -> Result<(), String> {
    let exec =
        executor(journal, roots, state, HashSet::new(), options).map_err(|e| e.to_string())?;
    let action = journal.steps[r].step.action.clone();
    exec.prepare_resume(&action).map_err(|e| e.to_string())?;
    exec.run(&action, &mut |_| {}).map_err(|e| e.to_string())?;
    journal.steps[r].state = StepState::Done;
    journal.save(state).map_err(|e| e.to_string())
}

/// Sets `journal` aside (see [`crate::resume::set_aside`]) with the disk's backend.
pub(crate) fn set_aside(
    journal: &Journal,
    roots: &Roots,
    state: &StateDir,
    options: &ApplyOptions,
) -> Result<PathBuf, String> {
    let exec =
        executor(journal, roots, state, HashSet::new(), options).map_err(|e| e.to_string())?;
    crate::resume::set_aside(
        journal,
        exec.as_ref(),
        || {
            let active = active_now(journal).map_err(|e| e.to_string())?;
            let chain = observe_chain(roots, &active).map_err(|e| e.to_string())?;
            Ok(chain.layers.iter().map(|l| l.layer.path.clone()).collect())
        },
        state,
    )
}

/// `diskchain set-aside --disk [NAMESPACE/]NAME`: sets the disk's journal aside, if it has one
/// (holding the disk's lock, so no apply or agent works on it meanwhile).
pub fn set_aside_disk(
    disk: &DiskKey,
    roots: &[PathBuf],
    state: &StateDir,
) -> Result<Option<PathBuf>, String> {
    let roots = Roots::new(roots).map_err(|e| e.to_string())?;
    let _lock = match state.lock_disk(disk) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Err(
                "another diskchain process (an agent or an apply) is working on it; try again when it is done"
                    .into(),
            );
        }
        Err(e) => return Err(e.to_string()),
    };
    let Some(journal) = Journal::load(state, disk).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let options = ApplyOptions {
        exec: ExecOptions::default(),
        progress: std::sync::Arc::new(crate::progress::Silent),
        stop: None,
    };
    set_aside(&journal, &roots, state, &options).map(Some)
}
