//! Before an interrupted plan runs again: is it still what the spec asks for?
//!
//! A journal records the plan made under the spec as it was. The spec may have changed since
//! (a GitOps rollback, a point kept again, prune turned off). A remaining step that would write
//! into or delete a file holding a point the spec now keeps must not run: the journal is then
//! *set aside* (its interrupted step tidied so every view reads as before that step, the points
//! its finished steps moved recorded, the journal file kept beside the others for the record)
//! and the disk is planned again from its chain as it now is.
//!
//! One case cannot be put right automatically: a commit interrupted while writing into a file
//! whose point the spec now keeps. That file no longer reads as the point. It is reported, the
//! plan is not resumed, and the operator chooses: put the spec back (the plan then finishes) or
//! accept the loss with `diskchain set-aside --disk [NAMESPACE/]NAME`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use diskchain_crd::DesiredDisk;
use diskchain_planner::StepAction;

use crate::execute::Executor;
use crate::journal::{Journal, StepState, now_unix};
use crate::observe::Roots;
use crate::state::{StateDir, StateError};

/// What to do with an interrupted plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It agrees with the spec: run its remaining steps.
    Resume,
    /// It contradicts the spec but nothing is lost: set it aside and plan again.
    SetAside {
        /// Why, in words.
        why: String,
        /// The first remaining step that contradicts the spec (0-based), when one does (rather
        /// than the plan as a whole): the steps before it may still run.
        first: Option<usize>,
    },
    /// It cannot be explained without the operator: report, do not run.
    Stuck {
        /// Why, and what to do.
        why: String,
    },
}

/// The points the spec keeps now and the files holding them (bound by `file:` or by the state).
fn kept_now(spec: &DesiredDisk, roots: &Roots, state: &StateDir) -> BTreeMap<PathBuf, String> {
    let st = state.load(&spec.key).ok().flatten().unwrap_or_default();
    let mut out = BTreeMap::new();
    for s in &spec.spec().snapshots {
        let file = match &s.file {
            Some(f) => roots.confine(f, String::new()).ok(),
            None => st
                .bindings
                .iter()
                .find(|b| b.name == s.name)
                .map(|b| b.file.clone()),
        };
        if let Some(f) = file {
            out.insert(f, s.name.clone());
        }
    }
    out
}

/// Checks the remaining steps of `journal` against the spec as it is now.
pub fn check(journal: &Journal, spec: &DesiredDisk, roots: &Roots, state: &StateDir) -> Verdict {
    let kept = kept_now(spec, roots, state);
    let planned: BTreeMap<&str, &Path> = journal
        .bindings
        .iter()
        .map(|b| (b.name.as_str(), b.file.as_path()))
        .collect();
    // A file holding point `name` now, that the plan did not mean to hold it.
    let contradicts = |f: &Path| -> Option<&String> {
        kept.get(f)
            .filter(|name| planned.get(name.as_str()) != Some(&f))
    };
    let mut reasons = Vec::new();
    let mut first = None;
    if journal.active_replaced() {
        reasons.push(format!(
            "another file was put at the active image's path {} since the plan started",
            journal.active.display()
        ));
        first = journal
            .steps
            .iter()
            .position(|s| s.state != StepState::Done);
    }
    for (i, s) in journal.steps.iter().enumerate() {
        if s.state == StepState::Done {
            continue;
        }
        let before = reasons.len();
        let n = i + 1;
        match &s.step.action {
            StepAction::Commit {
                base, top, layers, ..
            } => {
                // A commit interrupted mid-job has written part of the data of (base, top] into
                // base: a layer strictly between them reads through base where it has no data
                // of its own, so the point it holds no longer reads as it did.
                if s.state == StepState::Running
                    && let Some((f, name)) = layers
                        .iter()
                        .filter(|f| *f != base && *f != top)
                        .find_map(|f| kept.get(f).map(|n| (f, n)))
                {
                    return Verdict::Stuck {
                        why: format!(
                            "step {n} (commit into {}) was interrupted after writing into that file, which point {name:?} (in {}, which the spec now keeps) reads through: that point no longer reads as it did. Put the spec back as it was (apply then finishes the plan), or accept the loss with `diskchain set-aside --disk {}`",
                            base.display(),
                            f.display(),
                            journal.key()
                        ),
                    };
                }
                if let Some(name) = contradicts(base) {
                    if s.state == StepState::Running {
                        return Verdict::Stuck {
                            why: format!(
                                "step {n} (commit into {}) was interrupted while that file held point {name:?}, which the spec now keeps: the file no longer reads as that point. Put the spec back as it was (apply then finishes the plan), or accept the loss with `diskchain set-aside --disk {}`",
                                base.display(),
                                journal.key()
                            ),
                        };
                    }
                    reasons.push(format!(
                        "step {n} would commit into {}, which holds point {name:?}",
                        base.display()
                    ));
                }
            }
            StepAction::Stream { into, .. } => {
                if let Some(name) = contradicts(into) {
                    reasons.push(format!(
                        "step {n} would stream into {}, which holds point {name:?}",
                        into.display()
                    ));
                }
            }
            StepAction::Delete { file } => {
                if let Some(name) = kept.get(file) {
                    reasons.push(format!(
                        "step {n} would delete {}, which holds point {name:?}",
                        file.display()
                    ));
                } else if !spec.spec().prune {
                    reasons.push(format!(
                        "step {n} would delete {}, and spec.prune is now false",
                        file.display()
                    ));
                }
            }
            StepAction::TakeOver { holder, .. } => {
                if let Some(name) = kept.get(holder) {
                    reasons.push(format!(
                        "step {n} would rename {} over the active image, and it holds point {name:?}",
                        holder.display()
                    ));
                }
            }
            StepAction::Revert { .. } => {
                let now = spec.spec().revert.as_ref().map(|r| &r.id);
                if now != journal.revert.as_ref().map(|r| &r.id) {
                    reasons.push(format!(
                        "step {n} is a revert that spec.revert no longer asks for"
                    ));
                }
            }
            StepAction::Snapshot { .. }
            | StepAction::Mirror { .. }
            | StepAction::Copy { .. }
            | StepAction::Rebase { .. } => {}
        }
        if first.is_none() && reasons.len() > before {
            first = Some(i);
        }
    }
    // A point the spec now keeps that the plan removes from the chain (and that no step above
    // writes): whatever the remaining steps do to it, re-planning keeps it.
    for (file, name) in &kept {
        if !planned.contains_key(name.as_str())
            && !journal.result.iter().any(|r| &r.file == file)
            && journal.steps.iter().any(|s| s.state != StepState::Done)
        {
            reasons.push(format!(
                "the plan removes point {name:?} ({}), which the spec now keeps",
                file.display()
            ));
        }
    }
    if reasons.is_empty() {
        Verdict::Resume
    } else {
        reasons.dedup();
        Verdict::SetAside {
            why: reasons.join("; "),
            first,
        }
    }
}

/// Sets `journal` aside: tidies its interrupted step (so every view reads as before that step;
/// a live block job it left running in QEMU is cancelled, not finished),
/// records the points its finished steps moved into files still in the chain, and moves the
/// journal file to `journal/<namespace>/<name>.set-aside-<time>.json`. Returns where it went.
pub fn set_aside(
    journal: &Journal,
    exec: &dyn Executor,
    chain_now: impl FnOnce() -> Result<Vec<PathBuf>, String>,
    state: &StateDir,
) -> Result<PathBuf, String> {
    if let Some(i) = journal.next()
        && journal.steps[i].state == StepState::Running
    {
        exec.abandon(&journal.steps[i].step.action)
            .map_err(|e| format!("tidying the interrupted step {}: {e}", i + 1))?;
    }
    let chain = chain_now()?;
    let key = journal.key();
    // A journal from before namespaces moves to its keyed place first (then the record).
    journal.save(state).map_err(|e| e.to_string())?;
    let mut st = state
        .load(&key)
        .map_err(|e| e.to_string())?
        .unwrap_or_else(|| crate::state::DiskState::empty(&key));
    for b in &journal.bindings {
        if !chain.contains(&b.file) {
            continue;
        }
        match st.bindings.iter_mut().find(|o| o.name == b.name) {
            Some(old) if !chain.contains(&old.file) => *old = b.clone(),
            Some(_) => {}
            None => st.bindings.push(b.clone()),
        }
    }
    state.save(&st).map_err(|e| e.to_string())?;
    let from = state.journal_file(&key);
    let to = from.with_file_name(format!(
        "{}.set-aside-{}.json",
        crate::state::file_stem(&key.name),
        now_unix()
    ));
    Journal::clear_needs_operator(state, &key);
    std::fs::rename(&from, &to).map_err(|e| {
        StateError::Io {
            action: "set aside",
            path: from.clone(),
            source: e,
        }
        .to_string()
    })?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use diskchain_planner::{Step, StepAction};

    use super::*;
    use crate::journal::JournalStep;

    #[test]
    fn a_stuck_plan_names_the_disk_as_set_aside_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::create_dir(&img).unwrap();
        for f in ["base", "top"] {
            std::fs::write(img.join(f), b"").unwrap();
        }
        let img = img.canonicalize().unwrap();
        let roots = Roots::new(std::slice::from_ref(&img)).unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let spec = diskchain_crd::load_str(
            Path::new("/specs/vda.yaml"),
            &format!(
                "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: vda\n  namespace: team-a\nspec:\n  source:\n    file: {}\n  snapshots:\n    - name: p\n      file: {}\n",
                img.join("top").display(),
                img.join("base").display()
            ),
        )
        .unwrap()
        .remove(0);
        // A commit into base was interrupted; the spec now keeps the point base holds.
        let journal = Journal {
            namespace: "team-a".into(),
            disk: "vda".into(),
            active: img.join("top"),
            started_unix: 0,
            formats: Default::default(),
            steps: vec![JournalStep {
                step: Step {
                    action: StepAction::Commit {
                        base: img.join("base"),
                        top: img.join("top"),
                        layers: vec![img.join("top")],
                    },
                    bytes: 0,
                    zero_bytes: 0,
                    reason: String::new(),
                },
                state: StepState::Running,
                written_bytes: 0,
                seconds: 0.0,
                attempts: 1,
            }],
            result: vec![],
            libvirt: None,
            live: false,
            revert: None,
            bindings: vec![],
            leaving: vec![],
            predicted_bytes: 0,
            active_id: None,
        };
        match check(&journal, &spec, &roots, &state) {
            Verdict::Stuck { why } => {
                assert!(
                    why.contains("`diskchain set-aside --disk team-a/vda`"),
                    "{why}"
                );
            }
            _ => panic!("not stuck"),
        }
    }
}
