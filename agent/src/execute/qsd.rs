//! An offline stream as QEMU's own `block-stream` job in a `qemu-storage-daemon`, driven over
//! QMP: the engine libvirt drives live, with QEMU's rate limit (`speed`) and QEMU's progress.
//! (`qemu-img rebase` has no rate limit, and rewrites the backing reference before its metadata
//! reaches the disk.)
//!
//! Each layer is its own `--blockdev` node linked to the one below it (`backing=`), so that the
//! job's base is a node name; the layers read are opened read-only, only the layer written is
//! read-write. A SIGTERM to the daemon (a shutdown) cancels the job and closes the images; the
//! journal runs the step again.
//!
//! The new backing reference is written only once the copied data is on disk. QEMU's job
//! rewrites the header when it completes, before its metadata cache is flushed: a crash there
//! would leave the layer reading through the new base where the pulled clusters' L2 entries
//! never reached the file. So the job is told to write the reference the layer already has
//! (`backing-file`; for a stream with no base, the job's base is an empty image of the old
//! top's format made for it), the daemon quits (flushing and closing everything), the layer is
//! synced, and only then is the reference changed (`qemu-img rebase -u`). At every moment the
//! layer reads as before.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diskchain_planner::Format;
use serde_json::{Value, json};

use super::{ExecError, process};

/// A QMP connection.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    what: String,
}

impl Qmp {
    fn error(&self, stderr: String) -> ExecError {
        ExecError::Qemu {
            command: self.what.clone(),
            status: "QMP error".into(),
            stderr,
        }
    }

    /// Sends `execute` with `arguments`; returns its `return` value (events are skipped).
    fn call(&mut self, execute: &str, arguments: Value) -> Result<Value, ExecError> {
        let msg = json!({ "execute": execute, "arguments": arguments });
        writeln!(self.writer, "{msg}").map_err(|e| self.error(format!("{execute}: {e}")))?;
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| self.error(format!("{execute}: {e}")))?;
            if n == 0 {
                return Err(self.error(format!("{execute}: the daemon closed its monitor")));
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| self.error(format!("{execute}: unreadable reply {line:?}: {e}")))?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(self.error(format!("{execute}: {}", e["desc"])));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}

/// The daemon, killed if still running when dropped (an error path).
struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        process::forget(self.child.id());
    }
}

/// One `--blockdev` pair (protocol and format node) for `file`, named `n{i}`.
fn blockdev(
    i: usize,
    file: &Path,
    fmt: Format,
    backing: Option<&str>,
    read_only: bool,
) -> Result<[String; 4], ExecError> {
    let ro = if read_only { ",read-only=on" } else { "" };
    // Commas in a path are doubled in QEMU's option syntax, which is text.
    let name = file
        .to_str()
        .ok_or_else(|| ExecError::Precondition {
            op: "stream",
            file: file.to_path_buf(),
            what: "its path is not valid UTF-8, which qemu-storage-daemon's options cannot carry; rename it".into(),
        })?
        .replace(',', ",,");
    // A raw layer has no backing file (it is the bottom of its chain).
    let backing = backing
        .filter(|_| fmt == Format::Qcow2)
        .map(|b| format!(",backing={b}"))
        .unwrap_or_default();
    // A block device (a base on a LUN or a loop device) takes QEMU's `host_device` driver.
    let protocol = match std::fs::metadata(file) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => "host_device",
        _ => "file",
    };
    Ok([
        "--blockdev".into(),
        format!("driver={protocol},filename={name},node-name=f{i}{ro}"),
        "--blockdev".into(),
        format!(
            "driver={},file=f{i},node-name=n{i}{backing}{ro}",
            fmt.as_str()
        ),
    ])
}

/// Streams the data of `layers` (base first) into `into`, which then reads through `base`
/// (`None`: through nothing), at most `speed` bytes per second (0: no limit). `recorded` is the
/// backing reference `into` has now (it names the top of `layers`). Returns the bytes written.
pub(crate) fn stream(
    into: &Path,
    recorded: &str,
    layers: &[(PathBuf, Format)],
    base: Option<(&Path, Format)>,
    speed: u64,
    progress: &mut dyn FnMut(f64),
) -> Result<u64, ExecError> {
    let Some((_, top_fmt)) = layers.last() else {
        return Ok(0);
    };
    let sock = socket_path();
    // A stream with no base runs on an empty image of the old top's format, so that the job
    // can keep the reference and its format.
    let empty = super::beside(into, "empty");
    // With a base of another format than the old top, the reference cannot be kept through
    // the job (QEMU writes the base's format with it), nor under a raw bottom layer (which has
    // no backing to link an empty base under): the job writes the new one, and the window the
    // module describes is closed by the journal (a resumed stream first points the layer back
    // at the old top).
    let raw_bottom = layers.first().is_some_and(|(_, f)| *f == Format::Raw);
    let keep_reference = !raw_bottom && base.is_none_or(|(_, f)| f == *top_fmt);
    let job_base: Option<(PathBuf, Format)> = match base {
        Some((b, f)) => Some((b.to_path_buf(), f)),
        None if raw_bottom => None,
        None => {
            let size = crate::observe::virtual_size(into, Format::Qcow2)?;
            let _ = std::fs::remove_file(&empty);
            let c = super::qemu_img::create(&empty, *top_fmt, Some(size), None, None, false);
            process::run(c, &mut |_| {})?;
            Some((empty.clone(), *top_fmt))
        }
    };
    let reference = if keep_reference {
        Some(recorded.to_string())
    } else {
        base.map(|(b, _)| b.to_string_lossy().into_owned())
    };
    let result = run_job(
        into,
        reference.as_deref(),
        layers,
        job_base.as_ref(),
        &sock,
        speed,
        progress,
    );
    if base.is_none() {
        let _ = std::fs::remove_file(&empty);
    }
    let written = result?;
    // The data is on disk: now the reference may name the new base.
    super::offline::sync_file(into)?;
    if !keep_reference {
        return Ok(written);
    }
    let w = process::run(
        super::qemu_img::repoint(into, Format::Qcow2, base),
        &mut |_| {},
    )?;
    super::offline::sync_file(into)?;
    Ok(written + w)
}

/// Runs the daemon and its `block-stream` job; returns the bytes the daemon wrote.
#[allow(clippy::too_many_arguments)]
fn run_job(
    into: &Path,
    reference: Option<&str>,
    layers: &[(PathBuf, Format)],
    base: Option<&(PathBuf, Format)>,
    sock: &Path,
    speed: u64,
    progress: &mut dyn FnMut(f64),
) -> Result<u64, ExecError> {
    let mut c = Command::new("qemu-storage-daemon");
    let mut below: Option<String> = None;
    if let Some((b, f)) = base {
        c.args(blockdev(0, b, *f, None, true)?);
        below = Some("n0".into());
    }
    let base_node = below.clone();
    let mut i = 1;
    for (l, fmt) in layers {
        c.args(blockdev(i, l, *fmt, below.as_deref(), true)?);
        below = Some(format!("n{i}"));
        i += 1;
    }
    c.args(blockdev(i, into, Format::Qcow2, below.as_deref(), false)?);
    let top = format!("n{i}");
    let what = format!("qemu-storage-daemon block-stream into {}", into.display());
    let (mut daemon, mut qmp, pid) = start(c, &what, sock)?;
    let failed = |daemon: &mut Daemon, why: String| {
        let _ = daemon.child.kill();
        let out = daemon.child.wait_with_output_stderr().unwrap_or_default();
        ExecError::Qemu {
            command: what.clone(),
            status: why,
            stderr: out,
        }
    };
    let run = |qmp: &mut Qmp, progress: &mut dyn FnMut(f64)| -> Result<(), ExecError> {
        // The reference written on completion is the one `into` has now (see the module).
        let mut args = json!({
            "job-id": "stream",
            "device": top,
            "speed": speed,
            "auto-dismiss": false,
        });
        if let Some(b) = &base_node {
            args["base-node"] = json!(b);
            if let Some(r) = reference {
                args["backing-file"] = json!(r);
            }
        }
        qmp.call("block-stream", args)?;
        wait_job(qmp, "stream", progress)
    };
    if let Err(e) = run(&mut qmp, progress) {
        let _ = failed(&mut daemon, String::new());
        return Err(e);
    }
    let written = process::wchar(pid).unwrap_or(0);
    // `quit` flushes and closes every image before the daemon exits.
    let _ = qmp.call("quit", json!({}));
    let status = daemon.child.wait().map_err(|source| ExecError::Io {
        action: "wait for",
        path: PathBuf::from("qemu-storage-daemon"),
        source,
    })?;
    if !status.success() {
        return Err(failed(&mut daemon, status.to_string()));
    }
    Ok(written)
}

/// Starts the daemon `c` (its images on the command line) with a QMP monitor on `sock`, and
/// connects. The daemon gets SIGTERM if diskchain dies.
fn start(mut c: Command, what: &str, sock: &Path) -> Result<(Daemon, Qmp, u32), ExecError> {
    c.arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qmp",
            sock.to_string_lossy().replace(',', ",,")
        ))
        .args(["--monitor", "chardev=qmp"]);
    tracing::debug!(command = ?c, "running");
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // The daemon must not outlive diskchain: one left behind would hold the images' locks (and
    // never quit). SIGTERM on the parent's death makes it cancel the job and close the images.
    // SAFETY: `pre_exec` runs in the forked child before exec; `prctl(PR_SET_PDEATHSIG)` is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
    let child = c.spawn().map_err(|source| ExecError::Io {
        action: "start",
        path: PathBuf::from("qemu-storage-daemon"),
        source,
    })?;
    let pid = child.id();
    process::remember(pid);
    let mut daemon = Daemon { child };
    let failed = |daemon: &mut Daemon, why: String| {
        let _ = daemon.child.kill();
        let out = daemon.child.wait_with_output_stderr().unwrap_or_default();
        ExecError::Qemu {
            command: what.to_string(),
            status: why,
            stderr: out,
        }
    };
    let started = Instant::now();
    let stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                if let Ok(Some(st)) = daemon.child.try_wait() {
                    return Err(failed(&mut daemon, st.to_string()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(failed(&mut daemon, format!("no QMP socket: {e}"))),
        }
    };
    let _ = std::fs::remove_file(sock);
    let writer = stream.try_clone().map_err(|source| ExecError::Io {
        action: "connect to",
        path: sock.to_path_buf(),
        source,
    })?;
    let mut qmp = Qmp {
        reader: BufReader::new(stream),
        writer,
        what: what.to_string(),
    };
    let mut greeting = String::new();
    let _ = qmp.reader.read_line(&mut greeting);
    qmp.call("qmp_capabilities", json!({}))?;
    Ok((daemon, qmp, pid))
}

/// A fresh path for a daemon's QMP socket. The first call of a process also removes the
/// sockets that diskchain processes no longer running left (a run killed between its daemon's
/// start and the connection, which removes the socket).
fn socket_path() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        for f in leftover_sockets(&std::env::temp_dir()) {
            let _ = std::fs::remove_file(f);
        }
    });
    let sock = std::env::temp_dir().join(format!(
        "diskchain-qsd-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let _ = std::fs::remove_file(&sock);
    sock
}

/// QMP sockets in `dir` named for a diskchain process that no longer runs.
fn leftover_sockets(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let pid: u32 = name
                .strip_prefix("diskchain-qsd-")?
                .strip_suffix(".sock")?
                .split_once('-')?
                .0
                .parse()
                .ok()?;
            let dead = !Path::new(&format!("/proc/{pid}")).exists();
            let socket = e
                .file_type()
                .is_ok_and(|t| std::os::unix::fs::FileTypeExt::is_socket(&t));
            (dead && socket).then(|| e.path())
        })
        .collect()
}

/// Waits for job `id` to conclude and dismisses it; `Err` when it failed.
fn wait_job(qmp: &mut Qmp, id: &str, progress: &mut dyn FnMut(f64)) -> Result<(), ExecError> {
    loop {
        let jobs = qmp.call("query-jobs", json!({}))?;
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == id))
            .cloned()
            .ok_or_else(|| qmp.error(format!("the {id} job vanished")))?;
        let (cur, total) = (
            job["current-progress"].as_f64().unwrap_or(0.0),
            job["total-progress"].as_f64().unwrap_or(0.0),
        );
        if total > 0.0 {
            progress((cur / total).clamp(0.0, 1.0));
        }
        if job["status"] == "concluded" {
            qmp.call("job-dismiss", json!({ "id": id }))?;
            if let Some(e) = job.get("error") {
                return Err(qmp.error(format!("the {id} job failed: {e}")));
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An offline backup as QEMU's own `blockdev-backup` job, the one libvirt runs live: the chain
/// `layers` (base first; only the top is opened writable, to add the new bitmap) is backed up
/// into `target` (which exists: standalone for a full, backed by the previous point for an
/// incremental). In one transaction: the new persistent bitmap `new_bitmap` is added to the top
/// (it records what changes from this point on), and the job starts; with `since`, the job is
/// `sync=incremental` over a temporary bitmap merged from `since` in every layer that holds it
/// (the layers' indexes in `holders`), so only the clusters written since are copied. Returns the
/// bytes the daemon wrote. On failure the new bitmap is removed.
pub(crate) fn backup(
    layers: &[(PathBuf, Format)],
    target: &Path,
    since: Option<(&str, &[usize])>,
    new_bitmap: &str,
    speed: u64,
    progress: &mut dyn FnMut(f64),
) -> Result<u64, ExecError> {
    let sock = socket_path();
    let mut c = Command::new("qemu-storage-daemon");
    let mut below: Option<String> = None;
    for (i, (l, fmt)) in layers.iter().enumerate() {
        let top = i + 1 == layers.len();
        c.args(blockdev(i, l, *fmt, below.as_deref(), !top)?);
        below = Some(format!("n{i}"));
    }
    let top = below.unwrap_or_default();
    let t = layers.len();
    c.args(blockdev(t, target, Format::Qcow2, None, false)?);
    let tgt = format!("n{t}");
    let what = format!(
        "qemu-storage-daemon blockdev-backup into {}",
        target.display()
    );
    let (mut daemon, mut qmp, pid) = start(c, &what, &sock)?;
    let mut actions = Vec::new();
    let mut job = json!({
        "job-id": "backup",
        "device": top,
        "target": tgt,
        "sync": "full",
        "speed": speed,
        "auto-dismiss": false,
    });
    if let Some((name, holders)) = since {
        actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
            "node": top, "name": "diskchain-since", "persistent": false, "disabled": true}}));
        let sources: Vec<Value> = holders
            .iter()
            .map(|i| json!({"node": format!("n{i}"), "name": name}))
            .collect();
        actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
            "node": top, "target": "diskchain-since", "bitmaps": sources}}));
        job["sync"] = json!("incremental");
        job["bitmap"] = json!("diskchain-since");
    }
    actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
        "node": top, "name": new_bitmap, "persistent": true}}));
    actions.push(json!({"type": "blockdev-backup", "data": job}));
    let run = |qmp: &mut Qmp, progress: &mut dyn FnMut(f64)| -> Result<(), ExecError> {
        qmp.call("transaction", json!({ "actions": actions }))?;
        wait_job(qmp, "backup", progress)
    };
    if let Err(e) = run(&mut qmp, progress) {
        let _ = qmp.call(
            "block-dirty-bitmap-remove",
            json!({"node": top, "name": new_bitmap}),
        );
        let _ = qmp.call("quit", json!({}));
        let _ = daemon.child.wait();
        return Err(e);
    }
    let written = process::wchar(pid).unwrap_or(0);
    // `quit` flushes and closes every image (the new bitmap is stored) before the daemon exits.
    let _ = qmp.call("quit", json!({}));
    let status = daemon.child.wait().map_err(|source| ExecError::Io {
        action: "wait for",
        path: PathBuf::from("qemu-storage-daemon"),
        source,
    })?;
    if !status.success() {
        let err = daemon.child.wait_with_output_stderr().unwrap_or_default();
        return Err(ExecError::Qemu {
            command: what,
            status: status.to_string(),
            stderr: err,
        });
    }
    Ok(written)
}

trait StderrOf {
    fn wait_with_output_stderr(&mut self) -> std::io::Result<String>;
}

impl StderrOf for Child {
    /// What the child printed on stderr, once it has exited.
    fn wait_with_output_stderr(&mut self) -> std::io::Result<String> {
        let _ = self.wait()?;
        let mut s = String::new();
        if let Some(mut e) = self.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut s);
        }
        Ok(s.trim().to_string())
    }
}

/// Makes `c`'s process private and bound to diskchain: the files it creates are readable by
/// their owner only (umask 077: a restore's scratch file never shows a disk's data to others),
/// and it is killed when diskchain dies (a killed restore leaves no copy running).
pub fn private_child(c: &mut Command) {
    // SAFETY: `pre_exec` runs in the forked child before exec; `umask` and
    // `prctl(PR_SET_PDEATHSIG)` are async-signal-safe and touch no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket named for a process that no longer runs is a leftover; one of a running process
    /// (this one), a regular file of that name, and other names are left alone.
    #[test]
    fn only_sockets_of_dead_processes_are_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let bind = |name: &str| {
            let p = dir.path().join(name);
            std::os::unix::net::UnixListener::bind(&p).unwrap();
            p
        };
        // pid_max is at most 2^22: this pid never runs.
        let dead = bind("diskchain-qsd-99999999-0.sock");
        bind(&format!("diskchain-qsd-{}-0.sock", std::process::id()));
        bind("other-99999999-0.sock");
        std::fs::write(dir.path().join("diskchain-qsd-99999998-1.sock"), b"").unwrap();
        assert_eq!(leftover_sockets(dir.path()), vec![dead]);
    }
}
