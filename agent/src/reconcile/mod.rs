//! `diskchain agent`: the reconcile loop over a watched spec directory (file mode, the embedded
//! default).
//!
//! ```text
//!  spec dir ──notify (debounced)──┐
//!  resync interval ───────────────┼─▶ pass: load specs (a bad file sidelines only its disk)
//!                                 │         plan every disk at once (one scan of the roots)
//!                                 │         disks with work ─▶ worker pool (--max-parallel)
//!  worker: apply one disk (journaled) ◀─┘   each step locks the files it writes and reads
//! ```
//!
//! One disk never runs two plans at once; a failing disk backs off exponentially and never blocks
//! the others; a disk whose spec is invalid, suspended or removed is left alone (removing a spec
//! releases the disk, it never deletes anything). SIGTERM or SIGINT: no new step starts, running
//! steps get `--grace` to finish, then the QEMU processes are stopped at a point the journal
//! resumes from; exit 0.

pub mod http;
pub mod metrics;
pub mod schedule;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diskchain_crd::{DesiredDisk, DiskKey, load_path_lenient};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use metrics::Metrics;

use crate::apply::{ApplyOptions, StepRecord, reconcile_disk};
use crate::execute::{ExecOptions, terminate_running};
use crate::journal::{Journal, now_unix};
use crate::observe::Roots;
pub use crate::outcome::Outcome;
use crate::plan::{Host, plan_loaded};
use crate::progress::Progress;
use crate::state::{StateDir, write_atomic};

/// What `diskchain agent` is told.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The spec directory (a git checkout).
    pub specs: PathBuf,
    /// Allowed roots.
    pub roots: Vec<PathBuf>,
    /// The state directory.
    pub state: StateDir,
    /// Re-observe every disk this often.
    pub resync: Duration,
    /// Disks reconciled at once.
    pub max_parallel: usize,
    /// Where to serve `/healthz`, `/readyz` and `/metrics`.
    pub listen: Option<SocketAddr>,
    /// How long running steps may take to finish on shutdown.
    pub grace: Duration,
    /// How long the spec directory must be quiet before a change is acted on.
    pub debounce: Duration,
    /// A pass running longer than this turns `/readyz` not-ready and is logged.
    pub stuck_after: Duration,
    /// Passed to the executors.
    pub exec: ExecOptions,
}

/// What the agent knows of one disk, written to `<state-dir>/agent.json` for `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiskTrack {
    /// The disk's namespace and name.
    #[serde(flatten)]
    pub key: DiskKey,
    /// How its last reconcile ended, or `running`.
    pub result: Outcome,
    /// The last error, if the last reconcile failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Failures in a row (the backoff grows with them).
    pub failures: u32,
    /// Seconds since the Unix epoch of the last reconcile.
    pub last_unix: u64,
    /// Its backups (a disk with `spec.backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<schedule::BackupTrack>,
    /// When a failed scheduled backup or verify may be tried again.
    #[serde(skip)]
    backup_retry: Option<Instant>,
    #[serde(skip)]
    next_attempt: Option<Instant>,
    /// What the disk's journal and spec were when its last run started.
    #[serde(skip)]
    started_on: Option<String>,
    /// Set when the disk needs the operator: the journal and spec it was stuck on. The agent
    /// does not retry while both are unchanged.
    #[serde(skip)]
    parked_on: Option<String>,
}

/// The disk's journal (size and modification time) and spec, as one comparable string; `None`
/// when there is no journal.
fn park_key(state: &StateDir, spec: &DesiredDisk) -> Option<String> {
    let meta = std::fs::metadata(state.journal_file(&spec.key)).ok()?;
    Some(format!(
        "{}:{:?}:{}",
        meta.len(),
        meta.modified().ok(),
        serde_json::to_string(&spec.doc).unwrap_or_default()
    ))
}

/// The agent's own record, `<state-dir>/agent.json` (`status` reads it back).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The agent's process.
    pub pid: u32,
    /// When it started.
    pub started_unix: u64,
    /// When this record was written.
    pub updated_unix: u64,
    /// Spec files that do not load, with why.
    pub spec_errors: Vec<String>,
    /// Per disk.
    pub disks: Vec<DiskTrack>,
    /// The allowed roots the agent runs with (canonical): `status` reads chains with them.
    #[serde(default)]
    pub roots: Vec<PathBuf>,
}

/// State shared with the HTTP server.
pub struct Shared {
    /// The metrics.
    pub metrics: Metrics,
    /// True once the first pass over every disk is done.
    pub ready: AtomicBool,
    /// When the pass now running started (milliseconds since the epoch), 0 between passes.
    pub pass_started_ms: AtomicU64,
    /// How long a pass may run before `/readyz` reports it stuck.
    pub stuck_after: Duration,
}

impl Shared {
    /// Fresh metrics, not ready yet, no pass running.
    pub fn new(stuck_after: Duration) -> Shared {
        Shared {
            metrics: Metrics::new(),
            ready: AtomicBool::new(false),
            pass_started_ms: AtomicU64::new(0),
            stuck_after,
        }
    }

    /// How long the pass now running has been running, when it is past `stuck_after`.
    pub fn stuck_for(&self) -> Option<Duration> {
        let started = self.pass_started_ms.load(Ordering::SeqCst);
        if started == 0 {
            return None;
        }
        let ran = Duration::from_millis(now_ms().saturating_sub(started));
        (ran > self.stuck_after).then_some(ran)
    }
}

/// The agent's observer of a disk's steps: each step's bytes and time go into the metrics as it
/// ends (a long plan shows its progress before the disk is done).
pub(crate) struct MetricsProgress {
    pub(crate) shared: Arc<Shared>,
}

impl Progress for MetricsProgress {
    fn step_done(&self, _disk: &DiskKey, _index: usize, _total: usize, r: &StepRecord) {
        let m = &self.shared.metrics;
        let op = metrics::OpLabels { op: r.op.clone() };
        m.bytes_written.get_or_create(&op).inc_by(r.written_bytes);
        m.step_seconds.get_or_create(&op).observe(r.seconds);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Logs a pass that has been running longer than `--stuck-after`, once per pass.
async fn watchdog(shared: Arc<Shared>) {
    let mut warned_for = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let started = shared.pass_started_ms.load(Ordering::SeqCst);
        if let Some(ran) = shared.stuck_for()
            && warned_for != started
        {
            warned_for = started;
            tracing::error!(
                running = %humantime::format_duration(Duration::from_secs(ran.as_secs())),
                "a pass over the disks is stuck (reading specs, libvirt or the image roots does not answer): /readyz reports not ready until it ends; SIGTERM still stops the agent"
            );
        }
    }
}

/// How a backup task of a disk ended: the task itself failing (outer, its message), or the work
/// done (a backup, a verify, a retention merge) with its result.
type TaskOutcome<T> = Result<Result<T, crate::backup::BackupError>, String>;
/// How a scheduled backup task of a disk ended.
type BackupOutcome = TaskOutcome<crate::backup::BackupDone>;
/// How a retention merge task of a disk ended (`None`: nothing to merge).
type RetainOutcome = TaskOutcome<Option<crate::backup::RetentionReport>>;

/// What a task of the agent did.
enum TaskResult {
    /// A reconcile of a disk ended.
    Reconcile(DiskKey, Result<crate::outcome::DiskResult, String>),
    /// A scheduled backup (and its retention) ended.
    Backup(DiskKey, BackupOutcome),
    /// The scheduled backups of one domain's disks, taken together, ended.
    Backups(Vec<(DiskKey, BackupOutcome)>),
    /// A scheduled verify ended.
    Verify(DiskKey, TaskOutcome<crate::backup::Verified>),
    /// A retention merge the policy asked for (a lowered retention) ended.
    Retain(DiskKey, RetainOutcome),
}

/// What a backup task of a disk does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BackupWork {
    /// A scheduled backup (and its retention).
    Backup,
    /// A scheduled deep verify.
    Verify,
    /// The merges a lowered retention asks for.
    Retain,
}

struct Agent {
    opts: AgentOptions,
    roots: Roots,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    tracks: BTreeMap<DiskKey, DiskTrack>,
    running: HashSet<DiskKey>,
    /// The active image of each running disk (from the plan it started on): a spec that reaches
    /// one through another path claims a disk already claimed.
    claimed: BTreeMap<PathBuf, DiskKey>,
    tasks: JoinSet<TaskResult>,
    permits: Arc<Semaphore>,
    /// The specs of the last pass with a backup schedule (the schedule tick starts their runs).
    scheduled: Vec<DesiredDisk>,
    /// When the agent first saw each disk's backup policy: without a point yet, the first
    /// scheduled backup is the first occurrence after it.
    policy_seen: BTreeMap<DiskKey, i64>,
    spec_errors: Vec<String>,
    started_unix: u64,
    /// Disks found in sync, with what they were found in sync with: a pass that finds the same
    /// spec, record and chain files (see [`Quiet`]) does not plan them again.
    quiet: HashMap<DiskKey, Quiet>,
    /// Each disk's chain when it was last planned: a disk sharing a file with another disk is
    /// never skipped (the other's plan must see it as a managed disk).
    last_chain: HashMap<DiskKey, Vec<PathBuf>>,
}

/// What a file-backed disk in sync was in sync with: its spec, its record and the files of its
/// chain as `stat` shows them (device, inode, size, modification and change times; the change
/// time moves on any write or metadata change, and cannot be set back by hand).
#[derive(PartialEq, Eq)]
struct Quiet {
    spec: DesiredDisk,
    record: Option<Stat>,
    journal: bool,
    files: Vec<(PathBuf, Option<Stat>)>,
}

/// A file's `stat`: device, inode, size, modification and change times (s, ns).
type Stat = (u64, u64, u64, i64, i64, i64, i64);

fn stat_of(p: &Path) -> Option<Stat> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

impl Quiet {
    /// Disk `spec` as it is now, its chain being `chain`. `None` for a libvirt disk: a running
    /// domain's files change under it, and its chain is libvirt's to tell.
    fn of(spec: &DesiredDisk, chain: &[PathBuf], state: &StateDir) -> Option<Quiet> {
        if spec.live.is_some() {
            return None;
        }
        Some(Quiet {
            spec: spec.clone(),
            record: stat_of(&state.record_file(&spec.key)),
            journal: state.journal_file(&spec.key).exists(),
            files: chain.iter().map(|f| (f.clone(), stat_of(f))).collect(),
        })
    }

    /// The same spec, record and files now.
    fn holds(&self, spec: &DesiredDisk, state: &StateDir) -> bool {
        let chain: Vec<PathBuf> = self.files.iter().map(|(f, _)| f.clone()).collect();
        Quiet::of(spec, &chain, state).is_some_and(|now| now == *self)
    }
}

/// What both agent modes start from: the allowed roots, checked, and the async runtime; or the
/// exit code, the error printed (2: a bad root; 1: no runtime).
pub(crate) fn start(roots: &[PathBuf]) -> Result<(Roots, tokio::runtime::Runtime), i32> {
    let roots = Roots::new(roots).map_err(|e| {
        eprintln!("error: {e}");
        2
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: failed to start the async runtime: {e}");
            1
        })?;
    Ok((roots, rt))
}

/// Runs the agent until SIGTERM or SIGINT. Returns the exit code.
pub fn run(mut opts: AgentOptions) -> i32 {
    // The watcher reports absolute paths: a relative --specs (resolved once, here) would match
    // none of them, and every edit would wait for the resync.
    opts.specs = opts
        .specs
        .canonicalize()
        .or_else(|_| std::path::absolute(&opts.specs))
        .unwrap_or(opts.specs);
    let (roots, rt) = match start(&opts.roots) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let code = rt.block_on(async move {
        let shared = Arc::new(Shared::new(opts.stuck_after));
        tokio::spawn(watchdog(shared.clone()));
        if let Some(addr) = opts.listen
            && let Err(e) = http::listen(addr, shared.clone()).await
        {
            eprintln!("error: {e}");
            return 2;
        }
        // What an earlier run knew of backups (when each disk was last verified).
        let tracks: BTreeMap<DiskKey, DiskTrack> =
            crate::state::read_json::<AgentRecord>(&opts.state.path().join("agent.json"))
                .ok()
                .flatten()
                .map(|r| {
                    r.disks
                        .into_iter()
                        .filter(|d| d.backup.is_some())
                        .map(|d| {
                            (
                                d.key.clone(),
                                DiskTrack {
                                    key: d.key,
                                    backup: d.backup,
                                    ..Default::default()
                                },
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
        let agent = Agent {
            permits: Arc::new(Semaphore::new(opts.max_parallel.max(1))),
            opts,
            roots,
            shared,
            stop: Arc::new(AtomicBool::new(false)),
            tracks,
            running: HashSet::new(),
            claimed: BTreeMap::new(),
            tasks: JoinSet::new(),
            scheduled: Vec::new(),
            policy_seen: BTreeMap::new(),
            spec_errors: Vec::new(),
            started_unix: now_unix(),
            quiet: HashMap::new(),
            last_chain: HashMap::new(),
        };
        agent.main_loop().await
    });
    // A pass stuck in a blocking call (a hung libvirtd, a dead mount) must not keep the process
    // alive: running steps were given their grace and stopped by now.
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

impl Agent {
    async fn main_loop(mut self) -> i32 {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watcher = watch(&self.opts.specs, self.opts.debounce, tx);
        if let Err(e) = &watcher {
            tracing::warn!(error = %e, specs = %self.opts.specs.display(), "cannot watch the spec directory; relying on --resync");
        }
        let mut tick = tokio::time::interval(self.opts.resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Backup and verify schedules are checked this often (cron has minute resolution).
        let mut sched = tokio::time::interval(Duration::from_secs(5));
        sched.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: failed to handle SIGTERM: {e}");
                    return 1;
                }
            };
        tracing::info!(specs = %self.opts.specs.display(), resync = %humantime::format_duration(self.opts.resync), "agent started");
        loop {
            let why = tokio::select! {
                _ = tick.tick() => "resync",
                Some(()) = rx.recv() => {
                    while rx.try_recv().is_ok() {}
                    "spec change"
                }
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Ok(r) = done {
                        self.finished(r);
                    }
                    continue;
                }
                _ = sched.tick() => {
                    self.schedule();
                    continue;
                }
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            };
            // A pass only reads (specs, chains, libvirt) until it starts tasks, so it may be
            // abandoned at any await: a signal is never kept waiting by a hung read.
            self.shared
                .pass_started_ms
                .store(now_ms().max(1), Ordering::SeqCst);
            let stop = tokio::select! {
                _ = self.pass(why) => false,
                _ = term.recv() => true,
                _ = tokio::signal::ctrl_c() => true,
            };
            self.shared.pass_started_ms.store(0, Ordering::SeqCst);
            if stop {
                break;
            }
        }
        self.shutdown().await;
        drop(watcher);
        0
    }

    async fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        tracing::info!(running = self.running.len(), grace = %humantime::format_duration(self.opts.grace), "shutting down: no new steps start; running steps may finish");
        let deadline = tokio::time::Instant::now() + self.opts.grace;
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(Ok(r))) => self.finished(r),
                Ok(_) => {}
                Err(_) => {
                    let n = terminate_running();
                    tracing::warn!(
                        stopped = n,
                        "grace period over: stopped the running QEMU processes; their steps resume on the next start"
                    );
                    let _ = tokio::time::timeout(Duration::from_secs(10), async {
                        while let Some(r) = self.tasks.join_next().await {
                            if let Ok(r) = r {
                                self.finished(r);
                            }
                        }
                    })
                    .await;
                    break;
                }
            }
        }
        self.write_record();
        tracing::info!("agent stopped");
    }

    /// One pass: load every spec, plan every disk at once, start the disks that have work.
    async fn pass(&mut self, why: &'static str) {
        if self.stop.load(Ordering::SeqCst) {
            return;
        }
        let started = Instant::now();
        let specs_dir = self.opts.specs.clone();
        let (specs, errors) =
            match tokio::task::spawn_blocking(move || load_path_lenient(&specs_dir)).await {
                Ok(x) => x,
                Err(_) => return,
            };
        let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        if errors != self.spec_errors {
            for e in &errors {
                tracing::warn!(error = %e, "spec not loaded; its disk is left alone");
            }
        }
        self.spec_errors = errors;
        self.shared
            .metrics
            .spec_errors
            .set(self.spec_errors.len() as i64);

        // Disks whose spec went away are released: forgotten, never touched.
        let keys: HashSet<DiskKey> = specs.iter().map(|s| s.key.clone()).collect();
        let gone: Vec<DiskKey> = self
            .tracks
            .keys()
            .filter(|k| !keys.contains(*k))
            .cloned()
            .collect();
        for n in gone {
            if !self.running.contains(&n) {
                tracing::info!(disk = %n, "no valid spec for this disk any more (removed, renamed or invalid: see the spec errors): the disk is released, nothing is deleted");
                self.tracks.remove(&n);
            }
        }
        // The checks that span disks see every spec of the pass, and the disks at work.
        let mut host = Host::new(&self.roots, &self.opts.state, &specs);
        host.claimed = self.claimed.clone();
        let now = chrono::Utc::now().timestamp();
        self.scheduled = specs
            .iter()
            .filter(|s| s.spec().backup.is_some() && !s.spec().suspend)
            .cloned()
            .collect();
        for s in &self.scheduled {
            self.policy_seen.entry(s.key.clone()).or_insert(now);
        }
        self.policy_seen.retain(|k, _| keys.contains(k));
        self.quiet.retain(|k, _| keys.contains(k));
        self.last_chain.retain(|k, _| keys.contains(k));
        let mut candidates: Vec<DesiredDisk> = Vec::new();
        let mut skipped = 0;
        for s in specs {
            if s.spec().suspend {
                self.track(&s.key).result = Outcome::Suspended;
                self.quiet.remove(&s.key);
                continue;
            }
            if self.running.contains(&s.key) {
                continue;
            }
            // In sync with the same spec, record and files as when last planned: nothing to
            // plan (a stat of each file, not a scan). Its active image stays claimed.
            if let Some(q) = self.quiet.get(&s.key)
                && self.tracks.get(&s.key).map(|t| t.result) == Some(Outcome::InSync)
                && q.holds(&s, &self.opts.state)
            {
                if let Some((active, _)) = q.files.last() {
                    host.claimed.insert(active.clone(), s.key.clone());
                }
                skipped += 1;
                continue;
            }
            self.quiet.remove(&s.key);
            candidates.push(s);
        }
        // One read of every record's retired files for the pass and the reconciles it starts
        // (not one per disk: that grows with disks times disks).
        let planned = {
            let (c, mut h) = (candidates.clone(), host.clone());
            tokio::task::spawn_blocking(move || {
                if c.is_empty() {
                    // Every disk unchanged or at work: nothing to scan the roots for.
                    return (Ok(crate::plan::PlanReport::default()), h);
                }
                h.read_retired();
                let r = plan_loaded(&c, &h);
                (r, h)
            })
            .await
        };
        let report = match planned {
            Ok((Ok(r), h)) => {
                host = h;
                r
            }
            Ok((Err(e), _)) => {
                tracing::error!(error = %e, "cannot plan any disk");
                return;
            }
            Err(_) => return,
        };
        // Files in more than one disk's chain (for the log; each step locks its files, so
        // disks sharing a layer never write or read one file against each other).
        let mut users: HashMap<PathBuf, usize> = HashMap::new();
        for d in &report.disks {
            for f in &d.plan.chain {
                *users.entry(f.clone()).or_default() += 1;
            }
        }
        for d in &report.disks {
            self.last_chain.insert(d.key.clone(), d.plan.chain.clone());
        }
        let mut owners: HashMap<&Path, usize> = HashMap::new();
        for chain in self.last_chain.values() {
            for f in chain {
                *owners.entry(f.as_path()).or_default() += 1;
            }
        }
        let alone: HashSet<DiskKey> = report
            .disks
            .iter()
            .filter(|d| {
                d.plan
                    .chain
                    .iter()
                    .all(|f| owners.get(f.as_path()).copied() == Some(1))
            })
            .map(|d| d.key.clone())
            .collect();
        let now = Instant::now();
        self.schedule();
        for e in &report.errors {
            let result = Outcome::from(e.kind);
            self.shared
                .metrics
                .reconciles
                .get_or_create(&metrics::ResultLabels {
                    disk: e.key.to_string(),
                    result: result.as_str().into(),
                })
                .inc();
            let t = self.track(&e.key);
            let changed = t.error.as_deref() != Some(e.error.as_str());
            t.result = result;
            t.error = Some(e.error.clone());
            t.last_unix = now_unix();
            if changed {
                tracing::warn!(disk = %e.key, error = %e.error, "disk left alone");
            }
        }
        // One host for every reconcile this pass starts: shared, not copied per disk (its
        // keys and claims grow with the disks).
        let host = Arc::new(host);
        // Each candidate's spec by key (not a search of every candidate per disk).
        let spec_of: HashMap<&DiskKey, &DesiredDisk> =
            candidates.iter().map(|s| (&s.key, s)).collect();
        let mut started_work = 0;
        // A disk with an unfinished plan is resumed as `apply` would resume it, even when
        // planning it again fails: the plan's finished steps may have moved the files the spec
        // names (a point bound by `file:` now lives in the placement directory), and only the
        // journal's remaining steps bring the chain to where the spec's bindings fit again.
        for e in &report.errors {
            if self.running.contains(&e.key)
                || !matches!(Journal::load(&self.opts.state, &e.key), Ok(Some(_)))
            {
                continue;
            }
            let Some(spec) = self.may_start(&e.key, &candidates, now) else {
                continue;
            };
            tracing::info!(disk = %e.key, trigger = why, "resuming the unfinished plan in the journal before planning again");
            // Its steps lock the files they use, like any other.
            self.start(spec, &host, None);
            started_work += 1;
        }
        // Disks in sync with no record yet (a new host, a fresh state directory) are recorded
        // here from this pass's plan, as `apply` records them, rather than each planned again
        // in a reconcile of its own.
        let unrecorded: Vec<(crate::plan::DiskReport, DesiredDisk)> = report
            .disks
            .iter()
            .filter(|d| {
                d.plan.steps.is_empty()
                    && !self.running.contains(&d.key)
                    && matches!(self.opts.state.load(&d.key), Ok(None))
                    && matches!(Journal::load(&self.opts.state, &d.key), Ok(None))
            })
            .filter_map(|d| Some((d.clone(), (*spec_of.get(&d.key)?).clone())))
            .collect();
        if !unrecorded.is_empty() {
            let h = host.clone();
            if let Ok(done) = tokio::task::spawn_blocking(move || {
                unrecorded
                    .iter()
                    .map(|(d, s)| (d.key.clone(), crate::apply::record_in_sync(d, s, &h)))
                    .collect::<Vec<_>>()
            })
            .await
            {
                for (key, r) in done {
                    if let Err(e) = r {
                        tracing::warn!(disk = %key, error = %e, "cannot record the disk; its reconcile tries again");
                    }
                }
            }
        }
        for d in report.disks {
            let key = d.key.clone();
            let labels = metrics::DiskLabels {
                disk: key.to_string(),
            };
            let m = &self.shared.metrics;
            m.plan_bytes
                .get_or_create(&labels)
                .set(d.plan.total_bytes as i64);
            m.chain_length
                .get_or_create(&labels)
                .set(d.plan.chain.len() as i64);
            let in_flight = Journal::load(&self.opts.state, &key)
                .ok()
                .flatten()
                .is_some();
            let drift = !d.plan.steps.is_empty();
            m.drift.get_or_create(&labels).set(i64::from(drift));
            // A disk in sync that has no record yet gets one (as `apply` records it), so that
            // `status` shows it and which file holds each point.
            let recorded = !matches!(self.opts.state.load(&key), Ok(None));
            if !drift && !in_flight && recorded {
                if alone.contains(&key)
                    && let Some(spec) = spec_of.get(&key)
                    && let Some(q) = Quiet::of(spec, &d.plan.chain, &self.opts.state)
                {
                    self.quiet.insert(key.clone(), q);
                }
                let t = self.track(&key);
                if t.result != Outcome::InSync {
                    tracing::info!(disk = %key, "in sync with its spec");
                }
                t.result = Outcome::InSync;
                t.error = None;
                t.failures = 0;
                t.last_unix = now_unix();
                continue;
            }
            let Some(spec) = self.may_start(&key, &candidates, now) else {
                continue;
            };
            let sharing = d
                .plan
                .chain
                .iter()
                .any(|f| users.get(f).copied().unwrap_or(0) > 1);
            tracing::info!(disk = %key, steps = d.plan.steps.len(), bytes = d.plan.total_bytes, sharing, trigger = why, "reconciling");
            self.start(spec, &host, d.plan.chain.last().cloned());
            started_work += 1;
        }
        self.shared.ready.store(true, Ordering::SeqCst);
        self.write_record();
        tracing::debug!(
            trigger = why,
            started = started_work,
            unchanged = skipped,
            seconds = started.elapsed().as_secs_f64(),
            "pass done"
        );
    }

    /// The spec of disk `key` when the disk may start now: it is not backing off after a
    /// failure, nor waiting for the operator on the same spec and journal (the error said what
    /// to do; it is not retried). Records what it starts on and marks it running.
    fn may_start(
        &mut self,
        key: &DiskKey,
        candidates: &[DesiredDisk],
        now: Instant,
    ) -> Option<DesiredDisk> {
        // (A backup or verify of the disk started since the candidates were chosen: its
        // reconcile waits for the next pass rather than fail on the disk's lock beside it.)
        if self.running.contains(key) {
            return None;
        }
        let spec = candidates.iter().find(|s| s.key == *key).cloned()?;
        let parked = park_key(&self.opts.state, &spec);
        let t = self.track(key);
        if t.next_attempt.is_some_and(|at| at > now)
            || (t.parked_on.is_some() && t.parked_on == parked)
        {
            return None;
        }
        t.parked_on = None;
        t.started_on = parked;
        t.result = Outcome::Running;
        Some(spec)
    }

    /// Starts the reconcile of disk `spec` (whose active image is `active`, when its plan is
    /// known) in a task of its own.
    fn start(&mut self, spec: DesiredDisk, host: &Arc<Host>, active: Option<PathBuf>) {
        let key = spec.key.clone();
        self.running.insert(key.clone());
        if let Some(a) = active {
            self.claimed.insert(a, key.clone());
        }
        let permits = self.permits.clone();
        let host = host.clone();
        let options = ApplyOptions {
            exec: self.opts.exec,
            progress: Arc::new(MetricsProgress {
                shared: self.shared.clone(),
            }),
            stop: Some(self.stop.clone()),
        };
        self.tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let result = tokio::task::spawn_blocking(move || reconcile_disk(&spec, &host, options))
                .await
                .map_err(|e| format!("the reconcile task failed: {e}"));
            TaskResult::Reconcile(key, result)
        });
    }

    /// Starts the scheduled backups and verifies that are due, of disks not at work.
    fn schedule(&mut self) {
        if self.stop.load(Ordering::SeqCst) {
            return;
        }
        let now = chrono::Utc::now().timestamp();
        // One host for every task started here (shared, not copied per disk).
        let host = Arc::new(Host::new(&self.roots, &self.opts.state, &self.scheduled));
        let mut changed = false;
        // Backups due now, started after the loop: the disks of one libvirt domain together.
        let mut due: Vec<DesiredDisk> = Vec::new();
        for spec in self.scheduled.clone() {
            let Some(policy) = spec.spec().backup.clone() else {
                continue;
            };
            // The repository's newest point is the last backup (whoever took it).
            let dir = host
                .roots
                .confine_dir(&policy.repository, String::new())
                .ok();
            let points = dir
                .as_ref()
                .and_then(|dir| crate::backup::repo::Manifest::of(dir).map(|m| m.points));
            let retention_due = dir.zip(points.as_ref()).is_some_and(|(dir, points)| {
                crate::backup::retention_pending(&dir, points, &policy)
            });
            let seen = self.policy_seen.get(&spec.key).copied().unwrap_or(now);
            // The repository records its last deep verify (whoever ran it: the agent, `verify
            // --deep`, Kubernetes mode).
            let verified = crate::backup::last_verified(&spec, &host);
            let t = self.track(&spec.key);
            let b = t.backup.get_or_insert_with(Default::default);
            let before = b.clone();
            if let Some(points) = &points {
                b.points = points.len();
                if let Some(p) = points.last() {
                    b.last_point = Some(p.point.clone());
                    b.last_unix = p.time_unix;
                }
            }
            let last_backup = if b.last_point.is_some() {
                b.last_unix
            } else {
                seen
            };
            b.next_unix = policy
                .schedule
                .as_deref()
                .and_then(|c| {
                    // A point dated ahead of the clock: due now (see `schedule::due`).
                    if last_backup > now {
                        Some(now)
                    } else {
                        schedule::next_after(c, last_backup)
                    }
                })
                .unwrap_or(0);
            if let Some(v) = verified {
                b.last_verify_unix = b.last_verify_unix.max(v);
            }
            let last_verify = if b.last_verify_unix > 0 {
                b.last_verify_unix
            } else {
                seen
            };
            b.next_verify_unix = policy
                .verify
                .as_ref()
                .and_then(|v| schedule::next_after(&v.schedule, last_verify.min(now)))
                .unwrap_or(0);
            let backup_due = b.next_unix > 0 && b.next_unix <= now;
            let verify_due = b.next_verify_unix > 0 && b.next_verify_unix <= now && b.points > 0;
            changed |= *b != before;
            let waiting = t.backup_retry.is_some_and(|at| at > Instant::now());
            if waiting || self.running.contains(&spec.key) {
                continue;
            }
            if backup_due {
                tracing::info!(disk = %spec.key, "scheduled backup due");
                due.push(spec);
            } else if retention_due {
                tracing::info!(disk = %spec.key, "the retention policy drops points: merging them away");
                self.start_backup(spec, &host, BackupWork::Retain);
            } else if verify_due {
                tracing::info!(disk = %spec.key, "scheduled verify due");
                self.start_backup(spec, &host, BackupWork::Verify);
            }
        }
        // The disks of one domain due together go in one task, so that a running domain's are
        // taken in one job at one instant with one checkpoint (crash-consistent across its
        // disks), as `diskchain backup` takes them.
        let mut groups: BTreeMap<Option<(String, String)>, Vec<DesiredDisk>> = BTreeMap::new();
        for spec in due {
            let domain = spec
                .live
                .as_ref()
                .map(|t| (t.uri.clone(), t.domain.clone()));
            match domain {
                Some(d) => groups.entry(Some(d)).or_default().push(spec),
                None => self.start_backup(spec, &host, BackupWork::Backup),
            }
        }
        for (_, group) in groups {
            if group.len() == 1 {
                let spec = group.into_iter().next().expect("one disk");
                self.start_backup(spec, &host, BackupWork::Backup);
            } else {
                self.start_domain_backup(group, &host);
            }
        }
        if changed {
            self.export_backup_metrics();
            self.write_record();
        }
    }

    /// Starts a backup, a deep verify or a retention merge of disk `spec` in a task of its own;
    /// the disk counts as running meanwhile, so no reconcile of it starts.
    fn start_backup(&mut self, spec: DesiredDisk, host: &Arc<Host>, work: BackupWork) {
        let key = spec.key.clone();
        self.running.insert(key.clone());
        let permits = self.permits.clone();
        let host = host.clone();
        let exec = self.opts.exec;
        self.tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            if work == BackupWork::Verify {
                let r =
                    tokio::task::spawn_blocking(move || crate::backup::verify(&spec, &host, true))
                        .await
                        .map_err(|e| format!("the verify task failed: {e}"));
                TaskResult::Verify(key, r)
            } else if work == BackupWork::Retain {
                let r = tokio::task::spawn_blocking(move || {
                    crate::backup::retain_now(&spec, &host, exec)
                })
                .await
                .map_err(|e| format!("the retention task failed: {e}"));
                TaskResult::Retain(key, r)
            } else {
                let r = tokio::task::spawn_blocking(move || {
                    crate::backup::backup_disk(
                        &spec,
                        &host,
                        exec,
                        chrono::Utc::now().timestamp(),
                        &crate::progress::Silent,
                    )
                    .map(|(b, _)| b)
                })
                .await
                .map_err(|e| format!("the backup task failed: {e}"));
                TaskResult::Backup(key, r)
            }
        });
    }

    /// Starts the backup of the disks `specs` of one libvirt domain in one task (one job and
    /// one checkpoint when the domain runs); each disk counts as running meanwhile.
    fn start_domain_backup(&mut self, specs: Vec<DesiredDisk>, host: &Arc<Host>) {
        let keys: Vec<DiskKey> = specs.iter().map(|s| s.key.clone()).collect();
        self.running.extend(keys.iter().cloned());
        let permits = self.permits.clone();
        let host = host.clone();
        let exec = self.opts.exec;
        self.tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let report = tokio::task::spawn_blocking(move || {
                crate::backup::backup_all(&specs, &host, exec, &crate::progress::Silent)
            })
            .await;
            let results = keys
                .into_iter()
                .map(|key| {
                    let r = match &report {
                        Err(e) => Err(format!("the backup task failed: {e}")),
                        Ok(report) => Ok(report
                            .backups
                            .iter()
                            .find(|b| b.disk == key.name && b.namespace == key.namespace)
                            .cloned()
                            .ok_or_else(|| {
                                report
                                    .errors
                                    .iter()
                                    .find(|e| e.key == key)
                                    .cloned()
                                    .unwrap_or_else(|| crate::backup::BackupError {
                                        key: key.clone(),
                                        error: "the domain's backup reported nothing for this disk"
                                            .into(),
                                        kind: crate::plan::ErrorKind::Failed,
                                    })
                            })),
                    };
                    (key, r)
                })
                .collect();
            TaskResult::Backups(results)
        });
    }

    fn backup_failed(&mut self, key: &DiskKey, what: &str, e: String) {
        let m = &self.shared.metrics;
        m.backups
            .get_or_create(&metrics::ResultLabels {
                disk: key.to_string(),
                result: format!("{what}_failed"),
            })
            .inc();
        let t = self.track(key);
        let b = t.backup.get_or_insert_with(Default::default);
        b.failures += 1;
        let backoff =
            Duration::from_secs(60u64 << b.failures.min(6)).min(Duration::from_secs(3600));
        tracing::warn!(disk = %key, error = %e, failures = b.failures, retry_in = %humantime::format_duration(backoff), "scheduled {what} failed");
        b.error = Some(e);
        t.backup_retry = Some(Instant::now() + backoff);
    }

    fn backup_finished(&mut self, key: DiskKey, result: BackupOutcome) {
        self.running.remove(&key);
        match result.and_then(|r| r.map_err(|e| e.error)) {
            Ok(done) => {
                let m = &self.shared.metrics;
                let labels = metrics::DiskLabels {
                    disk: key.to_string(),
                };
                m.backups
                    .get_or_create(&metrics::ResultLabels {
                        disk: key.to_string(),
                        result: done.kind.as_str().into(),
                    })
                    .inc();
                m.backup_bytes.get_or_create(&labels).inc_by(done.bytes);
                m.backup_last_success
                    .get_or_create(&labels)
                    .set(chrono::Utc::now().timestamp());
                tracing::info!(disk = %key, point = done.point, kind = done.kind.as_str(), bytes = done.bytes, "scheduled backup taken");
                let t = self.track(&key);
                t.backup_retry = None;
                let b = t.backup.get_or_insert_with(Default::default);
                b.failures = 0;
                b.error = None;
                b.last_kind = Some(done.kind.as_str().into());
                b.last_bytes = done.bytes;
            }
            Err(e) => self.backup_failed(&key, "backup", e),
        }
        // Points, next due and metrics from the repository as it is now.
        self.schedule();
        self.export_backup_metrics();
        self.write_record();
    }

    fn retain_finished(&mut self, key: DiskKey, result: RetainOutcome) {
        self.running.remove(&key);
        match result.and_then(|r| r.map_err(|e| e.error)) {
            Ok(done) => {
                if let Some(r) = done {
                    tracing::info!(disk = %key, removed = ?r.done.removed, bytes = r.done.total_bytes, "retention merged points away");
                }
                let t = self.track(&key);
                t.backup_retry = None;
            }
            Err(e) => self.backup_failed(&key, "retention", e),
        }
        self.schedule();
    }

    fn verify_finished(&mut self, key: DiskKey, result: TaskOutcome<crate::backup::Verified>) {
        self.running.remove(&key);
        let now = chrono::Utc::now().timestamp();
        match result.and_then(|r| r.map_err(|e| e.error)) {
            Ok(v) => {
                let sound = v.damaged.is_empty();
                if sound {
                    tracing::info!(disk = %key, points = v.points, "scheduled verify: every point sound");
                } else {
                    for d in &v.damaged {
                        tracing::error!(disk = %key, point = d.point, problem = d.problem, "scheduled verify: the repository is damaged");
                    }
                    self.shared
                        .metrics
                        .backups
                        .get_or_create(&metrics::ResultLabels {
                            disk: key.to_string(),
                            result: "verify_damaged".into(),
                        })
                        .inc();
                }
                let t = self.track(&key);
                t.backup_retry = None;
                let b = t.backup.get_or_insert_with(Default::default);
                b.last_verify_unix = now;
                b.verify_ok = Some(sound);
                b.error = (!sound).then(|| {
                    v.damaged
                        .iter()
                        .map(|d| format!("point {}: {}", d.point, d.problem))
                        .collect::<Vec<_>>()
                        .join("; ")
                });
            }
            Err(e) => self.backup_failed(&key, "verify", e),
        }
        self.schedule();
        self.write_record();
    }

    /// Per disk: points, when the next backup is due.
    fn export_backup_metrics(&self) {
        let m = &self.shared.metrics;
        for (key, t) in &self.tracks {
            if let Some(b) = &t.backup {
                let labels = metrics::DiskLabels {
                    disk: key.to_string(),
                };
                m.backup_points.get_or_create(&labels).set(b.points as i64);
                m.backup_next.get_or_create(&labels).set(b.next_unix);
            }
        }
    }

    fn finished(&mut self, done: TaskResult) {
        let (key, result) = match done {
            TaskResult::Reconcile(key, result) => {
                self.quiet.remove(&key);
                (key, result)
            }
            TaskResult::Backup(key, result) => return self.backup_finished(key, result),
            TaskResult::Backups(results) => {
                for (key, result) in results {
                    self.backup_finished(key, result);
                }
                return;
            }
            TaskResult::Verify(key, result) => return self.verify_finished(key, result),
            TaskResult::Retain(key, result) => return self.retain_finished(key, result),
        };
        self.running.remove(&key);
        self.claimed.retain(|_, k| *k != key);
        let m = &self.shared.metrics;
        let (result, error) = match result {
            Err(e) => (Outcome::Failed, Some(e)),
            Ok(r) => (r.outcome, r.message),
        };
        m.reconciles
            .get_or_create(&metrics::ResultLabels {
                disk: key.to_string(),
                result: result.as_str().into(),
            })
            .inc();
        let t = self.track(&key);
        t.result = result;
        t.last_unix = now_unix();
        match error {
            None => {
                t.failures = 0;
                t.error = None;
                t.next_attempt = None;
                tracing::info!(disk = %key, "reconciled");
            }
            Some(e) if result == Outcome::Stopped => {
                t.error = Some(e);
            }
            Some(e) if result == Outcome::NeedsOperator => {
                tracing::error!(disk = %key, error = %e, "the disk needs you: not retried until its spec or journal changes");
                t.parked_on = t.started_on.take();
                t.next_attempt = None;
                t.error = Some(e);
            }
            Some(e) => {
                t.failures += 1;
                let backoff =
                    Duration::from_secs(1u64 << t.failures.min(8)).min(Duration::from_secs(300));
                t.next_attempt = Some(Instant::now() + backoff);
                tracing::warn!(disk = %key, error = %e, failures = t.failures, retry_in = %humantime::format_duration(backoff), "reconcile failed");
                t.error = Some(e);
            }
        }
        self.write_record();
    }

    fn track(&mut self, key: &DiskKey) -> &mut DiskTrack {
        self.tracks.entry(key.clone()).or_insert_with(|| DiskTrack {
            key: key.clone(),
            ..Default::default()
        })
    }

    fn write_record(&self) {
        let rec = AgentRecord {
            pid: std::process::id(),
            started_unix: self.started_unix,
            updated_unix: now_unix(),
            spec_errors: self.spec_errors.clone(),
            disks: self.tracks.values().cloned().collect(),
            roots: self.roots.iter().map(Path::to_path_buf).collect(),
        };
        let path = self.opts.state.path().join("agent.json");
        if let Err(e) = write_atomic(
            &path,
            &serde_json::to_vec_pretty(&rec).expect("record serialises"),
        ) {
            tracing::warn!(error = %e, "cannot write the agent record");
        }
    }
}

/// Watches the spec directory (recursively) and its parent (a `git`-style replacement of the
/// whole directory shows there); every debounced batch of events sends one message.
fn watch(
    dir: &std::path::Path,
    debounce: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<()>,
) -> Result<
    notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
    notify::Error,
> {
    use notify::RecursiveMode;
    let specs = dir.to_path_buf();
    // Symlinks are not followed: one that leaves the spec directory (to `/`, say) would otherwise
    // put the whole tree it leads to under watch. Specs behind symlinks inside the directory are
    // still re-read on every --resync.
    let mut d = notify_debouncer_full::new_debouncer_opt::<
        _,
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >(
        debounce,
        None,
        move |res: notify_debouncer_full::DebounceEventResult| {
            // The parent is watched only to see the spec directory replaced: ignore everything
            // else there (the agent's own log or state may live beside the specs).
            // Reading the specs (every pass does) shows up as access events: only changes count.
            let relevant = res.is_ok_and(|events| {
                events.iter().any(|e| {
                    !matches!(e.kind, notify::EventKind::Access(_))
                        && e.paths.iter().any(|p| p.starts_with(&specs))
                })
            });
            if relevant {
                let _ = tx.send(());
            }
        },
        notify_debouncer_full::RecommendedCache::new(),
        notify::Config::default().with_follow_symlinks(false),
    )?;
    d.watch(dir, RecursiveMode::Recursive)?;
    if let Some(parent) = dir.parent().filter(|p| p.exists()) {
        let _ = d.watch(parent, RecursiveMode::NonRecursive);
    }
    Ok(d)
}
