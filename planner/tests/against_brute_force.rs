//! The planner against a brute-force search over step sequences on random chains of up to 8
//! layers: the plan's total equals the true minimum, its steps replayed on the cell model reach
//! the goal at exactly the predicted cost, and it is never worse than "always commit" or
//! "always stream". Where no plan exists, the planner says which shared layer blocks it.

use std::path::PathBuf;

use diskchain_planner::{
    Allocation, DiskRequest, Format, ImageGraph, KeptPoint, Layer, Mode, PlanError, StepAction,
    plan_disk,
};
use diskchain_tests::oracle::{Cell, Problem, State, is_goal, min_cost};
use proptest::prelude::*;

fn path(i: usize) -> PathBuf {
    PathBuf::from(format!("/img/l{i}.qcow2"))
}

fn problem() -> impl Strategy<Value = Problem> {
    (2usize..=8, 1usize..=10).prop_flat_map(|(n, clusters)| {
        let cell = prop_oneof![5 => Just(0u8), 3 => Just(1u8), 2 => Just(2u8)];
        (
            proptest::collection::vec(proptest::collection::vec(cell, clusters), n),
            0usize..n, // number of shared layers at the bottom
            proptest::collection::vec(any::<bool>(), n - 1), // which points are kept
        )
            .prop_map(move |(raw, shared_count, keep_mask)| {
                let mut id = 0;
                let layers = raw
                    .into_iter()
                    .map(|l| {
                        l.into_iter()
                            .map(|c| match c {
                                0 => Cell::U,
                                1 => {
                                    id += 1;
                                    Cell::D(id)
                                }
                                _ => Cell::Z,
                            })
                            .collect()
                    })
                    .collect();
                let shared = (0..n).map(|i| i < shared_count).collect();
                let keep = keep_mask
                    .iter()
                    .enumerate()
                    .filter(|(_, k)| **k)
                    .map(|(i, _)| i)
                    .collect();
                Problem {
                    layers,
                    shared,
                    keep,
                }
            })
    })
}

fn graph_of(p: &Problem) -> ImageGraph {
    let n = p.layers.len();
    let mut layers: Vec<Layer> = p
        .layers
        .iter()
        .enumerate()
        .map(|(i, cells)| {
            let mut a = Allocation::empty(1, cells.len() as u64);
            for (c, cell) in cells.iter().enumerate() {
                match cell {
                    Cell::D(_) => {
                        a.data.insert(c as u64);
                    }
                    Cell::Z => {
                        a.zero.insert(c as u64);
                    }
                    Cell::U => {}
                }
            }
            Layer {
                path: path(i),
                format: Format::Qcow2,
                backing: (i > 0).then(|| path(i - 1)),
                alloc: Some(a),
            }
        })
        .collect();
    // Sharing comes from an overlay that no spec declares, on the top-most shared layer.
    if let Some(top_shared) = (0..n).rev().find(|&i| p.shared[i]) {
        layers.push(Layer {
            path: PathBuf::from("/img/other-disk.qcow2"),
            format: Format::Qcow2,
            backing: Some(path(top_shared)),
            alloc: None,
        });
    }
    ImageGraph::build(layers).unwrap()
}

fn request(p: &Problem) -> DiskRequest {
    DiskRequest {
        name: "disk".into(),
        active: path(p.layers.len() - 1),
        keep: p
            .keep
            .iter()
            .map(|&k| KeptPoint {
                name: format!("p{k}"),
                file: path(k),
            })
            .collect(),
        ..Default::default()
    }
}

fn orig(p: &std::path::Path) -> usize {
    let s = p.to_string_lossy();
    s.trim_start_matches("/img/l")
        .trim_end_matches(".qcow2")
        .parse()
        .unwrap()
}

/// Drops the files between chain position `base` (None: the bottom) and `first`, checking that
/// `first` reads the same without them (what re-pointing a stale backing reference needs).
fn drop_between(s: &mut State, base: Option<usize>, first: usize) -> Result<usize, TestCaseError> {
    let lo = base.map_or(0, |b| b + 1);
    prop_assert!(lo <= first, "base above the first layer");
    if lo < first {
        let before = s.view(first);
        s.files.drain(lo..first);
        prop_assert_eq!(s.view(lo), before, "dropping stale layers changes a view");
    }
    Ok(lo)
}

/// Replays a plan's steps on the cell model, checking each step's predicted cost and that no
/// shared layer is written. `id_of` maps a file to its model id; copies get ids from 100.
fn replay(
    p: &Problem,
    plan: &diskchain_planner::DiskPlan,
    id_of: &dyn Fn(&std::path::Path) -> Option<usize>,
) -> Result<State, TestCaseError> {
    let mut s = State::of(p);
    let mut copies: Vec<(PathBuf, usize)> = Vec::new();
    let id = |f: &std::path::Path, copies: &[(PathBuf, usize)]| -> usize {
        copies
            .iter()
            .find(|(c, _)| c == f)
            .map(|(_, id)| *id)
            .or_else(|| id_of(f))
            .expect("known file")
    };
    let shared = |i: usize| i < 100 && p.shared[i];
    for step in &plan.steps {
        let cost = match &step.action {
            StepAction::Commit { base, top, layers } => {
                prop_assert!(!shared(id(base, &copies)), "wrote shared {base:?}");
                let (b, t) = (
                    s.pos(id(base, &copies)).unwrap(),
                    s.pos(id(top, &copies)).unwrap(),
                );
                prop_assert_eq!(layers.len(), t - b);
                s.commit(b, t)
            }
            StepAction::Stream { into, base, layers } => {
                prop_assert!(!shared(id(into, &copies)), "wrote shared {into:?}");
                let b = base.as_ref().map(|b| s.pos(id(b, &copies)).unwrap());
                let first = layers.first().map_or_else(
                    || s.pos(id(into, &copies)).unwrap(),
                    |f| s.pos(id(f, &copies)).unwrap(),
                );
                let lo = drop_between(&mut s, b, first)?;
                let i = s.pos(id(into, &copies)).unwrap();
                prop_assert_eq!(i - lo, layers.len());
                s.stream(b, i)
            }
            StepAction::Copy {
                layers,
                to,
                backing,
            } => {
                let b = backing.as_ref().map(|b| s.pos(id(b, &copies)).unwrap());
                let first = s.pos(id(&layers[0], &copies)).unwrap();
                let first = drop_between(&mut s, b, first)?;
                let last = s.pos(id(layers.last().unwrap(), &copies)).unwrap();
                let new_id = 100 + copies.len();
                copies.push((to.clone(), new_id));
                let mut cells = vec![Cell::U; s.files[0].1.len()];
                let mut cost = 0;
                for (c, cell) in cells.iter_mut().enumerate() {
                    if let Some(v) = s.files[first..=last]
                        .iter()
                        .rev()
                        .map(|f| f.1[c])
                        .find(|&x| x != Cell::U)
                    {
                        *cell = v;
                        cost += u64::from(matches!(v, Cell::D(_)));
                    }
                }
                s.files.splice(first..=last, [(new_id, cells)]);
                cost
            }
            StepAction::Snapshot { file, .. } => {
                // Offline: the active content moves to `file` (a hard link); the active path
                // gets a new empty overlay on it. Nothing is copied.
                let (aid, cells) = s.files.pop().expect("an active layer");
                let new_id = 100 + copies.len();
                copies.push((file.clone(), new_id));
                let empty = vec![Cell::U; cells.len()];
                s.files.push((new_id, cells));
                s.files.push((aid, empty));
                0
            }
            StepAction::TakeOver { holder, active, .. } => {
                prop_assert!(
                    !shared(id(holder, &copies)),
                    "took over with shared {holder:?}"
                );
                let h = s.pos(id(holder, &copies)).unwrap();
                prop_assert_eq!(
                    h,
                    s.files.len() - 1,
                    "the holder is the top after its commit"
                );
                prop_assert!(
                    s.pos(id(active, &copies)).is_none(),
                    "the active was committed"
                );
                s.files[h].0 = id(active, &copies);
                0
            }
            StepAction::Rebase { overlay, backing } => {
                prop_assert!(!shared(id(overlay, &copies)), "rebased shared {overlay:?}");
                let (b, o) = (
                    s.pos(id(backing, &copies)).unwrap(),
                    s.pos(id(overlay, &copies)).unwrap(),
                );
                prop_assert!(b < o);
                drop_between(&mut s, Some(b), o)?;
                0
            }
            other => return Err(TestCaseError::fail(format!("unexpected step {other:?}"))),
        };
        prop_assert_eq!(cost, step.bytes, "step {:?}", step.action);
    }
    // Anything stale left below the active layer must be neutral too.
    let n = s.files.len();
    if n >= 2 {
        let below = plan
            .result
            .len()
            .checked_sub(2)
            .map(|j| s.pos(id(&plan.result[j].file, &copies)).unwrap());
        drop_between(&mut s, below, n - 1)?;
    }
    Ok(s)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn the_plan_costs_exactly_the_brute_force_minimum(p in problem()) {
        let truth = min_cost(&p);
        let g = graph_of(&p);
        match plan_disk(&g, &request(&p)) {
            Ok(plan) => {
                prop_assert_eq!(Some(plan.total_bytes), truth, "plan {:#?}", plan.steps);
                // Replay the steps on the model: they must reach the goal at the predicted cost.
                let s = replay(&p, &plan, &|f| Some(orig(f)))?;
                prop_assert!(is_goal(&p, &s), "plan does not reach the goal: {:#?}", plan.steps);
                for (j, f) in plan.result.iter().enumerate() {
                    prop_assert_eq!(s.files[j].0, orig(&f.file));
                }
                if let Some(c) = plan.baselines.always_commit {
                    prop_assert!(plan.total_bytes <= c);
                }
                if let Some(c) = plan.baselines.always_stream {
                    prop_assert!(plan.total_bytes <= c);
                }
            }
            Err(PlanError::BlockedByShared { blocker, .. }) => {
                prop_assert_eq!(truth, None);
                prop_assert!(p.shared[orig(&blocker)]);
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

/// Layers in `/img` are outside the placement directory, layers in `/fast` inside it.
fn placed_path(i: usize, inside: bool) -> PathBuf {
    PathBuf::from(format!(
        "{}/l{i}.qcow2",
        if inside { "/fast" } else { "/img" }
    ))
}

fn orig_placed(p: &std::path::Path) -> Option<usize> {
    let name = p.file_name()?.to_string_lossy().into_owned();
    name.strip_prefix('l')?.strip_suffix(".qcow2")?.parse().ok()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    /// With a placement directory: every kept point ends in it, views are unchanged, each step
    /// costs what it says, shared layers are never written, and no run costs more than copying it
    /// merged.
    #[test]
    fn placement_moves_every_point_into_the_directory(p in problem(), inside_mask in proptest::collection::vec(any::<bool>(), 8)) {
        let n = p.layers.len();
        let inside = |i: usize| inside_mask[i];
        let mut layers: Vec<Layer> = graph_of(&p)
            .chain(&path(n - 1))
            .unwrap()
            .into_iter()
            .cloned()
            .collect();
        for (i, l) in layers.iter_mut().enumerate() {
            l.path = placed_path(i, inside(i));
            l.backing = (i > 0).then(|| placed_path(i - 1, inside(i - 1)));
        }
        if let Some(top_shared) = (0..n).rev().find(|&i| p.shared[i]) {
            layers.push(Layer {
                path: PathBuf::from("/img/other-disk.qcow2"),
                format: Format::Qcow2,
                backing: Some(placed_path(top_shared, inside(top_shared))),
                alloc: None,
            });
        }
        let g = ImageGraph::build(layers).unwrap();
        // A new point on top as well: made in /fast (the placement is on the active image's
        // file system), never copied there.
        let req = DiskRequest {
            name: "disk".into(),
            active: placed_path(n - 1, inside(n - 1)),
            keep: p.keep.iter().map(|&k| KeptPoint { name: format!("p{k}"), file: placed_path(k, inside(k)) }).collect(),
            new_snapshots: vec!["fresh".into()],
            placement: Some(PathBuf::from("/fast")),
            placement_links: true,
            ..Default::default()
        };
        let plan = match plan_disk(&g, &req) {
            Ok(plan) => plan,
            Err(PlanError::BlockedByShared { blocker, .. }) => {
                // Copies lift most limits; what remains is a shared layer that would have to be
                // written (streamed into, or re-pointed onto a moved copy).
                prop_assert!(p.shared[orig_placed(&blocker).unwrap()], "blocker {blocker:?} is not shared");
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error {e}"))),
        };
        let s = replay(&p, &plan, &|f| orig_placed(f))?;
        // Views: each kept point and the active layer read as before.
        let start = State::of(&p);
        prop_assert_eq!(s.files.len(), p.keep.len() + 2);
        for (j, &k) in p.keep.iter().enumerate() {
            prop_assert_eq!(s.view(j), start.view(k), "point p{}", k);
            prop_assert!(plan.result[j].file.starts_with("/fast"), "point p{} is not in /fast", k);
        }
        let fresh = &plan.result[p.keep.len()];
        prop_assert_eq!(fresh.point.as_deref(), Some("fresh"));
        prop_assert!(fresh.file.starts_with("/fast"), "the new point is made in /fast: {:?}", fresh.file);
        prop_assert!(
            !plan.steps.iter().any(|s| matches!(&s.action, StepAction::Copy { to, .. } if to == &fresh.file)),
            "the new point is not copied"
        );
        prop_assert_eq!(s.view(p.keep.len()), start.view(n - 1));
        prop_assert_eq!(s.view(p.keep.len() + 1), start.view(n - 1));
        for d in &plan.decisions {
            for r in &d.rejected {
                if r.strategy.starts_with("copy merged") {
                    prop_assert!(d.chosen.bytes <= r.bytes);
                }
            }
        }
    }
}

/// Replays a live plan on the cell model with libvirt's semantics: a commit drops the committed
/// layers at once (an active commit pivots to its base), a pull goes only into the active layer
/// and only over layers directly below it, and nothing is ever re-pointed in place.
fn replay_live(p: &Problem, plan: &diskchain_planner::DiskPlan) -> Result<State, TestCaseError> {
    let mut s = State::of(p);
    for step in &plan.steps {
        let cost = match &step.action {
            StepAction::Commit { base, top, layers } => {
                prop_assert!(!p.shared[orig(base)], "wrote shared {base:?}");
                let (b, t) = (s.pos(orig(base)).unwrap(), s.pos(orig(top)).unwrap());
                prop_assert_eq!(layers.len(), t - b);
                s.commit(b, t)
            }
            StepAction::Stream { into, base, layers } => {
                let i = s.pos(orig(into)).unwrap();
                prop_assert_eq!(
                    i,
                    s.files.len() - 1,
                    "a live pull goes into the active layer only"
                );
                let b = base.as_ref().map(|b| s.pos(orig(b)).unwrap());
                let lo = b.map_or(0, |b| b + 1);
                prop_assert_eq!(
                    i - lo,
                    layers.len(),
                    "a live pull reads the layers right below"
                );
                s.stream(b, i)
            }
            other => {
                return Err(TestCaseError::fail(format!(
                    "unexpected live step {other:?}"
                )));
            }
        };
        prop_assert_eq!(cost, step.bytes, "step {:?}", step.action);
    }
    Ok(s)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Live plans (a running VM): only libvirt's operations, each costing what it says, shared
    /// layers never written, every kept point and the guest view unchanged, and never dearer than
    /// committing every run into its lowest layer.
    #[test]
    fn live_plans_use_only_what_libvirt_can_do(p in problem()) {
        let truth = min_cost(&p);
        let g = graph_of(&p);
        let req = DiskRequest { mode: Mode::Live, ..request(&p) };
        match plan_disk(&g, &req) {
            Ok(plan) => {
                let s = replay_live(&p, &plan)?;
                let start = State::of(&p);
                let active = p.layers.len() - 1;
                prop_assert_eq!(s.files.len(), p.keep.len() + 1);
                for (j, &k) in p.keep.iter().enumerate() {
                    prop_assert_eq!(s.view(j), start.view(k), "point {} changed", k);
                    prop_assert_eq!(s.files[j].0, orig(&plan.result[j].file));
                }
                prop_assert_eq!(s.view(s.files.len() - 1), start.view(active), "guest view changed");
                prop_assert_eq!(s.files.last().unwrap().0, orig(&plan.result.last().unwrap().file));
                // (A live plan may beat the offline optimum: an active commit may pivot to its
                // base, where an offline disk keeps its active file.)
                prop_assert!(truth.is_some(), "a live plan exists only where an offline one does");
                if let Some(c) = plan.baselines.always_commit {
                    prop_assert!(plan.total_bytes <= c, "{} > always-commit {}", plan.total_bytes, c);
                }
            }
            Err(PlanError::BlockedByShared { blocker, .. }) => {
                prop_assert!(p.shared[orig(&blocker)]);
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

/// A backup repository's chain: every layer a point (`b0` the full, then one incremental per
/// layer, the newest on top), none shared, a random subset of the older points kept (retention);
/// the newest is always kept.
fn repository() -> impl Strategy<Value = Problem> {
    problem().prop_map(|mut p| {
        p.shared = vec![false; p.layers.len()];
        p
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The same entry point plans a chain of points (a repository's retention): the minimum
    /// bytes, steps that reach the goal at that cost, and every layer of the result a point, the
    /// newest on top at its path.
    #[test]
    fn chains_of_points_plan_at_the_brute_force_minimum(p in repository()) {
        let n = p.layers.len();
        let truth = min_cost(&p);
        let g = graph_of(&p);
        let req = DiskRequest {
            keep: p
                .keep
                .iter()
                .map(|&k| KeptPoint { name: format!("b{k}"), file: path(k) })
                .collect(),
            mode: Mode::Points { newest: format!("b{}", n - 1) },
            ..request(&p)
        };
        let plan = plan_disk(&g, &req).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(Some(plan.total_bytes), truth, "plan {:#?}", plan.steps);
        let s = replay(&p, &plan, &|f| Some(orig(f)))?;
        prop_assert!(is_goal(&p, &s), "plan does not reach the goal: {:#?}", plan.steps);
        let points: Vec<Option<String>> = plan.result.iter().map(|f| f.point.clone()).collect();
        let mut want: Vec<Option<String>> = p.keep.iter().map(|k| Some(format!("b{k}"))).collect();
        want.push(Some(format!("b{}", n - 1)));
        prop_assert_eq!(points, want);
        prop_assert_eq!(&plan.result.last().unwrap().file, &path(n - 1));
    }
}

#[test]
fn a_chain_of_points_takes_no_snapshot() {
    let p = Problem {
        layers: vec![vec![Cell::D(1)], vec![Cell::D(2)]],
        shared: vec![false, false],
        keep: vec![],
    };
    let req = DiskRequest {
        new_snapshots: vec!["extra".into()],
        mode: Mode::Points {
            newest: "b1".into(),
        },
        ..request(&p)
    };
    let e = plan_disk(&graph_of(&p), &req).unwrap_err();
    assert!(matches!(e, PlanError::SnapshotOfPoints { .. }), "{e}");
    assert!(e.to_string().contains("\"extra\""), "{e}");
}
