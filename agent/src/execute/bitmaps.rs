//! Keeping persistent dirty bitmaps valid across offline steps.
//!
//! A backup tool (libvirt checkpoints, virtnbdbackup, oVirt) takes the union of a bitmap over
//! every layer of the chain as "what the guest changed since the checkpoint". When a step moves
//! a layer's data into another layer, the bits must go along, or the next incremental backup
//! misses those writes without any error. `qemu-img` only merges a bitmap from one source file
//! per call, and marks every cluster it writes in the target's *enabled* bitmaps (which would
//! over-count a commit or a stream); so a step that moves data:
//!
//! 1. records which of the target's bitmaps end up enabled (in a small file beside it, so that a
//!    rerun after a crash knows which ones it disabled),
//! 2. disables them, runs the copy, merges every source layer's bitmap of each name into the
//!    target (adding it with the source's granularity where missing),
//! 3. enables them again and removes the record.
//!
//! Every part is idempotent: a merge is a union, and a rerun finds the record.
//!
//! A bitmap QEMU left marked in use (it died with the image open) is inconsistent: it may miss
//! writes. It is never carried as if sound: the step leaves it out of the target (removing it
//! there), so a backup tool finds no bitmap of that name on top and takes a full backup rather
//! than a wrong incremental.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskchain_planner::Format;

use super::{ExecError, process};
use crate::observe::qcow2::{self, Bitmap};

/// The persistent bitmaps of `p` (none for a raw file or a missing one).
pub(crate) fn of(p: &Path) -> Result<Vec<Bitmap>, ExecError> {
    let Ok(f) = std::fs::File::open(p) else {
        return Ok(Vec::new());
    };
    if !qcow2::has_magic(&f) {
        return Ok(Vec::new());
    }
    let observe = |e: qcow2::Qcow2Error| ExecError::Observe(e.into());
    let h = qcow2::read_header(&f, p).map_err(observe)?;
    Ok(qcow2::read_extras(&f, p, &h).map_err(observe)?.bitmaps)
}

/// `qemu-img bitmap` on the qcow2 `file`: `ops` then the bitmap's name.
fn bitmap(file: &Path, ops: &[&str], name: &str) -> Result<u64, ExecError> {
    let mut c = Command::new("qemu-img");
    c.args(["bitmap", "-f", "qcow2"]).args(ops).arg(file).arg(name);
    process::run(c, &mut |_| {})
}

/// Where the names of the bitmaps to enable again are recorded while `target` is written.
fn record_path(target: &Path) -> PathBuf {
    let dir = target.parent().unwrap_or(Path::new("/"));
    dir.join(format!(
        ".{}.bitmaps",
        target.file_name().unwrap_or_default().to_string_lossy()
    ))
}

/// Runs `write` (which copies the data of `sources` into the qcow2 `target`), keeping the
/// bitmaps exact: see the module documentation. Returns what `write` returned plus the bytes
/// the bitmap operations wrote.
pub(crate) fn carrying(
    target: &Path,
    sources: &[(PathBuf, Format)],
    write: impl FnOnce() -> Result<u64, ExecError>,
) -> Result<u64, ExecError> {
    let mut from: Vec<(&Path, Vec<Bitmap>)> = Vec::new();
    for (s, fmt) in sources {
        if *fmt == Format::Qcow2 {
            from.push((s, of(s)?));
        }
    }
    let here = of(target)?;
    let record = record_path(target);
    let recorded: Option<BTreeSet<String>> = match std::fs::read(&record) {
        Ok(b) => serde_json::from_slice(&b).ok(),
        Err(_) => None,
    };
    if here.is_empty() && from.iter().all(|(_, b)| b.is_empty()) && recorded.is_none() {
        return write();
    }
    // Names with an inconsistent copy anywhere in the step are not carried.
    let unsound: BTreeSet<&str> = here
        .iter()
        .chain(from.iter().flat_map(|(_, b)| b.iter()))
        .filter(|b| b.in_use)
        .map(|b| b.name.as_str())
        .collect();
    let enable: BTreeSet<String> = match recorded {
        Some(r) => r,
        None => {
            let e: BTreeSet<String> = here
                .iter()
                .chain(from.iter().flat_map(|(_, b)| b.iter()))
                .filter(|b| b.auto && !unsound.contains(b.name.as_str()))
                .map(|b| b.name.clone())
                .collect();
            let tmp = record.with_extension("bitmaps.tmp");
            let io = |action: &'static str, path: &Path| {
                let path = path.to_path_buf();
                move |source| ExecError::Io {
                    action,
                    path,
                    source,
                }
            };
            std::fs::write(&tmp, serde_json::to_vec(&e).unwrap_or_default())
                .map_err(io("write", &tmp))?;
            super::offline::sync_file(&tmp)?;
            std::fs::rename(&tmp, &record).map_err(io("rename into", &record))?;
            if let Some(dir) = record.parent() {
                super::offline::sync_file(dir)?;
            }
            e
        }
    };
    let mut written = 0;
    for b in &here {
        if b.auto && !b.in_use {
            written += bitmap(target, &["--disable"], &b.name)?;
        }
    }
    written += write()?;
    // What the target holds now (a rerun may find bitmaps it added before).
    let here = of(target)?;
    for name in &unsound {
        if here.iter().any(|b| &b.name == name) {
            tracing::warn!(file = %target.display(), bitmap = name, "removing an inconsistent bitmap: a backup tool must take a full backup");
            written += bitmap(target, &["--remove"], name)?;
        }
    }
    for (src, maps) in &from {
        for b in maps.iter().filter(|b| !unsound.contains(b.name.as_str())) {
            if !of(target)?.iter().any(|t| t.name == b.name) {
                let g = b.granularity.to_string();
                written += bitmap(target, &["--add", "--disable", "-g", &g], &b.name)?;
            }
            let src = src.to_string_lossy();
            written += bitmap(
                target,
                &["--merge", &b.name, "-b", &src, "-F", "qcow2"],
                &b.name,
            )?;
        }
    }
    for b in of(target)? {
        if enable.contains(&b.name) && !b.auto {
            written += bitmap(target, &["--enable"], &b.name)?;
        }
    }
    let _ = std::fs::remove_file(&record);
    if let Some(dir) = record.parent() {
        super::offline::sync_file(dir)?;
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
        let g = b.granularity.to_string();
        written += bitmap(top, &["--add", "-g", &g], &b.name)?;
    }
    Ok(written)
}
