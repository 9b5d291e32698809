//! `pfxc compile`: an exported GPT-2 becomes prefix-tuning graphs (gradients, a training step with AdamW, an
//! evaluation step), the frozen weights written once into a shared file.

pub mod bake;
pub mod bart;
pub mod bart_generate;
pub mod bundle_dir;
pub mod generate;
pub mod init;
pub mod loss;
pub mod lower;
pub mod optimizer;
pub mod prefix;
pub mod storage;
pub mod t5;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::autodiff::build_gradients_from;
use crate::inspect::{detect_family, inspect, Family};
use crate::ir::{Model, ValueInfo, ValueType};
use crate::onnx_io::{self, WeightsFile};
use crate::simplify::simplify;
use crate::specialize::{specialize, Dims};
use crate::tensor::{DType, Tensor};
use optimizer::AdamW;
use prefix::PrefixShape;
use storage::WeightStorage;

#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub prefix_len: usize,
    /// MLP width; None = `--no-reparam`.
    pub mid_dim: Option<usize>,
    pub batch: usize,
    pub seq: usize,
    pub optimizer: AdamW,
    pub seed: u64,
    /// Generation graphs (prefill/decode) to emit; only exports with past inputs get them.
    pub generation: Option<generate::GenShape>,
    /// Element type of the frozen weights in `weights.bin`.
    pub weights: WeightStorage,
}

/// How the prefix reached the attention layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Injection {
    PastBinding,
    AttentionSites,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GraphIo {
    pub file: String,
    pub inputs: Vec<IoRole>,
    pub outputs: Vec<IoRole>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IoRole {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    /// batch | trainable | optimizer_state | hyperparameter | loss | gradient | metric | updated_trainable |
    /// updated_optimizer_state
    pub role: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub compiler_version: String,
    pub family: String,
    pub source_model: String,
    pub source_exporter: String,
    pub injection: Injection,
    pub batch: usize,
    pub seq_len: usize,
    pub prefix_len: usize,
    pub reparam: bool,
    pub mid_dim: Option<usize>,
    pub layers: usize,
    /// Heads of the prefix: the key/value heads (fewer than the query heads under grouped-query attention), PEFT's
    /// `num_attention_heads`.
    pub heads: usize,
    pub head_dim: usize,
    /// Width of one layer's prefix keys, `heads · head_dim`: the model width, or less under grouped-query
    /// attention (PEFT's `token_dim`).
    pub hidden: usize,
    pub vocab: usize,
    pub optimizer: OptimizerSpec,
    pub trainable: Vec<TensorSpec>,
    /// role -> file
    pub graphs: BTreeMap<String, String>,
    pub io: BTreeMap<String, GraphIo>,
    pub weights_file: String,
    pub init: String,
    /// Shapes of the generation graphs (absent when the export has no past inputs).
    pub generation: Option<GenerationSpec>,
    /// A baked bundle: generation graphs only, the prefix inside them as constants.
    #[serde(default)]
    pub baked: bool,
    /// Element type of the large frozen weights in `weights.bin` (f16: stored rounded, cast to f32 in-graph).
    #[serde(default)]
    pub weights_dtype: WeightStorage,
    /// The tokenizer copied from next to the export (absent when the export had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// `model_type` of the `config.json` beside the export (gpt2, llama, opt, ...), when there is one: the graph
    /// alone does not say, and pfxrun's text commands format examples GPT-2's way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// `eos_token_id` of the export's `config.json` (or `generation_config.json`): for a model with its own
    /// tokens, pfxrun's text commands end the prompt and the target with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
    /// Every end-of-sequence id of the export's `generation_config.json` (else `config.json`), which Hugging
    /// Face's `generate` stops at: pfxrun's generation stops at any of them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eos_token_ids: Vec<u32>,
    /// The export's `forced_bos_token_id` (generation_config.json, else config.json): an encoder-decoder's first
    /// generated token, as Hugging Face's `generate` forces it (mBART-50's target language).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_bos_token_id: Option<u32>,
    /// The export's `forced_eos_token_id`: the token `generate` forces as the last one when the length limit is
    /// reached (BART's, Marian's and Pegasus's configs set `</s>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_eos_token_id: Option<u32>,
    /// The search settings of the export's generation config (beams, length penalty, n-gram bans, ...):
    /// `pfxrun generate`'s defaults, and those it does not apply.
    #[serde(default, skip_serializing_if = "is_default")]
    pub generation_settings: crate::inspect::GenerationSettings,
}

fn is_default<T: Default + PartialEq>(x: &T) -> bool {
    *x == T::default()
}

/// Forced tokens must be tokens of the model: HF's generate fails on one past the vocabulary, and pfx's search
/// would emit an id the model has no logits for.
pub(crate) fn check_forced_ids(config: &crate::inspect::ModelConfig, vocab: usize) -> Result<()> {
    let s = &config.search;
    let one = |id: Option<u32>| id.into_iter().collect::<Vec<_>>();
    let flat = |lists: &mut dyn Iterator<Item = &Vec<u32>>| lists.flatten().copied().collect::<Vec<_>>();
    // Token ids the generation settings force, ban or bias: HF's generate fails on one past the vocabulary.
    let listed = [
        ("forced_bos_token_id", one(config.forced_bos_token_id)),
        ("forced_eos_token_id", one(config.forced_eos_token_id)),
        ("suppress_tokens", s.suppress_tokens.clone()),
        ("begin_suppress_tokens", s.begin_suppress_tokens.clone()),
        ("bad_words_ids", flat(&mut s.bad_words_ids.iter())),
        ("sequence_bias", flat(&mut s.sequence_bias.iter().map(|b| &b.0))),
    ];
    for (key, ids) in listed {
        if let Some(id) = ids.into_iter().find(|&id| id as usize >= vocab) {
            let file = config
                .settings_file
                .as_ref()
                .map_or("the model's generation config".into(), |f| f.display().to_string());
            let what = if key.ends_with("_id") { format!("is {id}") } else { format!("holds {id}") };
            bail!("{file}: {key} {what}, past the model's vocabulary ({vocab} tokens): fix or remove it");
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OptimizerSpec {
    pub kind: String,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub max_grad_norm: Option<f32>,
}

impl From<&AdamW> for OptimizerSpec {
    fn from(o: &AdamW) -> Self {
        OptimizerSpec {
            kind: "adamw".into(),
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            max_grad_norm: o.max_grad_norm,
        }
    }
}

impl TensorSpec {
    /// Specs of f32 trainable tensors from (name, shape) pairs.
    pub fn f32_list(trainables: &[(String, Vec<usize>)]) -> Vec<TensorSpec> {
        trainables.iter().map(|(n, s)| TensorSpec { name: n.clone(), shape: s.clone(), dtype: "f32".into() }).collect()
    }
}

fn dtype_name(d: DType) -> String {
    d.short().to_string()
}

/// An export as read from disk, once: each graph built from it starts from a copy (the weights are shared).
pub struct Export {
    pub path: PathBuf,
    pub model: Model,
    /// The settings of the config.json / generation_config.json beside it.
    pub config: crate::inspect::ModelConfig,
}

impl Export {
    pub fn read(path: &Path) -> Result<Export> {
        // The model's JSON files first: a broken one is refused before the (large) graph is read.
        let config = crate::inspect::ModelConfig::beside(path)?;
        Ok(Export { path: path.to_path_buf(), model: onnx_io::load(path)?, config })
    }
}

/// The forward graph with the prefix injected, specialized, ending in `loss`. Inputs: the batch and the
/// trainable tensors.
pub fn build_loss_graph(
    source: &Path,
    opts: &CompileOptions,
) -> Result<(Model, PrefixShape, Injection, crate::inspect::ModelInfo)> {
    build_loss_graph_from(&Export::read(source)?, opts)
}

fn check_options(opts: &CompileOptions) -> Result<()> {
    if opts.prefix_len == 0 {
        bail!("--prefix-len must be at least 1");
    }
    if opts.mid_dim == Some(0) {
        bail!("--mid-dim must be at least 1");
    }
    check_tokens("--batch × (--prefix-len + --seq)", &[Some(opts.batch), opts.prefix_len.checked_add(opts.seq)])?;
    opts.optimizer.check()?;
    if let Some(gs) = &opts.generation {
        if gs.rows == 0 || gs.prompt_len == 0 || gs.max_new == 0 {
            bail!("--gen-rows, --prompt-len and --max-new must be at least 1 for generation graphs");
        }
        let capacity = opts.prefix_len.checked_add(gs.prompt_len).and_then(|n| n.checked_add(gs.max_new - 1));
        check_tokens("--gen-rows × (--prefix-len + --prompt-len + --max-new - 1)", &[Some(gs.rows), capacity])?;
    }
    Ok(())
}

/// Refuses sizes whose product (tokens in one graph run) overflows or passes 2^31: constants of that many
/// elements are built at compile time, and no runtime indexes past it.
pub(crate) fn check_tokens(what: &str, factors: &[Option<usize>]) -> Result<()> {
    let product = factors.iter().try_fold(1usize, |acc, f| f.and_then(|f| acc.checked_mul(f)));
    match product {
        Some(n) if n <= 1 << 31 => Ok(()),
        Some(n) => bail!("{what} = {n} tokens in one run is more than pfx builds graphs for (2^31); use smaller sizes"),
        None => bail!("{what} overflows: use smaller sizes"),
    }
}

/// GPT-2 numbers the real tokens after the prefix (as PEFT does), so the last position a graph reads,
/// `prefix + length - 1`, must be one of the model's position rows.
fn check_positions(what: &str, prefix_len: usize, length: usize, rows: usize) -> Result<()> {
    if prefix_len + length > rows {
        bail!(
            "--prefix-len {prefix_len} + {what} needs {} positions, but the model has {rows} (real tokens are \
             numbered after the prefix, as PEFT does); use smaller lengths",
            prefix_len + length
        );
    }
    Ok(())
}

/// [`build_loss_graph`] from an export already read.
pub fn build_loss_graph_from(
    export: &Export,
    opts: &CompileOptions,
) -> Result<(Model, PrefixShape, Injection, crate::inspect::ModelInfo)> {
    check_options(opts)?;
    let (raw, source) = (export.model.clone(), export.path.as_path());
    // Graphs pfx wrote (a bundle's) are rewritten already: say so when one does not compile.
    let written_by_pfx = raw.producer_name == "pfx";
    let not_an_export = |e: anyhow::Error| {
        if written_by_pfx {
            e.context(format!(
                "{} was written by pfx: if it is a graph of a bundle, compile the export the bundle was made from",
                source.display()
            ))
        } else {
            e
        }
    };
    let family = detect_family(&raw.graph);
    if family != Family::Gpt2Decoder {
        // Names like BART's do not make a BART graph (T5's are the same): say what it is not, first.
        let mut canon = raw.clone();
        if crate::canonicalize::canonicalize(&mut canon).is_ok() {
            crate::inspect::check_supported(&canon.graph, source, family)?;
        }
        let what = match family {
            Family::Unknown => "not a GPT-2 decoder".to_string(),
            f => format!("a {f} graph, not a GPT-2 decoder"),
        };
        return Err(not_an_export(anyhow::anyhow!(
            "{} is {what}: the GPT-2 path needs an export with input_ids in and logits out (BART exports go \
             through the BART path, with --bart-prefix)",
            source.display()
        )));
    }
    let info = inspect(&raw).with_context(|| format!("inspecting {}", source.display()))?;
    if let Some(why) = &info.unsupported {
        bail!("{} {why}", source.display());
    }
    let mut model = raw;
    crate::canonicalize::canonicalize(&mut model)?;
    let (Some(layers), Some(heads), Some(head_dim), Some(_), Some(vocab)) =
        (info.layers, info.heads, info.head_size, info.hidden, info.vocab)
    else {
        return Err(not_an_export(anyhow::anyhow!(
            "could not read the model's dimensions from {} (layers, heads, hidden, vocabulary): the attention or \
             the LM head does not look like GPT-2's; `pfxc inspect` shows what was found",
            source.display()
        )));
    };
    let _ = vocab;
    // Only exports with past inputs get generation graphs.
    let with_past = model.graph.inputs.iter().any(|v| v.name.starts_with("past_key_values"));
    let generation = opts.generation.as_ref().filter(|_| with_past);
    if let Some(rows) = info.positions {
        check_positions(&format!("--seq {}", opts.seq), opts.prefix_len, opts.seq, rows)?;
        if let Some(gs) = generation {
            // Generation feeds every token but the last one generated.
            let length = gs.prompt_len + gs.max_new - 1;
            let what = format!("--prompt-len {} + --max-new {} - 1", gs.prompt_len, gs.max_new);
            check_positions(&what, opts.prefix_len, length, rows)
                .context("for the generation graphs (--max-new 0 writes none)")?;
        }
    }
    if let Some(gs) = generation {
        generate::refuse_unread_window(&model.graph, export.config.sliding_window, gs, opts.prefix_len)?;
    }
    // Grouped-query attention: the prefix holds the key/value heads (the past's), as PEFT sizes it.
    let heads = if with_past {
        crate::inspect::key_value_heads(&model.graph, heads, head_dim)?
    } else {
        info.key_value_heads.unwrap_or(heads)
    };
    let shape =
        PrefixShape { len: opts.prefix_len, layers, heads, head_dim, hidden: heads * head_dim, mid: opts.mid_dim };
    shape.check_size()?;
    let g = &mut model.graph;
    let injection = if with_past { Injection::PastBinding } else { Injection::AttentionSites };
    if !with_past && crate::inspect::positions_from_mask(g) {
        // OPT: the real tokens are numbered from the mask (with the prefix's ones), as with past. An export that
        // numbers them in the graph (torch.onnx dynamo) first gets a `position_ids` input, 2 rows in.
        prefix::expose_positions(g)?;
        prefix::number_from_mask(g, opts.prefix_len, opts.batch, opts.seq)?;
    } else if !with_past {
        // A `position_ids` input (optimum's exports without past) holds 0..T in training; the lookup gets the
        // prefix offset below.
        // Rotary exports (no table) take P + 0..T there directly: PEFT's forward numbers the tokens after the
        // prefix's P cache positions, in every row.
        let rotary = info.positions.is_none();
        // torch.onnx dynamo's Llama computes them from the cache length: given a position_ids input there first.
        if rotary && !g.is_input("position_ids") && !generate::expose_rotary_positions(g)? {
            bail!(
                "{} has no past inputs, no position-embedding table, no position ids and no rotary angles pfx can \
                 feed (ALiBi biases, as Bloom and MPT have, are numbered inside the graph; torch.onnx dynamo reads \
                 GPT-J's and CodeGen's rotary tables at cache positions): pfx cannot number its \
                 tokens after the prefix. Export the model with past inputs (optimum's --task \
                 text-generation-with-past) and compile that (with --max-new 0 when its generation is refused too): \
                 its training graphs take the prefix as past keys and values, and the export numbers the positions \
                 itself",
                source.display()
            );
        }
        let first = if rotary { opts.prefix_len as i64 } else { 0 };
        if let Some(pos) = g.inputs.iter().position(|v| v.name == "position_ids") {
            let dt = g.inputs.remove(pos).ty.dtype;
            let ids: Vec<i64> = (0..opts.batch).flat_map(|_| first..first + opts.seq as i64).collect();
            g.initializers.insert("position_ids".into(), Tensor::i64(vec![opts.batch, opts.seq], ids).cast(dt)?);
        }
        let n = if rotary { 1 } else { prefix::shift_positions(g, opts.prefix_len)? };
        if n != 1 {
            bail!("expected one position-embedding lookup in the export, found {n}");
        }
    }
    // Local attentions' windows, read before specialization folds their tables (with past, the export's own
    // slicing already counts the prefix's keys).
    let windows = if with_past { Default::default() } else { crate::inspect::local_windows(g)? };
    // Windows computed from slot indices (Mistral's), per attention: specialization folds them into constants, and
    // the prefix's columns need them (a late query no longer sees the first prefix positions).
    let computed_windows = if with_past { Default::default() } else { crate::inspect::computed_window_softmaxes(g) };
    let dims = Dims {
        batch: opts.batch,
        seq: opts.seq,
        past: if with_past { Some(opts.prefix_len) } else { None },
        src_len: None,
    };
    specialize(&mut model, &dims).map_err(|e| {
        // A table or bias sized for fewer positions fails here when it is not a position table (MPT's ALiBi).
        e.context(format!(
            "specializing {} to batch {} with {} positions (--prefix-len {} + --seq {}): if the model holds fewer \
             (its config.json's max_position_embeddings, n_positions or max_seq_len), use smaller lengths",
            source.display(),
            opts.batch,
            opts.prefix_len + opts.seq,
            opts.prefix_len,
            opts.seq
        ))
    })?;
    let g = &mut model.graph;
    let kv = prefix::build_generator(g, &shape, "", opts.batch)?;
    match injection {
        Injection::PastBinding => {
            prefix::bind_past(g, &kv, opts.prefix_len, opts.batch, opts.seq, prefix::Positions::Training)?
        }
        Injection::AttentionSites => {
            prefix::inject_at_sites(g, &kv, shape.heads, opts.prefix_len, &windows, &computed_windows)?;
        }
    }
    // Re-infer every shape after the rewrites.
    let keep: Vec<String> = g.inputs.iter().map(|v| v.name.clone()).collect();
    g.types.retain(|k, _| keep.contains(k));
    simplify(g)?;
    let logits = "logits";
    if !g.is_output(logits) {
        bail!("the export has no 'logits' output");
    }
    loss::finish_with_loss(g, &gpt2_loss())?;
    simplify(g)?;
    Ok((model, shape, injection, info))
}

/// The compiled graphs, before writing.
pub struct Compiled {
    /// role -> graph: grads, train_step, eval_step, and prefill/decode when the export has past.
    pub graphs: Vec<(String, Model)>,
    pub shape: PrefixShape,
    pub injection: Injection,
    pub info: crate::inspect::ModelInfo,
    pub generation: Option<GenerationSpec>,
    /// The settings of the model's JSON files.
    pub config: crate::inspect::ModelConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerationSpec {
    pub rows: usize,
    pub prompt_len: usize,
    pub max_new: usize,
    /// Cache capacity C = P + prompt_len + max_new - 1.
    pub capacity: usize,
}

pub fn compile_models(source: &Path, opts: &CompileOptions) -> Result<Compiled> {
    crate::progress::stage(format_args!("reading and specializing {}", source.display()));
    let export = Export::read(source)?;
    let (eval, shape, injection, info) = build_loss_graph_from(&export, opts)?;
    let names: Vec<String> = shape.trainables("").into_iter().map(|t| t.0).collect();

    crate::progress::stage("building the gradients and the AdamW step");
    let mut graphs = training_graphs(eval, &names, &opts.optimizer, &gpt2_loss())?;
    let mut generation = None;
    if let (Some(gs), true) = (&opts.generation, injection == Injection::PastBinding) {
        crate::progress::stage("building the prefill graph");
        let prefill = generate::build_prefill(&export, &shape, gs, None)?;
        crate::progress::stage("building the decode graph");
        let decode = generate::build_decode(&export, shape.len, gs)?;
        let variants = [gpu_variant("prefill", &prefill, false)?, gpu_variant("decode", &decode, false)?];
        graphs.extend([("prefill".to_string(), prefill), ("decode".to_string(), decode)]);
        graphs.extend(variants.into_iter().flatten());
        generation = Some(GenerationSpec {
            rows: gs.rows,
            prompt_len: gs.prompt_len,
            max_new: gs.max_new,
            capacity: gs.capacity(shape.len),
        });
    }
    Ok(Compiled { graphs, shape, injection, info, generation, config: export.config })
}

/// From the loss graph: `grads` (loss and grad.<name>), `train_step` (AdamW on top) and `eval_step` (the loss
/// graph itself), each simplified.
/// GPT-2's loss: position t predicts token t+1.
fn gpt2_loss() -> loss::LossSpec {
    loss::LossSpec { logits: "logits".into(), shift: true, smoothing: 0.0 }
}

pub(crate) fn training_graphs(
    eval: Model,
    names: &[String],
    opt: &AdamW,
    loss_spec: &loss::LossSpec,
) -> Result<Vec<(String, Model)>> {
    let mut grads_model = eval.clone();
    let gg = &mut grads_model.graph;
    if gg.shape_of(&loss_spec.logits).is_none() {
        bail!("the loss graph has no value '{}' of known shape to differentiate from", loss_spec.logits);
    }
    // The backward pass starts in closed form: at the LM head's input when the logits come from a frozen
    // linear head (no [B, T, V] gradient at all), else at the logits.
    let (root, droot) = match loss::add_hidden_gradient(gg, loss_spec)? {
        Some(seed) => seed,
        None => (loss_spec.logits.clone(), loss::add_logits_gradient(gg, loss_spec)?),
    };
    let grads = build_gradients_from(gg, &root, &droot, names)?;
    for (name, gr) in &grads {
        let out = format!("grad.{name}");
        let id = gg.fresh(&format!("{out}.node"));
        gg.nodes.push(crate::ir::Node::new(id, "Identity", vec![gr.clone()], vec![out.clone()]));
        let s = gg.shape_of(name).unwrap_or_default();
        gg.outputs.push(ValueInfo { name: out, ty: ValueType::known(DType::F32, &s) });
    }
    let mut train_model = grads_model.clone();
    simplify(&mut grads_model.graph)?;
    let tg = &mut train_model.graph;
    tg.outputs.truncate(1);
    let grad_values: BTreeMap<String, String> = names.iter().map(|n| (n.clone(), format!("grad.{n}"))).collect();
    optimizer::add_adamw(tg, &grad_values, opt);
    simplify(tg)?;
    let mut eval = eval;
    for g in [&mut grads_model.graph, &mut train_model.graph, &mut eval.graph] {
        lower::lower_for_runtime(g)?;
    }
    let mut graphs = vec![
        ("grads".to_string(), grads_model),
        ("train_step".to_string(), train_model),
        ("eval_step".to_string(), eval),
    ];
    // Each again for ONNX Runtime on GPUs: the loss read off a LogSoftmax (`loss::loss_via_log_softmax`).
    for i in 0..graphs.len() {
        let (role, m) = &graphs[i];
        let variant = gpu_variant(role, m, true)?.expect("a loss graph always has a GPU variant");
        graphs.push(variant);
    }
    Ok(graphs)
}

/// The graph `role` for ONNX Runtime on a GPU, when it differs: with `loss`, the loss read off a LogSoftmax
/// (an error if the graph has none) and the LayerNorm statistics from the forward nodes
/// (`lower::layer_norm_stats_from_forward`); and cubes as `Pow` (`lower::cubes_as_powers`: ORT's GELU fusion).
pub fn gpu_variant(role: &str, m: &Model, loss: bool) -> Result<Option<(String, Model)>> {
    let mut m = m.clone();
    if loss {
        if !loss::loss_via_log_softmax(&mut m.graph)? {
            bail!("the {role} graph has no loss to read off a LogSoftmax");
        }
        lower::layer_norm_stats_from_forward(&mut m.graph)?;
    }
    let cubes = lower::cubes_as_powers(&mut m.graph)?;
    Ok((loss || cubes > 0).then(|| (format!("{role}{GPU_VARIANT}"), m)))
}

/// The suffix of a graph's role (and file stem) in the variant for ONNX Runtime on a GPU: the same inputs and
/// outputs as the role without it (the manifest's `io` lists only that one).
pub const GPU_VARIANT: &str = ".gpu";

/// Compiles the whole bundle into `out_dir`.
pub fn compile(source: &Path, opts: &CompileOptions, out_dir: &Path) -> Result<Manifest> {
    let export_dir = source.parent().unwrap_or(Path::new("."));
    bundle_dir::BundleDir::check(out_dir, export_dir, "export")?;
    let mut c = compile_models(source, opts)?;
    if let Some(vocab) = c.info.vocab {
        check_forced_ids(&c.config, vocab)?;
    }
    let trainables = c.shape.trainables("");
    let names: Vec<String> = trainables.iter().map(|t| t.0.clone()).collect();
    let dir = bundle_dir::BundleDir::create(out_dir, export_dir, "export")?;
    let mut weights = WeightsFile::create(&dir.path("weights.bin"))?;
    let mut io = BTreeMap::new();
    let mut files = BTreeMap::new();
    let mut rounded = storage::Rounded::default();
    for (role, m) in &mut c.graphs {
        storage::store_weights_with(&mut m.graph, opts.weights, &mut rounded);
        let file = format!("{role}.onnx");
        crate::progress::stage(format_args!("writing {file}"));
        onnx_io::save(m, &dir.path(&file), Some(&mut weights))?;
        if !role.ends_with(GPU_VARIANT) {
            io.insert(role.to_string(), graph_io(m, &file, &names));
        }
        files.insert(role.to_string(), file);
    }
    // The tokenizer next to the model travels with the bundle (pfxrun finds it there).
    let tokenizer = bundle_dir::copy_tokenizer(&dir, source.parent().map(|d| d.join("tokenizer.json")).as_deref())?;
    let init = init::init_prefix(&c.shape, opts.seed);
    init::write_safetensors(&dir.path("prefix.init.safetensors"), &init)?;
    let (shape, info) = (&c.shape, &c.info);
    let manifest = Manifest {
        format: BUNDLE_FORMAT.into(),
        compiler_version: env!("CARGO_PKG_VERSION").into(),
        family: "gpt2".into(),
        source_model: source.display().to_string(),
        source_exporter: info.exporter.clone(),
        injection: c.injection,
        batch: opts.batch,
        seq_len: opts.seq,
        prefix_len: opts.prefix_len,
        reparam: opts.mid_dim.is_some(),
        mid_dim: opts.mid_dim,
        layers: shape.layers,
        heads: shape.heads,
        head_dim: shape.head_dim,
        hidden: shape.hidden,
        vocab: info.vocab.unwrap_or(0),
        optimizer: OptimizerSpec::from(&opts.optimizer),
        trainable: TensorSpec::f32_list(&trainables),
        graphs: files,
        io,
        weights_file: "weights.bin".into(),
        init: "prefix.init.safetensors".into(),
        generation: c.generation.clone(),
        baked: false,
        weights_dtype: opts.weights,
        tokenizer,
        model_type: c.config.model_type.clone(),
        eos_token_id: c.config.eos_token_id,
        eos_token_ids: c.config.eos_token_ids.clone(),
        forced_bos_token_id: c.config.forced_bos_token_id,
        forced_eos_token_id: c.config.forced_eos_token_id,
        generation_settings: c.config.search.clone(),
    };
    dir.finish(&serde_json::to_string_pretty(&manifest)?)?;
    Ok(manifest)
}

fn role_of(name: &str, trainables: &[String]) -> &'static str {
    if trainables.iter().any(|t| t == name) {
        "trainable"
    } else if name.starts_with("adam.") {
        "optimizer_state"
    } else if name.starts_with("new.adam.") {
        "updated_optimizer_state"
    } else if name.starts_with("new.") {
        "updated_trainable"
    } else if name.starts_with("grad.") {
        "gradient"
    } else if name == "loss" {
        "loss"
    } else if name == "grad_norm" {
        "metric"
    } else if name == "lr" || name == "step" {
        "hyperparameter"
    } else {
        "batch"
    }
}

pub(crate) fn graph_io(m: &Model, file: &str, trainables: &[String]) -> GraphIo {
    let conv = |v: &ValueInfo| {
        let ty = m.graph.type_of(&v.name).unwrap_or_else(|| v.ty.clone());
        IoRole {
            name: v.name.clone(),
            shape: ty.concrete().unwrap_or_default(),
            dtype: dtype_name(ty.dtype),
            role: role_of(&v.name, trainables).into(),
        }
    };
    GraphIo {
        file: file.into(),
        inputs: m.graph.inputs.iter().map(conv).collect(),
        outputs: m.graph.outputs.iter().map(conv).collect(),
    }
}

/// Reads a bundle's manifest.
/// The error for a bundle without generation graphs, saying how such a bundle comes about and what to do.
pub fn no_generation_graphs(bundle: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} has no generation graphs: it was compiled with --max-new 0, or from an export without past inputs \
         (BART: without decoder_with_past_model.onnx). Compile again from an export with past inputs, with --max-new \
         above 0; exports whose positions pfx cannot number in a fixed-size cache (rotary tables read at the cache \
         position, as torch.onnx dynamo exports GPT-J and CodeGen) compile for training and eval only",
        bundle.display()
    )
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let p: PathBuf = dir.join("manifest.json");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {} (is this a pfx bundle?)", p.display()))?;
    let m: Manifest =
        serde_json::from_str(&text).with_context(|| format!("{} is not a valid pfx manifest", p.display()))?;
    if m.batch == 0 || m.seq_len == 0 || m.batch.checked_mul(m.seq_len).is_none_or(|n| n > 1 << 31) {
        bail!(
            "{}: batch {} × seq_len {} is not a size pfx compiles; the manifest is damaged",
            p.display(),
            m.batch,
            m.seq_len
        );
    }
    if m.format != BUNDLE_FORMAT {
        bail!(
            "{} is a '{}' bundle; this pfx ({}) reads '{BUNDLE_FORMAT}': compile the export again with this pfxc",
            p.display(),
            m.format,
            env!("CARGO_PKG_VERSION")
        );
    }
    Ok(m)
}

/// The bundle layout this compiler writes and the runtime reads.
pub const BUNDLE_FORMAT: &str = "pfx-bundle/1";
