//! The `diskchain` binary: parse arguments, run the command, map failures to exit codes
//! (0 done, 1 failed, 2 bad input).

use clap::Parser;
use diskchain::apply::{self, ApplyOptions};
use diskchain::cli::{Cli, Command, LogFormat, Output};
use diskchain::execute::ExecOptions;
use diskchain::plan::{PlanRunError, run};
use diskchain::render;
use diskchain::state::StateDir;

/// `println!` that never panics: a closed stdout (a pipe whose reader left) is remembered, not
/// fatal, so an apply carries on with its plan and the exit code tells the truth.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write;
        if writeln!(std::io::stdout().lock(), $($t)*).is_err() {
            STDOUT_FAILED.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }};
}

/// `print!` that never panics (see `out!`).
macro_rules! outp {
    ($($t:tt)*) => {{
        use std::io::Write;
        if write!(std::io::stdout().lock(), $($t)*).is_err() {
            STDOUT_FAILED.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }};
}

/// Set when writing to stdout failed.
static STDOUT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn main() {
    let cli = Cli::parse();
    init_logging(&cli);
    if let Err(e) = diskchain::libvirt::allow_uris(&cli.allowed_libvirt_uris) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let code = match cli.command {
        Command::Crd => {
            outp!("{}", diskchain_crd::crd_yaml());
            0
        }
        Command::Agent {
            kube: true,
            node,
            resync,
            max_parallel,
            max_bytes_per_sec,
            listen,
            grace,
            namespace_roots,
            namespace_domains,
            ..
        } => match node {
            Some(node) => diskchain::kubernetes::run(diskchain::kubernetes::KubeOptions {
                namespace_roots,
                namespace_domains,
                node,
                roots: cli.allowed_roots.clone(),
                state: StateDir::new(&cli.state_dir),
                resync,
                max_parallel,
                exec: ExecOptions { max_bytes_per_sec },
                listen,
                grace,
                // The chart sets both from the downward API.
                lease_namespace: std::env::var("POD_NAMESPACE")
                    .unwrap_or_else(|_| "default".into()),
                identity: std::env::var("POD_NAME").unwrap_or_else(|_| {
                    format!(
                        "{}-{}",
                        std::fs::read_to_string("/proc/sys/kernel/hostname")
                            .map(|h| h.trim().to_string())
                            .unwrap_or_default(),
                        std::process::id()
                    )
                }),
            }),
            None => {
                eprintln!(
                    "error: --kube needs this node's name: --node NAME, or NODE_NAME in the environment (the Helm chart sets it from the downward API)"
                );
                2
            }
        },
        Command::Agent {
            specs,
            resync,
            max_parallel,
            listen,
            grace,
            debounce,
            stuck_after,
            max_bytes_per_sec,
            ..
        } => diskchain::reconcile::run(diskchain::reconcile::AgentOptions {
            // (clap requires --specs without --kube.)
            specs: specs.unwrap_or_default(),
            roots: cli.allowed_roots.clone(),
            state: StateDir::new(&cli.state_dir),
            resync,
            max_parallel,
            listen,
            grace,
            debounce,
            stuck_after,
            exec: ExecOptions { max_bytes_per_sec },
        }),
        Command::Apply {
            path,
            max_bytes_per_sec,
        } => {
            let options = ApplyOptions {
                exec: ExecOptions { max_bytes_per_sec },
                progress: std::sync::Arc::new(diskchain::progress::Terminal::detect()),
                stop: None,
            };
            match apply::run(
                &path,
                &cli.allowed_roots,
                &StateDir::new(&cli.state_dir),
                options,
            ) {
                Ok(report) => {
                    for d in &report.disks {
                        out!(
                            "disk {}: {} step(s), {} predicted, {} written by QEMU",
                            d.key,
                            d.steps.len(),
                            diskchain::units::human_bytes(d.predicted_bytes),
                            diskchain::units::human_bytes(d.written_bytes)
                        );
                    }
                    for r in &report.retention {
                        out!(
                            "disk {}: retention removed {} backup point(s), {} merged",
                            diskchain_crd::DiskKey::new(Some(&r.namespace), &r.disk),
                            r.done.removed.len(),
                            diskchain::units::human_bytes(r.done.total_bytes)
                        );
                    }
                    for e in &report.errors {
                        eprintln!("error: {}", e.error);
                    }
                    if report.errors.is_empty() {
                        out!("every disk matches its spec");
                    }
                    report.exit_code()
                }
                Err(e) => fatal(e),
            }
        }
        Command::Status { output } => {
            let state = StateDir::new(&cli.state_dir);
            match diskchain::status::collect(&state, &cli.allowed_roots) {
                Ok(disks) => {
                    let agent = diskchain::status::agent(&state).map(|(a, _)| a);
                    match output {
                        Output::Json => out!(
                            "{}",
                            serde_json::to_string_pretty(
                                &serde_json::json!({ "agent": agent, "disks": disks })
                            )
                            .expect("status serialises")
                        ),
                        Output::Text => {
                            if let Some(a) = &agent {
                                let how = if a.running { "running" } else { "not running" };
                                out!("agent: pid {} ({how})", a.pid);
                                for e in &a.spec_errors {
                                    out!("  spec not loaded: {e}");
                                }
                            }
                            outp!("{}", diskchain::status::text(&disks));
                        }
                    }
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            }
        }
        Command::Plan { path, output } => {
            match run(&path, &cli.allowed_roots, &StateDir::new(&cli.state_dir)) {
                Ok(report) => {
                    // The retention merges each backup repository's policy asks for now.
                    let retention = match (
                        diskchain_crd::load_path(&path),
                        diskchain::observe::Roots::new(&cli.allowed_roots),
                    ) {
                        (Ok(specs), Ok(roots)) => diskchain::backup::retention_plans(
                            &specs,
                            &diskchain::plan::Host::new(
                                &roots,
                                &StateDir::new(&cli.state_dir),
                                &specs,
                            ),
                        ),
                        _ => Vec::new(),
                    };
                    match output {
                        Output::Json => {
                            let mut v = serde_json::to_value(&report).expect("plans serialise");
                            // A repository's merges are steps of its disk: listed under the
                            // disk's "retention" beside its chain steps and counted in its
                            // total_bytes (and, as before, in a top-level "retention").
                            for r in &retention {
                                let steps =
                                    serde_json::to_value(&r.done.steps).expect("plans serialise");
                                let disk = v["disks"].as_array_mut().and_then(|ds| {
                                    ds.iter_mut().find(|d| {
                                        d["name"] == r.disk.as_str()
                                            && d["namespace"] == r.namespace.as_str()
                                    })
                                });
                                match disk {
                                    Some(d) => {
                                        let total = d["total_bytes"].as_u64().unwrap_or(0);
                                        d["retention"] = steps;
                                        d["total_bytes"] = (total + r.done.total_bytes).into();
                                    }
                                    None => {
                                        if let Some(ds) = v["disks"].as_array_mut() {
                                            ds.push(serde_json::json!({
                                                "name": r.disk,
                                                "namespace": r.namespace,
                                                "steps": [],
                                                "retention": steps,
                                                "total_bytes": r.done.total_bytes,
                                            }));
                                        }
                                    }
                                }
                            }
                            if !retention.is_empty() {
                                v["retention"] =
                                    serde_json::to_value(&retention).expect("plans serialise");
                            }
                            out!(
                                "{}",
                                serde_json::to_string_pretty(&v).expect("plans serialise")
                            )
                        }
                        Output::Text => {
                            outp!("{}", render::text(&report));
                            for r in &retention {
                                out!(
                                    "backups of disk {}: retention removes {} point(s) ({}) with {} step(s), {} merged:",
                                    diskchain_crd::DiskKey::new(Some(&r.namespace), &r.disk),
                                    r.done.removed.len(),
                                    r.done.removed.join(", "),
                                    r.done.steps.len(),
                                    diskchain::units::human_bytes(r.done.total_bytes)
                                );
                                for s in &r.done.steps {
                                    out!(
                                        "  {} {}: {}",
                                        s.op,
                                        diskchain::units::human_bytes(s.bytes),
                                        s.reason
                                    );
                                }
                            }
                        }
                    }
                    for e in &report.errors {
                        eprintln!("error: {}", e.error);
                    }
                    report.exit_code()
                }
                Err(e) => fatal(e),
            }
        }
        Command::Backup {
            path,
            disk,
            output,
            max_bytes_per_sec,
        } => with_disks(
            &cli.allowed_roots,
            &cli.state_dir,
            &path,
            disk.as_deref(),
            |disks, host| {
                let report = diskchain::backup::backup_all(
                    disks,
                    host,
                    ExecOptions { max_bytes_per_sec },
                    &diskchain::progress::Terminal::detect(),
                );
                match output {
                    Output::Json => out!(
                        "{}",
                        serde_json::to_string_pretty(&report).expect("a report serialises")
                    ),
                    Output::Text => {
                        for b in &report.backups {
                            out!(
                                "disk {}: {} backup {} ({} written) in {}{}",
                                diskchain_crd::DiskKey::new(Some(&b.namespace), &b.disk),
                                b.kind.as_str(),
                                b.point,
                                diskchain::units::human_bytes(b.bytes),
                                b.file.display(),
                                b.reason
                                    .as_ref()
                                    .map(|r| format!(": {r}"))
                                    .unwrap_or_default()
                            );
                        }
                        for r in &report.retention {
                            out!(
                                "disk {}: retention removed {} point(s) ({}) with {} step(s), {} merged",
                                diskchain_crd::DiskKey::new(Some(&r.namespace), &r.disk),
                                r.done.removed.len(),
                                r.done.removed.join(", "),
                                r.done.steps.len(),
                                diskchain::units::human_bytes(r.done.total_bytes)
                            );
                        }
                    }
                }
                for e in &report.errors {
                    eprintln!("error: {}", e.error);
                }
                report.exit_code()
            },
        ),
        Command::Backups { path, disk, output } => with_disks(
            &cli.allowed_roots,
            &cli.state_dir,
            &path,
            disk.as_deref(),
            |disks, host| {
                let (listed, errors) = diskchain::backup::list(disks, host);
                match output {
                    Output::Json => out!(
                        "{}",
                        serde_json::to_string_pretty(
                            &serde_json::json!({ "disks": listed, "errors": errors })
                        )
                        .expect("a list serialises")
                    ),
                    Output::Text => {
                        for d in &listed {
                            out!(
                                "disk {} ({} point(s) in {}){}",
                                diskchain_crd::DiskKey::new(Some(&d.namespace), &d.name),
                                d.points.len(),
                                d.repository.display(),
                                if d.merge_in_flight {
                                    "; a retention merge was interrupted: the next backup, verify or restore finishes it"
                                } else {
                                    ""
                                }
                            );
                            for p in &d.points {
                                out!(
                                    "  {}  {:<11}  {:>10}  {}",
                                    p.point,
                                    p.kind.as_str(),
                                    diskchain::units::human_bytes(p.bytes),
                                    p.file.display()
                                );
                            }
                        }
                    }
                }
                for e in &errors {
                    eprintln!("error: {}", e.error);
                }
                if errors.is_empty() { 0 } else { 1 }
            },
        ),
        Command::Restore {
            path,
            disk,
            point,
            to,
            format,
        } => with_disks(
            &cli.allowed_roots,
            &cli.state_dir,
            &path,
            Some(&disk),
            |disks, host| {
                let Some(d) = disks.first() else {
                    return 2;
                };
                match diskchain::backup::restore(d, host, &point, &to, format) {
                    Ok(to) => {
                        out!(
                            "disk {}: point {point} restored to {} (its SHA-256 matches the one recorded)",
                            d.key,
                            to.display()
                        );
                        0
                    }
                    Err(e) => {
                        eprintln!("error: {}", e.error);
                        if e.kind == diskchain::plan::ErrorKind::BadInput {
                            2
                        } else {
                            1
                        }
                    }
                }
            },
        ),
        Command::Verify {
            path,
            disk,
            deep,
            output,
        } => with_disks(
            &cli.allowed_roots,
            &cli.state_dir,
            &path,
            disk.as_deref(),
            |disks, host| {
                let mut code = 0;
                let mut results = Vec::new();
                let mut errors = Vec::new();
                for d in disks.iter().filter(|d| d.spec().backup.is_some()) {
                    match diskchain::backup::verify(d, host, deep) {
                        Ok(v) => {
                            if !v.damaged.is_empty() {
                                code = 1;
                            }
                            results.push(v);
                        }
                        Err(e) => {
                            code = code.max(if e.kind == diskchain::plan::ErrorKind::BadInput {
                                2
                            } else {
                                1
                            });
                            errors.push(e);
                        }
                    }
                }
                match output {
                    Output::Json => out!(
                        "{}",
                        serde_json::to_string_pretty(
                            &serde_json::json!({ "disks": results, "errors": errors })
                        )
                        .expect("a verify report serialises")
                    ),
                    Output::Text => {
                        for v in &results {
                            let key = diskchain_crd::DiskKey::new(Some(&v.namespace), &v.name);
                            if v.damaged.is_empty() {
                                out!(
                                    "disk {key}: {} point(s) in {} sound{}",
                                    v.points,
                                    v.repository.display(),
                                    if v.deep {
                                        ", every checksum matches"
                                    } else {
                                        " (structure; --deep reads every point)"
                                    }
                                );
                            }
                            for dmg in &v.damaged {
                                eprintln!(
                                    "error: disk {key}: point {}: {}",
                                    dmg.point, dmg.problem
                                );
                            }
                        }
                    }
                }
                for e in &errors {
                    eprintln!("error: {}", e.error);
                }
                code
            },
        ),
        Command::SetAside { disk } => match diskchain_crd::DiskKey::parse(&disk) {
            Err(e) => {
                eprintln!(
                    "error: --disk {disk:?}: {e}; give NAME or NAMESPACE/NAME as the spec's metadata has them. Nothing was done"
                );
                2
            }
            Ok(disk) => {
                match apply::set_aside_disk(
                    &disk,
                    &cli.allowed_roots,
                    &StateDir::new(&cli.state_dir),
                ) {
                    Ok(Some(to)) => {
                        out!(
                            "disk {disk}: the unfinished plan was set aside as {}; the next plan starts from the chain as it is",
                            to.display()
                        );
                        0
                    }
                    Ok(None) => {
                        out!("disk {disk}: no unfinished plan; nothing to do");
                        0
                    }
                    Err(e) => {
                        eprintln!("error: disk {disk}: {e}");
                        1
                    }
                }
            }
        },
    };
    // Output that could not be written (stdout closed) is a failure to report, unless the
    // command already failed for a reason of its own.
    let code = if code == 0 && STDOUT_FAILED.load(std::sync::atomic::Ordering::SeqCst) {
        1
    } else {
        code
    };
    std::process::exit(code);
}

/// Logs go to stderr, as text or JSON; `DISKCHAIN_LOG` sets the filter (default: `info` for the
/// agent, errors only for the one-shot commands, whose output is on stdout).
fn init_logging(cli: &Cli) {
    let default = if matches!(cli.command, Command::Agent { .. }) {
        "info"
    } else {
        "error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DISKCHAIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Reports an error that stopped everything before any disk was touched: bad input, exit 2.
/// Loads the specs under `path` (only disk `disk` when given) and the run's context, then runs
/// `f`. Bad specs, roots or `--disk`: exit 2, nothing touched.
fn with_disks(
    allowed_roots: &[std::path::PathBuf],
    state_dir: &std::path::Path,
    path: &std::path::Path,
    disk: Option<&str>,
    f: impl FnOnce(&[diskchain_crd::DesiredDisk], &diskchain::plan::Host) -> i32,
) -> i32 {
    let loaded = match diskchain_crd::load_path(path) {
        Ok(l) => l,
        Err(e) => return fatal(PlanRunError::Specs(e)),
    };
    let roots = match diskchain::observe::Roots::new(allowed_roots) {
        Ok(r) => r,
        Err(e) => return fatal(PlanRunError::Roots(e)),
    };
    let disks: Vec<_> = match disk {
        None => loaded,
        Some(d) => {
            let key = match diskchain_crd::DiskKey::parse(d) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!(
                        "error: --disk {d:?}: {e}; give NAME or NAMESPACE/NAME. Nothing was done"
                    );
                    return 2;
                }
            };
            let one: Vec<_> = loaded.into_iter().filter(|s| s.key == key).collect();
            if one.is_empty() {
                eprintln!(
                    "error: --disk {d:?}: no spec under {} is for this disk. Nothing was done",
                    path.display()
                );
                return 2;
            }
            one
        }
    };
    if !disks.iter().any(|d| d.spec().backup.is_some()) {
        eprintln!(
            "error: no spec under {} has spec.backup{}; add a backup policy (spec.backup.repository). Nothing was done",
            path.display(),
            disk.map(|d| format!(" for disk {d:?}")).unwrap_or_default()
        );
        return 2;
    }
    let host = diskchain::plan::Host::new(&roots, &StateDir::new(state_dir), &disks);
    f(&disks, &host)
}

fn fatal(e: PlanRunError) -> i32 {
    for line in e.to_string().lines() {
        eprintln!("error: {line}");
    }
    match e {
        PlanRunError::Specs(_) | PlanRunError::Roots(_) | PlanRunError::Graph(_) => 2,
    }
}
