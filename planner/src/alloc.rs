//! Allocation maps: which guest clusters a layer itself holds, as data or as an explicit zero.

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

/// What one layer holds for one guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClusterState {
    /// Not allocated here: reads come from the backing layer.
    Unallocated,
    /// Data stored in this layer (compressed clusters included).
    Data,
    /// An explicit zero: reads as zeros, shadows the backing layer, costs (almost) nothing to write.
    Zero,
}

/// One layer's own allocation, read without following its backing file.
///
/// Indexes count `unit`-sized guest clusters from offset 0; `data` and `zero` are disjoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocation {
    /// Bytes per index (the layer's cluster size, or a finer chain-wide unit after rescaling).
    pub unit: u64,
    /// The layer's virtual size in bytes (the last cluster may be partial).
    pub virtual_size: u64,
    /// Clusters holding data.
    pub data: RoaringTreemap,
    /// Clusters holding an explicit zero.
    pub zero: RoaringTreemap,
}

impl Allocation {
    /// An empty map.
    pub fn empty(unit: u64, virtual_size: u64) -> Self {
        Allocation {
            unit,
            virtual_size,
            data: RoaringTreemap::new(),
            zero: RoaringTreemap::new(),
        }
    }

    /// Every cluster this layer holds, data or zero.
    pub fn allocated(&self) -> RoaringTreemap {
        &self.data | &self.zero
    }

    /// The state of one cluster.
    pub fn state(&self, index: u64) -> ClusterState {
        if self.data.contains(index) {
            ClusterState::Data
        } else if self.zero.contains(index) {
            ClusterState::Zero
        } else {
            ClusterState::Unallocated
        }
    }

    /// Bytes of data held (the last, partial cluster counted to the virtual size).
    pub fn data_bytes(&self) -> u64 {
        bytes_of(&self.data, self.unit, self.virtual_size)
    }

    /// The allocation with every unit that starts at or past `limit` bytes dropped: data past
    /// the end of every view that reads this layer is never copied.
    pub fn clipped(mut self, limit: u64) -> Allocation {
        let first = limit.div_ceil(self.unit);
        self.data.remove_range(first..);
        self.zero.remove_range(first..);
        self
    }

    /// The same map at a finer unit (`unit` must divide this map's unit).
    pub fn rescaled(&self, unit: u64) -> Allocation {
        assert!(
            unit > 0 && self.unit.is_multiple_of(unit),
            "rescale to a unit that divides {}",
            self.unit
        );
        let f = self.unit / unit;
        if f == 1 {
            return self.clone();
        }
        let scale = |set: &RoaringTreemap| {
            let mut out = RoaringTreemap::new();
            // Expand runs of indexes at once: roaring's range insert is cheap for long runs.
            let mut iter = set.iter().peekable();
            while let Some(start) = iter.next() {
                let mut end = start;
                while iter.peek() == Some(&(end + 1)) {
                    end = iter.next().unwrap_or(end);
                }
                out.insert_range(start * f..(end + 1) * f);
            }
            out
        };
        Allocation {
            unit,
            virtual_size: self.virtual_size,
            data: scale(&self.data),
            zero: scale(&self.zero),
        }
    }
}

/// Bytes covered by `set` of `unit`-sized clusters in an image of `virtual_size` bytes.
pub(crate) fn bytes_of(set: &RoaringTreemap, unit: u64, virtual_size: u64) -> u64 {
    let n = set.len();
    if n == 0 {
        return 0;
    }
    let mut bytes = n * unit;
    let tail = virtual_size % unit;
    if tail != 0 && set.contains(virtual_size / unit) {
        bytes -= unit - tail;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescaling_keeps_bytes_and_state() {
        let mut a = Allocation::empty(65536, 10 * 65536);
        a.data.insert(1);
        a.data.insert(2);
        a.zero.insert(5);
        let b = a.rescaled(4096);
        assert_eq!(b.data.len(), 32);
        assert_eq!(b.data_bytes(), a.data_bytes());
        assert_eq!(b.state(16), ClusterState::Data);
        assert_eq!(b.state(15), ClusterState::Unallocated);
        assert_eq!(b.state(5 * 16 + 3), ClusterState::Zero);
    }

    #[test]
    fn a_partial_last_cluster_counts_only_to_the_virtual_size() {
        let mut a = Allocation::empty(65536, 65536 + 512);
        a.data.insert(1);
        assert_eq!(a.data_bytes(), 512);
    }
}
