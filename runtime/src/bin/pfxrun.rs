//! pfxrun: runs ONNX graphs on tract or ONNX Runtime.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use pfx_runtime::commands::{self, Engine};
use pfx_runtime::data::Overlong;
use pfx_runtime::generate::GenConfig;
use pfx_runtime::train::TrainConfig;
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
    /// Prefix-tune: run the bundle's train_step over a dataset (E2E `MR||text`, JSONL, DART).
    Train {
        /// A bundle written by `pfxc compile`.
        bundle: PathBuf,
        /// Training data: E2E `MR||text` lines (.txt, .e2e), JSONL {"source", "target"} lines (.jsonl), DART (.json).
        #[arg(long)]
        train: PathBuf,
        /// Dev set: its loss is reported after each epoch, and the prefix of the lowest is kept in best.safetensors.
        #[arg(long)]
        dev: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        epochs: usize,
        #[arg(long, default_value_t = 5e-3)]
        lr: f32,
        /// Linear warm-up steps (then linear decay to 0, as HF's Trainer).
        #[arg(long, default_value_t = 0)]
        warmup_steps: usize,
        /// Shuffling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep the file order instead of shuffling.
        #[arg(long)]
        no_shuffle: bool,
        /// Checkpoint every N steps (always at the end and on Ctrl-C or SIGTERM; 0: only then).
        #[arg(long, default_value_t = 100)]
        checkpoint_every: usize,
        /// Stop after N steps of this run (a checkpoint is written).
        #[arg(long)]
        max_steps: Option<usize>,
        /// Rows longer than the compiled length: truncate or skip.
        #[arg(long, default_value = "truncate")]
        overlong: String,
        /// Start from this prefix (default: the bundle's initial one).
        #[arg(long, conflicts_with = "resume")]
        prefix: Option<PathBuf>,
        /// Continue the checkpoint in --output.
        #[arg(long)]
        resume: bool,
        /// A Hugging Face tokenizer.json, or a folder holding one (default: the bundle's own).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Folder for prefix.safetensors, best.safetensors (with --dev), checkpoint, metrics.jsonl and loss.svg.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Mean loss of a dataset under a prefix.
    Eval {
        /// A bundle made by `pfxc compile` (not a baked one).
        bundle: PathBuf,
        /// Examples with targets, as for `train` (E2E `MR||text`, JSONL, DART).
        #[arg(long)]
        data: PathBuf,
        /// The prefix to evaluate (default: the bundle's untrained initial one).
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// A Hugging Face tokenizer.json, or a folder holding one (default: the bundle's own).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Generate text (greedy search, beam search or sampling) with a prefix, or with a baked bundle.
    Generate {
        /// A bundle written by `pfxc compile` (with generation graphs) or `pfxc bake`.
        bundle: PathBuf,
        /// The trained prefix (`prefix.safetensors` or `checkpoint.safetensors` of `pfxrun train`); default: the
        /// bundle's untrained initial one. Baked bundles hold theirs.
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// One source (e.g. an E2E meaning representation).
        #[arg(long, conflicts_with = "inputs")]
        input: Option<String>,
        /// Sources from a file, its format told by the extension: .txt/.e2e (E2E `MR||text` lines), .jsonl/.json
        /// (`{"source", "target"}`; DART's JSON) give their distinct sources and references; any other extension
        /// is read as one source per line. A JSONL line's `"prefix": "FILE"` (relative to the file's folder)
        /// generates that source with its own prefix (one per user or task), in the same batches as the others;
        /// sources without one use --prefix.
        #[arg(long)]
        inputs: Option<PathBuf>,
        #[command(flatten)]
        search: Box<commands::SearchFlags>,
        /// Mask the prefix out: the bare model, for comparison.
        #[arg(long, conflicts_with = "prefix")]
        no_prefix: bool,
        /// Do not force the tokens the model's generation config forces, as HF's `generate` does: the last one at
        /// the length limit (`forced_eos_token_id`: BART's, Marian's and Pegasus's `</s>`) and an encoder-decoder's
        /// first one (`forced_bos_token_id`). `pfxc compile` records them in the bundle.
        #[arg(long)]
        no_forced_tokens: bool,
        /// Write the generations here, one per line (through OUTPUT.partial as batches finish).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Continue the OUTPUT.partial an interrupted run left (same sources and settings).
        #[arg(long, requires = "output")]
        resume: bool,
        /// Write the references of each source here (for `pfxrun score`).
        #[arg(long)]
        refs_out: Option<PathBuf>,
        /// A Hugging Face tokenizer.json, or a folder holding one (default: the bundle's own).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Corpus BLEU, NIST, ROUGE-L, CIDEr and METEOR of hypotheses against grouped references.
    Score {
        /// The hypotheses, one per line (`pfxrun generate --output`).
        #[arg(long)]
        hyp: PathBuf,
        /// The references: one group per hypothesis, groups separated by blank lines (`generate --refs-out`).
        #[arg(long)]
        refs: PathBuf,
    },
    /// Write a prefix as a PEFT adapter folder (prompt_embeddings with the MLP applied).
    ExportPeft {
        /// The bundle the prefix was trained with.
        bundle: PathBuf,
        /// The trained prefix (`prefix.safetensors` or `checkpoint.safetensors` of `pfxrun train`).
        #[arg(long)]
        prefix: PathBuf,
        /// The adapter folder to write (adapter_config.json, adapter_model.safetensors).
        #[arg(short, long)]
        output: PathBuf,
        /// base_model_name_or_path to record in adapter_config.json.
        #[arg(long, default_value = "")]
        base_model: String,
    },
    /// Read a PEFT prefix-tuning adapter folder as a prefix for a --no-reparam bundle.
    ImportPeft {
        /// A bundle compiled with --no-reparam for the adapter's base model.
        bundle: PathBuf,
        /// The adapter folder (`save_pretrained` of a PEFT prefix-tuning model).
        adapter: PathBuf,
        /// The prefix file to write (for `--prefix`); an existing file is not overwritten.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Locate and load ONNX Runtime and print what was found.
    OrtInfo {
        #[arg(long)]
        ort_lib: Option<PathBuf>,
    },
    /// List the CUDA devices (through the CUDA driver, when there is one) and what ONNX Runtime offers.
    Devices {
        /// The ONNX Runtime library to describe (default: ORT_DYLIB_PATH, then a pip-installed onnxruntime).
        #[arg(long)]
        ort_lib: Option<PathBuf>,
    },
}

#[derive(clap::Args, Clone)]
struct EngineArgs {
    /// `tract` (pure Rust, default) or `ort` (ONNX Runtime).
    #[arg(long, default_value = "tract")]
    backend: BackendKind,
    /// ONNX Runtime device: cpu, cuda[:N] (or gpu[:N]), tensorrt[:N].
    #[arg(long, default_value = "cpu")]
    device: OrtDevice,
    /// ONNX Runtime shared library (file or folder).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Capture the GPU work once as a CUDA graph and replay it (inputs and outputs in fixed device buffers).
    #[arg(long)]
    cuda_graph: bool,
    /// TF32 matrix products on the CUDA provider: on or off (default: ONNX Runtime's).
    #[arg(long, value_parser = parse_on_off, value_name = "on|off")]
    tf32: Option<bool>,
    /// TensorRT: build fp16 engines.
    #[arg(long)]
    trt_fp16: bool,
    /// TensorRT: keep built engines (and timing caches) in this folder and reuse them.
    #[arg(long, value_name = "DIR")]
    trt_cache: Option<PathBuf>,
    /// On a GPU device, run the nodes its providers cannot run on the CPU instead of failing.
    #[arg(long)]
    allow_cpu_fallback: bool,
}

fn parse_on_off(s: &str) -> std::result::Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("expected `on` or `off`, not `{s}`")),
    }
}

/// `--ort-lib` with tract: refused like the other ONNX Runtime flags, rather than silently ignored.
fn refuse_ort_lib_on_tract(ort_lib: &Option<PathBuf>) -> Result<()> {
    if ort_lib.is_some() {
        anyhow::bail!("--ort-lib needs --backend ort (tract is built in)");
    }
    Ok(())
}

impl EngineArgs {
    fn engine(self) -> Result<Engine> {
        if self.backend == BackendKind::Tract {
            let ort_only = [
                (self.device != OrtDevice::Cpu, "--device"),
                (self.cuda_graph, "--cuda-graph"),
                (self.tf32.is_some(), "--tf32"),
                (self.trt_fp16, "--trt-fp16"),
                (self.trt_cache.is_some(), "--trt-cache"),
                (self.allow_cpu_fallback, "--allow-cpu-fallback"),
            ];
            refuse_ort_lib_on_tract(&self.ort_lib)?;
            if let Some((_, flag)) = ort_only.iter().find(|(given, _)| *given) {
                anyhow::bail!("{flag} needs --backend ort (tract runs on the CPU only)");
            }
        }
        let ort = OrtOptions {
            lib_path: self.ort_lib,
            device: self.device,
            cuda_graph: self.cuda_graph,
            tf32: self.tf32,
            trt_fp16: self.trt_fp16,
            trt_cache: self.trt_cache,
            allow_cpu_fallback: self.allow_cpu_fallback,
            intra_threads: pfx_runtime::backend::threads_from_env(),
            ..Default::default()
        };
        ort.check()?;
        if self.backend == BackendKind::Ort {
            // Loaded before any work, so that a missing library fails fast; the log says which one runs.
            let rt = pfx_runtime::ort_backend::ort_runtime(ort.lib_path.as_deref())?;
            eprintln!("{}", rt.summary());
        }
        Ok(Engine { backend: self.backend, ort })
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { model, inputs, out, backend, device, ort_lib, show } => {
            if backend == BackendKind::Tract && device != OrtDevice::Cpu {
                anyhow::bail!("--device {device} needs --backend ort (tract runs on the CPU only)");
            }
            if backend == BackendKind::Tract {
                refuse_ort_lib_on_tract(&ort_lib)?;
            }
            if let Some(out) = out.as_deref().filter(|o| o.is_dir()) {
                anyhow::bail!("--out {} is a folder: give a .safetensors file path", out.display());
            }
            let feeds = read_safetensors(&inputs)?;
            let options = OrtOptions { lib_path: ort_lib, device, ..Default::default() };
            let mut engine = open(&model, backend, &options)?;
            let unused: Vec<&str> =
                feeds.keys().filter(|k| !engine.inputs().iter().any(|i| &i.name == *k)).map(String::as_str).collect();
            if !unused.is_empty() {
                eprintln!("note: {} has no input named {}: ignored", model.display(), unused.join(", "));
            }
            let outputs = engine.run(&feeds).map_err(|e| {
                // tract plans symbolic sizes (batch, sequence) it cannot always tie to the given shapes.
                let symbolic = backend == BackendKind::Tract && format!("{e:#}").contains("Impossible to unify");
                let hint = if symbolic {
                    "; its sizes are symbolic: fix them with `pfxc specialize MODEL --batch B --seq T -o FIXED.onnx` \
                     and run that, or use --backend ort"
                } else {
                    ""
                };
                e.context(format!("running {} on {}{hint}", model.display(), engine.name()))
            })?;
            for (name, t) in &outputs {
                println!("{name}: {} {:?} {}", t.dtype(), t.shape(), t.preview(show));
            }
            if let Some(out) = out {
                write_safetensors(&out, &outputs)?;
                println!("wrote {} output(s) to {}", outputs.len(), out.display());
            }
            Ok(())
        }
        Command::Train {
            bundle,
            train,
            dev,
            epochs,
            lr,
            warmup_steps,
            seed,
            no_shuffle,
            checkpoint_every,
            max_steps,
            overlong,
            prefix,
            resume,
            tokenizer,
            output,
            engine,
        } => {
            let overlong = match overlong.as_str() {
                "truncate" => Overlong::Truncate,
                "skip" => Overlong::Skip,
                o => anyhow::bail!("--overlong must be truncate or skip, not {o}"),
            };
            if epochs == 0 {
                anyhow::bail!("--epochs must be at least 1");
            }
            if max_steps == Some(0) {
                anyhow::bail!("--max-steps must be at least 1");
            }
            if !(lr.is_finite() && lr > 0.0) {
                anyhow::bail!("--lr must be a finite number > 0 (got {lr})");
            }
            if lr > 1.0 {
                eprintln!(
                    "warning: --lr {lr:e} is far above what AdamW trains a prefix with (1e-5 to 1e-2): expect the \
                     loss to diverge or the gradient to vanish"
                );
            }
            let cfg = TrainConfig {
                epochs,
                lr,
                warmup_steps,
                seed,
                checkpoint_every,
                out_dir: output,
                max_steps,
                progress: true,
                shuffle: !no_shuffle,
            };
            let args = commands::TrainArgs { bundle, train, dev, tokenizer, prefix, overlong, cfg, resume };
            commands::train(args, &engine.engine()?)
        }
        Command::Eval { bundle, data, prefix, tokenizer, engine } => {
            let l = commands::eval(&bundle, &data, tokenizer.as_deref(), prefix.as_deref(), &engine.engine()?)?;
            println!("loss {l:.6}");
            Ok(())
        }
        Command::Generate {
            bundle,
            prefix,
            input,
            inputs,
            search,
            no_prefix,
            no_forced_tokens,
            output,
            resume,
            refs_out,
            tokenizer,
            engine,
        } => {
            let engine = engine.engine()?;
            let b = pfx_runtime::bundle::Bundle::open(&bundle)?;
            let mut cfg = GenConfig { no_prefix, ..GenConfig::default() };
            for note in commands::apply_search_settings(&mut cfg, &search, &b.manifest)? {
                eprintln!("note: {note}");
            }
            if resume && cfg.sampling.is_some() && search.seed.is_none() {
                anyhow::bail!("--resume continues a sampling run with its seed: give the --seed it printed");
            }
            let forced_tokens = !no_forced_tokens;
            let args = commands::GenerateArgs {
                bundle,
                prefix,
                tokenizer,
                input,
                inputs,
                cfg,
                forced_tokens,
                output,
                resume,
                refs_out,
            };
            commands::generate(args, &engine)?;
            Ok(())
        }
        Command::Score { hyp, refs } => {
            print!("{}", pfx_runtime::score::score_files(&hyp, &refs)?);
            Ok(())
        }
        Command::ExportPeft { bundle, prefix, output, base_model } => {
            let b = pfx_runtime::bundle::Bundle::open(&bundle)?;
            b.refuse_baked()?;
            let p = b.read_prefix(&prefix)?;
            pfx_runtime::peft::export_adapter(&b.manifest, &p, &output, &base_model)?;
            println!("wrote the PEFT adapter {}", output.display());
            Ok(())
        }
        Command::ImportPeft { bundle, adapter, output } => {
            let b = pfx_runtime::bundle::Bundle::open(&bundle)?;
            b.refuse_baked()?;
            let p = pfx_runtime::peft::import_adapter(&b.manifest, &adapter)?;
            // A trained prefix next to its checkpoint must not be replaced by accident.
            if output.exists() {
                anyhow::bail!("{} exists: choose another --output, or delete it first", output.display());
            }
            write_safetensors(&output, &p)?;
            println!("wrote the prefix {}", output.display());
            Ok(())
        }
        Command::OrtInfo { ort_lib } => {
            println!("{}", pfx_runtime::ort_describe(ort_lib.as_deref())?);
            Ok(())
        }
        Command::Devices { ort_lib } => {
            let (report, ort_loaded) = pfx_runtime::devices::describe(ort_lib.as_deref());
            print!("{report}");
            // Without --ort-lib the report describes what is there; a library the user named must load.
            match ort_lib.filter(|_| !ort_loaded) {
                Some(lib) => anyhow::bail!("--ort-lib {} could not be loaded (above: why)", lib.display()),
                None => Ok(()),
            }
        }
    }
}

fn main() -> ExitCode {
    pfx_compiler::cli_output::quiet_on_output_errors();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<pfx_runtime::commands::Interrupted>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
