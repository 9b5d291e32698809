//! BART: optimum's encoder and decoder exports linked into one prefix-tuning training graph.
//!
//! The pipeline, top to bottom (`build_bart_loss_graph`):
//!
//! 1. find the export's graphs (`encoder_model.onnx`, and `decoder_model.onnx` or the merged decoder, whose
//!    no-cache branch is taken) and its `config.json` (pad and decoder-start tokens);
//! 2. canonicalize both; in `peft` mode number the decoder's positions from P (PEFT's cache makes HF do so);
//! 3. specialize the encoder to [B, S] and the decoder to [B, T] over a source of length S;
//! 4. link: the decoder's names that clash with the encoder's are renamed, its `encoder_hidden_states` reads the
//!    encoder's `last_hidden_state`, its `encoder_attention_mask` the source `attention_mask`, and its
//!    `input_ids` are derived from `labels` as HF's `shift_tokens_right` does;
//! 5. find the attention sites (encoder self-attention; decoder self-attention and cross-attention, told apart by
//!    what their keys are computed from) and bind the prefix there (`prefix::inject_one`);
//! 6. the loss: mean cross-entropy over labels != -100 without a shift, optionally label-smoothed.
//!
//! Then, as for GPT-2: gradients (`autodiff`), AdamW, and a bundle with a shared weights file.
//!
//! Two prefix designs (`BartPrefix`):
//! - `Paper` (Li & Liang's reference code): three independent generators `enc.*`, `dec.*`, `cross.*`; layer l of a
//!   site reads rows 2l (keys) and 2l+1 (values) of its generator; no position shift.
//! - `Peft` (PEFT 0.21's `PeftModelForSeq2SeqLM`, checked by `graphs/bart-ref/make_bart_references.py`): one
//!   generator of L = max(encoder, decoder layers) layers; PEFT duplicates its [2L, H, P, D] table and splits it
//!   in fours, so decoder layer i reads rows (4i mod 2L, 4i+1 mod 2L) for its self-attention; the four-row
//!   chunks' "cross" rows are discarded (PEFT empties the cross-attention cache), so the encoder and the
//!   cross-attention see no prefix; the decoder's positions start at P.
//!
//! Not here yet: generation graphs. The plan: (1) `bart_encode.onnx` = the encoder with the `enc.*` prefix bound
//! (as above, specialized to [R, S]) that also outputs, per decoder layer, the cross-attention keys/values
//! [R, H, P+S, D] with the `cross.*` prefix in front (the decoder_model's `present.{i}.encoder.*` computation,
//! concatenated) and the widened source mask [R, P+S]; (2) `bart_decode.onnx` from `decoder_with_past_model.onnx`
//! specialized with past = capacity C (self cache) and encoder length P+S (cross cache fed once), its positions
//! exposed as an input (paper: from 0; peft: from P) and a self-attention mask input added at the site (the with-past
//! export has none, and a fixed-capacity cache needs one), returning only the new token's self keys/values; the
//! self cache is seeded with the `dec.*` (paper) or PEFT-row prefix in its first P slots. The runtime loop (greedy /
//! beam over that cache) belongs to `pfx-runtime`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::optimizer::AdamW;
use super::prefix::{self, PrefixShape};
use super::{init, loss, Injection, Manifest, OptimizerSpec, TensorSpec};
use crate::inspect::{detect_family, inspect, Family, ModelInfo};
use crate::ir::{Attr, Graph, Model, Node, ValueInfo, ValueType};
use crate::onnx_io::{self, WeightsFile};
use crate::simplify::simplify;
use crate::specialize::{specialize, Dims};
use crate::tensor::{DType, Tensor};

/// Which attentions get a prefix, laid out how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BartPrefix {
    /// Every attention (encoder self, decoder self, cross), three generators.
    Paper,
    /// PEFT 0.21's layout: decoder self-attention only, one generator, positions shifted.
    Peft,
}

impl std::str::FromStr for BartPrefix {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "paper" => Ok(BartPrefix::Paper),
            "peft" => Ok(BartPrefix::Peft),
            _ => bail!("--bart-prefix must be 'paper' or 'peft' (got '{s}')"),
        }
    }
}

impl std::fmt::Display for BartPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BartPrefix::Paper => "paper",
            BartPrefix::Peft => "peft",
        })
    }
}

#[derive(Clone, Debug)]
pub struct BartOptions {
    pub mode: BartPrefix,
    pub prefix_len: usize,
    /// MLP width; None = `--no-reparam`.
    pub mid_dim: Option<usize>,
    pub batch: usize,
    /// Source length S (encoder).
    pub src_len: usize,
    /// Target length T (decoder, labels).
    pub tgt_len: usize,
    /// Label smoothing ε (0 = plain cross-entropy), as torch's `cross_entropy(label_smoothing=ε)`.
    pub label_smoothing: f32,
    pub optimizer: AdamW,
    pub seed: u64,
    /// Generation graphs (encode, decode) to emit.
    pub generation: Option<super::bart_generate::BartGenShape>,
    /// Element type of the frozen weights in `weights.bin`.
    pub weights: super::storage::WeightStorage,
    /// The source and target languages of mBART, M2M100 or NLLB, which frame their text rows and start generation.
    pub languages: Option<Languages>,
}

/// The source and target language codes of mBART (its tokenizer's tokens: `en_XX`, `ro_RO`, ...), NLLB (`eng_Latn`)
/// or M2M100 (`en` for its `__en__`). Their tokenizers put the source's code around every source and the target's
/// around every target (mBART-cc25: `text </s> code`; mBART-50, NLLB, M2M100: `code text </s>`), and generation
/// starts the target language's text with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Languages {
    pub source: String,
    pub target: String,
    /// NLLB's framing as the export's tokenizer_config.json sets it (`legacy_behaviour`: `text </s> code`), which HF
    /// follows whatever the tokenizer.json's post-processor says; recorded by `pfxc compile`, since only the
    /// tokenizer.json is copied into the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nllb_legacy: Option<bool>,
}

/// The files of an optimum export and the few config values the graph needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BartExport {
    pub dir: PathBuf,
    pub encoder: PathBuf,
    pub decoder: PathBuf,
    /// The decoder is optimum's merged one (an If on `use_cache_branch`); its no-cache branch is used.
    pub merged: bool,
    pub pad_token_id: i64,
    pub decoder_start_token_id: i64,
    /// The config's `model_type`: one of [`BART_LAYOUT_MODELS`].
    pub model_type: String,
    /// Everything pfx reads from the folder's config.json / generation_config.json.
    pub config: crate::inspect::ModelConfig,
}

/// The `model_type`s the BART path compiles: BART, and the encoder-decoders optimum exports in its layout whose
/// differences are all inside the graphs (Marian's, Pegasus's and BlenderBot's position tables start at row 0,
/// `inspect::table_offset` reads that off the graph; M2M100's (and NLLB-200's) positions are numbered from the token
/// ids in the graph, `inspect::numbered_from_ids`, which `prefix::shift_positions` and `expose_positions` rewrite;
/// pre-LayerNorm; BlenderBot-small's embedding LayerNorm), or that pfx handles (mBART's decoder inputs,
/// `add_decoder_inputs`; T5's relative position bias over the prefix, `super::t5`).
pub const BART_LAYOUT_MODELS: &[&str] =
    &["bart", "marian", "pegasus", "mbart", "blenderbot", "blenderbot-small", "m2m_100", "t5", "mt5"];

/// Sizes read off the two graphs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BartDims {
    pub encoder_layers: usize,
    pub encoder_heads: usize,
    pub decoder_layers: usize,
    pub decoder_heads: usize,
    pub hidden: usize,
    pub vocab: usize,
    /// Positions each side can number (BART's table has 2 more rows: its offset).
    pub encoder_positions: Option<usize>,
    pub decoder_positions: Option<usize>,
    /// T5's relative position bias instead of positions (`super::t5`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relative_bias: bool,
}

/// One prefix generator: its name prefix (`enc.`, `dec.`, `cross.`, or none) and sizes.
#[derive(Clone, Debug)]
pub struct Generator {
    pub site: String,
    pub shape: PrefixShape,
}

impl Generator {
    pub fn trainables(&self) -> Vec<(String, Vec<usize>)> {
        self.shape.trainables(&self.site)
    }
}

/// The linked forward graph ending in `loss`, and what was bound where.
pub struct BartLoss {
    pub model: Model,
    pub export: BartExport,
    pub dims: BartDims,
    pub generators: Vec<Generator>,
}

impl BartLoss {
    pub fn trainables(&self) -> Vec<(String, Vec<usize>)> {
        self.generators.iter().flat_map(|g| g.trainables()).collect()
    }
}

/// Finds the graphs of an optimum export folder (and refuses what is not one, saying why).
pub fn find_export(dir: &Path) -> Result<BartExport> {
    if dir.is_file() {
        let what = match onnx_io::load(dir) {
            Ok(m) => match detect_family(&m.graph) {
                Family::Gpt2Decoder => "a GPT-2 (decoder-only) graph".to_string(),
                Family::BartEncoder | Family::BartDecoder => {
                    format!("one graph of a BART export ({})", detect_family(&m.graph))
                }
                f => format!("a {f} graph"),
            },
            Err(_) => "a file".to_string(),
        };
        bail!(
            "{} is {what}; --bart-prefix needs the folder that `optimum-cli export onnx --task \
             text2text-generation-with-past` writes (encoder_model.onnx and decoder_model.onnx); \
             GPT-2 exports are compiled without --bart-prefix",
            dir.display()
        );
    }
    if !dir.is_dir() {
        bail!("{} does not exist (expected a BART export folder)", dir.display());
    }
    let encoder = dir.join("encoder_model.onnx");
    if !encoder.exists() {
        bail!(
            "{} has no encoder_model.onnx: --bart-prefix needs optimum's BART export folder \
             (encoder_model.onnx and decoder_model.onnx or decoder_model_merged.onnx)",
            dir.display()
        );
    }
    let (decoder, merged) = if dir.join("decoder_model.onnx").exists() {
        (dir.join("decoder_model.onnx"), false)
    } else if dir.join("decoder_model_merged.onnx").exists() {
        (dir.join("decoder_model_merged.onnx"), true)
    } else {
        let with_past = dir.join("decoder_with_past_model.onnx").exists();
        bail!(
            "{} has no decoder: training needs decoder_model.onnx (or optimum's decoder_model_merged.onnx){}",
            dir.display(),
            if with_past {
                "; decoder_with_past_model.onnx alone cannot train (it reads cached cross-attention keys, not the \
                 encoder's output)"
            } else {
                ""
            }
        );
    };
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        bail!(
            "{} has no config.json (optimum writes it next to the graphs; pfx reads which model this is, pad_token_id \
             and decoder_start_token_id from it)",
            dir.display()
        );
    }
    // beside() reads the JSON files of the folder that holds its argument.
    let config = crate::inspect::ModelConfig::beside(&cfg_path)?;
    // Other encoder-decoders export the same graph names and could compile without complaint into wrong graphs
    // (T5 has relative attention). So the config must name a model whose differences from BART live in the graphs
    // (sinusoidal or offset-free position tables, M2M100's positions numbered from the ids, pre-LayerNorm, scaled
    // embeddings, BlenderBot-small's embedding LayerNorm) or that pfx handles (mBART's decoder inputs), checked
    // against PyTorch + PEFT (tests/compile_bart.rs, tests/generate_bart.rs).
    let model_type = match config.model_type.as_deref() {
        Some(t) if BART_LAYOUT_MODELS.contains(&t) => t.to_string(),
        Some(other) => bail!(
            "{} says model_type \"{other}\": the BART path compiles {} exports only (pfx checks their graphs against \
             their PyTorch code)",
            cfg_path.display(),
            BART_LAYOUT_MODELS.join(", ")
        ),
        None => bail!(
            "{} does not say which model this is (no model_type): the BART path compiles {} exports only, and other \
             encoder-decoders exported in BART's layout (T5) would compile into wrong graphs. If the export \
             is one of those, add its \"model_type\" (e.g. \"bart\") to the file",
            cfg_path.display(),
            BART_LAYOUT_MODELS.join(", ")
        ),
    };
    let needed = |id: Option<u32>, k: &str| -> Result<i64> {
        id.map(i64::from)
            .ok_or_else(|| anyhow!("{} has no '{k}' (needed to derive the decoder inputs)", cfg_path.display()))
    };
    Ok(BartExport {
        dir: dir.to_path_buf(),
        encoder,
        decoder,
        merged,
        pad_token_id: needed(config.pad_token_id, "pad_token_id")?,
        // As generate(): else bos_token_id (mBART-cc25's config has no start; its users start with the target
        // language, --tgt-lang).
        decoder_start_token_id: needed(
            config.decoder_start_token_id.or(config.bos_token_id),
            "decoder_start_token_id",
        )?,
        model_type,
        config,
    })
}

/// Whether an export folder has a decoder generation can decode with (with past, or merged).
pub fn has_decoder_with_past(dir: &Path) -> bool {
    dir.join("decoder_with_past_model.onnx").exists() || dir.join("decoder_model_merged.onnx").exists()
}

/// Replaces optimum's merged decoder (one If on `use_cache_branch`) by one of its branches.
pub(super) fn take_branch(m: &mut Model, cache: bool) -> Result<()> {
    let g = &mut m.graph;
    let Some(i) =
        g.nodes.iter().position(|n| n.op == "If" && n.inputs.first().map(|c| c == "use_cache_branch").unwrap_or(false))
    else {
        bail!("the merged decoder has no If on use_cache_branch");
    };
    let node = g.nodes.remove(i);
    // use_cache_branch true takes then_branch (the with-past decoder), false else_branch (no past).
    let key = if cache { "then_branch" } else { "else_branch" };
    let Some(Attr::Graph(branch)) = node.attrs.get(key) else {
        bail!("{}: no {key}", node.label());
    };
    let branch = (**branch).clone();
    for (k, t) in branch.initializers {
        g.initializers.insert(k, t);
    }
    for (k, t) in branch.types {
        g.types.insert(k, t);
    }
    for (j, n) in branch.nodes.into_iter().enumerate() {
        g.nodes.insert(i + j, n);
    }
    for (out, bout) in node.outputs.iter().zip(&branch.outputs) {
        // A branch output may already carry the If's output name (optimum's cache branch does).
        if out.is_empty() || *out == bout.name {
            continue;
        }
        let name = format!("{out}.branch_output");
        g.nodes.push(Node::new(name, "Identity", vec![bout.name.clone()], vec![out.clone()]));
    }
    g.inputs.retain(|v| v.name != "use_cache_branch");
    g.forget_names();
    g.toposort()?;
    g.dce();
    Ok(())
}

/// Loads one graph of a BART-layout export. T5's (`t5`) look up their relative position bias table where other
/// models look up positions: it is neither refused nor taken for a position table (T5 has no length limit).
pub(super) fn load_part(path: &Path, want: Family, merged: bool, t5: bool) -> Result<(Model, ModelInfo)> {
    let mut m = onnx_io::load(path)?;
    let fam = detect_family(&m.graph);
    if fam != want {
        bail!("{} is a {fam} graph, expected the {want}", path.display());
    }
    if merged {
        take_branch(&mut m, false).with_context(|| format!("taking the no-cache branch of {}", path.display()))?;
    }
    let mut info = inspect(&m).with_context(|| format!("inspecting {}", path.display()))?;
    if t5 {
        info.as_t5(&m.graph);
    }
    if let Some(why) = &info.unsupported {
        bail!("{} {why}", path.display());
    }
    crate::canonicalize::canonicalize(&mut m).map_err(|e| e.context(format!("canonicalizing {}", path.display())))?;
    Ok((m, info))
}

/// Adds `value` to the scores the Softmax `softmax` reads (a mask, T5's prefix bias), through a node named `hint`.
pub(super) fn add_to_scores(g: &mut Graph, softmax: &str, value: &str, hint: &str) -> Result<()> {
    let i = g.nodes.iter().position(|n| n.name == softmax).ok_or_else(|| anyhow!("no Softmax '{softmax}'"))?;
    let scores = g.nodes[i].inputs[0].clone();
    let sum = g.op1("Add", &[&scores, value], vec![], hint);
    g.nodes[i].inputs[0] = sum;
    Ok(())
}

/// The rank-4 attention softmaxes, in graph order, with the value their QK MatMul reads as keys.
pub(super) fn attention_softmaxes(g: &Graph) -> Vec<(String, String)> {
    let prod = g.producers();
    let mut out = Vec::new();
    for n in &g.nodes {
        if n.op != "Softmax" {
            continue;
        }
        let Some(shape) = g.shape_of(&n.inputs[0]).filter(|s| s.len() == 4) else { continue };
        // Breadth-first back through elementwise ops to the nearest MatMul of the scores' shape.
        let mut frontier = vec![n.inputs[0].clone()];
        let mut keys = None;
        'search: for _ in 0..8 {
            let mut next = Vec::new();
            for v in &frontier {
                let Some(&i) = prod.get(v) else { continue };
                let p = &g.nodes[i];
                if p.op == "MatMul" && g.shape_of(&p.outputs[0]).as_deref() == Some(&shape[..]) {
                    keys = Some(p.inputs[1].clone());
                    break 'search;
                }
                if matches!(p.op.as_str(), "Add" | "Sub" | "Mul" | "Div" | "Where" | "Cast" | "Max" | "Min") {
                    next.extend(p.inputs.iter().filter(|x| !x.is_empty()).cloned());
                }
            }
            frontier = next;
        }
        if let Some(k) = keys {
            out.push((n.name.clone(), k));
        }
    }
    out
}

/// Values computed (through any ops) from `root`.
pub(super) fn derived_from(g: &Graph, root: &str) -> HashSet<String> {
    let mut set: HashSet<String> = [root.to_string()].into();
    for n in &g.nodes {
        if n.inputs.iter().any(|i| set.contains(i)) {
            set.extend(n.outputs.iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    set
}

/// The decoder's attention sites: (self-attention softmaxes, cross-attention softmaxes), each in layer order.
/// A cross-attention's keys are computed from the encoder's output and not from the decoder's tokens.
/// `skip`: the encoder's sites (linked in front).
fn decoder_sites(g: &Graph, tokens: &str, memory: &str, skip: &[String]) -> Result<(Vec<String>, Vec<String>)> {
    let from_tokens = derived_from(g, tokens);
    let from_memory = derived_from(g, memory);
    let (mut selfs, mut crosses) = (Vec::new(), Vec::new());
    for (sm, k) in attention_softmaxes(g) {
        if skip.contains(&sm) {
            continue;
        }
        match (from_tokens.contains(&k), from_memory.contains(&k)) {
            (false, true) => crosses.push(sm),
            (true, _) => selfs.push(sm),
            (false, false) => bail!("cannot tell what the keys of attention '{sm}' are computed from"),
        }
    }
    Ok((selfs, crosses))
}

/// Every name a graph defines or uses (inputs, outputs, initializers, node names and outputs).
fn names_of(g: &Graph) -> HashSet<String> {
    let mut s: HashSet<String> = g.inputs.iter().chain(&g.outputs).map(|v| v.name.clone()).collect();
    s.extend(g.initializers.keys().cloned());
    for n in &g.nodes {
        s.insert(n.name.clone());
        s.extend(n.outputs.iter().cloned());
    }
    s
}

/// Renames values and nodes of `g` by `map` (names not in it stay).
fn rename_all(g: &mut Graph, map: &HashMap<String, String>) {
    let r = |s: &mut String| {
        if let Some(n) = map.get(s.as_str()) {
            *s = n.clone();
        }
    };
    for n in &mut g.nodes {
        r(&mut n.name);
        n.inputs.iter_mut().for_each(r);
        n.outputs.iter_mut().for_each(r);
    }
    g.inputs.iter_mut().for_each(|v| r(&mut v.name));
    g.outputs.iter_mut().for_each(|v| r(&mut v.name));
    g.initializers =
        std::mem::take(&mut g.initializers).into_iter().map(|(k, t)| (map.get(&k).cloned().unwrap_or(k), t)).collect();
    g.types = std::mem::take(&mut g.types).into_iter().map(|(k, t)| (map.get(&k).cloned().unwrap_or(k), t)).collect();
    g.forget_names();
}

/// Names the decoder's three linking inputs take in the linked graph.
const DECODER_IDS: &str = "decoder_input_ids";

/// Links the specialized encoder and decoder into one graph: inputs `input_ids`, `attention_mask` (the
/// source) and `labels`; output `logits`. Returns the graph and the names of the encoder's output and of the
/// decoder's token ids inside it.
pub(super) fn link(
    enc: Model,
    mut dec: Model,
    export: &BartExport,
    batch: usize,
    tgt: usize,
    keep_output: &dyn Fn(&str) -> bool,
) -> Result<(Model, String)> {
    let e = &enc.graph;
    let memory = match e.outputs.iter().find(|o| o.name == "last_hidden_state").or(e.outputs.first()) {
        Some(o) => o.name.clone(),
        None => bail!("the encoder graph has no output"),
    };
    let d = &mut dec.graph;
    if d.nodes.iter().any(|n| n.attrs.values().any(|a| matches!(a, Attr::Graph(_)))) {
        bail!("the decoder still has subgraphs after specialization; pfx cannot link it");
    }
    // The decoder's inputs must match what feeds them.
    let check = |d: &Graph, din: &str, ev: &str| -> Result<()> {
        let (Some(a), Some(b)) = (d.type_of(din), e.type_of(ev)) else { return Ok(()) };
        if a != b {
            bail!(
                "the decoder's '{din}' is {} but the encoder gives '{ev}' as {}: the encoder and decoder do not \
                 fit together (mismatched hidden sizes?)",
                a.describe(),
                b.describe()
            );
        }
        Ok(())
    };
    if !d.is_input("input_ids") {
        bail!("the decoder graph has no input_ids input");
    }
    if !d.is_input("encoder_hidden_states") {
        bail!("the decoder graph does not read encoder_hidden_states; pfx links the encoder's output there");
    }
    check(d, "encoder_hidden_states", &memory)?;
    check(d, "encoder_attention_mask", "attention_mask")?;
    // Training keeps only the logits; generation's encode graph only the cross-attention keys/values.
    d.outputs.retain(|o| keep_output(&o.name));
    if d.outputs.is_empty() {
        bail!("the decoder graph has none of the outputs pfx needs (logits, present.*.encoder.*)");
    }
    d.dce();
    // Rename what clashes; identical initializers are shared.
    let taken = names_of(e);
    let mut map: HashMap<String, String> = HashMap::new();
    map.insert("input_ids".into(), DECODER_IDS.into());
    map.insert("encoder_hidden_states".into(), memory.clone());
    map.insert("encoder_attention_mask".into(), "attention_mask".into());
    let mut used = taken.clone();
    used.extend(names_of(d));
    let mut fresh = |name: &str| {
        let mut cand = format!("decoder/{name}");
        let mut i = 1;
        while used.contains(&cand) {
            cand = format!("decoder/{name}_{i}");
            i += 1;
        }
        used.insert(cand.clone());
        cand
    };
    let mut values: Vec<String> = d.initializers.keys().cloned().collect();
    for n in &d.nodes {
        values.push(n.name.clone());
        values.extend(n.outputs.iter().filter(|o| !o.is_empty()).cloned());
    }
    for v in values {
        if map.contains_key(&v) || !taken.contains(&v) {
            continue;
        }
        let same_constant = matches!((d.initializers.get(&v), e.initializers.get(&v)), (Some(a), Some(b)) if a == b);
        if same_constant {
            continue;
        }
        map.insert(v.clone(), fresh(&v));
    }
    if d.is_input(DECODER_IDS) || taken.contains(DECODER_IDS) {
        bail!("the export already uses the name '{DECODER_IDS}'");
    }
    rename_all(d, &map);

    let mut g = Graph::default();
    g.name = "bart".into();
    g.inputs = e.inputs.clone();
    g.outputs = d.outputs.clone();
    g.nodes = e.nodes.clone();
    g.nodes.extend(d.nodes.iter().cloned());
    g.initializers = e.initializers.clone();
    for (k, t) in &d.initializers {
        g.initializers.insert(k.clone(), t.clone());
    }
    g.types = e.types.clone();
    g.types.extend(d.types.iter().map(|(k, v)| (k.clone(), v.clone())));
    g.forget_names();
    add_decoder_inputs(&mut g, export, batch, tgt)?;
    g.toposort()?;
    let model = Model {
        graph: g,
        opset: enc.opset.max(dec.opset),
        other_opsets: enc.other_opsets.clone(),
        ir_version: enc.ir_version.max(dec.ir_version),
        producer_name: enc.producer_name.clone(),
        producer_version: enc.producer_version.clone(),
        functions: Vec::new(),
        metadata: Vec::new(),
    };
    Ok((model, memory))
}

/// `decoder_input_ids` = HF's `shift_tokens_right(labels, pad, decoder_start)`: the start token first, then
/// labels[:, :-1], with -100 replaced by pad. Adds the `labels` input i64[B, T].
///
/// mBART's shift has no start token: each row starts with its own labels' token at index (count of labels that
/// are neither -100 nor pad) - 1, the language code its tokenizer ends a target with (mBART-50's `</s>`).
fn add_decoder_inputs(g: &mut Graph, export: &BartExport, batch: usize, tgt: usize) -> Result<()> {
    g.inputs.push(ValueInfo { name: "labels".into(), ty: ValueType::known(DType::I64, &[batch, tgt]) });
    let start = if export.model_type == "mbart" {
        mbart_start(g, export.pad_token_id)
    } else {
        g.add_const("decoder_inputs/start", Tensor::i64(vec![batch, 1], vec![export.decoder_start_token_id; batch]))
    };
    let shifted = if tgt > 1 {
        let i = |g: &mut Graph, v: i64| g.add_const("decoder_inputs/i", Tensor::vec_i64(&[v]));
        let (s0, e, ax) = (i(g, 0), i(g, tgt as i64 - 1), i(g, 1));
        let head = g.op1("Slice", &["labels", &s0, &e, &ax], vec![], "decoder_inputs/labels_head");
        g.op1("Concat", &[&start, &head], vec![("axis", Attr::Int(1))], "decoder_inputs/shifted")
    } else {
        start
    };
    let ignore = g.add_const("decoder_inputs/ignore_index", Tensor::scalar_i64(-100));
    let pad = g.add_const("decoder_inputs/pad", Tensor::scalar_i64(export.pad_token_id));
    let ignored = g.op1("Equal", &[&shifted, &ignore], vec![], "decoder_inputs/ignored");
    let node = g.fresh("decoder_inputs/where");
    g.nodes.push(Node::new(node, "Where", vec![ignored, pad, shifted], vec![DECODER_IDS.into()]));
    Ok(())
}

/// mBART's start token of each row, [B, 1]: HF's `shift_tokens_right` counts the labels that are not pad (after
/// -100 became pad) and takes the one at that count - 1 (a count, not a search: HF's quirk kept).
fn mbart_start(g: &mut Graph, pad_token_id: i64) -> String {
    let ignore = g.add_const("decoder_inputs/mbart_ignore_index", Tensor::scalar_i64(-100));
    let pad = g.add_const("decoder_inputs/mbart_pad", Tensor::scalar_i64(pad_token_id));
    let ignored = g.op1("Equal", &["labels", &ignore], vec![], "decoder_inputs/mbart_ignored");
    let filled = g.op1("Where", &[&ignored, &pad, "labels"], vec![], "decoder_inputs/mbart_filled");
    let is_pad = g.op1("Equal", &[&filled, &pad], vec![], "decoder_inputs/mbart_is_pad");
    let real = g.op1("Not", &[&is_pad], vec![], "decoder_inputs/mbart_real");
    let real =
        g.op1("Cast", &[&real], vec![("to", Attr::Int(DType::I64.onnx_code() as i64))], "decoder_inputs/mbart_count");
    let axis = g.add_const("decoder_inputs/mbart_axis", Tensor::vec_i64(&[1]));
    let count = g.op1("ReduceSum", &[&real, &axis], vec![("keepdims", Attr::Int(1))], "decoder_inputs/mbart_sum");
    let one = g.add_const("decoder_inputs/mbart_one", Tensor::scalar_i64(1));
    let last = g.op1("Sub", &[&count, &one], vec![], "decoder_inputs/mbart_last");
    g.op1("GatherElements", &[&filled, &last], vec![("axis", Attr::Int(1))], "decoder_inputs/mbart_start")
}

/// BART's loss: labels are already the next tokens (no shift), optionally label-smoothed.
fn bart_loss(opts: &BartOptions) -> loss::LossSpec {
    loss::LossSpec { logits: "logits".into(), shift: false, smoothing: opts.label_smoothing }
}

pub(super) fn check_options(o: &BartOptions) -> Result<()> {
    if o.prefix_len == 0 {
        bail!("--prefix-len must be at least 1");
    }
    if o.mid_dim == Some(0) {
        bail!("--mid-dim must be at least 1");
    }
    if o.batch == 0 || o.src_len == 0 || o.tgt_len == 0 {
        bail!("--batch, --src-len and --tgt-len must be at least 1");
    }
    if !(0.0..1.0).contains(&o.label_smoothing) {
        bail!("--label-smoothing must be in [0, 1) (got {})", o.label_smoothing);
    }
    let tokens = o.prefix_len.checked_add(o.src_len).and_then(|n| n.checked_add(o.tgt_len));
    super::check_tokens("--batch × (--prefix-len + --src-len + --tgt-len)", &[Some(o.batch), tokens])?;
    o.optimizer.check()?;
    if let Some(gs) = &o.generation {
        let capacity = o.prefix_len.checked_add(gs.src_len).and_then(|n| n.checked_add(gs.max_new));
        super::check_tokens("--gen-rows × (--prefix-len + --prompt-len + --max-new)", &[Some(gs.rows), capacity])?;
    }
    Ok(())
}

/// The width the encoder produces must be the width the decoder's cross-attention reads (declared shapes).
pub(super) fn check_fit(enc: &Graph, dec: &Graph, export: &BartExport) -> Result<()> {
    let last = |v: Option<&ValueInfo>| match v.and_then(|v| v.ty.shape.as_ref()).and_then(|s| s.last()) {
        Some(crate::ir::Dim::Known(n)) => Some(*n),
        _ => None,
    };
    let out = enc.outputs.iter().find(|o| o.name == "last_hidden_state").or(enc.outputs.first());
    let inp = dec.inputs.iter().find(|v| v.name == "encoder_hidden_states");
    if inp.is_none() {
        bail!("{} has no encoder_hidden_states input; pfx links the encoder's output there", export.decoder.display());
    }
    if let (Some(a), Some(b)) = (last(out), last(inp)) {
        if a != b {
            bail!(
                "mismatched hidden sizes: the encoder ({}) outputs width {a} but the decoder ({}) reads \
                 encoder_hidden_states of width {b}; the two graphs are not one model's",
                export.encoder.display(),
                export.decoder.display()
            );
        }
    }
    Ok(())
}

pub(super) fn dims_of(enc: &ModelInfo, dec: &ModelInfo, export: &BartExport) -> Result<BartDims> {
    let need = |v: Option<usize>, what: &str, p: &Path| {
        v.ok_or_else(|| anyhow!("could not read the {what} from {}", p.display()))
    };
    let (el, eh, ehid) = (
        need(enc.layers, "number of layers", &export.encoder)?,
        need(enc.heads, "number of heads", &export.encoder)?,
        need(enc.hidden, "hidden size", &export.encoder)?,
    );
    let (dl, dh, dhid) = (
        need(dec.layers, "number of layers", &export.decoder)?,
        need(dec.heads, "number of heads", &export.decoder)?,
        need(dec.hidden, "hidden size", &export.decoder)?,
    );
    if ehid != dhid {
        bail!(
            "the encoder's hidden size is {ehid} but the decoder's is {dhid} ({} and {}): they do not belong to \
             one model",
            export.encoder.display(),
            export.decoder.display()
        );
    }
    Ok(BartDims {
        encoder_layers: el,
        encoder_heads: eh,
        decoder_layers: dl,
        decoder_heads: dh,
        hidden: ehid,
        vocab: dec.vocab.unwrap_or(0),
        encoder_positions: enc.positions,
        decoder_positions: dec.positions,
        relative_bias: dec.relative_bias_buckets.is_some(),
    })
}

/// The forward graph: linked encoder and decoder with the prefix bound, ending in `loss`. Inputs: `input_ids`,
/// `attention_mask`, `labels`, then the trainable tensors.
pub fn build_bart_loss_graph(dir: &Path, opts: &BartOptions) -> Result<BartLoss> {
    check_options(opts)?;
    let export = find_export(dir)?;
    // Before the graphs are read: a wrong language is refused at once.
    check_languages(&export, opts.languages.as_ref())?;
    let t5 = super::t5::is_t5(&export.model_type);
    let t5_config = if t5 { Some(super::t5::read_config(&export.dir.join("config.json"))?) } else { None };
    let (mut enc, enc_info) = load_part(&export.encoder, Family::BartEncoder, false, t5)?;
    let (mut dec, dec_info) = load_part(&export.decoder, Family::BartDecoder, export.merged, t5)?;
    check_fit(&enc.graph, &dec.graph, &export)?;
    let dims = dims_of(&enc_info, &dec_info, &export)?;
    let p = opts.prefix_len;
    if let Some(n) = dims.encoder_positions {
        if opts.src_len > n {
            bail!("--src-len {} exceeds the encoder's {n} positions", opts.src_len);
        }
    }
    if let Some(n) = dims.decoder_positions {
        let (need, why) = match opts.mode {
            BartPrefix::Peft => (
                opts.tgt_len + p,
                format!(" (prefix {p} + target {}: PEFT numbers the decoder's tokens after the prefix)", opts.tgt_len),
            ),
            BartPrefix::Paper => (opts.tgt_len, String::new()),
        };
        if need > n {
            bail!("--tgt-len {} needs {need} decoder positions{why}, but the decoder has {n}", opts.tgt_len);
        }
    }
    // T5's bias depends on key - query only: PEFT's shift leaves the decoder's own bias as it is.
    if opts.mode == BartPrefix::Peft && !t5 {
        let n = prefix::shift_positions(&mut dec.graph, p)?;
        if n != 1 {
            bail!("expected one position-embedding lookup in the decoder, found {n}");
        }
    }
    specialize(&mut enc, &Dims { batch: opts.batch, seq: opts.src_len, past: None, src_len: None })
        .with_context(|| format!("specializing {}", export.encoder.display()))?;
    let dec_dims = Dims { batch: opts.batch, seq: opts.tgt_len, past: None, src_len: Some(opts.src_len) };
    // T5's decoder bias table and max distance, its buckets checked against the config's (PEFT's prefix columns
    // read them).
    let t5_bias = match &t5_config {
        Some(c) => {
            let (name, table) = super::t5::bias_table(&dec.graph, dims.decoder_heads)
                .with_context(|| format!("reading {}", export.decoder.display()))?;
            // Over P + T tokens: the distances the prefix columns reach.
            let reach = Dims { seq: opts.tgt_len + p, ..dec_dims.clone() };
            super::t5::check_buckets(&dec, &name, false, c, &reach)
                .with_context(|| format!("checking {}", export.decoder.display()))?;
            Some((table, c.max_distance))
        }
        None => None,
    };
    specialize(&mut dec, &dec_dims).with_context(|| format!("specializing {}", export.decoder.display()))?;
    let enc_sites: Vec<String> = attention_softmaxes(&enc.graph).into_iter().map(|s| s.0).collect();
    if enc_sites.len() != dims.encoder_layers {
        bail!("found {} attentions in the encoder, but it has {} layers", enc_sites.len(), dims.encoder_layers);
    }
    let (mut model, memory) = link(enc, dec, &export, opts.batch, opts.tgt_len, &|o| o == "logits")?;
    let g = &mut model.graph;
    let (self_sites, cross_sites) = decoder_sites(g, DECODER_IDS, &memory, &enc_sites)?;
    if self_sites.len() != dims.decoder_layers || cross_sites.len() != dims.decoder_layers {
        bail!(
            "found {} self-attentions and {} cross-attentions in the decoder, but it has {} layers",
            self_sites.len(),
            cross_sites.len(),
            dims.decoder_layers
        );
    }
    let head_dim = |h: usize| dims.hidden / h;
    let shape = |layers: usize, heads: usize| PrefixShape {
        len: p,
        layers,
        heads,
        head_dim: head_dim(heads),
        hidden: dims.hidden,
        mid: opts.mid_dim,
    };
    let mut generators = Vec::new();
    match opts.mode {
        BartPrefix::Paper => {
            let plan = [
                ("enc.", shape(dims.encoder_layers, dims.encoder_heads), &enc_sites),
                ("dec.", shape(dims.decoder_layers, dims.decoder_heads), &self_sites),
                ("cross.", shape(dims.decoder_layers, dims.decoder_heads), &cross_sites),
            ];
            for (site, sh, sites) in plan {
                sh.check_size()?;
                let kv = prefix::build_generator(g, &sh, site, opts.batch)?;
                for (l, sm) in sites.iter().enumerate() {
                    prefix::inject_one(g, sm, &kv[l], None, p, &Default::default(), None)
                        .map_err(|e| e.context(format!("binding the {site}* prefix of layer {l} (Softmax '{sm}')")))?;
                }
                generators.push(Generator { site: site.into(), shape: sh });
            }
        }
        BartPrefix::Peft => {
            if dims.encoder_heads != dims.decoder_heads {
                bail!(
                    "PEFT's BART prefix has one head count for both stacks; this model has {} encoder and {} decoder \
                     heads (use --bart-prefix paper)",
                    dims.encoder_heads,
                    dims.decoder_heads
                );
            }
            let layers = dims.encoder_layers.max(dims.decoder_layers);
            let sh = shape(layers, dims.decoder_heads);
            sh.check_size()?;
            let kv = prefix::build_generator(g, &sh, "", opts.batch)?;
            // T5: the prefix keys' relative bias, as PEFT's cache numbers them (one constant for every layer).
            let bias = match &t5_bias {
                Some((table, max_distance)) => Some(
                    g.add_const("t5_prefix_bias", super::t5::peft_prefix_bias(table, opts.tgt_len, p, *max_distance)?),
                ),
                None => None,
            };
            for (i, sm) in self_sites.iter().enumerate() {
                // PEFT: rows (4i mod 2L, 4i+1 mod 2L) = generator layer (2i mod L).
                prefix::inject_one(g, sm, &kv[(2 * i) % layers], None, p, &Default::default(), None)
                    .map_err(|e| e.context(format!("binding the prefix of decoder layer {i} (Softmax '{sm}')")))?;
                if let Some(b) = &bias {
                    add_to_scores(g, sm, b, "t5_prefix_bias/scores")?;
                }
            }
            generators.push(Generator { site: String::new(), shape: sh });
        }
    }
    g.toposort()?;
    let keep: Vec<String> = g.inputs.iter().map(|v| v.name.clone()).collect();
    g.types.retain(|k, _| keep.contains(k));
    simplify(g)?;
    // The loss adds the labels input itself.
    g.inputs.retain(|v| v.name != "labels");
    loss::finish_with_loss(g, &bart_loss(opts))?;
    simplify(g)?;
    Ok(BartLoss { model, export, dims, generators })
}

/// The compiled graphs (grads, train_step, eval_step) before writing.
pub struct CompiledBart {
    pub graphs: Vec<(String, Model)>,
    pub export: BartExport,
    pub dims: BartDims,
    pub generators: Vec<Generator>,
}

pub fn compile_bart_models(dir: &Path, opts: &BartOptions) -> Result<CompiledBart> {
    crate::progress::stage(format_args!("reading and specializing {}", dir.display()));
    let BartLoss { model: eval, export, dims, generators } = build_bart_loss_graph(dir, opts)?;
    crate::progress::stage("building the gradients, the AdamW step and the generation graphs");
    let names: Vec<String> = generators.iter().flat_map(|g| g.trainables()).map(|t| t.0).collect();
    let mut graphs = super::training_graphs(eval, &names, &opts.optimizer, &bart_loss(opts))?;
    if let Some(gs) = &opts.generation {
        let generation = super::bart_generate::build_generation_graphs(
            dir,
            opts.mode,
            opts.prefix_len,
            opts.mid_dim,
            &dims,
            gs,
            None,
        )?;
        // T5 v1.1's tanh GELU: cubes as Pow for ONNX Runtime on GPUs (`super::gpu_variant`).
        let variants: Vec<_> =
            generation.iter().map(|(role, m)| super::gpu_variant(role, m, false)).collect::<Result<Vec<_>>>()?;
        graphs.extend(generation);
        graphs.extend(variants.into_iter().flatten());
    }
    Ok(CompiledBart { graphs, export, dims, generators })
}

/// What a BART bundle's manifest.json carries beyond the common fields (under the key "bart").
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BartSpec {
    pub mode: BartPrefix,
    pub src_len: usize,
    pub tgt_len: usize,
    pub label_smoothing: f32,
    pub encoder_layers: usize,
    pub encoder_heads: usize,
    pub decoder_layers: usize,
    pub decoder_heads: usize,
    pub pad_token_id: i64,
    /// Training's decoder start (config.json's).
    pub decoder_start_token_id: i64,
    /// Generation's (the generation config's; absent in bundles from before it was kept apart: training's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_start_token_id: Option<i64>,
    pub encoder_graph: String,
    pub decoder_graph: String,
    /// Generators: name prefix ("enc.", "dec.", "cross.", or "" for PEFT's single one) and layers.
    pub generators: Vec<(String, usize)>,
    /// Shapes and cache layout of the generation graphs (absent when compiled without them).
    #[serde(default)]
    pub generation: Option<super::bart_generate::BartGeneration>,
    /// The languages of mBART, M2M100 or NLLB (`pfxc compile --src-lang --tgt-lang`), for text commands and generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub languages: Option<Languages>,
}

/// Reads the "bart" section of a bundle's manifest (None for GPT-2 bundles).
pub fn read_bart_spec(bundle: &Path) -> Result<Option<BartSpec>> {
    let p = bundle.join("manifest.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    match v.get("bart") {
        Some(b) => Ok(Some(serde_json::from_value(b.clone())?)),
        None => Ok(None),
    }
}

/// Compiles a BART export folder into a bundle in `out_dir`: grads.onnx, train_step.onnx, eval_step.onnx,
/// weights.bin, prefix.init.safetensors and manifest.json (family "bart", with a "bart" section).
pub fn compile_bart(dir: &Path, opts: &BartOptions, out_dir: &Path) -> Result<Manifest> {
    super::bundle_dir::BundleDir::check(out_dir, dir, "export")?;
    let mut c = compile_bart_models(dir, opts)?;
    super::check_forced_ids(&c.export.config, c.dims.vocab)?;
    if let (None, Some(file), Some(_)) =
        (c.export.config.generation_start_token_id, &c.export.config.settings_file, &opts.generation)
    {
        eprintln!(
            "note: {} sets neither decoder_start_token_id nor bos_token_id (HF's generate refuses such a model): \
             generation starts with config.json's {}",
            file.display(),
            c.export.decoder_start_token_id
        );
    }
    let trainables: Vec<(String, Vec<usize>)> = c.generators.iter().flat_map(|g| g.trainables()).collect();
    let names: Vec<String> = trainables.iter().map(|t| t.0.clone()).collect();
    let out = super::bundle_dir::BundleDir::create(out_dir, dir, "export")?;
    let mut weights = WeightsFile::create(&out.path("weights.bin"))?;
    let mut io = BTreeMap::new();
    let mut files = BTreeMap::new();
    let mut rounded = super::storage::Rounded::default();
    for (role, m) in &mut c.graphs {
        super::storage::store_weights_with(&mut m.graph, opts.weights, &mut rounded);
        let file = format!("{role}.onnx");
        crate::progress::stage(format_args!("writing {file}"));
        onnx_io::save(m, &out.path(&file), Some(&mut weights))?;
        if !role.ends_with(super::GPU_VARIANT) {
            io.insert(role.to_string(), super::graph_io(m, &file, &names));
        }
        files.insert(role.to_string(), file);
    }
    let tokenizer = super::bundle_dir::copy_tokenizer(&out, Some(&dir.join("tokenizer.json")))?;
    // Each generator initialized as PEFT initializes its PrefixEncoder, from its own seed.
    let mut values = BTreeMap::new();
    for (k, gen) in c.generators.iter().enumerate() {
        for (name, t) in init::init_prefix(&gen.shape, opts.seed.wrapping_add(k as u64)) {
            values.insert(format!("{}{name}", gen.site), t);
        }
    }
    init::write_safetensors(&out.path("prefix.init.safetensors"), &values)?;
    let first = &c.generators[0].shape;
    let d = &c.dims;
    let manifest = Manifest {
        format: super::BUNDLE_FORMAT.into(),
        compiler_version: env!("CARGO_PKG_VERSION").into(),
        family: "bart".into(),
        source_model: dir.display().to_string(),
        source_exporter: "optimum".into(),
        injection: Injection::AttentionSites,
        batch: opts.batch,
        seq_len: opts.tgt_len,
        prefix_len: opts.prefix_len,
        reparam: opts.mid_dim.is_some(),
        mid_dim: opts.mid_dim,
        layers: match opts.mode {
            BartPrefix::Peft => first.layers,
            BartPrefix::Paper => d.decoder_layers,
        },
        heads: d.decoder_heads,
        head_dim: d.hidden / d.decoder_heads,
        hidden: d.hidden,
        vocab: d.vocab,
        optimizer: OptimizerSpec::from(&opts.optimizer),
        trainable: TensorSpec::f32_list(&trainables),
        graphs: files,
        io,
        weights_file: "weights.bin".into(),
        init: "prefix.init.safetensors".into(),
        generation: opts.generation.as_ref().map(|gs| super::GenerationSpec {
            rows: gs.rows,
            prompt_len: gs.src_len,
            max_new: gs.max_new,
            capacity: gs.capacity(opts.prefix_len),
        }),
        baked: false,
        weights_dtype: opts.weights,
        tokenizer,
        model_type: Some(c.export.model_type.clone()),
        // BART's own end token is in its "bart" section (its text commands have their own format).
        eos_token_id: None,
        // Every id HF's generate stops at (its generation_config.json's), and the tokens it forces.
        eos_token_ids: c.export.config.eos_token_ids.clone(),
        forced_bos_token_id: c.export.config.forced_bos_token_id,
        forced_eos_token_id: c.export.config.forced_eos_token_id,
        generation_settings: c.export.config.search.clone(),
    };
    let spec = BartSpec {
        mode: opts.mode,
        src_len: opts.src_len,
        tgt_len: opts.tgt_len,
        label_smoothing: opts.label_smoothing,
        encoder_layers: d.encoder_layers,
        encoder_heads: d.encoder_heads,
        decoder_layers: d.decoder_layers,
        decoder_heads: d.decoder_heads,
        pad_token_id: c.export.pad_token_id,
        decoder_start_token_id: c.export.decoder_start_token_id,
        generation_start_token_id: Some(
            c.export.config.generation_start_token_id.map_or(c.export.decoder_start_token_id, i64::from),
        ),
        encoder_graph: file_name(&c.export.encoder),
        decoder_graph: file_name(&c.export.decoder),
        generators: c.generators.iter().map(|g| (g.site.clone(), g.shape.layers)).collect(),
        generation: opts
            .generation
            .as_ref()
            .map(|gs| super::bart_generate::generation_spec(opts.mode, opts.prefix_len, d, gs)),
        languages: match &opts.languages {
            Some(l) => Some(Languages { nllb_legacy: nllb_legacy_behaviour(&c.export.dir)?, ..l.clone() }),
            None => None,
        },
    };
    let mut json = serde_json::to_value(&manifest)?;
    json.as_object_mut().expect("a manifest is an object").insert("bart".into(), serde_json::to_value(&spec)?);
    out.finish(&serde_json::to_string_pretty(&json)?)?;
    Ok(manifest)
}

/// Languages are mBART's, M2M100's and NLLB's (model_type m2m_100), and must be tokens of the tokenizer beside the
/// export (when there is one).
fn check_languages(export: &BartExport, languages: Option<&Languages>) -> Result<()> {
    let Some(l) = languages else { return Ok(()) };
    let m2m100 = export.model_type == "m2m_100";
    if export.model_type != "mbart" && !m2m100 {
        bail!(
            "--src-lang/--tgt-lang name the language codes of mBART, M2M100 and NLLB; {} is a {} export, whose \
             tokenizer adds none",
            export.dir.display(),
            export.model_type
        );
    }
    let path = export.dir.join("tokenizer.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!(
            "note: no tokenizer.json in {}: --src-lang/--tgt-lang are checked when a text command loads a tokenizer",
            export.dir.display()
        );
        return Ok(());
    };
    let tok: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let added: Vec<&str> = tok["added_tokens"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["content"].as_str()).collect())
        .unwrap_or_default();
    if m2m100 {
        // NLLB's codes (`eng_Latn`) are added tokens; a tokenizer.json made for M2M100 may hold its `__en__` in the
        // vocabulary instead (BPE/WordPiece: a map; Unigram: [piece, score] pairs). `en` names `__en__`, as in HF.
        let vocab = &tok["model"]["vocab"];
        let known = |t: &str| {
            added.contains(&t)
                || vocab.get(t).is_some()
                || vocab.as_array().is_some_and(|v| v.iter().any(|p| p[0].as_str() == Some(t)))
        };
        for (flag, code) in [("--src-lang", &l.source), ("--tgt-lang", &l.target)] {
            if !known(&format!("__{code}__")) && !known(code) {
                let nllb = |t: &&str| {
                    let b = t.as_bytes();
                    t.len() == 8 && b[3] == b'_' && b[..3].iter().all(u8::is_ascii_lowercase) && t.is_ascii()
                };
                let m2m = |t: &&str| t.len() > 4 && t.starts_with("__") && t.ends_with("__");
                let codes: Vec<&str> = added.iter().copied().filter(|t| nllb(t) || m2m(t)).collect();
                bail!(
                    "{flag} {code} is not a language code of {} (neither `{code}` nor `__{code}__` is one of its \
                     tokens){}",
                    path.display(),
                    listed(&codes)
                );
            }
        }
        // HF's NllbTokenizer frames texts as its tokenizer_config.json's legacy_behaviour says, whatever the
        // post-processor in tokenizer.json (a file saved before that flag may hold the old one): compile_bart
        // records the flag in the bundle (`Languages::nllb_legacy`), read back by the text commands.
        return Ok(());
    }
    for (flag, code) in [("--src-lang", &l.source), ("--tgt-lang", &l.target)] {
        if !added.contains(&code.as_str()) {
            // mBART's codes are the tokenizer's added tokens with a language_REGION shape.
            let codes: Vec<&str> =
                added.iter().copied().filter(|t| t.len() == 5 && t.as_bytes()[2] == b'_' && t.is_ascii()).collect();
            bail!(
                "{flag} {code} is not a language code of {} (not one of its added tokens){}",
                path.display(),
                listed(&codes)
            );
        }
    }
    Ok(())
}

/// Whether HF's NllbTokenizer frames texts the legacy way (`text </s> code`) for the tokenizer_config.json in `dir`:
/// its `legacy_behaviour` (false when absent, as HF's default); None when there is no such file or it names another
/// tokenizer class.
pub fn nllb_legacy_behaviour(dir: &Path) -> Result<Option<bool>> {
    let path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let cfg: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    if !cfg["tokenizer_class"].as_str().is_some_and(|c| c.starts_with("Nllb")) {
        return Ok(None);
    }
    match &cfg["legacy_behaviour"] {
        serde_json::Value::Null => Ok(Some(false)),
        serde_json::Value::Bool(b) => Ok(Some(*b)),
        other => bail!("{}: legacy_behaviour is {other}, not true or false", path.display()),
    }
}

/// ` (its language codes: a, b, ...)` for an error, the first 60 of them (NLLB has 202), or nothing.
fn listed(codes: &[&str]) -> String {
    match codes.len() {
        0 => String::new(),
        n if n <= 60 => format!(" (its language codes: {})", codes.join(", ")),
        n => format!(" (its language codes: {}, and {} more)", codes[..60].join(", "), n - 60),
    }
}

pub(super) fn file_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default()
}
