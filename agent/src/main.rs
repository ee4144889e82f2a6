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
    let code = match cli.command {
        Command::Crd => {
            outp!("{}", diskchain_crd::crd_yaml());
            0
        }
        Command::Agent {
            specs,
            resync,
            max_parallel,
            listen,
            grace,
            debounce,
            stuck_after,
            max_bytes_per_sec,
        } => diskchain::reconcile::run(diskchain::reconcile::AgentOptions {
            specs,
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
                    match output {
                        Output::Json => out!("{}", render::json(&report)),
                        Output::Text => outp!("{}", render::text(&report)),
                    }
                    for e in &report.errors {
                        eprintln!("error: {}", e.error);
                    }
                    report.exit_code()
                }
                Err(e) => fatal(e),
            }
        }
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
fn fatal(e: PlanRunError) -> i32 {
    for line in e.to_string().lines() {
        eprintln!("error: {line}");
    }
    match e {
        PlanRunError::Specs(_) | PlanRunError::Roots(_) | PlanRunError::Graph(_) => 2,
    }
}
