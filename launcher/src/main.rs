//! `lava`: plan, launch and supervise Live Avatar jobs.
//!
//! The launcher knows processes, the planner and the protocol; it never links CUDA
//! (checked by tests/layering.rs).

mod plan;

use clap::{Parser, Subcommand};

/// lava: a multi-GPU runtime for the Live Avatar model.
#[derive(Debug, Parser)]
#[command(name = "lava", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Capacity-planning dry run: per-rank memory and time for a model, GPU set and layout.
    Plan(Box<plan::PlanArgs>),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Plan(args) => plan::run(&args),
    }
}
