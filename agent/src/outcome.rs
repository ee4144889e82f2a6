//! How one disk's reconcile ended, typed: what the agent records in `agent.json` and its
//! metrics, `status` shows, and a Kubernetes driver turns into conditions and events.

use diskchain_crd::DiskKey;
use serde::{Deserialize, Serialize};

use crate::plan::ErrorKind;
use crate::progress::StepRecord;

/// How a disk's last reconcile ended (or that one is running), as `agent.json`, `status` and
/// the `diskchain_reconciles_total` metric name it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The chain matches the spec; nothing to do.
    InSync,
    /// A plan ran to its end.
    Ok,
    /// The spec, chain or binding is at fault; nothing was touched.
    BadInput,
    /// An image of the disk is open in another process.
    InUse,
    /// Something failed that may pass; retried with backoff.
    Failed,
    /// Stopped for a shutdown; resumes on the next start.
    Stopped,
    /// Waiting for the operator (the error says what to do); not retried until the spec or the
    /// journal changes.
    NeedsOperator,
    /// `spec.suspend`: left alone.
    Suspended,
    /// A reconcile is running.
    #[default]
    Running,
}

impl Outcome {
    /// The name as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::InSync => "in_sync",
            Outcome::Ok => "ok",
            Outcome::BadInput => "bad_input",
            Outcome::InUse => "in_use",
            Outcome::Failed => "failed",
            Outcome::Stopped => "stopped",
            Outcome::NeedsOperator => "needs_operator",
            Outcome::Suspended => "suspended",
            Outcome::Running => "running",
        }
    }
}

impl From<ErrorKind> for Outcome {
    fn from(k: ErrorKind) -> Self {
        match k {
            ErrorKind::BadInput => Outcome::BadInput,
            ErrorKind::InUse => Outcome::InUse,
            ErrorKind::Failed => Outcome::Failed,
            ErrorKind::Stopped => Outcome::Stopped,
            ErrorKind::NeedsOperator => Outcome::NeedsOperator,
        }
    }
}

/// One disk's reconcile, as it ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DiskResult {
    /// The disk.
    #[serde(flatten)]
    pub key: DiskKey,
    /// How it ended.
    pub outcome: Outcome,
    /// What went wrong and what to do (`None` when it went well).
    pub message: Option<String>,
    /// The steps that ran, in order.
    pub steps: Vec<StepRecord>,
    /// Data bytes the plans predicted for them.
    pub predicted_bytes: u64,
    /// Bytes the QEMU processes wrote for them.
    pub written_bytes: u64,
}

impl DiskResult {
    /// A reconcile of `key` that failed before it ran any step, with why.
    pub fn failed(key: &DiskKey, message: String) -> DiskResult {
        DiskResult {
            key: key.clone(),
            outcome: Outcome::Failed,
            message: Some(message),
            steps: Vec::new(),
            predicted_bytes: 0,
            written_bytes: 0,
        }
    }
}
