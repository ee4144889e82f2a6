//! Backups: each disk with `spec.backup` backs up into its repository (see [`repo`]), a qcow2
//! chain of points with a manifest; retention removes points with the cheapest merges
//! ([`merge`]); `restore` writes a standalone image of a point; `verify` checks the structure
//! and, deep, every point's checksum.
//!
//! Offline disks (`source.file`, and a libvirt disk whose domain is shut off): QEMU's
//! `blockdev-backup` job in a `qemu-storage-daemon` (see `execute::qsd::backup`), which adds a
//! persistent dirty bitmap to the active image as it starts; the first backup is a full, the
//! next an incremental over the previous backup's bitmap merged from every layer. A bitmap that
//! cannot be trusted (gone, disabled, left in use by a QEMU that died) makes a resync instead: a
//! new layer backed by the disk's active image is re-pointed at the previous point with
//! `qemu-img rebase` in safe mode, which writes only the clusters where the disk reads
//! differently from it (never silently wrong; it reads both whole).
//!
//! Running domains: libvirt's backup API in push mode with a checkpoint per backup (see
//! `libvirt::backup`): a full, then incrementals since the previous point's checkpoint into a
//! layer backed by it; when that checkpoint cannot be trusted, a resync (a full into a scratch
//! file compared with the previous point, keeping only the differences).

pub mod merge;
pub mod repo;
pub mod retention;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use diskchain_crd::{BackupSpec, DesiredDisk, DiskKey};
use diskchain_planner::Format;
use serde::Serialize;

use crate::execute::{ExecOptions, qemu_img};
use crate::journal::Journal;
use crate::observe::observe_chain;
use crate::plan::{ErrorKind, Host};
use repo::{Kind, Point, Repo};

pub use merge::RetentionDone;

/// Cluster size of repository files: with larger target clusters a backup copies whole
/// clusters around each small change.
const CLUSTER: &str = "cluster_size=65536";

/// Why a backup command failed for one disk.
#[derive(Debug, Clone, Serialize)]
pub struct BackupError {
    /// The disk.
    #[serde(flatten)]
    pub key: DiskKey,
    /// What happened and what to do.
    pub error: String,
    /// Bad input (nothing touched), in use, or failed.
    pub kind: ErrorKind,
}

/// A backup taken.
#[derive(Debug, Clone, Serialize)]
pub struct BackupDone {
    /// The disk's name.
    pub disk: String,
    /// The disk's namespace.
    pub namespace: String,
    /// The point's name (its UTC time).
    pub point: String,
    /// `full`, `incremental` or `resync`.
    pub kind: Kind,
    /// Its file.
    pub file: PathBuf,
    /// Bytes written to the repository.
    pub bytes: u64,
    /// Why it is not an incremental, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The retention pass of one disk.
#[derive(Debug, Clone, Serialize)]
pub struct RetentionReport {
    /// The disk's name.
    pub disk: String,
    /// The disk's namespace.
    pub namespace: String,
    /// What retention did.
    #[serde(flatten)]
    pub done: RetentionDone,
}

/// What `diskchain backup` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackupReport {
    /// Backups taken.
    pub backups: Vec<BackupDone>,
    /// Retention merges.
    pub retention: Vec<RetentionReport>,
    /// Disks that failed.
    pub errors: Vec<BackupError>,
}

impl BackupReport {
    /// 0 all done; 2 bad input somewhere (those disks untouched); else 1.
    pub fn exit_code(&self) -> i32 {
        if self.errors.is_empty() {
            0
        } else if self.errors.iter().all(|e| e.kind == ErrorKind::BadInput) {
            2
        } else {
            1
        }
    }
}

fn err(disk: &DesiredDisk, kind: ErrorKind, message: String) -> BackupError {
    BackupError {
        key: disk.key.clone(),
        error: format!("{}: {message}", disk.origin()),
        kind,
    }
}

/// The disk's backup policy and its repository directory (inside the roots).
fn repository(disk: &DesiredDisk, host: &Host) -> Result<(BackupSpec, PathBuf), BackupError> {
    let Some(b) = disk.spec().backup.clone() else {
        return Err(err(
            disk,
            ErrorKind::BadInput,
            "spec.backup: the disk has no backup policy; add spec.backup with a repository".into(),
        ));
    };
    let dir = host
        .roots
        .confine_dir(&b.repository, "spec.backup.repository".into())
        .map_err(|e| err(disk, ErrorKind::BadInput, e.to_string()))?;
    Ok((b, dir))
}

/// Where a backup reads the disk from.
enum Source {
    /// An image at rest: `source.file`, or a libvirt disk whose domain is shut off.
    Offline(PathBuf),
    /// A running domain's disk: libvirt's backup API, with the active image (for its size).
    Live(diskchain_crd::desired::LiveTarget, PathBuf),
    /// A shut-off domain's disk: backed up offline, then its new bitmap recorded as a
    /// checkpoint in libvirt.
    ShutOff(diskchain_crd::desired::LiveTarget, PathBuf),
}

/// The disk's source, for a backup.
fn source(disk: &DesiredDisk) -> Result<Source, BackupError> {
    if let Some(f) = &disk.spec().source.file {
        return Ok(Source::Offline(f.clone()));
    }
    let Some(live) = &disk.live else {
        return Err(err(
            disk,
            ErrorKind::BadInput,
            "spec.source: no disk".into(),
        ));
    };
    match crate::libvirt::locate(live) {
        Ok(d) if d.running => Ok(Source::Live(live.clone(), d.disk.active.clone())),
        Ok(d) => Ok(Source::ShutOff(live.clone(), d.disk.active.clone())),
        Err(e) => Err(err(
            disk,
            if e.is_bad_input() {
                ErrorKind::BadInput
            } else {
                ErrorKind::Failed
            },
            format!("spec.source.libvirt: {e}"),
        )),
    }
}

fn run(mut c: Command, what: &str) -> Result<(), String> {
    let out = c
        .output()
        .map_err(|e| format!("{what}: qemu-img could not run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Backs up every disk of `disks` that has `spec.backup` (each under its disk lock, so no chain
/// step of the disk runs meanwhile), then applies its retention.
pub fn backup_all(
    disks: &[DesiredDisk],
    host: &Host,
    exec: ExecOptions,
    progress: &dyn crate::progress::Progress,
) -> BackupReport {
    let mut report = BackupReport::default();
    let mut push = |r: DiskBackup| match r {
        Ok((b, r)) => {
            report.backups.push(b);
            report.retention.extend(r);
        }
        Err(e) => report.errors.push(e),
    };
    // Disks of one running domain go in one job (one instant, one checkpoint).
    let mut domains: BTreeMap<(String, String), Vec<(&DesiredDisk, Source)>> = BTreeMap::new();
    for d in disks.iter().filter(|d| d.spec().backup.is_some()) {
        if let Err(e) = repository(d, host) {
            push(Err(e));
            continue;
        }
        match source(d) {
            Ok(Source::Live(t, a)) => domains
                .entry((t.uri.clone(), t.domain.clone()))
                .or_default()
                .push((d, Source::Live(t, a))),
            Ok(src) => push(take(
                d,
                src,
                host,
                exec,
                chrono::Utc::now().timestamp(),
                progress,
            )),
            Err(e) => push(Err(e)),
        }
    }
    for (_, group) in domains {
        let now = chrono::Utc::now().timestamp();
        if group.len() == 1 {
            let (d, src) = group.into_iter().next().expect("one disk");
            push(take(d, src, host, exec, now, progress));
            continue;
        }
        let (ds, srcs): (Vec<&DesiredDisk>, Vec<Source>) = group.into_iter().unzip();
        for r in backup_domain(&ds, srcs, host, exec, now, progress) {
            push(r);
        }
    }
    report
}

/// A disk ready to be backed up: its lock held, its chain observed, its repository open (locked,
/// an interrupted merge finished, partials removed), the new point named.
struct Prepared<'a> {
    disk: &'a DesiredDisk,
    policy: BackupSpec,
    src: Source,
    chain: crate::observe::ObservedChain,
    size: u64,
    repo: Repo,
    point: String,
    file: String,
    partial: PathBuf,
    final_path: PathBuf,
    prev: Option<Point>,
    /// The disk's file mode (its points get it).
    mode: Option<u32>,
    /// A running domain's QEMU process before the job (see `libvirt::qemu_run`).
    run: Option<String>,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Prepared<'_> {
    /// The checkpoint (live) or persistent bitmap (offline) this backup starts: named after its
    /// point's file, so unique per backup.
    fn checkpoint(&self) -> String {
        format!("diskchain-{}", self.file.trim_end_matches(".qcow2"))
    }

    fn failed(&self, m: String) -> BackupError {
        err(self.disk, ErrorKind::Failed, m)
    }

    fn live(&self) -> Option<&diskchain_crd::desired::LiveTarget> {
        match &self.src {
            Source::Live(t, _) => Some(t),
            Source::Offline(_) | Source::ShutOff(..) => None,
        }
    }
}

fn prepare<'a>(
    disk: &'a DesiredDisk,
    src: Source,
    host: &Host,
    exec: ExecOptions,
    now: i64,
) -> Result<Prepared<'a>, BackupError> {
    let (policy, dir) = repository(disk, host)?;
    let active = match &src {
        Source::Offline(a) | Source::Live(_, a) | Source::ShutOff(_, a) => a.clone(),
    };
    let failed = |m: String| err(disk, ErrorKind::Failed, m);
    let lock = match host.state.lock_disk(&disk.key) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Err(err(
                disk,
                ErrorKind::InUse,
                "another diskchain process (an agent or an apply) is working on this disk; a backup waits for its chain steps: try again when it is done".into(),
            ));
        }
        Err(e) => return Err(failed(e.to_string())),
    };
    if let Ok(Some(_)) = Journal::load(&host.state, &disk.key) {
        return Err(failed(
            "an earlier plan of this disk is unfinished; a backup is taken of a chain at rest: run `diskchain apply` (or let the agent) finish it first; nothing was done".into(),
        ));
    }
    let chain = observe_chain(&host.roots, &active).map_err(|e| {
        err(
            disk,
            if e.is_bad_input() {
                ErrorKind::BadInput
            } else {
                ErrorKind::Failed
            },
            format!("spec.source: {e}"),
        )
    })?;
    // A running domain's QEMU holds its images: that is how a live disk is.
    let live = matches!(src, Source::Live(..));
    // A backup killed a moment ago leaves its qemu-storage-daemon closing the images (it ends
    // with its parent): a holder that lets go within a few seconds is waited for.
    let mut chain = chain;
    let waited = std::time::Instant::now();
    while !live && chain.layers.iter().any(|l| l.in_use.is_some()) && waited.elapsed() < IN_USE_WAIT
    {
        std::thread::sleep(std::time::Duration::from_millis(200));
        chain =
            observe_chain(&host.roots, &active).map_err(|e| failed(format!("spec.source: {e}")))?;
    }
    if let Some(l) = chain.layers.iter().find(|l| l.in_use.is_some() && !live) {
        return Err(err(
            disk,
            ErrorKind::InUse,
            format!(
                "layer {} is in use by {} (it holds QEMU's image lock); an offline backup of a disk being written would not be a point in time. Stop that process, or manage the disk through libvirt; nothing was done",
                l.layer.path.display(),
                l.in_use.as_deref().unwrap_or("another process")
            ),
        ));
    }
    let size = chain.active().virtual_size;
    // The repository, its points and its manifest are no more readable than the disk.
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(&active)
            .map(|m| m.permissions().mode() & 0o666)
            .ok()
    };
    let repo = open_repo(disk, &dir, host, exec, mode)?;
    for p in repo.remove_partials().map_err(|e| failed(e.to_string()))? {
        tracing::info!(disk = %disk.key, file = p, "removed what a killed backup left");
    }
    // A new point is backed by the newest: nothing is built on a chain whose files are not the
    // repository's own.
    if let Some(last) = repo.manifest.points.len().checked_sub(1) {
        repo.check_chain(last).map_err(|e| {
            failed(format!(
                "repository {}: {e}; the repository is damaged or was tampered with (`diskchain verify` names it): move it aside; nothing was done",
                dir.display()
            ))
        })?;
    }
    let (point, file) = repo.new_point_name(now);
    let prev = repo.manifest.points.last().cloned();
    let run = match &src {
        Source::Live(t, _) => crate::libvirt::qemu_run(&t.domain),
        Source::Offline(_) | Source::ShutOff(..) => None,
    };
    Ok(Prepared {
        disk,
        policy,
        src,
        chain,
        size,
        // Named for this process too: a killed run's daemon may still hold its own partial.
        partial: dir.join(format!(".partial-{}-{file}", std::process::id())),
        final_path: dir.join(&file),
        repo,
        point,
        file,
        prev,
        mode,
        run,
        _lock: lock,
    })
}

/// How long an offline backup waits for a process to let go of the disk's images before it
/// says the disk is in use.
const IN_USE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// One disk's backup, and its retention pass.
type DiskBackup = Result<(BackupDone, Option<RetentionReport>), BackupError>;

/// Opens and locks disk `disk`'s repository `dir`, finishing a retention merge an earlier run
/// left (its manifest is only true once that is done).
fn open_repo(
    disk: &DesiredDisk,
    dir: &Path,
    host: &Host,
    exec: ExecOptions,
    mode: Option<u32>,
) -> Result<Repo, BackupError> {
    let mut repo = Repo::open(dir, &disk.key, mode).map_err(|e| {
        let kind = if matches!(e, repo::RepoError::Busy(_)) {
            ErrorKind::InUse
        } else {
            ErrorKind::Failed
        };
        err(disk, kind, e.to_string())
    })?;
    merge::finish(&mut repo, &host.roots, &host.state, exec).map_err(|e| {
        err(
            disk,
            ErrorKind::Failed,
            format!(
                "repository {}: finishing an interrupted retention merge: {e}",
                dir.display()
            ),
        )
    })?;
    Ok(repo)
}

/// How a new point was taken.
type Taken = (Kind, Option<String>, Option<String>);

/// The method a kind of live backup used.
fn live_method(kind: Kind) -> Option<String> {
    match kind {
        Kind::Full => None,
        Kind::Incremental => Some("bitmap".to_string()),
        Kind::Resync => Some("compare".to_string()),
    }
}

/// Records the point `p.partial` now holds (synced, hashed, renamed, in the manifest), drops
/// what the previous point's bitmap or checkpoint was (a live one only when `drop_checkpoint`:
/// a job over several disks drops it once every disk is recorded), then applies retention.
#[allow(clippy::too_many_arguments)]
fn record(
    mut p: Prepared<'_>,
    (kind, method, reason): Taken,
    checked: Option<String>,
    ck: &str,
    drop_checkpoint: bool,
    host: &Host,
    exec: ExecOptions,
    now: i64,
) -> DiskBackup {
    let disk = p.disk;
    let recorded = (|| -> Result<Point, String> {
        if let Some(m) = p.mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p.partial, std::fs::Permissions::from_mode(m))
                .map_err(|e| format!("cannot set the mode of {}: {e}", p.partial.display()))?;
        }
        repo::sync(&p.partial).map_err(|e| format!("cannot sync {}: {e}", p.partial.display()))?;
        // The sparse checksum `restore` and `verify --deep` check, of what was written (an
        // offline point's was checked against the disk already). It reads the point's data
        // only: a whole-view SHA-256 would read the zeros of the disk's whole size.
        let sparse_sha256 = match checked {
            Some(d) => d,
            None => repo::view_digest(&p.partial)?,
        };
        let bytes = repo::own_bytes(&p.partial)?;
        std::fs::rename(&p.partial, &p.final_path)
            .map_err(|e| format!("cannot rename {}: {e}", p.partial.display()))?;
        repo::sync(&p.final_path)
            .map_err(|e| format!("cannot sync {}: {e}", p.final_path.display()))?;
        Ok(Point {
            point: p.point.clone(),
            time_unix: now,
            kind,
            method,
            file: p.file.clone(),
            bytes,
            virtual_size: p.size,
            sparse_sha256: Some(sparse_sha256),
            sha256: None,
            checkpoint: Some(ck.to_string()),
            // The same QEMU before the job and now: its checkpoint never left its memory.
            qemu_run: match &p.src {
                Source::Live(t, _) => p
                    .run
                    .clone()
                    .filter(|r| crate::libvirt::qemu_run(&t.domain).as_ref() == Some(r)),
                Source::Offline(_) | Source::ShutOff(..) => None,
            },
        })
    })()
    .map_err(|e| p.failed(format!("{e}; the backup was not recorded")))?;
    let bytes = recorded.bytes;
    p.repo.manifest.points.push(recorded);
    if let Err(e) = p.repo.save() {
        // Not recorded: the file is not a point; the next backup removes it.
        let _ = std::fs::rename(&p.final_path, &p.partial);
        return Err(p.failed(format!("{e}; the backup was not recorded")));
    }
    tracing::info!(disk = %disk.key, point = p.point, kind = kind.as_str(), bytes, "backup taken");
    let old = p.prev.as_ref().and_then(|q| q.checkpoint.clone());
    match &p.src {
        Source::Live(t, _) => {
            // Only the last good backup's checkpoint is kept (the next incremental starts
            // from it).
            if let Some(old) = old.filter(|o| o != ck && drop_checkpoint)
                && let Err(e) = crate::libvirt::backup::delete_checkpoint(t, &old)
            {
                tracing::warn!(disk = %disk.key, checkpoint = old, error = %e, "cannot delete the previous backup's checkpoint; the next backup tries again");
            }
        }
        Source::Offline(_) | Source::ShutOff(..) => {
            // Offline, the previous point's bitmap leaves every layer: the new one records from
            // here.
            if let Some(old) = &old
                && let Err(e) = remove_bitmap(&p.chain, old)
            {
                tracing::warn!(disk = %disk.key, bitmap = old, error = %e, "cannot remove the previous backup's bitmap; the next backup tries again");
            }
            // A shut-off domain: the new bitmap becomes libvirt's checkpoint, so that the next
            // backup of the running domain is an incremental since it.
            if let Source::ShutOff(t, _) = &p.src
                && let Err(e) = adopt_checkpoint(t, ck, now)
            {
                tracing::warn!(disk = %disk.key, checkpoint = ck, error = %e, "cannot record the backup's bitmap as a libvirt checkpoint; the next backup of the running domain resyncs");
            }
        }
    }
    let done = BackupDone {
        disk: disk.key.name.clone(),
        namespace: disk.key.namespace.clone(),
        point: p.point.clone(),
        kind,
        file: p.final_path.clone(),
        bytes,
        reason,
    };
    let policy = p.policy.clone();
    let retention = retain(&mut p.repo, &policy, disk, host, exec)?;
    Ok((done, retention))
}

/// Backs up disk `disk` now (`now`: UTC seconds), then applies its retention.
pub fn backup_disk(
    disk: &DesiredDisk,
    host: &Host,
    exec: ExecOptions,
    now: i64,
    progress: &dyn crate::progress::Progress,
) -> DiskBackup {
    repository(disk, host)?;
    take(disk, source(disk)?, host, exec, now, progress)
}

/// Backs up one disk from `src` in a job of its own, records the point, applies retention.
fn take(
    disk: &DesiredDisk,
    src: Source,
    host: &Host,
    exec: ExecOptions,
    now: i64,
    progress: &dyn crate::progress::Progress,
) -> DiskBackup {
    let p = prepare(disk, src, host, exec, now)?;
    let ck = p.checkpoint();
    progress.step_started(&disk.key, 1, 1, "backup", p.size);
    let mut fraction = |f: f64| progress.step_progress(f);
    let taken = match p.live() {
        Some(t) => live_backup(
            t,
            p.prev.as_ref(),
            p.run.as_deref(),
            &|inc| misses_a_change(&p, inc),
            &p.partial,
            &ck,
            p.size,
            &mut fraction,
        )
        .map(|(kind, reason)| (kind, live_method(kind), reason)),
        None => offline_backup(
            &p.repo,
            p.prev.as_ref(),
            &p.chain,
            &p.partial,
            &ck,
            exec,
            &mut fraction,
        ),
    };
    progress.step_abandoned();
    let taken = taken
        .and_then(|taken| match p.live() {
            Some(_) => Ok((taken, None)),
            None => checked_offline(&p, taken).map(|(t, d)| (t, Some(d))),
        })
        .map_err(|e| {
            let _ = std::fs::remove_file(&p.partial);
            p.failed(format!("{e}; nothing was recorded"))
        })?;
    record(p, taken.0, taken.1, &ck, true, host, exec, now)
}

/// An offline point checked against the disk it was taken of: the disk is at rest (its lock is
/// held and no process has it open), so its view now is its view at the checkpoint. The point
/// must read exactly as the disk does ([`repo::view_digest`] of both). An incremental that does
/// not (a bitmap cleared or re-added behind diskchain's back, a disk shrunk and grown back, a
/// previous point damaged since it was taken) is taken again as a resync, which compares the
/// disk with the previous point as it reads now and writes every difference; a point that still
/// does not read as the disk is refused. Returns how it was taken and its checksum, computed
/// from what was written.
fn checked_offline(p: &Prepared<'_>, taken: Taken) -> Result<(Taken, String), String> {
    let top = p.chain.active();
    let disk = match repo::view_digest(&top.layer.path) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::info!(disk = %p.disk.key, error = e, "the disk's view cannot be read for the check: the backup is taken as a resync");
            None
        }
    };
    let point = repo::view_digest(&p.partial)?;
    if disk.as_ref() == Some(&point) {
        return Ok((taken, point));
    }
    let (kind, _, _) = &taken;
    let Some(prev) = p.prev.as_ref().filter(|_| *kind != Kind::Full) else {
        return Err(format!(
            "the full backup does not read as the disk {} (its checksum differs)",
            top.layer.path.display()
        ));
    };
    let why = if disk.is_some() {
        tracing::warn!(disk = %p.disk.key, "the incremental does not read as the disk (its bitmap missed writes, or the previous point changed): taking it again as a resync");
        "the incremental did not read as the disk (a bitmap that missed writes, a disk resized, or a previous point damaged since)"
    } else {
        "the disk's view could not be read to check an incremental"
    };
    std::fs::remove_file(&p.partial)
        .map_err(|e| format!("cannot remove {}: {e}", p.partial.display()))?;
    compare_onto(
        &top.layer.path,
        top.layer.format,
        p.size,
        &prev.file,
        &p.partial,
    )?;
    let point = repo::view_digest(&p.partial)?;
    if disk.as_ref().is_some_and(|d| *d != point) {
        return Err(format!(
            "the resync does not read as the disk {} either; the repository's previous point may be unreadable: run `diskchain verify --deep`",
            top.layer.path.display()
        ));
    }
    Ok((
        (
            Kind::Resync,
            Some("compare".into()),
            Some(format!(
                "{why}: resynced, only what differs from the previous point was written"
            )),
        ),
        point,
    ))
}

/// Backs up the disks of one running domain (two or more, each with `spec.backup`) in one
/// libvirt job with one checkpoint covering them all, so their points are one instant; then
/// records each in its own repository and applies each one's retention. A disk whose
/// checkpoint cannot be trusted is resynced within the same job.
fn backup_domain(
    disks: &[&DesiredDisk],
    srcs: Vec<Source>,
    host: &Host,
    exec: ExecOptions,
    now: i64,
    progress: &dyn crate::progress::Progress,
) -> Vec<DiskBackup> {
    let mut out: Vec<Option<DiskBackup>> = disks.iter().map(|_| None).collect();
    let mut ready = Vec::new();
    for (i, (d, src)) in disks.iter().zip(srcs).enumerate() {
        match prepare(d, src, host, exec, now) {
            Ok(p) => ready.push((i, p)),
            Err(e) => out[i] = Some(Err(e)),
        }
    }
    if let Some((_, first)) = ready.first() {
        let ck = first.checkpoint();
        let total: u64 = ready.iter().map(|(_, p)| p.size).sum();
        progress.step_started(&first.disk.key, 1, 1, "backup of the domain's disks", total);
        let mut fraction = |f: f64| progress.step_progress(f);
        let parts: Vec<&Prepared<'_>> = ready.iter().map(|(_, p)| p).collect();
        let taken = live_group(&parts, &ck, &mut fraction);
        let mut target: Option<diskchain_crd::desired::LiveTarget> = None;
        progress.step_abandoned();
        match taken {
            Ok(kinds) => {
                // The previous job's checkpoint is dropped only once every disk of this job is
                // recorded: a run killed in between leaves the unrecorded disks their
                // checkpoint, so their next backup is still an incremental.
                let mut olds: BTreeMap<String, bool> = BTreeMap::new();
                for ((i, p), (kind, reason)) in ready.into_iter().zip(kinds) {
                    let old = p.prev.as_ref().and_then(|q| q.checkpoint.clone());
                    let t = p.live().cloned();
                    let r = record(
                        p,
                        (kind, live_method(kind), reason),
                        None,
                        &ck,
                        false,
                        host,
                        exec,
                        now,
                    );
                    if let Some(old) = old.filter(|o| *o != ck) {
                        *olds.entry(old).or_insert(true) &= r.is_ok();
                    }
                    out[i] = Some(r);
                    if let Some(t) = t {
                        target = Some(t);
                    }
                }
                for (old, all) in olds {
                    if let (true, Some(t)) = (all, &target)
                        && let Err(e) = crate::libvirt::backup::delete_checkpoint(t, &old)
                    {
                        tracing::warn!(domain = %t.domain, checkpoint = old, error = %e, "cannot delete the previous backup's checkpoint; the next backup tries again");
                    }
                }
            }
            Err(e) => {
                for (i, p) in ready {
                    let _ = std::fs::remove_file(&p.partial);
                    out[i] = Some(Err(p.failed(format!(
                        "the backup of domain's disks in one job: {e}; nothing was recorded"
                    ))));
                }
            }
        }
    }
    out.into_iter()
        .map(|r| r.expect("every disk has a result"))
        .collect()
}

/// Removes bitmap `name` from every layer of `chain` that holds it.
fn remove_bitmap(chain: &crate::observe::ObservedChain, name: &str) -> Result<(), String> {
    for l in &chain.layers {
        let now = crate::execute::bitmaps::of(&l.layer.path).map_err(|e| e.to_string())?;
        if now.iter().any(|b| b.name == name) {
            run(
                qemu_img::bitmap(&l.layer.path, &["--remove".as_ref()], name),
                &format!("removing bitmap {name} from {}", l.layer.path.display()),
            )?;
        }
    }
    Ok(())
}

/// Whether bitmap `name` tells exactly what the guest wrote since it was added: it is in the
/// top layer and recording there, and sound (not left in use by a QEMU that died) in every layer
/// that holds it. The layers holding it (indexes), or why it cannot be trusted.
fn trusted(chain: &crate::observe::ObservedChain, name: &str) -> Result<Vec<usize>, String> {
    let top = chain.layers.len() - 1;
    let mut holders = Vec::new();
    for (i, l) in chain.layers.iter().enumerate() {
        if let Some(b) = l.extras.bitmaps.iter().find(|b| b.name == name) {
            if b.in_use {
                return Err(format!(
                    "bitmap {name} in {} was left in use by a QEMU that did not close the image (a crash): it may miss writes",
                    l.layer.path.display()
                ));
            }
            if i == top && !b.auto {
                return Err(format!(
                    "bitmap {name} in the active image {} is disabled: it does not record",
                    l.layer.path.display()
                ));
            }
            holders.push(i);
        }
    }
    if !holders.contains(&top) {
        return Err(format!(
            "the active image {} has no bitmap {name} (something outside diskchain removed it, or rewrote the chain)",
            chain.layers[top].layer.path.display()
        ));
    }
    Ok(holders)
}

/// An offline backup into `partial`, with a new persistent bitmap `checkpoint` added to the
/// active image as it is taken (what the guest writes from then on is what the next backup
/// copies). A full when the repository is empty; an incremental (QEMU's `blockdev-backup
/// sync=incremental` in a `qemu-storage-daemon`, over the previous point's bitmap merged from
/// every layer) when that bitmap can be trusted; else a resync: only the clusters where the disk
/// reads differently from the previous point.
fn offline_backup(
    repo: &Repo,
    prev: Option<&Point>,
    chain: &crate::observe::ObservedChain,
    partial: &Path,
    checkpoint: &str,
    exec: ExecOptions,
    progress: &mut dyn FnMut(f64),
) -> Result<(Kind, Option<String>, Option<String>), String> {
    let top = chain.active();
    let (active, format, size) = (&top.layer.path, top.layer.format, top.virtual_size);
    // Bitmaps of ours no recorded point owns (a killed backup's) go first.
    let keep = prev.and_then(|p| p.checkpoint.clone());
    for l in &chain.layers {
        for b in &l.extras.bitmaps {
            if b.name.starts_with("diskchain-") && Some(&b.name) != keep.as_ref() {
                remove_bitmap(chain, &b.name)?;
            }
        }
    }
    let layers: Vec<(PathBuf, Format)> = chain
        .layers
        .iter()
        .map(|l| (l.layer.path.clone(), l.layer.format))
        .collect();
    let speed = exec.max_bytes_per_sec.unwrap_or(0);
    let blank = |backing: Option<&str>| {
        run(
            qemu_img::create(
                partial,
                Format::Qcow2,
                Some(size),
                backing.map(|b| (Path::new(b), Format::Qcow2)),
                Some(CLUSTER),
                false,
            ),
            "creating the backup target",
        )
    };
    let Some(p) = prev else {
        blank(None)?;
        crate::execute::qsd::backup(&layers, partial, None, checkpoint, speed, progress)
            .map_err(|e| format!("the full backup: {e}"))?;
        return Ok((
            Kind::Full,
            None,
            Some("the repository has no point yet".into()),
        ));
    };
    let prev_file = repo.file(p);
    if !prev_file.exists() {
        return Err(format!(
            "repository {}: the newest point {} has lost its file {}; run `diskchain verify` and move the repository aside",
            repo.dir.display(),
            p.point,
            prev_file.display()
        ));
    }
    let why = match &p.checkpoint {
        None => "the previous point has no bitmap (taken before bitmaps were kept)".to_string(),
        Some(name) => match trusted(chain, name) {
            Ok(holders) => {
                blank(Some(&p.file))?;
                crate::execute::qsd::backup(
                    &layers,
                    partial,
                    Some((name, &holders)),
                    checkpoint,
                    speed,
                    progress,
                )
                .map_err(|e| format!("the incremental backup: {e}"))?;
                return Ok((Kind::Incremental, Some("bitmap".into()), None));
            }
            Err(why) => why,
        },
    };
    compare_onto(active, format, size, &p.file, partial)?;
    // The new bitmap records from this point on.
    run(
        qemu_img::bitmap(active, &["--add".as_ref()], checkpoint),
        &format!("adding bitmap {checkpoint} to {}", active.display()),
    )?;
    Ok((
        Kind::Resync,
        Some("compare".into()),
        Some(format!(
            "{why}: resynced, only what differs from the previous point was written"
        )),
    ))
}

/// Writes into the new layer `partial` (backed by the previous point, by file name) only the
/// clusters where `view` reads differently from it: `partial` is made on `view`, then re-pointed
/// at the previous point by a safe-mode rebase, which copies exactly those clusters.
fn compare_onto(
    view: &Path,
    format: Format,
    size: u64,
    prev_file: &str,
    partial: &Path,
) -> Result<(), String> {
    run(
        qemu_img::create(
            partial,
            Format::Qcow2,
            Some(size),
            Some((view, format)),
            Some(CLUSTER),
            false,
        ),
        "creating the backup layer",
    )?;
    run(
        qemu_img::rebase_copying(partial, Some((Path::new(prev_file), Format::Qcow2))),
        "the comparison with the previous point (qemu-img rebase)",
    )
}

/// Whether a live incremental in `inc` provably misses a change: a cluster where the previous
/// point holds data, the disk reads zeros (its chain's metadata, read before the job) and the
/// job copied nothing. Guest writes and discards all set the checkpoint's bitmap; a resize does
/// not (QEMU drops a shrunk range and reads it as zeros when grown back). Metadata only: the
/// disk's and the repository's tables. `Ok(false)` when the maps' units differ (no comparison).
fn misses_a_change(p: &Prepared<'_>, inc: &Path) -> Result<bool, String> {
    use diskchain_planner::Allocation;
    use roaring::RoaringTreemap;
    let Some(prev) = p.prev.as_ref() else {
        return Ok(false);
    };
    let disk: Vec<&Allocation> = p
        .chain
        .layers
        .iter()
        .rev()
        .filter_map(|l| l.layer.alloc.as_ref())
        .collect();
    if disk.len() != p.chain.layers.len() {
        return Ok(false);
    }
    let upto = p
        .repo
        .manifest
        .points
        .iter()
        .position(|q| q.point == prev.point)
        .ok_or("the previous point is not in the manifest")?;
    let alloc =
        |f: &Path| crate::observe::allocation_of(f, Format::Qcow2).map_err(|e| e.to_string());
    let mut repo = Vec::new();
    for q in p.repo.manifest.points[..=upto].iter().rev() {
        repo.push(alloc(&p.repo.dir.join(&q.file))?);
    }
    let inc = alloc(inc)?;
    let unit = inc.unit;
    if disk.iter().any(|a| a.unit != unit) || repo.iter().any(|a| a.unit != unit) {
        return Ok(false);
    }
    // Clusters a chain (top first) reads as data.
    let data = |layers: &mut dyn Iterator<Item = &Allocation>| {
        let (mut nonzero, mut decided) = (RoaringTreemap::new(), RoaringTreemap::new());
        for a in layers {
            nonzero |= &a.data - &decided;
            decided |= &a.data;
            decided |= &a.zero;
        }
        nonzero
    };
    let mut suspect = data(&mut repo.iter()) - data(&mut disk.into_iter());
    suspect -= &inc.data;
    suspect -= &inc.zero;
    if !suspect.is_empty() {
        tracing::warn!(disk = %p.disk.key, clusters = suspect.len(), "the incremental misses clusters the disk now reads as zeros (a resize?): taking it again as a resync");
    }
    Ok(!suspect.is_empty())
}

/// Whether domain `t` is known to be no longer running (a job on it then failed for that).
#[cfg(feature = "libvirt")]
fn stopped(t: &diskchain_crd::desired::LiveTarget) -> bool {
    crate::libvirt::locate(t).is_ok_and(|d| !d.running)
}

/// What a backup job that failed (`e`) because its domain stopped under it reports: the job's
/// own error, not what a retry on the stopped domain would say.
#[cfg(feature = "libvirt")]
fn stopped_during(t: &diskchain_crd::desired::LiveTarget, e: &str) -> String {
    format!(
        "{e}; domain {} stopped during the backup (shut down, or its QEMU exited or was killed), so no resync was tried; the next backup (offline while it is shut off) resyncs",
        t.domain
    )
}

/// Whether the domain's QEMU process `run` is the one that made point `prev`'s checkpoint, so
/// its bitmap never left QEMU's memory. A bitmap that went through the image while the domain
/// was shut off (or crashed) may have been cleared or replaced there: `qemu-img bitmap` makes
/// one look sound. Nothing is built on it.
fn same_run(prev: &Point, run: Option<&str>) -> bool {
    run.is_some() && prev.qemu_run.as_deref() == run
}

/// Why an incremental since checkpoint `c` is not taken after a restart of the domain's QEMU.
fn restarted(c: &str) -> String {
    format!(
        "the domain's QEMU is not the process that made the previous point's checkpoint {c} (it was shut down or restarted since, and the checkpoint's bitmap was stored in the image meanwhile, where it can be changed unseen)"
    )
}

/// A backup of a running domain's disk through libvirt into `partial`, with a new checkpoint:
/// a full when the repository is empty; an incremental since the previous point's checkpoint
/// when libvirt still has it; otherwise (the previous point was taken offline, its checkpoint
/// is gone, or the incremental failed: a bitmap lost in a crash of QEMU) a resync: a full into
/// a scratch file, compared with the previous point so that only the differences are kept.
/// Returns the kind, why it is not an incremental, and the new checkpoint.
#[cfg(feature = "libvirt")]
#[allow(clippy::too_many_arguments)]
fn live_backup(
    t: &diskchain_crd::desired::LiveTarget,
    prev: Option<&Point>,
    qemu: Option<&str>,
    misses: &dyn Fn(&Path) -> Result<bool, String>,
    partial: &Path,
    ck: &str,
    size: u64,
    progress: &mut dyn FnMut(f64),
) -> Result<(Kind, Option<String>), String> {
    use crate::libvirt::backup as lb;
    if lb::job_running(t).map_err(|e| e.to_string())? {
        return Err(format!(
            "a job (an earlier backup, a migration) runs on domain {}; try again when it is done",
            t.domain
        ));
    }
    let prev_ck = prev.and_then(|p| p.checkpoint.clone());
    // Checkpoints of ours no recorded point owns (a killed backup's) are removed first: only
    // the last good backup's is kept.
    for c in lb::checkpoints(t).map_err(|e| e.to_string())? {
        if c.starts_with("diskchain-") && Some(&c) != prev_ck.as_ref() {
            lb::delete_checkpoint(t, &c).map_err(|e| e.to_string())?;
        }
    }
    let blank = |f: &Path, backing: Option<&str>| {
        run(
            qemu_img::create(
                f,
                Format::Qcow2,
                Some(size),
                backing.map(|b| (Path::new(b), Format::Qcow2)),
                Some(CLUSTER),
                false,
            ),
            "creating the backup target",
        )
    };
    let Some(p) = prev else {
        blank(partial, None)?;
        lb::push(t, partial, None, ck, progress).map_err(|e| e.to_string())?;
        return Ok((Kind::Full, Some("the repository has no point yet".into())));
    };
    let have = lb::checkpoints(t).map_err(|e| e.to_string())?;
    let why = match &prev_ck {
        Some(c) if have.contains(c) && !same_run(p, qemu) => restarted(c),
        Some(c) if have.contains(c) => {
            blank(partial, Some(&p.file))?;
            match lb::push(t, partial, Some(c), ck, progress) {
                Ok(()) => match misses(partial) {
                    Ok(false) => return Ok((Kind::Incremental, None)),
                    found => {
                        // Taken again as a resync, which makes checkpoint `ck` anew.
                        let _ = std::fs::remove_file(partial);
                        lb::delete_checkpoint(t, ck).map_err(|e| e.to_string())?;
                        match found {
                            Err(e) => format!(
                                "the incremental since checkpoint {c} could not be checked against the disk's tables ({e})"
                            ),
                            _ => format!(
                                "the incremental since checkpoint {c} misses a change its bitmap did not record (the disk reads zeros where the previous point holds data that the job did not copy: a disk shrunk and grown back, say)"
                            ),
                        }
                    }
                },
                Err(e) => {
                    // Its bitmap cannot be trusted: the checkpoint goes, and a resync follows.
                    let _ = std::fs::remove_file(partial);
                    let _ = lb::delete_checkpoint(t, c);
                    if stopped(t) {
                        return Err(stopped_during(t, &e.to_string()));
                    }
                    format!("the incremental since checkpoint {c} failed ({e})")
                }
            }
        }
        Some(c) => format!("libvirt no longer has the previous point's checkpoint {c}"),
        None => "the previous point has no checkpoint (it was taken offline)".to_string(),
    };
    let scratch = partial.with_file_name(format!(".partial-scratch-{ck}.qcow2"));
    let _ = std::fs::remove_file(&scratch);
    blank(&scratch, None)?;
    let pushed = lb::push(t, &scratch, None, ck, progress).map_err(|e| {
        if stopped(t) {
            stopped_during(t, &e.to_string())
        } else {
            e.to_string()
        }
    });
    let compared =
        pushed.and_then(|()| compare_onto(&scratch, Format::Qcow2, size, &p.file, partial));
    let _ = std::fs::remove_file(&scratch);
    if let Err(e) = compared {
        let _ = lb::delete_checkpoint(t, ck);
        return Err(format!("{why}, and the resync that followed failed: {e}"));
    }
    Ok((
        Kind::Resync,
        Some(format!(
            "{why}: resynced, only what differs from the previous point was written"
        )),
    ))
}

/// One job for the disks `parts` of one running domain, with checkpoint `ck` covering them
/// all: per disk a full (no point yet), an incremental since its previous point's checkpoint,
/// or (that checkpoint gone or failing) a full into a scratch file compared with the previous
/// point. Returns each disk's kind and why it is not an incremental.
#[cfg(feature = "libvirt")]
fn live_group(
    parts: &[&Prepared<'_>],
    ck: &str,
    progress: &mut dyn FnMut(f64),
) -> Result<Vec<(Kind, Option<String>)>, String> {
    use crate::libvirt::backup as lb;
    let t = parts[0].live().ok_or("not a running domain")?.clone();
    if lb::job_running(&t).map_err(|e| e.to_string())? {
        return Err(format!(
            "a job (an earlier backup, a migration) runs on domain {}; try again when it is done",
            t.domain
        ));
    }
    let owned: BTreeSet<String> = parts
        .iter()
        .filter_map(|p| p.prev.as_ref().and_then(|q| q.checkpoint.clone()))
        .collect();
    for c in lb::checkpoints(&t).map_err(|e| e.to_string())? {
        if c.starts_with("diskchain-") && !owned.contains(&c) {
            lb::delete_checkpoint(&t, &c).map_err(|e| e.to_string())?;
        }
    }
    let have = lb::checkpoints(&t).map_err(|e| e.to_string())?;
    // Per disk: `Ok(Some(ck))` incremental since ck, `Ok(None)` full, `Err(why)` resync.
    let mut modes: Vec<Result<Option<String>, String>> = parts
        .iter()
        .map(
            |p| match (&p.prev, p.prev.as_ref().and_then(|q| q.checkpoint.clone())) {
                (None, _) => Ok(None),
                (Some(q), Some(c)) if have.contains(&c) && !same_run(q, p.run.as_deref()) => {
                    Err(restarted(&c))
                }
                (Some(_), Some(c)) if have.contains(&c) => Ok(Some(c)),
                (Some(_), Some(c)) => Err(format!(
                    "libvirt no longer has the previous point's checkpoint {c}"
                )),
                (Some(_), None) => {
                    Err("the previous point has no checkpoint (it was taken offline)".into())
                }
            },
        )
        .collect();
    let scratch = |p: &Prepared<'_>| {
        p.partial
            .with_file_name(format!(".partial-scratch-{}", p.file))
    };
    for attempt in 0..2 {
        let mut entries = Vec::new();
        for (p, m) in parts.iter().zip(&modes) {
            let (target, backing, since) = match m {
                Ok(None) => (p.partial.clone(), None, None),
                Ok(Some(c)) => (
                    p.partial.clone(),
                    Some(p.prev.as_ref().map(|q| q.file.clone()).unwrap_or_default()),
                    Some(c.clone()),
                ),
                Err(_) => (scratch(p), None, None),
            };
            let _ = std::fs::remove_file(&target);
            run(
                qemu_img::create(
                    &target,
                    Format::Qcow2,
                    Some(p.size),
                    backing.as_deref().map(|b| (Path::new(b), Format::Qcow2)),
                    Some(CLUSTER),
                    false,
                ),
                "creating the backup target",
            )?;
            let live = p.live().ok_or("not a running domain")?;
            entries.push(lb::DiskTarget {
                target: live.target.clone(),
                file: target,
                since,
            });
        }
        match lb::push_disks(&t, &entries, ck, progress) {
            Ok(()) => break,
            Err(e) if stopped(&t) => {
                for p in parts {
                    let _ = std::fs::remove_file(scratch(p));
                    let _ = std::fs::remove_file(&p.partial);
                }
                return Err(stopped_during(&t, &e.to_string()));
            }
            Err(e) if attempt == 0 && modes.iter().any(|m| matches!(m, Ok(Some(_)))) => {
                // A checkpoint's bitmap cannot be trusted (a crash of QEMU): every incremental
                // becomes a resync, in one more job.
                for (p, m) in parts.iter().zip(modes.iter_mut()) {
                    if let Ok(Some(c)) = m {
                        let _ = std::fs::remove_file(&p.partial);
                        let _ = lb::delete_checkpoint(&t, c);
                        *m = Err(format!("the incremental since checkpoint {c} failed ({e})"));
                    }
                }
            }
            Err(e) => {
                for p in parts {
                    let _ = std::fs::remove_file(scratch(p));
                }
                return Err(e.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for (p, m) in parts.iter().zip(modes) {
        out.push(match m {
            Ok(None) => (Kind::Full, Some("the repository has no point yet".into())),
            Ok(Some(_)) => (Kind::Incremental, None),
            Err(why) => {
                let s = scratch(p);
                let prev = p.prev.as_ref().map(|q| q.file.clone()).unwrap_or_default();
                let r = compare_onto(&s, Format::Qcow2, p.size, &prev, &p.partial);
                let _ = std::fs::remove_file(&s);
                r?;
                (
                    Kind::Resync,
                    Some(format!(
                        "{why}: resynced, only what differs from the previous point was written"
                    )),
                )
            }
        });
    }
    Ok(out)
}

#[cfg(not(feature = "libvirt"))]
fn live_group(
    _parts: &[&Prepared<'_>],
    _ck: &str,
    _progress: &mut dyn FnMut(f64),
) -> Result<Vec<(Kind, Option<String>)>, String> {
    Err(crate::libvirt::LiveError::NotBuilt.to_string())
}

#[cfg(not(feature = "libvirt"))]
#[allow(clippy::too_many_arguments)]
fn live_backup(
    _t: &diskchain_crd::desired::LiveTarget,
    _prev: Option<&Point>,
    _run: Option<&str>,
    _misses: &dyn Fn(&Path) -> Result<bool, String>,
    _partial: &Path,
    _ck: &str,
    _size: u64,
    _progress: &mut dyn FnMut(f64),
) -> Result<(Kind, Option<String>), String> {
    Err(crate::libvirt::LiveError::NotBuilt.to_string())
}

#[cfg(feature = "libvirt")]
fn adopt_checkpoint(
    t: &diskchain_crd::desired::LiveTarget,
    ck: &str,
    now: i64,
) -> Result<(), String> {
    crate::libvirt::backup::adopt_offline_checkpoint(t, ck, now).map_err(|e| e.to_string())
}

#[cfg(not(feature = "libvirt"))]
fn adopt_checkpoint(
    _t: &diskchain_crd::desired::LiveTarget,
    _ck: &str,
    _now: i64,
) -> Result<(), String> {
    Err(crate::libvirt::LiveError::NotBuilt.to_string())
}

/// The points `policy` keeps, in local time.
pub fn kept_points(repo: &Repo, policy: &BackupSpec) -> BTreeSet<String> {
    kept_of(&repo.manifest.points, policy)
}

/// True when repository `dir` (with `points`, from its manifest) has points `policy`'s
/// retention no longer keeps, or an interrupted merge to finish: a retention merge is due now.
pub fn retention_pending(dir: &Path, points: &[Point], policy: &BackupSpec) -> bool {
    merge::in_flight(dir) || (!points.is_empty() && kept_of(points, policy).len() < points.len())
}

fn kept_of(points: &[Point], policy: &BackupSpec) -> BTreeSet<String> {
    let times: Vec<i64> = points.iter().map(|p| p.time_unix).collect();
    retention::kept(&times, &policy.retention, &chrono::Local)
        .into_iter()
        .map(|i| points[i].point.clone())
        .collect()
}

fn retain(
    repo: &mut Repo,
    policy: &BackupSpec,
    disk: &DesiredDisk,
    host: &Host,
    exec: ExecOptions,
) -> Result<Option<RetentionReport>, BackupError> {
    let keep = kept_points(repo, policy);
    let done = merge::run(repo, &keep, &host.roots, &host.state, &disk.key, exec).map_err(|e| {
        err(
            disk,
            ErrorKind::Failed,
            format!(
                "repository {}: retention: {e}; the merge is journaled and resumes on the next backup, verify, restore or agent pass",
                repo.dir.display()
            ),
        )
    })?;
    Ok(done.map(|done| RetentionReport {
        disk: disk.key.name.clone(),
        namespace: disk.key.namespace.clone(),
        done,
    }))
}

/// One disk's points, for `diskchain backups`.
#[derive(Debug, Clone, Serialize)]
pub struct DiskPoints {
    /// The disk's name.
    pub name: String,
    /// The disk's namespace.
    pub namespace: String,
    /// The repository.
    pub repository: PathBuf,
    /// A retention merge was interrupted (the next backup, verify or restore finishes it).
    pub merge_in_flight: bool,
    /// The points, oldest first.
    pub points: Vec<ListedPoint>,
}

/// A point as listed.
#[derive(Debug, Clone, Serialize)]
pub struct ListedPoint {
    /// Its name.
    pub point: String,
    /// When it was taken (RFC 3339, UTC).
    pub time: String,
    /// How.
    pub kind: Kind,
    /// Its file.
    pub file: PathBuf,
    /// Bytes written.
    pub bytes: u64,
    /// Its sparse view checksum (SHA-256 over the view's non-zero 64 KiB blocks), hex; none
    /// for points taken before it existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparse_sha256: Option<String>,
    /// SHA-256 of its whole raw view, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Lists the points of each disk with `spec.backup` (reads the manifests; changes nothing).
pub fn list(disks: &[DesiredDisk], host: &Host) -> (Vec<DiskPoints>, Vec<BackupError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for d in disks.iter().filter(|d| d.spec().backup.is_some()) {
        let dir = match repository(d, host) {
            Ok((_, dir)) => dir,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let manifest = match repo::Manifest::read(&dir.join(repo::MANIFEST)) {
            Ok(m) => m,
            Err(e) => {
                errors.push(err(
                    d,
                    ErrorKind::Failed,
                    format!("repository {}: {e}", dir.display()),
                ));
                continue;
            }
        };
        let points = manifest
            .map(|m| m.points)
            .unwrap_or_default()
            .into_iter()
            .map(|p| ListedPoint {
                time: chrono::DateTime::<chrono::Utc>::from_timestamp(p.time_unix, 0)
                    .unwrap_or_default()
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                file: dir.join(&p.file),
                point: p.point,
                kind: p.kind,
                bytes: p.bytes,
                sparse_sha256: p.sparse_sha256,
                sha256: p.sha256,
            })
            .collect();
        out.push(DiskPoints {
            name: d.key.name.clone(),
            namespace: d.key.namespace.clone(),
            merge_in_flight: merge::in_flight(&dir),
            repository: dir,
            points,
        });
    }
    (out, errors)
}

/// Opens disk `disk`'s repository for a read (restore, verify): locked, an interrupted merge
/// finished first.
fn open_settled(disk: &DesiredDisk, host: &Host, exec: ExecOptions) -> Result<Repo, BackupError> {
    let (_, dir) = repository(disk, host)?;
    if !dir.join("manifest.json").exists() {
        return Err(err(
            disk,
            ErrorKind::BadInput,
            format!(
                "repository {}: no backup has been taken (no manifest.json); run `diskchain backup` first",
                dir.display()
            ),
        ));
    }
    let repo = open_repo(disk, &dir, host, exec, None)?;
    Ok(repo)
}

/// The format a restore writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RestoreFormat {
    /// qcow2 (standalone: no backing file).
    Qcow2,
    /// raw.
    Raw,
}

/// Writes a standalone image of point `point` of `disk` to `to`, never over an existing file;
/// the result is checked against the point's recorded checksum before it appears at `to`.
pub fn restore(
    disk: &DesiredDisk,
    host: &Host,
    point: &str,
    to: &Path,
    format: RestoreFormat,
) -> Result<PathBuf, BackupError> {
    let bad = |m: String| err(disk, ErrorKind::BadInput, m);
    if to.symlink_metadata().is_ok() {
        return Err(bad(format!(
            "--to {}: the file exists; restore never overwrites a file: give a new path",
            to.display()
        )));
    }
    let parent = match to.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => Path::new("/"),
    };
    if !parent.is_dir() {
        return Err(bad(format!(
            "--to {}: the directory {} does not exist",
            to.display(),
            parent.display()
        )));
    }
    let repo = open_settled(disk, host, ExecOptions::default())?;
    let Some(index) = repo.manifest.points.iter().position(|p| p.point == point) else {
        return Err(bad(format!(
            "--point {point:?}: no such point in repository {}; `diskchain backups` lists them ({})",
            repo.dir.display(),
            repo.manifest
                .points
                .iter()
                .map(|p| p.point.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let p = &repo.manifest.points[index];
    // Nothing is read through a file that is not the repository's own (a symlink out of it, a
    // backing name rewritten to leave it, a FIFO): refused before anything is written.
    repo.check_chain(index).map_err(|e| {
        err(
            disk,
            ErrorKind::Failed,
            format!(
                "repository {}: {e}; the repository is damaged or was tampered with; nothing was written",
                repo.dir.display()
            ),
        )
    })?;
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.diskchain-restore"));
    let _ = std::fs::remove_file(&tmp);
    let failed = |m: String| {
        let _ = std::fs::remove_file(&tmp);
        err(disk, ErrorKind::Failed, m)
    };
    let mut c = Command::new("qemu-img");
    // The scratch file is the owner's alone, and the copy dies with diskchain.
    crate::execute::qsd::private_child(&mut c);
    c.args(["convert", "-f", "qcow2", "-O"])
        .arg(match format {
            RestoreFormat::Qcow2 => "qcow2",
            RestoreFormat::Raw => "raw",
        })
        .arg(repo.file(p))
        .arg(&tmp);
    run(c, "the restore (qemu-img convert)").map_err(failed)?;
    repo::sync(&tmp).map_err(|e| failed(format!("cannot sync {}: {e}", tmp.display())))?;
    let (recorded, sha) = match format {
        RestoreFormat::Qcow2 => repo::check_view(p, &tmp),
        RestoreFormat::Raw => repo::check_raw(p, &tmp),
    }
    .map_err(failed)?;
    if sha != recorded {
        return Err(failed(format!(
            "point {} of repository {} reads back with checksum {sha}, not the {recorded} recorded when it was taken: the repository is damaged (`diskchain verify --deep` names the point); nothing was written to {}",
            p.point,
            repo.dir.display(),
            to.display()
        )));
    }
    // A hard link never replaces an existing file: a file made at `to` meanwhile is kept.
    std::fs::hard_link(&tmp, to).map_err(|e| {
        failed(format!(
            "cannot put the restored image at {}: {e}; nothing was written there",
            to.display()
        ))
    })?;
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    Ok(to.to_path_buf())
}

/// A problem `verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct Damage {
    /// The point (or `-` for the repository).
    pub point: String,
    /// What is wrong.
    pub problem: String,
}

/// One disk's verify result.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    /// The disk's name.
    pub name: String,
    /// The disk's namespace.
    pub namespace: String,
    /// The repository.
    pub repository: PathBuf,
    /// Points checked.
    pub points: usize,
    /// Checksums compared (`--deep`).
    pub deep: bool,
    /// What is damaged.
    pub damaged: Vec<Damage>,
}

/// Checks disk `disk`'s repository: every point's file is there, passes `qemu-img check`, is
/// backed by the point before it (the first by none) and has the recorded size; with `deep`,
/// every point's view has its recorded SHA-256.
pub fn verify(disk: &DesiredDisk, host: &Host, deep: bool) -> Result<Verified, BackupError> {
    let repo = open_settled(disk, host, ExecOptions::default())?;
    let mut damaged = Vec::new();
    #[derive(serde::Deserialize)]
    struct Info {
        #[serde(rename = "backing-filename")]
        backing: Option<String>,
        #[serde(rename = "virtual-size")]
        size: u64,
    }
    let mut before: Option<&Point> = None;
    // A point below that is not the repository's own file: every later point reads through it.
    let mut unsound: Option<String> = None;
    for p in &repo.manifest.points {
        let f = repo.file(p);
        let mut damage = |problem: String| {
            damaged.push(Damage {
                point: p.point.clone(),
                problem,
            })
        };
        // Read as hostile input: a symlink, a FIFO or a backing name leaving the repository
        // is damage, and no tool reads through it.
        let backing = before.map(|b| b.file.as_str());
        if let Err(e) = repo::check_point_file(&repo.dir, &p.file, backing) {
            damage(e);
            unsound.get_or_insert_with(|| p.point.clone());
            before = Some(p);
            continue;
        }
        if let Some(below) = &unsound {
            damage(format!(
                "it reads through point {below}, whose file is not the repository's own (not read)"
            ));
            before = Some(p);
            continue;
        }
        let check = qemu_img::check(&f, false).output();
        match check {
            Ok(o) if o.status.success() => {}
            Ok(o) => damage(format!(
                "qemu-img check {} failed: {}",
                f.display(),
                String::from_utf8_lossy(&o.stdout).trim()
            )),
            Err(e) => damage(format!("qemu-img check could not run: {e}")),
        }
        let info = Command::new("qemu-img")
            .args(["info", "-U", "--output=json", "-f", "qcow2"])
            .arg(&f)
            .output();
        match info.map(|o| serde_json::from_slice::<Info>(&o.stdout)) {
            Ok(Ok(i)) => {
                // A backing reference is relative to the file's directory (the backup writes the
                // name alone; a merge may write the full path).
                let want = before.map(|b| repo.file(b));
                let got = i.backing.as_ref().map(|b| {
                    let p = repo.dir.join(b);
                    p.canonicalize().unwrap_or(p)
                });
                if got != want {
                    damage(format!(
                        "{} is backed by {}, not by the point before it ({})",
                        f.display(),
                        i.backing.as_deref().unwrap_or("nothing"),
                        want.map_or("nothing".into(), |w| w.display().to_string())
                    ));
                }
                if i.size != p.virtual_size {
                    damage(format!(
                        "{} is {} bytes, not the {} recorded",
                        f.display(),
                        i.size,
                        p.virtual_size
                    ));
                }
            }
            _ => damage(format!("qemu-img info {} failed", f.display())),
        }
        if deep {
            match repo::check_view(p, &f) {
                Ok((recorded, sha)) if sha == recorded => {}
                Ok((recorded, sha)) => damage(format!(
                    "its view reads with checksum {sha}, not the {recorded} recorded when it was taken"
                )),
                Err(e) => damage(e),
            }
        }
        before = Some(p);
    }
    if deep {
        // When the repository was last read whole, and how it went (a schedule counts from it).
        let record = serde_json::json!({
            "time_unix": chrono::Utc::now().timestamp(),
            "sound": damaged.is_empty(),
        });
        let _ =
            crate::state::write_atomic(&repo.dir.join(LAST_VERIFY), record.to_string().as_bytes());
    }
    Ok(Verified {
        name: disk.key.name.clone(),
        namespace: disk.key.namespace.clone(),
        repository: repo.dir.clone(),
        points: repo.manifest.points.len(),
        deep,
        damaged,
    })
}

/// The file in a repository that records its last deep verify.
const LAST_VERIFY: &str = "last-verify.json";

/// When disk `disk`'s repository was last verified deep (UTC seconds), if ever.
pub fn last_verified(disk: &DesiredDisk, host: &Host) -> Option<i64> {
    let (_, dir) = repository(disk, host).ok()?;
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(LAST_VERIFY)).ok()?).ok()?;
    v["time_unix"].as_i64()
}

/// The retention merges each disk's policy asks for now, from the manifests as they are (for
/// `plan`; changes nothing). A repository with no backup yet, or with a merge in flight (the
/// next backup, apply or verify finishes it first), has none.
pub fn retention_plans(disks: &[DesiredDisk], host: &Host) -> Vec<RetentionReport> {
    let mut out = Vec::new();
    for d in disks {
        let Some(policy) = d.spec().backup.as_ref() else {
            continue;
        };
        let Ok(dir) = host
            .roots
            .confine_dir(&policy.repository, "spec.backup.repository".into())
        else {
            continue;
        };
        if merge::in_flight(&dir) {
            continue;
        }
        let Ok(Some(m)) = repo::Manifest::read(&dir.join(repo::MANIFEST)) else {
            continue;
        };
        let keep = kept_of(&m.points, policy);
        match merge::plan(&dir, &m.points, &keep, &host.roots, &d.key) {
            Ok(Some((plan, _))) => out.push(RetentionReport {
                disk: d.key.name.clone(),
                namespace: d.key.namespace.clone(),
                done: merge::summary(&m.points, &keep, &plan),
            }),
            Ok(None) => {}
            Err(e) => tracing::warn!(disk = %d.key, error = %e, "cannot plan the retention merges"),
        }
    }
    out
}

/// Runs disk `disk`'s retention merges now (an interrupted one finished first), under its
/// repository's lock; the caller holds the disk's lock. `None`: nothing to remove, or no backup
/// yet.
pub fn retain_now(
    disk: &DesiredDisk,
    host: &Host,
    exec: ExecOptions,
) -> Result<Option<RetentionReport>, BackupError> {
    let (policy, dir) = repository(disk, host)?;
    if !dir.join("manifest.json").exists() {
        return Ok(None);
    }
    let mut repo = open_repo(disk, &dir, host, exec, None)?;
    retain(&mut repo, &policy, disk, host, exec)
}
