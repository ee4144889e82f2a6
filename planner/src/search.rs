//! The per-run decision: which file ends up holding the kept point above a run of layers to
//! remove, and what each choice costs.
//!
//! A run is `below[0..m]` (layers to remove, base first) topped by `u`, the kept layer (or the
//! active layer). Choosing holder `h` means: commit `(h, u]` into `h` (writes the top-most value
//! of every cluster allocated there), then stream `below[..h]` into `h` (writes the top-most value
//! of every cluster allocated there and not already in `h`). Clusters whose top-most value is an
//! explicit zero are counted apart: they cost (almost) nothing.
//!
//! QEMU writes whole clusters of the file it writes: a write into a cluster `h` does not hold yet
//! allocates it and fills the rest of it (copy-on-write from below; `qemu-img rebase` writes whole
//! target clusters). So with `h`'s clusters `grain` units wide, every touched cluster `h` does not
//! hold costs its whole width; clusters `h` already holds are written in place, unit by unit.

use roaring::RoaringTreemap;

use crate::alloc::{Allocation, bytes_of};

/// The cost of one way to handle a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cost {
    /// Data bytes the commit writes.
    pub commit_bytes: u64,
    /// Zero bytes the commit writes.
    pub commit_zero: u64,
    /// Data bytes the stream (or copy) writes.
    pub stream_bytes: u64,
    /// Zero bytes the stream (or copy) writes.
    pub stream_zero: u64,
}

impl Cost {
    pub fn bytes(&self) -> u64 {
        self.commit_bytes + self.stream_bytes
    }
    pub fn zero_bytes(&self) -> u64 {
        self.commit_zero + self.stream_zero
    }
}

/// Costs of every holder position `h` in `0..=m` (`m` = the top `u`), plus the cost of copying the
/// whole run merged into a new file (`copy`).
pub(crate) struct RunCosts {
    pub holders: Vec<Cost>,
    pub copy: Cost,
    /// The clusters whose top-most value in `(layers[0], u]` is an explicit zero.
    pub zeros_above_lowest: RoaringTreemap,
}

/// The units QEMU writes when it writes `set` into a file that holds `held`, whose clusters are
/// `grain` units wide: `set` itself where the file holds the cluster, whole clusters elsewhere
/// (no further than `units`, the end of the image).
pub(crate) fn written_units(
    set: &RoaringTreemap,
    held: &RoaringTreemap,
    grain: u64,
    units: u64,
) -> RoaringTreemap {
    if grain <= 1 {
        return set.clone();
    }
    let mut out = set & held;
    let fresh = set - held;
    let mut last = None;
    for i in fresh.iter() {
        let c = i / grain;
        if last != Some(c) {
            out.insert_range(c * grain..((c + 1) * grain).min(units.max(i + 1)));
            last = Some(c);
        }
    }
    out
}

/// Evaluates every holder of the run `layers` (base first, the top `u` last), all at one unit.
/// `grain[i]` is layer `i`'s cluster size in units (1 when it is the unit); a copy of the run
/// is made with the top layer's cluster size. With `only_top`, only `h = u` is evaluated (the run below the active
/// layer).
pub(crate) fn evaluate(
    layers: &[&Allocation],
    grain: &[u64],
    unit: u64,
    size: u64,
    only_top: bool,
) -> RunCosts {
    let m = layers.len() - 1;
    let units = size.div_ceil(unit.max(1));
    let bytes = |s: &RoaringTreemap| bytes_of(s, unit, size);
    let alloc: Vec<RoaringTreemap> = layers.iter().map(|a| a.allocated()).collect();

    // Below(h): the union of layers[..h] with top-most state, for h = 0..=m.
    let mut below: Vec<(RoaringTreemap, RoaringTreemap)> = Vec::with_capacity(m + 1);
    let (mut bd, mut bz) = (RoaringTreemap::new(), RoaringTreemap::new());
    for h in 0..=m {
        if !only_top || h == m {
            below.push((bd.clone(), bz.clone()));
        } else {
            below.push((RoaringTreemap::new(), RoaringTreemap::new()));
        }
        if h < m {
            bd -= &alloc[h];
            bz -= &alloc[h];
            bd |= &layers[h].data;
            bz |= &layers[h].zero;
        }
    }

    // Above(h): the union of layers[h+1..=m] with top-most state, swept from the top down.
    let mut holders = vec![
        Cost {
            commit_bytes: 0,
            commit_zero: 0,
            stream_bytes: 0,
            stream_zero: 0
        };
        m + 1
    ];
    let (mut ad, mut az) = (RoaringTreemap::new(), RoaringTreemap::new());
    let mut zeros_above_lowest = RoaringTreemap::new();
    for h in (0..=m).rev() {
        if h == 0 {
            zeros_above_lowest = az.clone();
        }
        if !only_top || h == m {
            let g = grain.get(h).copied().unwrap_or(1);
            // The commit writes the top-most value of (h, u] into h, whole clusters where h
            // holds none yet; every cluster it touched is h's afterwards.
            let committed = written_units(&(&ad | &az), &alloc[h], g, units);
            let held = &alloc[h] | &committed;
            let (bd, bz) = &below[h];
            let needed_data = bd - &held;
            let needed_zero = bz - &held;
            let streamed = written_units(&(&needed_data | &needed_zero), &held, g, units);
            holders[h] = Cost {
                commit_bytes: bytes(&(&committed - &az)),
                commit_zero: bytes(&az),
                stream_bytes: bytes(&(&streamed - &needed_zero)),
                stream_zero: bytes(&needed_zero),
            };
        }
        if only_top {
            break;
        }
        // Add layer h under the layers above it: only where nothing above already holds a value.
        let above = &ad | &az;
        ad |= &(&layers[h].data - &above);
        az |= &(&layers[h].zero - &above);
    }
    let copy = if only_top {
        Cost {
            commit_bytes: 0,
            commit_zero: 0,
            stream_bytes: 0,
            stream_zero: 0,
        }
    } else {
        let none = RoaringTreemap::new();
        let copy_grain = grain.get(m).copied().unwrap_or(1);
        let copied = written_units(&(&ad | &az), &none, copy_grain, units);
        Cost {
            commit_bytes: 0,
            commit_zero: 0,
            stream_bytes: bytes(&(&copied - &az)),
            stream_zero: bytes(&az),
        }
    };
    RunCosts {
        holders,
        copy,
        zeros_above_lowest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(data: &[u64], zero: &[u64]) -> Allocation {
        let mut a = Allocation::empty(1, 100);
        a.data.extend(data.iter().copied());
        a.zero.extend(zero.iter().copied());
        a
    }

    #[test]
    fn removing_a_middle_point_prefers_the_cheaper_direction() {
        // A <- B <- C: remove B below kept C. B is big, C is small: commit C into B is cheaper.
        let b = layer(&[0, 1, 2, 3, 4, 5], &[]);
        let c = layer(&[9], &[]);
        let costs = evaluate(&[&b, &c], &[1, 1], 1, 100, false);
        assert_eq!(
            costs.holders[0].bytes(),
            1,
            "commit C into B writes C's one cluster"
        );
        assert_eq!(
            costs.holders[1].bytes(),
            6,
            "stream B into C writes B's six clusters"
        );
        assert_eq!(costs.copy.bytes(), 7);
    }

    #[test]
    fn writes_into_a_coarser_holder_cost_its_whole_clusters() {
        // h has clusters 4 units wide and holds units 0..4; the top writes units 1 and 9.
        let h = layer(&[0, 1, 2, 3], &[]);
        let t = layer(&[1, 9], &[]);
        let costs = evaluate(&[&h, &t], &[4, 1], 1, 100, false);
        // Unit 1 is overwritten in place; unit 9 allocates cluster 8..12 whole.
        assert_eq!(costs.holders[0].commit_bytes, 1 + 4);
        // Streaming h into t (1-unit clusters) writes h's units t does not hold: 0, 2, 3.
        assert_eq!(costs.holders[1].stream_bytes, 3);
        // Held clusters are not written twice: a stream into h after the commit skips 8..12.
        let b = layer(&[8, 9, 10, 11, 20], &[]);
        let costs = evaluate(&[&b, &h, &t], &[1, 4, 1], 1, 100, false);
        assert_eq!(costs.holders[1].commit_bytes, 5);
        assert_eq!(
            costs.holders[1].stream_bytes, 4,
            "only cluster 20..24 is streamed"
        );
    }

    #[test]
    fn commit_counts_shadowed_clusters_once_and_zeros_apart() {
        let x = layer(&[0], &[]);
        let y = layer(&[1, 2], &[3]);
        let u = layer(&[1], &[2]);
        let costs = evaluate(&[&x, &y, &u], &[1, 1, 1], 1, 100, false);
        // h = x: commit (x, u] writes top-most of {1,2,3}: 1 data from u, 2 zero from u, 3 zero.
        assert_eq!(
            costs.holders[0],
            Cost {
                commit_bytes: 1,
                commit_zero: 2,
                stream_bytes: 0,
                stream_zero: 0
            }
        );
        // h = u: stream {x, y} into u: 0 (data x), 3 (zero y) not in u.
        assert_eq!(
            costs.holders[2],
            Cost {
                commit_bytes: 0,
                commit_zero: 0,
                stream_bytes: 1,
                stream_zero: 1
            }
        );
    }
}
