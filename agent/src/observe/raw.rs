//! A raw layer's allocation from the file's own holes (FIEMAP, else `SEEK_DATA`/`SEEK_HOLE`):
//! written extents are data, holes and unwritten extents read as zeros. A raw file has no backing file, so it is always the base.

use std::fs::File;
use std::path::Path;

use diskchain_planner::Allocation;
use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use roaring::RoaringTreemap;

/// The unit raw layers are mapped at (QEMU's default qcow2 cluster size): a unit with any data
/// byte counts as data.
pub const RAW_UNIT: u64 = 65536;

/// The file's data extents (`[start, end)` byte ranges, in order) from `SEEK_DATA`/`SEEK_HOLE`.
/// A file system without hole support reports the whole file as data; so does a block device.
pub(crate) fn data_extents(
    file: &File,
    path: &Path,
    size: u64,
) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off: i64 = 0;
    let end = size as i64;
    while off < end {
        let start = match lseek(file, off, Whence::SeekData) {
            Ok(s) => s,
            Err(Errno::ENXIO) => break,
            // No hole support (a block device): every byte may be data.
            Err(Errno::EINVAL) if off == 0 => return Ok(vec![(0, size)]),
            Err(e) => {
                return Err(std::io::Error::other(format!(
                    "SEEK_DATA on {}: {e}",
                    path.display()
                )));
            }
        };
        let hole = match lseek(file, start, Whence::SeekHole) {
            Ok(h) => h,
            Err(Errno::ENXIO) => end,
            Err(e) => {
                return Err(std::io::Error::other(format!(
                    "SEEK_HOLE on {}: {e}",
                    path.display()
                )));
            }
        };
        if hole <= start {
            break;
        }
        out.push((start as u64, (hole as u64).min(size)));
        off = hole;
    }
    Ok(out)
}

/// True when no extent of `extents` (sorted, disjoint) overlaps `[start, end)`: the range is a
/// hole and reads as zeros.
pub(crate) fn is_hole(extents: &[(u64, u64)], start: u64, end: u64) -> bool {
    // The first extent ending after `start`.
    let i = extents.partition_point(|&(_, e)| e <= start);
    extents.get(i).is_none_or(|&(s, _)| s >= end)
}

/// Reads the allocation of a raw file.
pub fn read_allocation(file: &File, path: &Path) -> std::io::Result<Allocation> {
    let size = super::size_of(file)?;
    let units = size.div_ceil(RAW_UNIT);
    let mut data = RoaringTreemap::new();
    let extents = match super::fiemap::written_extents(file, size) {
        Some(x) => x,
        None => data_extents(file, path, size)?,
    };
    for (start, hole) in extents {
        let (a, b) = (start / RAW_UNIT, hole.div_ceil(RAW_UNIT));
        data.insert_range(a..b.min(units));
    }
    let mut zero = RoaringTreemap::new();
    zero.insert_range(0..units);
    zero -= &data;
    Ok(Allocation {
        unit: RAW_UNIT,
        virtual_size: size,
        data,
        zero,
    })
}

#[cfg(test)]
mod tests {
    use super::is_hole;

    #[test]
    fn holes_are_ranges_no_extent_overlaps() {
        let ext = [(0, 10), (20, 30)];
        assert!(!is_hole(&ext, 0, 5));
        assert!(!is_hole(&ext, 9, 12));
        assert!(is_hole(&ext, 10, 20));
        assert!(!is_hole(&ext, 15, 21));
        assert!(is_hole(&ext, 30, 40));
        assert!(is_hole(&[], 0, 40));
    }
}
