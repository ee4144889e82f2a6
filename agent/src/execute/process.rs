//! Running a QEMU tool: progress from its `-p` output, the bytes it wrote from `/proc/PID/io`
//! (read after it exits but before it is reaped), and its stderr for errors.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nix::sys::wait::{Id, WaitPidFlag, waitid};

use super::ExecError;

/// QEMU processes running now, so a shutdown can stop them at a point the journal resumes from.
static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Sends SIGTERM to every QEMU process diskchain is running (a shutdown whose grace period ran
/// out). Each step is idempotent, so the journal runs the interrupted step again on the next
/// start.
pub fn terminate_running() -> usize {
    ABANDON.store(true, std::sync::atomic::Ordering::SeqCst);
    let pids = RUNNING.lock().map(|v| v.clone()).unwrap_or_default();
    for &pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    pids.len()
}

/// Set when a shutdown's grace period ran out: steps waiting on a libvirt block job stop waiting
/// (the job runs on in QEMU, the journal keeps the step, and the next start adopts the job).
static ABANDON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True once the grace period of a shutdown is over (see [`terminate_running`]).
pub(crate) fn abandoning() -> bool {
    ABANDON.load(std::sync::atomic::Ordering::SeqCst)
}

/// Counts `pid` among the QEMU processes a shutdown stops (see [`terminate_running`]).
pub(crate) fn remember(pid: u32) {
    if let Ok(mut r) = RUNNING.lock() {
        r.push(pid);
    }
}

/// Stops counting `pid` (it has exited).
pub(crate) fn forget(pid: u32) {
    if let Ok(mut r) = RUNNING.lock() {
        r.retain(|&p| p != pid);
    }
}

/// The `wchar` line of `/proc/PID/io`.
pub(crate) fn wchar(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs `cmd` to completion; returns the bytes it wrote.
pub(crate) fn run(mut cmd: Command, progress: &mut dyn FnMut(f64)) -> Result<u64, ExecError> {
    let shown = format!("{cmd:?}").replace('"', "");
    tracing::debug!(command = %shown, "running");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| ExecError::Io {
        action: "start",
        path: PathBuf::from(cmd.get_program()),
        source,
    })?;
    let pid = child.id();
    remember(pid);
    let mut stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // `qemu-img -p` prints "    (12.34/100%)" followed by '\r'.
    let mut stdout = child.stdout.take().expect("piped");
    let mut buf = [0u8; 4096];
    let mut line = Vec::new();
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                let text = String::from_utf8_lossy(&line);
                if let Some(p) = text
                    .trim()
                    .strip_prefix('(')
                    .and_then(|t| t.split('/').next())
                    && let Ok(p) = p.parse::<f64>()
                {
                    progress((p / 100.0).clamp(0.0, 1.0));
                }
                line.clear();
            } else {
                line.push(b);
            }
        }
    }
    // Wait for the exit without reaping, so /proc/PID/io still holds the final counters.
    let _ = waitid(
        Id::Pid(nix::unistd::Pid::from_raw(pid as i32)),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
    );
    let written = wchar(pid).unwrap_or(0);
    forget(pid);
    let status = child.wait().map_err(|source| ExecError::Io {
        action: "wait for",
        path: PathBuf::from(&shown),
        source,
    })?;
    let err = err_thread.join().unwrap_or_default();
    if !status.success() {
        return Err(ExecError::Qemu {
            command: shown,
            status: status.to_string(),
            stderr: err.trim().to_string(),
        });
    }
    progress(1.0);
    Ok(written)
}
