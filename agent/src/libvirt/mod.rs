//! Live disks of libvirt domains (`spec.source.libvirt`).
//!
//! A running domain's disk is driven only through libvirt's API, so libvirt's view of the chain
//! stays true: external disk-only snapshots, block commit (intermediate, and active with a
//! pivot), block pull into the active layer, block copy onto prepared files with a pivot. Backing
//! layers that are only read (copies for a placement move) are copied by `qemu-img` into new
//! files, which never touches what QEMU has open. A domain that is shut off is an offline disk
//! whose active image is the one its definition names; after every step its persistent
//! definition is brought in line with the chain.

pub mod xml;

#[cfg(feature = "libvirt")]
mod backend;
/// Backups of a running domain's disk (libvirt's backup API).
#[cfg(feature = "libvirt")]
pub mod backup;
#[cfg(feature = "libvirt")]
#[allow(unsafe_code)]
mod sys;

#[cfg(feature = "libvirt")]
pub use backend::Libvirt;

use std::path::PathBuf;

use diskchain_crd::desired::LiveTarget as LibvirtSource;

/// A libvirt disk as it is now.
#[derive(Clone, Debug)]
pub struct LiveDisk {
    /// The domain runs: its disk is live.
    pub running: bool,
    /// The domain has a persistent definition.
    pub persistent: bool,
    /// The disk as the domain's XML (live when running) describes it.
    pub disk: xml::DiskXml,
    /// The QEMU process of a running domain.
    pub pid: Option<u32>,
    /// The domain has a QEMU guest agent channel (needed to quiesce).
    pub guest_agent: bool,
}

/// Why a libvirt disk cannot be found or acted on.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// This build has no libvirt support.
    #[error(
        "spec.source.libvirt: this diskchain was built without libvirt support; build it with the `libvirt` feature (the default; needs libvirt-dev)"
    )]
    NotBuilt,
    /// Connecting failed.
    #[error(
        "cannot connect to libvirt at {uri}: {message}; is libvirtd running, and may this user use it?"
    )]
    Connect {
        /// The URI.
        uri: String,
        /// libvirt's message.
        message: String,
    },
    /// The domain is not there.
    #[error("libvirt at {uri} has no domain {domain:?}: {message}")]
    NoDomain {
        /// The URI.
        uri: String,
        /// The domain.
        domain: String,
        /// libvirt's message.
        message: String,
    },
    /// The XML does not give the disk.
    #[error("domain {domain}: {source}")]
    Xml {
        /// The domain.
        domain: String,
        /// The cause.
        source: xml::XmlError,
    },
    /// The URI is not one this node's operator allows (`--allowed-libvirt-uri`).
    #[error(
        "spec.source.libvirt.uri: {uri:?} is not a libvirt URI this node allows (allowed: {allowed}); the node's operator sets them with --allowed-libvirt-uri (the chart's libvirt.allowedUris). Nothing was done"
    )]
    NotAllowed {
        /// The URI the spec names.
        uri: String,
        /// The allowed URIs, for the message.
        allowed: String,
    },
    /// A libvirt call failed.
    #[error("domain {domain}: {what} failed: {message}")]
    Call {
        /// The domain.
        domain: String,
        /// What was being done.
        what: String,
        /// libvirt's message.
        message: String,
    },
}

impl From<LiveError> for crate::execute::ExecError {
    fn from(e: LiveError) -> Self {
        crate::execute::ExecError::Backend {
            bad_input: e.is_bad_input(),
            source: Box::new(e),
        }
    }
}

impl LiveError {
    /// True when the spec is at fault (exit 2); false when libvirt may come back (exit 1).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            LiveError::NotBuilt
                | LiveError::NoDomain { .. }
                | LiveError::Xml { .. }
                | LiveError::NotAllowed { .. }
        )
    }
}

/// The libvirt URIs a spec may name, as the operator set them at start (`--allowed-libvirt-uri`);
/// [`DEFAULT_URI`] alone until then.
static ALLOWED_URIS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// The URI allowed when the operator names none: the local system daemon.
pub const DEFAULT_URI: &str = "qemu:///system";

/// How long connecting to libvirt may take before the call fails (a daemon that never answers
/// must not hold a reconcile, a deletion or a shutdown).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Query parameters an operator's URI may carry: where the local socket is, and the daemon mode.
const URI_PARAMS: &[&str] = &["socket", "mode"];

/// Checks the operator's allowed URIs and makes them the only ones any connection may use. A URI
/// must reach a local daemon: transport none or `unix`, no host, and no query parameter but
/// `socket` and `mode` (`ext` runs a program, `ssh`/`tcp`/`tls` open network connections, and
/// `command`, `keyfile` and the like choose programs and keys). `Err` says which URI and why.
pub fn allow_uris(uris: &[String]) -> Result<(), String> {
    for u in uris {
        check_operator_uri(u).map_err(|why| {
            format!("--allowed-libvirt-uri {u:?}: {why}; allowed are local URIs such as qemu:///system or qemu+unix:///system?socket=/run/libvirt/libvirt-sock")
        })?;
    }
    let _ = ALLOWED_URIS.set(uris.to_vec());
    Ok(())
}

fn check_operator_uri(uri: &str) -> Result<(), String> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| "it is not a URI (DRIVER[+TRANSPORT]://[HOST]/PATH)".to_string())?;
    if let Some((_, transport)) = scheme.split_once('+')
        && transport != "unix"
    {
        return Err(format!(
            "the transport {transport:?} is not local (only unix, or none, reaches this node's daemon without a program, a host or a key)"
        ));
    }
    let (authority_path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !authority_path.starts_with('/') {
        return Err("it names a host; only this node's own daemon may be used".into());
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        if !URI_PARAMS.contains(&name) {
            return Err(format!(
                "the query parameter {name:?} is not allowed (only {})",
                URI_PARAMS.join(", ")
            ));
        }
    }
    Ok(())
}

/// The URIs any connection may use now.
pub fn allowed_uris() -> Vec<String> {
    ALLOWED_URIS
        .get()
        .cloned()
        .unwrap_or_else(|| vec![DEFAULT_URI.to_string()])
}

/// `Ok` when `uri` is exactly one of the allowed URIs: a spec never chooses a transport, a host,
/// a program or a parameter of its own.
pub fn check_uri(uri: &str) -> Result<(), LiveError> {
    let allowed = allowed_uris();
    if allowed.iter().any(|a| a == uri) {
        Ok(())
    } else {
        Err(LiveError::NotAllowed {
            uri: uri.chars().take(200).collect(),
            allowed: allowed.join(", "),
        })
    }
}

/// The QEMU process of a running domain, from libvirt's pid file.
pub fn qemu_pid(domain: &str) -> Option<u32> {
    ["/run/libvirt/qemu", "/var/run/libvirt/qemu"]
        .iter()
        .find_map(|d| std::fs::read_to_string(format!("{d}/{domain}.pid")).ok())
        .and_then(|s| s.trim().parse().ok())
}

/// Which QEMU process runs domain `domain`: the host's boot, the process's pid and the inode
/// and time of the pid file libvirt wrote when it started it (a new process, a new file; a
/// libvirtd restart reads it again and leaves it). `None` when libvirt's pid file cannot be read
/// (then no two runs can be told to be the same).
pub fn qemu_run(domain: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    ["/run/libvirt/qemu", "/var/run/libvirt/qemu"]
        .iter()
        .find_map(|d| {
            let f = format!("{d}/{domain}.pid");
            let meta = std::fs::symlink_metadata(&f).ok().filter(|m| m.is_file())?;
            let pid: u32 = std::fs::read_to_string(&f).ok()?.trim().parse().ok()?;
            Some(format!(
                "{}:{pid}:{}:{}.{:09}",
                boot.trim(),
                meta.ino(),
                meta.mtime(),
                meta.mtime_nsec()
            ))
        })
}

/// Finds the disk `src` names and reads its chain as libvirt reports it.
#[cfg(feature = "libvirt")]
pub fn locate(src: &LibvirtSource) -> Result<LiveDisk, LiveError> {
    backend::locate(src)
}

/// Finds the disk `src` names (not in this build).
#[cfg(not(feature = "libvirt"))]
pub fn locate(_src: &LibvirtSource) -> Result<LiveDisk, LiveError> {
    Err(LiveError::NotBuilt)
}

/// A disk of some libvirt domain, with the files it reads (top first): what libvirt records
/// (the live XML of a running domain, the persistent definition of any) and, below its top, the
/// chain the image headers give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainDisk {
    /// The domain.
    pub domain: String,
    /// The disk's target.
    pub target: String,
    /// The domain runs.
    pub running: bool,
    /// The files the disk reads, top first.
    pub files: Vec<PathBuf>,
}

impl DomainDisk {
    /// How the disk is named in messages and as a user of a layer.
    pub fn label(&self) -> PathBuf {
        PathBuf::from(format!(
            "libvirt domain {} disk {} ({}, {})",
            self.domain,
            self.target,
            if self.running { "running" } else { "shut off" },
            self.files
                .first()
                .map(|f| f.display().to_string())
                .unwrap_or_default()
        ))
    }
}

/// Every disk of every domain (running or defined) libvirt at `uri` knows.
#[cfg(feature = "libvirt")]
pub fn domain_disks(uri: &str) -> Result<Vec<DomainDisk>, LiveError> {
    backend::domain_disks(uri)
}

/// Every disk of every domain (not in this build).
#[cfg(not(feature = "libvirt"))]
pub fn domain_disks(_uri: &str) -> Result<Vec<DomainDisk>, LiveError> {
    Err(LiveError::NotBuilt)
}

/// The chain libvirt records for the disk, active first (symlinks resolved where they exist).
/// A running domain's XML lists the whole chain; a persistent definition may list only its top
/// (libvirt probes the rest from the image headers when it starts the domain).
pub fn recorded_chain(d: &LiveDisk) -> Vec<PathBuf> {
    std::iter::once(&d.disk.active)
        .chain(&d.disk.backing)
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .collect()
}

/// True when what libvirt records fits the chain the image headers give (`files`, base first):
/// all of it for a running domain, a top part of it for a definition.
pub fn chain_agrees(d: &LiveDisk, files: &[PathBuf]) -> bool {
    let recorded = recorded_chain(d);
    let real: Vec<PathBuf> = files.iter().rev().cloned().collect();
    if d.running {
        recorded == real
    } else {
        real.starts_with(&recorded)
    }
}
