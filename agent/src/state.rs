//! The agent's state directory: which file holds each named point, per disk.
//!
//! Layout: `<state-dir>/disks/<disk>.json`. Written atomically (temporary file, fsync, rename,
//! fsync of the directory) so a crash leaves either the old or the new record.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
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

    fn disk_file(&self, name: &str) -> PathBuf {
        self.dir.join("disks").join(format!("{name}.json"))
    }

    /// Every disk record in the directory, sorted by name.
    pub fn all(&self) -> Result<Vec<DiskState>, StateError> {
        let dir = self.dir.join("disks");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Io {
                    action: "read",
                    path: dir,
                    source,
                });
            }
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_string)
            })
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        let mut out = Vec::new();
        for n in names {
            // Records unchanged since they were last parsed (same inode, size, mtime) come from
            // memory: an agent with many disks reads them on every pass.
            let path = self.disk_file(&n);
            let key = std::fs::metadata(&path).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.ino(), m.len(), m.mtime(), m.mtime_nsec())
            });
            let cached = key.and_then(|k| {
                let cache = STATE_CACHE.lock().ok()?;
                cache
                    .get(&path)
                    .filter(|(ck, _)| *ck == k)
                    .map(|(_, s)| s.clone())
            });
            let record = match cached {
                Some(s) => Some(s),
                None => {
                    let s = self.load(&n)?;
                    if let (Some(k), Some(s), Ok(mut c)) = (key, &s, STATE_CACHE.lock()) {
                        c.insert(path, (k, s.clone()));
                    }
                    s
                }
            };
            out.extend(record);
        }
        Ok(out)
    }

    /// The record of disk `name`, if any.
    pub fn load(&self, name: &str) -> Result<Option<DiskState>, StateError> {
        read_json(&self.disk_file(name))
    }

    /// Writes the record of a disk atomically.
    pub fn save(&self, state: &DiskState) -> Result<(), StateError> {
        let text = serde_json::to_vec_pretty(state).expect("state serialises");
        write_atomic(&self.disk_file(&state.name), &text)
    }

    /// Takes the lock that lets one process at a time work on disk `name` (`None`: another
    /// process holds it). Released when the returned lock is dropped or the process exits.
    pub fn lock_disk(
        &self,
        name: &str,
    ) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, StateError> {
        let dir = self.dir.join("locks");
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io {
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let path = dir.join(format!("{name}.lock"));
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
        use sha2::Digest;
        let dir = self.dir.join("locks").join("files");
        std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        // One name per file however it is spelled: the canonical directory and the file name
        // (the file itself may not exist yet).
        let key = |p: &Path| -> PathBuf {
            p.parent()
                .and_then(|d| d.canonicalize().ok())
                .map(|d| d.join(p.file_name().unwrap_or_default()))
                .unwrap_or_else(|| p.to_path_buf())
        };
        let mut wanted: BTreeMap<String, (PathBuf, bool)> = BTreeMap::new();
        for (files, exclusive) in [(reads, false), (writes, true)] {
            for f in files {
                let k = key(f);
                let name = format!(
                    "{:x}.lock",
                    sha2::Sha256::digest(k.as_os_str().as_encoded_bytes())
                );
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

    /// The journal file of disk `name`.
    pub fn journal_file(&self, name: &str) -> PathBuf {
        self.dir.join("journal").join(format!("{name}.json"))
    }
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
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
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

    #[test]
    fn a_saved_record_loads_back_and_a_missing_one_is_none() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        assert_eq!(s.load("web").unwrap(), None);
        let rec = DiskState {
            name: "web".into(),
            active: "/a".into(),
            bindings: vec![Binding {
                name: "p".into(),
                file: "/b".into(),
                adopted_from: None,
            }],
            retired: vec!["/c".into()],
            last_apply: None,
            last_revert: Some("r1".into()),
        };
        s.save(&rec).unwrap();
        assert_eq!(s.load("web").unwrap(), Some(rec));
    }

    #[test]
    fn a_damaged_record_is_reported_with_its_path() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("disks")).unwrap();
        std::fs::write(d.path().join("disks/web.json"), "{not json").unwrap();
        let e = StateDir::new(d.path()).load("web").unwrap_err();
        assert!(e.to_string().contains("disks/web.json"), "{e}");
    }
}
