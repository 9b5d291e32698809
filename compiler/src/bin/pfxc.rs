//! `pfxc`: the pfx compiler's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use pfx_compiler::compile::generate::GenShape;
use pfx_compiler::compile::optimizer::AdamW;
use pfx_compiler::compile::storage::WeightStorage;
use pfx_compiler::compile::{bart, bart_generate, compile, t5, CompileOptions};
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
    /// Compiles a GPT-2 export (a .onnx file, or a folder holding model.onnx) or, with --bart-prefix, a BART export
    /// folder into prefix-tuning graphs (train_step, grads, eval_step, and generation graphs when the export has
    /// past inputs) and a manifest.
    Compile {
        /// The export: a GPT-2 .onnx file (or a folder holding model.onnx), or a BART export folder.
        model: PathBuf,
        /// Prefix length P (virtual tokens).
        #[arg(long)]
        prefix_len: usize,
        /// Width of the reparametrization MLP.
        #[arg(long, default_value_t = 512, conflicts_with = "no_reparam")]
        mid_dim: usize,
        /// Train the prefix directly (no MLP).
        #[arg(long)]
        no_reparam: bool,
        /// Training batch size (sequences per step); the graphs are compiled for exactly this size.
        #[arg(long)]
        batch: usize,
        /// Sequence length (GPT-2).
        #[arg(long, required_unless_present_any = ["bart_prefix", "src_len", "tgt_len"])]
        seq: Option<usize>,
        /// BART export folder: which attentions get a prefix (paper: all three kinds; peft: PEFT 0.21's layout).
        #[arg(long)]
        bart_prefix: Option<String>,
        /// BART source length.
        #[arg(long)]
        src_len: Option<usize>,
        /// BART target length.
        #[arg(long)]
        tgt_len: Option<usize>,
        /// The source language code of mBART (en_XX), NLLB (eng_Latn) or M2M100 (en): their tokenizers frame every
        /// source with it.
        #[arg(long, requires = "tgt_lang")]
        src_lang: Option<String>,
        /// The target language code (ro_RO, fra_Latn, fr): targets are framed with it, and generation starts with
        /// it.
        #[arg(long, requires = "src_lang")]
        tgt_lang: Option<String>,
        /// BART loss label smoothing (default 0).
        #[arg(long)]
        label_smoothing: Option<f32>,
        /// AdamW's decoupled weight decay (HF Trainer's default: 0).
        #[arg(long, default_value_t = 0.0)]
        weight_decay: f32,
        /// Global gradient-norm clipping (0 turns it off).
        #[arg(long, default_value_t = 1.0)]
        max_grad_norm: f32,
        /// Seed of the initial prefix.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Rows the generation graphs decode together (prompts × beams).
        #[arg(long, default_value_t = 4)]
        gen_rows: usize,
        /// Prompt length of the generation graphs (default: --seq; BART: the source length, default --src-len).
        #[arg(long)]
        prompt_len: Option<usize>,
        /// Most tokens generated per prompt (0 writes no generation graphs).
        #[arg(long, default_value_t = 32)]
        max_new: usize,
        /// Element type of the frozen weight matrices in weights.bin: f32 (as exported) or f16 (half the size;
        /// the graphs compute in f32 on the weights rounded to f16, and tract's decoding reads them as f16).
        #[arg(long, default_value = "f32")]
        weights: WeightStorage,
        /// The bundle folder to write (created if missing; an earlier bundle there is replaced once the new one
        /// is complete).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Writes standalone generation graphs with a trained prefix baked in as constants.
    Bake {
        /// A bundle made by `pfxc compile` (with generation graphs).
        bundle: PathBuf,
        /// The trained prefix (safetensors with the bundle's trainable names).
        #[arg(long)]
        prefix: PathBuf,
        /// Element type of the frozen weight matrices in the baked bundle: f16 halves its size (the model is
        /// rounded after training, the prefix stays f32). Default: as the bundle stores them; an f16 bundle
        /// cannot be baked back into f32.
        #[arg(long)]
        weights: Option<WeightStorage>,
        /// The folder for the baked bundle (not the bundle's own).
        #[arg(short, long)]
        output: PathBuf,
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
            // A GPT-2 export folder stands for its model.onnx, as in `compile`.
            // Another folder (BART's: encoder and decoders) stands for each of its graphs.
            let graphs = if model.is_dir() && model.join("model.onnx").is_file() {
                vec![model.join("model.onnx")]
            } else if model.is_dir() {
                let mut found: Vec<PathBuf> = std::fs::read_dir(&model)
                    .with_context(|| format!("cannot read {}", model.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
                    .collect();
                found.sort();
                if found.is_empty() {
                    bail!("{} holds no .onnx file: pass an export's .onnx file or its folder", model.display());
                }
                found
            } else {
                vec![model.clone()]
            };
            let mut infos = serde_json::Map::new();
            for path in &graphs {
                let m = onnx_io::load(path)?;
                let mut info = inspect::inspect(&m).with_context(|| format!("inspecting {}", path.display()))?;
                // The graph is described even beside a broken config.json (compile refuses it).
                info.config_model_type = inspect::config_model_type(path).unwrap_or_else(|e| {
                    eprintln!("warning: {e:#}");
                    None
                });
                if info.config_model_type.as_deref().is_some_and(t5::is_t5) {
                    info.as_t5(&m.graph);
                }
                if json {
                    infos.insert(path.display().to_string(), serde_json::to_value(&info)?);
                } else {
                    if graphs.len() > 1 {
                        println!("== {}", path.display());
                    }
                    print!("{}", info.to_text());
                }
            }
            if json {
                // One graph prints its description; several, an object keyed by file.
                let out = if graphs.len() == 1 {
                    infos.into_iter().next().map(|(_, v)| v).unwrap_or_default()
                } else {
                    serde_json::Value::Object(infos)
                };
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
        }
        Command::Compile {
            model,
            prefix_len,
            mid_dim,
            no_reparam,
            batch,
            seq,
            bart_prefix,
            src_len,
            tgt_len,
            src_lang,
            tgt_lang,
            label_smoothing,
            weight_decay,
            max_grad_norm,
            seed,
            gen_rows,
            prompt_len,
            max_new,
            weights,
            output,
        } => {
            let optimizer = AdamW {
                weight_decay,
                // 0 turns clipping off; anything else (NaN, negative) is for AdamW::check to refuse.
                max_grad_norm: (max_grad_norm != 0.0).then_some(max_grad_norm),
                ..AdamW::default()
            };
            optimizer.check()?;
            // A GPT-2 export folder (optimum's, or one with a tokenizer next to the model) stands for its
            // model.onnx; a BART folder (encoder and decoder files) needs its prefix layout.
            let model = match (model.is_dir(), &bart_prefix) {
                (true, None) if model.join("model.onnx").is_file() && !model.join("encoder_model.onnx").exists() => {
                    model.join("model.onnx")
                }
                _ => model,
            };
            if model.is_dir() || bart_prefix.is_some() {
                let mode: bart::BartPrefix = match &bart_prefix {
                    Some(m) => m.parse()?,
                    None => anyhow::bail!(
                        "{} is a folder without a model.onnx: pass a GPT-2 export's .onnx file, or --bart-prefix \
                         paper|peft for a BART export folder (encoder_model.onnx, decoder_model*.onnx)",
                        model.display()
                    ),
                };
                let (Some(src_len), Some(tgt_len)) = (src_len, tgt_len) else {
                    anyhow::bail!("BART needs --src-len and --tgt-len");
                };
                if seq.is_some() {
                    anyhow::bail!("--seq is GPT-2's sequence length; BART takes --src-len and --tgt-len");
                }
                let with_past = bart::has_decoder_with_past(&model);
                let opts = bart::BartOptions {
                    mode,
                    prefix_len,
                    mid_dim: if no_reparam { None } else { Some(mid_dim) },
                    batch,
                    src_len,
                    tgt_len,
                    label_smoothing: label_smoothing.unwrap_or(0.0),
                    optimizer,
                    seed,
                    // Generation needs the decoder with past; exports without it still train.
                    generation: (max_new > 0 && with_past).then(|| bart_generate::BartGenShape {
                        rows: gen_rows,
                        src_len: prompt_len.unwrap_or(src_len),
                        max_new,
                    }),
                    weights,
                    languages: src_lang.zip(tgt_lang).map(|(source, target)| bart::Languages {
                        source,
                        target,
                        nllb_legacy: None,
                    }),
                };
                let t0 = std::time::Instant::now();
                let m = bart::compile_bart(&model, &opts, &output)
                    .with_context(|| format!("compiling {}", model.display()))?;
                eprintln!(
                    "compiled BART {} (prefix {}, {mode} layout, {} trainable tensors) into {} in {:.2}s: {}",
                    model.display(),
                    m.prefix_len,
                    m.trainable.len(),
                    output.display(),
                    t0.elapsed().as_secs_f64(),
                    m.graphs.values().cloned().collect::<Vec<_>>().join(", ")
                );
                if max_new > 0 && !with_past {
                    eprintln!(
                        "note: {} has no decoder_with_past_model.onnx, so the bundle has no generation graphs \
                         (export with optimum's --task text2text-generation-with-past to generate)",
                        model.display()
                    );
                }
                return Ok(());
            }
            for (flag, given) in [
                ("--src-len", src_len.is_some()),
                ("--tgt-len", tgt_len.is_some()),
                ("--label-smoothing", label_smoothing.is_some()),
                ("--src-lang", src_lang.is_some()),
                ("--tgt-lang", tgt_lang.is_some()),
            ] {
                if given {
                    anyhow::bail!(
                        "{flag} is for BART-layout exports (with --bart-prefix; the languages for mBART, M2M100 and NLLB); {} is \
                         compiled as GPT-2, which takes --seq",
                        model.display()
                    );
                }
            }
            let seq = seq.unwrap_or(0);
            if batch == 0 || seq == 0 {
                anyhow::bail!("--batch and --seq must be at least 1");
            }
            let opts = CompileOptions {
                prefix_len,
                mid_dim: if no_reparam { None } else { Some(mid_dim) },
                batch,
                seq,
                optimizer,
                seed,
                generation: (max_new > 0).then(|| GenShape {
                    rows: gen_rows,
                    prompt_len: prompt_len.unwrap_or(seq),
                    max_new,
                }),
                weights,
            };
            warn_attention_flags(&model);
            let t0 = std::time::Instant::now();
            let m = compile(&model, &opts, &output).with_context(|| format!("compiling {}", model.display()))?;
            eprintln!(
                "compiled {} ({} layers; prefix of {} positions over {} key/value heads, via {:?}) into {} in {:.2}s: {}",
                model.display(),
                m.layers,
                m.prefix_len,
                m.heads,
                m.injection,
                output.display(),
                t0.elapsed().as_secs_f64(),
                m.graphs.values().cloned().collect::<Vec<_>>().join(", ")
            );
            if max_new > 0 && m.generation.is_none() {
                eprintln!(
                    "note: {} has no past (KV-cache) inputs, so the bundle gets no generation graphs (export with \
                     past_key_values, e.g. optimum's --task text-generation-with-past, to generate)",
                    model.display()
                );
            }
            if m.model_type.is_none() {
                // torch.onnx exports write no config.json: the text commands then assume GPT-2's tokens.
                eprintln!(
                    "note: no config.json beside {} says which model it is, so pfxrun's text commands will frame \
                     examples in GPT-2's tokens (<|endoftext|>); for another model, copy its config.json (and \
                     generation_config.json) beside the export and compile again",
                    model.display()
                );
            }
        }
        Command::Bake { bundle, prefix, weights, output } => {
            let m = pfx_compiler::compile::bake::bake_with(&bundle, &prefix, &output, weights)
                .with_context(|| format!("baking {} with {}", bundle.display(), prefix.display()))?;
            let files: Vec<String> = m.graphs.values().cloned().collect();
            eprintln!("baked {} into {} ({})", prefix.display(), output.display(), files.join(", "));
        }
        Command::Specialize { model, batch, seq, past, src_len, output, external_data, text: show } => {
            let mut m = load_canonical(&model)?;
            check_specialize_positions(&m, seq, past)?;
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

/// GPT-2 configs can turn on attention variants that transformers' sdpa attention ignores (checked with 4.57):
/// an export made through it computes another function than the PyTorch model trained with eager attention.
fn warn_attention_flags(model: &std::path::Path) {
    let Some(cfg) = model.parent().map(|d| d.join("config.json")) else { return };
    let Ok(text) = std::fs::read_to_string(&cfg) else { return };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return };
    let flags: Vec<&str> = [
        ("scale_attn_by_inverse_layer_idx", serde_json::Value::Bool(true)),
        ("scale_attn_weights", serde_json::Value::Bool(false)),
    ]
    .iter()
    .filter(|(k, set)| v.get(*k) == Some(set))
    .map(|(k, _)| *k)
    .collect();
    if !flags.is_empty() {
        eprintln!(
            "warning: {} sets {}: exports made with transformers' sdpa attention (optimum's, for one) ignore it, \
             so the graph may not compute what the PyTorch model does; compare the export's logits with PyTorch's \
             (eager attention), or export with torch.onnx.export(dynamo=True)",
            cfg.display(),
            flags.join(", ")
        );
    }
}

/// Refuses lengths past the model's position table before specializing: the position lookup would fail to
/// fold, and the error would name a Gather node rather than the lengths.
fn check_specialize_positions(m: &pfx_compiler::ir::Model, seq: usize, past: Option<usize>) -> Result<()> {
    use pfx_compiler::inspect::{detect_family, embeddings, usable_positions};
    let Some(rows) = embeddings(&m.graph).position_rows else { return Ok(()) };
    let positions = usable_positions(&m.graph, detect_family(&m.graph), rows);
    let needed = past.unwrap_or(0) + seq;
    if needed > positions {
        let what = match past {
            Some(p) => format!("--past {p} + --seq {seq}"),
            None => format!("--seq {seq}"),
        };
        bail!("{what} needs {needed} positions, but the model has {positions}; use smaller lengths");
    }
    Ok(())
}

fn main() -> ExitCode {
    pfx_compiler::cli_output::quiet_on_output_errors();
    let cli = Cli::parse();
    // Stage lines where someone watches (or PFX_PROGRESS=1 asks for them in a log).
    use std::io::IsTerminal;
    pfx_compiler::progress::enable(
        std::io::stderr().is_terminal() || std::env::var("PFX_PROGRESS").is_ok_and(|v| v == "1"),
    );
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
