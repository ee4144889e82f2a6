//! The planner against a brute-force search over step sequences on random chains of up to 8
//! layers: the plan's total equals the true minimum, its steps replayed on the cell model reach
//! the goal at exactly the predicted cost, and it is never worse than "always commit" or
//! "always stream". Where no plan exists, the planner says which shared layer blocks it.

use std::path::PathBuf;

use diskchain_planner::{
    Allocation, DiskRequest, Format, ImageGraph, KeptPoint, Layer, PlanError, StepAction, plan_disk,
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
                let mut s = State::of(&p);
                for step in &plan.steps {
                    let cost = match &step.action {
                        StepAction::Commit { base, top, .. } => {
                            let (b, t) = (s.pos(orig(base)).unwrap(), s.pos(orig(top)).unwrap());
                            prop_assert!(!p.shared[orig(base)], "wrote shared {base:?}");
                            s.commit(b, t)
                        }
                        StepAction::Stream { into, base, .. } => {
                            let i = s.pos(orig(into)).unwrap();
                            prop_assert!(!p.shared[orig(into)], "wrote shared {into:?}");
                            s.stream(base.as_ref().map(|b| s.pos(orig(b)).unwrap()), i)
                        }
                        StepAction::Rebase { overlay, backing } => {
                            // An unsafe rebase is only right when the overlay reads the same
                            // through its new backing file: drop what lies between, compare.
                            let (b, o) = (s.pos(orig(backing)).unwrap(), s.pos(orig(overlay)).unwrap());
                            prop_assert!(b < o);
                            prop_assert!(!p.shared[orig(overlay)], "rebased shared {overlay:?}");
                            let before = s.view(o);
                            s.files.drain(b + 1..o);
                            prop_assert_eq!(s.view(b + 1), before, "rebase changes what {:?} reads", overlay);
                            0
                        }
                        other => panic!("unexpected step {other:?}"),
                    };
                    prop_assert_eq!(cost, step.bytes, "step {:?}", step.action);
                }
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
