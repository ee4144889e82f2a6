//! The `diskchain` binary: parse arguments, run the command, map failures to exit codes
//! (0 done, 1 failed, 2 bad input).

use clap::Parser;
use diskchain::cli::{Cli, Command, Output};
use diskchain::plan::{PlanRunError, run};
use diskchain::render;
use diskchain::state::StateDir;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("DISKCHAIN_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Crd => {
            print!("{}", diskchain_crd::crd_yaml());
            0
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
                Err(e) => {
                    for line in e.to_string().lines() {
                        eprintln!("error: {line}");
                    }
                    match e {
                        PlanRunError::Specs(_)
                        | PlanRunError::Roots(_)
                        | PlanRunError::Graph(_) => 2,
                    }
                }
            }
        }
    };
    std::process::exit(code);
}
