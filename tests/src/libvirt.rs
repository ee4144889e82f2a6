//! A real libvirtd for live tests: TCG domains with no OS (the guest sits in its firmware; block
//! jobs run normally), a guest writer through the guest's own virtio device, and the chain as
//! libvirt reports it. `scripts/setup.sh --live` installs and starts libvirtd.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::qemu::run;

/// The connection every live test uses.
pub const URI: &str = "qemu:///system";

/// `virsh -c qemu:///system ARGS...`, which must succeed; its stdout.
pub fn virsh(args: &[&str]) -> String {
    run(Command::new("virsh").arg("-c").arg(URI).args(args))
}

/// Fails the test with the way to get libvirtd when it is not reachable.
pub fn require() {
    let ok = Command::new("virsh")
        .args(["-c", URI, "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "live tests need a running libvirtd with QEMU: run `scripts/setup.sh --live` as root (it installs qemu-system-x86 and libvirt from bookworm-backports and starts virtlogd and libvirtd)"
    );
}

/// Makes `dir` and its parents up to `/tmp` reachable by QEMU, which libvirt runs as another user.
pub fn open_up(dir: &Path) {
    let mut d = Some(dir);
    while let Some(p) = d {
        if p == Path::new("/") || p == Path::new("/tmp") {
            break;
        }
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
        d = p.parent();
    }
}

/// A running TCG domain with one virtio disk `vda`; destroyed and undefined when dropped.
pub struct Domain {
    /// Its name.
    pub name: String,
}

impl Domain {
    /// Defines (persistent) and starts a domain named `name` whose disk is the qcow2 `active`.
    pub fn start(name: &str, active: &Path) -> Domain {
        let d = Domain::define(name, active);
        virsh(&["start", name]);
        d
    }

    /// Defines (persistent) a domain named `name` whose disk is the qcow2 `active`; not started.
    pub fn define(name: &str, active: &Path) -> Domain {
        Domain::define_with_driver(name, active, "qcow2")
    }

    /// Defines (persistent) a domain named `name` whose disk `active` has `<driver type=...>`.
    pub fn define_with_driver(name: &str, active: &Path, driver: &str) -> Domain {
        require();
        let _ = Command::new("virsh")
            .args(["-c", URI, "destroy", name])
            .output();
        let _ = Command::new("virsh")
            .args(["-c", URI, "undefine", name])
            .output();
        let xml = format!(
            r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{driver}'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>
  </devices>
</domain>"#,
            active.display()
        );
        let file = std::env::temp_dir().join(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("write domain XML");
        virsh(&["define", &file.to_string_lossy()]);
        let _ = std::fs::remove_file(&file);
        Domain {
            name: name.to_string(),
        }
    }

    /// The chain libvirt reports for `vda`, base first (active last).
    pub fn chain(&self) -> Vec<PathBuf> {
        let x = virsh(&["dumpxml", &self.name]);
        let mut files: Vec<PathBuf> = x
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                l.strip_prefix("<source file='")
                    .and_then(|r| r.split('\'').next())
                    .map(PathBuf::from)
            })
            .collect();
        files.reverse();
        files
    }

    /// The disk source of the persistent definition.
    pub fn persistent_source(&self) -> PathBuf {
        let x = virsh(&["dumpxml", "--inactive", &self.name]);
        x.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("<source file='")
                    .and_then(|r| r.split('\'').next())
                    .map(PathBuf::from)
            })
            .expect("a disk source")
    }

    /// Defines and starts a domain named `name` with two virtio disks, `vda` on `a` and `vdb`
    /// on `b` (qcow2).
    pub fn start_two(name: &str, a: &Path, b: &Path) -> Domain {
        require();
        let _ = Command::new("virsh")
            .args(["-c", URI, "destroy", name])
            .output();
        let _ = Command::new("virsh")
            .args(["-c", URI, "undefine", "--checkpoints-metadata", name])
            .output();
        let disk = |f: &Path, t: &str| {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='{t}' bus='virtio'/></disk>",
                f.display()
            )
        };
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{}{}</devices></domain>",
            disk(a, "vda"),
            disk(b, "vdb")
        );
        let file = std::env::temp_dir().join(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("write domain XML");
        virsh(&["define", &file.to_string_lossy()]);
        let _ = std::fs::remove_file(&file);
        virsh(&["start", name]);
        Domain {
            name: name.to_string(),
        }
    }

    /// A guest write to the domain's `index`th virtio disk (0: `vda`, 1: `vdb`).
    pub fn guest_write_to(&self, index: usize, pattern: u8, offset: u64, len: u64) {
        virsh(&[
            "qemu-monitor-command",
            &self.name,
            "--hmp",
            &format!(
                "qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend \"write -P {pattern} {offset} {len}\""
            ),
        ]);
        virsh(&[
            "qemu-monitor-command",
            &self.name,
            "--hmp",
            &format!("qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend \"flush\""),
        ]);
    }

    /// Is it running?
    pub fn running(&self) -> bool {
        virsh(&["domstate", &self.name]).trim() == "running"
    }

    /// Writes `len` bytes of `pattern` at `offset` through the guest's own virtio disk (QEMU's
    /// `qemu-io` on the device's block backend, as a guest write would arrive).
    pub fn guest_write(&self, pattern: u8, offset: u64, len: u64) {
        self.hmp(&format!("write -P {pattern} {offset} {len}"));
    }

    /// Kills the domain's QEMU with SIGKILL (as a host OOM kill or crash would) and waits until
    /// libvirt sees it shut off. Nothing is flushed.
    pub fn crash(&self) {
        let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", self.name))
            .expect("the domain's QEMU pid file");
        let ok = Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -9 {}", pid.trim());
        for _ in 0..100 {
            if virsh(&["domstate", &self.name]).trim() == "shut off" {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!(
            "domain {} did not shut off after its QEMU was killed",
            self.name
        );
    }

    /// Flushes the guest disk (QEMU's caches reach the files).
    pub fn flush(&self) {
        self.hmp("flush");
    }

    fn hmp(&self, cmd: &str) {
        virsh(&[
            "qemu-monitor-command",
            &self.name,
            "--hmp",
            &format!("qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"{cmd}\""),
        ]);
    }

    /// The block job on `vda` as `virsh blockjob` prints it (empty when none).
    pub fn blockjob(&self) -> String {
        let o = Command::new("virsh")
            .args(["-c", URI, "blockjob", &self.name, "vda", "--info"])
            .output()
            .expect("virsh");
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if s.starts_with("No current block job") {
            String::new()
        } else {
            s
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", URI, "destroy", &self.name])
            .output();
        // (A domain with checkpoints, left by a backup test, is undefined with their metadata.)
        let _ = Command::new("virsh")
            .args(["-c", URI, "undefine", "--checkpoints-metadata", &self.name])
            .output();
    }
}

/// The guest view of a live disk's chain (read with QEMU's force-share, after a flush).
pub fn live_view(active: &Path) -> Vec<u8> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let out = std::env::temp_dir().join(format!(
        "live-view-{}-{}.raw",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(active)
        .arg(&out));
    let bytes = std::fs::read(&out).expect("read view");
    let _ = std::fs::remove_file(&out);
    bytes
}

/// SHA-256 of bytes.
pub fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}
