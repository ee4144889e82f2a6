//! The diskchain agent: command line, observers, planning glue and output.
//!
//! The pipeline reads top to bottom, one module per stage:
//!
//! ```text
//!  specs (crd::load_path) ─▶ observe (chains, allocation, locks, root scan)
//!     ─▶ bind (spec + state ─▶ planner::DiskRequest) ─▶ planner::plan_disk ─▶ render
//! ```
//!
//! `plan` stops after rendering; nothing here writes an image.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod apply;
pub mod bind;
pub mod cli;
pub mod execute;
pub mod journal;
pub mod observe;
pub mod plan;
pub mod reconcile;
pub mod render;
pub mod state;
pub mod status;
pub mod units;
