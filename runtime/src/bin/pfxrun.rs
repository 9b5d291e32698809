//! pfxrun: runs ONNX graphs on tract or ONNX Runtime.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pfx_runtime::{open, read_safetensors, write_safetensors, BackendKind, OrtDevice, OrtOptions};

#[derive(Parser)]
#[command(name = "pfxrun", version, about = "Run pfx graphs on tract or ONNX Runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one ONNX model on inputs from a safetensors file.
    Run {
        /// The .onnx model (external data is read from its folder).
        model: PathBuf,
        /// Inputs, by graph input name.
        #[arg(long)]
        inputs: PathBuf,
        /// Write all outputs here (safetensors).
        #[arg(long)]
        out: Option<PathBuf>,
        /// `tract` or `ort`.
        #[arg(long, default_value = "tract")]
        backend: BackendKind,
        /// ONNX Runtime device: cpu, cuda[:N], tensorrt[:N] (ort backend only).
        #[arg(long, default_value = "cpu")]
        device: OrtDevice,
        /// ONNX Runtime shared library (file or folder); default: ORT_DYLIB_PATH, then python3's onnxruntime.
        #[arg(long)]
        ort_lib: Option<PathBuf>,
        /// How many values of each output to print.
        #[arg(long, default_value_t = 6)]
        show: usize,
    },
    /// Locate and load ONNX Runtime and print what was found.
    OrtInfo {
        #[arg(long)]
        ort_lib: Option<PathBuf>,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { model, inputs, out, backend, device, ort_lib, show } => {
            if backend == BackendKind::Tract && device != OrtDevice::Cpu {
                anyhow::bail!("--device {device} needs --backend ort (tract runs on the CPU only)");
            }
            let feeds = read_safetensors(&inputs)?;
            let options = OrtOptions { lib_path: ort_lib, device, ..Default::default() };
            let mut engine = open(&model, backend, &options)?;
            let outputs =
                engine.run(&feeds).with_context(|| format!("running {} on {}", model.display(), engine.name()))?;
            for (name, t) in &outputs {
                println!("{name}: {} {:?} {}", t.dtype(), t.shape(), t.preview(show));
            }
            if let Some(out) = out {
                write_safetensors(&out, &outputs)?;
                println!("wrote {} output(s) to {}", outputs.len(), out.display());
            }
            Ok(())
        }
        Command::OrtInfo { ort_lib } => {
            println!("{}", pfx_runtime::ort_describe(ort_lib.as_deref())?);
            Ok(())
        }
    }
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
