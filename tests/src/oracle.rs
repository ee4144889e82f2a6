//! Brute-force search for the cheapest step sequence, by Dijkstra over chain states.
//!
//! The model is DESIGN.md's, written out directly: a chain of files, each holding per guest
//! cluster nothing, data (with an identity, so views can be compared) or an explicit zero.
//! Steps: `stream(base, into)` (any `into` that is not shared, including the active layer),
//! `commit(base, top)` for a `top` below the active layer, and the active commit (the active
//! layer's content moves down, the active layer stays at its path, emptied). Cost: clusters whose
//! written value is data. Goal: the chain is exactly one file per kept point, in order, then the
//! active file, and every kept point and the active layer read as before.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// What a file holds for one cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cell {
    /// Nothing: read from below.
    U,
    /// Data with an identity.
    D(u32),
    /// An explicit zero.
    Z,
}

/// A chain state: per file, its original index and its cells. Base first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct State {
    /// (original layer index, cells), base first.
    pub files: Vec<(usize, Vec<Cell>)>,
}

/// A planning problem.
#[derive(Clone, Debug)]
pub struct Problem {
    /// Per layer (base first, active last), per cluster.
    pub layers: Vec<Vec<Cell>>,
    /// Per layer: shared with another chain (must never be written).
    pub shared: Vec<bool>,
    /// Original indexes of the kept points, ascending, all below the active layer.
    pub keep: Vec<usize>,
}

impl State {
    /// The initial state of a problem.
    pub fn of(p: &Problem) -> State {
        State {
            files: p.layers.iter().cloned().enumerate().collect(),
        }
    }

    /// The guest view at chain position `j` (unallocated at the bottom reads as zero).
    pub fn view(&self, j: usize) -> Vec<Cell> {
        let n = self.files[0].1.len();
        (0..n)
            .map(|c| {
                self.files[..=j]
                    .iter()
                    .rev()
                    .map(|f| f.1[c])
                    .find(|&x| x != Cell::U)
                    .unwrap_or(Cell::Z)
            })
            .collect()
    }

    fn top_of(&self, lo: usize, hi: usize, c: usize) -> Option<Cell> {
        self.files[lo..hi]
            .iter()
            .rev()
            .map(|f| f.1[c])
            .find(|&x| x != Cell::U)
    }

    /// Streams the files strictly between `base` (None: from the bottom) and `into` into `into`.
    pub fn stream(&mut self, base: Option<usize>, into: usize) -> u64 {
        let lo = base.map_or(0, |b| b + 1);
        let mut cost = 0;
        for c in 0..self.files[into].1.len() {
            if self.files[into].1[c] == Cell::U
                && let Some(v) = self.top_of(lo, into, c)
            {
                self.files[into].1[c] = v;
                cost += u64::from(matches!(v, Cell::D(_)));
            }
        }
        self.files.drain(lo..into);
        cost
    }

    /// Commits `(base, top]` into `base`; the overlay of `top` now reads through `base`.
    pub fn commit(&mut self, base: usize, top: usize) -> u64 {
        let mut cost = 0;
        for c in 0..self.files[base].1.len() {
            if let Some(v) = self.top_of(base + 1, top + 1, c) {
                self.files[base].1[c] = v;
                cost += u64::from(matches!(v, Cell::D(_)));
            }
        }
        self.files.drain(base + 1..=top);
        cost
    }

    /// Commits the active layer (and everything down to `base`) into `base`; the active layer
    /// stays, emptied, on top of `base`.
    pub fn commit_active(&mut self, base: usize) -> u64 {
        let top = self.files.len() - 1;
        let mut cost = 0;
        for c in 0..self.files[base].1.len() {
            if let Some(v) = self.top_of(base + 1, top + 1, c) {
                self.files[base].1[c] = v;
                cost += u64::from(matches!(v, Cell::D(_)));
            }
        }
        for x in self.files[top].1.iter_mut() {
            *x = Cell::U;
        }
        self.files.drain(base + 1..top);
        cost
    }

    /// Offline: commits the active layer and every layer between into `base`, which then takes
    /// the active image's place (a rename): the chain ends at `base`, now the active file.
    pub fn take_over(&mut self, base: usize) -> u64 {
        let top = self.files.len() - 1;
        let active = self.files[top].0;
        let cost = self.commit(base, top);
        self.files[base].0 = active;
        cost
    }

    /// Position of original layer `orig`, if still in the chain.
    pub fn pos(&self, orig: usize) -> Option<usize> {
        self.files.iter().position(|f| f.0 == orig)
    }
}

/// True when `s` is the goal of `p`.
pub fn is_goal(p: &Problem, s: &State) -> bool {
    let start = State::of(p);
    let active = p.layers.len() - 1;
    s.files.len() == p.keep.len() + 1
        && s.files.last().map(|f| f.0) == Some(active)
        && p.keep.iter().enumerate().all(|(j, &k)| {
            let lo = if j == 0 { 0 } else { p.keep[j - 1] + 1 };
            (lo..=k).contains(&s.files[j].0) && s.view(j) == start.view(k)
        })
        && s.view(s.files.len() - 1) == start.view(active)
}

/// The minimum data clusters written by any step sequence reaching the goal; `None` if none does.
pub fn min_cost(p: &Problem) -> Option<u64> {
    let start = State::of(p);
    let mut best: HashMap<State, u64> = HashMap::new();
    let mut heap = BinaryHeap::new();
    best.insert(start.clone(), 0);
    heap.push(Reverse((0u64, start)));
    while let Some(Reverse((cost, s))) = heap.pop() {
        if best.get(&s).is_some_and(|&b| b < cost) {
            continue;
        }
        if is_goal(p, &s) {
            return Some(cost);
        }
        let n = s.files.len();
        let shared = |i: usize| p.shared[s.files[i].0];
        let mut next: Vec<(u64, State)> = Vec::new();
        for into in 1..n {
            if shared(into) {
                continue;
            }
            for base in std::iter::once(None).chain((0..into.saturating_sub(1)).map(Some)) {
                let lo = base.map_or(0, |b| b + 1);
                if into - lo < 1 {
                    continue;
                }
                let mut t = s.clone();
                let c = t.stream(base, into);
                next.push((c, t));
            }
        }
        for base in 0..n.saturating_sub(1) {
            if shared(base) {
                continue;
            }
            for top in base + 1..n - 1 {
                let mut t = s.clone();
                let c = t.commit(base, top);
                next.push((c, t));
            }
            if !shared(n - 1) {
                let mut t = s.clone();
                let c = t.commit_active(base);
                next.push((c, t));
                // Offline, any layer below the active one may take the active image's place
                // after everything above it is committed into it.
                {
                    let mut t = s.clone();
                    let c = t.take_over(base);
                    next.push((c, t));
                }
            }
        }
        for (c, t) in next {
            let total = cost + c;
            if best.get(&t).is_none_or(|&b| total < b) {
                best.insert(t.clone(), total);
                heap.push(Reverse((total, t)));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use Cell::*;

    #[test]
    fn the_talks_example_finds_the_cheaper_direction() {
        // A <- B <- C <- D, remove B. B is big, C small: commit C into B costs 1.
        let p = Problem {
            layers: vec![
                vec![D(1), U, U, U],
                vec![D(2), D(3), D(4), U],
                vec![U, U, U, D(5)],
                vec![U; 4],
            ],
            shared: vec![false; 4],
            keep: vec![0, 2],
        };
        assert_eq!(min_cost(&p), Some(1));
    }

    #[test]
    fn removing_below_a_shared_point_is_impossible() {
        let p = Problem {
            layers: vec![vec![D(1)], vec![D(2)], vec![U]],
            shared: vec![true, true, false],
            keep: vec![1],
        };
        assert_eq!(min_cost(&p), None);
    }
}
