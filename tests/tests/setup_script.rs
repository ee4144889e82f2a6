//! `scripts/setup.sh` takes the mirror for bookworm-backports from the machine's own apt
//! sources. `scripts/setup.sh --mirror DIR` prints what it finds in the apt configuration
//! directory `DIR` (as `/etc/apt`), so every layout a Debian 12 host or image may have is
//! checked here without touching the machine's own.

use std::path::Path;
use std::process::Command;

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup.sh")
}

/// `(exit code, stdout, stderr)` of `setup.sh --mirror etc`.
fn mirror_of(etc: &Path) -> (i32, String, String) {
    let out = Command::new("bash")
        .arg(script())
        .arg("--mirror")
        .arg(etc)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn apt_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("sources.list.d")).unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

#[test]
fn a_deb822_source_gives_its_mirror() {
    let d = apt_dir(&[(
        "sources.list.d/debian.sources",
        "Types: deb\nURIs: http://mirror.internal/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://mirror.internal/debian-security\nSuites: bookworm-security\nComponents: main\n",
    )]);
    assert_eq!(
        mirror_of(d.path()),
        (0, "http://mirror.internal/debian".into(), String::new())
    );
}

/// A host installed with debootstrap (or an older image) has only a one-line `sources.list`
/// and no `*.sources` or `*.list` under `sources.list.d`: the script found the mirror, then
/// exited 1 with no word (the unmatched glob failed the pipeline under `pipefail`).
#[test]
fn a_one_line_sources_list_alone_gives_its_mirror() {
    let d = apt_dir(&[(
        "sources.list",
        "# comment\ndeb-src http://src.internal/debian bookworm main\ndeb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.internal/debian bookworm main\n",
    )]);
    assert_eq!(
        mirror_of(d.path()),
        (0, "http://mirror.internal/debian".into(), String::new())
    );
}

#[test]
fn no_bookworm_source_is_an_error_that_says_what_to_do() {
    let d = apt_dir(&[(
        "sources.list",
        "deb http://mirror.internal/debian trixie main\n",
    )]);
    let (code, out, err) = mirror_of(d.path());
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.contains("no apt source for the bookworm suite") && err.contains("bookworm-backports"),
        "{err}"
    );
}
