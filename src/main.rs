//! `sparkc`: the command-line front of the toolchain. Parsing, progress and reports live here;
//! everything a library user would also want lives in the crates.

mod backend;
mod commands;
mod model_source;
mod plot;
mod report;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "sparkc", version, about = "A compiler toolchain for spiking neural networks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parameters, FLOPs per token, recurrent state and the IR of a model.
    Inspect(commands::inspect::Args),
    /// Run a forward pass (and the loss) on inputs from a safetensors file.
    Run(commands::run::Args),
    /// Generate tokens: prefill, then one token per step with the neuron state carried.
    Generate(commands::generate::Args),
    /// Write a seeded random initialisation (the original scheme) of a model.
    Init(commands::init::Args),
    /// Train with the original recipe (Adam, 10x neuron lr, warmup + cosine, compensation).
    Train(commands::train::Args),
    /// Import a NIR file into IR text (+ <stem>.safetensors of the parameters).
    Import(commands::nir::ImportArgs),
    /// Export to NIR: a NeuronSpark config + weights, or an IR text file + parameters.
    Export(commands::nir::ExportArgs),
    /// Compile a model into a spike program for a neuromorphic target (quantize, legalize, place).
    Compile(commands::compile::Args),
    /// Run a spike program on the simulated chip; report energy, events and time; plot activity.
    Simulate(commands::simulate::Args),
    /// Measure throughput: forward tokens/s and GEMM GFLOP/s.
    Bench(commands::bench::Args),
    /// The embedded default: train a tiny model from a seed (~3 min), inspect it, generate text.
    Demo(commands::demo::Args),
}

/// Keep freed memory for reuse: the interpreter allocates and frees tensors of tens of MB per
/// op, and glibc would otherwise map and unmap each one, paying the page faults every time
/// (measured: a training pass of the D=256 model 9.4 s → 5.7 s on two cores).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread exists.
    unsafe {
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit (larger values are
        // refused); below it, freed tensors return to the heap and are reused without fresh
        // page faults, which cost ~5 µs each on the 2-core VM.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Run(a) => commands::run::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Init(a) => commands::init::run(a),
        Command::Train(a) => commands::train::run(a),
        Command::Import(a) => commands::nir::import(a),
        Command::Export(a) => commands::nir::export(a),
        Command::Compile(a) => commands::compile::run(a),
        Command::Simulate(a) => commands::simulate::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Demo(a) => commands::demo::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
