//! Copying a file's extended attributes (its SELinux label, POSIX ACLs, user attributes) to
//! another file, for a file that takes another's path. `std` has no xattr calls; these are the
//! libc ones, each given buffers of the sizes the kernel reports.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("a NUL byte in the path"))
}

/// The names of `path`'s extended attributes.
fn names(path: &CString) -> io::Result<Vec<CString>> {
    // SAFETY: a null buffer of size 0 asks only for the size needed.
    let n = unsafe { libc::llistxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOTSUP) {
            Ok(Vec::new())
        } else {
            Err(e)
        };
    }
    let mut buf = vec![0u8; n as usize];
    // SAFETY: `buf` has room for `buf.len()` bytes, which the kernel fills.
    let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| CString::new(s).ok())
        .collect())
}

/// Copies every extended attribute of `from` onto `to` (replacing those of the same name).
pub(crate) fn copy_all(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (cpath(from)?, cpath(to)?);
    for name in names(&f)? {
        // SAFETY: a null buffer of size 0 asks only for the size needed.
        let n = unsafe { libc::lgetxattr(f.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut value = vec![0u8; n as usize];
        // SAFETY: `value` has room for `value.len()` bytes, which the kernel fills.
        let n = unsafe {
            libc::lgetxattr(
                f.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        value.truncate(n as usize);
        // SAFETY: reads `value.len()` bytes of `value`.
        let rc = unsafe {
            libc::lsetxattr(
                t.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
