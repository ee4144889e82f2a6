//! The offline backend: QEMU's own `qemu-img` on images no process has open.
//!
//! | step | how |
//! |---|---|
//! | snapshot | hard-link the active image to the point's file, create a new overlay on it beside the active image, rename it over the active path (the active path never disappears) |
//! | commit | `qemu-img commit -d -b BASE TOP` (the committed layers keep their content, so the layer above still reads correctly until it is re-pointed) |
//! | stream | QEMU's `block-stream` job in a `qemu-storage-daemon` over QMP (rate limit and progress from QEMU; the new backing reference is written once the data is on disk, see `qsd`) |
//! | rebase | `qemu-img rebase -u -b BACKING -F FMT OVERLAY` |
//! | copy | a new overlay on the run's top, `qemu-img rebase` onto the run's old base (only what the run holds is copied), `rebase -u` onto the new backing file; built as a hidden `.partial` file and renamed; a copy of a whole chain is `qemu-img convert` |
//! | delete | `unlink`, only inside the roots and only when no image references the file |
//!
//! Backing formats are always passed explicitly.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use diskchain_planner::{Format, StepAction};

use super::{ExecError, ExecOptions, Executor, StepReport, process, qemu_img};
use crate::observe::{Roots, backing_of, lock_holder};

/// Runs steps with `qemu-img`.
pub struct Offline {
    roots: Roots,
    formats: BTreeMap<PathBuf, Format>,
    dead: HashSet<PathBuf>,
    options: ExecOptions,
    /// The layers a copy reads may be open read-only by a running VM (its backing layers).
    live_readers: bool,
}

impl Offline {
    /// A backend confined to `roots`. `formats` gives the format of every file the steps name
    /// (files they create are qcow2); `dead` lists files being retired or deleted, whose backing
    /// references do not keep a file alive.
    pub fn new(
        roots: Roots,
        formats: BTreeMap<PathBuf, Format>,
        dead: HashSet<PathBuf>,
        options: ExecOptions,
    ) -> Offline {
        Offline {
            roots,
            formats,
            dead,
            options,
            live_readers: false,
        }
    }

    /// Lets copies read layers a running VM has open (only its backing layers are ever copied
    /// this way, and QEMU only reads them); everything written is still checked for locks.
    pub fn reading_live(mut self) -> Offline {
        self.live_readers = true;
        self
    }

    fn format(&self, op: &'static str, p: &Path) -> Result<Format, ExecError> {
        self.formats
            .get(p)
            .copied()
            .ok_or_else(|| ExecError::Precondition {
                op,
                file: p.to_path_buf(),
                what: "its format is not known from the observed chain".into(),
            })
    }

    /// Resolves `p` inside the roots and checks no process holds its image lock.
    fn writable(&self, op: &'static str, p: &Path) -> Result<PathBuf, ExecError> {
        let c = self.roots.confine(p, format!("the file {op} uses"))?;
        let f = std::fs::File::open(&c).map_err(|source| ExecError::Io {
            action: "open",
            path: c.clone(),
            source,
        })?;
        if let Some(holder) = lock_holder(&f).map_err(|source| ExecError::Io {
            action: "check the lock of",
            path: c.clone(),
            source,
        })? {
            return Err(ExecError::InUse { file: c, holder });
        }
        Ok(c)
    }

    /// `qemu-img check` of a qcow2 image this step is about to write: refuses on corruption
    /// (a write into an image whose refcounts are wrong can overwrite live data). Leaked
    /// clusters are harmless and allowed.
    fn checked(&self, op: &'static str, p: &Path) -> Result<(), ExecError> {
        if self.formats.get(p) != Some(&Format::Qcow2) {
            return Ok(());
        }
        let out = qemu_img::check(p, false)
            .output()
            .map_err(|source| ExecError::Io {
                action: "check",
                path: p.to_path_buf(),
                source,
            })?;
        // 0: clean; 3: leaks only (harmless); 2: corruption; anything else: the check itself
        // could not run (the file vanished, an I/O error), which is a failure, not a verdict.
        match out.status.code() {
            Some(0) | Some(3) => Ok(()),
            Some(2) => Err(ExecError::Corrupt {
                op,
                file: p.to_path_buf(),
                report: String::from_utf8_lossy(&out.stdout).trim().to_string()
                    + String::from_utf8_lossy(&out.stderr).trim(),
            }),
            _ => Err(ExecError::Qemu {
                command: format!("qemu-img check {}", p.display()),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }

    /// True when `target` is `top` or below it in its chain.
    fn in_chain(&self, top: &Path, target: &Path) -> Result<bool, ExecError> {
        let mut cur = top.to_path_buf();
        for _ in 0..100_000 {
            if cur == target {
                return Ok(true);
            }
            match backing_of(&self.roots, &cur)? {
                Some((b, _)) => cur = b,
                None => return Ok(false),
            }
        }
        Ok(false)
    }

    /// True when the qcow2 image `a` reads exactly as `b` (`qemu-img compare`, strict about
    /// sizes).
    fn same_view(&self, a: &Path, b: &Path) -> Result<bool, ExecError> {
        let out = qemu_img::compare(a, b, self.format("copy", b)?)
            .output()
            .map_err(|source| ExecError::Io {
                action: "compare",
                path: a.to_path_buf(),
                source,
            })?;
        Ok(out.status.code() == Some(0))
    }

    fn commit(
        &self,
        base: &Path,
        top: &Path,
        layers: &[PathBuf],
        progress: &mut dyn FnMut(f64),
    ) -> Result<u64, ExecError> {
        let op = "commit";
        for l in layers {
            self.writable(op, l)?;
        }
        let base = self.writable(op, base)?;
        self.checked(op, &base)?;
        if base == top || !self.in_chain(top, &base)? {
            return Err(ExecError::Precondition {
                op,
                file: base,
                what: format!("it is not below {} in its chain", top.display()),
            });
        }
        // `-b` finds the base by the name the chain records; a base the top names directly
        // needs none (and may be recorded as `file:...` or relative).
        let named =
            layers.len() > 1 || backing_of(&self.roots, top)?.map(|(b, _)| b) != Some(base.clone());
        let c = qemu_img::commit(
            top,
            self.format(op, top)?,
            named.then_some(base.as_path()),
            self.options.max_bytes_per_sec,
        );
        let sources = self.with_formats(op, layers)?;
        self.carrying_bitmaps(op, &base, &sources, || process::run(c, progress))
    }

    /// The layers `paths` with their formats.
    fn with_formats(
        &self,
        op: &'static str,
        paths: &[PathBuf],
    ) -> Result<Vec<(PathBuf, Format)>, ExecError> {
        paths
            .iter()
            .map(|p| Ok((p.clone(), self.format(op, p)?)))
            .collect()
    }

    /// Runs `write`, which moves the data of `sources` into `target`, carrying their persistent
    /// dirty bitmaps into it (see [`super::bitmaps`]). A raw target cannot hold bitmaps: the step
    /// is refused before anything is written when a source has one.
    fn carrying_bitmaps(
        &self,
        op: &'static str,
        target: &Path,
        sources: &[(PathBuf, Format)],
        write: impl FnOnce() -> Result<u64, ExecError>,
    ) -> Result<u64, ExecError> {
        if self.formats.get(target) == Some(&Format::Raw) {
            for (s, _) in sources {
                if let Some(b) = super::bitmaps::of(s)?.first() {
                    return Err(ExecError::Precondition {
                        op,
                        file: s.clone(),
                        what: format!(
                            "it holds the persistent dirty bitmap {}, and the raw file {} its data would go into cannot hold bitmaps; remove the bitmap (or its libvirt checkpoint) first, and take a full backup after",
                            b.name,
                            target.display()
                        ),
                    });
                }
            }
            return write();
        }
        super::bitmaps::carrying(target, sources, write)
    }

    fn stream(
        &self,
        into: &Path,
        base: Option<&Path>,
        layers: &[PathBuf],
        progress: &mut dyn FnMut(f64),
    ) -> Result<u64, ExecError> {
        let op = "stream";
        let into = self.writable(op, into)?;
        self.checked(op, &into)?;
        let sources = self.with_formats(op, layers)?;
        // QEMU's block-stream job in a qemu-storage-daemon (see `qsd`): QEMU's rate limit and
        // progress, and the new backing reference written only once the data is on disk. Its
        // base is a node and the layers between are linked explicitly, so `into` must still read
        // through the top of `layers` (or already through `base`: done before). The plan picks
        // a base that reads as the layers' old one (itself, or a moved copy of it).
        let base = match base {
            Some(b) => {
                let b = self.roots.confine(b, "the new base".into())?;
                if b == into {
                    return Err(ExecError::Precondition {
                        op,
                        file: b,
                        what: "a layer cannot be its own base".into(),
                    });
                }
                let f = self.format(op, &b)?;
                Some((b, f))
            }
            None => None,
        };
        let recorded = backing_of(&self.roots, &into)?.map(|(b, _)| b);
        if recorded == base.as_ref().map(|(b, _)| b.clone()) {
            progress(1.0);
            return Ok(0);
        }
        let mut confined = Vec::new();
        for (l, f) in &sources {
            confined.push((
                self.roots.confine(l, "a layer the stream reads".into())?,
                *f,
            ));
        }
        if recorded.as_ref() != confined.last().map(|(l, _)| l) {
            return Err(ExecError::Precondition {
                op,
                file: into,
                what: "it does not read through the layers the plan streams".into(),
            });
        }
        let base = base.as_ref().map(|(b, f)| (b.as_path(), *f));
        // (`into` reads through the top of `layers`, checked above: it has a reference.)
        let raw_reference = crate::observe::recorded_backing(&into)?
            .map(|(r, _)| r)
            .unwrap_or_default();
        // A layer shorter than the one above it reads as zeros past its end, whatever lies
        // below; QEMU's stream job copies only what is allocated, so past such an end the new
        // base would show through. Chains of mixed virtual sizes go through `qemu-img rebase`,
        // which compares the old and new backing views (no rate limit; its new reference may
        // reach the disk before its data, which a resumed stream undoes first, see
        // `prepare_resume`).
        // (So do paths that are not UTF-8, which the daemon's text options cannot carry.)
        let own = crate::observe::virtual_size(&into, Format::Qcow2)?;
        let mut mixed = into.to_str().is_none();
        for (l, f) in confined.iter().map(|(l, f)| (l.as_path(), *f)).chain(base) {
            mixed |= crate::observe::virtual_size(l, f)? != own || l.to_str().is_none();
        }
        if mixed {
            let c = qemu_img::rebase_copying(&into, base);
            return self.carrying_bitmaps(op, &into, &sources, || process::run(c, progress));
        }
        let speed = self.options.max_bytes_per_sec.unwrap_or(0);
        self.carrying_bitmaps(op, &into, &sources, || {
            super::qsd::stream(&into, &raw_reference, &confined, base, speed, progress)
        })
    }

    fn rebase(
        &self,
        overlay: &Path,
        backing: &Path,
        progress: &mut dyn FnMut(f64),
    ) -> Result<u64, ExecError> {
        let op = "rebase";
        let overlay = self.writable(op, overlay)?;
        self.checked(op, &overlay)?;
        let backing = self.roots.confine(backing, "the new backing file".into())?;
        if backing_of(&self.roots, &overlay)?.map(|(b, _)| b) == Some(backing.clone()) {
            progress(1.0);
            return Ok(0);
        }
        let c = qemu_img::repoint(
            &overlay,
            self.format(op, &overlay)?,
            Some((&backing, self.format(op, &backing)?)),
        );
        process::run(c, progress)
    }

    fn copy(
        &self,
        layers: &[PathBuf],
        to: &Path,
        backing: Option<&Path>,
        progress: &mut dyn FnMut(f64),
    ) -> Result<u64, ExecError> {
        let op = "copy";
        let dir = to.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(|source| ExecError::Io {
            action: "create",
            path: dir.to_path_buf(),
            source,
        })?;
        let dir = self.roots.confine(dir, "the placement directory".into())?;
        let to = dir.join(to.file_name().unwrap_or_default());
        if let Ok(m) = std::fs::symlink_metadata(&to) {
            // Copies appear under their name only once complete (see the rename below): a file
            // there is this copy, done before, only if it is a regular qcow2 with the planned
            // backing file that reads exactly as the layers copied. Anything else (a symlink, a
            // foreign image) is someone else's file and never taken for the copy.
            let done = m.file_type().is_file()
                && std::fs::File::open(&to)
                    .ok()
                    .is_some_and(|f| crate::observe::qcow2::has_magic(&f))
                && {
                    let planned = backing
                        .map(|b| self.roots.confine(b, "the copy's backing file".into()))
                        .transpose()?;
                    backing_of(&self.roots, &to)?.map(|(b, _)| b) == planned
                }
                && match layers.last() {
                    Some(top) => self.same_view(&to, top)?,
                    None => false,
                };
            if done {
                progress(1.0);
                return Ok(0);
            }
            return Err(ExecError::Precondition {
                op,
                file: to,
                what: "a file is already there that is not this copy; move it away or choose another placement directory".into(),
            });
        }
        let (first, top) = match (layers.first(), layers.last()) {
            (Some(f), Some(t)) => (f, t),
            _ => {
                return Err(ExecError::Precondition {
                    op,
                    file: to,
                    what: "no layers to copy".into(),
                });
            }
        };
        for l in layers {
            if self.live_readers {
                self.roots.confine(l, format!("a layer {op} reads"))?;
            } else {
                self.writable(op, l)?;
            }
        }
        let partial = super::beside(&to, "partial");
        let _ = std::fs::remove_file(&partial);
        let top_fmt = self.format(op, top)?;
        let old_base = backing_of(&self.roots, first)?;
        // The copy keeps the point's cluster size (the planner costs the copy at it).
        let cluster = match top_fmt {
            Format::Qcow2 => std::fs::File::open(top)
                .ok()
                .and_then(|f| crate::observe::qcow2::read_header(&f, top).ok())
                .map(|h| format!("cluster_size={}", h.cluster_size)),
            Format::Raw => None,
        };
        let mut written = 0;
        match (backing, old_base) {
            (Some(new_base), Some((old_base, old_fmt))) => {
                let c = qemu_img::create(
                    &partial,
                    Format::Qcow2,
                    None,
                    Some((top, top_fmt)),
                    cluster.as_deref(),
                    false,
                );
                written += process::run(c, &mut |_| {})?;
                // Only what the run holds differs from its old base: that is all rebase copies.
                let c = qemu_img::rebase_copying(&partial, Some((&old_base, old_fmt)));
                written += process::run(c, progress)?;
                let c = qemu_img::repoint(
                    &partial,
                    Format::Qcow2,
                    Some((new_base, self.format(op, new_base)?)),
                );
                written += process::run(c, &mut |_| {})?;
            }
            (None, None) => {
                let c = qemu_img::convert(
                    top,
                    top_fmt,
                    &partial,
                    cluster.as_deref(),
                    self.options.max_bytes_per_sec,
                );
                written += process::run(c, progress)?;
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(ExecError::Precondition {
                    op,
                    file: first.clone(),
                    what: "its backing file does not match the plan's base".into(),
                });
            }
        }
        // The copy carries every copied layer's bitmaps before anything can point at it.
        let sources = self.with_formats(op, layers)?;
        written += super::bitmaps::carrying(&partial, &sources, || Ok(0))?;
        sync_file(&partial)?;
        std::fs::rename(&partial, &to).map_err(|source| ExecError::Io {
            action: "rename into",
            path: to.clone(),
            source,
        })?;
        sync_file(&dir)?;
        Ok(written)
    }

    fn snapshot(&self, file: &Path, active: &Path) -> Result<u64, ExecError> {
        let op = "snapshot";
        let active = self.writable(op, active)?;
        let dir = active.parent().unwrap_or(Path::new("/")).to_path_buf();
        // Beside the active image, or in the placement directory on its file system (a hard
        // link cannot cross file systems: the plan makes it there only then).
        let file_dir = file.parent().unwrap_or(Path::new("/"));
        if file_dir != dir {
            self.roots
                .confine(file_dir, "the new point's directory".into())
                .map_err(|e| ExecError::Precondition {
                    op,
                    file: file.to_path_buf(),
                    what: format!("a new point is made inside the allowed roots: {e}"),
                })?;
        }
        // The point's file is the active image's inode; the new overlay goes on top of it.
        self.swap_in_overlay(op, &active, file, file)
    }

    /// A fresh empty overlay on `to` takes the active path; the old active content stays in
    /// `discarded`.
    fn revert(&self, to: &Path, active: &Path, discarded: &Path) -> Result<u64, ExecError> {
        let op = "revert";
        let active = self.writable(op, active)?;
        let to = self.roots.confine(to, "the point reverted to".into())?;
        self.swap_in_overlay(op, &active, discarded, &to)
    }

    /// Keeps the active image's content in `keep_as` (a hard link, made first, so nothing is
    /// lost at any moment) and puts a new empty overlay on `backing` at the active path (made
    /// aside, then renamed over it: the active path never disappears). Done before when
    /// `keep_as` is another inode and the active image already records `backing`.
    fn swap_in_overlay(
        &self,
        op: &'static str,
        active: &Path,
        keep_as: &Path,
        backing: &Path,
    ) -> Result<u64, ExecError> {
        let dir = active.parent().unwrap_or(Path::new("/")).to_path_buf();
        let meta = |p: &Path| {
            std::fs::metadata(p).map_err(|source| ExecError::Io {
                action: "stat",
                path: p.to_path_buf(),
                source,
            })
        };
        if keep_as.exists() {
            let (k, a) = (meta(keep_as)?, meta(active)?);
            if k.dev() != a.dev() || k.ino() != a.ino() {
                if backing_of(&self.roots, active)?.map(|(b, _)| b).as_deref() == Some(backing) {
                    return Ok(0); // done before
                }
                return Err(ExecError::Precondition {
                    op,
                    file: keep_as.to_path_buf(),
                    what: format!(
                        "it exists and is not the file this {op} keeps the active content in"
                    ),
                });
            }
        } else {
            std::fs::hard_link(active, keep_as).map_err(|source| ExecError::Io {
                action: "link",
                path: keep_as.to_path_buf(),
                source,
            })?;
            sync_file(keep_as.parent().unwrap_or(&dir))?;
        }
        let tmp = super::beside(active, op);
        let _ = std::fs::remove_file(&tmp);
        // The backing is the active image's own inode (a snapshot) or a point of the chain:
        // its format is known either way.
        let fmt = self.format(op, backing)?;
        let c = qemu_img::create(&tmp, Format::Qcow2, None, Some((backing, fmt)), None, false);
        let mut written = process::run(c, &mut |_| {})?;
        // The guest's next writes are recorded in the new top, as libvirt does on a live
        // snapshot; a revert keeps only the bitmaps that existed at the point reverted to.
        written += super::bitmaps::continue_on(&tmp, active, (op == "revert").then_some(backing))?;
        sync_file(&tmp)?;
        std::fs::rename(&tmp, active).map_err(|source| ExecError::Io {
            action: "rename into",
            path: active.to_path_buf(),
            source,
        })?;
        sync_file(&dir)?;
        Ok(written)
    }

    /// `holder` takes the active image's path (see [`StepAction::TakeOver`]). Done before when
    /// `holder` is gone and the active path is there (the rename is atomic).
    fn take_over(
        &self,
        holder: &Path,
        active: &Path,
        between: &[PathBuf],
    ) -> Result<u64, ExecError> {
        let op = "take-over";
        if std::fs::symlink_metadata(holder).is_err() {
            if active.exists() {
                return self.detach(op, holder, between);
            }
            return Err(ExecError::Precondition {
                op,
                file: active.to_path_buf(),
                what: format!("neither it nor {} exists", holder.display()),
            });
        }
        let active_c = self.writable(op, active)?;
        let holder_c = self.writable(op, holder)?;
        if holder_c.parent() != active_c.parent() || !self.in_chain(&active_c, &holder_c)? {
            return Err(ExecError::Precondition {
                op,
                file: holder_c,
                what: format!(
                    "it is not a layer below {} in the same directory",
                    active_c.display()
                ),
            });
        }
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| ExecError::Io {
                action,
                path,
                source,
            }
        };
        // The active file's owner, mode and extended attributes (SELinux label, ACLs) go with
        // its path.
        let m = std::fs::metadata(&active_c).map_err(io("read the metadata of", &active_c))?;
        {
            use std::os::unix::fs::MetadataExt;
            std::os::unix::fs::chown(&holder_c, Some(m.uid()), Some(m.gid()))
                .map_err(io("change the owner of", &holder_c))?;
        }
        std::fs::set_permissions(&holder_c, m.permissions())
            .map_err(io("change the mode of", &holder_c))?;
        super::xattr::copy_all(&active_c, &holder_c)
            .map_err(io("copy the extended attributes to", &holder_c))?;
        sync_file(&holder_c)?;
        std::fs::rename(&holder_c, &active_c)
            .map_err(io("rename onto the active image", &holder_c))?;
        if let Some(dir) = active_c.parent() {
            sync_file(dir)?;
        }
        self.detach(op, &holder_c, between)
    }

    /// Detaches the layers that were between a holder and the active image (see
    /// [`StepAction::TakeOver`]): each that still names the holder's old path, now gone, as its
    /// backing file gets none. Idempotent.
    fn detach(
        &self,
        op: &'static str,
        holder: &Path,
        between: &[PathBuf],
    ) -> Result<u64, ExecError> {
        let mut written = 0;
        for f in between {
            if !f.exists() {
                continue;
            }
            let f = self.writable(op, f)?;
            let Some((_, named)) = crate::observe::recorded_backing(&f)? else {
                continue;
            };
            // The holder is gone, so names are compared through their (existing) directories.
            let canon = |p: &Path| {
                p.parent()
                    .and_then(|d| d.canonicalize().ok())
                    .map(|d| d.join(p.file_name().unwrap_or_default()))
            };
            if named.exists() || canon(&named).is_none() || canon(&named) != canon(holder) {
                continue;
            }
            let c = qemu_img::repoint(&f, Format::Qcow2, None);
            written += process::run(c, &mut |_| {})?;
        }
        Ok(written)
    }

    fn delete(&self, file: &Path) -> Result<u64, ExecError> {
        let op = "delete";
        if !file.exists() {
            return Ok(0);
        }
        let file = self.writable(op, file)?;
        // Fails closed: another name of the file, any image that references it (whatever its
        // format or how it names it), and any file under its root whose references cannot be
        // read keep it.
        let users = crate::observe::scan_host(&self.roots).users_of(&file, &self.dead);
        if let Some(user) = users.first() {
            return Err(ExecError::Precondition {
                op,
                file,
                what: format!(
                    "{} may use it (a reference, another name, or an image whose references cannot be read); nothing is deleted that any image may use",
                    user.display()
                ),
            });
        }
        std::fs::remove_file(&file).map_err(|source| ExecError::Io {
            action: "delete",
            path: file.clone(),
            source,
        })?;
        Ok(0)
    }
}

pub(crate) fn sync_file(p: &Path) -> Result<(), ExecError> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|source| ExecError::Io {
            action: "sync",
            path: p.to_path_buf(),
            source,
        })
}

impl Executor for Offline {
    /// A `qemu-img` killed while writing can leave clusters allocated but unused (leaks): harmless
    /// to the data, but `qemu-img check` reports them. Repair them in the files the step writes.
    fn prepare_resume(&self, step: &StepAction) -> Result<(), ExecError> {
        let written: Vec<&PathBuf> = match step {
            StepAction::Commit { base, .. } => vec![base],
            StepAction::Stream { into, .. } => vec![into],
            StepAction::Rebase { overlay, .. } => vec![overlay],
            StepAction::Snapshot { .. }
            | StepAction::Copy { .. }
            | StepAction::Delete { .. }
            | StepAction::TakeOver { .. }
            | StepAction::Mirror { .. }
            | StepAction::Revert { .. } => vec![],
        };
        // A `qemu-img rebase` killed mid-way can leave its new backing reference written while
        // some copied clusters' L2 entries never reached the file (seen with SIGKILL on QEMU
        // 10.0): the image would read zeros or the wrong base there. A stream never changes the
        // layers it reads, and what it already copied equals what they read, so pointing `into`
        // back at the top of those layers restores its exact view; the stream then runs again.
        if let StepAction::Stream { into, layers, .. } = step
            && let Some(old) = layers.last()
            && into.exists()
        {
            let into = self.writable("stream", into)?;
            let old = self
                .roots
                .confine(old, "the layer below the streamed one".into())?;
            let c = qemu_img::repoint(
                &into,
                self.format("stream", &into)?,
                Some((&old, self.format("stream", &old)?)),
            );
            process::run(c, &mut |_| {})?;
        }
        for f in written {
            if !f.exists() || self.formats.get(f) != Some(&Format::Qcow2) {
                continue;
            }
            let f = self.writable("repair", f)?;
            let out = qemu_img::check(&f, true)
                .output()
                .map_err(|source| ExecError::Io {
                    action: "check",
                    path: f.clone(),
                    source,
                })?;
            // Exit 0: clean; 3: leaks that were repaired. Anything else is corruption: stop.
            if !matches!(out.status.code(), Some(0) | Some(3)) {
                return Err(ExecError::Qemu {
                    command: format!("qemu-img check -r leaks {}", f.display()),
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
        }
        Ok(())
    }

    fn run(
        &self,
        step: &StepAction,
        progress: &mut dyn FnMut(f64),
    ) -> Result<StepReport, ExecError> {
        let t = Instant::now();
        let written_bytes = match step {
            StepAction::Snapshot { file, active, .. } => self.snapshot(file, active)?,
            StepAction::Commit { base, top, layers } => self.commit(base, top, layers, progress)?,
            StepAction::Stream { into, base, layers } => {
                self.stream(into, base.as_deref(), layers, progress)?
            }
            StepAction::Rebase { overlay, backing } => self.rebase(overlay, backing, progress)?,
            StepAction::Copy {
                layers,
                to,
                backing,
            } => self.copy(layers, to, backing.as_deref(), progress)?,
            StepAction::Delete { file } => self.delete(file)?,
            StepAction::TakeOver {
                holder,
                active,
                between,
            } => self.take_over(holder, active, between)?,
            StepAction::Revert {
                to,
                active,
                discarded,
                ..
            } => self.revert(to, active, discarded)?,
            StepAction::Mirror { from, .. } => {
                return Err(ExecError::Precondition {
                    op: "mirror",
                    file: from.clone(),
                    what: "a mirror moves the active layer of a running VM; only the libvirt backend runs it".into(),
                });
            }
        };
        Ok(StepReport {
            written_bytes,
            seconds: t.elapsed().as_secs_f64(),
        })
    }
}
