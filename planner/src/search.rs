//! The per-run decision: which file ends up holding the kept point above a run of layers to
//! remove, and what each choice costs.
//!
//! A run is `below[0..m]` (layers to remove, base first) topped by `u`, the kept layer (or the
//! active layer). Choosing holder `h` means: commit `(h, u]` into `h` (writes the top-most value
//! of every cluster allocated there), then stream `below[..h]` into `h` (writes the top-most value
//! of every cluster allocated there and not already in `h`). Clusters whose top-most value is an
//! explicit zero are counted apart: they cost (almost) nothing.

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

/// Evaluates every holder of the run `layers` (base first, the top `u` last), all at one unit.
/// With `only_top`, only `h = u` is evaluated (the run below the active layer).
pub(crate) fn evaluate(layers: &[&Allocation], unit: u64, size: u64, only_top: bool) -> RunCosts {
    let m = layers.len() - 1;
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
            let after = &(&alloc[h] | &ad) | &az;
            let (bd, bz) = &below[h];
            holders[h] = Cost {
                commit_bytes: bytes(&ad),
                commit_zero: bytes(&az),
                stream_bytes: bytes(&(bd - &after)),
                stream_zero: bytes(&(bz - &after)),
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
        Cost {
            commit_bytes: 0,
            commit_zero: 0,
            stream_bytes: bytes(&ad),
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
        let costs = evaluate(&[&b, &c], 1, 100, false);
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
    fn commit_counts_shadowed_clusters_once_and_zeros_apart() {
        let x = layer(&[0], &[]);
        let y = layer(&[1, 2], &[3]);
        let u = layer(&[1], &[2]);
        let costs = evaluate(&[&x, &y, &u], 1, 100, false);
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
