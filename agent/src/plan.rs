//! `diskchain plan`: load specs, observe every chain, bind, plan, and report. Changes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use diskchain_crd::{DesiredDisk, DiskKey, SpecErrors};
use diskchain_planner::{DiskPlan, ImageGraph, Layer, PlanError, plan_disk};
use serde::Serialize;

use crate::bind::{BindError, bind};
use crate::observe::{ObserveError, ObservedChain, Roots, observe_chain, scan_host};
use crate::state::{StateDir, StateError};
use diskchain_crd::desired::LiveTarget;

/// What kind of problem stopped a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The input is at fault: a spec, a chain, a binding. Nothing was touched.
    BadInput,
    /// An image of the disk is open in another process.
    InUse,
    /// Something failed that may pass (I/O, a QEMU tool).
    Failed,
    /// Work stopped for a shutdown; it resumes on the next start.
    Stopped,
    /// An unfinished plan that only the operator can resolve (the message says how): retrying
    /// cannot help, so the agent waits until the spec or the journal changes.
    NeedsOperator,
}

/// A disk that could not be planned (or applied).
#[derive(Clone, Debug, Serialize)]
pub struct DiskError {
    /// The disk's namespace and name.
    #[serde(flatten)]
    pub key: DiskKey,
    /// The spec file and document.
    pub spec: String,
    /// What went wrong and what to do.
    pub error: String,
    /// What kind of problem it is.
    pub kind: ErrorKind,
}

/// The plan for one disk, with where its spec came from.
#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    /// The planner's plan.
    #[serde(flatten)]
    pub plan: DiskPlan,
    /// The disk's key (`namespace` in JSON; the plan carries the name).
    #[serde(rename = "namespace", serialize_with = "namespace_of")]
    pub key: DiskKey,
    /// The spec file and document.
    pub spec: String,
    /// `spec.suspend`: the agent will not act on this disk.
    pub suspended: bool,
    /// The format of every layer of the observed chain (for the executors).
    #[serde(skip)]
    pub formats: std::collections::BTreeMap<PathBuf, diskchain_planner::Format>,
    /// A disk of a running libvirt domain: the plan uses libvirt's live operations.
    pub live: bool,
    /// The libvirt disk (`spec.source.libvirt`).
    #[serde(skip)]
    pub libvirt: Option<diskchain_crd::desired::LiveTarget>,
    /// The revert this plan does (`spec.revert` with an id not done yet).
    #[serde(skip)]
    pub revert: Option<diskchain_crd::desired::Revert>,
}

/// Everything `plan` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PlanReport {
    /// Disks planned.
    pub disks: Vec<DiskReport>,
    /// Disks that could not be planned.
    pub errors: Vec<DiskError>,
}

impl PlanReport {
    /// 0 when every disk was planned; 2 when input was at fault (an image in use included:
    /// `plan` cannot vouch for a chain that is changing); else 1.
    pub fn exit_code(&self) -> i32 {
        if self.errors.is_empty() {
            0
        } else if self
            .errors
            .iter()
            .any(|e| matches!(e.kind, ErrorKind::BadInput | ErrorKind::InUse))
        {
            2
        } else {
            1
        }
    }
}

/// Why nothing could be planned at all.
#[derive(Debug, thiserror::Error)]
pub enum PlanRunError {
    /// The specs are invalid.
    #[error("{0}")]
    Specs(SpecErrors),
    /// The roots are invalid.
    #[error("{0}")]
    Roots(ObserveError),
    /// The image graph is corrupt (a cycle among the files under the roots).
    #[error("{0}")]
    Graph(PlanError),
}

/// What a disk's reconcile needs to know of the run around it (an apply's other disks, the
/// agent's): the roots, the state directory, and the checks that span disks. Built once per run
/// (an `apply`, an agent pass) and handed to each disk's plan and reconcile.
#[derive(Clone, Debug)]
pub struct Host {
    /// Where images may be.
    pub roots: Roots,
    /// Records, journals and locks.
    pub state: StateDir,
    /// Every disk of the run: a record from before namespaces is not guessed to be one disk's
    /// when two of them share its name.
    pub keys: Vec<DiskKey>,
    /// The active images disks of the run are known to manage: a spec whose active image is
    /// one of these under another key claims a disk already claimed.
    pub claimed: BTreeMap<PathBuf, DiskKey>,
    /// Where other users of a layer are looked for (every root of the node, also when `roots`
    /// is one namespace's share of them).
    pub scan_roots: Roots,
    /// Kubernetes mode: the roots every namespace shares (no operator assigned them). A disk
    /// whose active image lies in one of them only changes what it adopted (see
    /// [`adoption_refused`]). `None`: file mode, where the spec author is the host's operator.
    pub shared_roots: Option<Vec<PathBuf>>,
    /// The files every disk's record retired, read once for a pass of many disks (an agent
    /// pass) and shared by the reconciles it starts; `None`: read at each plan. A file retired
    /// since is missing here and so counts as a user of its backing: the stale list only ever
    /// keeps more. The planned disks' own records are always read again.
    pub retired: Option<std::sync::Arc<Vec<PathBuf>>>,
}

impl Host {
    /// The run of `disks` (nothing claimed yet).
    pub fn new(roots: &Roots, state: &StateDir, disks: &[DesiredDisk]) -> Host {
        Host {
            roots: roots.clone(),
            state: state.clone(),
            keys: disks.iter().map(|d| d.key.clone()).collect(),
            claimed: BTreeMap::new(),
            scan_roots: roots.clone(),
            shared_roots: None,
            retired: None,
        }
    }

    /// Reads every record's retired files once, for the reconciles of a pass to share.
    pub fn read_retired(&mut self) {
        self.retired = Some(std::sync::Arc::new(retired_files(&self.state)));
    }

    /// Resolves the active image of each of `disks` and records it as claimed; a disk whose
    /// image another disk claimed first is returned as an error (bad input: nothing touched).
    /// Disks that cannot be observed are left to their own reconcile to report.
    pub fn claim(&mut self, disks: &[DesiredDisk]) -> Vec<DiskError> {
        let mut report = PlanReport::default();
        let observed = observe_disks(disks, &self.roots, &mut report);
        let (claimed, twice) = claims(&observed, &self.claimed);
        self.claimed = claimed;
        twice
    }
}

/// An observed disk on its way through the pipeline.
struct Observed<'a> {
    spec: &'a DesiredDisk,
    chain: ObservedChain,
    /// The domain runs (a libvirt disk).
    running: bool,
    /// The domain has no persistent definition (it would vanish when powered off).
    transient: bool,
    /// The domain has a QEMU guest agent channel.
    guest_agent: bool,
    /// The libvirt disk, past the spec boundary.
    target: Option<LiveTarget>,
}

fn namespace_of<S: serde::Serializer>(key: &DiskKey, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&key.namespace)
}

/// The other libvirt disks (of any domain, running or defined, on the URIs the libvirt specs
/// name) that read one of `chain_files`: (the first such file in their chain, the disk as a
/// user). Disks the specs manage are left out: their chains are in the graph already. When a
/// URI's domains cannot be listed, the libvirt disks on it are refused: another domain could not
/// be ruled out as a user of their layers.
fn foreign_users(
    observed: &mut Vec<Observed<'_>>,
    chain_files: &[PathBuf],
    report: &mut PlanReport,
    fail: &dyn Fn(&DesiredDisk, String, bool) -> DiskError,
) -> Vec<(PathBuf, PathBuf)> {
    let libvirt = |o: &Observed<'_>| o.spec.live.clone();
    let uris: std::collections::BTreeSet<String> = observed
        .iter()
        .filter_map(|o| libvirt(o).map(|l| l.uri))
        .collect();
    let managed: Vec<(String, String, String)> = observed
        .iter()
        .filter_map(libvirt)
        .map(|l| (l.uri, l.domain, l.target))
        .collect();
    let mut users = Vec::new();
    for uri in uris {
        let disks = match crate::libvirt::domain_disks(&uri) {
            Ok(d) => d,
            Err(e) => {
                let mut refused = Vec::new();
                for o in observed.iter() {
                    if libvirt(o).is_some_and(|l| l.uri == uri) {
                        refused.push(o.spec.key.clone());
                        report.errors.push(fail(
                            o.spec,
                            format!(
                                "{}: spec.source.libvirt: cannot list the domains of {uri} to rule out another domain using this disk's layers: {e}. Nothing was done",
                                o.spec.origin()
                            ),
                            false,
                        ));
                    }
                }
                observed.retain(|o| !refused.contains(&o.spec.key));
                continue;
            }
        };
        for d in disks {
            if managed
                .iter()
                .any(|(u, dom, t)| *u == uri && *dom == d.domain && *t == d.target)
            {
                continue;
            }
            let first = d.files.iter().find_map(|f| {
                let c = f.canonicalize().unwrap_or_else(|_| f.clone());
                chain_files.contains(&c).then_some(c)
            });
            if let Some(f) = first {
                users.push((f, d.label()));
            }
        }
    }
    users
}

/// Runs the plan stage for every spec under `specs`.
pub fn run(specs: &Path, roots: &[PathBuf], state: &StateDir) -> Result<PlanReport, PlanRunError> {
    let loaded = diskchain_crd::load_path(specs).map_err(PlanRunError::Specs)?;
    let roots = Roots::new(roots).map_err(PlanRunError::Roots)?;
    plan_loaded(&loaded, &Host::new(&roots, state, &loaded))
}

/// A problem of `spec`'s disk: bad input (nothing touched) or a failure that may pass.
fn fail(spec: &DesiredDisk, error: String, bad_input: bool) -> DiskError {
    DiskError {
        key: spec.key.clone(),
        spec: spec.origin(),
        error,
        kind: if bad_input {
            ErrorKind::BadInput
        } else {
            ErrorKind::Failed
        },
    }
}

/// Observes each disk's chain (through libvirt for a libvirt disk) and checks what the
/// observation alone can refute; the disks that fail are reported in `report` and left out.
fn observe_disks<'a>(
    loaded: &'a [DesiredDisk],
    roots: &Roots,
    report: &mut PlanReport,
) -> Vec<Observed<'a>> {
    let mut observed: Vec<Observed<'a>> = Vec::new();
    for spec in loaded {
        let source = &spec.spec().source;
        if let Some(b) = &spec.spec().backup
            && let Err(e) = roots.confine_dir(&b.repository, "spec.backup.repository".into())
        {
            report
                .errors
                .push(fail(spec, format!("{}: {e}", spec.origin()), true));
            continue;
        }
        let target = spec.live.clone();
        let (active, live) = match (&source.file, &target) {
            (Some(_), _) if source.format == Some(diskchain_crd::DiskFormat::Raw) => {
                report.errors.push(fail(
                    spec,
                    format!(
                        "{}: spec.source.format: the disk is declared raw, and a raw image has no backing chain; diskchain manages qcow2 chains and never reads a raw disk's content as a header. Convert it (qemu-img convert -O qcow2) or leave it out of the specs",
                        spec.origin()
                    ),
                    true,
                ));
                continue;
            }
            (Some(f), _) => (f.clone(), None),
            (None, Some(l)) => match crate::libvirt::locate(l) {
                Ok(d) if d.disk.format != "qcow2" => {
                    report.errors.push(fail(
                        spec,
                        format!(
                            "{}: spec.source.libvirt: domain {} disk {} has <driver type={:?}>; diskchain manages qcow2 chains and never reads a {} disk's content as a header. Nothing was done",
                            spec.origin(),
                            l.domain,
                            l.target,
                            d.disk.format,
                            d.disk.format
                        ),
                        true,
                    ));
                    continue;
                }
                Ok(d) => (d.disk.active.clone(), Some(d)),
                Err(e) => {
                    let bad = e.is_bad_input();
                    report.errors.push(fail(
                        spec,
                        format!("{}: spec.source.libvirt: {e}", spec.origin()),
                        bad,
                    ));
                    continue;
                }
            },
            (None, None) => continue, // refused when the spec was loaded
        };
        match observe_chain(roots, &active) {
            Ok(mut chain) => {
                let running = live.as_ref().is_some_and(|d| d.running);
                if let Some(d) = &live {
                    if running {
                        // The domain's own QEMU holds the images: that is how a live disk is.
                        for l in &mut chain.layers {
                            l.in_use = None;
                        }
                    }
                    let files: Vec<PathBuf> =
                        chain.layers.iter().map(|l| l.layer.path.clone()).collect();
                    if d.disk.no_backing && files.len() > 1 {
                        report.errors.push(fail(
                            spec,
                            format!(
                                "{}: spec.source.libvirt: domain {} disk {} declares an empty <backingStore/>, so QEMU runs {} without the backing file its header names ({}); diskchain will not plan a chain QEMU does not read. Remove the <backingStore/> element from the domain's definition (virsh edit), or leave the disk out of the specs. Nothing was done",
                                spec.origin(),
                                source.libvirt.as_ref().map_or("", |l| l.domain.as_str()),
                                source.libvirt.as_ref().map_or("", |l| l.target.as_str()),
                                d.disk.active.display(),
                                files[files.len() - 2].display()
                            ),
                            true,
                        ));
                        continue;
                    }
                    if !crate::libvirt::chain_agrees(d, &files) {
                        let mut recorded = crate::libvirt::recorded_chain(d);
                        recorded.reverse();
                        let show = |v: &[PathBuf]| {
                            v.iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(" <- ")
                        };
                        report.errors.push(fail(
                            spec,
                            format!(
                                "{}: spec.source.libvirt: libvirt records the chain {} but the image headers say {}; something changed the images behind libvirt's back. Nothing was done",
                                spec.origin(),
                                show(&recorded),
                                show(&files)
                            ),
                            false,
                        ));
                        continue;
                    }
                }
                observed.push(Observed {
                    spec,
                    chain,
                    running,
                    transient: live.as_ref().is_some_and(|d| !d.persistent),
                    guest_agent: live.as_ref().is_some_and(|d| d.guest_agent),
                    target,
                })
            }
            Err(e) => {
                let bad = e.is_bad_input();
                let field = if source.libvirt.is_some() {
                    "spec.source.libvirt"
                } else {
                    "spec.source.file"
                };
                report
                    .errors
                    .push(fail(spec, format!("{}: {field}: {e}", spec.origin()), bad));
            }
        }
    }

    observed
}

/// The active image each observed disk claims, over `before` (the run's claims so far), and
/// the disks whose image another disk claimed first (bad input: one disk, one spec).
fn claims(
    observed: &[Observed<'_>],
    before: &BTreeMap<PathBuf, DiskKey>,
) -> (BTreeMap<PathBuf, DiskKey>, Vec<DiskError>) {
    let mut by_active = before.clone();
    let mut twice = Vec::new();
    for o in observed {
        let a = o.chain.active().layer.path.clone();
        match by_active.get(&a) {
            Some(first) if *first != o.spec.key => twice.push(fail(
                o.spec,
                format!(
                    "{}: spec.source resolves to {}, which the disk {:?} already claims; one disk is managed by one spec",
                    o.spec.origin(),
                    a.display(),
                    first.to_string(),
                ),
                true,
            )),
            Some(_) => {}
            None => {
                by_active.insert(a, o.spec.key.clone());
            }
        }
    }
    (by_active, twice)
}

/// The files every disk's record retired.
fn retired_files(state: &StateDir) -> Vec<PathBuf> {
    state
        .all()
        .unwrap_or_default()
        .into_iter()
        .flat_map(|s| s.retired)
        .collect()
}

/// Plans already loaded specs: the planning stage of a reconcile (observe, validate, bind,
/// plan), for one disk or for many at once (`plan`, an agent pass: one host scan for all).
pub fn plan_loaded(loaded: &[DesiredDisk], host: &Host) -> Result<PlanReport, PlanRunError> {
    let (roots, state) = (&host.roots, &host.state);
    let mut report = PlanReport::default();
    let mut observed = observe_disks(loaded, roots, &mut report);

    // Two specs whose active images resolve to one file claim one disk.
    let (_, claimed_twice) = claims(&observed, &host.claimed);
    let dup: Vec<DiskKey> = claimed_twice.iter().map(|e| e.key.clone()).collect();
    report.errors.extend(claimed_twice);
    observed.retain(|o| !dup.contains(&o.spec.key));

    // The host graph: every managed layer with its allocation, every other image as a node,
    // and every other user of a layer the scan found (other names, data files, files whose
    // references cannot be read).
    let mut layers: Vec<Layer> = observed
        .iter()
        .flat_map(|o| o.chain.layers.iter().map(|l| l.layer.clone()))
        .collect();
    let chain_files: Vec<PathBuf> = layers.iter().map(|l| l.path.clone()).collect();
    // Files earlier plans dropped and left in place do not make the layers below them shared.
    let retired: Vec<PathBuf> = match &host.retired {
        Some(shared) => {
            let mut r: Vec<PathBuf> = shared.as_ref().clone();
            for o in &observed {
                if let Ok(Some(s)) = state.load(&o.spec.key) {
                    r.extend(s.retired);
                }
            }
            r
        }
        None => retired_files(state),
    };
    let input = scan_host(&host.scan_roots).graph_input(&chain_files, &retired);
    layers.extend(input.layers);
    // The disks of every other domain libvirt knows (running or only defined, wherever their
    // files are) use the first of our layers in their chains.
    let foreign = foreign_users(&mut observed, &chain_files, &mut report, &fail);
    let graph = ImageGraph::build_with_retired(layers, &retired)
        .map_err(PlanRunError::Graph)?
        .with_users(
            input
                .users
                .into_iter()
                .filter(|(_, user)| !retired.contains(user))
                .chain(foreign),
        )
        .with_names(input.names);

    let keys: Vec<&DiskKey> = host
        .keys
        .iter()
        .chain(loaded.iter().map(|s| &s.key))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for o in observed {
        if let Some(why) = state.legacy_owner_conflict(&o.spec.key, &keys) {
            report
                .errors
                .push(fail(o.spec, format!("{}: {why}", o.spec.origin()), true));
            continue;
        }
        let disk_state = match state.load(&o.spec.key) {
            Ok(s) => s,
            Err(e) => {
                let bad = matches!(e, StateError::Damaged { .. });
                report.errors.push(fail(o.spec, e.to_string(), bad));
                continue;
            }
        };
        let mut request = match bind(o.spec, &o.chain, disk_state.as_ref(), roots) {
            Ok(r) => r,
            Err(e) => {
                let mut err = fail(o.spec, e.to_string(), BindError::is_bad_input(&e));
                if let BindError::Stale { .. } = &e {
                    // A kept point lost behind diskchain's back is not the spec's fault: the
                    // operator decides (bind it again, or drop it).
                    err.kind = ErrorKind::NeedsOperator;
                }
                if let BindError::InUse { file, .. } = &e {
                    err.kind = ErrorKind::InUse;
                    // The holder may be diskchain itself: a step of another disk sharing this
                    // layer (in an agent, or an apply beside it) reads or writes it now.
                    if state.file_busy(file) {
                        err.error = format!(
                            "{}: layer {} is being read or written by a diskchain step of another disk that shares it (an agent, or an apply beside it); nothing was done: try again when that step is done (the agent retries by itself)",
                            o.spec.origin(),
                            file.display()
                        );
                    }
                }
                report.errors.push(err);
                continue;
            }
        };
        if o.running {
            request.mode = diskchain_planner::Mode::Live;
        }
        // A revert is done once per id.
        let revert =
            o.spec.revert.clone().filter(|r| {
                disk_state.as_ref().and_then(|s| s.last_revert.as_ref()) != Some(&r.id)
            });
        if let Some(r) = &revert {
            let Some(point) = request.keep.iter().find(|k| k.name == r.to) else {
                report.errors.push(fail(
                    o.spec,
                    format!(
                        "{}: spec.revert.to: {:?} is not an existing point of the chain (a new snapshot cannot be reverted to)",
                        o.spec.origin(),
                        r.to
                    ),
                    true,
                ));
                continue;
            };
            if o.running && !r.restart {
                report.errors.push(fail(
                    o.spec,
                    format!(
                        "{}: spec.revert: the domain is running; a revert replaces its disk under the guest. Shut the domain down first, or set spec.revert.restart: true to let diskchain power it off and start it again",
                        o.spec.origin()
                    ),
                    true,
                ));
                continue;
            }
            if o.running && o.transient {
                report.errors.push(fail(
                    o.spec,
                    format!(
                        "{}: spec.revert: the domain is transient (it has no persistent definition), so powering it off for the revert would remove it; define it persistently (virsh dumpxml, virsh define), or shut it down and revert its disk as an offline spec.source.file",
                        o.spec.origin()
                    ),
                    true,
                ));
                continue;
            }
            request.revert = Some(point.file.clone());
        }
        let formats = o
            .chain
            .layers
            .iter()
            .map(|l| (l.layer.path.clone(), l.layer.format))
            .collect();
        let quiesce = o.spec.live.as_ref().is_some_and(|l| l.quiesce);
        let snapshots = |p: &DiskPlan| {
            p.steps
                .iter()
                .any(|s| matches!(s.action, diskchain_planner::StepAction::Snapshot { .. }))
        };
        let shared_root = host.shared_roots.as_ref().is_some_and(|shared| {
            shared
                .iter()
                .any(|r| o.chain.active().layer.path.starts_with(r))
        });
        match plan_disk(&graph, &request) {
            Ok(plan)
                if shared_root
                    && let Some(why) = adoption_refused(
                        o.spec,
                        &o.chain,
                        &plan,
                        disk_state.as_ref(),
                        revert.as_ref(),
                        roots,
                    ) =>
            {
                report.errors.push(fail(
                    o.spec,
                    format!("{}: {why}. Nothing was done", o.spec.origin()),
                    true,
                ));
            }
            Ok(plan) if quiesce && o.running && !o.guest_agent && snapshots(&plan) => {
                report.errors.push(fail(
                    o.spec,
                    format!(
                        "{}: spec.source.libvirt.quiesce is true, but the domain has no QEMU guest agent channel to freeze its file systems with; add one to the domain (and run qemu-guest-agent in the guest), or set quiesce: false for crash-consistent snapshots",
                        o.spec.origin()
                    ),
                    true,
                ));
            }
            Ok(plan) if let Some(why) = drops_extras(&o.chain, &plan, o.running) => {
                report.errors.push(fail(
                    o.spec,
                    format!("{}: {why}", o.spec.origin()),
                    true,
                ));
            }
            Ok(mut plan) => report.disks.push(DiskReport {
                plan: {
                    // The chain's persistent dirty bitmaps, and which cannot be trusted.
                    // A running domain's QEMU has its active image open read-write (its
                    // bitmaps are loaded and marked in use); backing layers only read.
                    for l in &o.chain.layers {
                        for b in &l.extras.bitmaps {
                            plan.notes.push(format!(
                                "{} holds bitmap {}",
                                l.layer.path.display(),
                                b.describe(image_open(&o.chain, l, o.running))
                            ));
                        }
                    }
                    plan.notes.extend(bitmap_notes(&o.chain, &plan, o.running));
                    if let Ok(Some(j)) = crate::journal::Journal::load(state, &o.spec.key) {
                        let done = j.steps.iter().filter(|s| s.state == crate::journal::StepState::Done).count();
                        plan.notes.push(match crate::resume::check(&j, o.spec, roots, state) {
                            crate::resume::Verdict::Resume => format!(
                                "an earlier plan is in flight ({done} of {} steps done): apply or the agent finishes it before planning again",
                                j.steps.len()
                            ),
                            crate::resume::Verdict::SetAside { why, .. } => format!(
                                "an earlier unfinished plan ({done} of {} steps done) contradicts the spec as it is now ({why}): apply or the agent sets it aside and plans again from the chain as it is",
                                j.steps.len()
                            ),
                            crate::resume::Verdict::Stuck { why } => format!(
                                "an earlier unfinished plan cannot be finished or set aside safely without you: {why}"
                            ),
                        });
                    }
                    plan
                },
                key: o.spec.key.clone(),
                spec: o.spec.origin(),
                suspended: o.spec.spec().suspend,
                formats,
                live: o.running,
                libvirt: o.target.clone(),
                revert,
            }),
            Err(e) => report
                .errors
                .push(fail(o.spec, format!("{}: {e}", o.spec.origin()), true)),
        }
    }
    Ok(report)
}

/// Why a plan of a disk on a root every namespace shares (Kubernetes mode, a root the operator
/// assigned to no namespace) would change what its resource did not adopt. A resource adopts
/// the layers from the lowest one its spec names by file (or its record binds) up to the
/// active image; the layers below stay as they are (never merged away, written or deleted),
/// since any namespace could have named the image; and it reverts only to a point diskchain
/// took for it. An operator who assigns the root to namespaces (`--namespace-root`) lifts both.
pub fn adoption_refused(
    spec: &DesiredDisk,
    chain: &ObservedChain,
    plan: &DiskPlan,
    record: Option<&crate::state::DiskState>,
    revert: Option<&diskchain_crd::desired::Revert>,
    roots: &Roots,
) -> Option<String> {
    use diskchain_planner::StepAction;
    let named: Vec<PathBuf> = spec
        .spec()
        .snapshots
        .iter()
        .filter_map(|s| s.file.as_ref())
        .filter_map(|f| roots.confine(f, String::new()).ok())
        .chain(
            record
                .into_iter()
                .flat_map(|r| r.bindings.iter().map(|b| b.file.clone())),
        )
        .collect();
    let files: Vec<&PathBuf> = chain.layers.iter().map(|l| &l.layer.path).collect();
    let floor = files
        .iter()
        .position(|f| named.contains(f))
        .unwrap_or(files.len() - 1);
    let below: Vec<&PathBuf> = files[..floor].to_vec();
    let kept: Vec<&PathBuf> = plan.result.iter().map(|r| &r.file).collect();
    let touched = below.iter().any(|f| {
        !kept.contains(f)
            || plan.steps.iter().any(|s| match &s.action {
                StepAction::Commit { base, .. } => base == *f,
                StepAction::Stream { into, .. } => into == *f,
                StepAction::Delete { file, .. } => file == *f,
                _ => false,
            })
    });
    if touched {
        return Some(format!(
            "spec.snapshots: the chain of spec.source holds {} layer(s) below every point this DiskChain names or keeps ({}); on a root that every namespace shares, diskchain merges away, writes or deletes only the layers a DiskChain adopted by naming them: name the lowest one in spec.snapshots (file:) to adopt the chain from there, or ask the node's operator to assign the root to this namespace (--namespace-root)",
            below.len(),
            below
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(r) = revert {
        let taken = record
            .and_then(|rec| rec.bindings.iter().find(|b| b.name == r.to))
            .is_some_and(|b| b.adopted_from.is_none());
        let named_by_file = spec
            .spec()
            .snapshots
            .iter()
            .any(|s| s.name == r.to && s.file.is_some());
        if !taken || named_by_file {
            return Some(format!(
                "spec.revert.to: {:?} is a point this DiskChain adopted, not one diskchain took for it; on a root that every namespace shares, a revert (which discards the disk's current content) goes only to a point diskchain took: ask the node's operator to assign the root to this namespace (--namespace-root)",
                r.to
            ));
        }
    }
    None
}

/// True when a process has layer `l` open: a lock holder, or the running domain's QEMU on the
/// active image (which marks the bitmaps it loaded in use; backing layers it only reads).
fn image_open(chain: &ObservedChain, l: &crate::observe::ObservedLayer, running: bool) -> bool {
    l.in_use.is_some() || (running && l.layer.path == chain.active().layer.path)
}

/// What the plan's steps do with the chain's persistent dirty bitmaps, in words.
fn bitmap_notes(chain: &ObservedChain, plan: &DiskPlan, running: bool) -> Vec<String> {
    use diskchain_planner::StepAction;
    let mut notes = Vec::new();
    // Each bitmap with whether it is inconsistent (see `Bitmap::state`).
    let bitmaps_of = |p: &Path| {
        chain
            .layers
            .iter()
            .find(|l| l.layer.path == p)
            .map(|l| {
                let open = image_open(chain, l, running);
                l.extras
                    .bitmaps
                    .iter()
                    .map(|b| (b.clone(), b.inconsistent(open)))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    for s in &plan.steps {
        let (target, sources): (&Path, &[PathBuf]) = match &s.action {
            StepAction::Commit { base, layers, .. } => (base, layers),
            StepAction::Stream { into, layers, .. } => (into, layers),
            StepAction::Copy { to, layers, .. } => (to, layers),
            StepAction::Revert {
                to, active, point, ..
            } => {
                let there = bitmaps_of(to);
                for (b, _) in bitmaps_of(active) {
                    if b.auto && !there.iter().any(|(t, _)| t.name == b.name) {
                        notes.push(format!(
                            "bitmap {} did not exist at point {point}: the revert does not carry it, so backup tools find no bitmap of that name and take a full backup",
                            b.name
                        ));
                    }
                }
                continue;
            }
            StepAction::Snapshot { .. }
            | StepAction::Mirror { .. }
            | StepAction::Rebase { .. }
            | StepAction::TakeOver { .. }
            | StepAction::Delete { .. } => continue,
        };
        let mut merged = std::collections::BTreeSet::new();
        for l in sources.iter().chain(std::iter::once(&target.to_path_buf())) {
            for (b, inconsistent) in bitmaps_of(l) {
                if inconsistent {
                    notes.push(format!(
                        "bitmap {} of {} is inconsistent: {} step leaves it out of {} instead of carrying it, so backup tools take a full backup",
                        b.name,
                        l.display(),
                        s.action.op(),
                        target.display()
                    ));
                } else if l != target {
                    merged.insert(b.name);
                }
            }
        }
        if !merged.is_empty() {
            notes.push(format!(
                "the {} into {} carries bitmaps {:?} of the layers it reads (merged, exact)",
                s.action.op(),
                target.display(),
                merged
            ));
        }
    }
    notes
}

/// Why `plan` would drop something a layer holds beside its guest data. Internal snapshots live
/// in the file, so a layer that leaves the chain (merged away, deleted, or replaced by a copy)
/// takes them along: such a plan is refused. Persistent dirty bitmaps are carried by every step
/// (merged into the layer that takes over the data, added to a new top, copied with a copy),
/// except by a full live block copy, whose handling of the lower layers' bitmaps diskchain has
/// not verified: that plan is refused when the chain holds bitmaps.
fn drops_extras(chain: &ObservedChain, plan: &DiskPlan, live: bool) -> Option<String> {
    let kept: Vec<&PathBuf> = plan.result.iter().map(|r| &r.file).collect();
    // A layer that takes the active image's path replaces the active file: what the old one
    // held beside its data goes with it (its bitmaps were merged into the holder).
    let taker = plan.steps.iter().find_map(|s| match &s.action {
        diskchain_planner::StepAction::TakeOver { holder, .. } => Some(holder),
        _ => None,
    });
    let full_copy = live
        && plan.steps.iter().any(|s| {
            matches!(
                s.action,
                diskchain_planner::StepAction::Mirror { backing: None, .. }
            )
        });
    let mut problems = Vec::new();
    for l in &chain.layers {
        let e = &l.extras;
        let replaced = taker.is_some() && l.layer.path == chain.active().layer.path;
        let leaves = (!kept.contains(&&l.layer.path) && taker != Some(&l.layer.path)) || replaced;
        if leaves && !e.snapshots.is_empty() {
            problems.push(format!(
                "{} holds internal snapshots {:?}, which would be lost when the layer leaves the chain",
                l.layer.path.display(),
                e.snapshots
            ));
        }
        if full_copy && !e.bitmaps.is_empty() {
            let names: Vec<&str> = e.bitmaps.iter().map(|b| b.name.as_str()).collect();
            problems.push(format!(
                "{} holds persistent dirty bitmaps {names:?}, and the plan copies the whole chain of the running domain (a full block copy), whose handling of the lower layers' bitmaps is not verified",
                l.layer.path.display()
            ));
        }
    }
    (!problems.is_empty()).then(|| {
        format!(
            "refusing a plan that drops data the chain holds beside its guest view: {}. Keep those points in spec.snapshots, or remove the internal snapshots (qemu-img snapshot -d) and bitmaps (qemu-img bitmap --remove, or delete the libvirt checkpoints) first",
            problems.join("; ")
        )
    })
}
