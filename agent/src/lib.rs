//! The diskchain agent: command line, observers, planning glue, executors, the journal, the
//! reconcile loop and output.
//!
//! The pipeline reads top to bottom, one module per stage:
//!
//! ```text
//!  specs (crd::load_path) ─▶ observe (chains, allocation, locks, root scan)
//!     ─▶ bind (spec + state ─▶ planner::DiskRequest) ─▶ planner::plan_disk (plan.rs)
//!     ─▶ render (`plan`)  or  journal + execute (`apply`, one disk at a time)
//!  reconcile: the agent runs plan and apply in a loop over a watched spec directory
//! ```
//!
//! Only `execute` and `libvirt` (the live backend) write images, and only for steps `apply` has
//! journaled.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod apply;
pub mod backup;
pub mod bind;
pub mod cli;
pub mod execute;
pub mod journal;
pub mod kubernetes;
pub mod libvirt;
pub mod observe;
pub mod outcome;
pub mod plan;
pub mod progress;
pub mod reconcile;
pub mod render;
pub mod resume;
pub mod state;
pub mod status;
pub mod units;
