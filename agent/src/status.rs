//! `diskchain status`: what the state directory knows, per disk: the chain with point names,
//! files and sizes (read from the files' headers now), the last plan applied, and any plan still
//! in flight. Reads only.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use crate::journal::{Journal, StepState};
use crate::observe::{Roots, observe_chain};
use crate::reconcile::{AgentRecord, DiskTrack};
use crate::state::{LastApply, StateDir, StateError};
use crate::units::human_bytes;

/// One layer as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct StatusLayer {
    /// The point it holds (`None`: unnamed, or the active layer).
    pub point: Option<String>,
    /// The file.
    pub file: PathBuf,
    /// Its size on the host.
    pub file_bytes: u64,
    /// Data it holds itself.
    pub data_bytes: u64,
    /// Its persistent dirty bitmaps: name, granularity, flags, and `state` (`recording`,
    /// `disabled`, or `inconsistent`: marked in use while no process has the image open).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<StatusBitmap>,
}

/// A persistent dirty bitmap as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct StatusBitmap {
    /// The bitmap as recorded.
    #[serde(flatten)]
    pub bitmap: crate::observe::qcow2::Bitmap,
    /// `recording`, `disabled` or `inconsistent`.
    pub state: &'static str,
    /// One line for people.
    #[serde(skip)]
    pub line: String,
}

/// One disk as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct StatusDisk {
    /// The disk's namespace and name.
    #[serde(flatten)]
    pub key: diskchain_crd::DiskKey,
    /// Its active image.
    pub active: PathBuf,
    /// The chain now, base first (empty when it cannot be read; see `error`).
    pub chain: Vec<StatusLayer>,
    /// Why the chain cannot be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Files earlier plans dropped and left in place.
    pub retired: Vec<PathBuf>,
    /// The last plan applied.
    pub last_apply: Option<LastApply>,
    /// A plan in flight: steps done of steps planned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<(usize, usize)>,
    /// Why the plan in flight needs the operator, when apply or the agent found it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needs_operator: Option<String>,
    /// What the agent last did with this disk (`<state-dir>/agent.json`), when an agent runs or ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<DiskTrack>,
}

/// The agent's record, with whether its process is alive.
#[derive(Clone, Debug, Serialize)]
pub struct AgentStatus {
    /// Its process id.
    pub pid: u64,
    /// True when that process is running.
    pub running: bool,
    /// Spec files it could not load.
    pub spec_errors: Vec<String>,
}

/// The agent's record, if an agent runs or ran with this state directory.
pub fn agent(state: &StateDir) -> Option<(AgentStatus, AgentRecord)> {
    let text = std::fs::read_to_string(state.path().join("agent.json")).ok()?;
    let rec: AgentRecord = serde_json::from_str(&text).ok()?;
    let pid = u64::from(rec.pid);
    let running = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.contains("diskchain"));
    Some((
        AgentStatus {
            pid,
            running,
            spec_errors: rec.spec_errors.clone(),
        },
        rec,
    ))
}

/// Collects the status of every disk the state directory knows.
pub fn collect(state: &StateDir, roots: &[PathBuf]) -> Result<Vec<StatusDisk>, StateError> {
    let record = agent(state).map(|(_, r)| r);
    // The roots given here that exist, and those the agent records it runs with: `status`
    // without --allowed-root reads the chains of an agent started with other roots.
    let mut dirs: Vec<PathBuf> = roots.iter().filter(|r| r.is_dir()).cloned().collect();
    for r in record.iter().flat_map(|r| r.roots.iter()) {
        if r.is_dir() && !dirs.contains(r) {
            dirs.push(r.clone());
        }
    }
    let roots = (!dirs.is_empty()).then(|| Roots::new(&dirs).ok()).flatten();
    let agent_disks = record.map(|r| r.disks).unwrap_or_default();
    let mut out = Vec::new();
    let mut states = state.all()?;
    // A disk whose first plan was interrupted has a journal but no record yet.
    for key in state.journal_keys() {
        if states.iter().any(|s| s.key() == key) {
            continue;
        }
        if let Ok(Some(j)) = Journal::load(state, &key) {
            states.push(crate::state::DiskState {
                active: j.active.clone(),
                ..crate::state::DiskState::empty(&key)
            });
        }
    }
    states.sort_by_key(|s| s.key());
    for st in states {
        let (chain, error) = match roots.as_ref().map(|r| observe_chain(r, &st.active)) {
            Some(Ok(c)) => (
                c.layers
                    .iter()
                    .map(|l| StatusLayer {
                        point: st
                            .bindings
                            .iter()
                            .find(|b| b.file == l.layer.path)
                            .map(|b| b.name.clone()),
                        file: l.layer.path.clone(),
                        file_bytes: l.file_size,
                        data_bytes: l.layer.alloc.as_ref().map_or(0, |a| a.data_bytes()),
                        bitmaps: l
                            .extras
                            .bitmaps
                            .iter()
                            .map(|b| StatusBitmap {
                                bitmap: b.clone(),
                                state: b.state(l.in_use.is_some()),
                                line: b.describe(l.in_use.is_some()),
                            })
                            .collect(),
                    })
                    .collect(),
                None,
            ),
            Some(Err(e)) => (Vec::new(), Some(e.to_string())),
            None => (
                Vec::new(),
                Some("no allowed root exists; pass --allowed-root".into()),
            ),
        };
        let key = st.key();
        let in_flight = Journal::load(state, &key)?.map(|j| {
            (
                j.steps
                    .iter()
                    .filter(|s| s.state == StepState::Done)
                    .count(),
                j.steps.len(),
            )
        });
        out.push(StatusDisk {
            key: key.clone(),
            active: st.active.clone(),
            chain,
            error,
            retired: st.retired.clone(),
            last_apply: st.last_apply.clone(),
            needs_operator: in_flight.and_then(|_| Journal::needs_operator(state, &key)),
            in_flight,
            // (Records of agents from before namespaces read as the default namespace's.)
            agent: agent_disks.iter().find(|d| d.key == key).cloned(),
        });
    }
    Ok(out)
}

/// A disk's backups in one line: points, the last and the next.
fn backup_line(b: &crate::reconcile::schedule::BackupTrack) -> String {
    let at = |t: i64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp(t, 0)
            .map(|d| {
                d.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M %Z")
                    .to_string()
            })
            .unwrap_or_default()
    };
    let mut parts = vec![format!("{} point(s)", b.points)];
    if let Some(p) = &b.last_point {
        parts.push(format!("last {p}"));
    }
    if let (Some(k), n) = (&b.last_kind, b.last_bytes) {
        parts.push(format!("last taken by the agent: {k}, {}", human_bytes(n)));
    }
    parts.push(if b.next_unix > 0 {
        format!("next due {}", at(b.next_unix))
    } else {
        "no schedule".into()
    });
    if let Some(ok) = b.verify_ok {
        parts.push(format!(
            "verified {} ({})",
            at(b.last_verify_unix),
            if ok { "sound" } else { "DAMAGED" }
        ));
    }
    if b.failures > 0 {
        parts.push(format!("failures in a row: {}", b.failures));
    }
    let mut line = parts.join(", ");
    if let Some(e) = &b.error {
        line.push_str(&format!(": {e}"));
    }
    line
}

/// The status as text.
pub fn text(disks: &[StatusDisk]) -> String {
    let mut out = String::new();
    if disks.is_empty() {
        out.push_str("no disks recorded yet (the state directory is empty)\n");
    }
    for d in disks {
        let _ = writeln!(out, "disk {} (active {})", d.key, d.active.display());
        if let Some(e) = &d.error {
            let _ = writeln!(out, "  chain unreadable: {e}");
        }
        let last = d.chain.len().saturating_sub(1);
        for (i, l) in d.chain.iter().enumerate() {
            let name = match (&l.point, i == last) {
                (Some(p), _) => p.clone(),
                (None, true) => "(active)".into(),
                (None, false) => "(unnamed)".into(),
            };
            let _ = writeln!(
                out,
                "  {i}: {name:<20} {}  file {}, data {}",
                l.file.display(),
                human_bytes(l.file_bytes),
                human_bytes(l.data_bytes)
            );
            for b in &l.bitmaps {
                let _ = writeln!(out, "       bitmap {}", b.line);
            }
        }
        match (d.in_flight, &d.needs_operator) {
            (Some((done, all)), Some(why)) => {
                let _ = writeln!(
                    out,
                    "  an unfinished plan ({done} of {all} steps done) needs you: {why}"
                );
            }
            (Some((done, all)), None) => {
                let _ = writeln!(
                    out,
                    "  a plan is in flight: {done} of {all} steps done (the next apply or agent start resumes it)"
                );
            }
            _ => {}
        }
        if let Some(a) = &d.last_apply {
            let _ = writeln!(
                out,
                "  last apply: {} step(s) [{}], {} predicted, {} written by QEMU",
                a.steps.len(),
                a.steps.join(", "),
                human_bytes(a.predicted_bytes),
                human_bytes(a.written_bytes)
            );
        }
        if let Some(a) = &d.agent {
            let result = a.result.as_str();
            match &a.error {
                Some(e) => {
                    let _ = writeln!(
                        out,
                        "  agent: {result} (failures in a row: {}): {e}",
                        a.failures
                    );
                }
                None => {
                    let _ = writeln!(out, "  agent: {result}");
                }
            }
            if let Some(b) = &a.backup {
                let _ = writeln!(out, "  backups: {}", backup_line(b));
            }
        }
        for r in &d.retired {
            let _ = writeln!(out, "  retired (kept, spec.prune is off): {}", r.display());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DiskState;

    #[test]
    fn an_agent_record_from_before_namespaces_is_paired_with_its_default_namespace_disk() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        for ns in [None, Some("prod")] {
            let key = diskchain_crd::DiskKey::new(ns, "vda");
            state
                .save(&DiskState {
                    active: dir.path().join("missing.qcow2"),
                    ..DiskState::empty(&key)
                })
                .unwrap();
        }
        // As an agent before namespaces wrote it: no namespace per disk.
        std::fs::write(
            dir.path().join("agent.json"),
            r#"{"pid":1,"started_unix":0,"updated_unix":0,"spec_errors":["x.yaml: bad"],"disks":[{"name":"vda","result":"failed","error":"boom","failures":3,"last_unix":5}]}"#,
        )
        .unwrap();
        let (agent, _) = agent(&state).unwrap();
        assert_eq!(agent.spec_errors, vec!["x.yaml: bad".to_string()]);
        let disks = collect(&state, &[dir.path().to_path_buf()]).unwrap();
        assert_eq!(disks.len(), 2);
        let default = disks.iter().find(|d| d.key.is_default_namespace()).unwrap();
        let track = default.agent.as_ref().unwrap();
        assert_eq!(track.result, crate::outcome::Outcome::Failed);
        assert_eq!(track.failures, 3);
        assert!(text(&disks).contains("agent: failed (failures in a row: 3): boom"));
        let prod = disks.iter().find(|d| d.key.namespace == "prod").unwrap();
        assert!(prod.agent.is_none());
    }
}
