//! One disk, one resource. Two `DiskChain`s of a node whose sources resolve to one active image
//! (the same path, a symlink, another spelling) would each rewrite the chain to their own spec:
//! one's kept points are lost to the other's plan. File mode refuses the second spec of a run
//! (`Host::claim`); here the resources come and go one by one, so:
//!
//! - of the resources that claim one disk, the oldest (creation time, then namespace and name)
//!   manages it; the others are refused, naming it, and looked at again every resync (the older
//!   one may be edited or deleted);
//! - while a reconcile works on a disk, another resource reaching the same image waits (`InUse`),
//!   whatever their order: it is never planned against a chain that is changing.
//!
//! Each resource's active image, once resolved, is remembered; a resource found claiming the
//! same image as the one being reconciled is resolved again before it refuses anything.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use diskchain_crd::{DesiredDisk, DiskKey};

use crate::observe::Roots;
use crate::plan::Host;
use crate::state::StateDir;

/// Which of two resources claiming one disk manages it: the smaller (created first).
pub type Order = (i64, DiskKey);

/// Why a resource may not work on its disk now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// An older resource claims the same disk.
    Older {
        /// The resource that manages the disk.
        by: DiskKey,
        /// The active image both resolve to.
        image: PathBuf,
    },
    /// Another resource's reconcile is working on the disk now.
    Busy {
        /// That resource.
        by: DiskKey,
        /// The active image both resolve to.
        image: PathBuf,
    },
}

impl Refused {
    /// What happened and what to do, for the status and the event.
    pub fn message(&self, disk: &DesiredDisk) -> String {
        match self {
            Refused::Older { by, image } => format!(
                "{}: spec.source resolves to {}, which the older DiskChain {:?} already manages; one disk is managed by one resource: delete this one or point it at another disk (nothing was done)",
                disk.origin(),
                image.display(),
                by.to_string()
            ),
            Refused::Busy { by, image } => format!(
                "{}: spec.source resolves to {}, on which DiskChain {:?} is working now; tried again later (nothing was done)",
                disk.origin(),
                image.display(),
                by.to_string()
            ),
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Each resource's active image as last resolved.
    known: HashMap<DiskKey, PathBuf>,
    /// The active images reconciles are working on now.
    running: BTreeMap<PathBuf, DiskKey>,
}

/// The node's claims on disks.
#[derive(Default)]
pub struct Claims {
    inner: Mutex<Inner>,
}

/// A disk claimed by a running reconcile; released on drop.
pub struct Claim<'a> {
    claims: &'a Claims,
    image: Option<PathBuf>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(image) = self.image.take() {
            self.claims.lock().running.remove(&image);
        }
    }
}

/// The active image `disk`'s source resolves to, when its chain can be observed (one that
/// cannot is left to its own reconcile to report).
pub fn resolve(disk: &DesiredDisk, roots: &Roots, state: &StateDir) -> Option<PathBuf> {
    let mut host = Host::new(roots, state, &[]);
    host.claim(std::slice::from_ref(disk));
    host.claimed.into_keys().next()
}

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `disk` (of order `order`) for a reconcile, against the node's `others` resources.
    /// Blocking: it observes chains.
    pub fn take(
        &self,
        disk: &DesiredDisk,
        order: &Order,
        others: &[(DesiredDisk, Order)],
        roots: &Roots,
        state: &StateDir,
    ) -> Result<Claim<'_>, Refused> {
        let Some(image) = resolve(disk, roots, state) else {
            return Ok(Claim {
                claims: self,
                image: None,
            });
        };
        // Resources never resolved yet, then those that seem to claim the same image, resolved
        // (again) outside the lock.
        let unknown: Vec<&(DesiredDisk, Order)> = {
            let inner = self.lock();
            others
                .iter()
                .filter(|(d, _)| inner.known.get(&d.key).is_none_or(|i| *i == image))
                .collect()
        };
        let fresh: Vec<(DiskKey, Option<PathBuf>)> = unknown
            .iter()
            .map(|(d, _)| (d.key.clone(), resolve(d, roots, state)))
            .collect();
        let mut inner = self.lock();
        inner.known.insert(disk.key.clone(), image.clone());
        for (key, resolved) in fresh {
            match resolved {
                Some(i) => inner.known.insert(key, i),
                None => inner.known.remove(&key),
            };
        }
        let older = others
            .iter()
            .filter(|(d, o)| inner.known.get(&d.key) == Some(&image) && o < order)
            .min_by(|a, b| a.1.cmp(&b.1))
            .map(|(d, _)| d.key.clone());
        if let Some(by) = older {
            return Err(Refused::Older { by, image });
        }
        if let Some(by) = inner.running.get(&image).filter(|k| **k != disk.key) {
            return Err(Refused::Busy {
                by: by.clone(),
                image,
            });
        }
        inner.running.insert(image.clone(), disk.key.clone());
        Ok(Claim {
            claims: self,
            image: Some(image),
        })
    }

    /// Forgets a deleted resource.
    pub fn forget(&self, key: &DiskKey) {
        self.lock().known.remove(key);
    }
}
