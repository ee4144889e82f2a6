//! Where a disk's reconcile reports what it does while it does it. The reconcile itself logs
//! (structured, for every driver); an observer adds what its driver shows: the CLI a progress
//! bar or plain lines, the agent its metrics, a second driver (Kubernetes events) its own.

use std::io::IsTerminal;
use std::sync::Mutex;

use diskchain_crd::DiskKey;
use indicatif::{ProgressBar, ProgressStyle};

use crate::units::human_bytes;

/// One step as it ran.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StepRecord {
    /// The operation.
    pub op: String,
    /// Data bytes predicted.
    pub predicted_bytes: u64,
    /// Bytes QEMU wrote.
    pub written_bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// What a reconcile tells its driver as it goes. Every method has a default that does nothing.
pub trait Progress: Send + Sync {
    /// A new plan for disk `disk` is about to run (journaled, its first step not yet started).
    fn planned(&self, disk: &DiskKey, steps: &[diskchain_planner::Step]) {
        let _ = (disk, steps);
    }

    /// Step `index` (1-based) of `total` of disk `disk` starts; it is predicted to write `bytes`.
    fn step_started(&self, disk: &DiskKey, index: usize, total: usize, op: &str, bytes: u64) {
        let _ = (disk, index, total, op, bytes);
    }

    /// The running step has done `fraction` (0 to 1) of its work.
    fn step_progress(&self, fraction: f64) {
        let _ = fraction;
    }

    /// The step ended well.
    fn step_done(&self, disk: &DiskKey, index: usize, total: usize, record: &StepRecord) {
        let _ = (disk, index, total, record);
    }

    /// The running step ended without finishing (an error or a stop).
    fn step_abandoned(&self) {}

    /// Something the operator should see that is not a step (a plan set aside).
    fn note(&self, disk: &DiskKey, message: &str) {
        let _ = (disk, message);
    }
}

/// Reports nothing (the reconcile's logs still go out).
#[derive(Debug, Default)]
pub struct Silent;

impl Progress for Silent {}

/// The CLI's observer: a progress bar with bytes and rate per step on a terminal, one plain line
/// per step otherwise, on stdout.
#[derive(Debug)]
pub struct Terminal {
    bar: bool,
    current: Mutex<Option<(ProgressBar, u64)>>,
}

impl Terminal {
    /// A bar when stdout is a terminal, plain lines otherwise.
    pub fn detect() -> Terminal {
        Terminal {
            bar: std::io::stdout().is_terminal(),
            current: Mutex::new(None),
        }
    }

    fn label(disk: &DiskKey, index: usize, total: usize, op: &str) -> String {
        format!("{disk}: {index}/{total} {op}")
    }

    fn clear(&self) {
        if let Ok(mut c) = self.current.lock()
            && let Some((b, _)) = c.take()
        {
            b.finish_and_clear();
        }
    }
}

impl Progress for Terminal {
    fn step_started(&self, disk: &DiskKey, index: usize, total: usize, op: &str, bytes: u64) {
        if !self.bar {
            return;
        }
        let b = ProgressBar::new(bytes.max(1));
        b.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_message(Self::label(disk, index, total, op));
        if let Ok(mut c) = self.current.lock() {
            *c = Some((b, bytes.max(1)));
        }
    }

    fn step_progress(&self, fraction: f64) {
        if let Ok(c) = self.current.lock()
            && let Some((b, len)) = c.as_ref()
        {
            b.set_position((fraction * *len as f64) as u64);
        }
    }

    fn step_done(&self, disk: &DiskKey, index: usize, total: usize, r: &StepRecord) {
        self.clear();
        let _ = writeln_out(format_args!(
            "{} done: {} predicted, {} written by QEMU, {:.2} s",
            Self::label(disk, index, total, &r.op),
            human_bytes(r.predicted_bytes),
            human_bytes(r.written_bytes),
            r.seconds
        ));
    }

    fn step_abandoned(&self) {
        self.clear();
    }

    fn note(&self, disk: &DiskKey, message: &str) {
        let _ = writeln_out(format_args!("{disk}: {message}"));
    }
}

/// Prints a line on stdout; a closed stdout (a pipe whose reader went away) is not an error
/// worth stopping a plan for: the journal and the logs keep the record.
fn writeln_out(args: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    out.write_all(b"\n")
}
