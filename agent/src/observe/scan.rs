//! The host scan: every file under the allowed roots that could use a layer, and what it uses.
//!
//! The planner may only write a layer nobody else reads, so this scan fails closed. Every
//! regular file, block device and symlink to one under the roots is looked at:
//!
//! - qcow2 (any version, any feature: extended L2, external data file, encryption, dirty or
//!   corrupt bits, non-UTF-8 names) is read leniently for its backing and data-file names;
//! - other formats QEMU opens that can reference files (qed, vmdk) are asked with
//!   `qemu-img info -U -f FMT` (the format comes from the magic, never probed);
//! - formats that cannot reference a file (raw, LUKS, vhdx, vdi, ...) use nothing;
//! - a `file:` prefix is a plain file name, and every file name inside a `json:` name is a
//!   reference;
//! - identity is device + inode, so a hard link or a symlink is another name of the same file
//!   (and that other name is a user: someone may open the layer by it);
//! - a file whose references cannot be read at all may use *any* layer of its root.
//!
//! What the scan finds becomes graph input ([`HostScan::graph_input`]): image nodes with
//! backing edges, extra users of layers, and the names taken on the host.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use diskchain_planner::{Format, Layer};

use super::{Roots, qcow2};

/// A file's identity: device and inode.
pub type FileId = (u64, u64);

/// What a scanned file references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refs {
    /// Nothing (raw data, or a format that has no backing file).
    Nothing,
    /// Files it references: its backing file, and other files it reads (data files, extents).
    Known {
        /// The backing files (resolved; more than one when the name is ambiguous).
        backing: Vec<PathBuf>,
        /// Other files it reads.
        others: Vec<PathBuf>,
    },
    /// Its references cannot be read: it may use any layer of its root.
    Unknown(String),
}

/// One file found under a root.
#[derive(Clone, Debug)]
pub struct Scanned {
    /// The path as found (a symlink's own path for a symlink).
    pub path: PathBuf,
    /// The file's identity (a symlink's target).
    pub id: FileId,
    /// Its link count.
    pub nlink: u64,
    /// True for a symlink.
    pub symlink: bool,
    /// Its canonical path (the walk follows no directory symlink from a canonical root, so
    /// this is the path as found, except for a symlink).
    pub canonical: PathBuf,
    /// The root it was found under.
    pub root: PathBuf,
    /// True when it is an image format (a graph node).
    pub image: bool,
    /// What it references.
    pub refs: Refs,
}

/// Everything found under the roots.
#[derive(Clone, Debug, Default)]
pub struct HostScan {
    /// Files that are regular files or block devices (directly or through a symlink).
    pub files: Vec<Scanned>,
    /// Every name found (files, symlinks, sockets, anything): a new file never takes one.
    pub names: Vec<PathBuf>,
}

/// What the planner's graph gets from a scan.
#[derive(Clone, Debug, Default)]
pub struct GraphInput {
    /// Image nodes with their backing edges (identities resolved to one path per file).
    pub layers: Vec<Layer>,
    /// Users that are not backing edges: `(layer, user)`.
    pub users: Vec<(PathBuf, PathBuf)>,
    /// Names taken.
    pub names: Vec<PathBuf>,
}

/// The identity of `path` (symlinks followed).
pub fn file_id(path: &Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Scans every root.
pub fn scan_host(roots: &Roots) -> HostScan {
    let mut out = HostScan::default();
    let mut seen = HashSet::new();
    for root in roots.iter() {
        let Ok(canon) = root.canonicalize() else {
            continue;
        };
        scan_dir(root, &canon, &mut seen, &mut out);
    }
    out
}

type CacheKey = (u64, u64, u64, i64, i64);

/// What a file references, by path, valid while its identity, size and mtime are unchanged (a
/// resync of a host with many disks stats its images instead of opening them).
#[allow(clippy::type_complexity)]
static CACHE: std::sync::LazyLock<std::sync::Mutex<HashMap<PathBuf, (CacheKey, bool, Refs)>>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(HashMap::new()));

/// Walks directory `dir` (a canonical path: reached from a canonical root through directories,
/// never through a symlink), once per directory (by identity: a bind mount may show one twice).
fn scan_dir(root: &Path, dir: &Path, seen: &mut HashSet<(u64, u64)>, out: &mut HostScan) {
    let Ok(dm) = std::fs::metadata(dir) else {
        return;
    };
    if !seen.insert((dm.dev(), dm.ino())) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let p = entry.path();
        out.names.push(p.clone());
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            scan_dir(root, &p, seen, out);
            continue;
        }
        // Symlinks to files are followed for reading (never to directories: the walk stays
        // inside the roots and ends); FIFOs, sockets and character devices are never opened.
        let symlink = ft.is_symlink();
        // (A file's own metadata is read relative to the directory, not by its whole path.)
        let meta = if symlink {
            std::fs::metadata(&p)
        } else {
            entry.metadata()
        };
        let Ok(meta) = meta else {
            continue;
        };
        let mft = meta.file_type();
        if !(mft.is_file() || mft.is_block_device()) {
            continue;
        }
        let id = (meta.dev(), meta.ino());
        let key = (
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
        );
        let cached = CACHE.lock().ok().and_then(|c| {
            c.get(&p)
                .filter(|(k, _, _)| *k == key)
                .map(|(_, i, r)| (*i, r.clone()))
        });
        let (image, refs) = match cached {
            Some(v) => v,
            None => {
                let v = read_refs(&p);
                if let Ok(mut c) = CACHE.lock() {
                    c.insert(p.clone(), (key, v.0, v.1.clone()));
                }
                v
            }
        };
        let canonical = if symlink {
            p.canonicalize().unwrap_or_else(|_| p.clone())
        } else {
            p.clone()
        };
        out.files.push(Scanned {
            path: p,
            id,
            nlink: meta.nlink(),
            symlink,
            canonical,
            root: root.to_path_buf(),
            image,
            refs,
        });
    }
}

/// Formats recognised by their magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Magic {
    Qcow,
    Qed,
    Vmdk,
    /// A format QEMU opens that cannot reference another file.
    Standalone,
    /// No image magic: QEMU reads it as raw data, which references nothing.
    Raw,
}

fn magic(head: &[u8]) -> Magic {
    let starts = |m: &[u8]| head.starts_with(m);
    if starts(b"QFI\xfb") {
        Magic::Qcow
    } else if starts(b"QED\0") {
        Magic::Qed
    } else if starts(b"KDMV")
        || starts(b"COWD")
        || head
            .windows(b"# Disk DescriptorFile".len())
            .any(|w| w == b"# Disk DescriptorFile")
    {
        Magic::Vmdk
    } else if starts(b"LUKS\xba\xbe")
        || starts(b"vhdxfile")
        || starts(b"conectix")
        || starts(b"WithoutFreeSpace")
        || starts(b"WithouFreSpacExt")
        || starts(b"Bochs Virtual HD Image")
        || (head.len() >= 68 && head[64..68] == [0x7f, 0x10, 0xda, 0xbe])
    {
        Magic::Standalone
    } else {
        Magic::Raw
    }
}

/// Reads what the file at `p` references: `(is an image, refs)`.
fn read_refs(p: &Path) -> (bool, Refs) {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(p)
    {
        Ok(f) => f,
        Err(e) => return (true, Refs::Unknown(format!("cannot be opened: {e}"))),
    };
    let mut head = vec![0u8; 1024];
    let n = {
        use std::os::unix::fs::FileExt;
        let mut n = 0;
        while n < head.len() {
            match file.read_at(&mut head[n..], n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return (true, Refs::Unknown(format!("cannot be read: {e}"))),
            }
        }
        n
    };
    head.truncate(n);
    match magic(&head) {
        Magic::Raw => (false, Refs::Nothing),
        Magic::Standalone => (true, Refs::Nothing),
        Magic::Qcow => (true, qcow_refs(&file, p)),
        Magic::Qed => (true, qemu_img_refs(p, "qed")),
        Magic::Vmdk => (true, qemu_img_refs(p, "vmdk")),
    }
}

fn qcow_refs(file: &File, p: &Path) -> Refs {
    let raw = match qcow2::read_refs(file, p) {
        Ok(r) => r,
        Err(e) => return Refs::Unknown(e.to_string()),
    };
    let mut backing = Vec::new();
    let mut others = Vec::new();
    if let Some(b) = &raw.backing {
        match reference_targets(p, b) {
            Ok(v) => backing = v,
            Err(why) => return Refs::Unknown(why),
        }
    }
    if let Some(d) = &raw.data_file {
        match reference_targets(p, d) {
            Ok(v) => others = v,
            Err(why) => return Refs::Unknown(why),
        }
    }
    Refs::Known { backing, others }
}

/// `qemu-img info -U -f FMT` (the format from the magic; QEMU probes nothing, opens no backing
/// file): every file name it reports is a reference.
fn qemu_img_refs(p: &Path, format: &str) -> Refs {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", format])
        .arg(p)
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return Refs::Unknown(format!(
                "qemu-img info -f {format} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Err(e) => return Refs::Unknown(format!("qemu-img info could not run: {e}")),
    };
    let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(e) => return Refs::Unknown(format!("qemu-img info printed no JSON: {e}")),
    };
    let mut backing = Vec::new();
    let mut others = Vec::new();
    for key in ["backing-filename", "full-backing-filename"] {
        if let Some(b) = v.get(key).and_then(|b| b.as_str()) {
            match reference_targets(p, b.as_bytes()) {
                Ok(t) => backing.extend(t),
                Err(why) => return Refs::Unknown(why),
            }
        }
    }
    let mut names = Vec::new();
    if let Some(specific) = v.get("format-specific") {
        collect_file_names(specific, &mut names);
    }
    for n in names {
        match reference_targets(p, n.as_bytes()) {
            Ok(t) => others.extend(t),
            Err(why) => return Refs::Unknown(why),
        }
    }
    backing.dedup();
    Refs::Known { backing, others }
}

/// Every string under a key that names a file, at any depth.
fn collect_file_names(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    (
                        "filename" | "file" | "data-file" | "backing" | "path",
                        serde_json::Value::String(s),
                    ) => out.push(s.clone()),
                    _ => collect_file_names(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_file_names(x, out)),
        _ => {}
    }
}

/// Network protocols QEMU accepts in a file name: they never name a local file.
const NETWORK: &[&str] = &[
    "nbd:",
    "nbd+",
    "nbds",
    "iscsi",
    "rbd:",
    "ssh:",
    "http",
    "ftp",
    "gluster",
    "nfs:",
    "sheepdog",
    "vxhs",
    "blkdebug:",
    "blkverify:",
    "null-",
];

/// The local files a recorded reference may name, resolved the ways QEMU may resolve it:
/// relative to the directory of the path the image was found at and, for a symlink, the
/// directory of its target. `Err` when the name cannot be understood.
pub fn reference_targets(overlay: &Path, name: &[u8]) -> Result<Vec<PathBuf>, String> {
    let name = name.strip_prefix(b"file:").unwrap_or(name);
    if let Some(json) = name.strip_prefix(b"json:") {
        let v: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| format!("records a json: name that does not parse ({e})"))?;
        let mut names = Vec::new();
        collect_file_names(&v, &mut names);
        if names.is_empty() {
            return Err("records a json: name that names no file".into());
        }
        let mut out = Vec::new();
        for n in names {
            out.extend(reference_targets(overlay, n.as_bytes())?);
        }
        return Ok(out);
    }
    if NETWORK.iter().any(|p| name.starts_with(p.as_bytes())) {
        return Ok(Vec::new());
    }
    let r = Path::new(OsStr::from_bytes(name));
    let mut out = Vec::new();
    if r.is_absolute() {
        out.push(r.to_path_buf());
    } else {
        let mut dirs = vec![overlay.parent().unwrap_or(Path::new("/")).to_path_buf()];
        if let Ok(c) = overlay.canonicalize()
            && let Some(d) = c.parent()
            && !dirs.iter().any(|x| x == d)
        {
            dirs.push(d.to_path_buf());
        }
        out.extend(dirs.into_iter().map(|d| d.join(r)));
    }
    Ok(out)
}

impl HostScan {
    /// Graph input for the planner. `chain_layers` are the layers of the chains being planned
    /// (canonical paths: they name their files in the graph); `retired` are files earlier plans
    /// dropped (an unreadable file in their root protects them too).
    pub fn graph_input(&self, chain_layers: &[PathBuf], retired: &[PathBuf]) -> GraphInput {
        // One path per file: the chain's own path where the file is a layer, else the first
        // canonical path found.
        let mut rep: HashMap<FileId, PathBuf> = HashMap::new();
        for l in chain_layers {
            if let Some(id) = file_id(l) {
                rep.entry(id).or_insert_with(|| l.clone());
            }
        }
        for f in &self.files {
            if f.image {
                rep.entry(f.id).or_insert_with(|| f.canonical.clone());
            }
        }
        // The identity of each file found by its own (non-symlink) path: a reference to one of
        // these needs no `stat`.
        let by_path: HashMap<&Path, FileId> = self
            .files
            .iter()
            .filter(|f| !f.symlink)
            .map(|f| (f.path.as_path(), f.id))
            .collect();
        let id_of = |p: &Path| by_path.get(p).copied().or_else(|| file_id(p));
        let named = |p: &Path| -> PathBuf {
            id_of(p)
                .and_then(|id| rep.get(&id).cloned())
                .unwrap_or_else(|| p.canonicalize().unwrap_or_else(|_| p.to_path_buf()))
        };
        let exists = |p: &Path| by_path.contains_key(p) || p.exists();
        let mut input = GraphInput {
            names: self.names.clone(),
            ..GraphInput::default()
        };
        let mut names_per_id: HashMap<FileId, u64> = HashMap::new();
        for f in &self.files {
            if !f.symlink {
                *names_per_id.entry(f.id).or_default() += 1;
            }
        }
        for f in &self.files {
            let node = rep.get(&f.id).cloned();
            // Another name for a file the graph knows (a hard link, a symlink): whoever opens
            // it by that name reads the layer and everything below it.
            if let Some(n) = &node
                && *n != f.path
            {
                input.users.push((n.clone(), f.path.clone()));
            }
            match &f.refs {
                Refs::Nothing => {}
                Refs::Known { backing, others } => {
                    let existing: Vec<PathBuf> = backing
                        .iter()
                        .filter(|b| exists(b))
                        .map(|b| named(b))
                        .collect();
                    if let Some(n) = &node {
                        input.layers.push(Layer {
                            path: n.clone(),
                            format: Format::Qcow2,
                            backing: existing.first().cloned(),
                            alloc: None,
                        });
                    }
                    for extra in existing.iter().skip(1) {
                        input.users.push((extra.clone(), f.path.clone()));
                    }
                    for o in others.iter().filter(|o| exists(o)) {
                        input.users.push((named(o), f.path.clone()));
                    }
                }
                Refs::Unknown(why) => {
                    tracing::warn!(file = %f.path.display(), why, "cannot tell which images this file uses: every layer under its root counts as shared");
                    for l in chain_layers.iter().chain(retired) {
                        if l.starts_with(&f.root) && Some(l) != node.as_ref() {
                            input.users.push((l.clone(), f.path.clone()));
                        }
                    }
                }
            }
        }
        // A layer with more names than were found under the roots has a hard link elsewhere.
        for l in chain_layers {
            if let Ok(m) = std::fs::metadata(l) {
                let found = names_per_id.get(&(m.dev(), m.ino())).copied().unwrap_or(0);
                if m.nlink() > found.max(1) {
                    input
                        .users
                        .push((l.clone(), links_elsewhere(m.nlink() - found.max(1))));
                }
            }
        }
        input
    }

    /// Everything that may use `file` (by identity), apart from the files in `dead`: other names
    /// of it, images referencing it, and files under its root whose references cannot be read.
    pub fn users_of(&self, file: &Path, dead: &HashSet<PathBuf>) -> Vec<PathBuf> {
        let Some(id) = file_id(file) else {
            return Vec::new();
        };
        let is_dead =
            |p: &Path| dead.contains(p) || p.canonicalize().is_ok_and(|c| dead.contains(&c));
        let mut out = Vec::new();
        let mut names = 0u64;
        for f in &self.files {
            if f.id == id {
                if !f.symlink {
                    names += 1;
                }
                if f.path != file && !is_dead(&f.path) {
                    out.push(f.path.clone());
                }
                continue;
            }
            if is_dead(&f.path) {
                continue;
            }
            match &f.refs {
                Refs::Nothing => {}
                Refs::Known { backing, others } => {
                    if backing.iter().chain(others).any(|r| file_id(r) == Some(id)) {
                        out.push(f.path.clone());
                    }
                }
                Refs::Unknown(_) => {
                    if file.starts_with(&f.root) {
                        out.push(f.path.clone());
                    }
                }
            }
        }
        if let Ok(m) = std::fs::metadata(file)
            && m.nlink() > names.max(1)
        {
            out.push(links_elsewhere(m.nlink() - names.max(1)));
        }
        out
    }
}

/// The user standing for hard links of a file that the scan did not find (they are outside the
/// roots): someone may open the file by those names.
fn links_elsewhere(n: u64) -> PathBuf {
    PathBuf::from(format!("{n} other hard link(s) outside the allowed roots"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_prefix_is_a_plain_file_name() {
        assert_eq!(
            reference_targets(Path::new("/img/o.qcow2"), b"file:/img/l0.qcow2").unwrap(),
            vec![PathBuf::from("/img/l0.qcow2")]
        );
    }

    #[test]
    fn every_file_name_inside_a_json_name_is_a_reference() {
        let name =
            br#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/img/l0.qcow2"}}"#;
        assert_eq!(
            reference_targets(Path::new("/img/o.qcow2"), name).unwrap(),
            vec![PathBuf::from("/img/l0.qcow2")]
        );
        assert!(reference_targets(Path::new("/img/o"), b"json:{\"driver\":\"null-co\"}").is_err());
        assert!(reference_targets(Path::new("/img/o"), b"json:{nope").is_err());
    }

    #[test]
    fn a_relative_name_is_relative_to_the_overlay_and_may_be_any_bytes() {
        let t = reference_targets(Path::new("/img/sub/o.qcow2"), b"../l\xff.qcow2").unwrap();
        assert_eq!(
            t[0],
            Path::new("/img/sub").join(OsStr::from_bytes(b"../l\xff.qcow2"))
        );
    }

    #[test]
    fn network_names_reference_no_local_file() {
        assert!(
            reference_targets(Path::new("/img/o"), b"nbd+unix:///x?socket=/s")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn magic_tells_image_formats_apart() {
        assert_eq!(magic(b"QFI\xfb\0\0\0\x03"), Magic::Qcow);
        assert_eq!(magic(b"QED\0...."), Magic::Qed);
        assert_eq!(magic(b"KDMV...."), Magic::Vmdk);
        assert_eq!(magic(b"# Disk DescriptorFile\nversion=1"), Magic::Vmdk);
        assert_eq!(magic(b"LUKS\xba\xbe\0\x01"), Magic::Standalone);
        assert_eq!(magic(b"hello world"), Magic::Raw);
    }
}
