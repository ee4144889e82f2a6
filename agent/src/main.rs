//! The `diskchain` binary: parse arguments, run the command, map failures to exit codes
//! (0 done, 1 failed, 2 bad input).

use clap::Parser;
use diskchain::apply::{self, ApplyOptions, ProgressMode};
use diskchain::cli::{Cli, Command, LogFormat, Output};
use diskchain::execute::ExecOptions;
use diskchain::plan::{PlanRunError, run};
use diskchain::render;
use diskchain::state::StateDir;

fn main() {
    let cli = Cli::parse();
    init_logging(&cli);
    let code = match cli.command {
        Command::Crd => {
            print!("{}", diskchain_crd::crd_yaml());
            0
        }
        Command::Agent {
            specs,
            resync,
            max_parallel,
            listen,
            grace,
            debounce,
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
            exec: ExecOptions { max_bytes_per_sec },
        }),
        Command::Apply {
            path,
            max_bytes_per_sec,
        } => {
            let options = ApplyOptions {
                exec: ExecOptions { max_bytes_per_sec },
                progress: ProgressMode::detect(),
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
                        println!(
                            "disk {}: {} step(s), {} predicted, {} written by QEMU",
                            d.name,
                            d.steps.len(),
                            diskchain::units::human_bytes(d.predicted_bytes),
                            diskchain::units::human_bytes(d.written_bytes)
                        );
                    }
                    for e in &report.errors {
                        eprintln!("error: {}", e.error);
                    }
                    if report.errors.is_empty() {
                        println!("every disk matches its spec");
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
                        Output::Json => println!(
                            "{}",
                            serde_json::to_string_pretty(
                                &serde_json::json!({ "agent": agent, "disks": disks })
                            )
                            .expect("status serialises")
                        ),
                        Output::Text => {
                            if let Some(a) = &agent {
                                let how = if a.running { "running" } else { "not running" };
                                println!("agent: pid {} ({how})", a.pid);
                                for e in &a.spec_errors {
                                    println!("  spec not loaded: {e}");
                                }
                            }
                            print!("{}", diskchain::status::text(&disks));
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
                        Output::Json => println!("{}", render::json(&report)),
                        Output::Text => print!("{}", render::text(&report)),
                    }
                    for e in &report.errors {
                        eprintln!("error: {}", e.error);
                    }
                    report.exit_code()
                }
                Err(e) => fatal(e),
            }
        }
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
