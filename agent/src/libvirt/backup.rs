//! Backups of a running domain's disk through libvirt's backup API (push mode), with a
//! checkpoint per backup: a full into a pre-created target, or an incremental since the previous
//! backup's checkpoint into a target backed by the previous point (reuse-external, so only the
//! dirty clusters are written and the target's backing is the repository's, never the live
//! image). Measured on libvirt 11.3 / QEMU 10.0.2 (`BACKUPS.md`).

use std::path::Path;
use std::time::{Duration, Instant};

use diskchain_crd::desired::LiveTarget as LibvirtSource;

use super::backend::{call, open};
use super::{LiveError, sys, xml};

/// One disk of a backup job: its target device, the file written (which exists), and the
/// checkpoint an incremental starts from (`None`: a full).
pub struct DiskTarget {
    /// The disk's target device (`vda`).
    pub target: String,
    /// The file the job writes.
    pub file: std::path::PathBuf,
    /// Only what changed since this checkpoint.
    pub since: Option<String>,
}

/// A push-mode backup of the disk into `target` (which exists), creating checkpoint
/// `checkpoint`; `since`: only what changed since that checkpoint.
pub fn push(
    src: &LibvirtSource,
    target: &Path,
    since: Option<&str>,
    checkpoint: &str,
    progress: &mut dyn FnMut(f64),
) -> Result<(), LiveError> {
    push_disks(
        src,
        &[DiskTarget {
            target: src.target.clone(),
            file: target.to_path_buf(),
            since: since.map(str::to_string),
        }],
        checkpoint,
        progress,
    )
}

/// One push-mode backup job over `disks` of the domain (the others left out), creating
/// checkpoint `checkpoint` over them. Waits until the job is over; when it fails, the new
/// checkpoint is deleted (libvirt keeps it) and the error returned.
pub fn push_disks(
    src: &LibvirtSource,
    disks: &[DiskTarget],
    checkpoint: &str,
    progress: &mut dyn FnMut(f64),
) -> Result<(), LiveError> {
    let s = open(src)?;
    let x = s.dom.xml_desc(0).map_err(call(src, "reading its XML"))?;
    // Every other device of the domain is left out of the job and the checkpoint.
    let first = disks
        .first()
        .map_or(src.target.as_str(), |d| d.target.as_str());
    let others: Vec<String> = xml::other_disks(&x, first)
        .map_err(|source| LiveError::Xml {
            domain: src.domain.clone(),
            source,
        })?
        .into_iter()
        .filter(|o| !disks.iter().any(|d| &d.target == o))
        .collect();
    let mut backup_disks = String::new();
    let mut ck_disks = String::new();
    for d in disks {
        let mode = match &d.since {
            Some(c) => format!(" backupmode='incremental' incremental='{}'", xml::escape(c)),
            None => " backupmode='full'".to_string(),
        };
        backup_disks.push_str(&format!(
            "<disk name='{}' backup='yes'{mode} type='file'><target file='{}'/><driver type='qcow2'/></disk>",
            xml::escape(&d.target),
            xml::escape(&d.file.to_string_lossy())
        ));
        ck_disks.push_str(&format!(
            "<disk name='{}' checkpoint='bitmap'/>",
            xml::escape(&d.target)
        ));
    }
    for o in &others {
        backup_disks.push_str(&format!("<disk name='{}' backup='no'/>", xml::escape(o)));
        ck_disks.push_str(&format!(
            "<disk name='{}' checkpoint='no'/>",
            xml::escape(o)
        ));
    }
    let backup = format!("<domainbackup mode='push'><disks>{backup_disks}</disks></domainbackup>");
    let ck = format!(
        "<domaincheckpoint><name>{}</name><disks>{ck_disks}</disks></domaincheckpoint>",
        xml::escape(checkpoint)
    );
    sys::backup_begin(&s.dom, &backup, Some(&ck), true)
        .map_err(call(src, "starting the backup job"))?;
    let result = wait(&s.dom, src, progress);
    if result.is_err() {
        let _ = sys::checkpoint_delete(&s.dom, checkpoint, false)
            .or_else(|_| sys::checkpoint_delete(&s.dom, checkpoint, true));
    }
    result
}

/// Waits for the domain's backup job to end; `Ok` when it completed.
fn wait(
    dom: &virt::domain::Domain,
    src: &LibvirtSource,
    progress: &mut dyn FnMut(f64),
) -> Result<(), LiveError> {
    let start = Instant::now();
    loop {
        let info = dom
            .job_info()
            .map_err(call(src, "reading the backup job"))?;
        if info.r#type == virt::sys::VIR_DOMAIN_JOB_NONE as i32 {
            break;
        }
        if let (Some(done), Some(total)) = (info.data_processed, info.data_total)
            && total > 0
        {
            progress((done as f64 / total as f64).clamp(0.0, 1.0));
        }
        if start.elapsed() > Duration::from_secs(24 * 3600) {
            let _ = sys::abort_job(dom);
            return Err(LiveError::Call {
                domain: src.domain.clone(),
                what: "the backup job".into(),
                message: "did not end within 24 h; aborted".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = dom
        .job_stats(virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED)
        .map_err(call(src, "reading how the backup job ended"))?;
    if done.r#type == virt::sys::VIR_DOMAIN_JOB_COMPLETED as i32 {
        Ok(())
    } else {
        Err(LiveError::Call {
            domain: src.domain.clone(),
            what: "the backup job".into(),
            message: format!(
                "ended without completing (job state {}); see libvirt's log for the domain",
                done.r#type
            ),
        })
    }
}

/// The domain's checkpoint names.
pub fn checkpoints(src: &LibvirtSource) -> Result<Vec<String>, LiveError> {
    let s = open(src)?;
    sys::checkpoints(&s.dom).map_err(call(src, "listing its checkpoints"))
}

/// Deletes checkpoint `name` with its bitmaps; when its bitmap is already gone (a crash), its
/// record alone.
pub fn delete_checkpoint(src: &LibvirtSource, name: &str) -> Result<(), LiveError> {
    let s = open(src)?;
    sys::checkpoint_delete(&s.dom, name, false)
        .or_else(|_| sys::checkpoint_delete(&s.dom, name, true))
        .map_err(call(src, &format!("deleting checkpoint {name}")))
}

/// True when a job (a backup, a migration) runs on the domain.
pub fn job_running(src: &LibvirtSource) -> Result<bool, LiveError> {
    let s = open(src)?;
    let info = s.dom.job_info().map_err(call(src, "reading its job"))?;
    Ok(info.r#type != virt::sys::VIR_DOMAIN_JOB_NONE as i32)
}

/// After an offline backup of a shut-off domain's disk that added bitmap `name` to its active
/// image: records checkpoint `name` in libvirt (redefined: the bitmap exists), so the next backup
/// of the running domain is an incremental since it, and drops libvirt's record of the other
/// checkpoints of ours (a shut-off domain's checkpoints can only be dropped as metadata; their
/// bitmaps left the images with the backup).
pub fn adopt_offline_checkpoint(
    src: &LibvirtSource,
    name: &str,
    created_unix: i64,
) -> Result<(), LiveError> {
    let s = open(src)?;
    let x = s
        .dom
        .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
        .map_err(call(src, "reading its XML"))?;
    let others = xml::other_disks(&x, &src.target).map_err(|source| LiveError::Xml {
        domain: src.domain.clone(),
        source,
    })?;
    for c in sys::checkpoints(&s.dom).map_err(call(src, "listing its checkpoints"))? {
        if c.starts_with("diskchain-") && c != name {
            sys::checkpoint_delete(&s.dom, &c, true)
                .map_err(call(src, &format!("dropping checkpoint {c}")))?;
        }
    }
    let mut disks = format!(
        "<disk name='{}' checkpoint='bitmap' bitmap='{}'/>",
        xml::escape(&src.target),
        xml::escape(name)
    );
    for o in &others {
        disks.push_str(&format!(
            "<disk name='{}' checkpoint='no'/>",
            xml::escape(o)
        ));
    }
    let ck = format!(
        "<domaincheckpoint><name>{}</name><creationTime>{created_unix}</creationTime><disks>{disks}</disks></domaincheckpoint>",
        xml::escape(name)
    );
    sys::checkpoint_redefine(&s.dom, &ck)
        .map_err(call(src, &format!("redefining checkpoint {name}")))
}
