//! Reading and editing libvirt domain XML: a disk's chain as libvirt sees it, the other disks of
//! the domain, and the small documents the block jobs take. Pure functions over strings, so they
//! are tested without a libvirtd.

use std::path::{Path, PathBuf};

/// One disk of a domain as its XML describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskXml {
    /// The active image (`<source file=...>`).
    pub active: PathBuf,
    /// The active image's format (`<driver type=...>`).
    pub format: String,
    /// The backing chain libvirt reports (`<backingStore>` elements), top first, without the
    /// active image. Empty when the XML carries none (an inactive definition usually does not).
    pub backing: Vec<PathBuf>,
    /// The XML declares an empty `<backingStore/>` for the active image: QEMU runs it without
    /// any backing file, whatever its header names.
    pub no_backing: bool,
    /// The block job with a destination running on the disk (`<mirror>`: a block copy, an
    /// active commit): its kind (`job=`) and destination file.
    pub mirror: Option<(String, Option<PathBuf>)>,
}

/// Why a domain's XML does not give the disk.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// Not XML.
    #[error("libvirt returned XML that does not parse: {0}")]
    Parse(String),
    /// No disk with that target.
    #[error("the domain has no disk with target {target:?} (its disks: {})", found.join(", "))]
    NoDisk {
        /// The target asked for.
        target: String,
        /// The targets there are.
        found: Vec<String>,
    },
    /// The disk is not a plain file.
    #[error("disk {target} is not a file-backed disk ({what}); diskchain manages qcow2 files")]
    NotAFile {
        /// The target.
        target: String,
        /// What it is.
        what: String,
    },
}

fn disks<'a>(doc: &'a roxmltree::Document<'a>) -> impl Iterator<Item = roxmltree::Node<'a, 'a>> {
    doc.root_element()
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children().filter(|n| n.has_tag_name("disk")))
}

fn target_of(disk: roxmltree::Node<'_, '_>) -> Option<String> {
    disk.children()
        .find(|n| n.has_tag_name("target"))
        .and_then(|t| t.attribute("dev"))
        .map(str::to_string)
}

fn child<'a>(n: roxmltree::Node<'a, 'a>, tag: &str) -> Option<roxmltree::Node<'a, 'a>> {
    n.children().find(|c| c.has_tag_name(tag))
}

fn find_disk<'a>(
    doc: &'a roxmltree::Document<'a>,
    target: &str,
) -> Result<roxmltree::Node<'a, 'a>, XmlError> {
    disks(doc)
        .find(|d| target_of(*d).as_deref() == Some(target))
        .ok_or_else(|| XmlError::NoDisk {
            target: target.to_string(),
            found: disks(doc).filter_map(target_of).collect(),
        })
}

/// The disk with `target` in a domain's XML.
pub fn disk(xml: &str, target: &str) -> Result<DiskXml, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError::Parse(e.to_string()))?;
    let d = find_disk(&doc, target)?;
    if d.attribute("type") != Some("file") {
        return Err(XmlError::NotAFile {
            target: target.into(),
            what: format!("type {:?}", d.attribute("type").unwrap_or("")),
        });
    }
    let active = child(d, "source")
        .and_then(|s| s.attribute("file"))
        .ok_or_else(|| XmlError::NotAFile {
            target: target.into(),
            what: "no source file (an empty drive?)".into(),
        })?;
    let format = child(d, "driver")
        .and_then(|s| s.attribute("type"))
        .unwrap_or("raw")
        .to_string();
    let no_backing = child(d, "backingStore")
        .is_some_and(|b| b.attribute("type").is_none() && child(b, "source").is_none());
    let mut backing = Vec::new();
    let mut cur = child(d, "backingStore");
    while let Some(b) = cur {
        let Some(f) = child(b, "source").and_then(|s| s.attribute("file")) else {
            break;
        };
        backing.push(PathBuf::from(f));
        cur = child(b, "backingStore");
    }
    let mirror = child(d, "mirror").map(|m| {
        let file = m
            .attribute("file")
            .or_else(|| child(m, "source").and_then(|s| s.attribute("file")))
            .map(PathBuf::from);
        (m.attribute("job").unwrap_or("copy").to_string(), file)
    });
    Ok(DiskXml {
        active: PathBuf::from(active),
        format,
        backing,
        no_backing,
        mirror,
    })
}

/// Every disk of a domain with the files it reads: its source (`file=` or `dev=`) and the
/// `<backingStore>` sources libvirt records, top first. Disks with no local source (network,
/// empty drives) are left out.
pub fn disk_files(xml: &str) -> Result<Vec<(String, Vec<PathBuf>)>, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError::Parse(e.to_string()))?;
    let source = |n: roxmltree::Node<'_, '_>| {
        child(n, "source")
            .and_then(|s| s.attribute("file").or_else(|| s.attribute("dev")))
            .map(PathBuf::from)
    };
    Ok(disks(&doc)
        .filter_map(|d| {
            let target = target_of(d)?;
            let mut files = vec![source(d)?];
            let mut cur = child(d, "backingStore");
            while let Some(b) = cur {
                match source(b) {
                    Some(f) => files.push(f),
                    None => break,
                }
                cur = child(b, "backingStore");
            }
            Some((target, files))
        })
        .collect())
}

/// The targets of the domain's other disks, of every device kind (disks, floppies, CD-ROMs,
/// LUNs), which a snapshot must leave alone: each is named with `snapshot='no'`.
pub fn other_disks(xml: &str, target: &str) -> Result<Vec<String>, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError::Parse(e.to_string()))?;
    Ok(disks(&doc)
        .filter_map(target_of)
        .filter(|t| t != target)
        .collect())
}

/// True when the domain has a QEMU guest agent channel (what `--quiesce` talks to).
pub fn has_guest_agent(xml: &str) -> Result<bool, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError::Parse(e.to_string()))?;
    Ok(doc.descendants().any(|n| {
        n.has_tag_name("channel")
            && n.children().any(|t| {
                t.has_tag_name("target") && t.attribute("name") == Some("org.qemu.guest_agent.0")
            })
    }))
}

/// Escapes text for an XML attribute.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// An external disk-only snapshot of `target` onto the prepared file `overlay`; every other disk
/// is left out of it.
pub fn snapshot(name: &str, target: &str, overlay: &Path, others: &[String]) -> String {
    let mut s = format!(
        "<domainsnapshot><name>{}</name><description>diskchain</description><disks>",
        escape(name)
    );
    s.push_str(&format!(
        "<disk name=\"{}\" snapshot=\"external\" type=\"file\"><driver type=\"qcow2\"/><source file=\"{}\"/></disk>",
        escape(target),
        escape(&overlay.to_string_lossy())
    ));
    for o in others {
        s.push_str(&format!("<disk name=\"{}\" snapshot=\"no\"/>", escape(o)));
    }
    s.push_str("</disks></domainsnapshot>");
    s
}

/// The destination of a block copy.
pub fn copy_destination(file: &Path) -> String {
    format!(
        "<disk type=\"file\"><source file=\"{}\"/><driver type=\"qcow2\"/></disk>",
        escape(&file.to_string_lossy())
    )
}

/// The domain XML with disk `target`'s source set to `active` and its `<backingStore>` dropped,
/// so that libvirt reads the chain from the image headers when it next starts the domain.
pub fn with_disk_source(xml: &str, target: &str, active: &Path) -> Result<String, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError::Parse(e.to_string()))?;
    let d = find_disk(&doc, target)?;
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    if let Some(src) = child(d, "source") {
        edits.push((
            src.range(),
            format!("<source file=\"{}\"/>", escape(&active.to_string_lossy())),
        ));
    }
    if let Some(b) = child(d, "backingStore") {
        edits.push((b.range(), String::new()));
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    for (r, text) in edits {
        out.replace_range(r, &text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = r#"<domain type='qemu'><name>t</name><devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/v/top.qcow2' index='3'/>
      <backingStore type='file' index='2'>
        <format type='qcow2'/>
        <source file='/v/mid.qcow2'/>
        <backingStore type='file' index='1'>
          <format type='qcow2'/>
          <source file='/v/base.qcow2'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/v/data.img'/><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
    </devices></domain>"#;

    #[test]
    fn reads_the_chain_libvirt_reports() {
        let d = disk(LIVE, "vda").unwrap();
        assert_eq!(d.active, PathBuf::from("/v/top.qcow2"));
        assert_eq!(d.format, "qcow2");
        assert_eq!(
            d.backing,
            vec![
                PathBuf::from("/v/mid.qcow2"),
                PathBuf::from("/v/base.qcow2")
            ]
        );
        assert_eq!(
            other_disks(LIVE, "vda").unwrap(),
            vec!["vdb".to_string(), "sda".to_string()]
        );
        assert!(!has_guest_agent(LIVE).unwrap());
        let with_agent = LIVE.replace(
            "</devices>",
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices>",
        );
        assert!(has_guest_agent(&with_agent).unwrap());
        let e = disk(LIVE, "vdz").unwrap_err().to_string();
        assert!(e.contains("vdz") && e.contains("vda, vdb, sda"), "{e}");
    }

    #[test]
    fn a_new_source_drops_the_recorded_chain() {
        let x = with_disk_source(LIVE, "vda", Path::new("/w/a&b.qcow2")).unwrap();
        let d = disk(&x, "vda").unwrap();
        assert_eq!(d.active, PathBuf::from("/w/a&b.qcow2"));
        assert!(d.backing.is_empty());
        // The other disk is untouched.
        assert_eq!(
            disk(&x, "vdb").unwrap().active,
            PathBuf::from("/v/data.img")
        );
        assert!(x.contains("<target dev='vda' bus='virtio'/>"));
    }

    #[test]
    fn a_snapshot_leaves_other_disks_out() {
        let s = snapshot("p", "vda", Path::new("/v/n.qcow2"), &["vdb".into()]);
        let doc = roxmltree::Document::parse(&s).unwrap();
        let disks: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .map(|n| {
                (
                    n.attribute("name").unwrap(),
                    n.attribute("snapshot").unwrap(),
                )
            })
            .collect();
        assert_eq!(disks, vec![("vda", "external"), ("vdb", "no")]);
    }
}
