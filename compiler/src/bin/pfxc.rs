//! `pfxc`: the pfx compiler's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pfx_compiler::onnx_io::{self, WeightsFile};
use pfx_compiler::specialize::{specialize, Dims};
use pfx_compiler::{inspect, load_canonical, text};

#[derive(Parser)]
#[command(name = "pfxc", version, about = "Compiles exported GPT-2/BART ONNX graphs for prefix-tuning")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Shows what a model is: family, exporter, dimensions, inputs and outputs, ops.
    Inspect {
        model: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Writes the graph specialized to concrete sizes (shape arithmetic and masks folded away).
    Specialize {
        model: PathBuf,
        #[arg(long)]
        batch: usize,
        #[arg(long)]
        seq: usize,
        /// Past (KV-cache) length, for graphs exported with past.
        #[arg(long)]
        past: Option<usize>,
        /// Encoder length, for BART decoders (default: --seq).
        #[arg(long)]
        src_len: Option<usize>,
        #[arg(short, long)]
        output: PathBuf,
        /// Put the weights in OUTPUT.data instead of inline (automatic above 512 MiB).
        #[arg(long)]
        external_data: bool,
        /// Also print the specialized graph as text.
        #[arg(long)]
        text: bool,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { model, json } => {
            let m = onnx_io::load(&model)?;
            let info = inspect::inspect(&m).with_context(|| format!("inspecting {}", model.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.to_text());
            }
        }
        Command::Specialize { model, batch, seq, past, src_len, output, external_data, text: show } => {
            let mut m = load_canonical(&model)?;
            let dims = Dims { batch, seq, past, src_len };
            let report = specialize(&mut m, &dims).with_context(|| format!("specializing {}", model.display()))?;
            let bytes: usize = m.graph.initializers.values().map(|t| t.byte_len()).sum();
            if external_data || bytes > 512 << 20 {
                let mut name = output.file_name().unwrap_or_default().to_os_string();
                name.push(".data");
                let mut w = WeightsFile::create(&output.with_file_name(name))?;
                onnx_io::save(&m, &output, Some(&mut w))?;
            } else {
                onnx_io::save(&m, &output, None)?;
            }
            if show {
                print!("{}", text::model_text(&m));
            }
            eprintln!(
                "specialized {}: {} nodes -> {} ({} folded, {} no-ops removed); wrote {}",
                model.display(),
                report.nodes_before,
                report.nodes_after,
                report.folded,
                report.forwarded,
                output.display()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
