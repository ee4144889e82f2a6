//! The allowed roots: every file diskchain reads or writes must resolve (symlinks followed) inside
//! one of them.

use std::path::{Path, PathBuf};

use super::ObserveError;

/// Canonical allowed root directories.
#[derive(Clone, Debug)]
pub struct Roots(Vec<PathBuf>);

impl Roots {
    /// Canonicalises the given directories; each must exist.
    pub fn new(dirs: &[PathBuf]) -> Result<Roots, ObserveError> {
        let mut v = Vec::new();
        for d in dirs {
            let c = d.canonicalize().map_err(|_| ObserveError::Missing {
                what: "the allowed root (--allowed-root)".into(),
                path: d.clone(),
            })?;
            v.push(c);
        }
        Ok(Roots(v))
    }

    /// The roots `keep` accepts (a namespace's share of the node's roots).
    pub fn subset(&self, keep: impl Fn(&Path) -> bool) -> Roots {
        Roots(self.0.iter().filter(|r| keep(r)).cloned().collect())
    }

    /// The root `canonical` lies in, if any (the innermost).
    pub fn root_of(&self, canonical: &Path) -> Option<&Path> {
        self.0
            .iter()
            .filter(|r| canonical.starts_with(r))
            .max_by_key(|r| r.as_os_str().len())
            .map(PathBuf::as_path)
    }

    /// The roots.
    pub fn iter(&self) -> impl Iterator<Item = &Path> {
        self.0.iter().map(PathBuf::as_path)
    }

    /// True when the canonical `path` lies inside a root.
    pub fn contains(&self, canonical: &Path) -> bool {
        self.0.iter().any(|r| canonical.starts_with(r))
    }

    /// Resolves `path` (symlinks followed) and checks it lies inside a root.
    pub fn confine(&self, path: &Path, what: String) -> Result<PathBuf, ObserveError> {
        let resolved = path.canonicalize().map_err(|_| ObserveError::Missing {
            what: what.clone(),
            path: path.to_path_buf(),
        })?;
        if self.contains(&resolved) {
            Ok(resolved)
        } else {
            Err(ObserveError::OutsideRoots {
                what,
                path: path.to_path_buf(),
                resolved,
                roots: self.0.clone(),
            })
        }
    }

    /// Resolves a directory that may not exist yet (its nearest existing ancestor is resolved)
    /// and checks it lies inside a root.
    pub fn confine_dir(&self, dir: &Path, what: String) -> Result<PathBuf, ObserveError> {
        let mut existing = dir.to_path_buf();
        let mut rest = Vec::new();
        while !existing.exists() {
            match (
                existing.file_name().map(|n| n.to_os_string()),
                existing.parent(),
            ) {
                (Some(name), Some(parent)) => {
                    rest.push(name);
                    existing = parent.to_path_buf();
                }
                _ => break,
            }
        }
        let mut resolved = existing.canonicalize().map_err(|_| ObserveError::Missing {
            what: what.clone(),
            path: dir.to_path_buf(),
        })?;
        for n in rest.into_iter().rev() {
            resolved.push(n);
        }
        if self.contains(&resolved) {
            Ok(resolved)
        } else {
            Err(ObserveError::OutsideRoots {
                what,
                path: dir.to_path_buf(),
                resolved,
                roots: self.0.clone(),
            })
        }
    }
}
