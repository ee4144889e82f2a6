//! The per-disk journal: the plan being applied, each step's state, and what must be recorded
//! when it completes. Written atomically before a step starts and after it ends, so that after a
//! crash the next run knows exactly which step was in flight and resumes there (every step is
//! idempotent; see `execute`).
//!
//! Layout: `<state-dir>/journal/<namespace>/<name>.json`, present only while a plan is being
//! applied (a journal from before namespaces, `journal/<name>.json`, is read and moved likewise
//! as the state's records are).

use std::collections::BTreeMap;
use std::path::PathBuf;

use diskchain_planner::{FinalLayer, Format, Step};
use serde::{Deserialize, Serialize};

use diskchain_crd::{DEFAULT_NAMESPACE, DiskKey};

use crate::state::{Binding, StateDir, StateError, read_json, remove_if_present, write_atomic};

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// Where a step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Started: its intent is on disk; it may have been interrupted.
    Running,
    /// Finished.
    Done,
}

/// One step with its state and what it did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JournalStep {
    /// The planned step.
    pub step: Step,
    /// Where it is.
    pub state: StepState,
    /// Bytes the QEMU processes wrote for it.
    #[serde(default)]
    pub written_bytes: u64,
    /// Wall time it took.
    #[serde(default)]
    pub seconds: f64,
    /// How many times it was started (more than one after a crash).
    #[serde(default)]
    pub attempts: u32,
}

/// A plan being applied to one disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// The disk's namespace (journals from before namespaces have none: `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The disk's name.
    pub disk: String,
    /// Its active image.
    pub active: PathBuf,
    /// When the plan started, seconds since the Unix epoch.
    pub started_unix: u64,
    /// The format of every file the steps name.
    pub formats: BTreeMap<PathBuf, Format>,
    /// The steps, in order.
    pub steps: Vec<JournalStep>,
    /// The chain the plan ends with, base first, active last.
    pub result: Vec<FinalLayer>,
    /// The libvirt disk, for a disk of a libvirt domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<diskchain_crd::desired::LiveTarget>,
    /// The plan was made while the domain ran (libvirt's live semantics).
    #[serde(default)]
    pub live: bool,
    /// The revert this plan does, recorded in the state when it completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<diskchain_crd::desired::Revert>,
    /// The bindings to record when the plan completes.
    pub bindings: Vec<Binding>,
    /// Files leaving the chain that nothing else uses (retired unless deleted).
    pub leaving: Vec<PathBuf>,
    /// Data bytes the plan predicted.
    pub predicted_bytes: u64,
    /// Offline: the active image's device and inode as the plan found it, then as each finished
    /// step left it. A step never runs on an active image replaced behind the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_id: Option<(u64, u64)>,
}

/// The device and inode of `p` (`None` when it cannot be read).
pub fn file_id(p: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

impl Journal {
    /// True when the active image is no longer the file the plan's steps left there: another
    /// file was put at its path (a step that itself replaces it, interrupted, does not count).
    pub fn active_replaced(&self) -> bool {
        let Some(id) = self.active_id else {
            return false;
        };
        let in_flight_replaces = self
            .steps
            .iter()
            .find(|s| s.state != StepState::Done)
            .is_some_and(|s| s.state == StepState::Running && s.step.action.replaces_active());
        !in_flight_replaces && file_id(&self.active) != Some(id)
    }
}

impl Journal {
    /// The disk's key.
    pub fn key(&self) -> DiskKey {
        DiskKey::new(Some(&self.namespace), &self.disk)
    }

    /// The journal of disk `key`, if a plan is in flight (a journal of its name from before
    /// namespaces when it has none of its own).
    pub fn load(state: &StateDir, key: &DiskKey) -> Result<Option<Journal>, StateError> {
        let found = match read_json::<Journal>(&state.journal_file(key))? {
            Some(j) => Some(j),
            None if !state.has_keyed_record(key) => {
                read_json::<Journal>(&state.legacy_journal_file(&key.name))?
            }
            None => None,
        };
        Ok(found.map(|mut j| {
            j.namespace = key.namespace.clone();
            j
        }))
    }

    /// Writes the journal atomically (replacing a journal of its name from before namespaces).
    pub fn save(&self, state: &StateDir) -> Result<(), StateError> {
        let key = self.key();
        write_atomic(
            &state.journal_file(&key),
            &serde_json::to_vec_pretty(self).expect("journal serialises"),
        )?;
        let legacy = state.legacy_journal_file(&key.name);
        if legacy.exists() && !state.has_keyed_record(&key) {
            // The legacy journal was this disk's (it was loaded for this key); its needs-operator
            // note moves with it.
            if let Ok(why) = std::fs::read_to_string(legacy.with_extension("needs-operator")) {
                let _ = write_atomic(&needs_operator_file(state, &key), why.as_bytes());
            }
            remove_if_present(&legacy.with_extension("needs-operator"))?;
            remove_if_present(&legacy)?;
        }
        Ok(())
    }

    /// Why the unfinished plan of disk `key` needs the operator, when `apply` or the agent found
    /// that it does (`journal/NAMESPACE/NAME.needs-operator`, beside the journal; `status` shows
    /// it).
    pub fn needs_operator(state: &StateDir, key: &DiskKey) -> Option<String> {
        std::fs::read_to_string(needs_operator_file(state, key)).ok()
    }

    /// Records why the plan needs the operator (written only when it changed).
    pub fn set_needs_operator(state: &StateDir, key: &DiskKey, why: &str) {
        if Self::needs_operator(state, key).as_deref() != Some(why) {
            let _ = write_atomic(&needs_operator_file(state, key), why.as_bytes());
        }
    }

    /// Forgets that note (the journal was finished or set aside).
    pub fn clear_needs_operator(state: &StateDir, key: &DiskKey) {
        let _ = std::fs::remove_file(needs_operator_file(state, key));
    }

    /// Removes the journal once the plan is complete and recorded.
    pub fn remove(&self, state: &StateDir) -> Result<(), StateError> {
        let key = self.key();
        Self::clear_needs_operator(state, &key);
        remove_if_present(&state.journal_file(&key))?;
        if !state.has_keyed_record(&key) {
            let legacy = state.legacy_journal_file(&key.name);
            remove_if_present(&legacy.with_extension("needs-operator"))?;
            remove_if_present(&legacy)?;
        }
        Ok(())
    }

    /// Index of the first step not done.
    pub fn next(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.state != StepState::Done)
    }
}

fn needs_operator_file(state: &StateDir, key: &DiskKey) -> std::path::PathBuf {
    state
        .journal_file(key)
        .with_file_name(format!("{}.needs-operator", key.name))
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
