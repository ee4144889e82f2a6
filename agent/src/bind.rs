//! Binding a spec's point names to the files of the observed chain, with what the state directory
//! remembers, into the planner's [`DiskRequest`].
//!
//! A point's identity is its name. A name is bound by `spec.snapshots[].file` (adoption) or by
//! the state (a point diskchain made or moved earlier). Unbound names after the last bound one ask
//! for new snapshots; an unbound name before a bound one cannot be satisfied.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diskchain_crd::DesiredDisk;
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
    spec: &DesiredDisk,
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
    // A new point can be made in the placement directory (a hard link) when it exists on the
    // active image's file system.
    let placement_links = placement.as_ref().is_some_and(|dir| {
        use std::os::unix::fs::MetadataExt;
        let active = &chain.active().layer.path;
        match (
            std::fs::metadata(dir),
            active.parent().map(std::fs::metadata),
        ) {
            (Ok(d), Some(Ok(a))) => d.is_dir() && d.dev() == a.dev(),
            _ => false,
        }
    });
    Ok(DiskRequest {
        name: spec.key.name.clone(),
        active: chain.active().layer.path.clone(),
        keep,
        new_snapshots,
        placement,
        placement_links,
        prune: spec.spec().prune,
        known_names,
        retired: state.map(|s| s.retired.clone()).unwrap_or_default(),
        mode: diskchain_planner::Mode::Offline,
        revert: None,
    })
}

#[cfg(test)]
mod tests {
    //! Binding without QEMU: chains built in memory over empty files in a temporary root.
    use std::path::{Path, PathBuf};

    use diskchain_crd::{DesiredDisk, DiskKey, load_str};
    use diskchain_planner::{Format, Layer};

    use super::*;
    use crate::observe::ObservedLayer;
    use crate::state::{Binding, DiskState};

    struct Host {
        dir: tempfile::TempDir,
        roots: Roots,
    }

    impl Host {
        fn new() -> Host {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("img")).unwrap();
            let roots = Roots::new(&[dir.path().join("img")]).unwrap();
            Host { dir, roots }
        }

        /// A file of the root (created empty: binding only resolves paths).
        fn file(&self, name: &str) -> PathBuf {
            let p = self.dir.path().join("img").join(name);
            std::fs::write(&p, b"").unwrap();
            p.canonicalize().unwrap()
        }

        /// A chain of `names`, base first, each file created.
        fn chain(&self, names: &[&str]) -> ObservedChain {
            let mut layers: Vec<ObservedLayer> = Vec::new();
            for n in names {
                let path = self.file(n);
                let backing = layers.last().map(|l| l.layer.path.clone());
                layers.push(ObservedLayer {
                    layer: Layer {
                        path,
                        format: Format::Qcow2,
                        backing,
                        alloc: None,
                    },
                    version: 3,
                    cluster_size: 65536,
                    virtual_size: 1 << 30,
                    backing_ref: None,
                    backing_format: None,
                    file_size: 0,
                    in_use: None,
                    extras: Default::default(),
                });
            }
            ObservedChain { layers }
        }

        /// The spec of disk `vda` on active image `top` with `points` (name, file name).
        fn spec(&self, points: &[(&str, Option<&str>)]) -> DesiredDisk {
            let img = self.dir.path().join("img");
            let mut y = format!(
                "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: vda\nspec:\n  source:\n    file: {}\n  snapshots:{}\n",
                img.join("top").display(),
                if points.is_empty() { " []" } else { "" }
            );
            for (n, f) in points {
                y.push_str(&format!("    - name: {n}\n"));
                if let Some(f) = f {
                    y.push_str(&format!("      file: {}\n", img.join(f).display()));
                }
            }
            load_str(Path::new("/specs/vda.yaml"), &y)
                .unwrap_or_else(|e| panic!("{e}"))
                .remove(0)
        }
    }

    fn record(bindings: &[(&str, &Path, Option<&Path>)]) -> DiskState {
        DiskState {
            bindings: bindings
                .iter()
                .map(|(n, f, a)| Binding {
                    name: n.to_string(),
                    file: f.to_path_buf(),
                    adopted_from: a.map(Path::to_path_buf),
                })
                .collect(),
            ..DiskState::empty(&DiskKey::new(None, "vda"))
        }
    }

    #[test]
    fn adopted_files_are_kept_and_unbound_names_on_top_are_new_snapshots() {
        let h = Host::new();
        let chain = h.chain(&["base", "mid", "top"]);
        let spec = h.spec(&[("golden", Some("mid")), ("nightly", None)]);
        let r = bind(&spec, &chain, None, &h.roots).unwrap();
        assert_eq!(r.name, "vda");
        assert_eq!(r.keep.len(), 1);
        assert_eq!(
            (r.keep[0].name.as_str(), &r.keep[0].file),
            ("golden", &h.file("mid"))
        );
        assert_eq!(r.new_snapshots, vec!["nightly".to_string()]);
        assert_eq!(r.active, h.file("top"));
    }

    #[test]
    fn a_point_the_state_moved_is_bound_where_it_is_now() {
        let h = Host::new();
        // "golden" was adopted from mid and then committed into base; mid left the chain.
        let chain = h.chain(&["base", "top"]);
        let mid = h.file("mid");
        let spec = h.spec(&[("golden", Some("mid"))]);
        let st = record(&[("golden", &h.file("base"), Some(&mid))]);
        let r = bind(&spec, &chain, Some(&st), &h.roots).unwrap();
        assert_eq!(r.keep[0].file, h.file("base"));
        // Without the record the spec's own file is bound (and the planner finds it is not in
        // the chain).
        let r = bind(&spec, &chain, None, &h.roots).unwrap();
        assert_eq!(r.keep[0].file, mid);
    }

    #[test]
    fn a_remembered_point_whose_file_left_the_chain_is_stale_and_named() {
        let h = Host::new();
        let chain = h.chain(&["base", "top"]);
        let gone = h.file("gone");
        let spec = h.spec(&[("golden", None)]);
        let st = record(&[("golden", &gone, None)]);
        let e = bind(&spec, &chain, Some(&st), &h.roots).unwrap_err();
        assert!(matches!(e, BindError::Stale { index: 0, .. }), "{e}");
        assert!(e.is_bad_input());
        let msg = e.to_string();
        assert!(
            msg.starts_with("/specs/vda.yaml (document 1): spec.snapshots[0]"),
            "{msg}"
        );
        assert!(msg.contains(&gone.display().to_string()), "{msg}");
    }

    #[test]
    fn a_new_snapshot_below_an_existing_point_is_refused_naming_both() {
        let h = Host::new();
        let chain = h.chain(&["base", "mid", "top"]);
        let spec = h.spec(&[("fresh", None), ("golden", Some("mid"))]);
        let e = bind(&spec, &chain, None, &h.roots).unwrap_err();
        assert!(
            matches!(&e, BindError::NewBelowExisting { index: 0, point, later, .. } if point == "fresh" && later == "golden"),
            "{e}"
        );
    }

    #[test]
    fn a_layer_in_use_refuses_the_disk_naming_the_holder() {
        let h = Host::new();
        let mut chain = h.chain(&["base", "top"]);
        chain.layers[0].in_use = Some("qemu-system-x86_64 (pid 42)".into());
        let e = bind(&h.spec(&[]), &chain, None, &h.roots).unwrap_err();
        assert!(matches!(e, BindError::InUse { .. }));
        assert!(e.to_string().contains("pid 42"), "{e}");
    }

    #[test]
    fn a_file_outside_the_roots_or_missing_is_bad_input_naming_the_field() {
        let h = Host::new();
        let chain = h.chain(&["base", "top"]);
        let outside = h.dir.path().join("elsewhere.qcow2");
        std::fs::write(&outside, b"").unwrap();
        let mut spec = h.spec(&[("golden", Some("base"))]);
        spec.doc.spec.snapshots[0].file = Some(outside);
        let e = bind(&spec, &chain, None, &h.roots).unwrap_err();
        assert!(e.is_bad_input());
        assert!(e.to_string().contains("spec.snapshots[0].file"), "{e}");
        let spec = h.spec(&[("golden", Some("no-such-file"))]);
        std::fs::remove_file(h.dir.path().join("img/no-such-file")).ok();
        let e = bind(&spec, &chain, None, &h.roots).unwrap_err();
        assert!(e.is_bad_input());
        assert!(e.to_string().contains("spec.snapshots[0].file"), "{e}");
    }
}
