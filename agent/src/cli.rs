//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// diskchain: declarative management of QEMU disk backing chains.
///
/// Specs (YAML, `kind: DiskChain`) say which points in time each disk keeps; diskchain observes
/// the real qcow2 chains and plans the cheapest steps (snapshot, stream, commit, copy, mirror,
/// rebase, revert, delete) that make them match: offline disks through qemu-img, the disks of
/// running VMs (spec.source.libvirt) through libvirt's block jobs.
#[derive(Debug, Parser)]
#[command(name = "diskchain", version, about, long_about)]
pub struct Cli {
    /// Where the agent keeps which file holds each named point.
    #[arg(
        long,
        global = true,
        env = "DISKCHAIN_STATE_DIR",
        default_value = "/var/lib/diskchain/state"
    )]
    pub state_dir: PathBuf,
    /// A directory diskchain may read and write images in (repeatable). Every layer and every
    /// backing reference must resolve inside one, symlinks followed.
    #[arg(long = "allowed-root", global = true, value_name = "DIR", default_values = ["/var/lib/diskchain"])]
    pub allowed_roots: Vec<PathBuf>,
    /// A libvirt URI specs may name in `spec.source.libvirt.uri` (repeatable; default
    /// qemu:///system). A spec's URI must be exactly one of these: it never chooses a transport,
    /// a host, a program or a parameter. Only local URIs are accepted here (no `ext`, `ssh`,
    /// `tcp`, `tls`; no query parameter but `socket` and `mode`).
    #[arg(long = "allowed-libvirt-uri", global = true, value_name = "URI", default_values = [crate::libvirt::DEFAULT_URI])]
    pub allowed_libvirt_uris: Vec<String>,
    /// Log format on stderr: `text` for people, `json` for log collectors. Verbosity comes from
    /// `DISKCHAIN_LOG` (e.g. `info`, `diskchain=debug`); the agent logs at `info` by default.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table for people.
    Text,
    /// One JSON object: {"disks": [{"name", "steps": [{"op", "bytes", ...}], "total_bytes"}], "errors": [...]}.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Observe, plan and print; changes nothing. Exit 0: planned; 2: bad input (a spec, a chain
    /// or an image in use; nothing touched); 1: other failures.
    Plan {
        /// A spec file, or a directory searched recursively for *.yaml and *.yml.
        #[arg(short = 'f', long = "file", value_name = "PATH")]
        path: PathBuf,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Plan and execute until the real chains match (offline disks through qemu-img, disks of
    /// running VMs through libvirt).
    ///
    /// Steps are journaled in the state directory before they run; an interrupted apply is
    /// resumed by the next one. Exit 0: every disk matches its spec; 2: bad input (those disks
    /// untouched); 1: other failures, such as an image in use by another process.
    Apply {
        /// A spec file, or a directory searched recursively for *.yaml and *.yml.
        #[arg(short = 'f', long = "file", value_name = "PATH")]
        path: PathBuf,
        /// Limit QEMU's copying to this many bytes per second (QEMU's own rate limit; offline it
        /// applies to commits, streams and whole-chain copies, not to a copy onto a new backing
        /// file or a stream over layers of mixed sizes, which go through `qemu-img rebase`;
        /// live, to block commits, pulls and copies).
        #[arg(long, value_name = "BYTES")]
        max_bytes_per_sec: Option<u64>,
    },
    /// Watch a spec directory and keep every disk reconciled to its spec (runs until SIGTERM or
    /// SIGINT, then exits 0).
    ///
    /// Changes to the directory are acted on once it has been quiet for --debounce; every disk is
    /// also re-observed every --resync, so chains changed by hand are corrected (or reported when
    /// that would lose a point). Removing a spec releases its disk; nothing is deleted. A disk
    /// with `spec.backup.schedule` is backed up when the schedule is due (one missed while the
    /// agent was down runs once at start), and verified when `spec.backup.verify.schedule` is.
    Agent {
        /// The spec directory (e.g. a git checkout).
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "kube",
            conflicts_with = "kube"
        )]
        specs: Option<PathBuf>,
        /// Kubernetes mode: reconcile the `DiskChain` resources whose `spec.nodeName` is this
        /// node, through the Kubernetes API (in-cluster config, or the kubeconfig), instead of a
        /// spec directory. Each resource gets a finalizer, its status (conditions, points, last
        /// plan) and events.
        #[arg(long)]
        kube: bool,
        /// With --kube: this node's name.
        #[arg(long, value_name = "NAME", env = "NODE_NAME", requires = "kube")]
        node: Option<String>,
        /// With --kube: assign an allowed root to a namespace (`NAMESPACE=DIR`, repeatable; DIR
        /// one of the --allowed-root directories). A root assigned to namespaces is theirs
        /// alone: other namespaces' DiskChains cannot reach it. A root assigned to none is shared
        /// by every namespace, and there a DiskChain merges away, writes or deletes only the
        /// layers it adopted by naming them, and reverts only to points diskchain took for it.
        #[arg(
            long = "namespace-root",
            value_name = "NAMESPACE=DIR",
            requires = "kube"
        )]
        namespace_roots: Vec<String>,
        /// With --kube: assign libvirt domains to a namespace (`NAMESPACE=PATTERN`, repeatable;
        /// `*` matches any run of characters). Once any is given, a namespace's DiskChains name
        /// only the domains of its patterns.
        #[arg(
            long = "namespace-domain",
            value_name = "NAMESPACE=PATTERN",
            requires = "kube"
        )]
        namespace_domains: Vec<String>,
        /// Re-observe every disk this often (e.g. 30s, 5m).
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        resync: std::time::Duration,
        /// Disks reconciled at the same time.
        #[arg(long, value_name = "N", default_value_t = 2)]
        max_parallel: usize,
        /// Serve /healthz, /readyz and Prometheus /metrics on this address (e.g. 127.0.0.1:9184).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// On shutdown, how long running steps may take to finish before their QEMU processes are
        /// stopped (the journal resumes them on the next start).
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        /// How long the spec directory must be quiet before a change is acted on.
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
        debounce: std::time::Duration,
        /// A pass (reading the specs, observing and planning every disk) that has run longer than
        /// this makes /readyz answer 503 and is logged: something it waits on (libvirtd, a
        /// storage mount) is hung. SIGTERM still ends the agent.
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        stuck_after: std::time::Duration,
        /// Limit QEMU's copying to this many bytes per second (see `apply`).
        #[arg(long, value_name = "BYTES")]
        max_bytes_per_sec: Option<u64>,
    },
    /// Show, per disk, the chain with point names, files and sizes, and the last plan applied.
    Status {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the DiskChain CustomResourceDefinition (YAML).
    Crd,
    /// Back up now every disk with `spec.backup` into its repository, then apply its retention
    /// (the points it drops are merged away with the cheapest commits and streams).
    ///
    /// The first backup of a disk is a full; later ones write only what changed. Offline disks
    /// (`source.file`, or a libvirt disk whose domain is shut off): the disk is compared with
    /// the previous point. Running domains: libvirt's backup API with a checkpoint per backup;
    /// when the previous checkpoint cannot be trusted (QEMU crashed or was restarted since it
    /// was made, an offline backup in between), a resync that writes only what differs. Exit 0: done; 2: bad input (a spec, a
    /// repository outside the allowed roots; nothing touched); 1: other failures.
    Backup {
        /// A spec file, or a directory searched recursively for *.yaml and *.yml.
        #[arg(short = 'f', long = "file", value_name = "PATH")]
        path: PathBuf,
        /// Only this disk: `NAME` or `NAMESPACE/NAME`.
        #[arg(long, value_name = "[NAMESPACE/]NAME")]
        disk: Option<String>,
        /// Output format: text, or one JSON object {"backups": [...], "retention": [...], "errors": [...]}.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Limit the full backup's copying to this many bytes per second (QEMU's rate limit).
        #[arg(long, value_name = "BYTES")]
        max_bytes_per_sec: Option<u64>,
    },
    /// List each disk's backup points, oldest first (reads the manifests; changes nothing).
    Backups {
        /// A spec file, or a directory searched recursively for *.yaml and *.yml.
        #[arg(short = 'f', long = "file", value_name = "PATH")]
        path: PathBuf,
        /// Only this disk: `NAME` or `NAMESPACE/NAME`.
        #[arg(long, value_name = "[NAMESPACE/]NAME")]
        disk: Option<String>,
        /// Output format: a table, or {"disks": [{"name", "repository", "points": [...]}]}.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Write a standalone image of a backup point (no backing file). Never overwrites a file:
    /// an existing --to is refused (exit 2). The image is checked against the point's recorded
    /// SHA-256 before it appears at --to (exit 1 when it differs; nothing is written there).
    Restore {
        /// A spec file, or a directory searched recursively for *.yaml and *.yml.
        #[arg(short = 'f', long = "file", value_name = "PATH")]
        path: PathBuf,
        /// The disk: `NAME` or `NAMESPACE/NAME`.
        #[arg(long, value_name = "[NAMESPACE/]NAME")]
        disk: String,
        /// The point, as `diskchain backups` lists it (e.g. 2026-11-26T03:00:00Z).
        #[arg(long, value_name = "POINT")]
        point: String,
        /// The new image's path.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// The new image's format.
        #[arg(long, value_enum, default_value_t = crate::backup::RestoreFormat::Qcow2)]
        format: crate::backup::RestoreFormat,
    },
    /// Check each disk's backup repository: every point's file is there, passes `qemu-img
    /// check` and is backed by the point before it; with --deep, every point's view is read and
    /// compared with the SHA-256 recorded when it was taken. Exit 1 naming each damaged point.
    Verify {
        /// A spec file, or a directory searched recursively for *.yaml and *.yml.
        #[arg(short = 'f', long = "file", value_name = "PATH")]
        path: PathBuf,
        /// Only this disk: `NAME` or `NAMESPACE/NAME`.
        #[arg(long, value_name = "[NAMESPACE/]NAME")]
        disk: Option<String>,
        /// Also read every point and compare its checksum.
        #[arg(long)]
        deep: bool,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Set aside a disk's unfinished plan that cannot be finished (plan, apply or the agent say
    /// when, and why): the interrupted step is tidied so every view reads as before it, points
    /// that finished steps moved are recorded, and the journal is kept as
    /// `journal/NAMESPACE/NAME.set-aside-TIME.json`. The next plan starts from the chain as it is.
    /// Exit 0: set aside, or nothing to set aside; 1: it failed (nothing was changed); 2: `--disk`
    /// is not a valid NAME or NAMESPACE/NAME (nothing was touched).
    SetAside {
        /// The disk: `metadata.name`, or `NAMESPACE/NAME` for a spec with a
        /// `metadata.namespace` other than `default`.
        #[arg(long, value_name = "[NAMESPACE/]NAME")]
        disk: String,
    },
}
