//! The agent's state directory: which file holds each named point, per disk.
//!
//! Layout: `<state-dir>/disks/<namespace>/<name>.json`, one per disk key. Written atomically
//! (temporary file, fsync, rename, fsync of the directory) so a crash leaves either the old or
//! the new record.
//!
//! Before namespaces keyed the state, a record was `<state-dir>/disks/<name>.json` (and the
//! journal `journal/<name>.json`). Such a legacy record is read for the key with its name when
//! no keyed record exists, and moved to the keyed place the first time it is written (see
//! [`StateDir::legacy_owner_conflict`] for two keys sharing one name).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use diskchain_crd::{DEFAULT_NAMESPACE, DiskKey};
use serde::{Deserialize, Serialize};

/// Parsed disk records by path, valid while the file's inode, size and mtime are unchanged.
#[allow(clippy::type_complexity)]
static STATE_CACHE: std::sync::Mutex<
    std::collections::BTreeMap<PathBuf, ((u64, u64, i64, i64), DiskState)>,
> = std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Why the state cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O.
    #[error("failed to {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The record is not valid JSON of the expected shape.
    #[error("state file {} is damaged ({source}); move it aside and re-adopt the chain with spec.snapshots[].file", path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
}

/// One named point and the file holding it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The point's name.
    pub name: String,
    /// The file that holds it now.
    pub file: PathBuf,
    /// The file the spec bound it to (`spec.snapshots[].file`), when it was adopted; the point may
    /// since have moved (a commit, a copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_from: Option<PathBuf>,
}

/// What the agent records per disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// The disk's namespace (records written before namespaces have none: `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The disk's name.
    pub name: String,
    /// Its active image.
    pub active: PathBuf,
    /// Named points, oldest first.
    pub bindings: Vec<Binding>,
    /// Files earlier plans dropped from this chain and left in place (spec.prune was off).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<PathBuf>,
    /// The last plan applied to this disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_apply: Option<LastApply>,
    /// The id of the last revert done (`spec.revert.id`): a revert runs once per id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_revert: Option<String>,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

impl Default for DiskState {
    fn default() -> Self {
        DiskState {
            namespace: default_namespace(),
            name: String::new(),
            active: PathBuf::new(),
            bindings: Vec::new(),
            retired: Vec::new(),
            last_apply: None,
            last_revert: None,
        }
    }
}

impl DiskState {
    /// An empty record of disk `key`.
    pub fn empty(key: &DiskKey) -> DiskState {
        DiskState {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            ..Default::default()
        }
    }

    /// The disk's key.
    pub fn key(&self) -> DiskKey {
        DiskKey::new(Some(&self.namespace), &self.name)
    }
}

/// What the last `apply` did to a disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastApply {
    /// When it finished, in seconds since the Unix epoch.
    pub finished_unix: u64,
    /// Steps run.
    pub steps: Vec<String>,
    /// Data bytes the plan predicted.
    pub predicted_bytes: u64,
    /// Bytes the QEMU processes wrote (their `wchar`, metadata included).
    pub written_bytes: u64,
}

/// Marks a file name made from a long disk name by hashing (Kubernetes names never hold it).
const HASHED: char = '~';

/// The longest disk name used as a file name as it is.
const STEM_MAX: usize = 200;

/// The file-name stem of disk name `name`: the name itself, or for a name longer than
/// [`STEM_MAX`] bytes (Kubernetes allows 253, a file name 255 with its suffix) its first 160
/// bytes, [`HASHED`] and a hash of the whole, so that every file of the disk fits.
pub fn file_stem(name: &str) -> std::borrow::Cow<'_, str> {
    if name.len() <= STEM_MAX {
        return std::borrow::Cow::Borrowed(name);
    }
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    let hex: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let mut end = 160;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}{HASHED}{hex}", &name[..end]))
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// A state directory at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir { dir: dir.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Drops disk `key`'s record (which file holds each point, its last apply): the disk is no
    /// longer managed. An unfinished plan's journal is kept, so that a spec for the same disk
    /// resumes it. True when there was a record.
    pub fn forget(&self, key: &DiskKey) -> Result<bool, StateError> {
        let f = self.disk_file(key);
        let had = f.exists();
        remove_if_present(&f)?;
        Ok(had)
    }

    /// Where disk `key`'s record is kept.
    pub fn record_file(&self, key: &DiskKey) -> PathBuf {
        self.disk_file(key)
    }

    fn disk_file(&self, key: &DiskKey) -> PathBuf {
        self.dir
            .join("disks")
            .join(&key.namespace)
            .join(format!("{}.json", file_stem(&key.name)))
    }

    /// Where a record of disk `name` was kept before namespaces keyed the state.
    fn legacy_disk_file(&self, name: &str) -> PathBuf {
        self.dir
            .join("disks")
            .join(format!("{}.json", file_stem(name)))
    }

    /// A record from before namespaces keyed the state, when its name is shared by more than one
    /// of `keys` and none of them has a keyed record yet: which disk it belongs to is not known,
    /// and guessing would bind one disk's points to another's files. The message says what to do.
    pub fn legacy_owner_conflict(&self, key: &DiskKey, keys: &[&DiskKey]) -> Option<String> {
        let legacy = self.legacy_disk_file(&key.name);
        let legacy_journal = self.legacy_journal_file(&key.name);
        if !(legacy.exists() || legacy_journal.exists()) || self.has_keyed_record(key) {
            return None;
        }
        let sharing: Vec<String> = keys
            .iter()
            .filter(|k| k.name == key.name)
            .map(|k| k.namespace.clone())
            .collect();
        (sharing.len() > 1).then(|| {
            format!(
                "the state record {} was written before namespaces keyed the state, and the specs of namespaces {} are all named {:?}, so which disk it records is not known. Move it to {} for the namespace whose disk it records (its \"active\" field names the disk's active image), and the journal {} likewise if there is one; nothing was done",
                legacy.display(),
                sharing.join(", "),
                key.name,
                self.dir
                    .join("disks")
                    .join("NAMESPACE")
                    .join(format!("{}.json", key.name))
                    .display(),
                self.dir
                    .join("journal")
                    .join(format!("{}.json", key.name))
                    .display(),
            )
        })
    }

    /// True when disk `key` has a record of its own: legacy records and journals of its name
    /// are then not its.
    pub fn has_keyed_record(&self, key: &DiskKey) -> bool {
        self.disk_file(key).exists()
    }

    /// Every disk record in the directory, sorted by key (legacy records, from before
    /// namespaces, count as the default namespace's unless a keyed record of that key exists).
    pub fn all(&self) -> Result<Vec<DiskState>, StateError> {
        let dir = self.dir.join("disks");
        let read_dir = |dir: &Path| -> Result<Vec<std::fs::DirEntry>, StateError> {
            match std::fs::read_dir(dir) {
                Ok(e) => Ok(e.flatten().collect()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(source) => Err(StateError::Io {
                    action: "read",
                    path: dir.to_path_buf(),
                    source,
                }),
            }
        };
        let json_name = |e: &std::fs::DirEntry| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|n| !n.starts_with('.'))
                .map(str::to_string)
        };
        let mut files: BTreeMap<DiskKey, PathBuf> = BTreeMap::new();
        let mut legacy: Vec<(DiskKey, PathBuf)> = Vec::new();
        for e in read_dir(&dir)? {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let Some(ns) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                for f in read_dir(&e.path())? {
                    if let Some(n) = json_name(&f) {
                        files.insert(DiskKey::new(Some(&ns), &n), f.path());
                    }
                }
            } else if let Some(n) = json_name(&e) {
                legacy.push((DiskKey::new(None, &n), e.path()));
            }
        }
        for (k, p) in legacy {
            files.entry(k).or_insert(p);
        }
        let mut out = Vec::new();
        for (key, path) in files {
            // Records unchanged since they were last parsed (same inode, size, mtime) come from
            // memory: an agent with many disks reads them on every pass.
            let stamp = std::fs::metadata(&path).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.ino(), m.len(), m.mtime(), m.mtime_nsec())
            });
            let cached = stamp.and_then(|k| {
                let cache = STATE_CACHE.lock().ok()?;
                cache
                    .get(&path)
                    .filter(|(ck, _)| *ck == k)
                    .map(|(_, s)| s.clone())
            });
            let record = match cached {
                Some(s) => Some(s),
                None => {
                    let s: Option<DiskState> = read_json(&path)?.map(|mut s: DiskState| {
                        s.namespace = key.namespace.clone();
                        s
                    });
                    if let (Some(k), Some(s), Ok(mut c)) = (stamp, &s, STATE_CACHE.lock()) {
                        c.insert(path, (k, s.clone()));
                    }
                    s
                }
            };
            out.extend(record);
        }
        Ok(out)
    }

    /// The record of disk `key`, if any (a legacy record of its name when it has none of its
    /// own yet).
    pub fn load(&self, key: &DiskKey) -> Result<Option<DiskState>, StateError> {
        let keyed = read_json::<DiskState>(&self.disk_file(key))?;
        let found = match keyed {
            Some(s) => Some(s),
            None => read_json::<DiskState>(&self.legacy_disk_file(&key.name))?,
        };
        Ok(found.map(|mut s| {
            s.namespace = key.namespace.clone();
            s.name = key.name.clone();
            s
        }))
    }

    /// Writes the record of a disk atomically (and retires a legacy record of its name, which
    /// it replaces).
    pub fn save(&self, state: &DiskState) -> Result<(), StateError> {
        let text = serde_json::to_vec_pretty(state).expect("state serialises");
        let key = state.key();
        let fresh = !self.has_keyed_record(&key);
        write_atomic(&self.disk_file(&key), &text)?;
        if fresh {
            remove_if_present(&self.legacy_disk_file(&key.name))?;
        }
        Ok(())
    }

    /// Takes the lock that lets one process at a time work on disk `key` (`None`: another
    /// process holds it). Released when the returned lock is dropped or the process exits.
    pub fn lock_disk(
        &self,
        key: &DiskKey,
    ) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, StateError> {
        let dir = self.dir.join("locks").join(&key.namespace);
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io {
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let path = dir.join(format!("{}.lock", file_stem(&key.name)));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(StateError::Io {
                action: "lock",
                path,
                source: e.into(),
            }),
        }
    }

    /// Takes, for one step, a lock on every file it names: exclusive on the files it writes or
    /// creates, shared on those it only reads (see `StepAction::writes` and `reads`). Any two
    /// reconciles using this state directory (in one agent, in two processes, or `apply` beside
    /// the agent) then never write the same file at once, nor one while the other reads it.
    /// Locks are taken in one global order (by lock name), so two steps never wait on each
    /// other. Waits while another step holds one; `waiting` is told (once) which file, and
    /// `give_up` is asked between tries (a shutdown): then `Ok(None)`.
    pub fn lock_files(
        &self,
        writes: &[&Path],
        reads: &[&Path],
        waiting: &mut dyn FnMut(&Path),
        give_up: &dyn Fn() -> bool,
    ) -> Result<Option<Vec<nix::fcntl::Flock<std::fs::File>>>, StateError> {
        let dir = self.dir.join("locks").join("files");
        std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        let mut wanted: BTreeMap<String, (PathBuf, bool)> = BTreeMap::new();
        for (files, exclusive) in [(reads, false), (writes, true)] {
            for f in files {
                let k = file_lock_key(f);
                let name = file_lock_name(&k);
                let e = wanted.entry(name).or_insert((k, exclusive));
                e.1 |= exclusive;
            }
        }
        let mut held = Vec::new();
        let mut told = false;
        for (name, (file, exclusive)) in wanted {
            let path = dir.join(name);
            let arg = if exclusive {
                nix::fcntl::FlockArg::LockExclusiveNonblock
            } else {
                nix::fcntl::FlockArg::LockSharedNonblock
            };
            loop {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(|source| StateError::Io {
                        action: "open",
                        path: path.clone(),
                        source,
                    })?;
                match nix::fcntl::Flock::lock(f, arg) {
                    Ok(l) => {
                        held.push(l);
                        break;
                    }
                    Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                        if !told {
                            waiting(&file);
                            told = true;
                        }
                        if give_up() {
                            return Ok(None);
                        }
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    Err((_, e)) => {
                        return Err(StateError::Io {
                            action: "lock",
                            path,
                            source: e.into(),
                        });
                    }
                }
            }
        }
        Ok(Some(held))
    }

    /// True when a diskchain step (of this process or another using this state directory) holds
    /// the lock of file `p`: it is reading or writing it now.
    pub fn file_busy(&self, p: &Path) -> bool {
        let path = self
            .dir
            .join("locks")
            .join("files")
            .join(file_lock_name(&file_lock_key(p)));
        let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) else {
            return false;
        };
        matches!(
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock),
            Err((_, nix::errno::Errno::EWOULDBLOCK))
        )
    }

    /// The journal file of disk `key`.
    pub fn journal_file(&self, key: &DiskKey) -> PathBuf {
        self.dir
            .join("journal")
            .join(&key.namespace)
            .join(format!("{}.json", file_stem(&key.name)))
    }

    /// The keys of every disk with a journal (a plan in flight), legacy journals from before
    /// namespaces counted as the default namespace's.
    pub fn journal_keys(&self) -> Vec<DiskKey> {
        let dir = self.dir.join("journal");
        let name_of = |e: &std::fs::DirEntry| {
            let n = e.file_name().to_str()?.strip_suffix(".json")?.to_string();
            if n.contains(".set-aside-") || n.starts_with('.') {
                return None;
            }
            if n.contains(HASHED) {
                // A long name's file is named by a hash: the journal has the name.
                return read_json::<serde_json::Value>(&e.path())
                    .ok()
                    .flatten()
                    .and_then(|j| j.get("disk")?.as_str().map(str::to_string));
            }
            Some(n)
        };
        let mut keys = std::collections::BTreeSet::new();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let Some(ns) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                    if let Some(n) = name_of(&f) {
                        keys.insert(DiskKey::new(Some(&ns), &n));
                    }
                }
            } else if let Some(n) = name_of(&e) {
                keys.insert(DiskKey::new(None, &n));
            }
        }
        keys.into_iter().collect()
    }

    /// Where the journal of disk `name` was kept before namespaces keyed the state.
    pub fn legacy_journal_file(&self, name: &str) -> PathBuf {
        self.dir
            .join("journal")
            .join(format!("{}.json", file_stem(name)))
    }
}

/// One name per file however it is spelled: the canonical directory and the file name (the file
/// itself may not exist yet).
fn file_lock_key(p: &Path) -> PathBuf {
    p.parent()
        .and_then(|d| d.canonicalize().ok())
        .map(|d| d.join(p.file_name().unwrap_or_default()))
        .unwrap_or_else(|| p.to_path_buf())
}

fn file_lock_name(key: &Path) -> String {
    use sha2::Digest;
    format!(
        "{:x}.lock",
        sha2::Sha256::digest(key.as_os_str().as_encoded_bytes())
    )
}

/// Reads a JSON record; `None` when the file does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| StateError::Damaged {
            path: path.to_path_buf(),
            source,
        })
}

/// Removes `path` if it exists.
pub fn remove_if_present(path: &Path) -> Result<(), StateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StateError::Io {
            action: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content: a
/// temporary file beside it, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError + use<> {
        let path = path.to_path_buf();
        move |source| StateError::Io {
            action,
            path,
            source,
        }
    }
    let dir = path
        .parent()
        .expect("state files live in a directory")
        .to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    // Whatever is at the temporary name (a killed write's file, or a symlink planted there) is
    // removed, never written through: the file is created new, without following a link.
    remove_if_present(&tmp)?;
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io("create", &tmp))?
    };
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into", path))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", &dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: Option<&str>, name: &str) -> DiskKey {
        DiskKey::new(ns, name)
    }

    fn record(k: &DiskKey, active: &str) -> DiskState {
        DiskState {
            active: active.into(),
            bindings: vec![Binding {
                name: "p".into(),
                file: "/b".into(),
                adopted_from: None,
            }],
            retired: vec!["/c".into()],
            last_revert: Some("r1".into()),
            ..DiskState::empty(k)
        }
    }

    #[test]
    fn a_saved_record_loads_back_and_a_missing_one_is_none() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        let web = key(None, "web");
        assert_eq!(s.load(&web).unwrap(), None);
        let rec = record(&web, "/a");
        s.save(&rec).unwrap();
        assert_eq!(s.load(&web).unwrap(), Some(rec));
        assert!(d.path().join("disks/default/web.json").exists());
    }

    #[test]
    fn one_name_in_two_namespaces_keeps_two_records() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        let (a, b) = (key(Some("team-a"), "vda"), key(Some("team-b"), "vda"));
        s.save(&record(&a, "/a")).unwrap();
        s.save(&record(&b, "/b")).unwrap();
        assert_eq!(s.load(&a).unwrap().unwrap().active, Path::new("/a"));
        assert_eq!(s.load(&b).unwrap().unwrap().active, Path::new("/b"));
        let all: Vec<DiskKey> = s.all().unwrap().iter().map(DiskState::key).collect();
        assert_eq!(all, vec![a.clone(), b.clone()]);
        assert_ne!(s.journal_file(&a), s.journal_file(&b));
    }

    #[test]
    fn a_record_from_before_namespaces_is_read_and_moved_when_written() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        std::fs::create_dir_all(d.path().join("disks")).unwrap();
        // As the previous version wrote it: no namespace, at disks/NAME.json.
        std::fs::write(
            d.path().join("disks/vda.json"),
            r#"{"name":"vda","active":"/img/vda.qcow2","bindings":[{"name":"p","file":"/img/p.qcow2"}],"last_revert":"r7"}"#,
        )
        .unwrap();
        let prod = key(Some("prod"), "vda");
        // `status` shows it as the default namespace's until a spec claims it.
        let all = s.all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].key(), key(None, "vda"));
        // A spec of that name in any namespace reads it...
        let rec = s.load(&prod).unwrap().unwrap();
        assert_eq!(rec.key(), prod);
        assert_eq!(rec.last_revert.as_deref(), Some("r7"));
        assert_eq!(rec.bindings[0].file, Path::new("/img/p.qcow2"));
        // ...unless two specs share the name: then nothing guesses which disk it was.
        let other = key(None, "vda");
        let why = s.legacy_owner_conflict(&prod, &[&prod, &other]).unwrap();
        assert!(why.contains("disks/vda.json"), "{why}");
        assert!(why.contains("prod, default"), "{why}");
        assert_eq!(s.legacy_owner_conflict(&prod, &[&prod]), None);
        // Written back, it moves to its keyed place and the legacy file goes.
        s.save(&rec).unwrap();
        assert!(!d.path().join("disks/vda.json").exists());
        assert!(d.path().join("disks/prod/vda.json").exists());
        assert_eq!(s.load(&prod).unwrap(), Some(rec));
        assert_eq!(s.load(&other).unwrap(), None);
        assert_eq!(s.legacy_owner_conflict(&prod, &[&prod, &other]), None);
    }

    #[test]
    fn a_file_a_step_holds_is_busy_until_the_step_lets_go() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path().join("state"));
        let f = d.path().join("base.qcow2");
        assert!(!s.file_busy(&f));
        let held = s
            .lock_files(&[], &[f.as_path()], &mut |_| {}, &|| false)
            .unwrap()
            .unwrap();
        // However the path is spelled.
        assert!(s.file_busy(&d.path().join(".").join("base.qcow2")));
        drop(held);
        assert!(!s.file_busy(&f));
    }

    #[test]
    fn a_damaged_record_is_reported_with_its_path() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("disks/default")).unwrap();
        std::fs::write(d.path().join("disks/default/web.json"), "{not json").unwrap();
        let e = StateDir::new(d.path()).load(&key(None, "web")).unwrap_err();
        assert!(e.to_string().contains("disks/default/web.json"), "{e}");
    }

    #[test]
    fn a_kubernetes_name_of_253_characters_fits_every_state_file() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path().join("state"));
        let long = "x".repeat(253);
        let k = key(Some("t"), &long);
        let mut rec = DiskState::empty(&k);
        rec.active = d.path().join("a.qcow2");
        s.save(&rec).unwrap();
        assert_eq!(s.load(&k).unwrap(), Some(rec.clone()));
        assert!(s.lock_disk(&k).unwrap().is_some());
        assert_eq!(s.all().unwrap(), vec![rec]);
        std::fs::create_dir_all(s.journal_file(&k).parent().unwrap()).unwrap();
        std::fs::write(
            s.journal_file(&k),
            serde_json::json!({"disk": long, "namespace": "t"}).to_string(),
        )
        .unwrap();
        assert_eq!(s.journal_keys(), vec![k.clone()]);
        // Two long names that share their first 200 characters still differ.
        let other = key(Some("t"), &format!("{}y", "x".repeat(252)));
        assert_ne!(s.disk_file(&k), s.disk_file(&other));
        // Short names keep their files.
        assert!(
            s.disk_file(&key(None, "web"))
                .ends_with("disks/default/web.json")
        );
    }
}
