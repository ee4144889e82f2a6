//! The `DiskChain` spec: the types an operator writes (in git or with `kubectl apply`), their JSON
//! schema and CRD, and loading them from YAML files with errors that name the file, the field and
//! what is allowed.
//!
//! This crate parses and validates; it does no other I/O (reading the spec files themselves is the
//! only file access) and knows nothing of images or plans.
//!
//! ```text
//!  specs/web01.yaml ──load_path──▶ [DesiredDisk { key, origin, doc: SpecDocument }]
//!  DiskChain object ──DesiredDisk::from_object──▶ the same, validated alike
//!                                     │ per spec: names unique, files unique, source exactly one
//!                                     └ across specs: one active image per spec
//! ```
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod desired;
mod key;
mod load;
mod types;

pub use key::{DEFAULT_NAMESPACE, DiskKey};
pub use load::{
    DesiredDisk, Origin, SpecError, SpecErrors, load_path, load_path_lenient, load_str, parse_cron,
};
pub use types::{
    API_VERSION, ApplySummary, BackupSpec, BackupStatus, Condition, Converge, ConvergeAction,
    DiskChain, DiskChainSpec, DiskChainStatus, DiskFormat, KIND, LibvirtSource, Placement,
    PlanSummary, Retention, RevertSpec, SnapshotSpec, Source, SpecDocument, SpecMetadata,
    StatusLayer, VerifySpec,
};

/// The CustomResourceDefinition for `DiskChain`, as YAML, generated from the Rust types.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = DiskChain::crd();
    // serde-saphyr serialises any serde value; the CRD is plain data.
    serde_saphyr::to_string(&crd).expect("a CRD built from derived types always serialises")
}
