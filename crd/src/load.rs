//! Loading spec files: a file or a directory (recursively, `*.yaml`/`*.yml`, multi-document files
//! allowed), then validation of each document and of the set as a whole.
//!
//! Every problem found is collected (not just the first), each naming the file, the document, the
//! field and what is allowed. Checks that need the disk (does a file exist, is it in the chain,
//! do two paths resolve to one file) belong to the agent's observer.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};

use crate::desired::{Invalid, LiveTarget, Revert};
use crate::key::DiskKey;
use crate::types::{API_VERSION, DiskChainSpec, KIND, SpecDocument};

/// Where a desired disk came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A spec file, and the document's 1-based number within it.
    File {
        /// The file.
        file: PathBuf,
        /// The document.
        document: usize,
    },
    /// A `DiskChain` object of the Kubernetes API.
    Object {
        /// Its `metadata.uid`.
        uid: String,
        /// Its `metadata.generation`: which edit of the spec this is.
        generation: i64,
    },
}

/// A disk as its spec wants it, past validation: its key, where the spec came from, and the
/// spec. File mode loads these from YAML ([`load_path`]); Kubernetes mode makes them from
/// `DiskChain` objects ([`DesiredDisk::from_object`]); everything after is the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredDisk {
    /// `metadata.namespace` (default `default`) and `metadata.name`: the disk's key.
    pub key: DiskKey,
    /// Where it came from.
    pub origin: Origin,
    /// The whole document.
    pub doc: SpecDocument,
    /// `spec.source.libvirt` past the boundary (durations parsed): a live disk's target.
    pub live: Option<LiveTarget>,
    /// `spec.revert` past the boundary (durations parsed).
    pub revert: Option<Revert>,
}

impl DesiredDisk {
    /// A desired disk from a document that passed [`validate_document`]: the settings that
    /// outlive planning are taken past the boundary here, once. `Err` names the field (only
    /// for a document that skipped validation).
    fn new(key: DiskKey, origin: Origin, doc: SpecDocument) -> Result<DesiredDisk, Invalid> {
        let live = doc
            .spec
            .source
            .libvirt
            .as_ref()
            .map(LiveTarget::try_from)
            .transpose()?;
        let revert = doc.spec.revert.as_ref().map(Revert::try_from).transpose()?;
        Ok(DesiredDisk {
            key,
            origin,
            doc,
            live,
            revert,
        })
    }

    /// The spec part.
    pub fn spec(&self) -> &DiskChainSpec {
        &self.doc.spec
    }

    /// `file (document N)` or `DiskChain NAMESPACE/NAME`, for messages.
    pub fn origin(&self) -> String {
        match &self.origin {
            Origin::File { file, document } => origin(file, *document),
            Origin::Object { .. } => object_origin(&self.key),
        }
    }

    /// The spec file and document it came from (`None` for a Kubernetes object).
    pub fn file_document(&self) -> Option<(&Path, usize)> {
        match &self.origin {
            Origin::File { file, document } => Some((file, *document)),
            Origin::Object { .. } => None,
        }
    }

    /// The desired disk of a `DiskChain` object, validated as a spec file's document is. Its
    /// errors name the object (`DiskChain NAMESPACE/NAME`) and the field.
    pub fn from_object(obj: &crate::DiskChain) -> Result<DesiredDisk, SpecErrors> {
        let meta = &obj.metadata;
        let key = DiskKey::new(
            meta.namespace.as_deref(),
            meta.name.as_deref().unwrap_or_default(),
        );
        let doc = SpecDocument {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            metadata: crate::SpecMetadata {
                name: key.name.clone(),
                namespace: meta.namespace.clone(),
                labels: meta.labels.clone().unwrap_or_default(),
                annotations: meta.annotations.clone().unwrap_or_default(),
            },
            spec: obj.spec.clone(),
        };
        let here = PathBuf::from(object_origin(&key));
        let mut errors = Vec::new();
        validate_document(&doc, &mut |field, message| {
            errors.push(SpecError {
                file: here.clone(),
                document: 0,
                field: field.to_string(),
                message,
            })
        });
        if !errors.is_empty() {
            return Err(SpecErrors(errors));
        }
        let origin = Origin::Object {
            uid: meta.uid.clone().unwrap_or_default(),
            generation: meta.generation.unwrap_or(0),
        };
        DesiredDisk::new(key, origin, doc).map_err(|e| {
            SpecErrors(vec![SpecError {
                file: here,
                document: 0,
                field: e.field.to_string(),
                message: e.message,
            }])
        })
    }
}

fn object_origin(key: &DiskKey) -> String {
    format!("DiskChain {}/{}", key.namespace, key.name)
}

fn origin(file: &Path, document: usize) -> String {
    if document == 0 {
        file.display().to_string()
    } else {
        format!("{} (document {document})", file.display())
    }
}

/// One problem with the specs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {field}: {message}", origin(file, *document))]
pub struct SpecError {
    /// The spec file.
    pub file: PathBuf,
    /// 1-based document number within the file; 0 when the whole file is at fault.
    pub document: usize,
    /// The field at fault, as a path (`spec.snapshots[1].name`), or `-` for the whole document.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// All problems found while loading specs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// Loads every spec under `path` (a file, or a directory searched recursively for `*.yaml` and
/// `*.yml`, skipping hidden entries such as `.git`), validates each and the set as a whole.
pub fn load_path(path: &Path) -> Result<Vec<DesiredDisk>, SpecErrors> {
    let (specs, mut errors) = load_files(path);
    errors.extend(check_disjoint(&specs).0);
    if errors.is_empty() {
        Ok(specs)
    } else {
        Err(SpecErrors(errors))
    }
}

/// Like [`load_path`], but for a long-running agent: a file with errors is left out (its errors
/// are returned) while every valid spec of the other files is loaded. Specs that conflict with
/// each other (one name, one disk) are all left out.
pub fn load_path_lenient(path: &Path) -> (Vec<DesiredDisk>, Vec<SpecError>) {
    let (mut specs, mut errors) = load_files(path);
    let (conflicts, involved) = check_disjoint(&specs);
    if !conflicts.is_empty() {
        // Leave out every spec involved: neither can be trusted to be the operator's intent.
        specs.retain(|s| {
            s.file_document()
                .is_none_or(|(f, d)| !involved.contains(&(f.to_path_buf(), d)))
        });
        errors.extend(conflicts);
    }
    (specs, errors)
}

/// The largest spec file read. Real specs are a few KiB; a larger file is refused unread.
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

/// The valid documents of every spec file under `path`, and the errors of the others.
///
/// Only regular files are read, each at most [`MAX_SPEC_BYTES`], opened without blocking (a FIFO
/// never wedges the caller). Under a directory, a symlink is followed only when it stays inside
/// that directory; one that leaves it is refused without being read, so a parse error can never
/// print another file's content. Each file and directory is read once, however many names (or
/// symlink loops) lead to it.
fn load_files(path: &Path) -> (Vec<DesiredDisk>, Vec<SpecError>) {
    let mut errors = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    if path.is_dir() {
        match std::fs::canonicalize(path) {
            Ok(root) => {
                let mut walk = Walk {
                    root,
                    dirs: HashSet::new(),
                    found: Vec::new(),
                    errors: &mut errors,
                };
                walk.dir(path);
                // Sorted by name, then each file (device + inode) kept once: the first name wins.
                let mut found = std::mem::take(&mut walk.found);
                found.sort();
                let mut seen = HashSet::new();
                files = found
                    .into_iter()
                    .filter(|(_, id)| seen.insert(*id))
                    .map(|(p, _)| p)
                    .collect();
            }
            Err(e) => errors.push(whole_file(
                path,
                format!("failed to resolve the directory: {e}"),
            )),
        }
    } else if path.symlink_metadata().is_ok() {
        files.push(path.to_path_buf());
    } else {
        errors.push(whole_file(
            path,
            "no such file or directory; pass a spec file or a directory of them".into(),
        ));
    }
    let mut specs = Vec::new();
    for file in files {
        match read_spec_file(&file) {
            Ok(text) => match load_str(&file, &text) {
                Ok(mut s) => specs.append(&mut s),
                Err(SpecErrors(mut e)) => errors.append(&mut e),
            },
            Err(message) => errors.push(whole_file(&file, message)),
        }
    }
    (specs, errors)
}

fn whole_file(file: &Path, message: String) -> SpecError {
    SpecError {
        file: file.to_path_buf(),
        document: 0,
        field: "-".into(),
        message,
    }
}

/// Reads one spec file: a regular file (after following symlinks), at most [`MAX_SPEC_BYTES`],
/// valid UTF-8. Opened with `O_NONBLOCK` so that a FIFO or device is refused, not waited on.
fn read_spec_file(file: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits() | nix::fcntl::OFlag::O_NOCTTY.bits())
        .open(file)
        .map_err(|e| format!("failed to open the file: {e}"))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("failed to read the file's metadata: {e}"))?;
    let t = meta.file_type();
    if !t.is_file() {
        let what = if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(format!(
            "is {what}, not a regular file: only regular files are read as specs; remove it or rename it so it does not end in .yaml/.yml"
        ));
    }
    if meta.len() > MAX_SPEC_BYTES {
        return Err(format!(
            "is {} bytes; a spec file is at most {} bytes: split it, or remove it if it is not a spec",
            meta.len(),
            MAX_SPEC_BYTES
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_SPEC_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("failed to read the file: {e}"))?;
    if bytes.len() as u64 > MAX_SPEC_BYTES {
        return Err(format!(
            "grew past {MAX_SPEC_BYTES} bytes while being read; a spec file is at most that"
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// A walk of a spec directory that never leaves it and never loops.
struct Walk<'a> {
    /// The directory, resolved.
    root: PathBuf,
    /// Directories already walked, by device and inode.
    dirs: HashSet<(u64, u64)>,
    /// Spec files found, with their device and inode.
    found: Vec<(PathBuf, (u64, u64))>,
    errors: &'a mut Vec<SpecError>,
}

impl Walk<'_> {
    fn dir(&mut self, dir: &Path) {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(dir) {
            Ok(m) if !self.dirs.insert((m.dev(), m.ino())) => return,
            Ok(_) => {}
            Err(e) => {
                self.errors.push(whole_file(
                    dir,
                    format!("failed to read the directory: {e}"),
                ));
                return;
            }
        }
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                self.errors.push(whole_file(
                    dir,
                    format!("failed to read the directory: {e}"),
                ));
                return;
            }
        };
        let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            let is_spec_name =
                matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
            let Ok(lmeta) = p.symlink_metadata() else {
                continue;
            };
            if lmeta.file_type().is_symlink() {
                let target = match std::fs::canonicalize(&p) {
                    Ok(t) => t,
                    Err(e) => {
                        if is_spec_name {
                            self.errors.push(whole_file(
                                &p,
                                format!(
                                    "is a symlink that cannot be followed ({e}); fix or remove it"
                                ),
                            ));
                        }
                        continue;
                    }
                };
                if !target.starts_with(&self.root) {
                    let tmeta = std::fs::metadata(&target);
                    if is_spec_name || tmeta.as_ref().is_ok_and(|m| m.is_dir()) {
                        self.errors.push(whole_file(
                            &p,
                            format!(
                                "is a symlink that leads outside the spec directory {}: not read; replace it with the file itself or point it inside the directory",
                                self.root.display()
                            ),
                        ));
                    }
                    continue;
                }
                match std::fs::metadata(&target) {
                    Ok(m) if m.is_dir() => self.dir(&p),
                    Ok(m) if is_spec_name => self.found.push((p, (m.dev(), m.ino()))),
                    _ => {}
                }
            } else if lmeta.is_dir() {
                self.dir(&p);
            } else if is_spec_name {
                self.found.push((p, (lmeta.dev(), lmeta.ino())));
            }
        }
    }
}

/// Parses and validates the documents of one file's text. `file` is used for messages only.
pub fn load_str(file: &Path, text: &str) -> Result<Vec<DesiredDisk>, SpecErrors> {
    // Parse each document on its own so one bad document does not hide the others' errors and
    // each error carries its document number.
    let raw: Vec<serde_json::Value> =
        match serde_saphyr::from_str_multiple::<serde_json::Value, Vec<_>>(text) {
            Ok(v) => v,
            Err(e) => {
                return Err(SpecErrors(vec![SpecError {
                    file: file.to_path_buf(),
                    document: 0,
                    field: "-".into(),
                    message: format!("malformed YAML: {}", one_line(&e.to_string())),
                }]));
            }
        };
    let docs: Vec<&str> = split_documents(text);
    let mut errors = Vec::new();
    let mut specs = Vec::new();
    for (i, value) in raw.into_iter().enumerate() {
        let document = i + 1;
        if value.is_null() {
            continue;
        }
        let err = |field: &str, message: String| SpecError {
            file: file.to_path_buf(),
            document,
            field: field.to_string(),
            message,
        };
        if !value.is_object() {
            errors.push(err(
                "-",
                "a spec document must be a mapping with apiVersion, kind, metadata and spec".into(),
            ));
            continue;
        }
        // Deserialise the document's own text with the typed model so that serde-saphyr reports
        // unknown fields and wrong types with their line; fall back to the JSON value if the
        // document split did not line up.
        let typed: Result<SpecDocument, String> = match docs.get(i) {
            Some(src) => {
                serde_saphyr::from_str::<SpecDocument>(src).map_err(|e| one_line(&e.to_string()))
            }
            None => {
                serde_json::from_value::<SpecDocument>(value.clone()).map_err(|e| e.to_string())
            }
        };
        match typed {
            Ok(doc) => {
                let before = errors.len();
                validate_document(&doc, &mut |f, m| errors.push(err(f, m)));
                if errors.len() == before {
                    let key = DiskKey::new(doc.metadata.namespace.as_deref(), &doc.metadata.name);
                    let origin = Origin::File {
                        file: file.to_path_buf(),
                        document,
                    };
                    match DesiredDisk::new(key, origin, doc) {
                        Ok(d) => specs.push(d),
                        Err(e) => errors.push(err(e.field, e.message)),
                    }
                }
            }
            Err(message) => {
                let field = field_of_serde_message(&value, &message);
                errors.push(err(&field, message));
            }
        }
    }
    if errors.is_empty() {
        Ok(specs)
    } else {
        Err(SpecErrors(errors))
    }
}

/// Splits YAML text into documents on `---` lines, matching serde-saphyr's document numbering
/// for the ordinary layouts spec files use (documents that are entirely empty are kept as empty
/// strings so the indexes line up with `from_str_multiple`'s nulls).
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    let mut first = true;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            let chunk = &text[start..offset];
            if !(first && chunk.trim().is_empty()) {
                docs.push(chunk);
            }
            first = false;
            start = offset + line.len();
        }
        offset += line.len();
    }
    let last = &text[start..];
    if !last.trim().is_empty() || docs.is_empty() {
        docs.push(last);
    }
    docs
}

/// serde's messages name the offending key but not its path: find the path in the parsed value.
fn field_of_serde_message(value: &serde_json::Value, message: &str) -> String {
    let key = message
        .split('`')
        .nth(1)
        .filter(|_| message.contains("unknown field") || message.contains("missing field"));
    let Some(key) = key else {
        return "-".into();
    };
    if message.contains("missing field") {
        return format!("(missing) {key}");
    }
    find_key(value, key, "").unwrap_or_else(|| key.to_string())
}

fn find_key(value: &serde_json::Value, key: &str, prefix: &str) -> Option<String> {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if k == key {
                    return Some(path);
                }
                if let Some(p) = find_key(v, key, &path) {
                    return Some(p);
                }
            }
            None
        }
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_key(v, key, &format!("{prefix}[{i}]"))),
        _ => None,
    }
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Checks one document on its own: fixed values, names, paths, exactly one source.
fn validate_document(doc: &SpecDocument, push: &mut dyn FnMut(&str, String)) {
    if doc.api_version != API_VERSION {
        push(
            "apiVersion",
            format!(
                "is {:?}; the only version allowed is {API_VERSION:?}",
                doc.api_version
            ),
        );
    }
    if doc.kind != KIND {
        push(
            "kind",
            format!("is {:?}; only {KIND:?} is allowed", doc.kind),
        );
    }
    if let Err(m) = crate::key::check_name(&doc.metadata.name) {
        push("metadata.name", m);
    }
    if let Some(ns) = &doc.metadata.namespace
        && let Err(m) = crate::key::check_namespace(ns)
    {
        push("metadata.namespace", m);
    }
    let spec = &doc.spec;
    if let Some(n) = &spec.node_name
        && let Err(m) = crate::key::check_name(n)
    {
        push("spec.nodeName", m);
    }
    match (&spec.source.file, &spec.source.libvirt) {
        (Some(_), Some(_)) => push(
            "spec.source",
            "sets both file and libvirt; set exactly one".into(),
        ),
        (None, None) => push(
            "spec.source",
            "sets neither file nor libvirt; set exactly one".into(),
        ),
        (Some(f), None) => {
            if let Err(m) = check_abs_path(f) {
                push("spec.source.file", m);
            }
        }
        (None, Some(l)) => {
            if spec.source.format.is_some() {
                push(
                    "spec.source.format",
                    "applies to spec.source.file only; a libvirt disk's format is its <driver type=...> in the domain".into(),
                );
            }
            if l.domain.trim().is_empty() {
                push(
                    "spec.source.libvirt.domain",
                    "is empty; name the libvirt domain".into(),
                );
            }
            if l.target.trim().is_empty() {
                push(
                    "spec.source.libvirt.target",
                    "is empty; name the disk target, e.g. vda".into(),
                );
            }
            if let Err(e) = humantime::parse_duration(&l.converge.within) {
                push(
                    "spec.source.libvirt.converge.within",
                    format!(
                        "{:?} is not a duration ({e}); write e.g. 30s, 10m or 1h",
                        l.converge.within
                    ),
                );
            }
            if l.converge.throttle_bytes_per_sec == 0 {
                push(
                    "spec.source.libvirt.converge.throttleBytesPerSec",
                    "is 0; give a guest write limit in bytes per second".into(),
                );
            }
        }
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut files: BTreeMap<PathBuf, usize> = BTreeMap::new();
    for (i, snap) in spec.snapshots.iter().enumerate() {
        if let Err(m) = check_point_name(&snap.name) {
            push(&format!("spec.snapshots[{i}].name"), m);
        }
        if let Some(j) = names.insert(&snap.name, i) {
            push(
                &format!("spec.snapshots[{i}].name"),
                format!(
                    "{:?} is already used by spec.snapshots[{j}]; each point needs its own name",
                    snap.name
                ),
            );
        }
        if let Some(f) = &snap.file {
            if let Err(m) = check_abs_path(f) {
                push(&format!("spec.snapshots[{i}].file"), m);
                continue;
            }
            let norm = normalize(f);
            if spec.source.file.as_deref().map(normalize).as_ref() == Some(&norm) {
                push(
                    &format!("spec.snapshots[{i}].file"),
                    "is the active image (spec.source.file); a point in time must be a backing layer below it".into(),
                );
            }
            if let Some(j) = files.insert(norm, i) {
                push(
                    &format!("spec.snapshots[{i}].file"),
                    format!(
                        "{} is already bound to spec.snapshots[{j}]; one file holds one point",
                        f.display()
                    ),
                );
            }
        }
    }
    if let Some(b) = &spec.backup {
        if let Err(m) = check_abs_path(&b.repository) {
            push("spec.backup.repository", m);
        } else {
            let repo = normalize(&b.repository);
            let beside_images = spec
                .source
                .file
                .as_deref()
                .and_then(Path::parent)
                .map(normalize)
                .into_iter()
                .chain(spec.placement.as_ref().map(|p| normalize(&p.directory)));
            for d in beside_images {
                if d == repo {
                    push(
                        "spec.backup.repository",
                        format!(
                            "{} is a directory the disk's own images live in; give the backups a directory of their own",
                            b.repository.display()
                        ),
                    );
                    break;
                }
            }
        }
        if let Some(c) = &b.schedule
            && let Err(m) = check_cron(c)
        {
            push("spec.backup.schedule", m);
        }
        if let Some(v) = &b.verify
            && let Err(m) = check_cron(&v.schedule)
        {
            push("spec.backup.verify.schedule", m);
        }
    }
    if let Some(r) = &spec.revert {
        if r.id.trim().is_empty() {
            push(
                "spec.revert.id",
                "is empty; give each revert its own id (a new id asks for a new revert)".into(),
            );
        }
        if let Err(e) = humantime::parse_duration(&r.shutdown_timeout) {
            push(
                "spec.revert.shutdownTimeout",
                format!(
                    "{:?} is not a duration ({e}); write e.g. 0s, 30s or 2m",
                    r.shutdown_timeout
                ),
            );
        }
        if !spec.snapshots.iter().any(|s| s.name == r.to) {
            push(
                "spec.revert.to",
                format!(
                    "{:?} is not a point in spec.snapshots; name one of: {}",
                    r.to,
                    spec.snapshots
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
    if let Some(p) = &spec.placement
        && let Err(m) = check_abs_path(&p.directory)
    {
        push("spec.placement.directory", m);
    }
}

/// Checks across specs: keys (namespace and name) unique, and no disk claimed twice. Returns
/// the errors and every document involved in one (both sides).
fn check_disjoint(specs: &[DesiredDisk]) -> (Vec<SpecError>, BTreeSet<(PathBuf, usize)>) {
    let mut errors = Vec::new();
    let mut involved = BTreeSet::new();
    let mut keys: BTreeMap<&DiskKey, &DesiredDisk> = BTreeMap::new();
    let mut disks: BTreeMap<String, &DesiredDisk> = BTreeMap::new();
    let mut repositories: BTreeMap<PathBuf, &DesiredDisk> = BTreeMap::new();
    for s in specs {
        if let Some(other) = keys.insert(&s.key, s) {
            let (file, document) = s.file_document().unwrap_or((Path::new("-"), 0));
            errors.push(SpecError {
                file: file.to_path_buf(),
                document,
                field: "metadata.name".into(),
                message: format!(
                    "{:?} in namespace {:?} is also the name of the spec in {}; disk names must be unique within a namespace",
                    s.key.name,
                    s.key.namespace,
                    other.origin()
                ),
            });
            involved.extend(s.file_document().map(|(f, d)| (f.to_path_buf(), d)));
            involved.extend(other.file_document().map(|(f, d)| (f.to_path_buf(), d)));
        }
        let disk = match (&s.spec().source.file, &s.spec().source.libvirt) {
            (Some(f), _) => format!("file:{}", normalize(f).display()),
            (None, Some(l)) => format!("libvirt:{}/{}/{}", l.uri, l.domain, l.target),
            (None, None) => continue,
        };
        if let Some(other) = disks.insert(disk, s) {
            let (file, document) = s.file_document().unwrap_or((Path::new("-"), 0));
            errors.push(SpecError {
                file: file.to_path_buf(),
                document,
                field: "spec.source".into(),
                message: format!(
                    "claims the same disk as {:?} in {}; one disk is managed by one spec",
                    other.key.to_string(),
                    other.origin()
                ),
            });
            involved.extend(s.file_document().map(|(f, d)| (f.to_path_buf(), d)));
            involved.extend(other.file_document().map(|(f, d)| (f.to_path_buf(), d)));
        }
        if let Some(b) = &s.spec().backup
            && let Some(other) = repositories.insert(normalize(&b.repository), s)
        {
            let (file, document) = s.file_document().unwrap_or((Path::new("-"), 0));
            errors.push(SpecError {
                file: file.to_path_buf(),
                document,
                field: "spec.backup.repository".into(),
                message: format!(
                    "{} is also the repository of disk {:?} in {}; each disk backs up into a directory of its own",
                    b.repository.display(),
                    other.key.to_string(),
                    other.origin()
                ),
            });
            involved.extend(s.file_document().map(|(f, d)| (f.to_path_buf(), d)));
            involved.extend(other.file_document().map(|(f, d)| (f.to_path_buf(), d)));
        }
    }
    (errors, involved)
}

/// Lexical normalisation (`.` and `..` removed); symlinks are the observer's business.
pub(crate) fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A 5-field cron expression (minute hour day-of-month month day-of-week), as croner reads it.
pub fn parse_cron(text: &str) -> Result<croner::Cron, String> {
    if text.split_whitespace().count() != 5 {
        return Err(format!(
            "{text:?} is not a 5-field cron expression (minute hour day-of-month month day-of-week), e.g. \"0 2 * * *\""
        ));
    }
    text.parse::<croner::Cron>().map_err(|e| {
        format!("{text:?} is not a cron expression ({e}); write 5 fields, e.g. \"0 2 * * *\"")
    })
}

fn check_cron(text: &str) -> Result<(), String> {
    parse_cron(text).map(|_| ())
}

fn check_abs_path(p: &Path) -> Result<(), String> {
    if p.as_os_str().is_empty() {
        return Err("is empty; give an absolute path".into());
    }
    if !p.is_absolute() {
        return Err(format!(
            "{:?} is relative; only absolute paths are allowed",
            p.display().to_string()
        ));
    }
    Ok(())
}

fn check_point_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not allowed; a point name is 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Vec<DesiredDisk>, SpecErrors> {
        load_str(Path::new("/specs/web.yaml"), text)
    }

    const GOOD: &str = "apiVersion: diskchain.dev/v1alpha1
kind: DiskChain
metadata:
  name: web01-vda
spec:
  source:
    file: /var/lib/images/web01.qcow2
  snapshots:
    - name: golden
      file: /var/lib/images/golden.qcow2
    - name: before-upgrade
  placement:
    directory: /srv/fast
  prune: false
";

    #[test]
    fn a_good_spec_loads_with_its_fields() {
        let specs = load(GOOD).unwrap();
        assert_eq!(specs.len(), 1);
        let s = specs[0].spec();
        assert_eq!(specs[0].key, DiskKey::new(None, "web01-vda"));
        assert_eq!(s.snapshots.len(), 2);
        assert_eq!(s.snapshots[1].file, None);
        assert_eq!(
            s.placement.as_ref().unwrap().directory,
            Path::new("/srv/fast")
        );
    }

    #[test]
    fn multi_document_files_load_every_document() {
        let two = format!("{GOOD}---\n{}", GOOD.replace("web01", "web02"));
        let specs = load(&two).unwrap();
        assert_eq!(
            specs
                .iter()
                .map(|s| s.file_document().map(|(_, d)| d))
                .collect::<Vec<_>>(),
            vec![Some(1), Some(2)]
        );
    }

    #[test]
    fn an_unknown_field_is_named_with_its_path() {
        let bad = GOOD.replace("  prune: false", "  prune: false\n  retain: 3");
        let e = load(&bad).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].field, "spec.retain");
        assert!(
            e.0[0].message.contains("unknown field"),
            "{}",
            e.0[0].message
        );
        assert!(
            e.to_string()
                .starts_with("/specs/web.yaml (document 1): spec.retain:"),
            "{e}"
        );
    }

    #[test]
    fn malformed_yaml_is_refused_naming_the_file() {
        let e = load("apiVersion: [unclosed\n").unwrap_err();
        assert!(e.to_string().contains("/specs/web.yaml"), "{e}");
        assert!(e.to_string().contains("malformed YAML"), "{e}");
    }

    #[test]
    fn a_name_used_twice_is_refused() {
        let bad = GOOD.replace("name: before-upgrade", "name: golden");
        let e = load(&bad).unwrap_err();
        assert_eq!(e.0[0].field, "spec.snapshots[1].name");
        assert!(e.0[0].message.contains("already used"));
    }

    #[test]
    fn one_file_bound_to_two_points_is_refused() {
        let bad = GOOD.replace(
            "    - name: before-upgrade",
            "    - name: other\n      file: /var/lib/images/../images/golden.qcow2",
        );
        let e = load(&bad).unwrap_err();
        assert_eq!(e.0[0].field, "spec.snapshots[1].file");
    }

    #[test]
    fn source_must_set_exactly_one_kind() {
        let both = GOOD.replace(
            "    file: /var/lib/images/web01.qcow2",
            "    file: /var/lib/images/web01.qcow2\n    libvirt: { domain: web01, target: vda }",
        );
        assert_eq!(load(&both).unwrap_err().0[0].field, "spec.source");
    }

    #[test]
    fn relative_paths_and_wrong_versions_are_all_reported() {
        let bad = GOOD
            .replace("diskchain.dev/v1alpha1", "diskchain.dev/v9")
            .replace("file: /var/lib/images/web01.qcow2", "file: web01.qcow2");
        let fields: Vec<_> = load(&bad)
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, vec!["apiVersion", "spec.source.file"]);
    }

    #[test]
    fn two_specs_claiming_one_disk_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("b.yml"), GOOD.replace("web01-vda", "other")).unwrap();
        let e = load_path(dir.path()).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert!(e.0[0].message.contains("claims the same disk"), "{e}");
    }

    fn in_namespace(ns: &str, file: &str) -> String {
        GOOD.replace(
            "  name: web01-vda",
            &format!("  name: web01-vda\n  namespace: {ns}"),
        )
        .replace("/var/lib/images/web01.qcow2", file)
    }

    #[test]
    fn one_name_in_two_namespaces_is_two_disks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            in_namespace("team-a", "/i/a.qcow2"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            in_namespace("team-b", "/i/b.qcow2"),
        )
        .unwrap();
        let specs = load_path(dir.path()).unwrap();
        let keys: Vec<String> = specs.iter().map(|s| s.key.to_string()).collect();
        assert_eq!(keys, vec!["team-a/web01-vda", "team-b/web01-vda"]);
    }

    #[test]
    fn one_name_twice_in_a_namespace_is_refused_and_the_agent_leaves_both_out() {
        let dir = tempfile::tempdir().unwrap();
        // `default` written out and implied are one namespace.
        std::fs::write(
            dir.path().join("a.yaml"),
            in_namespace("default", "/i/a.qcow2"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            GOOD.replace("web01.qcow2", "b.qcow2"),
        )
        .unwrap();
        std::fs::write(dir.path().join("c.yaml"), GOOD.replace("web01", "web03")).unwrap();
        let e = load_path(dir.path()).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].field, "metadata.name");
        assert!(e.0[0].message.contains("unique within a namespace"), "{e}");
        let (specs, errors) = load_path_lenient(dir.path());
        assert_eq!(errors.len(), 1);
        let names: Vec<String> = specs.iter().map(|s| s.key.to_string()).collect();
        assert_eq!(names, vec!["web03-vda"]);
    }

    #[test]
    fn a_bad_namespace_is_named() {
        let e = load(&in_namespace("Team_A", "/i/a.qcow2")).unwrap_err();
        assert_eq!(e.0[0].field, "metadata.namespace");
        assert!(e.0[0].message.contains("\"Team_A\" is not allowed"), "{e}");
    }

    fn object(spec_yaml: &str) -> crate::DiskChain {
        let doc: SpecDocument = serde_saphyr::from_str(spec_yaml).unwrap();
        let mut obj = crate::DiskChain::new(&doc.metadata.name, doc.spec);
        obj.metadata.namespace = Some("team-a".into());
        obj.metadata.uid = Some("0b7e-uid".into());
        obj.metadata.generation = Some(7);
        obj
    }

    #[test]
    fn a_kubernetes_object_becomes_the_same_desired_disk_as_its_file() {
        let d = DesiredDisk::from_object(&object(GOOD)).unwrap();
        assert_eq!(d.key, DiskKey::new(Some("team-a"), "web01-vda"));
        assert_eq!(
            d.origin,
            Origin::Object {
                uid: "0b7e-uid".into(),
                generation: 7
            }
        );
        assert_eq!(d.origin(), "DiskChain team-a/web01-vda");
        assert_eq!(d.file_document(), None);
        assert_eq!(d.spec(), load(GOOD).unwrap()[0].spec());
    }

    #[test]
    fn a_bad_kubernetes_object_is_refused_naming_the_object_and_field() {
        let bad = GOOD.replace("file: /var/lib/images/web01.qcow2", "file: web01.qcow2");
        let e = DesiredDisk::from_object(&object(&bad)).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert!(
            e.to_string()
                .starts_with("DiskChain team-a/web01-vda: spec.source.file:"),
            "{e}"
        );
    }

    #[test]
    fn a_shared_golden_file_may_be_bound_in_several_specs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(
            dir.path().join("sub/b.yaml"),
            GOOD.replace("web01", "web02"),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join(".git")).unwrap();
        std::fs::write(dir.path().join(".git/junk.yaml"), "not: [a spec").unwrap();
        assert_eq!(load_path(dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn the_crd_is_generated_from_the_types() {
        let crd = crate::crd_yaml();
        assert!(crd.contains("diskchain.dev"));
        assert!(crd.contains("placement"));
    }

    #[test]
    fn a_bad_node_name_is_refused_naming_the_field() {
        let y = "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: vda\nspec:\n  nodeName: Kvm_01\n  source:\n    file: /img/top.qcow2\n";
        let e = load_str(Path::new("/specs/vda.yaml"), y).unwrap_err();
        assert_eq!(e.0[0].field, "spec.nodeName", "{e}");
        let ok = y.replace("Kvm_01", "kvm01.example");
        let d = load_str(Path::new("/specs/vda.yaml"), &ok).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d[0].spec().node_name.as_deref(), Some("kvm01.example"));
    }

    /// `diskchain crd` is a `CustomResourceDefinition` Kubernetes reads: the status
    /// subresource, the printer columns `kubectl get dc` shows, `spec.nodeName` selectable (each
    /// node's agent picks its resources with a field selector), and the rule that spans fields
    /// (exactly one source) as CEL.
    #[test]
    fn the_crd_parses_with_status_columns_selectable_node_and_cel() {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&crate::crd_yaml()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(crd.spec.names.short_names, Some(vec!["dc".to_string()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let columns: Vec<&str> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Node", "Points", "Ready", "Planned", "Last backup", "Age"]
        );
        let selectable: Vec<&str> = v
            .selectable_fields
            .iter()
            .flatten()
            .map(|f| f.json_path.as_str())
            .collect();
        assert_eq!(selectable, [".spec.nodeName"]);
        let schema = serde_json::to_value(&v.schema).unwrap();
        let source = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["source"];
        assert_eq!(
            source["x-kubernetes-validations"][0]["rule"], "has(self.file) != has(self.libvirt)",
            "{source}"
        );
        let status = &schema["openAPIV3Schema"]["properties"]["status"]["properties"];
        for field in [
            "observedGeneration",
            "conditions",
            "chain",
            "lastPlan",
            "backups",
        ] {
            assert!(status.get(field).is_some(), "status.{field}: {status}");
        }
    }
}

#[cfg(test)]
mod examples {
    #[test]
    fn the_example_specs_in_the_repository_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
        let specs = super::load_path(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert!(specs.len() >= 2, "examples: {}", specs.len());
    }

    #[test]
    fn a_desired_disk_carries_its_durations_parsed() {
        let y = "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: vda\nspec:\n  source:\n    libvirt:\n      domain: web\n      target: vda\n      converge:\n        within: 90s\n  snapshots:\n    - name: a\n  revert:\n    to: a\n    id: r1\n    shutdownTimeout: 2m\n";
        let d = super::load_str(std::path::Path::new("/specs/vda.yaml"), y)
            .unwrap_or_else(|e| panic!("{e}"))
            .remove(0);
        let live = d.live.expect("a libvirt source crosses the boundary");
        assert_eq!(live.converge.within, std::time::Duration::from_secs(90));
        assert_eq!(live.domain, "web");
        let r = d.revert.expect("a revert crosses the boundary");
        assert_eq!(r.shutdown_timeout, std::time::Duration::from_secs(120));
        assert_eq!(r.to, "a");
        // A file disk has no live target.
        let y = "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: vdb\nspec:\n  source:\n    file: /img/top.qcow2\n  snapshots: []\n";
        let d = super::load_str(std::path::Path::new("/specs/vdb.yaml"), y)
            .unwrap_or_else(|e| panic!("{e}"))
            .remove(0);
        assert!(d.live.is_none() && d.revert.is_none());
    }
}
