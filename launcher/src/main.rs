//! `lava`: plan, launch and supervise Live Avatar jobs.
//!
//! The launcher knows processes, the planner and the protocol; it never links CUDA
//! (checked by tests/layering.rs).

mod coordinator;
mod env;
mod fit;
mod generate;
mod plan;
mod progress;
mod spawn;
mod supervise;

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
    /// Start the job's workers, bring every rank to ready, and supervise them until a signal
    /// (clean drain) or the death of any rank (exit code 5, peer lost).
    Launch(Box<supervise::LaunchArgs>),
    /// Generate a video: plan, start the ranks, write the MP4 with audio as frames arrive.
    Generate(Box<generate::GenerateArgs>),
    /// What CUDA this machine offers (driver, GPUs, cuBLAS/cuDNN/NCCL/NVRTC); runs `lava-worker doctor`.
    Doctor {
        /// Path of the `lava-worker` executable [default: next to this `lava`].
        #[arg(long, env = "LAVA_WORKER_BIN")]
        worker_bin: Option<std::path::PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, then the bad-input exit code (the rest of clap's text is a usage hint).
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("lava: {}", first.trim_start_matches("error: "));
            return std::process::ExitCode::from(plan::EXIT_BAD_INPUT);
        }
    };
    match cli.command {
        Command::Plan(args) => plan::run(&args),
        Command::Launch(args) => supervise::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Doctor { worker_bin } => doctor(worker_bin.as_deref()),
    }
}

/// The launcher never links CUDA: the worker binary probes the machine and reports.
fn doctor(worker_bin: Option<&std::path::Path>) -> std::process::ExitCode {
    let status = spawn::locate_worker(worker_bin).and_then(|w| {
        std::process::Command::new(&w)
            .arg("doctor")
            .status()
            .map_err(|e| format!("running {}: {e}", w.display()))
    });
    match status {
        Ok(s) => std::process::ExitCode::from(
            s.code()
                .unwrap_or(i32::from(proto::exit::INTERNAL))
                .clamp(0, 255) as u8,
        ),
        Err(e) => {
            eprintln!("lava doctor: {e}");
            std::process::ExitCode::from(proto::exit::INTERNAL)
        }
    }
}
