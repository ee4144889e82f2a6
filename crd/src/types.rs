//! The spec types. Field names are fixed: tools and people write them (see DESIGN.md).

use std::path::PathBuf;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `apiVersion` every spec document carries.
pub const API_VERSION: &str = "diskchain.dev/v1alpha1";
/// The `kind` every spec document carries.
pub const KIND: &str = "DiskChain";

/// The chain an operator wants for one disk.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "diskchain.dev",
    version = "v1alpha1",
    kind = "DiskChain",
    namespaced,
    status = "DiskChainStatus",
    shortname = "dc",
    derive = "PartialEq",
    selectable = ".spec.nodeName",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Points","type":"integer","jsonPath":".status.points"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Planned","type":"integer","description":"data bytes the last plan writes","jsonPath":".status.lastPlan.totalBytes"}"#,
    printcolumn = r#"{"name":"Last backup","type":"string","jsonPath":".status.backups.last"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskChainSpec {
    /// Kubernetes mode: the node whose agent manages this disk (a field selector picks each
    /// node's resources; a resource without it is left alone). File mode ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Where the disk is: exactly one of `file` (an offline disk) or `libvirt` (a live one).
    pub source: Source,
    /// The points in time to keep, oldest first. A point of the real chain that is not listed
    /// (the base included) is merged away. An unbound name after the last bound one asks for a
    /// new snapshot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotSpec>,
    /// Where the layers of this disk must live (storage migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Delete files that no chain uses any more (only inside the allowed roots).
    #[serde(default)]
    pub prune: bool,
    /// Stop reconciling this disk.
    #[serde(default)]
    pub suspend: bool,
    /// Revert the disk to a point: a fresh empty active layer on it; the layers above it leave
    /// the chain and the old active content is kept as a file until pruned. One-shot: a new `id`
    /// asks for a new revert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<RevertSpec>,
    /// Scheduled, policy-driven backups of this disk into a qcow2 repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
}

/// A disk's backup policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupSpec {
    /// The disk's backup repository: a directory inside an allowed root, of this disk alone. It
    /// holds a qcow2 chain (the full at the bottom, each later backup backed by the one before)
    /// and `manifest.json`.
    pub repository: PathBuf,
    /// When the agent takes a backup: cron, 5 fields, local time. Without it, only `diskchain
    /// backup` takes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Which backups to keep (Proxmox Backup Server's semantics); the newest is always kept.
    /// Without any option every backup is kept.
    #[serde(default)]
    pub retention: Retention,
    /// When the agent re-reads every kept point and compares its checksum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,
}

/// Which backups to keep: options applied in this order, newest first, each keeping the newest
/// backup of each period (local time; ISO weeks) not already kept, up to N periods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retention {
    /// The N newest backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// The newest backup of each of the last N hours that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// The newest backup of each of the last N days that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// The newest backup of each of the last N ISO weeks that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// The newest backup of each of the last N months that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    /// The newest backup of each of the last N years that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
}

/// When to verify a repository.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifySpec {
    /// Cron, 5 fields, local time.
    pub schedule: String,
}

/// A revert request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevertSpec {
    /// The point to revert to: a name in `snapshots`.
    pub to: String,
    /// Identifies this revert; the agent records it, and reverts again only for a new id.
    pub id: String,
    /// A running libvirt domain sees the reverted disk only after a restart: with `true`
    /// diskchain shuts it down, reverts, and starts it again. Without it a running domain is
    /// refused.
    #[serde(default)]
    pub restart: bool,
    /// With `restart`: how long the guest gets to shut down cleanly (ACPI) before it is powered
    /// off, e.g. `2m`; `0s` powers it off at once. A clean shutdown leaves the discarded
    /// content (kept until pruned) consistent.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: String,
}

fn default_shutdown_timeout() -> String {
    "2m".to_string()
}

/// Where a disk is. Exactly one field is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.file) != has(self.libvirt)",
    "message": "set exactly one of file and libvirt"
}]))]
pub struct Source {
    /// The active image of an offline disk. This path stays stable: the active layer is never
    /// moved or renamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// A disk of a libvirt domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<LibvirtSource>,
    /// The format of `file`, as declared by the operator (`qcow2` when not given): diskchain
    /// never guesses a format from a file's content, which a guest controls. A `raw` disk has
    /// no backing chain and is refused for chain steps. A libvirt disk's format is its
    /// `<driver type=...>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
}

/// A disk image format.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// qcow2: the format of every layer diskchain writes.
    #[default]
    Qcow2,
    /// raw: plain guest data, no backing chain.
    Raw,
}

/// A disk of a libvirt domain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LibvirtSource {
    /// The libvirt connection URI, e.g. `qemu:///system`.
    #[serde(default = "default_libvirt_uri")]
    pub uri: String,
    /// The domain name.
    pub domain: String,
    /// The disk's target device, e.g. `vda`.
    pub target: String,
    /// Freeze the guest's file systems for a snapshot (needs the QEMU guest agent in the guest).
    #[serde(default)]
    pub quiesce: bool,
    /// What an active commit or mirror does when it cannot catch up with the guest's writes.
    #[serde(default)]
    pub converge: Converge,
}

/// The time budget of a live job that must catch up with the guest's writes (an active commit
/// or a mirror), and what happens when it runs out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Converge {
    /// How long the job may take to become ready to pivot, e.g. `10m`.
    #[serde(default = "default_converge_within")]
    pub within: String,
    /// What then: `wait` (keep waiting), `throttle` (limit the guest's writes on this disk to
    /// `throttleBytesPerSec` until the pivot, then lift the limit), or `abort` (cancel the job;
    /// the chain stays as it was and the disk is reported failed).
    #[serde(default)]
    pub then: ConvergeAction,
    /// The guest write limit while throttled, in bytes per second.
    #[serde(default = "default_throttle")]
    pub throttle_bytes_per_sec: u64,
}

impl Default for Converge {
    fn default() -> Self {
        Converge {
            within: default_converge_within(),
            then: ConvergeAction::default(),
            throttle_bytes_per_sec: default_throttle(),
        }
    }
}

fn default_converge_within() -> String {
    "10m".to_string()
}

fn default_throttle() -> u64 {
    10 * 1024 * 1024
}

/// What a live job does when its time budget runs out.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ConvergeAction {
    /// Keep waiting.
    Wait,
    /// Limit the guest's writes until the job catches up.
    Throttle,
    /// Cancel the job cleanly.
    #[default]
    Abort,
}

fn default_libvirt_uri() -> String {
    "qemu:///system".to_string()
}

/// One point in time to keep.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSpec {
    /// The point's name; its identity (a commit can move a point into another file).
    pub name: String,
    /// Binds the name to an existing layer of the chain (adopting a chain diskchain did not make).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

/// Where the layers of a disk must live.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    /// Every backing layer (point in time) of this disk must live in this directory. The active
    /// layer of an offline disk stays at `source.file`.
    pub directory: PathBuf,
}

/// What the agent reports about a disk (Kubernetes mode mirrors the state directory here).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskChainStatus {
    /// The `metadata.generation` the agent last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, with reasons from the reconcile's outcome.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Number of points in time the real chain has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<u32>,
    /// Which file holds each named point now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<SnapshotSpec>,
    /// The chain as last observed, base first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<StatusLayer>,
    /// The plan the last reconcile made (no steps when the chain was in sync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_plan: Option<PlanSummary>,
    /// The last plan that ran steps on the disk, kept while the disk stays in sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_apply: Option<ApplySummary>,
    /// Its backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backups: Option<BackupStatus>,
    /// A short human message about the last reconcile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A condition of a `DiskChain` (the Kubernetes convention).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason (`InSync`, `BadInput`, `InUse`, `Failed`...).
    pub reason: String,
    /// What happened and what to do.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One layer of the chain as the status shows it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusLayer {
    /// The point it holds (none for the active layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    /// The file.
    pub file: PathBuf,
    /// Data it holds itself, in bytes.
    #[serde(default)]
    pub data_bytes: u64,
    /// Names of its persistent dirty bitmaps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<String>,
}

/// A plan, summed up.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanSummary {
    /// Its steps, as operation names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<String>,
    /// Data bytes the steps write.
    #[serde(default)]
    pub total_bytes: u64,
}

/// The last plan that ran steps on a disk.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplySummary {
    /// When it finished (RFC 3339, UTC).
    #[serde(default)]
    pub finished: String,
    /// Its steps, as operation names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<String>,
    /// Data bytes the plan predicted.
    #[serde(default)]
    pub predicted_bytes: u64,
    /// Bytes QEMU wrote (metadata included).
    #[serde(default)]
    pub written_bytes: u64,
}

/// A disk's backups, as the status shows them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// The newest point (its UTC time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
    /// When the next scheduled backup is due (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// Points in the repository.
    #[serde(default)]
    pub points: u32,
}

/// One YAML document of a spec file, as written in git (the same shape `kubectl` takes).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecDocument {
    /// Must be `diskchain.dev/v1alpha1`.
    pub api_version: String,
    /// Must be `DiskChain`.
    pub kind: String,
    /// The disk's name and, in Kubernetes mode, namespace.
    pub metadata: SpecMetadata,
    /// The wanted chain.
    pub spec: DiskChainSpec,
}

/// The part of Kubernetes object metadata a spec file may carry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecMetadata {
    /// The disk's name: unique within its namespace among the specs an agent loads.
    pub name: String,
    /// The namespace (`default` when not given). With the name, it keys the disk's state,
    /// journal and locks, so one name may be used in two namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels (kept, not interpreted).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Annotations (kept, not interpreted).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}
