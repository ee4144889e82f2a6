//! Reading one qcow2 layer's header and its own allocation map from the L1/L2 tables, without
//! opening its backing file.
//!
//! Follows QEMU's `docs/interop/qcow2.txt`. Data clusters (compressed ones included) and explicit
//! zero clusters (v3 "reads as zero" flag) are told apart. Extended L2 entries (subclusters),
//! external data files and encryption are refused with a clear error rather than misread.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use diskchain_planner::Allocation;
use roaring::RoaringTreemap;

/// The first four bytes of every qcow2 file.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// True when `file` starts with the qcow2 magic.
pub fn has_magic(file: &File) -> bool {
    let mut m = [0u8; 4];
    file.read_exact_at(&mut m, 0).is_ok() && m == MAGIC
}

/// The file's length, for bounds checks (a block device's size, not its inode's zero length:
/// qcow2 on LVM volumes is common).
fn file_len(file: &File, path: &Path) -> Result<u64, Qcow2Error> {
    super::size_of(file).map_err(|source| Qcow2Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// QEMU's limits (`block/qcow2.h`): an image past them is refused by QEMU, so it is refused
/// here too, before any table is read into memory.
const MAX_L1_BYTES: u64 = 32 << 20;
/// `QCOW_MAX_SNAPSHOTS`.
const MAX_SNAPSHOTS: u32 = 65536;
/// `QCOW2_MAX_BITMAPS`.
const MAX_BITMAPS: u32 = 65535;
/// `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`.
const MAX_BITMAP_DIRECTORY: u64 = 1 << 20 << 6;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_BITMAPS: u32 = 0x2385_2875;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Why a qcow2 layer cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// An I/O error.
    #[error("failed to read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The header or tables make no sense.
    #[error("{} is not a valid qcow2 image: {what}; check it with `qemu-img check`", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A feature diskchain does not handle.
    #[error("{} uses {feature}, which diskchain does not support; {advice}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The feature.
        feature: &'static str,
        /// What the operator can do.
        advice: &'static str,
    },
}

/// The parts of a qcow2 header diskchain needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Guest size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// The backing file name as recorded (relative names are relative to the image's directory).
    pub backing_file: Option<String>,
    /// The backing format as recorded (`None`: not recorded; QEMU would probe it).
    pub backing_format: Option<String>,
    /// L1 table entries.
    pub l1_size: u32,
    /// L1 table file offset.
    pub l1_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible: u64,
    /// Internal snapshots recorded in the image.
    pub nb_snapshots: u32,
    /// File offset of the snapshot table.
    pub snapshots_offset: u64,
    /// The bitmaps extension, when present and valid (autoclear bit 0 set).
    pub bitmaps: Option<BitmapsExt>,
}

/// Where an image's persistent dirty bitmaps are described.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub count: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// File offset of the bitmap directory.
    pub directory_offset: u64,
}

/// What an image holds beside its guest data, that a copy or a merge could drop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extras {
    /// Names of internal snapshots.
    pub snapshots: Vec<String>,
    /// Persistent dirty bitmaps.
    pub bitmaps: Vec<Bitmap>,
}

impl Bitmap {
    /// What the bitmap can be trusted for, given whether a process has the image open (a
    /// running QEMU sets `in_use` on the bitmaps it loaded).
    pub fn state(&self, image_open: bool) -> &'static str {
        if self.inconsistent(image_open) {
            "inconsistent"
        } else if self.auto {
            "recording"
        } else {
            "disabled"
        }
    }

    /// True when the in-use flag is set while no process has the image open: a QEMU died with
    /// the bitmap loaded, and it may miss writes.
    pub fn inconsistent(&self, image_open: bool) -> bool {
        self.in_use && !image_open
    }

    /// One line for `plan` and `status`: name, granularity and state.
    pub fn describe(&self, image_open: bool) -> String {
        let state = match self.state(image_open) {
            _ if self.inconsistent(image_open) => {
                "INCONSISTENT: its in-use flag was left by a QEMU that did not close the image, so it may miss writes; a backup tool must not trust it (remove it with `qemu-img bitmap --remove`, or delete its libvirt checkpoint, and take a full backup)"
            }
            s => s,
        };
        format!(
            "{} ({} granularity, {state})",
            self.name,
            crate::units::human_bytes(self.granularity)
        )
    }
}

/// A persistent dirty bitmap as the image's bitmap directory records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Bitmap {
    /// Its name (a libvirt checkpoint's bitmap is named after the checkpoint).
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// Flag `in_use`: a QEMU has the image open with the bitmap loaded, or had and did not
    /// store it (it crashed): then the bitmap is inconsistent and must not be trusted.
    pub in_use: bool,
    /// Flag `auto`: the bitmap is enabled, recording every guest write.
    pub auto: bool,
}

impl Extras {
    /// True when there is nothing beside the guest data.
    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty() && self.bitmaps.is_empty()
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn read_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), Qcow2Error> {
    file.read_exact_at(buf, offset)
        .map_err(|source| Qcow2Error::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Reads and checks the header of `path` (already open as `file`).
pub fn read_header(file: &File, path: &Path) -> Result<Header, Qcow2Error> {
    let invalid = |what: String| Qcow2Error::Invalid {
        path: path.to_path_buf(),
        what,
    };
    let file_len = file_len(file, path)?;
    let mut h = [0u8; 112];
    let n = h.len().min(file_len as usize);
    if n < 72 {
        return Err(invalid("file shorter than a qcow2 header".into()));
    }
    read_at(file, path, &mut h[..n], 0)?;
    if h[..4] != MAGIC {
        return Err(invalid("bad magic".into()));
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(invalid(format!("version {version} (only 2 and 3 exist)")));
    }
    let backing_offset = be64(&h, 8);
    let backing_size = be32(&h, 16);
    let cluster_bits = be32(&h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(invalid(format!(
            "cluster_bits {cluster_bits} outside 9..=21"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;
    let virtual_size = be64(&h, 24);
    let crypt = be32(&h, 32);
    let l1_size = be32(&h, 36);
    let l1_offset = be64(&h, 40);
    let (incompatible, header_length) = if version >= 3 {
        if n < 104 {
            return Err(invalid("v3 header truncated".into()));
        }
        (be64(&h, 72), u64::from(be32(&h, 100)))
    } else {
        (0, 72)
    };
    let unsupported = |feature, advice| Qcow2Error::Unsupported {
        path: path.to_path_buf(),
        feature,
        advice,
    };
    if crypt != 0 {
        return Err(unsupported(
            "encryption",
            "decrypt it with `qemu-img convert` first",
        ));
    }
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(invalid(
            "the corrupt bit is set; repair it with `qemu-img check -r all`".into(),
        ));
    }
    if incompatible & INCOMPAT_DIRTY != 0 {
        return Err(invalid(
            "the dirty bit is set (not closed cleanly); if no process uses it, repair it with `qemu-img check -r all`".into(),
        ));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(unsupported(
            "an external data file",
            "convert it to a self-contained image with `qemu-img convert -O qcow2`",
        ));
    }
    if incompatible & INCOMPAT_EXTL2 != 0 {
        return Err(unsupported(
            "extended L2 entries (subclusters)",
            "convert it with `qemu-img convert -O qcow2 -o extended_l2=off`",
        ));
    }
    let unknown = incompatible
        & !(INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2);
    if unknown != 0 {
        return Err(invalid(format!(
            "unknown incompatible feature bits {unknown:#x}"
        )));
    }
    let l1_bytes = u64::from(l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(invalid(format!(
            "L1 table of {l1_size} entries is larger than QEMU accepts (32 MiB)"
        )));
    }
    let clusters = virtual_size.div_ceil(cluster_size);
    let needed_l1 = clusters.div_ceil(cluster_size / 8);
    let nb_snapshots = be32(&h, 60);
    let snapshots_offset = be64(&h, 64);
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(invalid(format!(
            "{nb_snapshots} internal snapshots (QEMU accepts at most {MAX_SNAPSHOTS})"
        )));
    }
    let autoclear = if version >= 3 { be64(&h, 88) } else { 0 };
    if u64::from(l1_size) < needed_l1 {
        return Err(invalid(format!(
            "L1 table has {l1_size} entries, {needed_l1} needed for the virtual size"
        )));
    }
    if l1_size > 0
        && (!l1_offset.is_multiple_of(cluster_size)
            || l1_offset.saturating_add(l1_bytes) > file_len)
    {
        return Err(invalid(format!(
            "L1 table at {l1_offset:#x} lies outside the file"
        )));
    }

    let backing_file = if backing_offset != 0 && backing_size > 0 {
        if backing_size > 1023 || backing_offset.saturating_add(u64::from(backing_size)) > file_len
        {
            return Err(invalid("backing file name out of bounds".into()));
        }
        let mut name = vec![0u8; backing_size as usize];
        read_at(file, path, &mut name, backing_offset)?;
        Some(
            String::from_utf8(name).map_err(|_| Qcow2Error::Unsupported {
                path: path.to_path_buf(),
                feature: "a backing file name that is not UTF-8",
                advice: "rename the backing file and record the new name with `qemu-img rebase -u`",
            })?,
        )
    } else {
        None
    };

    // Header extensions: the backing format, and where the bitmaps are described.
    let mut backing_format = None;
    let mut bitmaps = None;
    for (kind, at, len) in extensions(file, path, header_length, backing_offset, cluster_size)? {
        if kind == EXT_BACKING_FORMAT {
            let mut f = vec![0u8; len as usize];
            read_at(file, path, &mut f, at)?;
            backing_format = Some(String::from_utf8_lossy(&f).into_owned());
        }
        if kind == EXT_BITMAPS && len >= 24 && autoclear & 1 != 0 {
            let mut b = [0u8; 24];
            read_at(file, path, &mut b, at)?;
            let ext = BitmapsExt {
                count: be32(&b, 0),
                directory_size: be64(&b, 8),
                directory_offset: be64(&b, 16),
            };
            if ext.count > MAX_BITMAPS
                || ext.directory_size > MAX_BITMAP_DIRECTORY
                || ext.directory_offset.saturating_add(ext.directory_size) > file_len
            {
                return Err(invalid("bitmap directory out of bounds".into()));
            }
            bitmaps = Some(ext);
        }
    }

    Ok(Header {
        version,
        virtual_size,
        cluster_size,
        backing_file,
        backing_format,
        l1_size,
        l1_offset,
        incompatible,
        nb_snapshots,
        snapshots_offset,
        bitmaps,
    })
}

/// The names of the internal snapshots and persistent bitmaps `h` records.
pub fn read_extras(file: &File, path: &Path, h: &Header) -> Result<Extras, Qcow2Error> {
    let invalid = |what: &str| Qcow2Error::Invalid {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    let file_len = file_len(file, path)?;
    let mut out = Extras::default();
    let mut off = h.snapshots_offset;
    for _ in 0..h.nb_snapshots {
        let mut e = [0u8; 40];
        if off.saturating_add(40) > file_len {
            return Err(invalid("snapshot table out of bounds"));
        }
        read_at(file, path, &mut e, off)?;
        let id_len = u64::from(u16::from_be_bytes([e[12], e[13]]));
        let name_len = u64::from(u16::from_be_bytes([e[14], e[15]]));
        let extra = u64::from(be32(&e, 36));
        let name_at = off + 40 + extra + id_len;
        if extra > 1 << 16 || name_at.saturating_add(name_len) > file_len {
            return Err(invalid("snapshot table out of bounds"));
        }
        let mut name = vec![0u8; name_len as usize];
        read_at(file, path, &mut name, name_at)?;
        out.snapshots
            .push(String::from_utf8_lossy(&name).into_owned());
        off = (name_at + name_len).div_ceil(8) * 8;
    }
    if let Some(b) = h.bitmaps {
        let mut dir = vec![0u8; b.directory_size as usize];
        read_at(file, path, &mut dir, b.directory_offset)?;
        let mut at = 0usize;
        for _ in 0..b.count {
            if at + 24 > dir.len() {
                return Err(invalid("bitmap directory truncated"));
            }
            let flags = be32(&dir, at + 12);
            let granularity_bits = u32::from(dir[at + 17]).min(63);
            let name_len = usize::from(u16::from_be_bytes([dir[at + 18], dir[at + 19]]));
            let extra = be32(&dir, at + 20) as usize;
            let name_at = at + 24 + extra;
            if name_at + name_len > dir.len() {
                return Err(invalid("bitmap directory truncated"));
            }
            out.bitmaps.push(Bitmap {
                name: String::from_utf8_lossy(&dir[name_at..name_at + name_len]).into_owned(),
                granularity: 1u64 << granularity_bits,
                in_use: flags & 1 != 0,
                auto: flags & 2 != 0,
            });
            at = (name_at + name_len).div_ceil(8) * 8;
        }
    }
    Ok(out)
}

/// The references a qcow (v1), qcow2 or qcow2-like header records, read leniently: whatever
/// its features, dirty or corrupt bits, encryption or name encoding, so that the host scan
/// knows what the image may use. Only bounds are checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawRefs {
    /// The backing file name as recorded (any bytes).
    pub backing: Option<Vec<u8>>,
    /// The external data file name (qcow2 v3 extension).
    pub data_file: Option<Vec<u8>>,
}

/// Reads the references of a file that starts with the qcow magic (any version).
pub fn read_refs(file: &File, path: &Path) -> Result<RawRefs, Qcow2Error> {
    let invalid = |what: &str| Qcow2Error::Invalid {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    let file_len = file_len(file, path)?;
    let mut h = [0u8; 104];
    let n = h.len().min(file_len as usize);
    if n < 20 {
        return Err(invalid("file shorter than a qcow header"));
    }
    read_at(file, path, &mut h[..n], 0)?;
    let version = be32(&h, 4);
    let backing_offset = be64(&h, 8);
    let backing_size = be32(&h, 16);
    let mut out = RawRefs::default();
    if backing_offset != 0 && backing_size > 0 {
        if backing_size > 4096 || backing_offset.saturating_add(u64::from(backing_size)) > file_len
        {
            return Err(invalid("backing file name out of bounds"));
        }
        let mut name = vec![0u8; backing_size as usize];
        read_at(file, path, &mut name, backing_offset)?;
        out.backing = Some(name);
    }
    if version >= 3 && n >= 104 {
        let cluster_size = 1u64 << be32(&h, 20).clamp(9, 21);
        let header_length = u64::from(be32(&h, 100)).max(72);
        for (kind, at, len) in extensions(file, path, header_length, backing_offset, cluster_size)?
        {
            if kind == EXT_DATA_FILE {
                let mut f = vec![0u8; len as usize];
                read_at(file, path, &mut f, at)?;
                out.data_file = Some(f);
            }
        }
    }
    Ok(out)
}

/// The header extensions (kind, payload offset, payload length) of a v3 image, walked as QEMU
/// walks them: from the end of the header to the end marker, all inside the first cluster (and
/// before the backing file name). An extension reaching past that is refused, so no payload is
/// longer than a cluster.
fn extensions(
    file: &File,
    path: &Path,
    header_length: u64,
    backing_offset: u64,
    cluster_size: u64,
) -> Result<Vec<(u32, u64, u64)>, Qcow2Error> {
    let file_len = file_len(file, path)?;
    let end = if backing_offset != 0 {
        backing_offset.min(cluster_size)
    } else {
        cluster_size
    }
    .min(file_len);
    let mut out = Vec::new();
    let mut off = header_length;
    while off + 8 <= end {
        let mut eh = [0u8; 8];
        read_at(file, path, &mut eh, off)?;
        let (kind, len) = (be32(&eh, 0), u64::from(be32(&eh, 4)));
        if kind == EXT_END {
            break;
        }
        if off + 8 + len > end {
            return Err(Qcow2Error::Invalid {
                path: path.to_path_buf(),
                what: format!("header extension {kind:#x} at {off:#x} reaches past the header"),
            });
        }
        out.push((kind, off + 8, len));
        off += 8 + len.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Accumulates runs of one kind of cluster, inserting them into a bitmap as ranges.
struct Runs {
    set: RoaringTreemap,
    start: u64,
    end: u64,
}

impl Runs {
    fn new() -> Self {
        Runs {
            set: RoaringTreemap::new(),
            start: 0,
            end: 0,
        }
    }
    fn push(&mut self, i: u64) {
        if i == self.end && self.end > self.start {
            self.end += 1;
        } else {
            self.flush();
            self.start = i;
            self.end = i + 1;
        }
    }
    fn flush(&mut self) {
        if self.end > self.start {
            self.set.insert_range(self.start..self.end);
        }
        self.start = 0;
        self.end = 0;
    }
    fn finish(mut self) -> RoaringTreemap {
        self.flush();
        self.set
    }
}

/// Reads the allocation map of the layer from its L1/L2 tables (indexes in clusters).
pub fn read_allocation(file: &File, path: &Path, h: &Header) -> Result<Allocation, Qcow2Error> {
    let invalid = |what: String| Qcow2Error::Invalid {
        path: path.to_path_buf(),
        what,
    };
    let file_len = file_len(file, path)?;
    let clusters = h.virtual_size.div_ceil(h.cluster_size);
    let per_l2 = h.cluster_size / 8;
    let l1_used = clusters.div_ceil(per_l2) as usize;
    let mut l1 = vec![0u8; l1_used * 8];
    if l1_used > 0 {
        read_at(file, path, &mut l1, h.l1_offset)?;
    }
    // A data cluster whose host range is a hole of the file (preallocation=metadata or falloc,
    // a discard punched through) reads as zeros: it is a zero here, as QEMU's own block status
    // and its copies see it. With an external data file the offsets are not this file's.
    let extents = if h.incompatible & INCOMPAT_DATA_FILE == 0 {
        super::fiemap::written_extents(file, file_len)
            .or_else(|| super::raw::data_extents(file, path, file_len).ok())
    } else {
        None
    };
    let mut data = Runs::new();
    let mut zero = Runs::new();
    let mut l2 = vec![0u8; h.cluster_size as usize];
    for (i, entry) in l1.chunks_exact(8).enumerate() {
        let l2_offset = u64::from_be_bytes(entry.try_into().expect("8 bytes")) & OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        if !l2_offset.is_multiple_of(h.cluster_size) || l2_offset + h.cluster_size > file_len {
            return Err(invalid(format!(
                "L2 table {i} at {l2_offset:#x} lies outside the file"
            )));
        }
        read_at(file, path, &mut l2, l2_offset)?;
        let first = i as u64 * per_l2;
        let count = per_l2.min(clusters - first) as usize;
        for (j, e) in l2.chunks_exact(8).take(count).enumerate() {
            let e = u64::from_be_bytes(e.try_into().expect("8 bytes"));
            let c = first + j as u64;
            if e & L2_COMPRESSED != 0 {
                data.push(c);
            } else if h.version >= 3 && e & L2_ZERO != 0 {
                zero.push(c);
            } else if e & OFFSET_MASK != 0 {
                let host = e & OFFSET_MASK;
                let reads_zero = extents
                    .as_deref()
                    .is_some_and(|x| super::raw::is_hole(x, host, host + h.cluster_size));
                if reads_zero {
                    zero.push(c);
                } else {
                    data.push(c);
                }
            }
        }
    }
    Ok(Allocation {
        unit: h.cluster_size,
        virtual_size: h.virtual_size,
        data: data.finish(),
        zero: zero.finish(),
    })
}
