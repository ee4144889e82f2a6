//! Safe wrappers for the libvirt calls the `virt` crate has no safe API for: block commit, block
//! rebase (pull), block copy, block job info and abort, and block I/O tuning. Every `unsafe`
//! block calls one libvirt function with a domain pointer the `Domain` keeps alive, C strings
//! that outlive the call, and (for typed parameters) an array libvirt only reads or fills.

use std::ffi::{CString, c_char, c_int, c_uint, c_ulong};
use std::path::Path;

use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

fn cstr(s: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error::last_error())
}

fn cpath(p: &Path) -> Result<CString, Error> {
    cstr(&p.to_string_lossy())
}

fn check(rc: c_int) -> Result<c_int, Error> {
    if rc < 0 {
        Err(Error::last_error())
    } else {
        Ok(rc)
    }
}

/// What kind of block job runs on a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// A pull (stream) into the active layer.
    Pull,
    /// A block copy (mirror).
    Copy,
    /// A commit of backing layers.
    Commit,
    /// A commit of the active layer (ends with a pivot).
    ActiveCommit,
    /// Anything else (a backup, say).
    Other,
}

impl JobKind {
    /// The step operation this kind of job carries out.
    pub fn op(self) -> &'static str {
        match self {
            JobKind::Pull => "stream",
            JobKind::Copy => "mirror",
            JobKind::Commit | JobKind::ActiveCommit => "commit",
            JobKind::Other => "block job",
        }
    }
}

/// A block job's progress.
#[derive(Clone, Copy, Debug)]
pub struct JobInfo {
    /// What it is.
    pub kind: JobKind,
    /// Work done.
    pub cur: u64,
    /// Work to do (grows while the guest writes during a mirror).
    pub end: u64,
}

impl JobInfo {
    /// A mirror-style job that caught up and can pivot (libvirt reports `cur == end` only then).
    pub fn ready(&self) -> bool {
        self.end > 0 && self.cur == self.end
    }
}

/// The block job on `disk`, if one runs.
pub fn job_info(dom: &Domain, disk: &str) -> Result<Option<JobInfo>, Error> {
    let d = cstr(disk)?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: `dom` is a live domain, `d` a NUL-terminated string and `info` a struct libvirt
    // fills; all outlive the call.
    let rc = check(unsafe {
        sys::virDomainGetBlockJobInfo(
            dom.as_ptr(),
            d.as_ptr(),
            &mut info,
            sys::VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES,
        )
    })?;
    if rc == 0 {
        return Ok(None);
    }
    let kind = match info.type_ as u32 {
        sys::VIR_DOMAIN_BLOCK_JOB_TYPE_PULL => JobKind::Pull,
        sys::VIR_DOMAIN_BLOCK_JOB_TYPE_COPY => JobKind::Copy,
        sys::VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT => JobKind::Commit,
        sys::VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT => JobKind::ActiveCommit,
        _ => JobKind::Other,
    };
    Ok(Some(JobInfo {
        kind,
        cur: info.cur,
        end: info.end,
    }))
}

/// Starts a commit of `(base, top]` into `base` (`top` `None`: the active layer, which needs
/// `active`). `shallow`: `base` is `top`'s own backing file.
pub fn block_commit(
    dom: &Domain,
    disk: &str,
    base: &Path,
    top: Option<&Path>,
    active: bool,
    shallow: bool,
    bytes_per_sec: Option<u64>,
) -> Result<(), Error> {
    let d = cstr(disk)?;
    let b = cpath(base)?;
    let t = top.map(cpath).transpose()?;
    let mut flags = 0;
    if active {
        flags |= sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE;
    }
    if shallow {
        flags |= sys::VIR_DOMAIN_BLOCK_COMMIT_SHALLOW;
    }
    if bytes_per_sec.is_some() {
        flags |= sys::VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES;
    }
    // SAFETY: all pointers are live NUL-terminated strings (or null for "the active layer").
    check(unsafe {
        sys::virDomainBlockCommit(
            dom.as_ptr(),
            d.as_ptr(),
            if shallow {
                std::ptr::null()
            } else {
                b.as_ptr()
            },
            t.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()),
            bytes_per_sec.unwrap_or(0) as c_ulong,
            flags,
        )
    })?;
    Ok(())
}

/// Starts a pull into the active layer of everything above `base` (`None`: the whole chain).
pub fn block_pull(
    dom: &Domain,
    disk: &str,
    base: Option<&Path>,
    bytes_per_sec: Option<u64>,
) -> Result<(), Error> {
    let d = cstr(disk)?;
    let b = base.map(cpath).transpose()?;
    let flags = if bytes_per_sec.is_some() {
        sys::VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES
    } else {
        0
    };
    // SAFETY: live NUL-terminated strings, or null for "no base".
    check(unsafe {
        sys::virDomainBlockRebase(
            dom.as_ptr(),
            d.as_ptr(),
            b.as_ref().map_or(std::ptr::null(), |b| b.as_ptr()),
            bytes_per_sec.unwrap_or(0) as c_ulong,
            flags,
        )
    })?;
    Ok(())
}

/// Starts a block copy of the disk onto the prepared file described by `dest_xml`; `shallow`
/// copies only the active layer's own data (the destination's backing reads the same as the
/// active layer's).
pub fn block_copy(
    dom: &Domain,
    disk: &str,
    dest_xml: &str,
    shallow: bool,
    bytes_per_sec: Option<u64>,
) -> Result<(), Error> {
    let d = cstr(disk)?;
    let x = cstr(dest_xml)?;
    let mut flags = sys::VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;
    if shallow {
        flags |= sys::VIR_DOMAIN_BLOCK_COPY_SHALLOW;
    }
    let mut params: Vec<sys::virTypedParameter> = Vec::new();
    if let Some(bw) = bytes_per_sec {
        params.push(ullong_param(
            sys::VIR_DOMAIN_BLOCK_COPY_BANDWIDTH.to_bytes(),
            bw,
        ));
    }
    // SAFETY: live NUL-terminated strings; `params` (possibly empty) is only read by libvirt.
    check(unsafe {
        sys::virDomainBlockCopy(
            dom.as_ptr(),
            d.as_ptr(),
            x.as_ptr(),
            if params.is_empty() {
                std::ptr::null_mut()
            } else {
                params.as_mut_ptr()
            },
            params.len() as c_int,
            flags,
        )
    })?;
    Ok(())
}

/// One typed parameter holding an unsigned long long.
fn ullong_param(name: &[u8], value: u64) -> sys::virTypedParameter {
    // SAFETY: an all-zero virTypedParameter is a valid value (empty name, zero union).
    let mut p: sys::virTypedParameter = unsafe { std::mem::zeroed() };
    for (i, b) in name.iter().take(p.field.len() - 1).enumerate() {
        p.field[i] = *b as c_char;
    }
    p.type_ = sys::VIR_TYPED_PARAM_ULLONG as c_int;
    p.value.ul = value;
    p
}

/// Ends the disk's block job: `pivot` switches to the job's target (a ready mirror or active
/// commit); without it the job is cancelled and the chain stays as it was.
pub fn job_abort(dom: &Domain, disk: &str, pivot: bool) -> Result<(), Error> {
    let d = cstr(disk)?;
    let flags = if pivot {
        sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
    } else {
        0
    };
    // SAFETY: a live NUL-terminated string.
    check(unsafe { sys::virDomainBlockJobAbort(dom.as_ptr(), d.as_ptr(), flags as c_uint) })?;
    Ok(())
}

/// A disk's block I/O tuning: every numeric field `virDomainGetBlockIoTune` reports
/// (`total_bytes_sec`, `read_bytes_sec`, `write_bytes_sec`, their `_max` and `_max_length`
/// variants, the same for IOPS, `size_iops_sec`), 0 meaning no limit.
pub type IoTune = std::collections::BTreeMap<String, u64>;

/// The disk's block I/O tuning on the running domain.
pub fn io_tune(dom: &Domain, disk: &str) -> Result<IoTune, Error> {
    let d = cstr(disk)?;
    let mut n: c_int = 0;
    // SAFETY: with a null array libvirt only stores the number of parameters in `n`.
    check(unsafe {
        sys::virDomainGetBlockIoTune(dom.as_ptr(), d.as_ptr(), std::ptr::null_mut(), &mut n, 0)
    })?;
    let mut out = IoTune::new();
    if n <= 0 {
        return Ok(out);
    }
    // SAFETY: an all-zero virTypedParameter is a valid value (empty name, zero union).
    let mut params: Vec<sys::virTypedParameter> = vec![unsafe { std::mem::zeroed() }; n as usize];
    // SAFETY: `params` has room for `n` parameters, which libvirt fills.
    check(unsafe {
        sys::virDomainGetBlockIoTune(dom.as_ptr(), d.as_ptr(), params.as_mut_ptr(), &mut n, 0)
    })?;
    for p in &params[..n.max(0) as usize] {
        // SAFETY: libvirt NUL-terminates field names within their 80 bytes.
        let name = unsafe { std::ffi::CStr::from_ptr(p.field.as_ptr()) };
        if p.type_ as u32 == sys::VIR_TYPED_PARAM_ULLONG {
            // SAFETY: the parameter's type says the union holds an unsigned long long.
            out.insert(name.to_string_lossy().into_owned(), unsafe { p.value.ul });
        }
    }
    // SAFETY: frees only the strings libvirt may have allocated inside the parameters (the
    // group name); the array itself is ours and is freed by Vec.
    unsafe { sys::virTypedParamsClear(params.as_mut_ptr(), n) };
    Ok(out)
}

/// Sets the disk's block I/O tuning on the running domain: every field of `tune` at once (as
/// read by [`io_tune`], so the groups libvirt checks together stay consistent).
pub fn set_io_tune(dom: &Domain, disk: &str, tune: &IoTune) -> Result<(), Error> {
    let d = cstr(disk)?;
    let mut params: Vec<sys::virTypedParameter> = tune
        .iter()
        .map(|(k, v)| ullong_param(k.as_bytes(), *v))
        .collect();
    // SAFETY: `params.len()` parameters libvirt only reads.
    check(unsafe {
        sys::virDomainSetBlockIoTune(
            dom.as_ptr(),
            d.as_ptr(),
            params.as_mut_ptr(),
            params.len() as c_int,
            sys::VIR_DOMAIN_AFFECT_LIVE,
        )
    })?;
    Ok(())
}

/// `tune` with guest writes limited to `limit` bytes per second: through the total limit when
/// one is set (libvirt refuses a total beside a write limit), else the write limit; an existing
/// lower limit stays.
pub fn with_write_limit(tune: &IoTune, limit: u64) -> IoTune {
    let mut t = tune.clone();
    let key = if t.get("total_bytes_sec").copied().unwrap_or(0) > 0 {
        "total_bytes_sec"
    } else {
        "write_bytes_sec"
    };
    let now = t.get(key).copied().unwrap_or(0);
    t.insert(key.into(), if now > 0 { now.min(limit) } else { limit });
    t
}

/// How a block job ended, or that it is ready to pivot (libvirt's `BLOCK_JOB_2` event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobEvent {
    /// The job finished (after a pivot, for mirror-style jobs).
    Completed,
    /// The job failed.
    Failed,
    /// The job was cancelled.
    Canceled,
    /// A mirror-style job caught up and can pivot.
    Ready,
}

type EventSender = std::sync::mpsc::Sender<(String, JobEvent)>;

/// Starts libvirt's default event loop on a thread of its own, once per process. It must run
/// before connections are opened for them to deliver events.
pub fn start_event_loop() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if virt::event::event_register_default_impl().is_err() {
            tracing::warn!(
                "libvirt's event loop could not be registered; block jobs are polled only"
            );
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if virt::event::event_run_default_impl().is_err() {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            });
        if spawned.is_err() {
            tracing::warn!(
                "libvirt's event loop thread could not start; block jobs are polled only"
            );
        }
    });
}

/// Block job events of one domain, for as long as this lives.
pub struct JobEvents {
    conn: virt::connect::Connect,
    id: c_int,
    /// (disk target, event) as libvirt delivers them.
    pub rx: std::sync::mpsc::Receiver<(String, JobEvent)>,
}

impl Drop for JobEvents {
    fn drop(&mut self) {
        // SAFETY: `id` was returned by a successful registration on this live connection.
        unsafe {
            sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.id);
        }
    }
}

/// Called by libvirt's event loop thread for each `BLOCK_JOB_2` event.
unsafe extern "C" fn on_block_job(
    _conn: sys::virConnectPtr,
    _dom: sys::virDomainPtr,
    disk: *const c_char,
    _kind: c_int,
    status: c_int,
    opaque: *mut std::ffi::c_void,
) {
    let event = match status as u32 {
        sys::VIR_DOMAIN_BLOCK_JOB_COMPLETED => JobEvent::Completed,
        sys::VIR_DOMAIN_BLOCK_JOB_FAILED => JobEvent::Failed,
        sys::VIR_DOMAIN_BLOCK_JOB_CANCELED => JobEvent::Canceled,
        sys::VIR_DOMAIN_BLOCK_JOB_READY => JobEvent::Ready,
        _ => return,
    };
    if opaque.is_null() || disk.is_null() {
        return;
    }
    // SAFETY: `opaque` is the sender boxed in `watch_block_jobs`, freed only by `free_sender`
    // after deregistration; `disk` is a NUL-terminated string libvirt owns for the call.
    let (tx, disk) = unsafe {
        (
            &*(opaque as *const EventSender),
            std::ffi::CStr::from_ptr(disk)
                .to_string_lossy()
                .into_owned(),
        )
    };
    let _ = tx.send((disk, event));
}

/// Frees the sender when libvirt drops the callback.
unsafe extern "C" fn free_sender(opaque: *mut std::ffi::c_void) {
    if !opaque.is_null() {
        // SAFETY: `opaque` came from `Box::into_raw` in `watch_block_jobs` and is freed once.
        drop(unsafe { Box::from_raw(opaque as *mut EventSender) });
    }
}

/// Subscribes to the domain's block job events (ready, completed, failed, cancelled).
pub fn watch_block_jobs(conn: &virt::connect::Connect, dom: &Domain) -> Result<JobEvents, Error> {
    let (tx, rx) = std::sync::mpsc::channel();
    let opaque = Box::into_raw(Box::new(tx)) as *mut std::ffi::c_void;
    let cb: sys::virConnectDomainEventBlockJobCallback = Some(on_block_job);
    // SAFETY: libvirt takes every domain event callback as the generic type and calls it with
    // the signature of the event registered (VIR_DOMAIN_EVENT_CALLBACK in libvirt's headers);
    // both are `Option` of an `extern "C" fn` pointer of the same size.
    let generic: sys::virConnectDomainEventGenericCallback = unsafe { std::mem::transmute(cb) };
    // SAFETY: live connection and domain; `opaque` stays valid until libvirt calls
    // `free_sender`.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            dom.as_ptr(),
            sys::VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2 as c_int,
            generic,
            opaque,
            Some(free_sender),
        )
    };
    if id < 0 {
        let e = Error::last_error();
        // SAFETY: registration failed, so libvirt never took ownership of `opaque`.
        drop(unsafe { Box::from_raw(opaque as *mut EventSender) });
        return Err(e);
    }
    Ok(JobEvents {
        conn: conn.clone(),
        id,
        rx,
    })
}

/// Starts a backup job (`virDomainBackupBegin`, push mode) with the backup XML `backup` and the
/// checkpoint XML `checkpoint` (created by the same call); `reuse_external`: the targets exist
/// (pre-created by the caller).
pub fn backup_begin(
    dom: &Domain,
    backup: &str,
    checkpoint: Option<&str>,
    reuse_external: bool,
) -> Result<(), Error> {
    let b = cstr(backup)?;
    let c = checkpoint.map(cstr).transpose()?;
    let flags = if reuse_external {
        sys::VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL
    } else {
        0
    };
    // SAFETY: live NUL-terminated strings (or NULL for no checkpoint).
    check(unsafe {
        sys::virDomainBackupBegin(
            dom.as_ptr(),
            b.as_ptr(),
            c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags as c_uint,
        )
    })?;
    Ok(())
}

/// Aborts the domain's job (a backup).
pub fn abort_job(dom: &Domain) -> Result<(), Error> {
    // SAFETY: a domain pointer the `Domain` keeps alive.
    check(unsafe { sys::virDomainAbortJob(dom.as_ptr()) })?;
    Ok(())
}

/// The names of the domain's checkpoints.
pub fn checkpoints(dom: &Domain) -> Result<Vec<String>, Error> {
    let mut list: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
    // SAFETY: libvirt allocates the array and fills `list`; each element is freed below, then
    // the array.
    let n = check(unsafe { sys::virDomainListAllCheckpoints(dom.as_ptr(), &mut list, 0) })?;
    let mut names = Vec::new();
    for i in 0..n as usize {
        // SAFETY: `i` is within the `n` elements libvirt returned.
        let cp = unsafe { *list.add(i) };
        // SAFETY: the name belongs to `cp`, read before it is freed.
        let name = unsafe { std::ffi::CStr::from_ptr(sys::virDomainCheckpointGetName(cp)) };
        names.push(name.to_string_lossy().into_owned());
        // SAFETY: each checkpoint object is freed once.
        unsafe { sys::virDomainCheckpointFree(cp) };
    }
    if !list.is_null() {
        // SAFETY: the array libvirt allocated with malloc.
        unsafe { libc_free(list as *mut std::ffi::c_void) };
    }
    Ok(names)
}

unsafe extern "C" {
    #[link_name = "free"]
    fn libc_free(p: *mut std::ffi::c_void);
}

/// Deletes checkpoint `name` (its bitmaps too; with `metadata_only`, libvirt's record alone,
/// for a checkpoint whose bitmap is gone). Absent: nothing to do.
pub fn checkpoint_delete(dom: &Domain, name: &str, metadata_only: bool) -> Result<(), Error> {
    let n = cstr(name)?;
    // SAFETY: a live NUL-terminated string; the returned object is freed below.
    let cp = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), n.as_ptr(), 0) };
    if cp.is_null() {
        return Ok(());
    }
    let flags = if metadata_only {
        sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
    } else {
        0
    };
    // SAFETY: `cp` is a checkpoint libvirt returned, freed once after the call.
    let rc = unsafe { sys::virDomainCheckpointDelete(cp, flags as c_uint) };
    // SAFETY: as above.
    unsafe { sys::virDomainCheckpointFree(cp) };
    check(rc)?;
    Ok(())
}

/// Records checkpoint `xml` in libvirt without creating anything (`REDEFINE`): the bitmap it
/// names already exists in the disk's image.
pub fn checkpoint_redefine(dom: &Domain, xml: &str) -> Result<(), Error> {
    let x = cstr(xml)?;
    // SAFETY: a live NUL-terminated string; the returned object is freed below.
    let cp = unsafe {
        sys::virDomainCheckpointCreateXML(
            dom.as_ptr(),
            x.as_ptr(),
            sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE as c_uint,
        )
    };
    if cp.is_null() {
        return Err(Error::last_error());
    }
    // SAFETY: `cp` is a checkpoint libvirt returned, freed once.
    unsafe { sys::virDomainCheckpointFree(cp) };
    Ok(())
}
