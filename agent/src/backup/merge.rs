//! Retention as chain planning: the points a policy keeps are a desired chain of points, and the
//! planner removes the others with the cheapest merges (a commit or a stream per run, the same
//! search as for disks, `Mode::Points`). The steps run through the offline executor, journaled
//! in `<repository>/retention.json` (written before each step starts and after it ends), so a
//! kill at any moment resumes where it was; the manifest changes only when every step is done.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use diskchain_crd::DiskKey;
use diskchain_planner::{
    DiskPlan, DiskRequest, Format, ImageGraph, KeptPoint, Mode, StepAction, plan_disk,
};
use serde::{Deserialize, Serialize};

use super::repo::{Point, Repo};
use crate::execute::offline::Offline;
use crate::execute::{ExecOptions, Executor};
use crate::journal::{JournalStep, StepState};
use crate::observe::{Roots, observe_chain, scan_host};
use crate::state::{StateDir, read_json, remove_if_present, write_atomic};

const JOURNAL: &str = "retention.json";

/// A retention merge in flight.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct MergeJournal {
    /// The steps and where each is.
    steps: Vec<JournalStep>,
    /// The manifest's points once every step is done.
    points_after: Vec<Point>,
    /// The points removed.
    removed: Vec<String>,
}

/// What a retention pass did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RetentionDone {
    /// The points removed.
    pub removed: Vec<String>,
    /// The merges, as `op` and data bytes.
    pub steps: Vec<MergeStep>,
    /// The merges' data bytes.
    pub total_bytes: u64,
}

/// One merge step as reported.
#[derive(Clone, Debug, Serialize)]
pub struct MergeStep {
    /// `commit`, `stream`, `take_over`, `delete`...
    pub op: &'static str,
    /// Data bytes it writes.
    pub bytes: u64,
    /// Why, in words.
    pub reason: String,
}

/// What a retention plan does, as reported.
pub fn summary(points: &[Point], keep: &BTreeSet<String>, plan: &DiskPlan) -> RetentionDone {
    RetentionDone {
        removed: points
            .iter()
            .filter(|p| !keep.contains(&p.point))
            .map(|p| p.point.clone())
            .collect(),
        steps: plan
            .steps
            .iter()
            .map(|s| MergeStep {
                op: s.action.op(),
                bytes: s.bytes,
                reason: s.reason.clone(),
            })
            .collect(),
        total_bytes: plan.total_bytes,
    }
}

/// Plans the merges that leave only `keep` (point names; the newest must be among them) in the
/// repository chain. `None` when nothing is to be removed.
pub fn plan(
    dir: &Path,
    points: &[Point],
    keep: &BTreeSet<String>,
    roots: &Roots,
    key: &DiskKey,
) -> Result<Option<(DiskPlan, Vec<Point>)>, String> {
    let Some(newest) = points.last() else {
        return Ok(None);
    };
    if points.iter().all(|p| keep.contains(&p.point)) {
        return Ok(None);
    }
    let top = dir.join(&newest.file);
    let chain = observe_chain(roots, &top).map_err(|e| e.to_string())?;
    let files: Vec<PathBuf> = chain.layers.iter().map(|l| l.layer.path.clone()).collect();
    if files.len() != points.len() {
        return Err(format!(
            "the repository chain under {} has {} layers but the manifest lists {} points; run `diskchain verify` and repair the repository before retention merges it",
            top.display(),
            files.len(),
            points.len()
        ));
    }
    let file_of: BTreeMap<&str, PathBuf> = points
        .iter()
        .zip(&files)
        .map(|(p, f)| (p.point.as_str(), f.clone()))
        .collect();
    let mut layers: Vec<_> = chain.layers.iter().map(|l| l.layer.clone()).collect();
    let input = scan_host(roots).graph_input(&files, &[]);
    layers.extend(input.layers);
    let graph = ImageGraph::build_with_retired(layers, &[])
        .map_err(|e| e.to_string())?
        .with_users(input.users)
        .with_names(input.names);
    let req = DiskRequest {
        name: key.to_string(),
        active: files[files.len() - 1].clone(),
        keep: points[..points.len() - 1]
            .iter()
            .filter(|p| keep.contains(&p.point))
            .map(|p| KeptPoint {
                name: p.point.clone(),
                file: file_of[p.point.as_str()].clone(),
            })
            .collect(),
        prune: true,
        mode: Mode::Points {
            newest: newest.point.clone(),
        },
        ..Default::default()
    };
    let plan = plan_disk(&graph, &req).map_err(|e| e.to_string())?;
    // The manifest after: each kept point in the file the plan leaves it in.
    let mut after = Vec::new();
    for p in points.iter().filter(|p| keep.contains(&p.point)) {
        let Some(layer) = plan
            .result
            .iter()
            .find(|l| l.point.as_deref() == Some(p.point.as_str()))
        else {
            return Err(format!(
                "the retention plan does not keep point {}; nothing was done",
                p.point
            ));
        };
        if layer.file.parent() != Some(dir) {
            return Err(format!(
                "the retention plan puts point {} in {}, outside the repository; nothing was done",
                p.point,
                layer.file.display()
            ));
        }
        let mut q = p.clone();
        q.file = layer
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        after.push(q);
    }
    Ok(Some((plan, after)))
}

/// Runs the retention merges that keep only `keep`, journaled; finishes an interrupted one
/// first. Returns what it did (`None`: nothing to remove).
pub fn run(
    repo: &mut Repo,
    keep: &BTreeSet<String>,
    roots: &Roots,
    state: &StateDir,
    key: &DiskKey,
    exec: ExecOptions,
) -> Result<Option<RetentionDone>, String> {
    finish(repo, roots, state, exec)?;
    let Some((plan, after)) = plan(&repo.dir, &repo.manifest.points, keep, roots, key)? else {
        return Ok(None);
    };
    let done = summary(&repo.manifest.points, keep, &plan);
    let removed = done.removed.clone();
    let journal = MergeJournal {
        steps: plan
            .steps
            .into_iter()
            .map(|step| JournalStep {
                step,
                state: StepState::Pending,
                written_bytes: 0,
                seconds: 0.0,
                attempts: 0,
            })
            .collect(),
        points_after: after,
        removed,
    };
    save(repo, &journal)?;
    finish(repo, roots, state, exec)?;
    Ok(Some(done))
}

/// True when a retention merge was interrupted in repository `dir`.
pub fn in_flight(dir: &Path) -> bool {
    dir.join(JOURNAL).exists()
}

fn save(repo: &Repo, j: &MergeJournal) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(j).map_err(|e| e.to_string())?;
    write_atomic(&repo.dir.join(JOURNAL), &bytes).map_err(|e| e.to_string())
}

/// Runs the journaled merge to its end (the step in flight again: steps are idempotent), then
/// records the manifest and removes the journal. Nothing to do without a journal.
pub fn finish(
    repo: &mut Repo,
    roots: &Roots,
    state: &StateDir,
    exec: ExecOptions,
) -> Result<(), String> {
    let path = repo.dir.join(JOURNAL);
    let Some(mut j) = read_json::<MergeJournal>(&path).map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let formats: BTreeMap<PathBuf, Format> = j
        .steps
        .iter()
        .flat_map(|s| {
            let mut v: Vec<PathBuf> = s
                .step
                .action
                .writes()
                .into_iter()
                .chain(s.step.action.reads())
                .map(Path::to_path_buf)
                .collect();
            v.dedup();
            v
        })
        .map(|p| (p, Format::Qcow2))
        .collect();
    let dead: HashSet<PathBuf> = j
        .steps
        .iter()
        .filter_map(|s| match &s.step.action {
            StepAction::Delete { file } => Some(file.clone()),
            _ => None,
        })
        .collect();
    let offline = Offline::new(roots.clone(), formats, dead, exec);
    for i in 0..j.steps.len() {
        if j.steps[i].state == StepState::Done {
            continue;
        }
        let action = j.steps[i].step.action.clone();
        let Some(_locks) = state
            .lock_files(&action.writes(), &action.reads(), &mut |_| {}, &|| false)
            .map_err(|e| e.to_string())?
        else {
            return Err("the retention merge was stopped".into());
        };
        if j.steps[i].state == StepState::Running {
            offline
                .prepare_resume(&action)
                .map_err(|e| format!("retention step {} ({}): {e}", i + 1, action.op()))?;
        }
        j.steps[i].state = StepState::Running;
        j.steps[i].attempts += 1;
        save(repo, &j)?;
        let r = offline
            .run(&action, &mut |_| {})
            .map_err(|e| format!("retention step {} ({}): {e}", i + 1, action.op()))?;
        j.steps[i].state = StepState::Done;
        j.steps[i].written_bytes = r.written_bytes;
        j.steps[i].seconds = r.seconds;
        save(repo, &j)?;
    }
    by_name(&repo.dir, &j.points_after)?;
    repo.manifest.points = j.points_after.clone();
    repo.save().map_err(|e| e.to_string())?;
    remove_if_present(&path).map_err(|e| e.to_string())?;
    tracing::info!(repository = %repo.dir.display(), removed = ?j.removed, "retention merged the repository chain");
    Ok(())
}

/// Backs each of `points` (oldest first) in repository `dir` by the one before it by file name
/// again, as a backup writes it: the merge's QEMU steps record the absolute paths they were
/// given, which would tie the repository to where it is now. Only a reference that already
/// names the previous point's file is rewritten (metadata only, then synced); idempotent.
fn by_name(dir: &Path, points: &[Point]) -> Result<(), String> {
    for pair in points.windows(2) {
        let (previous, point) = (&pair[0], &pair[1]);
        let file = dir.join(&point.file);
        let Some((recorded, resolved)) =
            crate::observe::recorded_backing(&file).map_err(|e| e.to_string())?
        else {
            continue;
        };
        if recorded == previous.file {
            continue;
        }
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !same(&resolved, &dir.join(&previous.file)) {
            return Err(format!(
                "after the retention merge, point {} ({}) reads through {}, not the point before it ({}); the repository was left as it is: run `diskchain verify --deep` and report this",
                point.point,
                file.display(),
                resolved.display(),
                previous.file
            ));
        }
        let c = crate::execute::qemu_img::repoint(
            &file,
            Format::Qcow2,
            Some((Path::new(&previous.file), Format::Qcow2)),
        );
        crate::execute::process::run(c, &mut |_| {})
            .map_err(|e| format!("backing {} by file name: {e}", file.display()))?;
        crate::execute::offline::sync_file(&file).map_err(|e| e.to_string())?;
    }
    Ok(())
}
