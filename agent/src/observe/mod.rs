//! Observing real chains: walk each disk's chain from its active image down, confined to the
//! allowed roots, with every backing format explicit, cycles and foreign image locks detected, and
//! read each layer's own allocation map. Also scans the roots for every image file, so the
//! planner's graph sees overlays that no spec declares.
//!
//! This stage reads only: it opens files read-only and never runs QEMU. What to do with what it
//! sees is the planner's business.

mod fiemap;
mod lock;
pub mod qcow2;
pub mod raw;
mod roots;
pub mod scan;

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use diskchain_planner::{Allocation, Format, Layer};

pub use lock::lock_holder;
pub use roots::Roots;
pub use scan::{HostScan, scan_host};

/// The size of an open file: its length, or for a block device (qcow2 on LVM, a raw volume)
/// the device's size, which its inode reports as 0.
pub fn size_of(file: &File) -> std::io::Result<u64> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let m = file.metadata()?;
    if m.file_type().is_block_device() {
        let mut f = file;
        f.seek(std::io::SeekFrom::End(0))
    } else {
        Ok(m.len())
    }
}

/// Why a chain cannot be observed.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// Reading failed.
    #[error("failed to read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A qcow2 header or table problem.
    #[error(transparent)]
    Qcow2(#[from] qcow2::Qcow2Error),
    /// A path resolves outside every allowed root. Said as [`ObserveError::Missing`] is: an
    /// error never tells whether a file outside the roots exists, nor where a link points.
    #[error(
        "{what} {} does not exist inside the allowed roots (it is missing, or it resolves outside the allowed roots, which diskchain never touches); check the path, or move the file under an allowed root (--allowed-root)",
        path.display()
    )]
    OutsideRoots {
        /// What the path is (e.g. "the backing file of /x").
        what: String,
        /// The path as referenced.
        path: PathBuf,
        /// Where it resolves (logged, never shown: it may be outside the roots).
        resolved: PathBuf,
        /// The allowed roots.
        roots: Vec<PathBuf>,
    },
    /// A referenced file does not exist (said as [`ObserveError::OutsideRoots`] is).
    #[error(
        "{what} {} does not exist inside the allowed roots (it is missing, or it resolves outside the allowed roots, which diskchain never touches); check the path, or move the file under an allowed root (--allowed-root)",
        path.display()
    )]
    Missing {
        /// What the path is.
        what: String,
        /// The path.
        path: PathBuf,
    },
    /// A backing reference without a recorded format.
    #[error(
        "layer {} records backing file {backing:?} without a backing format; diskchain never lets QEMU probe formats. Record it with: qemu-img rebase -u -b {backing} -F <qcow2|raw> {}",
        layer.display(), layer.display()
    )]
    NoBackingFormat {
        /// The overlay.
        layer: PathBuf,
        /// Its backing reference.
        backing: String,
    },
    /// A backing format diskchain does not handle.
    #[error("layer {} records backing format {format:?}; only qcow2 and raw are supported", layer.display())]
    UnsupportedFormat {
        /// The overlay.
        layer: PathBuf,
        /// The format.
        format: String,
    },
    /// A backing reference that is not a plain file name.
    #[error("layer {} records backing {backing:?}, which is not a plain file; only file backing references are supported", layer.display())]
    NotAFile {
        /// The overlay.
        layer: PathBuf,
        /// The reference.
        backing: String,
    },
    /// The active image is not qcow2.
    #[error("the active image {} is not a qcow2 image; diskchain manages qcow2 chains (convert it with qemu-img convert -O qcow2)", path.display())]
    ActiveNotQcow2 {
        /// The file.
        path: PathBuf,
    },
    /// A layer recorded as qcow2 is not one.
    #[error("{} is recorded as qcow2 by {} but has no qcow2 header", path.display(), overlay.display())]
    NotQcow2 {
        /// The file.
        path: PathBuf,
        /// The overlay that records it.
        overlay: PathBuf,
    },
    /// Not a regular file or block device.
    #[error("{} is not a regular file or a block device; an image is one of those", path.display())]
    NotAnImage {
        /// The file.
        path: PathBuf,
    },
    /// A backing cycle.
    #[error("backing cycle: {}", files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" -> "))]
    Cycle {
        /// The files, in the order walked, ending with the repeated one.
        files: Vec<PathBuf>,
    },
}

impl ObserveError {
    /// True for input problems (exit 2); false for I/O failures (exit 1).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, ObserveError::Io { .. })
    }
}

/// One observed layer with what its header records.
#[derive(Clone, Debug)]
pub struct ObservedLayer {
    /// The planner's view: canonical path, format, canonical backing, allocation.
    pub layer: Layer,
    /// qcow2 version (0 for raw).
    pub version: u32,
    /// Cluster size (the raw mapping unit for raw).
    pub cluster_size: u64,
    /// Guest size.
    pub virtual_size: u64,
    /// The backing reference as recorded.
    pub backing_ref: Option<String>,
    /// The backing format as recorded.
    pub backing_format: Option<Format>,
    /// Size of the file on the host.
    pub file_size: u64,
    /// Set when a process holds QEMU's image lock on this file.
    pub in_use: Option<String>,
    /// Internal snapshots and persistent bitmaps the layer holds (qcow2 only).
    pub extras: qcow2::Extras,
}

/// A disk's chain as observed, base first.
#[derive(Clone, Debug)]
pub struct ObservedChain {
    /// The layers, base first, active last.
    pub layers: Vec<ObservedLayer>,
}

impl ObservedChain {
    /// The active layer.
    pub fn active(&self) -> &ObservedLayer {
        self.layers.last().expect("a chain has an active layer")
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ObserveError + '_ {
    move |source| ObserveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn parse_format(layer: &Path, f: &str) -> Result<Format, ObserveError> {
    match f {
        "qcow2" => Ok(Format::Qcow2),
        "raw" => Ok(Format::Raw),
        other => Err(ObserveError::UnsupportedFormat {
            layer: layer.to_path_buf(),
            format: other.to_string(),
        }),
    }
}

/// Resolves a recorded backing reference relative to the overlay's directory (as QEMU does: the
/// directory of the overlay's path as it was opened, before symlinks are resolved).
fn resolve_backing(
    overlay_as_opened: &Path,
    overlay: &Path,
    reference: &str,
) -> Result<PathBuf, ObserveError> {
    // `file:` names the file protocol explicitly: the rest is a plain file name.
    let reference = reference.strip_prefix("file:").unwrap_or(reference);
    if reference.starts_with("json:") || reference.contains("://") {
        return Err(ObserveError::NotAFile {
            layer: overlay.to_path_buf(),
            backing: reference.to_string(),
        });
    }
    let r = Path::new(reference);
    Ok(if r.is_absolute() {
        r.to_path_buf()
    } else {
        overlay_as_opened.parent().unwrap_or(Path::new("/")).join(r)
    })
}

/// Walks the chain under `active`, reading every layer's allocation.
pub fn observe_chain(roots: &Roots, active: &Path) -> Result<ObservedChain, ObserveError> {
    let mut layers = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut walked: Vec<PathBuf> = Vec::new();
    let mut as_opened = active.to_path_buf();
    let mut path = roots.confine(active, "the active image".to_string())?;
    let mut format = Format::Qcow2;
    let mut overlay: Option<PathBuf> = None;
    loop {
        if !seen.insert(path.clone()) {
            walked.push(path);
            return Err(ObserveError::Cycle { files: walked });
        }
        walked.push(path.clone());
        let file = open_image(&path)?;
        let file_size = size_of(&file).map_err(io(&path))?;
        let in_use = lock_holder(&file).map_err(io(&path))?;
        let is_qcow2 = qcow2::has_magic(&file);
        let observed = match format {
            Format::Qcow2 => {
                if !is_qcow2 {
                    return Err(match &overlay {
                        None => ObserveError::ActiveNotQcow2 { path },
                        Some(o) => ObserveError::NotQcow2 {
                            path,
                            overlay: o.clone(),
                        },
                    });
                }
                let h = qcow2::read_header(&file, &path)?;
                let alloc = qcow2::read_allocation(&file, &path, &h)?;
                let extras = qcow2::read_extras(&file, &path, &h)?;
                let backing_format = match (&h.backing_file, &h.backing_format) {
                    (Some(b), None) => {
                        return Err(ObserveError::NoBackingFormat {
                            layer: path,
                            backing: b.clone(),
                        });
                    }
                    (Some(_), Some(f)) => Some(parse_format(&path, f)?),
                    (None, _) => None,
                };
                ObservedLayer {
                    layer: Layer {
                        path: path.clone(),
                        format,
                        backing: None,
                        alloc: Some(alloc),
                    },
                    version: h.version,
                    cluster_size: h.cluster_size,
                    virtual_size: h.virtual_size,
                    backing_ref: h.backing_file.clone(),
                    backing_format,
                    file_size,
                    in_use,
                    extras,
                }
            }
            Format::Raw => {
                let alloc: Allocation = raw::read_allocation(&file, &path).map_err(io(&path))?;
                ObservedLayer {
                    layer: Layer {
                        path: path.clone(),
                        format,
                        backing: None,
                        alloc: Some(alloc),
                    },
                    version: 0,
                    cluster_size: raw::RAW_UNIT,
                    virtual_size: file_size,
                    backing_ref: None,
                    backing_format: None,
                    file_size,
                    in_use,
                    extras: qcow2::Extras::default(),
                }
            }
        };
        let next = match (&observed.backing_ref, observed.backing_format) {
            (Some(r), Some(f)) => Some((resolve_backing(&as_opened, &path, r)?, f)),
            _ => None,
        };
        layers.push(observed);
        let Some((next_path, next_format)) = next else {
            break;
        };
        let what = format!("the backing file of {}", path.display());
        let canonical = roots.confine(&next_path, what)?;
        layers.last_mut().expect("just pushed").layer.backing = Some(canonical.clone());
        overlay = Some(path);
        as_opened = next_path;
        path = canonical;
        format = next_format;
    }
    layers.reverse();
    Ok(ObservedChain { layers })
}

/// The backing file `path` records (resolved, confined to the roots), reading only its header.
/// `None` for a raw file or a qcow2 without backing file.
pub fn backing_of(roots: &Roots, path: &Path) -> Result<Option<(PathBuf, Format)>, ObserveError> {
    let file = open_image(path)?;
    if !qcow2::has_magic(&file) {
        return Ok(None);
    }
    let h = qcow2::read_header(&file, path)?;
    match (&h.backing_file, &h.backing_format) {
        (None, _) => Ok(None),
        (Some(b), None) => Err(ObserveError::NoBackingFormat {
            layer: path.to_path_buf(),
            backing: b.clone(),
        }),
        (Some(b), Some(f)) => {
            let format = parse_format(path, f)?;
            let resolved = resolve_backing(path, path, b)?;
            let canonical =
                roots.confine(&resolved, format!("the backing file of {}", path.display()))?;
            Ok(Some((canonical, format)))
        }
    }
}

/// The backing reference a qcow2 image's header records: as written (for writing it back
/// unchanged) and resolved against the image's directory as QEMU would, whether or not that
/// file exists. `None` for a raw image or one with no backing file.
pub fn recorded_backing(path: &Path) -> Result<Option<(String, PathBuf)>, ObserveError> {
    let file = open_image(path)?;
    if !qcow2::has_magic(&file) {
        return Ok(None);
    }
    let h = qcow2::read_header(&file, path)?;
    h.backing_file
        .map(|b| Ok((b.clone(), resolve_backing(path, path, &b)?)))
        .transpose()
}

/// The virtual size of an image of a known format (a raw file's length, or a block device's
/// size).
pub fn virtual_size(path: &Path, format: Format) -> Result<u64, ObserveError> {
    let file = open_image(path)?;
    match format {
        Format::Qcow2 => Ok(qcow2::read_header(&file, path)?.virtual_size),
        Format::Raw => size_of(&file).map_err(io(path)),
    }
}

/// The backing file an image's header names, resolved as QEMU would (relative to the image's
/// directory, symlinks resolved), without confining it to the roots: for following the chains of
/// images diskchain does not manage (another domain's disk). `None` when there is none or it
/// cannot be read.
pub fn header_backing(path: &Path) -> Option<PathBuf> {
    let file = open_image(path).ok()?;
    if !qcow2::has_magic(&file) {
        return None;
    }
    let refs = qcow2::read_refs(&file, path).ok()?;
    let name = refs.backing?;
    scan::reference_targets(path, &name)
        .ok()?
        .into_iter()
        .find_map(|p| p.canonicalize().ok())
}

/// The allocation of one image file of a known format on its own (qcow2 from its tables, raw
/// from its holes).
pub fn allocation_of(
    path: &Path,
    format: Format,
) -> Result<diskchain_planner::Allocation, ObserveError> {
    let file = open_image(path)?;
    match format {
        Format::Qcow2 => {
            let h = qcow2::read_header(&file, path)?;
            Ok(qcow2::read_allocation(&file, path, &h)?)
        }
        Format::Raw => raw::read_allocation(&file, path).map_err(io(path)),
    }
}

/// Opens an image read-only. Only regular files and block devices are opened: a FIFO or a
/// character device at a layer's path would block or never end.
pub fn open_image(path: &Path) -> Result<File, ObserveError> {
    use std::os::unix::fs::FileTypeExt;
    let m = std::fs::metadata(path).map_err(io(path))?;
    let ft = m.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(ObserveError::NotAnImage {
            path: path.to_path_buf(),
        });
    }
    File::open(path).map_err(io(path))
}
