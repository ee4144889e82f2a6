//! The libvirt backend: runs plan steps on a libvirt domain's disk.
//!
//! | step | running domain | shut-off domain |
//! |---|---|---|
//! | snapshot | prepared overlay + external disk-only snapshot (`--no-metadata --reuse-external`, `--quiesce` on request) | offline |
//! | commit | block commit; of the active layer: wait until ready, pivot | offline |
//! | stream | block pull into the active layer with a base | offline |
//! | mirror | prepared file + shallow block copy, wait until ready, pivot | refused (replanned) |
//! | copy | `qemu-img` reads the backing layers (QEMU only reads them) into new files | offline |
//! | revert | with `spec.revert.restart`: power off, revert the files, start | offline |
//! | delete | offline (only files no process has open) | offline |
//!
//! Every step first looks at libvirt's own state: a job of the step's kind already running on the
//! disk (after an agent or libvirtd restart) is adopted and waited for, and a step whose effect
//! is already in the chain is done. After every step the persistent definition is checked
//! against the chain and rewritten when it differs.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diskchain_crd::desired::{LiveTarget as LibvirtSource, OnTimeout, Revert as RevertSpec};
use diskchain_planner::{Format, StepAction};
use virt::connect::Connect;
use virt::domain::Domain;

use super::sys::{self, JobKind};
use super::{LiveDisk, LiveError, qemu_pid, xml};
use crate::execute::offline::Offline;
use crate::execute::{ExecError, ExecOptions, Executor, StepReport};
use crate::observe::{Roots, observe_chain};

/// How long libvirt may stay unreachable during a job (a libvirtd restart) before the step fails.
const RECONNECT_FOR: Duration = Duration::from_secs(120);
/// How often a job is polled.
const POLL: Duration = Duration::from_millis(100);

pub(super) struct Session {
    pub(super) conn: Connect,
    pub(super) dom: Domain,
}

/// Connects to libvirt at `uri`: only an allowed URI ([`super::check_uri`]), within
/// [`super::CONNECT_TIMEOUT`]; a connect that does not answer in time is left to end on its own
/// thread. Calls on the connection are bounded by libvirt's keepalive, so a daemon that stops
/// answering ends the connection (and every call on it fails) instead of hanging the caller.
pub(super) fn connect(uri: &str) -> Result<Connect, LiveError> {
    super::check_uri(uri)?;
    virt::error::clear_error_callback();
    sys::start_event_loop();
    let (tx, rx) = std::sync::mpsc::channel();
    let u = uri.to_string();
    let spawned = std::thread::Builder::new()
        .name("libvirt-connect".into())
        .spawn(move || {
            let _ = tx.send(Connect::open(Some(&u)).map_err(|e| e.message().to_string()));
        });
    let failed = |message: String| LiveError::Connect {
        uri: uri.to_string(),
        message,
    };
    spawned.map_err(|e| failed(format!("cannot start a thread to connect: {e}")))?;
    let conn = match rx.recv_timeout(super::CONNECT_TIMEOUT) {
        Ok(r) => r.map_err(failed)?,
        Err(_) => {
            return Err(failed(format!(
                "no answer within {} s",
                super::CONNECT_TIMEOUT.as_secs()
            )));
        }
    };
    // Calls on the connection are bounded by libvirt's own keepalive (the client's defaults: a
    // probe every 5 s, the connection closed after 5 unanswered), which the event loop started
    // above runs. (Setting it here made a clean libvirtd restart wait for this client.)
    Ok(conn)
}

pub(super) fn open(src: &LibvirtSource) -> Result<Session, LiveError> {
    let conn = connect(&src.uri)?;
    let dom = conn
        .lookup_domain_by_name(&src.domain)
        .map_err(|e| LiveError::NoDomain {
            uri: src.uri.clone(),
            domain: src.domain.clone(),
            message: e.message().to_string(),
        })?;
    Ok(Session { conn, dom })
}

pub(super) fn call(
    src: &LibvirtSource,
    what: &str,
) -> impl FnOnce(virt::error::Error) -> LiveError + use<> {
    let (domain, what) = (src.domain.clone(), what.to_string());
    move |e| LiveError::Call {
        domain,
        what,
        message: e.message().to_string(),
    }
}

pub(super) fn locate(src: &LibvirtSource) -> Result<LiveDisk, LiveError> {
    let s = open(src)?;
    let running = s
        .dom
        .is_active()
        .map_err(call(src, "asking whether it runs"))?;
    let persistent = s
        .dom
        .is_persistent()
        .map_err(call(src, "asking whether it is persistent"))?;
    let flags = if running {
        0
    } else {
        virt::sys::VIR_DOMAIN_XML_INACTIVE
    };
    let x = s
        .dom
        .xml_desc(flags)
        .map_err(call(src, "reading its XML"))?;
    let xml_err = |source| LiveError::Xml {
        domain: src.domain.clone(),
        source,
    };
    let disk = xml::disk(&x, &src.target).map_err(xml_err)?;
    let guest_agent = xml::has_guest_agent(&x).map_err(xml_err)?;
    Ok(LiveDisk {
        running,
        persistent,
        disk,
        pid: if running { qemu_pid(&src.domain) } else { None },
        guest_agent,
    })
}

pub(super) fn domain_disks(uri: &str) -> Result<Vec<super::DomainDisk>, LiveError> {
    let conn = connect(uri)?;
    let doms = conn.list_all_domains(0).map_err(|e| LiveError::Connect {
        uri: uri.to_string(),
        message: format!("listing its domains: {}", e.message()),
    })?;
    let mut out = Vec::new();
    for dom in doms {
        let name = dom.name().unwrap_or_default();
        let running = dom.is_active().unwrap_or(false);
        let persistent = dom.is_persistent().unwrap_or(false);
        let mut xmls = Vec::new();
        if running {
            xmls.push(dom.xml_desc(0));
        }
        if persistent {
            xmls.push(dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE));
        }
        for x in xmls {
            let x = x.map_err(|e| LiveError::Call {
                domain: name.clone(),
                what: "reading its XML".into(),
                message: e.message().to_string(),
            })?;
            let disks = xml::disk_files(&x).map_err(|source| LiveError::Xml {
                domain: name.clone(),
                source,
            })?;
            for (target, mut files) in disks {
                // Below what libvirt records, the image headers give the rest of the chain.
                let mut cur = files.last().cloned();
                while let Some(f) = cur {
                    cur = crate::observe::header_backing(&f).filter(|b| !files.contains(b));
                    if let Some(b) = &cur {
                        files.push(b.clone());
                    }
                    if files.len() > 256 {
                        break;
                    }
                }
                out.push(super::DomainDisk {
                    domain: name.clone(),
                    target,
                    running,
                    files,
                });
            }
        }
    }
    Ok(out)
}

/// Runs steps on one libvirt disk.
pub struct Libvirt {
    src: LibvirtSource,
    roots: Roots,
    offline: Offline,
    options: ExecOptions,
    /// The plan was made for a running domain.
    live_plan: bool,
    revert: Option<RevertSpec>,
    formats: BTreeMap<PathBuf, Format>,
    /// Where a guest write limit set by `converge.then: throttle` is remembered until lifted.
    throttle_record: Option<PathBuf>,
    /// The step being run was interrupted while running (a resumed journal): a block job of its
    /// kind may be the one it started.
    resuming: std::cell::Cell<bool>,
    /// The libvirt connection: one for the whole plan of this disk (a reconcile), opened on
    /// first use and opened again when libvirtd went away (a restart) or a call failed on it.
    session: std::cell::RefCell<Option<std::rc::Rc<Session>>>,
}

impl Libvirt {
    /// A backend for the disk `src`, confined to `roots`. `live_plan`: the plan was made while
    /// the domain ran (its steps assume libvirt's semantics); `revert`: the spec's revert, whose
    /// `restart` allows powering the domain off and on. `throttle_record`: a file where a guest
    /// write limit this backend sets is remembered until it is lifted (so a killed run's limit
    /// is lifted by the next).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        src: LibvirtSource,
        roots: Roots,
        formats: BTreeMap<PathBuf, Format>,
        dead: HashSet<PathBuf>,
        options: ExecOptions,
        live_plan: bool,
        revert: Option<RevertSpec>,
        throttle_record: Option<PathBuf>,
    ) -> Libvirt {
        let offline = Offline::new(roots.clone(), formats.clone(), dead, options).reading_live();
        Libvirt {
            src,
            roots,
            offline,
            options,
            live_plan,
            revert,
            formats,
            throttle_record,
            resuming: std::cell::Cell::new(false),
            session: std::cell::RefCell::new(None),
        }
    }

    /// The plan's libvirt connection (see `session`).
    fn session(&self) -> Result<std::rc::Rc<Session>, LiveError> {
        let mut cached = self.session.borrow_mut();
        if let Some(s) = cached.as_ref()
            && s.conn.is_alive().unwrap_or(false)
        {
            return Ok(s.clone());
        }
        let s = std::rc::Rc::new(open(&self.src)?);
        *cached = Some(s.clone());
        Ok(s)
    }

    /// Drops the plan's connection: the next call opens a new one.
    fn forget_session(&self) {
        self.session.borrow_mut().take();
    }

    fn live_err(&self, what: &str) -> impl FnOnce(virt::error::Error) -> ExecError {
        let f = call(&self.src, what);
        move |e| ExecError::from(f(e))
    }

    fn refuse(&self, op: &'static str, file: &Path, what: impl Into<String>) -> ExecError {
        ExecError::Precondition {
            op,
            file: file.to_path_buf(),
            what: what.into(),
        }
    }

    /// The format of a file the plan names (known from the observed chain, or qcow2 for files
    /// the plan creates); never guessed.
    fn format(&self, op: &'static str, p: &Path) -> Result<Format, ExecError> {
        self.formats
            .get(p)
            .copied()
            .ok_or_else(|| self.refuse(op, p, "its format is not known from the observed chain"))
    }

    /// Creates the empty qcow2 `file`, backed by `backing` when given, without opening anything
    /// QEMU holds (`-u`, with the guest size given).
    fn prepare(
        &self,
        op: &'static str,
        file: &Path,
        backing: Option<&Path>,
        size: u64,
    ) -> Result<(), ExecError> {
        if file.exists() {
            // Only an earlier attempt's prepared file may be here: a qcow2 with this backing
            // that no process has open. Anything else is not ours.
            let f = std::fs::File::open(file).map_err(|source| ExecError::Io {
                action: "open",
                path: file.to_path_buf(),
                source,
            })?;
            let ours = crate::observe::qcow2::has_magic(&f)
                && crate::observe::lock_holder(&f).ok().flatten().is_none()
                && crate::observe::backing_of(&self.roots, file)
                    .ok()
                    .flatten()
                    .map(|(b, _)| b)
                    == backing.map(Path::to_path_buf);
            if !ours {
                return Err(self.refuse(
                    op,
                    file,
                    "a file is already there that is not a prepared file of this step; move it away",
                ));
            }
            std::fs::remove_file(file).map_err(|source| ExecError::Io {
                action: "remove",
                path: file.to_path_buf(),
                source,
            })?;
        }
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ExecError::Io {
                action: "create",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let backing = match backing {
            Some(b) => Some((b, self.format(op, b)?)),
            None => None,
        };
        let mut c =
            crate::execute::qemu_img::create(file, Format::Qcow2, Some(size), backing, None, true);
        let out = c.output().map_err(|source| ExecError::Io {
            action: "run qemu-img create for",
            path: file.to_path_buf(),
            source,
        })?;
        if !out.status.success() {
            return Err(ExecError::Qemu {
                command: format!("qemu-img create {}", file.display()),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// The guest size of the disk.
    fn guest_size(&self, d: &LiveDisk) -> Result<u64, ExecError> {
        let chain = observe_chain(&self.roots, &d.disk.active)?;
        Ok(chain.active().virtual_size)
    }

    /// Waits for the disk's block job of `kind` to end; a mirror-style job (`pivot`) is pivoted
    /// once ready, within the spec's time budget and then as `converge.then` says. Survives
    /// libvirtd restarts (libvirt keeps the job; the connection is made again).
    fn wait_job(
        &self,
        kind: JobKind,
        pivot: bool,
        progress: &mut dyn FnMut(f64),
    ) -> Result<(), ExecError> {
        let t0 = Instant::now();
        let budget = self.src.converge.within;
        let mut acted = false;
        // A throttle an interrupted run set is lifted when this job ends.
        let mut throttled: Option<sys::IoTune> = self.throttle_record_read();
        if throttled.is_some() {
            acted = true;
        }
        let mut session: Option<std::rc::Rc<Session>> = None;
        let mut events: Option<sys::JobEvents> = None;
        let mut unreachable_since: Option<Instant> = None;
        let target = self.src.target.clone();
        let result = loop {
            if crate::execute::process::abandoning() {
                // A shutdown's grace is over: leave the job to QEMU; the journal keeps the step.
                break Err(ExecError::Abandoned { op: kind.op() });
            }
            if session.is_none() {
                match self.session() {
                    Ok(s) => {
                        // Ready, completed, failed and cancelled come as events; progress is
                        // polled (the events carry none).
                        events = sys::watch_block_jobs(&s.conn, &s.dom)
                            .map_err(|e| {
                                tracing::warn!(domain = %self.src.domain, error = %e.message(), "no block job events; polling only");
                            })
                            .ok();
                        session = Some(s);
                        unreachable_since = None;
                    }
                    Err(e) => {
                        let since = *unreachable_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > RECONNECT_FOR {
                            break Err(ExecError::from(e));
                        }
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let s = session.as_ref().expect("opened above");
            let info = match sys::job_info(&s.dom, &target) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(domain = %self.src.domain, error = %e.message(), "lost libvirt during a block job; reconnecting");
                    events = None;
                    session = None;
                    self.forget_session();
                    unreachable_since.get_or_insert_with(Instant::now);
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            let Some(j) = info else {
                break Ok(());
            };
            if j.kind != kind {
                break Err(self.refuse(
                    "wait",
                    Path::new(&target),
                    format!(
                        "a {:?} block job runs on the disk, not the {kind:?} this step started",
                        j.kind
                    ),
                ));
            }
            if j.end > 0 {
                progress((j.cur as f64 / j.end as f64).min(1.0));
            }
            if pivot && j.ready() {
                match sys::job_abort(&s.dom, &target, true) {
                    Ok(()) => continue, // the job ends with the pivot
                    Err(e) => {
                        tracing::debug!(error = %e.message(), "pivot not possible yet");
                    }
                }
            }
            if pivot && !j.ready() && !acted && t0.elapsed() > budget {
                acted = true;
                match self.src.converge.then {
                    OnTimeout::Wait => {
                        tracing::warn!(domain = %self.src.domain, disk = %target, seconds = t0.elapsed().as_secs(), "the job has not caught up with the guest's writes; waiting on (converge.then: wait)");
                    }
                    OnTimeout::Throttle => {
                        let before = sys::io_tune(&s.dom, &target)
                            .map_err(self.live_err("reading the disk's I/O limits"))?;
                        // Recorded before it is changed: a run killed in between restores it.
                        self.throttle_record_write(&before);
                        let limited = sys::with_write_limit(
                            &before,
                            self.src.converge.throttle_bytes_per_sec,
                        );
                        sys::set_io_tune(&s.dom, &target, &limited)
                            .map_err(self.live_err("limiting the guest's writes"))?;
                        throttled = Some(before);
                        tracing::warn!(domain = %self.src.domain, disk = %target, limit = self.src.converge.throttle_bytes_per_sec, "the job has not caught up; guest writes limited until the pivot (converge.then: throttle)");
                    }
                    OnTimeout::Abort => {
                        let _ = sys::job_abort(&s.dom, &target, false);
                        // Wait for the cancelled job to be gone before reporting.
                        let gone = Instant::now();
                        while gone.elapsed() < Duration::from_secs(60)
                            && matches!(sys::job_info(&s.dom, &target), Ok(Some(_)))
                        {
                            std::thread::sleep(POLL);
                        }
                        break Err(ExecError::NotConverged {
                            domain: self.src.domain.clone(),
                            disk: target.clone(),
                            within: humantime::format_duration(self.src.converge.within)
                                .to_string(),
                        });
                    }
                }
            }
            // The next poll comes after an event about this disk, or after POLL.
            let Some(ev) = &events else {
                std::thread::sleep(POLL);
                continue;
            };
            let received = ev.rx.recv_timeout(POLL);
            if let Ok((disk, event)) = &received {
                tracing::debug!(domain = %self.src.domain, disk = %disk, ?event, "block job event");
            }
            match received {
                Ok((disk, event)) if disk == target => match event {
                    sys::JobEvent::Ready | sys::JobEvent::Completed => {}
                    // A late event of an earlier job on this disk: ours still runs.
                    sys::JobEvent::Failed | sys::JobEvent::Canceled if matches!(self.job_now(), Ok(Some(j)) if j.kind == kind) =>
                        {}
                    sys::JobEvent::Failed => {
                        break Err(ExecError::from(LiveError::Call {
                            domain: self.src.domain.clone(),
                            what: format!("the {kind:?} block job on {target}"),
                            message: format!(
                                "QEMU reported it failed; its reason is in /var/log/libvirt/qemu/{}.log. The chain is as libvirt shows it; the step is retried on the next run",
                                self.src.domain
                            ),
                        }));
                    }
                    sys::JobEvent::Canceled => {
                        break Err(ExecError::from(LiveError::Call {
                            domain: self.src.domain.clone(),
                            what: format!("the {kind:?} block job on {target}"),
                            message: "it was cancelled outside diskchain; the step is retried on the next run".into(),
                        }));
                    }
                },
                Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => events = None,
            }
        };
        drop(events);
        if let Some(before) = throttled {
            // Put the disk's I/O tuning back as it was, whatever happened to the job.
            match self.session().and_then(|s| {
                sys::set_io_tune(&s.dom, &target, &before)
                    .map_err(call(&self.src, "restoring the disk's I/O tuning"))
            }) {
                Ok(()) => self.throttle_record_clear(),
                Err(e) => {
                    tracing::error!(domain = %self.src.domain, disk = %target, error = %e, "could not lift the guest write limit; the next run tries again (or reset it with virsh blkdeviotune)");
                }
            }
        }
        result
    }

    /// The disk's I/O tuning before it was throttled, when a run throttled it and did not get
    /// to restore it (it was killed). Older records hold only the write limit.
    fn throttle_record_read(&self) -> Option<sys::IoTune> {
        let p = self.throttle_record.as_ref()?;
        let text = std::fs::read_to_string(p).ok()?;
        if let Ok(n) = text.trim().parse::<u64>() {
            return Some(sys::IoTune::from([("write_bytes_sec".to_string(), n)]));
        }
        serde_json::from_str(&text).ok()
    }

    fn throttle_record_write(&self, before: &sys::IoTune) {
        if let Some(p) = &self.throttle_record {
            if let Some(d) = p.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            let text = serde_json::to_string(before).unwrap_or_default();
            if let Err(e) = crate::state::write_atomic(p, text.as_bytes()) {
                tracing::warn!(file = %p.display(), error = %e, "could not record the throttle; a killed run would leave the guest limited");
            }
        }
    }

    fn throttle_record_clear(&self) {
        if let Some(p) = &self.throttle_record {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Lifts a guest write limit an interrupted run left (its job is no longer running).
    fn lift_leftover_throttle(&self) -> Result<(), ExecError> {
        let Some(before) = self.throttle_record_read() else {
            return Ok(());
        };
        if self.job_now()?.is_some() {
            return Ok(()); // the step waiting for that job lifts it
        }
        let s = self.session()?;
        sys::set_io_tune(&s.dom, &self.src.target, &before).map_err(
            self.live_err("restoring the disk's I/O tuning an interrupted run left throttled"),
        )?;
        self.throttle_record_clear();
        Ok(())
    }

    fn job_now(&self) -> Result<Option<sys::JobInfo>, ExecError> {
        let s = self.session()?;
        sys::job_info(&s.dom, &self.src.target).map_err(self.live_err("reading block jobs"))
    }

    fn snapshot(&self, d: &LiveDisk, point_file: &Path, new: &Path) -> Result<(), ExecError> {
        let op = "snapshot";
        if d.disk.active == new && d.disk.backing.first().map(PathBuf::as_path) == Some(point_file)
        {
            return Ok(()); // done before
        }
        if d.disk.active != point_file {
            return Err(self.refuse(
                op,
                point_file,
                format!(
                    "the domain's active image is {}, not this file",
                    d.disk.active.display()
                ),
            ));
        }
        let size = self.guest_size(d)?;
        self.prepare(op, new, Some(point_file), size)?;
        let s = self.session()?;
        let x = s
            .dom
            .xml_desc(0)
            .map_err(self.live_err("reading its XML"))?;
        let others = xml::other_disks(&x, &self.src.target).map_err(|source| {
            ExecError::from(LiveError::Xml {
                domain: self.src.domain.clone(),
                source,
            })
        })?;
        let name = format!("diskchain-{}", crate::journal::now_unix());
        let mut flags = virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT;
        if self.src.quiesce {
            flags |= virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE;
        }
        s.dom
            .create_snapshot_xml(&xml::snapshot(&name, &self.src.target, new, &others), flags)
            .map_err(self.live_err("taking an external disk-only snapshot"))?;
        Ok(())
    }

    /// Runs a block job of `kind` to its end: adopts the one already running on the disk when
    /// it is this step's own (left by an interrupted run), or starts one with `start` (which
    /// checks the step's preconditions first); then waits for it, pivoting a mirror-style job
    /// (`pivot`). A job is the step's own when libvirt shows it writing to `dest` (a block copy,
    /// an active commit), or, for jobs libvirt shows no destination of (a pull, an intermediate
    /// commit), when this step was interrupted while running. Any other job was started by
    /// someone else: it is never taken over or pivoted; the step waits for it (exit 1).
    #[allow(clippy::too_many_arguments)]
    fn run_job(
        &self,
        op: &'static str,
        file: &Path,
        kind: JobKind,
        pivot: bool,
        dest: Option<&Path>,
        start: impl FnOnce(&Session) -> Result<(), ExecError>,
        progress: &mut dyn FnMut(f64),
    ) -> Result<(), ExecError> {
        match self.job_now()? {
            Some(j) if j.kind == kind && self.owns_job(dest)? => {
                tracing::info!(domain = %self.src.domain, ?kind, "adopting this step's block job, left running by an interrupted run");
            }
            Some(j) => {
                let target = &self.src.target;
                let domain = &self.src.domain;
                return Err(ExecError::NotNow {
                    op,
                    file: file.to_path_buf(),
                    what: format!(
                        "a {:?} block job that this step did not start runs on disk {target} of domain {domain} (an operator's, or one left running by an earlier plan that was set aside); diskchain never takes over or pivots a job that is not the step's own. Wait for it to end, or cancel it (`virsh blockjob {domain} {target} --abort`), and run again",
                        j.kind
                    ),
                });
            }
            None => start(&*self.session()?)?,
        }
        self.wait_job(kind, pivot, progress)
    }

    /// True when the block job on the disk is this step's own (see [`Libvirt::run_job`]).
    fn owns_job(&self, dest: Option<&Path>) -> Result<bool, ExecError> {
        let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        match dest {
            Some(dest) => {
                let d = super::locate(&self.src)?;
                Ok(d.disk.mirror.and_then(|(_, f)| f).map(|f| canon(&f)) == Some(canon(dest)))
            }
            None => Ok(self.resuming.get()),
        }
    }

    fn commit(
        &self,
        d: &LiveDisk,
        base: &Path,
        top: &Path,
        layers: &[PathBuf],
        progress: &mut dyn FnMut(f64),
    ) -> Result<(), ExecError> {
        let op = "commit";
        let in_chain = |p: &Path| d.disk.active == p || d.disk.backing.iter().any(|b| b == p);
        let shallow = layers.len() == 1;
        let bandwidth = self.options.max_bytes_per_sec;
        if top == d.disk.active || (d.disk.active == base && !in_chain(top)) {
            // Active commit, ending with a pivot to `base`.
            if d.disk.active == base {
                return Ok(()); // pivoted before
            }
            let start = |s: &Session| {
                if !in_chain(base) {
                    return Err(self.refuse(op, base, "it is not in the domain's chain"));
                }
                sys::block_commit(
                    &s.dom,
                    &self.src.target,
                    base,
                    None,
                    true,
                    shallow,
                    bandwidth,
                )
                .map_err(self.live_err("starting an active block commit"))
            };
            self.run_job(
                op,
                top,
                JobKind::ActiveCommit,
                true,
                Some(base),
                start,
                progress,
            )?;
            let after = super::locate(&self.src)?;
            if after.disk.active != base {
                return Err(self.refuse(
                    op,
                    base,
                    format!(
                        "the active commit ended without a pivot to it (the active image is {})",
                        after.disk.active.display()
                    ),
                ));
            }
            return Ok(());
        }
        if !in_chain(top) && in_chain(base) {
            return Ok(()); // committed before
        }
        let start = |s: &Session| {
            if !in_chain(base) || !in_chain(top) {
                return Err(self.refuse(op, top, "it or its base is not in the domain's chain"));
            }
            sys::block_commit(
                &s.dom,
                &self.src.target,
                base,
                Some(top),
                false,
                shallow,
                bandwidth,
            )
            .map_err(self.live_err("starting a block commit"))
        };
        self.run_job(op, top, JobKind::Commit, false, None, start, progress)?;
        let after = super::locate(&self.src)?;
        if after.disk.backing.iter().any(|b| b == top) {
            return Err(self.refuse(
                op,
                top,
                "the block commit ended but the layer is still in the chain (the job failed; see the domain's log)",
            ));
        }
        Ok(())
    }

    /// Bytes of the pulled `layers` that `into` does not hold although its header already names
    /// `base` as its backing: what a crash of QEMU between the pull's end and a flush lost (the
    /// guest reads `base` there). 0 when the pull has not rewritten the backing reference yet.
    fn lost_by_pull(
        &self,
        into: &Path,
        base: Option<&Path>,
        layers: &[PathBuf],
    ) -> Result<u64, ExecError> {
        let now = crate::observe::header_backing(into);
        let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        if now != base.map(canon) || layers.iter().any(|l| !l.exists()) {
            return Ok(0);
        }
        let op = "stream";
        let top = crate::observe::allocation_of(into, self.format(op, into)?)?;
        let mut below = Vec::with_capacity(layers.len());
        for l in layers {
            below.push(crate::observe::allocation_of(l, self.format(op, l)?)?);
        }
        let unit = below
            .iter()
            .map(|a| a.unit)
            .chain([top.unit])
            .min()
            .unwrap_or(65536);
        let mut pulled = roaring::RoaringTreemap::new();
        for a in &below {
            pulled |= a.rescaled(unit).clipped(top.virtual_size).allocated();
        }
        let missing = &pulled - &top.rescaled(unit).allocated();
        Ok(missing.len() * unit)
    }

    fn pull(
        &self,
        d: &LiveDisk,
        into: &Path,
        base: Option<&Path>,
        layers: &[PathBuf],
        progress: &mut dyn FnMut(f64),
    ) -> Result<(), ExecError> {
        let op = "stream";
        if into != d.disk.active {
            return Err(self.refuse(
                op,
                into,
                "on a running domain libvirt pulls only into the active layer",
            ));
        }
        if d.disk.backing.first().map(PathBuf::as_path) == base {
            // Pulled before (an interrupted run): durable only once QEMU flushed, and only if
            // QEMU did not die before that since.
            self.make_durable(op, into)?;
            let lost = self.lost_by_pull(into, base, layers)?;
            if lost > 0 {
                return Err(ExecError::NotNow {
                    op,
                    file: into.to_path_buf(),
                    what: format!(
                        "the domain's QEMU stopped before {lost} bytes this pull copied reached the file, so the guest reads the layer below there. Shut the domain down and run again: diskchain points {} back at the layers it pulled from (they are still there) and pulls again once the domain runs",
                        into.display()
                    ),
                });
            }
            return Ok(());
        }
        let start = |s: &Session| {
            if let Some(b) = base
                && !d.disk.backing.iter().any(|x| x == b)
            {
                return Err(self.refuse(op, b, "the new base is not in the domain's chain"));
            }
            sys::block_pull(
                &s.dom,
                &self.src.target,
                base,
                self.options.max_bytes_per_sec,
            )
            .map_err(self.live_err("starting a block pull"))
        };
        self.run_job(op, into, JobKind::Pull, false, None, start, progress)?;
        let after = super::locate(&self.src)?;
        if after.disk.backing.first().map(PathBuf::as_path) != base {
            return Err(self.refuse(
                op,
                into,
                "the block pull ended but the chain below it did not change (the job failed; see the domain's log)",
            ));
        }
        self.make_durable(op, into)
    }

    /// Makes what a finished block job wrote durable. QEMU's block pull rewrites the active
    /// image's backing reference (synced at once) before the pulled clusters' L2 entries leave
    /// its metadata cache: a crash of QEMU then would leave the guest reading through the new
    /// backing file where the pulled data should be. Pausing the domain makes QEMU flush every
    /// image (`vm_stop` flushes all block devices); it is resumed at once, a pause of a few
    /// milliseconds. A domain paused by someone else is not resumed by diskchain, so a pull on it
    /// cannot be made durable: the step is not reported done, and runs once it is resumed.
    fn make_durable(&self, op: &'static str, file: &Path) -> Result<(), ExecError> {
        use virt::domain::DomainState;
        use virt::enumutil::Enum;
        let s = self.session()?;
        let (state, _) = s
            .dom
            .state()
            .map_err(self.live_err("reading the domain's state"))?;
        match state {
            Enum::Known(DomainState::Running) | Enum::Known(DomainState::Blocked) => {
                s.dom
                    .suspend()
                    .map_err(self.live_err("pausing the domain to flush its images"))?;
                // The guest must not stay paused: a failed resume (libvirtd restarting, say) is
                // tried again on a fresh connection before it is reported.
                let mut resumed = s.dom.resume();
                for _ in 0..5 {
                    if resumed.is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    self.forget_session();
                    let Ok(s2) = self.session() else {
                        continue;
                    };
                    if matches!(s2.dom.state(), Ok((Enum::Known(DomainState::Running), _))) {
                        resumed = Ok(());
                        break;
                    }
                    resumed = s2.dom.resume();
                }
                resumed.map_err(self.live_err(
                    "resuming the domain after flushing its images (it is paused: `virsh resume` it)",
                ))?;
                Ok(())
            }
            _ => Err(ExecError::NotNow {
                op,
                file: file.to_path_buf(),
                what: "the domain is not running (paused?), so QEMU cannot be made to flush what the pull wrote; the step stays unfinished and completes once the domain runs again".into(),
            }),
        }
    }

    fn mirror(
        &self,
        d: &LiveDisk,
        from: &Path,
        to: &Path,
        backing: Option<&Path>,
        progress: &mut dyn FnMut(f64),
    ) -> Result<(), ExecError> {
        let op = "mirror";
        if d.disk.active == to {
            return Ok(()); // pivoted before
        }
        if d.disk.active != from {
            return Err(self.refuse(
                op,
                from,
                format!("the domain's active image is {}", d.disk.active.display()),
            ));
        }
        let start = |s: &Session| {
            let to = self.roots.confine_dir(to, "the mirror's new file".into())?;
            self.prepare(op, &to, backing, self.guest_size(d)?)?;
            sys::block_copy(
                &s.dom,
                &self.src.target,
                &xml::copy_destination(&to),
                backing.is_some(),
                self.options.max_bytes_per_sec,
            )
            .map_err(self.live_err("starting a block copy"))
        };
        self.run_job(op, from, JobKind::Copy, true, Some(to), start, progress)?;
        let after = super::locate(&self.src)?;
        if after.disk.active != to {
            return Err(self.refuse(op, to, "the block copy ended without a pivot to it"));
        }
        Ok(())
    }

    /// Shuts the domain down for a revert: a clean (ACPI) shutdown within
    /// `spec.revert.shutdownTimeout`, then a power-off.
    fn shut_down(&self) -> Result<(), ExecError> {
        let s = self.session()?;
        let timeout = self
            .revert
            .as_ref()
            .map_or(Duration::from_secs(120), |r| r.shutdown_timeout);
        let running = || {
            s.dom
                .is_active()
                .map_err(self.live_err("asking whether it runs"))
        };
        if !timeout.is_zero() {
            tracing::info!(domain = %self.src.domain, seconds = timeout.as_secs(), "shutting the domain down for the revert (spec.revert.restart)");
            if let Err(e) = s.dom.shutdown() {
                tracing::warn!(domain = %self.src.domain, error = %e.message(), "the clean shutdown request failed");
            }
            let t = Instant::now();
            while running()? && t.elapsed() < timeout {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if running()? {
            tracing::warn!(domain = %self.src.domain, "powering the domain off for the revert (it did not shut down within spec.revert.shutdownTimeout)");
            s.dom
                .destroy()
                .map_err(self.live_err("powering it off for the revert"))?;
        }
        Ok(())
    }

    /// `step` is the revert (run by the offline backend once the domain is off); `active` its
    /// active image.
    fn revert(
        &self,
        d: &LiveDisk,
        step: &StepAction,
        active: &Path,
        progress: &mut dyn FnMut(f64),
    ) -> Result<u64, ExecError> {
        let restart = self.revert.as_ref().is_some_and(|r| r.restart);
        if d.running {
            if !restart {
                return Err(self.refuse("revert", active, format!("domain {} is running; a revert replaces its disk under the guest: shut it down first, or set spec.revert.restart: true", self.src.domain)));
            }
            self.shut_down()?;
        }
        let written = self.offline.run(step, progress)?.written_bytes;
        self.sync_persistent()?;
        // Start it again when it ran for the plan (also when an earlier attempt powered it off).
        if restart && (d.running || self.live_plan) {
            let s = self.session()?;
            if !s
                .dom
                .is_active()
                .map_err(self.live_err("asking whether it runs"))?
            {
                s.dom
                    .create()
                    .map_err(self.live_err("starting it after the revert"))?;
            }
        }
        Ok(written)
    }

    /// Brings the persistent definition in line with the chain: the disk's source is the active
    /// image, and a recorded `<backingStore>` that differs from the real chain is dropped (libvirt
    /// then reads the chain from the image headers at the next start).
    fn sync_persistent(&self) -> Result<(), ExecError> {
        let s = self.session()?;
        if !s
            .dom
            .is_persistent()
            .map_err(self.live_err("asking whether it is persistent"))?
        {
            return Ok(());
        }
        let now = super::locate(&self.src)?;
        let real = observe_chain(&self.roots, &now.disk.active)?;
        let real_backing: Vec<PathBuf> = real
            .layers
            .iter()
            .rev()
            .skip(1)
            .map(|l| l.layer.path.clone())
            .collect();
        let inactive = s
            .dom
            .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE | virt::sys::VIR_DOMAIN_XML_SECURE)
            .map_err(self.live_err("reading its persistent XML"))?;
        let pd = xml::disk(&inactive, &self.src.target).map_err(|source| {
            ExecError::from(LiveError::Xml {
                domain: self.src.domain.clone(),
                source,
            })
        })?;
        let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let recorded: Vec<PathBuf> = pd.backing.iter().map(|p| canon(p)).collect();
        if canon(&pd.active) == canon(&now.disk.active) && real_backing.starts_with(&recorded) {
            return Ok(());
        }
        let fixed = xml::with_disk_source(&inactive, &self.src.target, &now.disk.active).map_err(
            |source| {
                ExecError::from(LiveError::Xml {
                    domain: self.src.domain.clone(),
                    source,
                })
            },
        )?;
        tracing::info!(domain = %self.src.domain, active = %now.disk.active.display(), "updating the persistent definition to the chain");
        s.conn
            .define_domain_xml(&fixed)
            .map_err(self.live_err("updating its persistent definition"))?;
        Ok(())
    }
}

impl Executor for Libvirt {
    fn prepare_resume(&self, step: &StepAction) -> Result<(), ExecError> {
        self.resuming.set(true);
        let d = super::locate(&self.src)?;
        if d.running {
            // libvirt's own job state tells what an interrupted live step left; `run` adopts it.
            return self.lift_leftover_throttle();
        }
        self.offline.prepare_resume(step)
    }

    fn abandon(&self, step: &StepAction) -> Result<(), ExecError> {
        let d = super::locate(&self.src)?;
        if !d.running {
            return self.offline.prepare_resume(step);
        }
        // The block job this step starts, and the file libvirt shows it writing (if any).
        let (kind, dest) = match step {
            StepAction::Commit { base, top, .. } if *top == d.disk.active => {
                (JobKind::ActiveCommit, Some(base.as_path()))
            }
            StepAction::Commit { .. } => (JobKind::Commit, None),
            StepAction::Stream { .. } => (JobKind::Pull, None),
            StepAction::Mirror { to, .. } => (JobKind::Copy, Some(to.as_path())),
            _ => return self.lift_leftover_throttle(),
        };
        // Only the interrupted step's own job: one writing to its destination, or (for jobs
        // libvirt shows no destination of) the job of its kind running on the disk now.
        self.resuming.set(true);
        let owned = match self.job_now()? {
            Some(j) => j.kind == kind && self.owns_job(dest)?,
            None => false,
        };
        self.resuming.set(false);
        if owned {
            tracing::warn!(domain = %self.src.domain, disk = %self.src.target, ?kind, "cancelling the block job of the interrupted step of a plan being set aside (without a pivot: the chain stays as it is)");
            let s = self.session()?;
            sys::job_abort(&s.dom, &self.src.target, false).map_err(
                self.live_err("cancelling the block job the interrupted step left running"),
            )?;
            let t = Instant::now();
            while matches!(self.job_now()?, Some(j) if j.kind == kind) {
                if t.elapsed() > Duration::from_secs(60) {
                    return Err(self.refuse(
                        step.op(),
                        Path::new(&self.src.target),
                        "the block job of the interrupted step was cancelled but still runs after 60 s; check the domain's log, and run again when it is gone",
                    ));
                }
                std::thread::sleep(POLL);
            }
        }
        self.lift_leftover_throttle()
    }

    fn run(
        &self,
        step: &StepAction,
        progress: &mut dyn FnMut(f64),
    ) -> Result<StepReport, ExecError> {
        let t = Instant::now();
        // Only the step run right after `prepare_resume` may adopt a job it did not see start.
        struct Reset<'a>(&'a std::cell::Cell<bool>);
        impl Drop for Reset<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        let _reset = Reset(&self.resuming);
        let d = super::locate(&self.src)?;
        // Block jobs are counted by the domain QEMU's own byte counter (guest writes included);
        // everything else by the qemu-img processes it runs.
        let block_job = matches!(
            step,
            StepAction::Snapshot { .. }
                | StepAction::Commit { .. }
                | StepAction::Stream { .. }
                | StepAction::Mirror { .. }
        );
        let pid = d.pid.filter(|_| block_job);
        let before = pid.and_then(crate::execute::process::wchar);
        let mut written = 0;
        // A plan made for a running domain uses libvirt's semantics, one made for a shut-off
        // domain moves files offline; neither can finish in the other state. Nothing of this
        // step has run, and the chain is whole after every step, so the plan waits.
        let changed_state = |stopped: bool| {
            ExecError::from(LiveError::Call {
                domain: self.src.domain.clone(),
                what: format!("step {}", step.op()),
                message: if stopped {
                    "the domain was shut down in the middle of a plan made while it ran; start it again and the plan resumes (nothing is lost: the chain is whole between steps)".into()
                } else {
                    "the domain was started in the middle of a plan made while it was off; shut it down again and the plan resumes (nothing is lost: the chain is whole between steps)".into()
                },
            })
        };
        match step {
            StepAction::Revert { active, .. } => {
                written += self.revert(&d, step, active, progress)?
            }
            StepAction::Copy { .. } | StepAction::Delete { .. } => {
                written += self.offline.run(step, progress)?.written_bytes;
            }
            _ if !d.running => {
                if self.live_plan {
                    // (An interrupted pull was pointed back at the layers it pulled from by
                    // `prepare_resume`, which undoes what a crash of QEMU may have lost.)
                    return Err(changed_state(true));
                }
                written += self.offline.run(step, progress)?.written_bytes;
            }
            _ if !self.live_plan => return Err(changed_state(false)),
            StepAction::Snapshot { file, active, .. } => self.snapshot(&d, file, active)?,
            StepAction::Commit { base, top, layers } => {
                self.commit(&d, base, top, layers, progress)?
            }
            StepAction::Stream { into, base, layers } => {
                self.pull(&d, into, base.as_deref(), layers, progress)?
            }
            StepAction::Mirror { from, to, backing } => {
                self.mirror(&d, from, to, backing.as_deref(), progress)?
            }
            StepAction::Rebase { overlay, .. } => {
                return Err(self.refuse(
                    "rebase",
                    overlay,
                    "a running domain's backing layer is never re-pointed in place",
                ));
            }
            StepAction::TakeOver { active, .. } => {
                return Err(self.refuse(
                    "take-over",
                    active,
                    "a running domain's active image is never replaced by a rename",
                ));
            }
        }
        if let (Some(p), Some(b)) = (pid, before)
            && let Some(a) = crate::execute::process::wchar(p)
        {
            written += a.saturating_sub(b);
        }
        self.sync_persistent()?;
        progress(1.0);
        Ok(StepReport {
            written_bytes: written,
            seconds: t.elapsed().as_secs_f64(),
        })
    }
}
