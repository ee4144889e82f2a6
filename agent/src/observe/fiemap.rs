//! Which byte ranges of a file hold written data, from the `FS_IOC_FIEMAP` ioctl with
//! `FIEMAP_FLAG_SYNC` (dirty pages are written first, so the map is exact for a file nobody is
//! writing). Unwritten extents (`fallocate`d, as `preallocation=falloc` leaves them) read as
//! zeros and are left out, unlike `SEEK_DATA`, which counts them as data as soon as their zero
//! pages sit in the page cache.

use std::fs::File;
use std::os::fd::AsRawFd;

const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
const BATCH: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Extent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Header {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
}

#[repr(C)]
struct Request {
    header: Header,
    extents: [Extent; BATCH],
}

nix::ioctl_readwrite!(fs_ioc_fiemap, b'f', 11, Header);

/// The written data extents of `file` (`[start, end)` byte ranges, in order, clipped to `size`),
/// or `None` when the file system does not support FIEMAP.
pub(crate) fn written_extents(file: &File, size: u64) -> Option<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut start = 0u64;
    let mut first = true;
    while start < size {
        let mut req = Request {
            header: Header {
                start,
                length: size - start,
                flags: if first { FIEMAP_FLAG_SYNC } else { 0 },
                extent_count: BATCH as u32,
                ..Header::default()
            },
            extents: [Extent::default(); BATCH],
        };
        first = false;
        // SAFETY: `req` is a `struct fiemap` followed by room for `extent_count` extents, as the
        // ioctl expects; the kernel writes at most that many.
        #[allow(unsafe_code)]
        let rc = unsafe {
            fs_ioc_fiemap(
                file.as_raw_fd(),
                std::ptr::from_mut(&mut req).cast::<Header>(),
            )
        };
        if rc.is_err() {
            return None;
        }
        let n = (req.header.mapped_extents as usize).min(BATCH);
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &req.extents[..n] {
            let end = e.logical.saturating_add(e.length).min(size);
            if e.flags & FIEMAP_EXTENT_UNWRITTEN == 0 && end > e.logical {
                match out.last_mut() {
                    Some(prev) if prev.1 >= e.logical => prev.1 = prev.1.max(end),
                    _ => out.push((e.logical, end)),
                }
            }
            start = start.max(e.logical.saturating_add(e.length));
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last {
            break;
        }
    }
    Some(out)
}
