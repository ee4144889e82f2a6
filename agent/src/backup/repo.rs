//! A disk's backup repository: a directory holding a qcow2 chain (the full at the bottom, each
//! later backup a layer backed by the one before, by file name, so the directory can be moved)
//! and `manifest.json`, the list of points. A backup is written to a `.partial-*` file and
//! counts only once it is synced, renamed and recorded in the manifest; a partial is never
//! listed or restored, and the next backup removes it. `.lock` keeps two processes apart.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskchain_crd::DiskKey;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::state::write_atomic;

/// How a backup was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The whole disk, into a file with no backing file.
    Full,
    /// Only what changed since the previous point, into a layer backed by it.
    Incremental,
    /// What differs from the previous point, found by comparing the two (when what changed was
    /// not tracked), into a layer backed by it.
    Resync,
}

impl Kind {
    /// The name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Incremental => "incremental",
            Kind::Resync => "resync",
        }
    }
}

/// One backup point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    /// Its name: its UTC time (`2026-11-26T03:00:00Z`), `-2`, `-3`... when two fall in one
    /// second.
    pub point: String,
    /// When the backup started, seconds since the Unix epoch.
    pub time_unix: i64,
    /// How it was taken.
    pub kind: Kind,
    /// How what changed was found: `compare` (the disk read against the previous point) or
    /// `bitmap` (a dirty bitmap); none for a full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Its file, by name, in the repository.
    pub file: String,
    /// Bytes the backup wrote to the repository (allocated in its layer when it was taken).
    pub bytes: u64,
    /// The disk's size.
    pub virtual_size: u64,
    /// The point's sparse view checksum ([`view_digest`]: SHA-256 over its non-zero 64 KiB
    /// blocks), hex: what `restore` and `verify --deep` check, reading data only. Points taken
    /// before it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse_sha256: Option<String>,
    /// SHA-256 of the point's whole raw view, hex (what `sha256sum` of a raw restore prints;
    /// `backups -o json` shows it). Checked only for points without `sparse_sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The checkpoint or dirty bitmap it was taken against, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// A live point's QEMU process (see `libvirt::qemu_run`): the one whose memory held the
    /// checkpoint's bitmap from the moment it was made. The next backup is an incremental since
    /// that checkpoint only while the same process runs; in between, a bitmap stored in the
    /// image can be cleared or replaced unseen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_run: Option<String>,
}

/// The manifest of a repository.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The manifest's format version.
    pub version: u32,
    /// The disk's namespace.
    pub namespace: String,
    /// The disk's name.
    pub disk: String,
    /// The points, oldest first; each point's file is backed by the one before.
    pub points: Vec<Point>,
}

/// Why a repository cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// I/O on a repository file.
    #[error("repository {dir}: cannot {action} {path}: {source}")]
    Io {
        dir: PathBuf,
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process holds the repository.
    #[error(
        "repository {0}: another diskchain process is backing up, merging or verifying this repository; try again when it is done"
    )]
    Busy(PathBuf),
    /// The manifest cannot be read.
    #[error("repository {dir}: {message}")]
    Damaged { dir: PathBuf, message: String },
    /// The repository is another disk's.
    #[error(
        "repository {dir} holds the backups of disk {owner:?}, not of {disk:?}; give each disk a repository of its own (spec.backup.repository)"
    )]
    NotOurs {
        dir: PathBuf,
        owner: String,
        disk: String,
    },
    /// A QEMU tool failed.
    #[error("repository {dir}: {what}")]
    Tool { dir: PathBuf, what: String },
}

/// An open, locked repository.
pub struct Repo {
    /// The directory (canonical).
    pub dir: PathBuf,
    /// The manifest as read (or new).
    pub manifest: Manifest,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// The manifest's file name in a repository.
pub const MANIFEST: &str = "manifest.json";

/// The largest manifest read (about 250,000 points): a repository file is hostile input, and a
/// manifest pointing at `/dev/zero` or holding a gigabyte string must not exhaust memory.
const MANIFEST_MAX: u64 = 64 << 20;

/// Opens a repository file for reading as hostile input: never through a symlink, never
/// blocking (a FIFO planted as a point or the manifest), and only a regular file. `Ok(None)`:
/// it does not exist.
pub fn open_file(path: &Path) -> Result<Option<std::fs::File>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(format!(
                "{} is a symbolic link; a repository holds its own files only (never followed)",
                path.display()
            ));
        }
        Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
    };
    let m = f
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !m.file_type().is_file() {
        return Err(format!(
            "{} is not a regular file (a FIFO, a device or a directory); a repository holds regular files only",
            path.display()
        ));
    }
    Ok(Some(f))
}

impl Manifest {
    /// The manifest at `path` (`None`: there is none), read as hostile input ([`open_file`]) and
    /// at most [`MANIFEST_MAX`] bytes. `Err` says what is wrong.
    pub fn read(path: &Path) -> Result<Option<Manifest>, String> {
        let Some(f) = open_file(path)? else {
            return Ok(None);
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len > MANIFEST_MAX {
            return Err(format!(
                "{} is {len} bytes, more than a manifest can be ({MANIFEST_MAX})",
                path.display()
            ));
        }
        let mut text = Vec::with_capacity(len as usize);
        f.take(MANIFEST_MAX + 1)
            .read_to_end(&mut text)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if text.len() as u64 > MANIFEST_MAX {
            return Err(format!("{} grew past {MANIFEST_MAX} bytes", path.display()));
        }
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| format!("{} is damaged ({e})", path.display()))
    }

    /// The manifest of repository `dir`, when it reads (for listings and schedules).
    pub fn of(dir: &Path) -> Option<Manifest> {
        Manifest::read(&dir.join(MANIFEST)).ok().flatten()
    }
}

/// Checks point file `name` of repository `dir` as hostile input: a regular qcow2 file (no
/// symlink, no FIFO) whose backing reference is exactly `backing` (the previous point's file,
/// by name; none for the bottom of the chain), so that reading it never leaves the repository.
pub fn check_point_file(dir: &Path, name: &str, backing: Option<&str>) -> Result<(), String> {
    let path = dir.join(name);
    let f = open_file(&path)?.ok_or_else(|| format!("{} is missing", path.display()))?;
    if !crate::observe::qcow2::has_magic(&f) {
        return Err(format!("{} is not a qcow2 image", path.display()));
    }
    let refs = crate::observe::qcow2::read_refs(&f, &path).map_err(|e| e.to_string())?;
    if refs.data_file.is_some() {
        return Err(format!(
            "{} names an external data file; a point's data is in the point's own file",
            path.display()
        ));
    }
    let recorded = refs
        .backing
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    // By name, as backups write it; a merge of an older diskchain wrote the whole path.
    let same = match (recorded.as_deref(), backing) {
        (None, None) => true,
        (Some(r), Some(b)) => r == b || Path::new(r) == dir.join(b),
        _ => false,
    };
    if !same {
        return Err(format!(
            "{} is backed by {:?}, not by {:?} (the point before it, by name); reading it would leave the repository's chain",
            path.display(),
            recorded.unwrap_or_default(),
            backing.unwrap_or_default()
        ));
    }
    Ok(())
}

impl Repo {
    /// Opens (creating the directory when missing) and locks the repository of disk `key`. A
    /// directory it creates gets `mode` (the disk's own, with search where it reads: a 0600 disk's
    /// backups are not readable by others), or the process's default.
    pub fn open(dir: &Path, key: &DiskKey, mode: Option<u32>) -> Result<Repo, RepoError> {
        let io = |action: &'static str, path: &Path| {
            let (dir, path) = (dir.to_path_buf(), path.to_path_buf());
            move |source| RepoError::Io {
                dir,
                action,
                path,
                source,
            }
        };
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            if let Some(m) = mode {
                // Search wherever the disk may be read.
                b.mode((m & 0o666) | ((m & 0o444) >> 2));
            }
            b.create(dir).map_err(io("create", dir))?;
        }
        let lock_path = dir.join(".lock");
        let f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&lock_path)
                .map_err(io("open (never through a symbolic link)", &lock_path))?
        };
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| RepoError::Busy(dir.to_path_buf()))?;
        let path = dir.join(MANIFEST);
        let manifest = match Manifest::read(&path) {
            Ok(Some(m)) => m,
            Ok(None) => Manifest {
                version: 1,
                namespace: key.namespace.clone(),
                disk: key.name.clone(),
                points: Vec::new(),
            },
            Err(e) => {
                return Err(RepoError::Damaged {
                    dir: dir.to_path_buf(),
                    message: format!("{e}; move the repository aside, or restore the manifest"),
                });
            }
        };
        // A point's file is one of the repository's own, by name: never a path that leaves it.
        if let Some(p) = manifest.points.iter().find(|p| {
            p.file.is_empty()
                || p.file.starts_with('.')
                || p.file.contains('/')
                || p.file.contains('\0')
        }) {
            return Err(RepoError::Damaged {
                dir: dir.to_path_buf(),
                message: format!(
                    "{}: point {} names the file {:?}, which is not a file of this repository (a point's file is a plain name in it); the manifest was edited or damaged: restore it, or move the repository aside",
                    path.display(),
                    p.point,
                    p.file
                ),
            });
        }
        if let Some(p) = manifest
            .points
            .iter()
            .find(|p| p.sparse_sha256.is_none() && p.sha256.is_none())
        {
            return Err(RepoError::Damaged {
                dir: dir.to_path_buf(),
                message: format!(
                    "{}: point {} records no checksum (sparse_sha256 or sha256), so nothing it reads back could be trusted; the manifest was edited or damaged: restore it, or move the repository aside",
                    path.display(),
                    p.point
                ),
            });
        }
        if (manifest.namespace.as_str(), manifest.disk.as_str())
            != (key.namespace.as_str(), key.name.as_str())
        {
            return Err(RepoError::NotOurs {
                dir: dir.to_path_buf(),
                owner: DiskKey::new(Some(&manifest.namespace), &manifest.disk).to_string(),
                disk: key.to_string(),
            });
        }
        Ok(Repo {
            dir: dir.to_path_buf(),
            manifest,
            _lock: lock,
        })
    }

    /// Writes the manifest atomically (synced, with its directory).
    pub fn save(&self) -> Result<(), RepoError> {
        let bytes = serde_json::to_vec_pretty(&self.manifest).unwrap_or_default();
        write_atomic(&self.dir.join(MANIFEST), &bytes).map_err(|e| RepoError::Damaged {
            dir: self.dir.clone(),
            message: e.to_string(),
        })
    }

    /// Checks the files of the chain of point `index` (and every point below it) as hostile
    /// input ([`check_point_file`]): each a regular qcow2 file of this repository, backed by the
    /// point before it by name. Nothing is read through a file that fails.
    pub fn check_chain(&self, index: usize) -> Result<(), String> {
        let points = &self.manifest.points;
        for i in 0..=index.min(points.len().saturating_sub(1)) {
            let backing = i.checked_sub(1).map(|b| points[b].file.as_str());
            check_point_file(&self.dir, &points[i].file, backing)
                .map_err(|e| format!("point {}: {e}", points[i].point))?;
        }
        Ok(())
    }

    /// The path of a point's file.
    pub fn file(&self, p: &Point) -> PathBuf {
        self.dir.join(&p.file)
    }

    /// Removes what a killed backup left: `.partial-*` files. Returns their names.
    pub fn remove_partials(&self) -> Result<Vec<String>, RepoError> {
        let mut removed = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|source| RepoError::Io {
            dir: self.dir.clone(),
            action: "list",
            path: self.dir.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".partial-") {
                crate::state::remove_if_present(&e.path()).map_err(|e| RepoError::Damaged {
                    dir: self.dir.clone(),
                    message: e.to_string(),
                })?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// A name for a point taken at `unix` (UTC seconds), unique among the points, and its file
    /// name (no `:`; QEMU reads `NAME:` in a backing reference as a protocol).
    pub fn new_point_name(&self, unix: i64) -> (String, String) {
        let t = chrono::DateTime::<chrono::Utc>::from_timestamp(unix, 0).unwrap_or_default();
        let base = t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let file_base = t.format("%Y%m%dT%H%M%SZ").to_string();
        let taken = |n: &str, f: &str| {
            self.manifest
                .points
                .iter()
                .any(|p| p.point == n || p.file == f)
                || self.dir.join(f).exists()
        };
        let mut i = 1;
        loop {
            let (n, f) = if i == 1 {
                (base.clone(), format!("{file_base}.qcow2"))
            } else {
                (format!("{base}-{i}"), format!("{file_base}-{i}.qcow2"))
            };
            if !taken(&n, &f) {
                return (n, f);
            }
            i += 1;
        }
    }
}

/// Fsyncs `path` (a file) and its directory.
pub fn sync(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    if let Some(d) = path.parent() {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// One extent of `qemu-img map --output=json`.
#[derive(Deserialize)]
struct Extent {
    start: u64,
    length: u64,
    depth: usize,
    #[serde(default)]
    zero: bool,
    #[serde(default)]
    data: bool,
    #[serde(default)]
    compressed: bool,
    offset: Option<u64>,
}

/// The files of the chain under qcow2 image `top`, top first (as `qemu-img map` counts depth).
pub fn chain_files(top: &Path) -> Result<Vec<PathBuf>, String> {
    #[derive(Deserialize)]
    struct Info {
        filename: PathBuf,
        format: String,
    }
    let out = Command::new("qemu-img")
        .args([
            "info",
            "-U",
            "--backing-chain",
            "--output=json",
            "-f",
            "qcow2",
        ])
        .arg(top)
        .output()
        .map_err(|e| format!("qemu-img info could not run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img info {} failed: {}",
            top.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let infos: Vec<Info> = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("qemu-img info {} printed no chain: {e}", top.display()))?;
    if let Some(i) = infos.iter().find(|i| i.format != "qcow2") {
        return Err(format!(
            "{} is {}, not qcow2: not a repository file",
            i.filename.display(),
            i.format
        ));
    }
    Ok(infos.into_iter().map(|i| i.filename).collect())
}

/// The view of the qcow2 chain under `top` as `qemu-img map` describes it: its extents, checked
/// to follow one another from 0, and the chain's files to read the data extents from.
struct ViewMap {
    top: PathBuf,
    files: Vec<PathBuf>,
    extents: Vec<Extent>,
    handles: Vec<Option<std::fs::File>>,
}

impl ViewMap {
    fn of(top: &Path) -> Result<ViewMap, String> {
        let files = chain_files(top)?;
        let out = Command::new("qemu-img")
            .args(["map", "-U", "--output=json", "-f", "qcow2"])
            .arg(top)
            .output()
            .map_err(|e| format!("qemu-img map could not run: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img map {} failed: {}",
                top.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let extents: Vec<Extent> = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("qemu-img map {} printed no extents: {e}", top.display()))?;
        let mut expected = 0u64;
        for e in &extents {
            if e.start != expected {
                return Err(format!(
                    "qemu-img map {} skipped from {expected} to {}",
                    top.display(),
                    e.start
                ));
            }
            expected = e.start + e.length;
        }
        Ok(ViewMap {
            top: top.to_path_buf(),
            handles: files.iter().map(|_| None).collect(),
            files,
            extents,
        })
    }

    /// The view's size.
    fn size(&self) -> u64 {
        self.extents.last().map_or(0, |e| e.start + e.length)
    }

    /// Whether extent `e` holds data (anything else reads as zeros).
    fn is_data(e: &Extent) -> bool {
        e.data && !e.zero
    }

    /// Reads `buf.len()` bytes of data extent `i` at view offset `at` (inside the extent).
    fn read(&mut self, i: usize, buf: &mut [u8], at: u64) -> Result<(), String> {
        let e = &self.extents[i];
        let (Some(offset), false) = (e.offset, e.compressed) else {
            return Err(format!(
                "{}: data at {} is compressed or has no host offset; not a repository chain",
                self.top.display(),
                e.start
            ));
        };
        let Some(path) = self.files.get(e.depth) else {
            return Err(format!(
                "qemu-img map {}: depth {} beyond the chain",
                self.top.display(),
                e.depth
            ));
        };
        if self.handles[e.depth].is_none() {
            self.handles[e.depth] = Some(
                std::fs::File::open(path)
                    .map_err(|err| format!("cannot open {}: {err}", path.display()))?,
            );
        }
        let f = self.handles[e.depth].as_ref().expect("opened above");
        f.read_exact_at(buf, offset + (at - e.start))
            .map_err(|err| format!("cannot read {}: {err}", path.display()))
    }
}

/// SHA-256 of the raw view of the qcow2 chain under `top` (what `qemu-img convert -O raw`
/// would write), read through `qemu-img map`: zero extents hash as zeros, data extents are
/// read from the file at their depth at their offset. Repository files are uncompressed and
/// unencrypted qcow2; anything else is refused. (What points taken before [`view_digest`]
/// record.)
pub fn view_sha256(top: &Path) -> Result<String, String> {
    view_checksums(top).map(|(sha256, _)| sha256)
}

/// Both checksums of the view of the qcow2 chain under `top` in one read of its data: the
/// SHA-256 of the whole raw view ([`view_sha256`], what `backups -o json` shows as `sha256`)
/// and [`view_digest`]'s sparse one (what `restore` and `verify --deep` check, reading data
/// only).
pub fn view_checksums(top: &Path) -> Result<(String, String), String> {
    let mut map = ViewMap::of(top)?;
    let mut h = sha2::Sha256::new();
    let mut digest = Sparse::new(map.size());
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..map.extents.len() {
        let (start, length) = (map.extents[i].start, map.extents[i].length);
        let data = ViewMap::is_data(&map.extents[i]);
        let mut done = 0u64;
        while done < length {
            let n = (length - done).min(buf.len() as u64) as usize;
            if data {
                let at = start + done;
                map.read(i, &mut buf[..n], at)?;
                h.update(&buf[..n]);
                let read = &buf[..n];
                digest.feed(at, n as u64, &mut |b, from| {
                    let k = (from - at) as usize;
                    b.copy_from_slice(&read[k..k + b.len()]);
                    Ok(())
                })?;
            } else {
                h.update(&zeros[..n]);
            }
            done += n as u64;
        }
    }
    Ok((format!("{:x}", h.finalize()), digest.finish()))
}

/// The size of the blocks [`view_digest`] hashes.
pub const DIGEST_BLOCK: u64 = 64 * 1024;

/// Reads the view's bytes at a view offset into a buffer.
type ReadAt<'a> = dyn FnMut(&mut [u8], u64) -> Result<(), String> + 'a;

/// The checksum of a view that costs in proportion to its data, not its size: SHA-256 over
/// `diskchain-sparse-sha256-v1\0`, the view's size (u64, little-endian), then for each 64 KiB
/// block of the view (the last one may be shorter) that is not all zeros, in order, its index
/// (u64, little-endian) and its bytes. Two views have the same digest exactly when they read
/// the same (SHA-256 assumed), however their data is laid out, zeros written or not.
struct Sparse {
    h: sha2::Sha256,
    size: u64,
    block: Option<u64>,
    buf: Vec<u8>,
}

impl Sparse {
    fn new(size: u64) -> Sparse {
        let mut h = sha2::Sha256::new();
        h.update(b"diskchain-sparse-sha256-v1\0");
        h.update(size.to_le_bytes());
        Sparse {
            h,
            size,
            block: None,
            buf: vec![0; DIGEST_BLOCK as usize],
        }
    }

    fn flush(&mut self) {
        if let Some(b) = self.block.take() {
            let len = (self.size - b * DIGEST_BLOCK).min(DIGEST_BLOCK) as usize;
            if self.buf[..len].iter().any(|&x| x != 0) {
                self.h.update(b.to_le_bytes());
                self.h.update(&self.buf[..len]);
            }
        }
    }

    /// The view's bytes `[start, start + len)` (ascending across calls; everything not fed
    /// reads as zeros), read by `read(buffer, view offset)`.
    fn feed(&mut self, start: u64, len: u64, read: &mut ReadAt<'_>) -> Result<(), String> {
        let end = (start + len).min(self.size);
        let mut at = start;
        while at < end {
            let b = at / DIGEST_BLOCK;
            if self.block != Some(b) {
                self.flush();
                self.buf.fill(0);
                self.block = Some(b);
            }
            let within = (at - b * DIGEST_BLOCK) as usize;
            let n = ((b + 1) * DIGEST_BLOCK).min(end) - at;
            read(&mut self.buf[within..within + n as usize], at)?;
            at += n;
        }
        Ok(())
    }

    fn finish(mut self) -> String {
        self.flush();
        format!("{:x}", self.h.finalize())
    }
}

/// [`Sparse`]'s digest of the view of the qcow2 chain under `top`, read through `qemu-img map`:
/// only data extents are read, from the file at their depth at their offset. Repository files
/// are uncompressed and unencrypted qcow2; anything else is refused.
pub fn view_digest(top: &Path) -> Result<String, String> {
    let mut map = ViewMap::of(top)?;
    let mut digest = Sparse::new(map.size());
    for i in 0..map.extents.len() {
        if !ViewMap::is_data(&map.extents[i]) {
            continue;
        }
        let (start, length) = (map.extents[i].start, map.extents[i].length);
        digest.feed(start, length, &mut |buf, at| map.read(i, buf, at))?;
    }
    Ok(digest.finish())
}

/// [`Sparse`]'s digest of a raw image file: only its data is read (its holes, found with
/// `SEEK_DATA`/`SEEK_HOLE`, read as zeros).
pub fn raw_digest(path: &Path) -> Result<String, String> {
    use std::os::fd::AsFd;
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let size = f
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    let mut digest = Sparse::new(size);
    let mut at = 0u64;
    while at < size {
        let data = match nix::unistd::lseek(f.as_fd(), at as i64, nix::unistd::Whence::SeekData) {
            Ok(d) => d as u64,
            // No data past `at`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let hole = nix::unistd::lseek(f.as_fd(), data as i64, nix::unistd::Whence::SeekHole)
            .map(|h| h as u64)
            .unwrap_or(size);
        digest.feed(data, hole - data, &mut |buf, at| {
            f.read_exact_at(buf, at)
                .map_err(|err| format!("cannot read {}: {err}", path.display()))
        })?;
        at = hole;
    }
    Ok(digest.finish())
}

/// The checksum `p` records and the one its view under `top` (a qcow2 chain) reads with now,
/// by the method `p` was recorded with.
pub fn check_view(p: &Point, top: &Path) -> Result<(String, String), String> {
    recorded_and_now(p, || view_digest(top), || view_sha256(top))
}

/// Like [`check_view`], for a raw image `file` restored from `p`.
pub fn check_raw(p: &Point, file: &Path) -> Result<(String, String), String> {
    recorded_and_now(p, || raw_digest(file), || file_sha256(file))
}

/// The checksum `p` records (the sparse one when it has it) and the same checksum computed now
/// (`sparse` or `whole`).
fn recorded_and_now(
    p: &Point,
    sparse: impl FnOnce() -> Result<String, String>,
    whole: impl FnOnce() -> Result<String, String>,
) -> Result<(String, String), String> {
    match (&p.sparse_sha256, &p.sha256) {
        (Some(d), _) => Ok((d.clone(), sparse()?)),
        (None, Some(s)) => Ok((s.clone(), whole()?)),
        (None, None) => Err(format!("point {} records no checksum", p.point)),
    }
}

/// SHA-256 of a whole file (a raw image).
pub fn file_sha256(path: &Path) -> Result<String, String> {
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Bytes allocated in `file` alone (its own clusters, not its backing chain's), from
/// `qemu-img map` at depth 0.
pub fn own_bytes(file: &Path) -> Result<u64, String> {
    let out = Command::new("qemu-img")
        .args(["map", "-U", "--output=json", "-f", "qcow2"])
        .arg(file)
        .output()
        .map_err(|e| format!("qemu-img map could not run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img map {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    #[derive(Deserialize)]
    struct E {
        length: u64,
        depth: usize,
        #[serde(default)]
        data: bool,
    }
    let extents: Vec<E> = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(extents
        .iter()
        .filter(|e| e.depth == 0 && e.data)
        .map(|e| e.length)
        .sum())
}

#[cfg(test)]
mod tests {
    use super::{DIGEST_BLOCK, Sparse};

    /// The digest of `view`, every byte fed at once.
    fn whole(view: &[u8]) -> String {
        let mut d = Sparse::new(view.len() as u64);
        d.feed(0, view.len() as u64, &mut |buf, at| {
            buf.copy_from_slice(&view[at as usize..at as usize + buf.len()]);
            Ok(())
        })
        .unwrap();
        d.finish()
    }

    /// The digest of `view` fed only over `extents` (ascending `(start, len)`), the rest read as
    /// zeros, as a sparse view is.
    fn sparse(view: &[u8], extents: &[(u64, u64)]) -> String {
        let mut d = Sparse::new(view.len() as u64);
        for &(start, len) in extents {
            d.feed(start, len, &mut |buf, at| {
                buf.copy_from_slice(&view[at as usize..at as usize + buf.len()]);
                Ok(())
            })
            .unwrap();
        }
        d.finish()
    }

    #[test]
    fn the_digest_depends_on_the_view_not_on_its_layout() {
        let size = 5 * DIGEST_BLOCK + 1000;
        let mut view = vec![0u8; size as usize];
        // Data in block 1 (unaligned), across blocks 3 and 4, and in the short last block.
        view[70_000..70_100].fill(7);
        view[(4 * DIGEST_BLOCK - 10) as usize..(4 * DIGEST_BLOCK + 10) as usize].fill(9);
        view[(size - 5) as usize] = 1;
        let want = whole(&view);
        // Extents over the data only, split unaligned; zeros fed as data count as zeros.
        assert_eq!(
            sparse(
                &view,
                &[
                    (69_000, 1_050),
                    (70_050, 5_000),
                    (4 * DIGEST_BLOCK - 100, 50),
                    (4 * DIGEST_BLOCK - 50, 200),
                    (size - 10, 10),
                ]
            ),
            want
        );
        assert_eq!(sparse(&view, &[(0, size)]), want);
        // Another view: one byte moved, or the same data on a disk one byte larger.
        let mut moved = view.clone();
        moved[70_000] = 0;
        moved[70_100] = 7;
        assert_ne!(whole(&moved), want);
        let mut larger = view.clone();
        larger.push(0);
        assert_ne!(whole(&larger), want);
        // An all-zero view of a size hashes its size alone.
        assert_eq!(sparse(&[0; 100], &[]), whole(&[0; 100]));
    }
}
