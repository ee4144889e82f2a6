//! A raw layer's allocation from the file's own holes (`SEEK_DATA`/`SEEK_HOLE`): data extents are
//! data, holes read as zeros. A raw file has no backing file, so it is always the base.

use std::fs::File;
use std::path::Path;

use diskchain_planner::Allocation;
use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use roaring::RoaringTreemap;

/// The unit raw layers are mapped at (QEMU's default qcow2 cluster size): a unit with any data
/// byte counts as data.
pub const RAW_UNIT: u64 = 65536;

/// Reads the allocation of a raw file.
pub fn read_allocation(file: &File, path: &Path) -> std::io::Result<Allocation> {
    let size = super::size_of(file)?;
    let units = size.div_ceil(RAW_UNIT);
    let mut data = RoaringTreemap::new();
    let mut off: i64 = 0;
    let end = size as i64;
    while off < end {
        let start = match lseek(file, off, Whence::SeekData) {
            Ok(s) => s,
            Err(Errno::ENXIO) => break,
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
        let (a, b) = (start as u64 / RAW_UNIT, (hole as u64).div_ceil(RAW_UNIT));
        data.insert_range(a..b.min(units));
        off = hole;
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
