//! The host-wide image graph: every image file known on the host, managed or not, with an edge
//! from each overlay to its backing file.
//!
//! The graph is how the planner knows what it may write: a layer with an overlay outside a
//! disk's own chain is *shared* (another chain reads it), and so is every layer below it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::alloc::Allocation;
use crate::error::PlanError;

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// qcow2 (v2 or v3).
    Qcow2,
    /// raw: no backing file, allocation from the file's holes.
    Raw,
}

impl Format {
    /// The name QEMU uses (`-f`/`-F`).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// One observed image file.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    /// Canonical path.
    pub path: PathBuf,
    /// Format.
    pub format: Format,
    /// The backing file it records, resolved to a canonical path.
    pub backing: Option<PathBuf>,
    /// Its own allocation map. `None` for files the planner only needs as graph nodes (images
    /// found under the allowed roots that no spec manages).
    pub alloc: Option<Allocation>,
}

/// All layers known on the host, sealed after construction.
#[derive(Debug)]
pub struct ImageGraph {
    graph: DiGraph<Layer, ()>,
    index: HashMap<PathBuf, NodeIndex>,
    /// Users of a layer that are not overlays recording it as their backing file: another name
    /// for the same file (a hard link, a symlink), an external data file reference, a file whose
    /// references could not be read. Each makes the layer shared, like a foreign overlay.
    users: HashMap<PathBuf, Vec<PathBuf>>,
    /// Every name taken on the host (images or not): a new file never takes one of them.
    names: HashSet<PathBuf>,
}

impl ImageGraph {
    /// Builds the graph. A backing file that was not observed becomes a node without an
    /// allocation map (it still makes its overlays' relation visible). A cycle is refused.
    pub fn build(layers: impl IntoIterator<Item = Layer>) -> Result<ImageGraph, PlanError> {
        Self::build_with_retired(layers, &[])
    }

    /// Like [`ImageGraph::build`], but the `retired` files (dropped from a chain by an earlier
    /// plan and left in place) are known without counting as overlays: their stale backing
    /// references do not make the layers below them shared.
    pub fn build_with_retired(
        layers: impl IntoIterator<Item = Layer>,
        retired: &[PathBuf],
    ) -> Result<ImageGraph, PlanError> {
        let mut graph = DiGraph::new();
        let mut index = HashMap::new();
        let mut pending = Vec::new();
        for layer in layers {
            if let Some(&n) = index.get(&layer.path) {
                // The same file observed twice (two disks share it): keep the richer record.
                let existing: &mut Layer = &mut graph[n];
                if existing.alloc.is_none() && layer.alloc.is_some() {
                    *existing = layer;
                }
                continue;
            }
            let path = layer.path.clone();
            let n = graph.add_node(layer);
            index.insert(path, n);
        }
        for n in graph.node_indices() {
            if let Some(b) = graph[n].backing.clone()
                && !retired.contains(&graph[n].path)
            {
                pending.push((n, b));
            }
        }
        for (n, backing) in pending {
            let b = match index.get(&backing) {
                Some(&b) => b,
                None => {
                    let b = graph.add_node(Layer {
                        path: backing.clone(),
                        format: Format::Qcow2,
                        backing: None,
                        alloc: None,
                    });
                    index.insert(backing, b);
                    b
                }
            };
            graph.add_edge(n, b, ());
        }
        for scc in petgraph::algo::tarjan_scc(&graph) {
            let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
            if scc.len() > 1 || self_loop {
                let mut files: Vec<PathBuf> = scc.iter().map(|&n| graph[n].path.clone()).collect();
                files.sort();
                return Err(PlanError::Cycle { files });
            }
        }
        Ok(ImageGraph {
            graph,
            index,
            users: HashMap::new(),
            names: HashSet::new(),
        })
    }

    /// Adds users of layers that are not backing references: `(layer, user)`. Each makes its
    /// layer (and everything below it) shared.
    pub fn with_users(mut self, users: impl IntoIterator<Item = (PathBuf, PathBuf)>) -> Self {
        for (layer, user) in users {
            let v = self.users.entry(layer).or_default();
            if !v.contains(&user) {
                v.push(user);
                v.sort();
            }
        }
        self
    }

    /// Adds names taken on the host by files that are not graph nodes (non-images, symlinks).
    pub fn with_names(mut self, names: impl IntoIterator<Item = PathBuf>) -> Self {
        self.names.extend(names);
        self
    }

    /// True when `path` names an image of the graph or any other file found on the host.
    pub fn is_taken(&self, path: &Path) -> bool {
        self.index.contains_key(path) || self.names.contains(path)
    }

    /// Everything that uses `path`: overlays recording it as their backing file, then the other
    /// users (see [`ImageGraph::with_users`]).
    pub fn users_of(&self, path: &Path) -> Vec<&Path> {
        let mut v = self.overlays(path);
        if let Some(u) = self.users.get(path) {
            v.extend(u.iter().map(PathBuf::as_path));
        }
        v
    }

    /// The layer at `path`, if known.
    pub fn layer(&self, path: &Path) -> Option<&Layer> {
        self.index.get(path).map(|&n| &self.graph[n])
    }

    /// Number of files known.
    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    /// True when no file is known.
    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    /// The chain under `active`, base first, active last.
    pub fn chain(&self, active: &Path) -> Option<Vec<&Layer>> {
        let mut n = *self.index.get(active)?;
        let mut chain = vec![&self.graph[n]];
        // The graph is acyclic (checked in build), so this walk ends.
        while let Some(b) = self.graph.neighbors_directed(n, Direction::Outgoing).next() {
            chain.push(&self.graph[b]);
            n = b;
        }
        chain.reverse();
        Some(chain)
    }

    /// The overlays that record `path` as their backing file.
    pub fn overlays(&self, path: &Path) -> Vec<&Path> {
        let Some(&n) = self.index.get(path) else {
            return Vec::new();
        };
        let mut v: Vec<&Path> = self
            .graph
            .neighbors_directed(n, Direction::Incoming)
            .map(|o| self.graph[o].path.as_path())
            .collect();
        v.sort();
        v
    }

    /// For each layer of `chain` (base first), the overlay outside the chain that makes it shared,
    /// if any. Sharing is inherited downwards: whatever is below a shared layer is read by the
    /// other chain too.
    pub fn shared_along(&self, chain: &[&Layer]) -> Vec<Option<PathBuf>> {
        let mut out = vec![None; chain.len()];
        let mut inherited: Option<PathBuf> = None;
        for i in (0..chain.len()).rev() {
            let own_overlay = chain.get(i + 1).map(|l| l.path.as_path());
            let foreign = self
                .users_of(&chain[i].path)
                .into_iter()
                .find(|o| Some(*o) != own_overlay)
                .map(Path::to_path_buf);
            if inherited.is_none() {
                inherited = foreign;
            }
            out[i] = inherited.clone();
        }
        out
    }

    /// Files that no chain in `actives` uses, and that are not themselves the backing of a file
    /// that some other chain uses: candidates for pruning.
    pub fn orphans<'a>(&self, actives: impl IntoIterator<Item = &'a Path>) -> Vec<&Path> {
        let mut used = vec![false; self.graph.node_count()];
        for a in actives {
            if let Some(&start) = self.index.get(a) {
                let mut dfs = petgraph::visit::Dfs::new(&self.graph, start);
                while let Some(n) = dfs.next(&self.graph) {
                    used[n.index()] = true;
                }
            }
        }
        // Anything below an unused overlay is still used by that overlay.
        let mut below_any = vec![false; self.graph.node_count()];
        for n in self.graph.node_indices() {
            for b in self.graph.neighbors_directed(n, Direction::Outgoing) {
                below_any[b.index()] = true;
            }
        }
        let mut v: Vec<&Path> = self
            .graph
            .node_indices()
            .filter(|n| !used[n.index()] && !below_any[n.index()])
            .map(|n| self.graph[n].path.as_path())
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk(path: &str, backing: Option<&str>) -> Layer {
        Layer {
            path: path.into(),
            format: Format::Qcow2,
            backing: backing.map(Into::into),
            alloc: Some(Allocation::empty(65536, 1 << 20)),
        }
    }

    #[test]
    fn an_undeclared_overlay_makes_its_backing_and_everything_below_shared() {
        let g = ImageGraph::build(vec![
            mk("/a", None),
            mk("/b", Some("/a")),
            mk("/c", Some("/b")),
            mk("/d", Some("/c")),
            mk("/x", Some("/b")),
        ])
        .unwrap();
        let chain = g.chain(Path::new("/d")).unwrap();
        let shared = g.shared_along(&chain);
        assert_eq!(
            shared,
            vec![Some("/x".into()), Some("/x".into()), None, None]
        );
    }

    #[test]
    fn a_user_that_is_not_an_overlay_makes_the_layer_and_everything_below_shared() {
        let g = ImageGraph::build(vec![
            mk("/a", None),
            mk("/b", Some("/a")),
            mk("/c", Some("/b")),
        ])
        .unwrap()
        .with_users([(PathBuf::from("/b"), PathBuf::from("/golden-link"))]);
        let chain = g.chain(Path::new("/c")).unwrap();
        assert_eq!(
            g.shared_along(&chain),
            vec![
                Some("/golden-link".into()),
                Some("/golden-link".into()),
                None
            ]
        );
        assert_eq!(
            g.users_of(Path::new("/b")),
            vec![Path::new("/c"), Path::new("/golden-link")]
        );
    }

    #[test]
    fn a_name_taken_by_any_file_is_taken() {
        let g = ImageGraph::build(vec![mk("/a", None)])
            .unwrap()
            .with_names([PathBuf::from("/fast/l1.qcow2")]);
        assert!(g.is_taken(Path::new("/a")));
        assert!(g.is_taken(Path::new("/fast/l1.qcow2")));
        assert!(!g.is_taken(Path::new("/fast/l2.qcow2")));
    }

    #[test]
    fn a_backing_cycle_is_refused() {
        let e = ImageGraph::build(vec![mk("/a", Some("/b")), mk("/b", Some("/a"))]).unwrap_err();
        assert!(matches!(e, PlanError::Cycle { files } if files.len() == 2));
    }

    #[test]
    fn orphans_are_files_no_chain_reaches() {
        let g = ImageGraph::build(vec![
            mk("/a", None),
            mk("/b", Some("/a")),
            mk("/old", Some("/a")),
            mk("/lone", None),
        ])
        .unwrap();
        assert_eq!(
            g.orphans([Path::new("/b")]),
            vec![Path::new("/lone"), Path::new("/old")]
        );
    }
}
