//! Executing plan steps. A backend runs one step it is given; it never decides which. Every step
//! checks its preconditions before it changes anything, and every step is idempotent: running an
//! interrupted or finished step again is safe, which is what journal recovery relies on.
//!
//! Backends: [`offline::Offline`] drives `qemu-img` on images no process has open;
//! the libvirt backend (the sibling module `libvirt`, feature `libvirt`, which depends on this one)
//! implements [`Executor`] with libvirt's block jobs on the disks of
//! running VMs.

pub(crate) mod bitmaps;
pub mod offline;
pub(crate) mod process;
pub(crate) mod qemu_img;
#[allow(unsafe_code)]
pub(crate) mod qsd;
#[allow(unsafe_code)]
mod xattr;

pub use process::terminate_running;

use std::path::PathBuf;

use diskchain_planner::StepAction;

use crate::observe::ObserveError;

/// The hidden file `.NAME.SUFFIX` beside `file` (a step's scratch file), whatever bytes the
/// name holds.
pub(crate) fn beside(file: &std::path::Path, suffix: &str) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(file.file_name().unwrap_or_default());
    name.push(".");
    name.push(suffix);
    file.with_file_name(name)
}

/// What running a step did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepReport {
    /// Bytes the QEMU processes wrote (`wchar` of `/proc/PID/io`: data and metadata).
    pub written_bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Why a step failed. Nothing is left half-done that the journal cannot resume.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A file is open in another process.
    #[error(
        "{} is in use by {holder} (it holds QEMU's image lock); diskchain never writes an image in use: stop that process, or manage the disk through libvirt",
        file.display()
    )]
    InUse {
        /// The file.
        file: PathBuf,
        /// Who holds the lock.
        holder: String,
    },
    /// What the disk shows does not fit the step: refused without touching anything.
    #[error("refusing to run {op} on {}: {what}; the chain was changed outside diskchain or the plan is stale (run `diskchain plan` to see the chain now)", file.display())]
    Precondition {
        /// The step's operation.
        op: &'static str,
        /// The file concerned.
        file: PathBuf,
        /// What does not fit.
        what: String,
    },
    /// Something outside the plan's control stands in the way for now (a block job someone else
    /// started, a paused domain): nothing was done by this step; it runs once that has passed.
    #[error("{op} on {} cannot run now: {what}", file.display())]
    NotNow {
        /// The step's operation.
        op: &'static str,
        /// The file concerned.
        file: PathBuf,
        /// What stands in the way and what to do.
        what: String,
    },
    /// The shutdown's grace period ran out while the step waited on a libvirt block job.
    #[error(
        "the grace period of a shutdown ran out while {op} waited on its block job; the job runs on in QEMU, the step stays journaled, and the next start adopts the job"
    )]
    Abandoned {
        /// The step's operation.
        op: &'static str,
    },
    /// An image the step would write fails `qemu-img check`.
    #[error(
        "refusing to run {op}: {} fails `qemu-img check` ({report}); writing into an image with damaged metadata can overwrite live data. Nothing was written. Inspect it with `qemu-img check {}` and repair a copy first",
        file.display(), file.display()
    )]
    Corrupt {
        /// The step's operation.
        op: &'static str,
        /// The image.
        file: PathBuf,
        /// What `qemu-img check` said.
        report: String,
    },
    /// A QEMU tool failed.
    #[error("{command} failed ({status}): {stderr}")]
    Qemu {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// File system I/O.
    #[error("failed to {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Another backend failed (libvirt: libvirtd down, the domain gone, a job refused). The
    /// backends depend on this module, never the other way round: each converts its own error.
    #[error("{source}")]
    Backend {
        /// The backend's error.
        source: Box<dyn std::error::Error + Send + Sync>,
        /// The input is at fault (nothing was touched).
        bad_input: bool,
    },
    /// A live job did not catch up with the guest within its time budget and was cancelled.
    #[error(
        "domain {domain} disk {disk}: the block job did not catch up with the guest's writes within {within} (spec.source.libvirt.converge.within) and was cancelled; the chain is as it was and every kept point reads as before, but the layer the commit wrote into (one this plan removes) may already hold part of the committed data. Retry when the guest writes less, or set converge.then to wait or throttle"
    )]
    NotConverged {
        /// The domain.
        domain: String,
        /// The disk target.
        disk: String,
        /// The budget.
        within: String,
    },
    /// A file could not be observed.
    #[error(transparent)]
    Observe(#[from] ObserveError),
}

impl ExecError {
    /// True when the operator must act before anything can proceed (exit 2); false for failures
    /// that may pass (exit 1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            ExecError::Precondition { .. } | ExecError::Observe(_) | ExecError::Corrupt { .. } => {
                true
            }
            ExecError::Backend { bad_input, .. } => *bad_input,
            _ => false,
        }
    }
}

/// Options every backend honours.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecOptions {
    /// QEMU's own rate limit for copying, in bytes per second.
    pub max_bytes_per_sec: Option<u64>,
}

/// Runs plan steps.
pub trait Executor {
    /// Runs one step to completion, reporting progress as a fraction in `0.0..=1.0`.
    fn run(
        &self,
        step: &StepAction,
        progress: &mut dyn FnMut(f64),
    ) -> Result<StepReport, ExecError>;

    /// Tidies what an interrupted run of `step` may have left (before it is run again).
    fn prepare_resume(&self, step: &StepAction) -> Result<(), ExecError> {
        let _ = step;
        Ok(())
    }

    /// Tidies what an interrupted run of `step` left when its plan is set aside (it will not
    /// run again): as [`Executor::prepare_resume`], and a job of the step still running (a live
    /// block job, in QEMU) is cancelled without being finished.
    fn abandon(&self, step: &StepAction) -> Result<(), ExecError> {
        self.prepare_resume(step)
    }
}
