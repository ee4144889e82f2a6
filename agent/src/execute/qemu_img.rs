//! The one place `qemu-img` command lines are built. Every backing reference carries its format
//! explicitly (`-F`): QEMU never probes a format from content a guest controls.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use diskchain_planner::Format;

fn qemu_img() -> Command {
    Command::new("qemu-img")
}

/// A backing file and its format; `None`: no backing file.
pub(crate) type Backing<'a> = Option<(&'a Path, Format)>;

fn backing_args(c: &mut Command, backing: Backing<'_>) {
    match backing {
        Some((b, f)) => {
            c.arg("-b").arg(b).args(["-F", f.as_str()]);
        }
        None => {
            c.args(["-b", ""]);
        }
    }
}

/// `qemu-img create -q -f FMT [-o OPTS] [-b B -F BF [-u]] FILE [SIZE]`: a new image. With a
/// backing file and no size, the size is the backing file's; `unchecked` (`-u`) does not open
/// the backing file (it may be in use).
pub(crate) fn create(
    file: &Path,
    format: Format,
    size: Option<u64>,
    backing: Backing<'_>,
    options: Option<&str>,
    unchecked: bool,
) -> Command {
    let mut c = qemu_img();
    c.args(["create", "-q", "-f", format.as_str()]);
    if let Some(o) = options {
        c.args(["-o", o]);
    }
    if let Some((b, f)) = backing {
        c.arg("-b").arg(b).args(["-F", f.as_str()]);
        if unchecked {
            c.arg("-u");
        }
    }
    c.arg(file);
    if let Some(s) = size {
        c.arg(s.to_string());
    }
    c
}

/// `qemu-img rebase -u -f FMT -b B [-F BF] IMAGE`: re-points `image` at `backing` (or at none)
/// without reading or copying data; the caller has made sure the view does not change.
pub(crate) fn repoint(image: &Path, format: Format, backing: Backing<'_>) -> Command {
    let mut c = qemu_img();
    c.args(["rebase", "-u", "-f", format.as_str()]);
    backing_args(&mut c, backing);
    c.arg(image);
    c
}

/// `qemu-img rebase -p -f qcow2 -b B [-F BF] IMAGE`: re-points `image` at `backing`, copying
/// into it whatever reads differently (a stream, or a merge into a new file).
pub(crate) fn rebase_copying(image: &Path, backing: Backing<'_>) -> Command {
    let mut c = qemu_img();
    c.args(["rebase", "-p", "-f", "qcow2"]);
    backing_args(&mut c, backing);
    c.arg(image);
    c
}

/// `qemu-img commit -p -d -f FMT [-r RATE] [-b BASE] TOP`: merges the range above `base` (or
/// just `top`, into its backing file, when `base` is `None`) into the base, leaving `top` as
/// it was (`-d`).
pub(crate) fn commit(
    top: &Path,
    format: Format,
    base: Option<&Path>,
    rate: Option<u64>,
) -> Command {
    let mut c = qemu_img();
    c.args(["commit", "-p", "-d", "-f", format.as_str()]);
    if let Some(r) = rate {
        c.args(["-r", &r.to_string()]);
    }
    if let Some(b) = base {
        c.arg("-b").arg(b);
    }
    c.arg(top);
    c
}

/// `qemu-img convert -p -f FMT -O qcow2 [-o OPTS] [-r RATE] FROM TO`: a standalone qcow2 copy
/// of the whole view of `from`.
pub(crate) fn convert(
    from: &Path,
    format: Format,
    to: &Path,
    options: Option<&str>,
    rate: Option<u64>,
) -> Command {
    let mut c = qemu_img();
    c.args(["convert", "-p", "-f", format.as_str(), "-O", "qcow2"]);
    if let Some(o) = options {
        c.args(["-o", o]);
    }
    if let Some(r) = rate {
        c.args(["-r", &r.to_string()]);
    }
    c.arg(from).arg(to);
    c
}

/// `qemu-img compare -q -s -f qcow2 -F BF A B`: exit 0 when the qcow2 image `a` reads exactly
/// as `b` (strict about sizes).
pub(crate) fn compare(a: &Path, b: &Path, b_format: Format) -> Command {
    let mut c = qemu_img();
    c.args([
        "compare",
        "-q",
        "-s",
        "-f",
        "qcow2",
        "-F",
        b_format.as_str(),
    ])
    .arg(a)
    .arg(b);
    c
}

/// `qemu-img check -q [-r leaks] -f qcow2 FILE`: exit 0 clean, 3 leaks only (repaired with
/// `repair_leaks`), 2 corruption.
pub(crate) fn check(file: &Path, repair_leaks: bool) -> Command {
    let mut c = qemu_img();
    c.args(["check", "-q"]);
    if repair_leaks {
        c.args(["-r", "leaks"]);
    }
    c.args(["-f", "qcow2"]).arg(file);
    c
}

/// `qemu-img bitmap -f qcow2 OPS FILE NAME`.
pub(crate) fn bitmap(file: &Path, ops: &[&OsStr], name: &str) -> Command {
    let mut c = qemu_img();
    c.args(["bitmap", "-f", "qcow2"])
        .args(ops)
        .arg(file)
        .arg(name);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(c: &Command) -> Vec<String> {
        std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn every_backing_reference_names_its_format() {
        let b = Path::new("/i/base.qcow2");
        assert_eq!(
            line(&create(
                Path::new("/i/new.qcow2"),
                Format::Qcow2,
                Some(1024),
                Some((b, Format::Raw)),
                Some("cluster_size=65536"),
                true
            )),
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=65536",
                "-b",
                "/i/base.qcow2",
                "-F",
                "raw",
                "-u",
                "/i/new.qcow2",
                "1024"
            ]
        );
        assert_eq!(
            line(&repoint(
                Path::new("/i/top.qcow2"),
                Format::Qcow2,
                Some((b, Format::Qcow2))
            )),
            [
                "qemu-img",
                "rebase",
                "-u",
                "-f",
                "qcow2",
                "-b",
                "/i/base.qcow2",
                "-F",
                "qcow2",
                "/i/top.qcow2"
            ]
        );
        assert_eq!(
            line(&repoint(Path::new("/i/top.qcow2"), Format::Qcow2, None)),
            [
                "qemu-img",
                "rebase",
                "-u",
                "-f",
                "qcow2",
                "-b",
                "",
                "/i/top.qcow2"
            ]
        );
        assert_eq!(
            line(&rebase_copying(Path::new("/i/top.qcow2"), None)),
            [
                "qemu-img",
                "rebase",
                "-p",
                "-f",
                "qcow2",
                "-b",
                "",
                "/i/top.qcow2"
            ]
        );
    }
}
