//! Prometheus metrics of the agent (prometheus-client, OpenMetrics text on `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A disk and how a reconcile of it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// The disk.
    pub disk: String,
    /// `ok`, `in_sync`, `bad_input`, `in_use`, `failed` or `stopped`.
    pub result: String,
}

/// An operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// `snapshot`, `stream`, `commit`, `copy`, `rebase` or `delete`.
    pub op: String,
}

/// A disk.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiskLabels {
    /// The disk.
    pub disk: String,
}

fn step_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Reconciles by disk and result.
    pub reconciles: Family<ResultLabels, Counter>,
    /// Bytes QEMU wrote, by operation.
    pub bytes_written: Family<OpLabels, Counter>,
    /// Data bytes the current plan of a disk would write.
    pub plan_bytes: Family<DiskLabels, Gauge>,
    /// Layers in a disk's chain as last observed.
    pub chain_length: Family<DiskLabels, Gauge>,
    /// 1 when a disk's chain differs from its spec as last observed.
    pub drift: Family<DiskLabels, Gauge>,
    /// Step durations, by operation.
    pub step_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
    /// Spec documents that do not load.
    pub spec_errors: Gauge,
    /// Scheduled backups and verifies, by disk and result (`full`, `incremental`,
    /// `backup_failed`, `verify_failed`, `verify_damaged`).
    pub backups: Family<ResultLabels, Counter>,
    /// Bytes scheduled backups wrote to a disk's repository.
    pub backup_bytes: Family<DiskLabels, Counter>,
    /// When a disk's last scheduled backup succeeded (Unix seconds).
    pub backup_last_success: Family<DiskLabels, Gauge>,
    /// Points in a disk's backup repository.
    pub backup_points: Family<DiskLabels, Gauge>,
    /// When a disk's next scheduled backup is due (Unix seconds; 0: no schedule).
    pub backup_next: Family<DiskLabels, Gauge>,
    /// Kubernetes mode: `DiskChain` resources without `spec.nodeName` (no agent acts on them).
    pub unassigned: Gauge,
    /// Kubernetes mode: this node's `DiskChain` resources in the controller's watch cache.
    pub watched: Gauge,
    /// Kubernetes mode: errors of the watch on this node's resources (each is retried).
    pub watch_errors: Counter,
    /// Kubernetes mode: reconcile durations (the steps and backups they ran included).
    pub reconcile_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("diskchain");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let bytes_written = Family::<OpLabels, Counter>::default();
        let plan_bytes = Family::<DiskLabels, Gauge>::default();
        let chain_length = Family::<DiskLabels, Gauge>::default();
        let drift = Family::<DiskLabels, Gauge>::default();
        let step_seconds =
            Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(step_histogram);
        let spec_errors = Gauge::default();
        let backups = Family::<ResultLabels, Counter>::default();
        let backup_bytes = Family::<DiskLabels, Counter>::default();
        let backup_last_success = Family::<DiskLabels, Gauge>::default();
        let backup_points = Family::<DiskLabels, Gauge>::default();
        let backup_next = Family::<DiskLabels, Gauge>::default();
        let unassigned = Gauge::default();
        let watched = Gauge::default();
        let watch_errors = Counter::default();
        let reconcile_seconds = step_histogram();
        registry.register(
            "watched_resources",
            "Kubernetes mode: this node's DiskChain resources in the controller's watch cache",
            watched.clone(),
        );
        registry.register(
            "watch_errors",
            "Kubernetes mode: errors of the watch on this node's DiskChain resources",
            watch_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Kubernetes mode: duration of a resource's reconcile, steps and backups included",
            reconcile_seconds.clone(),
        );
        registry.register(
            "resources_without_node",
            "Kubernetes mode: DiskChain resources without spec.nodeName, which no agent acts on",
            unassigned.clone(),
        );
        registry.register(
            "backups",
            "Scheduled backups and verifies of a disk, by result",
            backups.clone(),
        );
        registry.register(
            "backup_written_bytes",
            "Bytes scheduled backups wrote to a disk's repository",
            backup_bytes.clone(),
        );
        registry.register(
            "backup_last_success_timestamp_seconds",
            "When a disk's last scheduled backup succeeded",
            backup_last_success.clone(),
        );
        registry.register(
            "backup_points",
            "Points in a disk's backup repository",
            backup_points.clone(),
        );
        registry.register(
            "backup_next_timestamp_seconds",
            "When a disk's next scheduled backup is due (0: no schedule)",
            backup_next.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles of a disk, by result",
            reconciles.clone(),
        );
        registry.register(
            "written_bytes",
            "Bytes QEMU wrote for plan steps, by operation",
            bytes_written.clone(),
        );
        registry.register(
            "plan_bytes",
            "Data bytes the current plan of a disk would write",
            plan_bytes.clone(),
        );
        registry.register(
            "chain_length",
            "Layers in a disk's chain, active included",
            chain_length.clone(),
        );
        registry.register(
            "drift",
            "1 when a disk's real chain differs from its spec",
            drift.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Duration of plan steps, by operation",
            step_seconds.clone(),
        );
        registry.register(
            "spec_errors",
            "Spec documents that do not load",
            spec_errors.clone(),
        );
        Metrics {
            registry,
            reconciles,
            bytes_written,
            plan_bytes,
            chain_length,
            drift,
            step_seconds,
            spec_errors,
            backups,
            backup_bytes,
            backup_last_success,
            backup_points,
            backup_next,
            unassigned,
            watched,
            watch_errors,
            reconcile_seconds,
        }
    }

    /// Removes every series of disk `disk` (a resource deleted or moved to another node): no
    /// stale drift or due backup stays on a dashboard, and series do not grow with churn.
    pub fn forget_disk(&self, disk: &str) {
        let d = DiskLabels {
            disk: disk.to_string(),
        };
        for f in [
            &self.plan_bytes,
            &self.chain_length,
            &self.drift,
            &self.backup_last_success,
            &self.backup_points,
            &self.backup_next,
        ] {
            f.remove(&d);
        }
        self.backup_bytes.remove(&d);
        // Every result either family is labelled with.
        for result in [
            "ok",
            "failed",
            "in_sync",
            "bad_input",
            "in_use",
            "stopped",
            "needs_operator",
            "suspended",
            "running",
            "full",
            "incremental",
            "resync",
            "backup_failed",
            "verify_failed",
            "verify_damaged",
            "verified",
        ] {
            let r = ResultLabels {
                disk: disk.to_string(),
                result: result.to_string(),
            };
            self.reconciles.remove(&r);
            self.backups.remove(&r);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
