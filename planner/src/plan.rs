//! Building a disk's plan: bind the kept points to layers, cut the chain into runs, pick the
//! cheapest holder per run, and lay the steps out in an order that executes bottom-up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::alloc::Allocation;
use crate::error::PlanError;
use crate::graph::{Format, ImageGraph, Layer};
use crate::search::evaluate;

/// A point the spec keeps, already bound to the file that holds it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptPoint {
    /// The point's name.
    pub name: String,
    /// The file that holds it now (canonical).
    pub file: PathBuf,
}

/// What one disk's spec asks for, with names already bound to files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskRequest {
    /// The disk's name (`metadata.name`).
    pub name: String,
    /// The active image (canonical); it stays at this path.
    pub active: PathBuf,
    /// The points to keep, oldest first.
    pub keep: Vec<KeptPoint>,
    /// Names of new snapshots to take on top, in order.
    pub new_snapshots: Vec<String>,
    /// Every backing layer must end up directly in this directory (canonical).
    pub placement: Option<PathBuf>,
    /// The placement directory exists on the active image's file system: a new point is made
    /// in it (a hard link of the active image, nothing copied) rather than beside the active
    /// image and moved there by a copy.
    pub placement_links: bool,
    /// Delete files this plan drops from the chain (when nothing else uses them).
    pub prune: bool,
    /// Names the agent knows for files (points it made earlier), for messages about removed points.
    pub known_names: BTreeMap<PathBuf, String>,
    /// Files earlier plans dropped from this chain and left in place (`prune` was off): deleted
    /// now when `prune` is on.
    pub retired: Vec<PathBuf>,
    /// What kind of chain this is and how its steps run.
    pub mode: Mode,
    /// Revert: a fresh empty active layer on the file holding this kept point; every layer above
    /// it leaves the chain (kept as files until pruned). The plan is then that step alone; the
    /// next plan does the rest.
    pub revert: Option<PathBuf>,
}

/// What kind of chain a request plans, and how its steps run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// An offline disk: its top is the active layer, which keeps its path (a file of its run may
    /// take that path over); steps run through `qemu-img` and `qemu-storage-daemon`.
    #[default]
    Offline,
    /// A disk of a running VM: steps go through libvirt's block jobs. Only the active layer can
    /// be pulled into; a commit re-points the layer above it at once; the active layer changes
    /// files (a snapshot puts a new file on top, an active commit pivots to its base, a mirror
    /// copies it elsewhere), and backing layers are never re-pointed in place.
    Live,
    /// A chain whose every layer is a point, as a backup repository is: the top is the newest
    /// point, named here, always kept, and its path holds it after the plan (as an offline
    /// disk's active image does). Steps run offline; no new snapshot is taken.
    Points {
        /// The name of the top layer's point.
        newest: String,
    },
}

impl Mode {
    /// True for a running VM's disk (libvirt's block jobs).
    pub fn is_live(&self) -> bool {
        matches!(self, Mode::Live)
    }

    /// The point the top layer holds (`None`: it is a disk's active layer).
    pub fn top_point(&self) -> Option<&str> {
        match self {
            Mode::Points { newest } => Some(newest),
            Mode::Offline | Mode::Live => None,
        }
    }
}

/// One step of a plan, with its predicted cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// What to do.
    #[serde(flatten)]
    pub action: StepAction,
    /// Data bytes the step writes.
    pub bytes: u64,
    /// Bytes written as explicit zeros (cost almost nothing; counted apart).
    pub zero_bytes: u64,
    /// Why this step is in the plan.
    pub reason: String,
}

/// The operations a plan is made of. The JSON field `op` names the variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum StepAction {
    /// The active content becomes point `point` in `file`, and `active` becomes a new empty
    /// overlay on it. Offline, `file` is new and `active` keeps its path; live, `file` is the
    /// current active image and `active` the new file on top of it.
    Snapshot {
        /// The new point's name.
        point: String,
        /// The file that will hold the point.
        file: PathBuf,
        /// The active image after the step.
        active: PathBuf,
    },
    /// Live only: copy the active layer's own data into the new file `to`, backed by `backing`
    /// (which reads the same as the active layer's current backing), and switch the disk to it
    /// (libvirt block copy, shallow, onto a prepared file, then pivot). Without `backing` the
    /// whole chain is copied.
    Mirror {
        /// The active image before the step.
        from: PathBuf,
        /// The new active image.
        to: PathBuf,
        /// Its backing file (`None`: the whole chain is copied into `to`).
        backing: Option<PathBuf>,
    },
    /// A fresh empty active layer on `to`, the file holding the point reverted to. What the
    /// active layer held is kept in `discarded` (a hard link of it, made first), so the active
    /// image keeps its path; the layers between `to` and the active leave the chain.
    Revert {
        /// The point reverted to.
        point: String,
        /// The file holding it.
        to: PathBuf,
        /// The active image (same path after).
        active: PathBuf,
        /// Where the discarded active content stays until pruned.
        discarded: PathBuf,
    },
    /// Copy into `into` the data of `layers` (the layers between `base` and `into`), then point
    /// `into` at `base` (`None`: `into` becomes the base of the chain).
    Stream {
        /// The layer written.
        into: PathBuf,
        /// Its new backing file.
        base: Option<PathBuf>,
        /// The layers whose data is pulled, base first.
        layers: Vec<PathBuf>,
    },
    /// Copy the data of `layers` (`(base, top]`) into `base`. The committed layers keep their
    /// content (`qemu-img commit -d`), so the layer above `top` still reads correctly through
    /// them until it is re-pointed at `base` (by a `rebase` step, or by the next `stream`).
    Commit {
        /// The layer written.
        base: PathBuf,
        /// The top of the committed range.
        top: PathBuf,
        /// The committed layers, base first.
        layers: Vec<PathBuf>,
    },
    /// Copy `layers` merged into the new file `to`, backed by `backing`.
    Copy {
        /// The layers read, base first.
        layers: Vec<PathBuf>,
        /// The new file.
        to: PathBuf,
        /// Its backing file.
        backing: Option<PathBuf>,
    },
    /// Change `overlay`'s backing reference to `backing`, whose content is already identical.
    Rebase {
        /// The layer whose header changes.
        overlay: PathBuf,
        /// Its new backing file.
        backing: PathBuf,
    },
    /// Offline: `holder`, which now reads exactly as the active image (the active layer was
    /// committed into it), takes the active image's path: it is given the active file's owner,
    /// mode and extended attributes, then renamed over it, and the directory is synced. The old
    /// active file's own data is in `holder`; its inode goes.
    #[serde(rename = "take-over")]
    TakeOver {
        /// The file that becomes the active image.
        holder: PathBuf,
        /// The active image's path.
        active: PathBuf,
        /// The layers that were between `holder` and the active image: they left the chain
        /// with the commit, and record `holder`'s old path as their backing file. Once `holder`
        /// has moved they are detached (no backing file), so that each still opens and checks
        /// clean with the clusters it holds.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        between: Vec<PathBuf>,
    },
    /// Remove a file no chain uses any more.
    Delete {
        /// The file.
        file: PathBuf,
    },
}

impl StepAction {
    /// The files the step writes, creates, renames or removes (matched exhaustively: a new step
    /// kind must say what it touches).
    pub fn writes(&self) -> Vec<&Path> {
        let v: Vec<&PathBuf> = match self {
            StepAction::Snapshot { file, active, .. } => vec![file, active],
            StepAction::Mirror { from, to, .. } => vec![from, to],
            StepAction::Revert {
                active, discarded, ..
            } => vec![active, discarded],
            StepAction::Stream { into, .. } => vec![into],
            StepAction::Commit { base, .. } => vec![base],
            StepAction::Copy { to, .. } => vec![to],
            StepAction::Rebase { overlay, .. } => vec![overlay],
            StepAction::TakeOver {
                holder,
                active,
                between,
            } => [holder, active].into_iter().chain(between).collect(),
            StepAction::Delete { file } => vec![file],
        };
        v.into_iter().map(PathBuf::as_path).collect()
    }

    /// The files the step only reads.
    pub fn reads(&self) -> Vec<&Path> {
        let v: Vec<&PathBuf> = match self {
            StepAction::Snapshot { .. }
            | StepAction::Delete { .. }
            | StepAction::TakeOver { .. } => {
                vec![]
            }
            StepAction::Mirror { backing, .. } => backing.iter().collect(),
            StepAction::Revert { to, .. } => vec![to],
            StepAction::Stream { base, layers, .. } => layers.iter().chain(base).collect(),
            StepAction::Commit { top, layers, .. } => layers.iter().chain([top]).collect(),
            StepAction::Copy {
                layers, backing, ..
            } => layers.iter().chain(backing).collect(),
            StepAction::Rebase { backing, .. } => vec![backing],
        };
        v.into_iter().map(PathBuf::as_path).collect()
    }

    /// True when the step itself puts another file at the active image's path (a new overlay,
    /// a holder renamed over it, a mirror's pivot).
    pub fn replaces_active(&self) -> bool {
        match self {
            StepAction::Snapshot { .. }
            | StepAction::Revert { .. }
            | StepAction::TakeOver { .. }
            | StepAction::Mirror { .. } => true,
            StepAction::Stream { .. }
            | StepAction::Commit { .. }
            | StepAction::Copy { .. }
            | StepAction::Rebase { .. }
            | StepAction::Delete { .. } => false,
        }
    }

    /// The operation's name as in the JSON `op` field.
    pub fn op(&self) -> &'static str {
        match self {
            StepAction::Snapshot { .. } => "snapshot",
            StepAction::Stream { .. } => "stream",
            StepAction::Commit { .. } => "commit",
            StepAction::Copy { .. } => "copy",
            StepAction::Rebase { .. } => "rebase",
            StepAction::Delete { .. } => "delete",
            StepAction::TakeOver { .. } => "take-over",
            StepAction::Mirror { .. } => "mirror",
            StepAction::Revert { .. } => "revert",
        }
    }
}

/// One way of handling a run, chosen or rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Alternative {
    /// In words: what would be done.
    pub strategy: String,
    /// The file that would hold the point.
    pub holder: PathBuf,
    /// Data bytes written.
    pub bytes: u64,
    /// Zero bytes written.
    pub zero_bytes: u64,
    /// Why it is not allowed (`None`: allowed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_allowed: Option<String>,
}

/// The decision for one run: the points removed below a kept point, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunDecision {
    /// The kept point above the run (`active` for the active layer).
    pub point: String,
    /// The points removed (names where known, else files), base first. Empty when the run only
    /// moves the point (placement).
    pub removes: Vec<String>,
    /// What the plan does.
    pub chosen: Alternative,
    /// What it could have done instead.
    pub rejected: Vec<Alternative>,
}

/// What simpler strategies would have cost, for comparison.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Baselines {
    /// Every run committed into its lowest layer (`None`: not allowed, e.g. shared layers).
    pub always_commit: Option<u64>,
    /// Every run streamed into its kept layer (`None`: not allowed).
    pub always_stream: Option<u64>,
}

/// A layer of the chain after the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalLayer {
    /// The point it holds (`None` for a disk's active layer).
    pub point: Option<String>,
    /// The file.
    pub file: PathBuf,
}

/// The plan for one disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiskPlan {
    /// The disk's name.
    pub name: String,
    /// The steps, in execution order.
    pub steps: Vec<Step>,
    /// Sum of the steps' data bytes.
    pub total_bytes: u64,
    /// Sum of the steps' zero bytes.
    pub total_zero_bytes: u64,
    /// The chain as observed, base first.
    pub chain: Vec<PathBuf>,
    /// The chain after the plan, base first, active last.
    pub result: Vec<FinalLayer>,
    /// Per run: what was chosen and what was rejected.
    pub decisions: Vec<RunDecision>,
    /// What simpler strategies would have cost.
    pub baselines: Baselines,
    /// Files that leave this chain and that no other chain uses: deleted by the plan when
    /// `prune` is on, otherwise left in place (the agent records them as retired).
    pub leaving: Vec<PathBuf>,
    /// Things the operator should know that are not steps.
    pub notes: Vec<String>,
}

/// Plans one disk against the host's image graph.
pub fn plan_disk(graph: &ImageGraph, req: &DiskRequest) -> Result<DiskPlan, PlanError> {
    let layers: Vec<&Layer> = graph
        .chain(&req.active)
        .ok_or_else(|| PlanError::UnknownActive {
            disk: req.name.clone(),
            active: req.active.clone(),
        })?;
    let paths: Vec<PathBuf> = layers.iter().map(|l| l.path.clone()).collect();
    if let Some(to) = &req.revert {
        return plan_revert(graph, req, &paths, to);
    }
    if let (Mode::Points { newest }, Some(name)) = (&req.mode, req.new_snapshots.first()) {
        return Err(PlanError::SnapshotOfPoints {
            disk: req.name.clone(),
            point: name.clone(),
            newest: newest.clone(),
        });
    }
    let kept = bind_kept(req, &paths)?;
    let c = Chain::new(graph, layers);
    let mut out = Emitted {
        steps: Vec::new(),
        decisions: Vec::new(),
        baselines: Baselines {
            always_commit: Some(0),
            always_stream: Some(0),
        },
        notes: Vec::new(),
        result: Vec::new(),
    };
    let (mut cur_active, taken_over) = plan_runs(graph, req, &c, &kept, &mut out)?;
    new_snapshots(graph, req, &c.paths[c.active], &mut cur_active, &mut out);
    out.result.push(FinalLayer {
        point: req.mode.top_point().map(str::to_string),
        file: cur_active,
    });
    let leaving = files_leaving(graph, req, &c, taken_over.as_ref(), &mut out);
    let Emitted {
        steps,
        decisions,
        baselines,
        notes,
        result,
    } = out;
    let total_bytes = steps.iter().map(|s| s.bytes).sum();
    let total_zero_bytes = steps.iter().map(|s| s.zero_bytes).sum();
    Ok(DiskPlan {
        name: req.name.clone(),
        steps,
        total_bytes,
        total_zero_bytes,
        chain: c.paths,
        result,
        decisions,
        baselines,
        leaving,
        notes,
    })
}

/// What the stages emit, in order.
struct Emitted {
    steps: Vec<Step>,
    decisions: Vec<RunDecision>,
    baselines: Baselines,
    notes: Vec<String>,
    /// The chain after the plan, base first (the top layer is pushed last).
    result: Vec<FinalLayer>,
}

/// Stage 1: the kept points bound to chain positions (below the active layer), oldest first.
fn bind_kept(req: &DiskRequest, paths: &[PathBuf]) -> Result<Vec<usize>, PlanError> {
    let active = paths.len() - 1;
    let mut kept: Vec<usize> = Vec::with_capacity(req.keep.len());
    for (i, k) in req.keep.iter().enumerate() {
        let Some(pos) = paths[..active].iter().position(|p| *p == k.file) else {
            return Err(PlanError::NotInChain {
                disk: req.name.clone(),
                point: k.name.clone(),
                file: k.file.clone(),
                chain: paths[..active].to_vec(),
            });
        };
        if let Some(&prev) = kept.last()
            && pos <= prev
        {
            return Err(PlanError::OutOfOrder {
                disk: req.name.clone(),
                earlier: req.keep[i - 1].name.clone(),
                later: k.name.clone(),
            });
        }
        kept.push(pos);
    }

    Ok(kept)
}

/// The chain as the search sees it: each layer's allocation in one unit (the finest cluster
/// size of its layers), clipped to what any view above reads, and who else uses each layer.
struct Chain<'a> {
    layers: Vec<&'a Layer>,
    paths: Vec<PathBuf>,
    active: usize,
    /// Each layer's virtual size.
    sizes: Vec<u64>,
    allocs: Vec<Allocation>,
    /// How many units wide each layer's clusters are.
    grain: Vec<u64>,
    unit: u64,
    /// The largest virtual size.
    size: u64,
    /// Per layer: another user (an overlay outside this chain, another name), if any.
    shared: Vec<Option<PathBuf>>,
    nonzero: Vec<roaring::RoaringTreemap>,
}

/// True when `p` lies where `spec.placement` wants points (anywhere without one).
fn in_placement(req: &DiskRequest, p: &Path) -> bool {
    match &req.placement {
        Some(d) => p.parent() == Some(d.as_path()),
        None => true,
    }
}

impl<'a> Chain<'a> {
    /// What messages call layer `i`: the point's name the agent knows, or its path.
    fn name_of(&self, req: &DiskRequest, i: usize) -> String {
        req.known_names
            .get(&self.paths[i])
            .cloned()
            .unwrap_or_else(|| self.paths[i].display().to_string())
    }

    /// Stage 2: the chain's allocations in one unit, and its sharing.
    fn new(graph: &ImageGraph, chain: Vec<&'a Layer>) -> Chain<'a> {
        let empty = Allocation::empty(65536, 0);
        let raw_allocs: Vec<&Allocation> = chain
            .iter()
            .map(|l| l.alloc.as_ref().unwrap_or(&empty))
            .collect();
        let unit = raw_allocs
            .iter()
            .map(|a| a.unit)
            .filter(|&u| u > 0)
            .min()
            .unwrap_or(65536);
        let size = raw_allocs.iter().map(|a| a.virtual_size).max().unwrap_or(0);
        // How many units wide each layer's clusters are (QEMU writes qcow2 files in whole clusters;
        // a raw file is written in place).
        let grain: Vec<u64> = chain
            .iter()
            .zip(&raw_allocs)
            .map(|(l, a)| match l.format {
                Format::Qcow2 => (a.unit / unit).max(1),
                Format::Raw => 1,
            })
            .collect();
        // A layer's data past the size of every layer above it is read by no view: no step copies
        // it (a stream into a smaller point reads only up to the point's size).
        let mut limit = u64::MAX;
        let mut limits = vec![0u64; raw_allocs.len()];
        for i in (0..raw_allocs.len()).rev() {
            limit = limit.min(raw_allocs[i].virtual_size);
            limits[i] = limit;
        }
        let allocs: Vec<Allocation> = raw_allocs
            .iter()
            .zip(&limits)
            .map(|(a, &l)| a.rescaled(unit).clipped(l))
            .collect();
        let shared = graph.shared_along(&chain);
        let nonzero = nonzero_views(&allocs, shared.iter().any(Option::is_some));

        Chain {
            paths: chain.iter().map(|l| l.path.clone()).collect(),
            active: chain.len() - 1,
            sizes: raw_allocs.iter().map(|a| a.virtual_size).collect(),
            layers: chain,
            allocs,
            grain,
            unit,
            size,
            shared,
            nonzero,
        }
    }
}

/// Stage 3: the runs of layers to remove between kept points (the active layer's run last),
/// for each the cheapest allowed holder among its alternatives, and the steps that carry it out,
/// bottom-up. Returns the active image's file after them (live, it moves) and the layer that
/// took the active image's path (offline), if one did.
fn plan_runs(
    graph: &ImageGraph,
    req: &DiskRequest,
    ch: &Chain<'_>,
    kept: &[usize],
    out: &mut Emitted,
) -> Result<(PathBuf, Option<PathBuf>), PlanError> {
    let (paths, active, allocs, grain, unit, size, shared) = (
        &ch.paths, ch.active, &ch.allocs, &ch.grain, ch.unit, ch.size, &ch.shared,
    );
    let Emitted {
        steps,
        decisions,
        baselines,
        result,
        ..
    } = out;
    let name_of = |i: usize| ch.name_of(req, i);
    let in_dir = |p: &Path| in_placement(req, p);

    let mut prev: Option<usize> = None; // chain position of the previous kept point
    let mut prev_holder: Option<PathBuf> = None; // the file holding it now
    // Where the walk is (`stale`: the layer above the previous holder still records the previous
    // point's old file as its backing, so the next write above must re-point it; a stream does so
    // by itself, reading through the old files, whose content commits and copies leave in place).
    let mut walk = Walk {
        stale: false,
        chain_below: None,
        cur_active: paths[active].clone(),
        taken_over: None,
    };
    let mut tops: Vec<(usize, String)> = kept
        .iter()
        .zip(&req.keep)
        .map(|(&p, k)| (p, k.name.clone()))
        .collect();
    tops.push((active, "active".to_string()));

    for (u, point) in tops {
        let lo = prev.map_or(0, |p| p + 1);
        let run: Vec<usize> = (lo..=u).collect();
        let removes: Vec<String> = run[..run.len() - 1].iter().map(|&i| name_of(i)).collect();
        let is_active = u == active;
        // Live, a backing layer cannot be re-pointed in place: once a point below moved to a
        // copy, every point above moves too, and the active layer is mirrored onto them.
        let must_move = !is_active && (!in_dir(&paths[u]) || (req.mode.is_live() && walk.stale));
        let live_mirror = req.mode.is_live()
            && is_active
            && (walk.stale || (req.placement.is_some() && !in_dir(&paths[u])));
        let base = prev_holder.clone();
        let blocked = |layer: usize, removing: Vec<String>| PlanError::BlockedByShared {
            disk: req.name.clone(),
            point: point.clone(),
            removing,
            blocker: paths[layer].clone(),
            used_by: shared[layer]
                .clone()
                .unwrap_or_else(|| paths[layer].clone()),
        };
        if removes.is_empty() && !must_move && !live_mirror {
            if walk.stale {
                if shared[u].is_some() {
                    return Err(blocked(u, vec![name_of(u)]));
                }
                steps.push(rebase_step(
                    &paths[u],
                    base.as_deref().expect("stale implies a holder below"),
                ));
            }
            walk.stale = false;
            if !is_active {
                result.push(FinalLayer {
                    point: Some(point.clone()),
                    file: paths[u].clone(),
                });
            }
            prev = Some(u);
            prev_holder = Some(paths[u].clone());
            walk.chain_below = Some(paths[u].clone());
            continue;
        }
        let layers: Vec<&Allocation> = run.iter().map(|&i| &allocs[i]).collect();
        let grains: Vec<u64> = run.iter().map(|&i| grain[i]).collect();
        let costs = evaluate(&layers, &grains, unit, size, false);
        let mut alts = alternatives(
            graph,
            req,
            ch,
            kept,
            &Run {
                u,
                point: &point,
                run: &run,
                live_mirror,
                stale: walk.stale,
                pulls: base.is_some() && !removes.is_empty(),
            },
            &costs,
        );
        // Baselines: commit into the lowest layer of the run; stream into its top.
        let lowest_ok = alts
            .iter()
            .find(|(a, _)| a.holder == paths[run[0]])
            .filter(|(a, _)| a.not_allowed.is_none());
        let top_ok = alts
            .iter()
            .find(|(a, _)| a.holder == paths[u])
            .filter(|(a, _)| a.not_allowed.is_none());
        let fallback_copy = alts
            .iter()
            .find(|(_, c)| matches!(c, Some(Choice::Copy(_))));
        let add = |b: &mut Option<u64>, a: Option<&(Alternative, Option<Choice>)>| {
            *b = match (*b, a) {
                (Some(t), Some((alt, _))) => Some(t + alt.bytes),
                _ => None,
            };
        };
        // Committing down (libvirt's `blockcommit --active --pivot`, or offline the layer right
        // below taking over the active path) where that is possible; else streaming.
        add(
            &mut baselines.always_commit,
            if is_active {
                lowest_ok.or(top_ok)
            } else {
                lowest_ok.or(fallback_copy)
            },
        );
        add(&mut baselines.always_stream, top_ok.or(fallback_copy));

        // The cheapest allowed; ties go to the first listed (the kept layer itself, then higher
        // layers), so a point moves files only when that saves bytes.
        let best = alts
            .iter()
            .enumerate()
            .filter(|(_, (a, c))| a.not_allowed.is_none() && c.is_some())
            .min_by_key(|(i, (a, _))| (a.bytes, a.zero_bytes, *i))
            .map(|(i, _)| i);
        let Some(best) = best else {
            let h = run
                .iter()
                .rev()
                .copied()
                .find(|&h| shared[h].is_some())
                .unwrap_or(u);
            return Err(blocked(h, removes));
        };
        let (chosen, choice) = alts.remove(best);
        let choice = choice.expect("filtered to allowed choices");
        let holder_file = emit(
            req,
            ch,
            &Run {
                u,
                point: &point,
                run: &run,
                live_mirror,
                stale: walk.stale,
                pulls: base.is_some() && !removes.is_empty(),
            },
            &base,
            &costs,
            choice,
            &mut walk,
            steps,
        );
        decisions.push(RunDecision {
            point: point.clone(),
            removes,
            chosen,
            rejected: alts.into_iter().map(|(a, _)| a).collect(),
        });
        if !is_active {
            result.push(FinalLayer {
                point: Some(point),
                file: holder_file.clone(),
            });
        }
        prev = Some(u);
        prev_holder = Some(holder_file);
    }

    Ok((walk.cur_active, walk.taken_over))
}

/// One run of layers to remove, ending at the kept layer `u` (the active one for the last run).
struct Run<'a> {
    /// The kept layer (chain position) the run ends at.
    u: usize,
    /// Its point's name (`active` for the active run).
    point: &'a str,
    /// The run's chain positions, base first, `u` last.
    run: &'a [usize],
    /// Live: the active layer must be mirrored (placement, or the points below moved to copies).
    live_mirror: bool,
    /// The layer above the previous holder still records the previous point's old file.
    stale: bool,
    /// A mirror first pulls the run's removed layers into the active layer.
    pulls: bool,
}

/// Stage 3a: every way to handle `r`, allowed or not (and why not), in the order ties are broken
/// (the kept layer itself first, then lower layers, then a mirror or a copy).
fn alternatives(
    graph: &ImageGraph,
    req: &DiskRequest,
    ch: &Chain<'_>,
    kept: &[usize],
    r: &Run<'_>,
    costs: &crate::search::RunCosts,
) -> Vec<(Alternative, Option<Choice>)> {
    let (paths, shared, nonzero, active) = (&ch.paths, &ch.shared, &ch.nonzero, ch.active);
    let (u, point, run, live_mirror, stale) = (r.u, r.point, r.run, r.live_mirror, r.stale);
    let is_active = u == active;
    let name_of = |i: usize| ch.name_of(req, i);
    let in_dir = |p: &Path| in_placement(req, p);
    let mut alts: Vec<(Alternative, Option<Choice>)> = Vec::new();
    for (k, &h) in run.iter().enumerate().rev() {
        // Offline, any layer of the active run may hold it and then take the active
        // image's path (a rename: same directory, so the same file system and the same
        // meaning of a relative backing name), when the active file has no other user. The
        // layers between it and the active one leave the chain (the holder is unshared, so
        // nothing else reads through them); once retired they record a backing file that no
        // longer exists, like any layer whose base was written by a commit they no longer
        // read as before.
        let takes_over = is_active
            && h < u
            && !req.mode.is_live()
            && ch.layers[h].format == Format::Qcow2
            && paths[h].parent() == paths[u].parent()
            && shared[u].is_none();
        if is_active && h != u && (live_mirror || (!req.mode.is_live() && !takes_over)) {
            continue;
        }
        let c = &costs.holders[k];
        let strategy = if h == u {
            if is_active {
                "stream into the active layer".to_string()
            } else {
                format!("stream into {point}")
            }
        } else if takes_over && k == 0 {
            format!(
                "commit the active layer into {}, which then takes the active image's path",
                name_of(h)
            )
        } else if takes_over {
            format!(
                "commit the active layer into {}, stream below it, then it takes the active image's path",
                name_of(h)
            )
        } else if is_active && k == 0 {
            format!(
                "commit the active layer into {} and pivot to it",
                name_of(h)
            )
        } else if is_active {
            format!(
                "commit the active layer into {} and pivot to it, then pull below it",
                name_of(h)
            )
        } else if k == 0 {
            format!("commit into {}", name_of(h))
        } else {
            format!("commit into {}, then stream below it", name_of(h))
        };
        let not_allowed = if let Some(user) = &shared[h] {
            Some(format!(
                "{} is shared: {} uses it",
                paths[h].display(),
                user.display()
            ))
        } else if h != u && ch.sizes[h] != ch.sizes[u] {
            // The holder's size becomes the point's: a larger base would show its old data
            // past the point's end.
            Some(format!(
                "{} is {} bytes, the point {} bytes: the point would change size",
                paths[h].display(),
                ch.sizes[h],
                ch.sizes[u]
            ))
        } else if !in_dir(&paths[h]) && !is_active {
            Some(format!(
                "{} is outside spec.placement.directory",
                paths[h].display()
            ))
        } else if live_mirror {
            Some(
                "the active layer must move (spec.placement, or the points below moved to copies)"
                    .to_string(),
            )
        } else if req.mode.is_live() && !is_active && k != 0 {
            Some("on a running VM libvirt pulls only into the active layer".to_string())
        } else if req.mode.is_live() && !is_active && stale {
            Some(
                "the point below moved to a copy, and a running VM's backing layer cannot be re-pointed in place"
                    .to_string(),
            )
        } else {
            None
        };
        // A shared layer may still hold the point when the rest of the run adds nothing to
        // its view (no data on top, zeros only where it reads zeros): then no data moves,
        // only a backing reference above it changes.
        let identity = !is_active
            && !req.mode.is_live()
            && k == 0
            && ch.sizes[h] == ch.sizes[u]
            && h != u
            && not_allowed.is_some()
            && shared[h].is_some()
            && in_dir(&paths[h])
            && !stale
            && costs.holders[0].commit_bytes == 0
            && (&costs.zeros_above_lowest & &nonzero[h]).is_empty()
            // Whatever lies above must be able to read through `h`: either its overlay can
            // be rebased, or that overlay is removed by the next run's stream anyway.
            && (shared[u + 1].is_none() || !(kept.contains(&(u + 1)) || u + 1 == active));
        if identity {
            alts.push((
                Alternative {
                    strategy: format!(
                        "keep {}: the layers above it add nothing to its view",
                        name_of(h)
                    ),
                    holder: paths[h].clone(),
                    bytes: 0,
                    zero_bytes: 0,
                    not_allowed: None,
                },
                Some(Choice::Identity),
            ));
        }
        let choice = not_allowed.is_none().then_some(Choice::Hold(k));
        alts.push((
            Alternative {
                strategy,
                holder: paths[h].clone(),
                bytes: c.bytes(),
                zero_bytes: c.zero_bytes(),
                not_allowed,
            },
            choice,
        ));
    }
    if live_mirror {
        let dir = req
            .placement
            .clone()
            .or_else(|| paths[u].parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let to = graph_free_name(graph, &dir, &paths[u]);
        let pull = if r.pulls {
            costs.holders[run.len() - 1].clone()
        } else {
            crate::search::Cost::default()
        };
        alts.push((
            Alternative {
                strategy: format!("mirror the active layer into {}", dir.display()),
                holder: to.clone(),
                bytes: pull.bytes() + costs.copy.bytes(),
                zero_bytes: pull.zero_bytes() + costs.copy.zero_bytes(),
                not_allowed: None,
            },
            Some(Choice::Mirror(to)),
        ));
    }
    if let (Some(dir), false) = (&req.placement, is_active) {
        let to = graph_free_name(graph, dir, &paths[u]);
        alts.push((
            Alternative {
                strategy: format!("copy merged into {}", dir.display()),
                holder: to.clone(),
                bytes: costs.copy.bytes(),
                zero_bytes: costs.copy.zero_bytes(),
                not_allowed: None,
            },
            Some(Choice::Copy(to)),
        ));
    }
    alts
}

/// Where the walk up the chain is between runs (see `plan_runs`).
struct Walk {
    /// The layer above the previous holder still records the previous point's old file.
    stale: bool,
    /// Live: the file directly below the next run in the running chain.
    chain_below: Option<PathBuf>,
    /// The active image's file.
    cur_active: PathBuf,
    /// The layer that took the active image's path (offline), if one did.
    taken_over: Option<PathBuf>,
}

/// Stage 3b: the steps that carry out `choice` for run `r` (below it, the previous point is held
/// by `base`). Returns the file that holds the run's point after them.
#[allow(clippy::too_many_arguments)]
fn emit(
    req: &DiskRequest,
    ch: &Chain<'_>,
    r: &Run<'_>,
    base: &Option<PathBuf>,
    costs: &crate::search::RunCosts,
    choice: Choice,
    walk: &mut Walk,
    steps: &mut Vec<Step>,
) -> PathBuf {
    let (paths, u, run, point) = (&ch.paths, r.u, r.run, r.point);
    let lo = run[0];
    let is_active = u == ch.active;
    let what = if is_active {
        "the active layer".to_string()
    } else {
        format!("point {point:?}")
    };
    let Walk {
        stale,
        chain_below,
        cur_active,
        taken_over,
    } = walk;
    match choice {
        Choice::Hold(k) => {
            let c = &costs.holders[k];
            let h = run[k];
            if h != u {
                steps.push(Step {
                    action: StepAction::Commit {
                        base: paths[h].clone(),
                        top: paths[u].clone(),
                        layers: paths[h + 1..=u].to_vec(),
                    },
                    bytes: c.commit_bytes,
                    zero_bytes: c.commit_zero,
                    reason: format!("{} now holds {what}", paths[h].display()),
                });
            }
            if k > 0 {
                steps.push(Step {
                    action: StepAction::Stream {
                        into: paths[h].clone(),
                        base: base.clone(),
                        layers: paths[lo..h].to_vec(),
                    },
                    bytes: c.stream_bytes,
                    zero_bytes: c.stream_zero,
                    reason: format!("pull the removed layers into {what}"),
                });
            } else if let (true, Some(b)) = (*stale, base) {
                steps.push(rebase_step(&paths[h], b));
            }
            // Offline, the layer above `u` still records `u` until re-pointed; a live
            // commit re-points it when the job completes.
            *stale = h != u && !req.mode.is_live();
            if is_active && h != u && !req.mode.is_live() {
                // The holder takes the active image's path: nothing above records it.
                steps.push(Step {
                    action: StepAction::TakeOver {
                        holder: paths[h].clone(),
                        active: paths[u].clone(),
                        between: paths[h + 1..u].to_vec(),
                    },
                    bytes: 0,
                    zero_bytes: 0,
                    reason: format!(
                        "{} reads as the active image and takes its path ({} with the old active file's owner, mode and attributes): committing {} wrote less than streaming into the active layer",
                        paths[h].display(),
                        paths[u].display(),
                        paths[u].display()
                    ),
                });
                *taken_over = Some(paths[h].clone());
                *stale = false;
                *chain_below = Some(paths[u].clone());
                paths[u].clone()
            } else {
                if is_active {
                    *cur_active = paths[h].clone();
                }
                *chain_below = Some(paths[h].clone());
                paths[h].clone()
            }
        }
        Choice::Mirror(to) => {
            if r.pulls {
                let c = &costs.holders[run.len() - 1];
                steps.push(Step {
                    action: StepAction::Stream {
                        into: paths[u].clone(),
                        base: chain_below.clone(),
                        layers: paths[lo..u].to_vec(),
                    },
                    bytes: c.stream_bytes,
                    zero_bytes: c.stream_zero,
                    reason: "pull the removed layers into the active layer".into(),
                });
            }
            steps.push(Step {
                action: StepAction::Mirror {
                    from: paths[u].clone(),
                    to: to.clone(),
                    backing: base.clone(),
                },
                bytes: costs.copy.bytes(),
                zero_bytes: costs.copy.zero_bytes(),
                reason: match base {
                    Some(b) => format!(
                        "the active layer moves onto {} (libvirt block copy, then pivot)",
                        b.display()
                    ),
                    None => "the whole chain is copied into the active layer's new file (libvirt block copy, then pivot)".into(),
                },
            });
            *stale = false;
            *cur_active = to.clone();
            *chain_below = Some(to.clone());
            to
        }
        Choice::Identity => {
            // Nothing moves: the layer above the run re-points to `h` with the next write.
            *stale = true;
            *chain_below = Some(paths[u].clone());
            paths[run[0]].clone()
        }
        Choice::Copy(to) => {
            steps.push(Step {
                action: StepAction::Copy {
                    layers: paths[lo..=u].to_vec(),
                    to: to.clone(),
                    backing: base.clone(),
                },
                bytes: costs.copy.bytes(),
                zero_bytes: costs.copy.zero_bytes(),
                reason: format!("point {point:?} moves into spec.placement.directory"),
            });
            *stale = true;
            *chain_below = Some(paths[u].clone());
            to
        }
    }
}

/// Stage 4: the new snapshots on top, in order. Live, the active image becomes the point and a
/// new file goes on top; offline, the active content moves to a new file beside it.
fn new_snapshots(
    graph: &ImageGraph,
    req: &DiskRequest,
    active_path: &Path,
    cur_active: &mut PathBuf,
    out: &mut Emitted,
) {
    let Emitted { steps, result, .. } = out;
    if req.mode.is_live() {
        // Live, the active image becomes the point and a new file goes on top of it.
        for name in &req.new_snapshots {
            let dir = req
                .placement
                .clone()
                .or_else(|| cur_active.parent().map(Path::to_path_buf))
                .unwrap_or_default();
            let next = graph_free_name(
                graph,
                &dir,
                &PathBuf::from(format!("{}.after-{name}.qcow2", req.name)),
            );
            steps.push(Step {
                action: StepAction::Snapshot {
                    point: name.clone(),
                    file: cur_active.clone(),
                    active: next.clone(),
                },
                bytes: 0,
                zero_bytes: 0,
                reason: format!(
                    "take the new point {name:?}: {} holds it, {} becomes the active layer",
                    cur_active.display(),
                    next.display()
                ),
            });
            result.push(FinalLayer {
                point: Some(name.clone()),
                file: cur_active.clone(),
            });
            *cur_active = next;
        }
    }
    for name in req.new_snapshots.iter().filter(|_| !req.mode.is_live()) {
        // The snapshot is a hard link of the active image: in the placement directory when it
        // is on the same file system (nothing to move later), else beside the active image (the
        // next plan copies the new point into the placement directory).
        let dir = req
            .placement
            .clone()
            .filter(|_| req.placement_links)
            .or_else(|| active_path.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let stem = active_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = graph_free_name(graph, &dir, &PathBuf::from(format!("{stem}.{name}.qcow2")));
        steps.push(Step {
            action: StepAction::Snapshot {
                point: name.clone(),
                file: file.clone(),
                active: active_path.to_path_buf(),
            },
            bytes: 0,
            zero_bytes: 0,
            reason: format!(
                "take the new point {name:?}: the active content moves to {}",
                file.display()
            ),
        });
        result.push(FinalLayer {
            point: Some(name.clone()),
            file,
        });
    }
}

/// Stage 5: the files leaving the chain (deleted with `prune`, noted otherwise), files earlier
/// plans left that `prune` may now delete, and what stays outside the placement directory.
/// Returns the files leaving that nothing else uses.
fn files_leaving(
    graph: &ImageGraph,
    req: &DiskRequest,
    c: &Chain<'_>,
    taken_over: Option<&PathBuf>,
    out: &mut Emitted,
) -> Vec<PathBuf> {
    let (paths, shared, active_path) = (&c.paths, &c.shared, &c.paths[c.active]);
    let Emitted {
        steps,
        notes,
        result,
        ..
    } = out;
    let kept_files: Vec<&PathBuf> = result.iter().map(|f| &f.file).collect();
    let mut leaving = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        if kept_files.contains(&p) || taken_over == Some(p) {
            continue;
        }
        if shared[i].is_none() {
            leaving.push(p.clone());
        }
        if let Some(user) = &shared[i] {
            notes.push(format!(
                "{} leaves this chain but stays: {} still uses it",
                p.display(),
                user.display()
            ));
        } else if req.prune {
            steps.push(Step {
                action: StepAction::Delete { file: p.clone() },
                bytes: 0,
                zero_bytes: 0,
                reason: "no chain uses it any more (spec.prune)".into(),
            });
        } else {
            notes.push(format!(
                "{} leaves this chain and is kept (spec.prune is false)",
                p.display()
            ));
        }
    }
    if req.prune {
        for r in &req.retired {
            if kept_files.contains(&r) || paths.contains(r) || graph.layer(r).is_none() {
                continue;
            }
            let users = graph.users_of(r);
            if users.is_empty() {
                steps.push(Step {
                    action: StepAction::Delete { file: r.clone() },
                    bytes: 0,
                    zero_bytes: 0,
                    reason: "an earlier plan dropped it; no chain uses it (spec.prune)".into(),
                });
            } else {
                notes.push(format!(
                    "{} was dropped earlier but {} uses it: kept",
                    r.display(),
                    users[0].display()
                ));
            }
        }
    }
    if let Some(dir) = &req.placement
        && !req.mode.is_live()
        && active_path.parent() != Some(dir.as_path())
    {
        notes.push(format!(
            "the active layer stays at {} (spec.source.file), outside spec.placement.directory",
            active_path.display()
        ));
    }

    leaving
}

/// The plan of a revert: one step, a fresh active layer on `to`.
fn plan_revert(
    graph: &ImageGraph,
    req: &DiskRequest,
    paths: &[PathBuf],
    to: &Path,
) -> Result<DiskPlan, PlanError> {
    let active = paths.len() - 1;
    let Some(pos) = paths[..active].iter().position(|p| p == to) else {
        return Err(PlanError::NotInChain {
            disk: req.name.clone(),
            point: "spec.revert.to".into(),
            file: to.to_path_buf(),
            chain: paths[..active].to_vec(),
        });
    };
    let point = req
        .keep
        .iter()
        .find(|k| k.file == to)
        .map(|k| k.name.clone())
        .unwrap_or_else(|| to.display().to_string());
    let above: Vec<String> = req
        .keep
        .iter()
        .filter(|k| paths[pos + 1..active].contains(&k.file))
        .map(|k| k.name.clone())
        .collect();
    if !above.is_empty() {
        return Err(PlanError::RevertDropsPoints {
            disk: req.name.clone(),
            point,
            above,
        });
    }
    let a = &paths[active];
    let dir = a.parent().map(Path::to_path_buf).unwrap_or_default();
    let stem = a
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let discarded = graph_free_name(
        graph,
        &dir,
        &PathBuf::from(format!("{stem}.reverted.qcow2")),
    );
    let mut result: Vec<FinalLayer> = paths[..=pos]
        .iter()
        .map(|p| FinalLayer {
            point: req
                .keep
                .iter()
                .find(|k| &k.file == p)
                .map(|k| k.name.clone()),
            file: p.clone(),
        })
        .collect();
    result.push(FinalLayer {
        point: None,
        file: a.clone(),
    });
    let shared = graph.shared_along(&graph.chain(a).unwrap_or_default());
    // The active image keeps its path but gets new content: whoever else reads it (an overlay,
    // another name) would see its view change.
    if let Some(Some(user)) = shared.get(active) {
        return Err(PlanError::RevertSharedActive {
            disk: req.name.clone(),
            active: a.clone(),
            used_by: user.clone(),
        });
    }
    let mut leaving: Vec<PathBuf> = (pos + 1..active)
        .filter(|&i| shared.get(i).is_none_or(Option::is_none))
        .map(|i| paths[i].clone())
        .collect();
    leaving.push(discarded.clone());
    let notes = vec![format!(
        "the active content is kept in {} until pruned; the layers above {point:?} leave the chain",
        discarded.display()
    )];
    Ok(DiskPlan {
        name: req.name.clone(),
        steps: vec![Step {
            action: StepAction::Revert {
                point: point.clone(),
                to: to.to_path_buf(),
                active: a.clone(),
                discarded: discarded.clone(),
            },
            bytes: 0,
            zero_bytes: 0,
            reason: format!("spec.revert: a fresh active layer on {point:?}"),
        }],
        total_bytes: 0,
        total_zero_bytes: 0,
        chain: paths.to_vec(),
        result,
        decisions: Vec::new(),
        baselines: Baselines::default(),
        leaving,
        notes,
    })
}

enum Choice {
    /// Hold the point in the run's layer at this index.
    Hold(usize),
    /// Live: pull the run into the active layer, then mirror it into this new file.
    Mirror(PathBuf),
    /// Copy the run merged into this new file.
    Copy(PathBuf),
    /// The run's lowest layer already reads as the point: drop the layers above it.
    Identity,
}

/// Per chain position: the clusters whose guest view is not zero (only needed, and only
/// computed, when some layer is shared).
fn nonzero_views(allocs: &[Allocation], needed: bool) -> Vec<roaring::RoaringTreemap> {
    let mut nonzero = roaring::RoaringTreemap::new();
    let mut out = Vec::with_capacity(allocs.len());
    for a in allocs {
        nonzero -= &a.zero;
        nonzero |= &a.data;
        out.push(if needed {
            nonzero.clone()
        } else {
            roaring::RoaringTreemap::new()
        });
    }
    out
}

/// A free file name in `dir` for a copy of `like`: its base name, or with `-N` appended.
fn graph_free_name(graph: &ImageGraph, dir: &Path, like: &Path) -> PathBuf {
    let file = like
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut candidate = dir.join(&file);
    let mut n = 1;
    while graph.is_taken(&candidate) {
        let (stem, ext) = match file.rsplit_once('.') {
            Some((s, e)) => (s.to_string(), format!(".{e}")),
            None => (file.clone(), String::new()),
        };
        candidate = dir.join(format!("{stem}-{n}{ext}"));
        n += 1;
    }
    candidate
}

/// Re-points `overlay` at `backing`, whose content it already reads through the old files.
fn rebase_step(overlay: &Path, backing: &Path) -> Step {
    Step {
        action: StepAction::Rebase {
            overlay: overlay.to_path_buf(),
            backing: backing.to_path_buf(),
        },
        bytes: 0,
        zero_bytes: 0,
        reason: format!(
            "{} reads the same through {}",
            overlay.display(),
            backing.display()
        ),
    }
}
