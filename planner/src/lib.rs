//! Pure planning of QEMU backing-chain changes.
//!
//! Observed layers go in by value; a [`DiskPlan`] per disk comes out: the cheapest sequence of
//! steps (snapshot, stream, commit, copy, rebase, delete) that turns the real chain into the one
//! the spec wants, costed in bytes written. No I/O, no processes, no clocks: deterministic.
//!
//! ```text
//!   Layer{path, backing, alloc} ──▶ ImageGraph (petgraph: overlay ──▶ backing)
//!                                     │   shared layers, cycles, orphans
//!   DiskRequest{active, keep, ...} ──▶ plan_disk ──▶ DiskPlan{steps, decisions, baselines}
//!
//!   chain   L0 ← L1 ← L2 ← L3 ← L4 ← L5(active)
//!   keep         ^P1            ^P2
//!   runs   [L0]  u=L1   [L2 L3] u=L4  [L5's run is empty]
//! ```
//!
//! The kept points cut the chain into independent *runs* of layers to remove, each ending at the
//! kept layer `u` above it. One file `h` of the run (or `u` itself) ends up holding point `u`:
//! commit `(h, u]` into `h`, then stream the rest of the run below `h` into it. Choosing `h` per
//! run is the whole decision; `h` must not be shared. The run below the active layer can only be
//! streamed into the active layer, which keeps its path. With a placement directory a run may
//! instead be copied, merged on the way, into a new file there (reading shared layers is fine).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod alloc;
mod error;
mod graph;
mod plan;
mod search;

pub use alloc::{Allocation, ClusterState};
pub use error::PlanError;
pub use graph::{Format, ImageGraph, Layer};
pub use plan::{
    Alternative, Baselines, DiskPlan, DiskRequest, FinalLayer, KeptPoint, Mode, RunDecision, Step,
    StepAction, plan_disk,
};
