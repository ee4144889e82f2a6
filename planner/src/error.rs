//! Why a plan cannot be made.

use std::path::PathBuf;

/// Why no plan exists for a disk. Nothing has been touched when one of these is returned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The active image is not among the observed layers.
    #[error("disk {disk}: the active image {} was not observed", active.display())]
    UnknownActive {
        /// The disk.
        disk: String,
        /// Its active image.
        active: PathBuf,
    },
    /// A kept point is bound to a file that is not a backing layer of this disk's chain.
    #[error(
        "disk {disk}: point {point:?} is bound to {} which is not a backing layer of this disk's chain; bind it to one of: {}",
        file.display(),
        chain.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotInChain {
        /// The disk.
        disk: String,
        /// The point.
        point: String,
        /// The file it is bound to.
        file: PathBuf,
        /// The backing layers there are, base first.
        chain: Vec<PathBuf>,
    },
    /// Points are listed in an order the chain does not have.
    #[error(
        "disk {disk}: point {later:?} is listed after {earlier:?} but lies below it in the chain; list points oldest (base) first"
    )]
    OutOfOrder {
        /// The disk.
        disk: String,
        /// The point listed first.
        earlier: String,
        /// The point listed after it.
        later: String,
    },
    /// Removing points would mean writing a shared layer, and no other way exists.
    #[error(
        "disk {disk}: cannot remove {} below point {point:?}: every file that could hold the point is shared ({} is used by {}); keep those points, or set spec.placement to copy the chain",
        removing.join(", "),
        blocker.display(),
        used_by.display()
    )]
    BlockedByShared {
        /// The disk.
        disk: String,
        /// The kept point (or `active`) above the run.
        point: String,
        /// What would be removed.
        removing: Vec<String>,
        /// The shared layer that blocks it.
        blocker: PathBuf,
        /// An overlay of another chain that uses it.
        used_by: PathBuf,
    },
    /// A revert would drop kept points from the chain.
    #[error(
        "disk {disk}: spec.revert.to {point:?} lies below the kept points {}: a revert drops every layer above the point it reverts to; remove those points from spec.snapshots first (their files are kept), or revert to a later point",
        above.join(", ")
    )]
    RevertDropsPoints {
        /// The disk.
        disk: String,
        /// The point reverted to.
        point: String,
        /// The kept points above it.
        above: Vec<String>,
    },
    /// A revert would replace an active image that another image reads.
    #[error(
        "disk {disk}: spec.revert cannot replace the active image {}: {} uses it (as its backing file or another name), and its view would change; remove or rebase that image first",
        active.display(), used_by.display()
    )]
    RevertSharedActive {
        /// The disk.
        disk: String,
        /// The active image.
        active: PathBuf,
        /// Who uses it.
        used_by: PathBuf,
    },
    /// A new snapshot asked of a chain of points (a backup repository): its points are made by
    /// backups, not snapshots.
    #[error(
        "{disk}: a new point {point:?} was asked of a chain whose every layer is a point (its newest is {newest:?}); such a chain gets new points from backups, not snapshots"
    )]
    SnapshotOfPoints {
        /// The chain.
        disk: String,
        /// The point asked for.
        point: String,
        /// The newest point.
        newest: String,
    },
    /// A backing cycle: corrupt input.
    #[error("backing cycle: {}", files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" -> "))]
    Cycle {
        /// The files in the cycle.
        files: Vec<PathBuf>,
    },
}
