//! Binding a spec's point names to the files of the observed chain, with what the state directory
//! remembers, into the planner's [`DiskRequest`].
//!
//! A point's identity is its name. A name is bound by `spec.snapshots[].file` (adoption) or by
//! the state (a point diskchain made or moved earlier). Unbound names after the last bound one ask
//! for new snapshots; an unbound name before a bound one cannot be satisfied.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diskchain_crd::LoadedSpec;
use diskchain_planner::{DiskRequest, KeptPoint};

use crate::observe::{ObserveError, ObservedChain, Roots};
use crate::state::DiskState;

/// Why a spec cannot be bound to its chain.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A path in the spec does not resolve inside the roots, or does not exist.
    #[error("{origin}: {source}")]
    Path {
        /// The spec's file and document.
        origin: String,
        /// The cause.
        source: ObserveError,
    },
    /// The state binds a point to a file no longer in the chain.
    #[error(
        "{origin}: spec.snapshots[{index}] {point:?} was held by {} according to the state, but that file is no longer in the chain (changed behind diskchain's back?); bind the point again with spec.snapshots[{index}].file, or drop it from the spec",
        file.display()
    )]
    Stale {
        /// The spec's file and document.
        origin: String,
        /// Index in spec.snapshots.
        index: usize,
        /// The point.
        point: String,
        /// The file the state names.
        file: PathBuf,
    },
    /// A new snapshot listed below an existing point.
    #[error(
        "{origin}: spec.snapshots[{index}] {point:?} has no file and is not a point diskchain knows, but {later:?} after it is bound; a new snapshot can only be taken on top: list new names after the last existing point, or bind this one with file:"
    )]
    NewBelowExisting {
        /// The spec's file and document.
        origin: String,
        /// Index in spec.snapshots.
        index: usize,
        /// The point.
        point: String,
        /// The bound point after it.
        later: String,
    },
    /// A layer of the chain is open in another process.
    #[error(
        "{origin}: layer {} is in use by {holder} (it holds QEMU's image lock); diskchain never acts on a disk in use: stop that process, or manage the disk through libvirt (spec.source.libvirt)",
        file.display()
    )]
    InUse {
        /// The spec's file and document.
        origin: String,
        /// The layer.
        file: PathBuf,
        /// Who holds the lock.
        holder: String,
    },
}

impl BindError {
    /// True for input problems (exit 2).
    pub fn is_bad_input(&self) -> bool {
        match self {
            BindError::Path { source, .. } => source.is_bad_input(),
            _ => true,
        }
    }
}

/// Binds `spec` to its observed `chain`.
pub fn bind(
    spec: &LoadedSpec,
    chain: &ObservedChain,
    state: Option<&DiskState>,
    roots: &Roots,
) -> Result<DiskRequest, BindError> {
    let origin = spec.origin();
    for l in &chain.layers {
        if let Some(holder) = &l.in_use {
            return Err(BindError::InUse {
                origin,
                file: l.layer.path.clone(),
                holder: holder.clone(),
            });
        }
    }
    let in_chain = |p: &PathBuf| chain.layers.iter().any(|l| &l.layer.path == p);
    let remembered = |name: &str| state.and_then(|s| s.bindings.iter().find(|b| b.name == name));

    // Per spec point: Some(file) when bound, None when it asks for a new snapshot.
    let mut bound: Vec<(String, Option<PathBuf>)> = Vec::new();
    for (i, snap) in spec.spec().snapshots.iter().enumerate() {
        let file = match &snap.file {
            Some(f) => {
                let what = format!("spec.snapshots[{i}].file");
                // The point may have moved since it was adopted from this file (a commit, or a
                // copy with the old file pruned): the state knows where it is now.
                let moved = remembered(&snap.name).filter(|b| {
                    in_chain(&b.file)
                        && roots
                            .confine_dir(f, what.clone())
                            .ok()
                            .is_some_and(|lexical| {
                                b.adopted_from.as_ref() == Some(&lexical) || b.file == lexical
                            })
                });
                match moved {
                    Some(b) => Some(b.file.clone()),
                    None => Some(roots.confine(f, what).map_err(|source| BindError::Path {
                        origin: origin.clone(),
                        source,
                    })?),
                }
            }
            None => match remembered(&snap.name) {
                Some(b) if in_chain(&b.file) => Some(b.file.clone()),
                Some(b) => {
                    return Err(BindError::Stale {
                        origin,
                        index: i,
                        point: snap.name.clone(),
                        file: b.file.clone(),
                    });
                }
                None => None,
            },
        };
        bound.push((snap.name.clone(), file));
    }
    if let Some(last_bound) = bound.iter().rposition(|(_, f)| f.is_some())
        && let Some(i) = bound[..last_bound].iter().position(|(_, f)| f.is_none())
    {
        return Err(BindError::NewBelowExisting {
            origin,
            index: i,
            point: bound[i].0.clone(),
            later: bound[last_bound].0.clone(),
        });
    }
    let placement = match &spec.spec().placement {
        Some(p) => Some(
            roots
                .confine_dir(&p.directory, "spec.placement.directory".into())
                .map_err(|source| BindError::Path {
                    origin: origin.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let known_names: BTreeMap<PathBuf, String> = state
        .map(|s| {
            s.bindings
                .iter()
                .map(|b| (b.file.clone(), b.name.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut keep = Vec::new();
    let mut new_snapshots = Vec::new();
    for (name, file) in bound {
        match file {
            Some(file) => keep.push(KeptPoint { name, file }),
            None => new_snapshots.push(name),
        }
    }
    Ok(DiskRequest {
        name: spec.name.clone(),
        active: chain.active().layer.path.clone(),
        keep,
        new_snapshots,
        placement,
        prune: spec.spec().prune,
        known_names,
        retired: state.map(|s| s.retired.clone()).unwrap_or_default(),
        live: false,
        revert: None,
    })
}
