//! Keeping persistent dirty bitmaps valid across offline steps.
//!
//! A backup tool (libvirt checkpoints, virtnbdbackup, oVirt) takes the union of a bitmap over
//! every layer of the chain as "what the guest changed since the checkpoint". When a step moves
//! a layer's data into another layer, the bits must go along, or the next incremental backup
//! misses those writes without any error. `qemu-img` only merges a bitmap from one source file
//! per call, and marks every cluster it writes in the target's *enabled* bitmaps (which would
//! over-count a commit or a stream); so a step that moves data:
//!
//! 1. records, for each bitmap name, the union of the target's and the sources' bitmaps in a
//!    small qcow2 image beside the target (no data, only bitmaps),
//! 2. runs the copy,
//! 3. replaces the target's bitmaps by the recorded ones (enabled where any copy was) and
//!    removes the record.
//!
//! Every part is idempotent. A rerun after a crash finds the record and merges into it what
//! the images hold now (sound copies only), so bits recorded since (a VM run in between) are
//! never lost; a kill between a finished copy and the rebuild can leave the copy counted
//! (over, never under).
//!
//! A bitmap QEMU left marked in use (it died with the image open) is inconsistent: it may miss
//! writes. It is never carried as if sound: the step leaves it out of the target (removing it
//! there), so a backup tool finds no bitmap of that name on top and takes a full backup rather
//! than a wrong incremental.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use diskchain_planner::Format;

use super::{ExecError, process};
use crate::observe::qcow2::{self, Bitmap};

/// The persistent bitmaps of `p` (none for a raw file or a missing one).
pub(crate) fn of(p: &Path) -> Result<Vec<Bitmap>, ExecError> {
    let f = match std::fs::File::open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ExecError::Io {
                action: "read the bitmaps of",
                path: p.to_path_buf(),
                source,
            });
        }
    };
    if !qcow2::has_magic(&f) {
        return Ok(Vec::new());
    }
    let observe = |e: qcow2::Qcow2Error| ExecError::Observe(e.into());
    let h = qcow2::read_header(&f, p).map_err(observe)?;
    Ok(qcow2::read_extras(&f, p, &h).map_err(observe)?.bitmaps)
}

/// `qemu-img bitmap` on the qcow2 `file`: `ops` then the bitmap's name.
fn bitmap(file: &Path, ops: &[&std::ffi::OsStr], name: &str) -> Result<u64, ExecError> {
    process::run(super::qemu_img::bitmap(file, ops, name), &mut |_| {})
}

/// Adds bitmap `name` to `file`, empty, with `granularity`, recording or not.
fn add(file: &Path, name: &str, granularity: u64, enabled: bool) -> Result<u64, ExecError> {
    let g = granularity.to_string();
    let mut ops: Vec<&std::ffi::OsStr> = vec!["--add".as_ref(), "-g".as_ref(), g.as_ref()];
    if !enabled {
        ops.push("--disable".as_ref());
    }
    bitmap(file, &ops, name)
}

/// Merges bitmap `name` of the qcow2 `from` into the bitmap of that name in `file`.
fn merge(file: &Path, name: &str, from: &Path) -> Result<u64, ExecError> {
    let ops: [&std::ffi::OsStr; 6] = [
        "--merge".as_ref(),
        name.as_ref(),
        "-b".as_ref(),
        from.as_os_str(),
        "-F".as_ref(),
        "qcow2".as_ref(),
    ];
    bitmap(file, &ops, name)
}

/// Where a step keeps the bitmaps it carries while it writes `target`: a small qcow2 image with
/// no data beside the target.
fn record_path(target: &Path) -> PathBuf {
    super::beside(target, "bitmaps.qcow2")
}

/// Runs `write` (which copies the data of `sources` into the qcow2 `target`), keeping the
/// bitmaps exact: see the module documentation. Returns what `write` returned plus the bytes
/// the bitmap operations wrote.
///
/// Before anything is written, the union of each sound bitmap over the target and the sources
/// is recorded in a small qcow2 image beside the target (built aside, synced, renamed into
/// place), each recorded bitmap enabled when it is to record after the step. After the write,
/// the target's bitmaps are rebuilt from the record alone: a `qemu-img` killed during the step
/// leaves the in-use flag on the bitmaps of the images it had open read-write, and those must
/// not be taken for a crashed VM's, nor merged from. A rerun finds the record and rebuilds
/// from it.
pub(crate) fn carrying(
    target: &Path,
    sources: &[(PathBuf, Format)],
    write: impl FnOnce() -> Result<u64, ExecError>,
) -> Result<u64, ExecError> {
    let record = record_path(target);
    let mut written = 0;
    let mut from: Vec<(&Path, Vec<Bitmap>)> = vec![(target, of(target)?)];
    for (s, fmt) in sources {
        if *fmt == Format::Qcow2 {
            from.push((s, of(s)?));
        }
    }
    if record.exists() {
        // A rerun (or a record an interrupted plan left): what the images hold now is merged
        // in too, so that nothing recorded since (a VM run in between) is lost. Merges only
        // add bits; in-use copies (a killed qemu-img's, or a crashed VM's) are not read.
        let existing = of(&record)?;
        written += fill(&record, &from, &BTreeSet::new(), &existing)?;
        super::offline::sync_file(&record)?;
    } else {
        if from.iter().all(|(_, b)| b.is_empty()) {
            return write();
        }
        // Names with an inconsistent copy anywhere in the step are not carried.
        let unsound: BTreeSet<&str> = from
            .iter()
            .flat_map(|(_, b)| b.iter())
            .filter(|b| b.in_use)
            .map(|b| b.name.as_str())
            .collect();
        let size = {
            let f = std::fs::File::open(target).map_err(|source| ExecError::Io {
                action: "open",
                path: target.to_path_buf(),
                source,
            })?;
            qcow2::read_header(&f, target)
                .map_err(|e| ExecError::Observe(e.into()))?
                .virtual_size
        };
        let tmp = record.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let c = super::qemu_img::create(&tmp, Format::Qcow2, Some(size), None, None, false);
        written += process::run(c, &mut |_| {})?;
        written += fill(&tmp, &from, &unsound, &[])?;
        super::offline::sync_file(&tmp)?;
        std::fs::rename(&tmp, &record).map_err(|source| ExecError::Io {
            action: "rename into",
            path: record.clone(),
            source,
        })?;
        if let Some(dir) = record.parent() {
            super::offline::sync_file(dir)?;
        }
    }
    written += write()?;
    let kept = of(&record)?;
    for b in of(target)? {
        if !kept.iter().any(|k| k.name == b.name) {
            tracing::warn!(file = %target.display(), bitmap = %b.name, "removing an inconsistent bitmap: a backup tool must take a full backup");
        }
        written += bitmap(target, &["--remove".as_ref()], &b.name)?;
    }
    for k in &kept {
        written += add(target, &k.name, k.granularity, k.auto)?;
        written += merge(target, &k.name, &record)?;
    }
    super::offline::sync_file(target)?;
    let _ = std::fs::remove_file(&record);
    if let Some(dir) = record.parent() {
        super::offline::sync_file(dir)?;
    }
    Ok(written)
}

/// Merges every sound bitmap of `from` (not named in `skip`, not in use) into the record
/// `rec`, adding the names it lacks (`existing`: what it holds) with their granularity, enabled
/// when any copy is.
fn fill(
    rec: &Path,
    from: &[(&Path, Vec<Bitmap>)],
    skip: &BTreeSet<&str>,
    existing: &[Bitmap],
) -> Result<u64, ExecError> {
    let mut written = 0;
    let mut added: BTreeSet<&str> = existing.iter().map(|b| b.name.as_str()).collect();
    for (file, maps) in from {
        for b in maps
            .iter()
            .filter(|b| !b.in_use && !skip.contains(b.name.as_str()))
        {
            if added.insert(&b.name) {
                let enabled = from
                    .iter()
                    .flat_map(|(_, m)| m.iter())
                    .any(|x| x.name == b.name && x.auto);
                written += add(rec, &b.name, b.granularity, enabled)?;
            }
            written += merge(rec, &b.name, file)?;
        }
    }
    Ok(written)
}

/// Gives the new empty top `top` (not yet in use) each bitmap of `old_top` that is recording
/// and sound, empty and enabled, so that the guest's next writes are recorded where a backup
/// tool looks first. `only_if_in`: carry only bitmaps also present in that file (a revert keeps
/// only the bitmaps that existed at the point reverted to).
pub(crate) fn continue_on(
    top: &Path,
    old_top: &Path,
    only_if_in: Option<&Path>,
) -> Result<u64, ExecError> {
    let keep: Option<Vec<Bitmap>> = only_if_in.map(of).transpose()?;
    let mut written = 0;
    for b in of(old_top)? {
        if !b.auto || b.in_use {
            continue;
        }
        if let Some(k) = &keep
            && !k.iter().any(|x| x.name == b.name && !x.in_use)
        {
            tracing::warn!(bitmap = %b.name, "the bitmap did not exist at the point reverted to: not carried, a backup tool must take a full backup");
            continue;
        }
        written += add(top, &b.name, b.granularity, true)?;
    }
    Ok(written)
}
