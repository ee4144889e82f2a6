//! Detecting QEMU's image lock. QEMU takes open-file-description locks on bytes 100.. (the
//! permissions it uses) and 200.. (the permissions it refuses to share) of every image it opens;
//! any such lock means a QEMU process (a VM, qemu-img, qemu-nbd, qemu-storage-daemon) has the
//! file open.

use std::fs::File;

use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

/// QEMU's lock bytes: `RAW_LOCK_PERM_BASE` (100) up to past `RAW_LOCK_SHARED_BASE` (200).
const LOCK_START: i64 = 100;
const LOCK_LEN: i64 = 200;

/// `Some(description)` when another process holds QEMU's lock on `file`.
pub fn lock_holder(file: &File) -> std::io::Result<Option<String>> {
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: LOCK_START,
        l_len: LOCK_LEN,
        l_pid: 0,
    };
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)).map_err(std::io::Error::from)?;
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    let who = if fl.l_pid > 0 {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", fl.l_pid)).unwrap_or_default();
        format!("process {} ({})", fl.l_pid, comm.trim())
    } else {
        // OFD locks do not record a pid.
        "a QEMU process".to_string()
    };
    Ok(Some(who))
}
