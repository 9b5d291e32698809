//! `pfxc inspect`: what a model is (family, exporter, dimensions) and what it contains.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Result;
use serde::Serialize;

use crate::canonicalize::canonicalize;
use crate::ir::{Graph, Model};
use crate::specialize::{specialize, Dims};
use crate::tensor::DType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Gpt2Decoder,
    BartEncoder,
    BartDecoder,
    Unknown,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            // GPT-2, and decoders built like it (Llama, OPT, GPT-Neo): the layout pfx compiles.
            Family::Gpt2Decoder => "decoder-only, GPT-2 layout",
            Family::BartEncoder => "BART encoder",
            Family::BartDecoder => "BART decoder",
            Family::Unknown => "unknown",
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct IoInfo {
    pub name: String,
    pub r#type: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub family: Family,
    pub with_past: bool,
    /// Whether the branches of optimum's merged decoder (an If on use_cache_branch) are present.
    pub merged_decoder: bool,
    pub exporter: String,
    pub producer: String,
    pub opset: i64,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub layers: Option<usize>,
    pub heads: Option<usize>,
    /// Heads of the keys and values (fewer than `heads` under grouped-query attention): the past inputs', or
    /// without past the values' before the attention repeats them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_value_heads: Option<usize>,
    pub head_size: Option<usize>,
    pub hidden: Option<usize>,
    pub vocab: Option<usize>,
    /// Rows of the learned position table (BART's carries an offset of 2).
    pub position_rows: Option<usize>,
    /// The positions those rows give ([`usable_positions`]: BART's and OPT's start 2 rows in).
    pub positions: Option<usize>,
    /// The table is rotary angles' sines and cosines (CodeGen's), narrower than the embeddings, not learned
    /// positions added to them.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub rotary_table: bool,
    /// Positions numbered from the token ids (M2M100's, [`IdNumbering`]): the row pad tokens read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pad_row: Option<usize>,
    /// T5's relative position bias: the buckets of its table (set by [`ModelInfo::as_t5`]; no position table then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relative_bias_buckets: Option<usize>,
    /// ALiBi position biases: "mask" (numbered from the attention mask, Bloom's) or "slots N" (read by key slot
    /// from a table of N positions, MPT's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alibi: Option<String>,
    pub tied_embeddings: Option<bool>,
    /// `model_type` of the `config.json` beside the file, filled in by `pfxc inspect` (the graph does not say
    /// whether a decoder is GPT-2, Llama or OPT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_model_type: Option<String>,
    /// Why pfx would refuse to compile it, when it would ([`unsupported_reason`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsupported: Option<String>,
    pub weight_count: usize,
    pub weight_bytes: usize,
    pub nodes: usize,
    pub op_histogram: BTreeMap<String, usize>,
}

/// Guesses which exporter wrote the file, from traces each leaves.
pub fn exporter_flavour(m: &Model) -> String {
    let g = &m.graph;
    let names = |pred: &dyn Fn(&str) -> bool| g.nodes.iter().filter(|n| pred(&n.name)).count();
    let has_position_ids = g.inputs.iter().any(|v| v.name == "position_ids");
    let slash_names = names(&|n| n.starts_with('/'));
    let dynamo_names = names(&|n| n.starts_with("node_"));
    if m.producer_name == "pytorch" && dynamo_names * 2 > g.nodes.len() {
        "torch.onnx dynamo".into()
    } else if m.producer_name == "pytorch" && slash_names * 2 > g.nodes.len() {
        // optimum names its dynamic axes batch_size / sequence_length / encoder_sequence_length.
        let optimum_axes = g
            .inputs
            .iter()
            .any(|v| v.ty.shape.iter().flatten().any(|d| matches!(d, crate::ir::Dim::Sym(s) if s == "batch_size")));
        if has_position_ids || optimum_axes {
            "optimum (torch.onnx TorchScript)".into()
        } else {
            "torch.onnx TorchScript (legacy)".into()
        }
    } else if m.producer_name.is_empty() {
        "unknown".into()
    } else {
        format!("{} {}", m.producer_name, m.producer_version)
    }
}

pub fn detect_family(g: &Graph) -> Family {
    let has_in = |n: &str| g.inputs.iter().any(|v| v.name == n);
    let has_out = |n: &str| g.outputs.iter().any(|v| v.name == n);
    let encoder_past = g.inputs.iter().any(|v| v.name.starts_with("past_key_values") && v.name.contains(".encoder."));
    if has_in("encoder_hidden_states") || encoder_past {
        Family::BartDecoder
    } else if has_in("input_ids") && has_out("last_hidden_state") && !has_out("logits") {
        Family::BartEncoder
    } else if has_in("input_ids") && has_out("logits") {
        Family::Gpt2Decoder
    } else {
        Family::Unknown
    }
}

/// The embedding tables a canonical graph looks up.
pub struct Embeddings {
    pub vocab: Option<usize>,
    pub hidden: Option<usize>,
    /// The token embedding's initializer.
    pub token_table: Option<String>,
    /// Rows of the position table (BART's learned positions include an offset of 2).
    pub position_rows: Option<usize>,
    /// Its width: the hidden size for absolute positions (T5's relative bias table is [buckets, heads]).
    pub position_width: Option<usize>,
}

/// Finds the embedding tables of a canonical graph (before folding removes the position lookup): the 2-D
/// constant gathered by the token ids is the vocabulary, the first other one the positions.
pub fn embeddings(g: &Graph) -> Embeddings {
    let tok = token_index_values(g);
    let mut e = Embeddings { vocab: None, hidden: None, token_table: None, position_rows: None, position_width: None };
    for n in &g.nodes {
        if n.op != "Gather" {
            continue;
        }
        let Some(w) = g.initializers.get(&n.inputs[0]) else {
            continue;
        };
        if w.shape.len() != 2 {
            continue;
        }
        if tok.contains(&n.inputs[1]) && e.vocab.is_none() {
            e.vocab = Some(w.shape[0]);
            e.hidden = Some(w.shape[1]);
            e.token_table = Some(n.inputs[0].clone());
        } else if e.position_rows.is_none() {
            e.position_rows = Some(w.shape[0]);
            e.position_width = Some(w.shape[1]);
        }
    }
    e
}

/// Why pfx would compile a graph whose names look like GPT-2's or BART's into wrong or unusable training graphs,
/// when it would: half-precision weights, a token-type input (BERT-style encoders), a decoder without past
/// inputs and without a position table (rotary positions: no place for the prefix), or a first non-token lookup
/// table narrower than the embeddings (T5's relative attention bias instead of BART's learned positions). `g` is
/// canonical; the reason reads after the graph's name ("model.onnx takes token_type_ids, …").
pub fn unsupported_reason(g: &Graph, family: Family) -> Option<String> {
    unsupported_except_relative_bias(g, family).or_else(|| relative_bias_reason(g))
}

/// [`unsupported_reason`] for a graph whose relative position bias pfx handles (T5's, on the BART path).
pub fn unsupported_except_relative_bias(g: &Graph, family: Family) -> Option<String> {
    let e = embeddings(g);
    let table = e.token_table.as_ref().and_then(|t| g.initializers.get(t));
    if let Some(dt) = table.map(|t| t.dtype()).filter(|d| matches!(d, DType::F16 | DType::BF16)) {
        return Some(format!(
            "stores its weights in {}: pfx compiles float32 exports (export the model in float32; `pfxc compile \
             --weights f16` then stores the frozen weights in half precision)",
            if dt == DType::F16 { "float16" } else { "bfloat16" }
        ));
    }
    if family == Family::Gpt2Decoder && g.inputs.iter().any(|v| v.name == "token_type_ids") {
        return Some(
            "takes token_type_ids, as BERT-style encoders do: pfx trains prefixes for causal language models \
             (GPT-2) and BART"
                .into(),
        );
    }
    None
}

/// Why a graph that looks up a narrower table than its embeddings by positions it computes (T5's relative position
/// buckets) is refused where its model type is not known to be T5. CodeGen's rotary sine/cosine table is narrower
/// too, but it is looked up by the position ids themselves (the positions pfx numbers), which T5's never is.
fn relative_bias_reason(g: &Graph) -> Option<String> {
    let e = embeddings(g);
    match (e.position_rows, e.position_width, e.hidden) {
        (Some(rows), Some(width), Some(hidden)) if width != hidden && !read_by_position_ids(g) => Some(format!(
            "looks up a {rows}×{width} table that is not as wide as its embeddings ({hidden}): relative position \
             buckets, as T5 has, rather than the learned absolute positions pfx numbers (T5 compiles on the BART \
             path: pfxc compile --bart-prefix on optimum's export folder, whose config.json says model_type t5 or mt5)"
        )),
        _ => None,
    }
}

/// Whether a position table is looked up by the `position_ids` input itself (CodeGen's rotary sine/cosine table;
/// T5's bucket table is looked up by buckets computed from positions).
fn read_by_position_ids(g: &Graph) -> bool {
    let ids = index_values(g, "position_ids");
    position_lookups(g).iter().any(|n| ids.contains(&n.inputs[1]))
}

/// [`unsupported_reason`] as an error naming `path`.
pub fn check_supported(g: &Graph, path: &std::path::Path, family: Family) -> Result<()> {
    match unsupported_reason(g, family) {
        Some(why) => anyhow::bail!("{} {why}", path.display()),
        None => Ok(()),
    }
}

/// The JSON file `name` (config.json, generation_config.json) beside an export, with its path; `None` when there
/// is none. A file that is there but unreadable or not JSON is an error naming it: read as "no setting" it could
/// silently drop an end token or a window (transformers refuses such a file too).
fn json_beside(export: &std::path::Path, name: &str) -> Result<Option<(std::path::PathBuf, serde_json::Value)>> {
    let Some(path) = export.parent().map(|d| d.join(name)) else { return Ok(None) };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    };
    let reads = if name == "config.json" {
        "model_type, token ids (eos, forced bos/eos, pad, decoder start), sliding_window and, without a \
         generation_config.json, the generation settings"
    } else {
        "the generation settings (end and forced tokens, decoder start, beams, n-gram bans, ...)"
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid JSON ({e}): pfx reads {reads} from it; fix the file or move it away",
            path.display()
        )
    })?;
    if !value.is_object() {
        anyhow::bail!(
            "{} holds {}, not an object of settings: pfx reads {reads} from it; fix the file or move it away",
            path.display(),
            match &value {
                serde_json::Value::Array(_) => "a list",
                serde_json::Value::Null => "null",
                _ => "a single value",
            }
        );
    }
    Ok(Some((path, value)))
}

/// `model_type` from the `config.json` beside an export, if there is one that says. (`pfxc inspect` reads only
/// this; `compile` reads everything at once with [`ModelConfig::beside`].)
pub fn config_model_type(export: &std::path::Path) -> Result<Option<String>> {
    let Some((path, cfg)) = json_beside(export, "config.json")? else { return Ok(None) };
    model_type_in(&path, &cfg)
}

/// What pfx reads from the JSON files transformers writes beside an export (`config.json`,
/// `generation_config.json`), each file read once. A setting that is there but malformed is an error naming the
/// file: read as "no setting" it could silently drop an end token or a window.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// `model_type` of config.json (gpt2, llama, bart, ...): the graph alone does not say.
    pub model_type: Option<String>,
    /// The end-of-text id pfxrun's text commands end a prompt and a target with: config.json's `eos_token_id`,
    /// else generation_config.json's (the first one where it is a list, as Llama 3's and Qwen's are).
    pub eos_token_id: Option<u32>,
    /// Every id Hugging Face's `generate` stops at: the generation settings' `eos_token_id` (see
    /// `settings_file`); one id or a list (Llama 3's chat models list three).
    pub eos_token_ids: Vec<u32>,
    /// `sliding_window` of config.json (Mistral's, Gemma's; Qwen2's when `use_sliding_window` is on).
    pub sliding_window: Option<usize>,
    /// The token `generate` forces as the first new one of an encoder-decoder (mBART-50's target language), from
    /// the generation settings.
    pub forced_bos_token_id: Option<u32>,
    /// The token `generate` forces as the last new one when the length limit is reached (BART's, Marian's and
    /// Pegasus's `</s>`), from the generation settings.
    pub forced_eos_token_id: Option<u32>,
    /// `pad_token_id` and `decoder_start_token_id` of config.json: an encoder-decoder's decoder inputs are its
    /// labels shifted right behind the start token, pads where the labels are ignored.
    pub pad_token_id: Option<u32>,
    pub decoder_start_token_id: Option<u32>,
    /// `bos_token_id` of config.json: where training starts an encoder-decoder's decoder when the config has no
    /// `decoder_start_token_id` (mBART-cc25's has none).
    pub bos_token_id: Option<u32>,
    /// Where `generate` starts the decoder: the generation settings' `decoder_start_token_id`, else their
    /// `bos_token_id` (training's start comes from config.json: the two can differ).
    pub generation_start_token_id: Option<u32>,
    /// The search settings of the generation settings.
    pub search: GenerationSettings,
    /// The file the generation settings come from: generation_config.json when there is one (whole: a setting
    /// missing there is unset, as `generate` reads it), else config.json.
    #[serde(skip)]
    pub settings_file: Option<std::path::PathBuf>,
}

/// The search settings of a model's generation config that `pfxrun generate` takes as its defaults, and those its
/// search does not apply (said when generating).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GenerationSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_beams: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub length_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_repeat_ngram_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStopping>,
    /// An encoder-decoder's bans of its source's n-grams (BlenderBot's default 3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder_no_repeat_ngram_size: Option<usize>,
    /// `min_length` (an encoder-decoder's counts the decoder start token) and `min_new_tokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_length: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_new_tokens: Option<usize>,
    /// The length limit: `max_new_tokens`, and `max_length` (an encoder-decoder's counts the decoder start token,
    /// a decoder's its padded prompt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// `repetition_penalty` (tokens already in the output, and a decoder's prompt) and `encoder_repetition_penalty`
    /// (tokens of the source, or of a decoder's prompt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder_repetition_penalty: Option<f64>,
    /// Sampling (`do_sample`) and what shapes its distribution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub typical_p: Option<f64>,
    /// Truncation sampling's floors (`epsilon_cutoff`, `eta_cutoff`; applied strictly between 0 and 1, as HF does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_cutoff: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_cutoff: Option<f64>,
    /// Top-H sampling's fraction of the entropy (`top_h`, in (0, 1]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_h: Option<f64>,
    /// (start, factor): the end-of-sequence scores grow after `start` new tokens
    /// (`exponential_decay_length_penalty`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exponential_decay_length_penalty: Option<(usize, f64)>,
    /// `renormalize_logits` (a log-softmax after every processor) and `remove_invalid_values` (NaN and infinite
    /// scores made finite).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renormalize_logits: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remove_invalid_values: Option<bool>,
    /// Texts that end a generation when one appears in it ending inside its last token (`stop_strings`: a string or a
    /// list of them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop_strings: Vec<String>,
    /// Outputs per input (`num_return_sequences`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_return_sequences: Option<usize>,
    /// Tokens never generated (`suppress_tokens`), not as the first new token (`begin_suppress_tokens`), not
    /// completing a listed sequence (`bad_words_ids`: Marian's configs list their pad token), and biases added to the
    /// last token of a sequence once its beginning is there (`sequence_bias`, as [[ids], bias] pairs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub suppress_tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub begin_suppress_tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bad_words_ids: Vec<Vec<u32>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sequence_bias: Vec<(Vec<u32>, f32)>,
    /// Settings set to something pfx's search does not do, as `name value` ("num_beam_groups 4").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unapplied: Vec<String>,
}

/// When beam search ends a prompt, as Hugging Face's `early_stopping` says: `false` (its default), `true` or
/// `"never"`. Written as HF writes it (a bool or "never").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "serde_json::Value", into = "serde_json::Value")]
pub enum EarlyStopping {
    /// `false`: once it has as many finished hypotheses as beams and its best live beam's score, at the current
    /// length, cannot beat the worst of them.
    #[default]
    Heuristic,
    /// `true`: as soon as it has as many finished hypotheses as beams.
    Early,
    /// `"never"`: as `false`, but a positive length penalty is assumed to lengthen the best live beam to the
    /// length limit (no better hypothesis can then be missed).
    Never,
}

impl TryFrom<serde_json::Value> for EarlyStopping {
    type Error = String;
    fn try_from(v: serde_json::Value) -> std::result::Result<Self, String> {
        match v {
            serde_json::Value::Bool(false) => Ok(EarlyStopping::Heuristic),
            serde_json::Value::Bool(true) => Ok(EarlyStopping::Early),
            serde_json::Value::String(s) if s == "never" => Ok(EarlyStopping::Never),
            other => Err(format!("early_stopping is {other}; expected true, false or \"never\"")),
        }
    }
}

impl From<EarlyStopping> for serde_json::Value {
    fn from(e: EarlyStopping) -> serde_json::Value {
        match e {
            EarlyStopping::Heuristic => false.into(),
            EarlyStopping::Early => true.into(),
            EarlyStopping::Never => "never".into(),
        }
    }
}

impl std::str::FromStr for EarlyStopping {
    type Err = String;
    /// The command line's words: `true`, `false`, `never`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "false" => Ok(EarlyStopping::Heuristic),
            "true" => Ok(EarlyStopping::Early),
            "never" => Ok(EarlyStopping::Never),
            _ => Err(format!("{s:?} is none of true, false, never")),
        }
    }
}

impl GenerationSettings {
    /// These settings with those an older pfxc recorded as unapplied (`name value`) read again, for what pfx has
    /// learnt to do since: a bundle compiled before then generates as a new one would.
    pub fn recovered(&self) -> GenerationSettings {
        let entries: serde_json::Map<String, serde_json::Value> = self
            .unapplied
            .iter()
            .filter_map(|e| e.split_once(' '))
            .filter_map(|(k, v)| Some((k.to_string(), serde_json::from_str(v).ok()?)))
            .collect();
        let Ok(again) = GenerationSettings::read(std::path::Path::new("manifest.json"), &entries.into()) else {
            return self.clone();
        };
        let (Ok(serde_json::Value::Object(mut mine)), Ok(serde_json::Value::Object(theirs))) =
            (serde_json::to_value(self), serde_json::to_value(&again))
        else {
            return self.clone();
        };
        mine.remove("unapplied");
        for (k, v) in theirs {
            mine.entry(k).or_insert(v);
        }
        serde_json::from_value(mine.into()).unwrap_or_else(|_| self.clone())
    }

    fn read(path: &std::path::Path, v: &serde_json::Value) -> Result<GenerationSettings> {
        let count = |key: &str, least: u64| -> Result<Option<usize>> {
            match setting(v, key) {
                None => Ok(None),
                Some(x) => match x.as_u64().filter(|&n| n >= least) {
                    Some(n) => Ok(Some(n as usize)),
                    None => anyhow::bail!("{}: {key} is {x}; expected a whole number from {least}", path.display()),
                },
            }
        };
        // A number within what generate accepts (`what` says it), else an error naming the file.
        let number = |key: &str, ok: fn(f64) -> bool, what: &str| -> Result<Option<f64>> {
            match setting(v, key) {
                None => Ok(None),
                Some(x) => match x.as_f64().filter(|&f| f.is_finite() && ok(f)) {
                    Some(f) => Ok(Some(f)),
                    None => anyhow::bail!("{}: {key} is {x}; expected {what}", path.display()),
                },
            }
        };
        let early_stopping = match setting(v, "early_stopping") {
            None => None,
            Some(x) => {
                Some(EarlyStopping::try_from(x.clone()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)
            }
        };
        let flag = |key: &str| -> Result<Option<bool>> {
            match setting(v, key) {
                None => Ok(None),
                Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
                Some(x) => anyhow::bail!("{}: {key} is {x}; expected true or false", path.display()),
            }
        };
        let do_sample = flag("do_sample")?;
        let stop_strings = match setting(v, "stop_strings") {
            None => Vec::new(),
            Some(serde_json::Value::String(t)) => vec![t.clone()],
            Some(x) => x
                .as_array()
                .and_then(|a| a.iter().map(|t| t.as_str().filter(|t| !t.is_empty()).map(String::from)).collect())
                .ok_or_else(|| {
                    anyhow::anyhow!("{}: stop_strings is {x}; expected a text or a list of texts", path.display())
                })?,
        };
        let length_decay = match setting(v, "exponential_decay_length_penalty") {
            None => None,
            Some(x) => {
                let pair = x.as_array().filter(|p| p.len() == 2).and_then(|p| {
                    let factor = p[1].as_f64().filter(|f| f.is_finite() && *f > 0.0)?;
                    Some((usize::try_from(p[0].as_u64()?).ok()?, factor))
                });
                Some(pair.ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: exponential_decay_length_penalty is {x}; expected [start, factor]: a whole number from 0 \
                         and a number above 0",
                        path.display()
                    )
                })?)
            }
        };
        let mut unapplied = Vec::new();
        // Each with its neutral value: anything else changes what generate() picks, and pfx does not do it.
        // Group beam search, constraints, contrastive search and DoLa left HF 5.x's generate for code on the Hub;
        // the time limit, classifier-free guidance, watermarks and token healing pfx does not do.
        let neutral: [(&str, serde_json::Value); 10] = [
            ("num_beam_groups", 1.into()),
            ("diversity_penalty", 0.0.into()),
            ("constraints", serde_json::Value::Null),
            ("force_words_ids", serde_json::Value::Null),
            ("penalty_alpha", 0.0.into()),
            ("dola_layers", serde_json::Value::Null),
            ("max_time", serde_json::Value::Null),
            ("guidance_scale", 1.0.into()),
            ("watermarking_config", serde_json::Value::Null),
            ("token_healing", false.into()),
        ];
        for (key, value) in neutral {
            if let Some(x) = setting(v, key) {
                // An empty list (suppress_tokens: []) does nothing either.
                let same = match (x.as_f64(), value.as_f64()) {
                    (Some(a), Some(b)) => a == b,
                    _ => *x == value || (value.is_null() && x.as_array().is_some_and(|a| a.is_empty())),
                };
                if !same {
                    unapplied.push(format!("{key} {x}"));
                }
            }
        }
        // Token id lists, strictly: a malformed one would silently allow what the model's authors banned.
        let id = |x: &serde_json::Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
        let ids = |x: &serde_json::Value| -> Option<Vec<u32>> { x.as_array()?.iter().map(id).collect() };
        let id_list = |key: &str| -> Result<Vec<u32>> {
            match setting(v, key) {
                None => Ok(Vec::new()),
                Some(x) => ids(x)
                    .ok_or_else(|| anyhow::anyhow!("{}: {key} is {x}; expected a list of token ids", path.display())),
            }
        };
        let bad_words_ids = match setting(v, "bad_words_ids") {
            None => Vec::new(),
            Some(x) => x
                .as_array()
                .and_then(|a| a.iter().map(|w| ids(w).filter(|w| !w.is_empty())).collect::<Option<Vec<_>>>())
                .ok_or_else(|| {
                    anyhow::anyhow!("{}: bad_words_ids is {x}; expected lists of token ids", path.display())
                })?,
        };
        let sequence_bias = match setting(v, "sequence_bias") {
            None => Vec::new(),
            Some(x) => {
                let pair = |p: &serde_json::Value| -> Option<(Vec<u32>, f32)> {
                    let p = p.as_array().filter(|p| p.len() == 2)?;
                    let bias = p[1].as_f64().filter(|b| b.is_finite())?;
                    Some((ids(&p[0]).filter(|w| !w.is_empty())?, bias as f32))
                };
                x.as_array().and_then(|a| a.iter().map(pair).collect::<Option<Vec<_>>>()).ok_or_else(|| {
                    anyhow::anyhow!("{}: sequence_bias is {x}; expected [[token ids], bias] pairs", path.display())
                })?
            }
        };
        let length_penalty = number("length_penalty", |_| true, "a number")?.map(|f| f as f32);
        let positive = "a number above 0";
        let fraction = "a number from 0 to 1";
        Ok(GenerationSettings {
            num_beams: count("num_beams", 1)?,
            length_penalty,
            no_repeat_ngram_size: count("no_repeat_ngram_size", 0)?,
            early_stopping,
            encoder_no_repeat_ngram_size: count("encoder_no_repeat_ngram_size", 0)?,
            min_length: count("min_length", 0)?,
            min_new_tokens: count("min_new_tokens", 0)?,
            max_new_tokens: count("max_new_tokens", 1)?,
            max_length: count("max_length", 1)?,
            repetition_penalty: number("repetition_penalty", |f| f > 0.0, positive)?,
            encoder_repetition_penalty: number("encoder_repetition_penalty", |f| f > 0.0, positive)?,
            do_sample,
            // 0 is allowed here (configs of greedy models write it); sampling refuses it when used.
            temperature: number("temperature", |f| f >= 0.0, "a number from 0")?,
            top_k: count("top_k", 0)?,
            top_p: number("top_p", |f| (0.0..=1.0).contains(&f), fraction)?,
            min_p: number("min_p", |f| (0.0..=1.0).contains(&f), fraction)?,
            typical_p: number("typical_p", |f| f > 0.0 && f <= 1.0, "a number above 0, at most 1")?,
            epsilon_cutoff: number("epsilon_cutoff", |f| (0.0..=1.0).contains(&f), fraction)?,
            eta_cutoff: number("eta_cutoff", |f| (0.0..=1.0).contains(&f), fraction)?,
            top_h: number("top_h", |f| f > 0.0 && f <= 1.0, "a number above 0, at most 1")?,
            exponential_decay_length_penalty: length_decay,
            renormalize_logits: flag("renormalize_logits")?,
            remove_invalid_values: flag("remove_invalid_values")?,
            stop_strings,
            num_return_sequences: count("num_return_sequences", 1)?,
            suppress_tokens: id_list("suppress_tokens")?,
            begin_suppress_tokens: id_list("begin_suppress_tokens")?,
            bad_words_ids,
            sequence_bias,
            unapplied,
        })
    }
}

impl ModelConfig {
    /// The settings of the JSON files beside `export` (a model file inside the export folder); all unset when
    /// there are none.
    pub fn beside(export: &std::path::Path) -> Result<ModelConfig> {
        let config = json_beside(export, "config.json")?;
        let generation = json_beside(export, "generation_config.json")?;
        // generate() reads generation_config.json when there is one (a setting missing there is unset, not taken
        // from config.json), else the generation settings of config.json.
        let settings = generation.as_ref().or(config.as_ref());
        let in_settings = |key: &str| match settings {
            Some((path, v)) => token_id(path, v, key),
            None => Ok(None),
        };
        let mut eos_token_id = None;
        for (path, v) in config.iter().chain(generation.iter()) {
            if let Some(ids) = token_ids(path, v, "eos_token_id")? {
                eos_token_id = ids.first().copied();
                break;
            }
        }
        let eos_token_ids = match settings {
            Some((path, v)) => token_ids(path, v, "eos_token_id")?.unwrap_or_default(),
            None => Vec::new(),
        };
        let in_config = |key: &str| match &config {
            Some((path, v)) => token_id(path, v, key),
            None => Ok(None),
        };
        let (model_type, sliding_window) = match &config {
            Some((path, v)) => (model_type_in(path, v)?, sliding_window_in(path, v)?),
            None => (None, None),
        };
        Ok(ModelConfig {
            model_type,
            eos_token_id,
            eos_token_ids,
            sliding_window,
            forced_bos_token_id: in_settings("forced_bos_token_id")?,
            forced_eos_token_id: in_settings("forced_eos_token_id")?,
            pad_token_id: in_config("pad_token_id")?,
            decoder_start_token_id: in_config("decoder_start_token_id")?,
            bos_token_id: in_config("bos_token_id")?,
            generation_start_token_id: match in_settings("decoder_start_token_id")? {
                Some(id) => Some(id),
                None => in_settings("bos_token_id")?,
            },
            search: match settings {
                Some((path, v)) => GenerationSettings::read(path, v)?,
                None => GenerationSettings::default(),
            },
            settings_file: settings.map(|(path, _)| path.clone()),
        })
    }
}

/// `key` of a JSON object; `None` when absent or null (as transformers writes an unset setting).
fn setting<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn model_type_in(path: &std::path::Path, cfg: &serde_json::Value) -> Result<Option<String>> {
    let Some(v) = setting(cfg, "model_type") else { return Ok(None) };
    match v.as_str() {
        Some(t) => Ok(Some(t.to_string())),
        None => anyhow::bail!("{}: model_type is {v}, not a name such as \"gpt2\" or \"llama\"", path.display()),
    }
}

fn as_token_id(v: &serde_json::Value) -> Option<u32> {
    v.as_u64().and_then(|i| u32::try_from(i).ok())
}

/// `key` (one token id or a non-empty list of them) of a JSON file's settings. Anything else is an error:
/// generation would otherwise not stop where the model's own `generate` does.
fn token_ids(path: &std::path::Path, cfg: &serde_json::Value, key: &str) -> Result<Option<Vec<u32>>> {
    let Some(v) = setting(cfg, key) else { return Ok(None) };
    let ids = match v {
        serde_json::Value::Array(ids) => ids.iter().map(as_token_id).collect(),
        one => as_token_id(one).map(|i| vec![i]),
    };
    match ids {
        Some(ids) if !ids.is_empty() => Ok(Some(ids)),
        _ => anyhow::bail!(
            "{}: {key} is {v}; expected a token id (a whole number from 0) or a non-empty list of them",
            path.display()
        ),
    }
}

/// `key` holding one token id.
fn token_id(path: &std::path::Path, cfg: &serde_json::Value, key: &str) -> Result<Option<u32>> {
    let Some(v) = setting(cfg, key) else { return Ok(None) };
    match as_token_id(v) {
        Some(id) => Ok(Some(id)),
        None => anyhow::bail!("{}: {key} is {v}; expected a token id (a whole number from 0)", path.display()),
    }
}

fn sliding_window_in(path: &std::path::Path, cfg: &serde_json::Value) -> Result<Option<usize>> {
    if setting(cfg, "use_sliding_window") == Some(&serde_json::Value::Bool(false)) {
        return Ok(None);
    }
    let Some(v) = setting(cfg, "sliding_window") else { return Ok(None) };
    match v.as_u64() {
        Some(w) => Ok(Some(w as usize)),
        None => anyhow::bail!("{}: sliding_window is {v}; expected a number of tokens", path.display()),
    }
}

/// Sliding windows an export computes from token indices, as transformers 5's masks do for Mistral and Gemma:
/// `key > query - w` (`Greater`, or `Less` with the operands swapped), where key and query are indices made by
/// `Range`s. Returns each w. pfx does not rewrite these (GPT-Neo's table-sliced windows are `local_windows`), so
/// generation must keep its cache under them.
pub fn computed_windows(g: &Graph) -> Vec<usize> {
    computed_window_sites(g).into_iter().map(|(_, w)| w).collect()
}

/// The comparisons `computed_windows` finds: (index of the `Greater`/`Less` node, w). Its output is true for the
/// keys inside the window.
pub fn computed_window_sites(g: &Graph) -> Vec<(usize, usize)> {
    let prod = g.producers();
    let made_by_range = |x: &str| prod.get(x).is_some_and(|&i| g.nodes[i].op == "Range");
    let from_range = |v: &str| computed_from(g, &prod, v, made_by_range);
    let minus_constant = |v: &str| -> Option<(String, usize)> {
        let n = &g.nodes[*prod.get(v)?];
        let w = g.initializers.get(n.inputs.get(1)?).and_then(|t| t.as_i64s()).filter(|x| x.len() == 1)?[0];
        let w = match n.op.as_str() {
            "Sub" => w,
            "Add" => -w,
            _ => return None,
        };
        (w > 0).then(|| (n.inputs[0].clone(), w as usize))
    };
    let mut found = Vec::new();
    for (i, n) in g.nodes.iter().enumerate().filter(|(_, n)| n.inputs.len() == 2) {
        let (key, bound) = match n.op.as_str() {
            "Greater" => (&n.inputs[0], &n.inputs[1]),
            "Less" => (&n.inputs[1], &n.inputs[0]),
            _ => continue,
        };
        if let Some((query, w)) = minus_constant(bound) {
            if from_range(key) && from_range(&query) {
                found.push((i, w));
            }
        }
    }
    found
}

/// Whether the export's position table is read at `positions + 2`: OPT's learned positions (BART's kind), which
/// transformers numbers from the attention mask when no position ids are given, as in PEFT's forward: real
/// tokens get P + (real tokens before them), so a left-padded row is numbered from its first real token.
/// optimum's exports add 2 to a `position_ids` input; torch.onnx dynamo's compute the positions from the
/// `attention_mask` input in the graph. GPT-2, GPT-Neo and Llama number every row P + t.
pub fn positions_from_mask(g: &Graph) -> bool {
    let prod = g.producers();
    let numbered = |v: &str| v == "position_ids" || computed_from(g, &prod, v, |x| x == "attention_mask");
    position_lookups(g)
        .iter()
        .any(|n| prod.get(&n.inputs[1]).and_then(|&i| plus_two_of(g, &g.nodes[i])).is_some_and(numbered))
}

/// Whether the attention scores get ALiBi biases numbered from the attention mask, as Bloom's: a `CumSum` of the
/// `attention_mask` input along its last axis (transformers' `(cumsum(mask) - 1) * mask` times each head's slope)
/// reaches a `Softmax` without passing through a product with the keys (`MatMul`, `Gemm`). The bias of a key is
/// then its slope times the number of unmasked keys before it, whatever slots they fill, so a fixed-size cache
/// with the prefix first (masked pads and empty slots in between) gives each key PEFT's number. MPT's biases, a
/// constant table sliced to the key length, number the slots instead and are not this.
pub fn alibi_from_mask(g: &Graph) -> bool {
    if !g.is_input("attention_mask") {
        return false;
    }
    let (prod, cons) = (g.producers(), g.consumers());
    let last_axis = |n: &crate::ir::Node| {
        let rank = g.type_of(&n.inputs[0]).and_then(|t| t.shape).map(|s| s.len() as i64).unwrap_or(2);
        n.inputs
            .get(1)
            .and_then(|a| g.initializers.get(a))
            .and_then(|t| t.as_i64s())
            .is_some_and(|a| a.len() == 1 && a[0].rem_euclid(rank) == rank - 1)
    };
    g.nodes.iter().any(|n| {
        n.op == "CumSum"
            && last_axis(n)
            && computed_from(g, &prod, &n.inputs[0], |x| x == "attention_mask")
            && biases_scores(g, &cons, &n.outputs[0])
    })
}

/// Whether `start` reaches a `Softmax` without passing through a product with the keys (`MatMul`, `Gemm`) or a
/// shape read: a bias on the attention scores, not the scores themselves (`cons`: `Graph::consumers`).
fn biases_scores(g: &Graph, cons: &HashMap<String, Vec<usize>>, start: &str) -> bool {
    let mut seen = HashSet::new();
    let mut todo = vec![start.to_string()];
    while let Some(v) = todo.pop() {
        for &i in cons.get(&v).into_iter().flatten() {
            let n = &g.nodes[i];
            if n.op == "Softmax" {
                return true;
            }
            if !matches!(n.op.as_str(), "MatMul" | "Gemm" | "Shape" | "Size") && seen.insert(i) {
                todo.extend(n.outputs.iter().filter(|o| !o.is_empty()).cloned());
            }
        }
    }
    false
}

/// One ALiBi table numbered by slot (MPT's, [`alibi_slot_tables`]).
#[derive(Clone, Debug, PartialEq)]
pub struct AlibiTable {
    /// The `Slice` node that cuts the key columns out of the table.
    pub slice: usize,
    /// Each head's slope.
    pub slopes: Vec<f32>,
    /// The positions the table serves (its last axis).
    pub positions: usize,
}

/// ALiBi biases read from a constant table by key slot, as MPT's: a table [H, 1, N] (N = max_seq_len) holding
/// `slope_h * (j - (N - 1))`, of which a `Slice` along the last axis keeps the last columns, one per key, and whose
/// only readers add it to the scores (`Add`) on the way to a `Softmax`. A key's bias is its slot's, so the pads of
/// a left-padded prompt and the empty slots of a fixed-size cache would move the prefix away from the prompt and
/// the new token away from both. Runs on a canonical graph, before specialization folds the slices.
pub fn alibi_slot_tables(g: &Graph) -> Vec<AlibiTable> {
    let cons = g.consumers();
    let constant = |v: Option<&String>| v.and_then(|v| g.initializers.get(v)).and_then(|t| t.as_i64s());
    let mut found = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if n.op != "Slice" || n.inputs.len() < 4 {
            continue;
        }
        let Some(table) = g.initializers.get(&n.inputs[0]) else { continue };
        let shape = &table.shape;
        let rank = shape.len();
        if rank < 2 || shape[1..rank - 1].iter().any(|&d| d != 1) || shape[rank - 1] < 2 {
            continue;
        }
        let (heads, positions) = (shape[0], shape[rank - 1]);
        let last_axis =
            constant(n.inputs.get(3)).is_some_and(|a| a.len() == 1 && a[0].rem_euclid(rank as i64) == rank as i64 - 1);
        let to_end = constant(n.inputs.get(2)).is_some_and(|e| e.len() == 1 && e[0] >= positions as i64);
        let steps_one = n.inputs.get(4).filter(|s| !s.is_empty()).is_none_or(|s| constant(Some(s)) == Some(vec![1]));
        if !(last_axis && to_end && steps_one) {
            continue;
        }
        let Some(values) = table.as_f64s().filter(|_| table.dtype() == DType::F32) else { continue };
        // slope_h * (j - (N - 1)), in f32 as transformers computes it: the last column 0, the one before -slope.
        let slopes: Vec<f32> = (0..heads).map(|h| -(values[h * positions + positions - 2] as f32)).collect();
        let linear = slopes.iter().enumerate().all(|(h, &s)| {
            s > 0.0
                && (0..positions).all(|j| {
                    let want = (j as f32 - (positions - 1) as f32) * s;
                    let got = values[h * positions + j] as f32;
                    (got - want).abs() <= 1e-6 * want.abs().max(s)
                })
        });
        let readers = cons.get(&n.outputs[0]).map(Vec::as_slice).unwrap_or_default();
        let added =
            !readers.is_empty() && readers.iter().all(|&r| g.nodes[r].op == "Add") && !g.is_output(&n.outputs[0]);
        if linear && added && biases_scores(g, &cons, &n.outputs[0]) {
            found.push(AlibiTable { slice: i, slopes, positions });
        }
    }
    found
}

/// Whether value `v`, or a value it is computed from, is one that `found` accepts (`prod`: `Graph::producers`).
fn computed_from(g: &Graph, prod: &HashMap<String, usize>, v: &str, found: impl Fn(&str) -> bool) -> bool {
    let mut seen = HashSet::new();
    let mut todo = vec![v.to_string()];
    while let Some(v) = todo.pop() {
        if found(&v) {
            return true;
        }
        if let Some(&i) = prod.get(&v).filter(|_| seen.insert(v.clone())) {
            todo.extend(g.nodes[i].inputs.iter().filter(|x| !x.is_empty()).cloned());
        }
    }
    false
}

/// For each attention Softmax whose scores depend on a window comparison (`computed_window_sites`): that window
/// (the smallest, if several). Gemma-style exports window some layers only; this tells which, before specialization
/// folds the comparisons into constants.
pub fn computed_window_softmaxes(g: &Graph) -> BTreeMap<String, usize> {
    let sites = computed_window_sites(g);
    if sites.is_empty() {
        return BTreeMap::new();
    }
    let prod = g.producers();
    let outputs: BTreeMap<&str, usize> = sites.iter().map(|&(i, w)| (g.nodes[i].outputs[0].as_str(), w)).collect();
    let mut found = BTreeMap::new();
    for n in g.nodes.iter().filter(|n| n.op == "Softmax") {
        // The values the mask is computed from: not the scores' products (through them every layer depends on the
        // windowed layers before it), nor shapes (Gemma 2's full-attention mask takes a shape from the sliding one).
        let mut seen = HashSet::new();
        let mut todo = vec![n.inputs[0].as_str()];
        let mut w = None::<usize>;
        while let Some(v) = todo.pop() {
            if let Some(&x) = outputs.get(v) {
                w = Some(w.map_or(x, |y| y.min(x)));
            }
            if let Some(&i) = prod.get(v).filter(|_| seen.insert(v)) {
                if !matches!(g.nodes[i].op.as_str(), "Shape" | "Size" | "MatMul" | "Gemm") {
                    todo.extend(g.nodes[i].inputs.iter().filter(|x| !x.is_empty()).map(String::as_str));
                }
            }
        }
        if let Some(w) = w {
            found.insert(n.name.clone(), w);
        }
    }
    found
}

/// Local (sliding-window) attentions, as GPT-Neo's: `Where` node -> window w, for each `Where` whose condition is
/// a slice (only `Slice`s) of a square boolean table [.., N, N] that is a causal band: row i keeps keys i-w+1..=i.
/// The export slices rows `key_len - query_len .. key_len` of it, so with the prefix in front of the keys (as
/// PEFT's cache puts it) query t, at key index P + t, sees prefix key j only when P + t - j < w. A plain causal
/// table (no window) is not listed; a table of another pattern is an error, naming the node.
pub fn local_windows(g: &Graph) -> Result<BTreeMap<String, usize>> {
    let prod = g.producers();
    let mut found = BTreeMap::new();
    for n in g.nodes.iter().filter(|n| n.op == "Where") {
        let mut v = n.inputs[0].as_str();
        while let Some(&i) = prod.get(v) {
            if g.nodes[i].op != "Slice" {
                break;
            }
            v = g.nodes[i].inputs[0].as_str();
        }
        if v == n.inputs[0] {
            continue; // not sliced from a table
        }
        let Some(table) = g.initializers.get(v).filter(|t| t.dtype() == DType::Bool) else { continue };
        let r = table.shape.len();
        if r < 2 || table.shape[r - 1] != table.shape[r - 2] || table.len() != table.shape[r - 1].pow(2) {
            continue;
        }
        let size = table.shape[r - 1];
        let keep = table.as_i64s().unwrap_or_default();
        let at = |i: usize, j: usize| keep[i * size + j] != 0;
        // The window: the first row that no longer sees key 0 (none: plain causal).
        let w = (1..size).find(|&i| !at(i, 0)).unwrap_or(size);
        let band = (0..size).all(|i| (0..size).all(|j| at(i, j) == (j <= i && i - j < w)));
        if !band {
            anyhow::bail!(
                "the attention mask of '{}' is sliced from a table '{v}' that is neither causal nor a causal window: \
                 pfx cannot tell which prefix positions its queries see (export the model with past)",
                n.name
            );
        }
        if w < size {
            found.insert(n.name.clone(), w);
        }
    }
    Ok(found)
}

/// The heads of the keys and values: the past inputs' `[B, H_kv, past, D]` when the export has them, else the
/// query heads. Fewer than the query heads is grouped-query attention (Llama 3, TinyLlama, Qwen2): each key/value
/// head serves `heads / H_kv` query heads, and PEFT's prefix holds only those (`token_dim` = H_kv · D, PEFT's
/// `num_attention_heads` = H_kv), so pfx's does too. Exports without past are not read here (`inspect` finds
/// their key/value heads where the attention repeats them).
pub fn key_value_heads(g: &Graph, heads: usize, head_dim: usize) -> Result<usize> {
    use crate::ir::Dim;
    let mut found: Option<usize> = None;
    for v in g.inputs.iter().filter(|v| v.name.starts_with("past_key_values")) {
        // Shapes the export does not state are left to the binding's own checks.
        let Some([_, Dim::Known(h), _, Dim::Known(d)]) = v.ty.shape.as_deref() else { continue };
        if *d != head_dim || *h == 0 || !heads.is_multiple_of(*h) || found.is_some_and(|f| f != *h) {
            anyhow::bail!(
                "past input '{}' has shape {}: pfx needs [batch, H, past, {head_dim}] (the head size its attention \
                 multiplies values by) with the same H in every layer, dividing the {heads} query heads",
                v.name,
                v.ty.describe()
            );
        }
        found = Some(*h);
    }
    Ok(found.unwrap_or(heads))
}

/// The fewest heads the values `v` ([B, H, T, D], read by the attention's second MatMul) have on their way there,
/// following back the reshapes, expansions and transposes that grouped-query attention repeats them with
/// (`Unsqueeze` → `Expand` [B, H_kv, H / H_kv, T, D] → `Reshape`): H_kv, or H when nothing repeats them.
fn value_heads_before_repeat(g: &Graph, v: &str, d: usize) -> Option<usize> {
    let prod = g.producers();
    let keys = g.shape_of(v)?[2];
    let mut v = v.to_string();
    let mut fewest: Option<usize> = None;
    for _ in 0..8 {
        // [B, h, T, D] only: not the [B, T, H, D] layout before the heads are transposed out.
        if let Some(&[_, h, t, dd]) = g.shape_of(&v).as_deref() {
            if dd == d && t == keys {
                fewest = Some(fewest.map_or(h, |f| f.min(h)));
            }
        }
        let Some(&i) = prod.get(&v) else { break };
        let n = &g.nodes[i];
        if !matches!(n.op.as_str(), "Reshape" | "Expand" | "Unsqueeze" | "Transpose" | "Cast") {
            break;
        }
        v = n.inputs[0].clone();
    }
    fewest
}

/// Positions a canonical graph's learned position table gives: BART's and OPT's tables start 2 rows in.
pub fn usable_positions(g: &Graph, family: Family, rows: usize) -> usize {
    rows.saturating_sub(table_offset(g, family))
}

/// The row of a canonical graph's position table that position 0 reads: 2 for BART's and OPT's learned positions.
/// A graph in BART's layout whose lookup does not add the 2 (Marian's, Pegasus's and BlenderBot-small's tables,
/// sinusoidal or learned, start at row 0) reads from row 0; one that numbers positions from the ids (M2M100's,
/// [`IdNumbering`]) from row pad + 1.
pub fn table_offset(g: &Graph, family: Family) -> usize {
    match family {
        Family::BartEncoder | Family::BartDecoder => {
            if let Some(n) = position_lookup_sites(g).into_iter().find_map(|i| numbered_from_ids(g, i)) {
                return n.first_row();
            }
            let prod = g.producers();
            let adds_two = position_lookups(g)
                .iter()
                .any(|n| prod.get(&n.inputs[1]).is_some_and(|&i| plus_two_of(g, &g.nodes[i]).is_some()));
            if adds_two {
                2
            } else {
                0
            }
        }
        _ if positions_from_mask(g) => 2,
        _ => 0,
    }
}

/// A position lookup whose index the graph numbers from the token ids, as M2M100 (fairseq's
/// `make_positions`, HF's `create_position_ids_from_input_ids`) does: index = (count + past) · real + pad, where
/// real = (ids != pad), count = cumsum(real) and past the cache's length (absent without past). Real tokens read
/// rows pad + 1 + (real tokens before them) + past; pad tokens read row pad (the table's zero row).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdNumbering {
    /// The Mul node (count + past) · real.
    pub mul: usize,
    /// Which of its inputs is the count (the other is `real`).
    pub count_input: usize,
    /// The past-length term added to the count, with the Add node and input index that read it (exports with
    /// past compute it from the past's shape).
    pub past: Option<(usize, usize)>,
    /// The pad id added at the end: the row pad tokens read.
    pub pad: i64,
}

impl IdNumbering {
    /// The row the first real token reads without past.
    pub fn first_row(&self) -> usize {
        (self.pad + 1).max(0) as usize
    }
}

/// [`IdNumbering`] of the position lookup at node `site`, when its index is numbered from the ids.
pub fn numbered_from_ids(g: &Graph, site: usize) -> Option<IdNumbering> {
    let prod = g.producers();
    fn through<'a>(g: &'a Graph, prod: &HashMap<String, usize>, mut v: &'a str) -> Option<usize> {
        // Casts and reshapes between the arithmetic and the lookup change no value.
        loop {
            let &i = prod.get(v)?;
            let n = &g.nodes[i];
            if matches!(n.op.as_str(), "Cast" | "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze") {
                v = &n.inputs[0];
            } else {
                return Some(i);
            }
        }
    }
    let through = |v: &str| through(g, &prod, v);
    let int_scalar = |v: &str| g.initializers.get(v).and_then(|t| t.as_i64s()).filter(|x| x.len() == 1).map(|x| x[0]);
    let add = &g.nodes[through(&g.nodes[site].inputs[1])?];
    if add.op != "Add" || add.inputs.len() != 2 {
        return None;
    }
    let (rest, pad) = match (int_scalar(&add.inputs[0]), int_scalar(&add.inputs[1])) {
        (None, Some(c)) => (&add.inputs[0], c),
        (Some(c), None) => (&add.inputs[1], c),
        _ => return None,
    };
    let mul = through(rest)?;
    let m = &g.nodes[mul];
    if m.op != "Mul" || m.inputs.len() != 2 {
        return None;
    }
    let has_cumsum = |v: &str| computed_from(g, &prod, v, |x| prod.get(x).is_some_and(|&i| g.nodes[i].op == "CumSum"));
    let from_ids = |v: &str| computed_from(g, &prod, v, |x| x == "input_ids");
    // `real` comes from the ids without a running count; the count is a running sum of it.
    let count_input = match (has_cumsum(&m.inputs[0]), has_cumsum(&m.inputs[1])) {
        (true, false) if from_ids(&m.inputs[1]) => 0,
        (false, true) if from_ids(&m.inputs[0]) => 1,
        _ => return None,
    };
    // With past: count = cumsum(real) + past, past computed from a past input's shape.
    let from_past = |v: &str| computed_from(g, &prod, v, |x| x.starts_with("past_key_values"));
    let past = through(&m.inputs[count_input]).and_then(|i| {
        let n = &g.nodes[i];
        (n.op == "Add" && n.inputs.len() == 2)
            .then(|| (0..2).find(|&k| from_past(&n.inputs[k]) && !has_cumsum(&n.inputs[k])).map(|k| (i, k)))
            .flatten()
    });
    Some(IdNumbering { mul, count_input, past, pad })
}

/// The nodes that look rows up in a constant 2-D table by an index that is not the tokens': position tables (and
/// CodeGen's rotary sin/cos table).
fn position_lookups(g: &Graph) -> Vec<&crate::ir::Node> {
    position_lookup_sites(g).into_iter().map(|i| &g.nodes[i]).collect()
}

/// The indices of the nodes [`position_lookups`] finds (the compiler rewrites their indices).
pub fn position_lookup_sites(g: &Graph) -> Vec<usize> {
    let tok = token_index_values(g);
    (0..g.nodes.len())
        .filter(|&i| {
            let n = &g.nodes[i];
            n.op == "Gather"
                && g.initializers.get(&n.inputs[0]).is_some_and(|t| t.shape.len() == 2)
                && !tok.contains(&n.inputs[1])
        })
        .collect()
}

/// The other input of `n` when `n` adds a constant 2 to it (the row offset of BART's and OPT's tables).
fn plus_two_of<'a>(g: &Graph, n: &'a crate::ir::Node) -> Option<&'a str> {
    let is_two = |v: &str| g.initializers.get(v).and_then(|t| t.as_i64s()).is_some_and(|x| x.len() == 1 && x[0] == 2);
    match n.inputs.as_slice() {
        [a, b] if n.op == "Add" && is_two(b) => Some(a),
        [a, b] if n.op == "Add" && is_two(a) => Some(b),
        _ => None,
    }
}

/// Values derived from `input_ids` through index-preserving ops (to find the token-embedding Gather).
fn token_index_values(g: &Graph) -> HashSet<String> {
    index_values(g, "input_ids")
}

/// Values derived from the input `root` through index-preserving ops (casts and reshapes).
fn index_values(g: &Graph, root: &str) -> HashSet<String> {
    let mut vals: HashSet<String> = [root.to_string()].into();
    for n in &g.nodes {
        if matches!(n.op.as_str(), "Cast" | "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" | "View")
            && n.input(0).map(|i| vals.contains(i)).unwrap_or(false)
        {
            vals.insert(n.outputs[0].clone());
        }
    }
    vals
}

/// Whether `b` is the 2-D transpose of `a`, compared in place (no transposed copy of a vocabulary matrix).
fn is_transpose_of(b: &crate::tensor::Tensor, a: &crate::tensor::Tensor) -> bool {
    use crate::tensor::Data;
    if a.shape.len() != 2 || b.shape != [a.shape[1], a.shape[0]] {
        return false;
    }
    let (r, c) = (a.shape[0], a.shape[1]);
    match (&*a.data, &*b.data) {
        (Data::F32(x), Data::F32(y)) => (0..r).all(|i| (0..c).all(|j| x[i * c + j] == y[j * r + i])),
        _ => false,
    }
}

pub fn inspect(model: &Model) -> Result<ModelInfo> {
    let raw = model;
    let mut canon = raw.clone();
    canonicalize(&mut canon)?;
    let g = &canon.graph;
    let family = detect_family(g);
    let with_past = g.inputs.iter().any(|v| v.name.starts_with("past_key_values"));
    let merged_decoder = g.inputs.iter().any(|v| v.name == "use_cache_branch");

    let Embeddings { vocab, hidden, token_table: wte_name, position_rows, position_width } = embeddings(g);
    let rotary_table = position_width.is_some() && position_width != hidden && read_by_position_ids(g);

    // Heads and layers from a small specialization: attention softmaxes are [B, H, Tq, Tk].
    let mut spec = canon.clone();
    let dims = Dims {
        batch: 1,
        seq: 2,
        past: if with_past { Some(1) } else { None },
        src_len: if family == Family::BartDecoder { Some(3) } else { None },
    };
    let mut heads = None;
    let mut softmaxes = 0;
    let mut tied = None;
    // The head size: the last axis of the values the attention weights multiply ([B, H, Tk, D]). Not always
    // width / heads: Qwen3's and Gemma's heads are wider.
    let mut value_widths = std::collections::BTreeSet::new();
    // Heads of the values before grouped-query attention repeats them (exports without past; see `value_heads`).
    let mut value_heads = std::collections::BTreeSet::new();
    if specialize(&mut spec, &dims).is_ok() {
        let mut probs = std::collections::HashSet::new();
        for n in &spec.graph.nodes {
            if n.op == "Softmax" {
                if let Some(s) = spec.graph.shape_of(&n.inputs[0]) {
                    if s.len() == 4 {
                        heads = Some(s[1]);
                        softmaxes += 1;
                        probs.insert(n.outputs[0].as_str());
                    }
                }
            }
        }
        // The weights may pass through elementwise guards first (Qwen3's exports zero NaN rows with a `Where`).
        for n in &spec.graph.nodes {
            if n.op == "MatMul" && probs.contains(n.inputs[0].as_str()) {
                if let Some(&[_, _, _, d]) = spec.graph.shape_of(&n.inputs[1]).as_deref() {
                    value_widths.insert(d);
                    value_heads.extend(value_heads_before_repeat(&spec.graph, &n.inputs[1], d));
                }
            } else if matches!(n.op.as_str(), "Where" | "Cast" | "Mul")
                && n.inputs.iter().any(|i| probs.contains(i.as_str()))
            {
                probs.insert(n.outputs[0].as_str());
            }
        }
        if let (Some(wte), Some(v)) = (wte_name.as_ref().and_then(|w| g.initializers.get(w)), vocab) {
            // The LM head: a MatMul whose constant operand is the embedding matrix (transposed or not).
            let mut found = false;
            for n in &spec.graph.nodes {
                if n.op != "MatMul" {
                    continue;
                }
                if let Some(b) = spec.graph.initializers.get(&n.inputs[1]) {
                    if b.shape.contains(&v) && b.shape.len() == 2 {
                        found = true;
                        tied = Some(b.data == wte.data || is_transpose_of(b, wte));
                    }
                }
            }
            if !found && family == Family::Gpt2Decoder {
                tied = Some(false);
            }
        }
    }
    let per_layer = if family == Family::BartDecoder { 2 } else { 1 };
    let layers = if with_past {
        Some(
            g.inputs.iter().filter(|v| v.name.starts_with("past_key_values") && v.name.ends_with("key")).count()
                / if family == Family::BartDecoder { 2 } else { 1 },
        )
        .filter(|&l| l > 0)
    } else if softmaxes > 0 {
        Some(softmaxes / per_layer)
    } else {
        None
    };
    let head_size = match (value_widths.len(), hidden, heads) {
        (1, _, _) => value_widths.first().copied(),
        (0, Some(d), Some(h)) if h > 0 => Some(d / h),
        _ => None,
    };
    // None where the past inputs do not fit the heads (compile says why). Without past: the values' heads before
    // grouped-query attention repeats them.
    let key_value_heads = match (heads, head_size) {
        (Some(h), Some(d)) if with_past => key_value_heads(g, h, d).ok(),
        (Some(h), Some(_)) if value_heads.len() == 1 => value_heads.first().copied().filter(|kv| h % kv == 0),
        _ => None,
    };
    let io = |v: &crate::ir::ValueInfo| IoInfo { name: v.name.clone(), r#type: v.ty.describe() };
    Ok(ModelInfo {
        family,
        with_past,
        merged_decoder,
        exporter: exporter_flavour(raw),
        producer: format!("{} {}", raw.producer_name, raw.producer_version).trim().to_string(),
        opset: raw.opset,
        inputs: raw.graph.inputs.iter().map(io).collect(),
        outputs: raw.graph.outputs.iter().map(io).collect(),
        layers,
        heads,
        key_value_heads,
        head_size,
        hidden,
        vocab,
        position_rows,
        positions: position_rows.map(|r| usable_positions(g, family, r)),
        rotary_table,
        pad_row: position_lookup_sites(g)
            .into_iter()
            .find_map(|i| numbered_from_ids(g, i))
            .and_then(|n| usize::try_from(n.pad).ok()),
        relative_bias_buckets: None,
        alibi: if alibi_from_mask(g) {
            Some("mask".into())
        } else {
            alibi_slot_tables(g).iter().map(|t| t.positions).min().map(|n| format!("slots {n}"))
        },
        config_model_type: None,
        unsupported: unsupported_reason(g, family),
        tied_embeddings: tied,
        weight_count: raw.graph.initializers.values().filter(|t| t.len() > 1).count(),
        weight_bytes: raw.graph.initializers.values().map(|t| t.byte_len()).sum(),
        nodes: raw.graph.nodes.len(),
        op_histogram: raw.graph.op_histogram(),
    })
}

impl ModelInfo {
    /// A graph of a T5 export (its config.json says so): the narrow table it looks up is its relative position bias,
    /// which the BART path handles, not a position table.
    pub fn as_t5(&mut self, g: &Graph) {
        self.unsupported = unsupported_except_relative_bias(g, self.family);
        self.relative_bias_buckets = self.position_rows.take();
        self.positions = None;
        self.pad_row = None;
    }

    pub fn to_text(&self) -> String {
        let opt = |v: Option<usize>| v.map(|x| x.to_string()).unwrap_or_else(|| "?".into());
        let mut s = String::new();
        let config = self.config_model_type.as_ref().map(|t| format!("; config.json: {t}")).unwrap_or_default();
        s += &format!("family:      {}{}{config}\n", self.family, if self.with_past { " (with past)" } else { "" });
        if self.merged_decoder {
            s += "layout:      optimum merged decoder (If on use_cache_branch)\n";
        }
        s += &format!("exporter:    {} (producer '{}', opset {})\n", self.exporter, self.producer, self.opset);
        s += &format!(
            "dimensions:  layers {}, heads {}{}, head size {}, hidden {}, vocabulary {}, {}{}\n",
            opt(self.layers),
            opt(self.heads),
            match self.key_value_heads {
                Some(kv) if Some(kv) != self.heads => format!(" (key/value heads {kv})"),
                _ => String::new(),
            },
            opt(self.head_size),
            opt(self.hidden),
            opt(self.vocab),
            match (self.position_rows, self.family) {
                (Some(rows), _) if self.rotary_table => format!("rotary sine/cosine table of {rows} positions"),
                (Some(rows), _) => format!("position rows {rows}"),
                (None, _) if self.relative_bias_buckets.is_some() => format!(
                    "no position table (T5's relative position bias, {} buckets)",
                    self.relative_bias_buckets.unwrap_or_default()
                ),
                (None, Family::Gpt2Decoder) => match self.alibi.as_deref().map(|a| a.split_once(' ')) {
                    Some(None) => "no position table (ALiBi biases numbered from the attention mask)".to_string(),
                    Some(Some((_, n))) => format!(
                        "no position table (ALiBi biases read by key slot from a table of {n} positions; \
                         generation numbers them from the attention mask)"
                    ),
                    // Llama's rotary angles come from the positions inside the graph.
                    None => "no position table (positions enter inside the graph: rotary angles or ALiBi)".to_string(),
                },
                (None, _) => "position rows ?".to_string(),
            },
            // BART's and OPT's tables start 2 rows in: say how many positions a sequence (prefix included) has.
            match (self.position_rows, self.positions, self.pad_row) {
                (Some(_), Some(n), Some(pad)) => {
                    format!(" ({n} positions numbered from the token ids: from row {}; pads read row {pad})", pad + 1)
                }
                (Some(rows), Some(n), None) if n != rows => {
                    format!(" ({n} positions: the first {} rows are not used)", rows - n)
                }
                _ => String::new(),
            }
        );
        s += &format!(
            "tied embeddings: {}\n",
            match self.tied_embeddings {
                Some(true) => "yes",
                Some(false) => "no",
                None => "?",
            }
        );
        if let Some(why) = &self.unsupported {
            s += &format!("not supported: the graph {why}\n");
        }
        s += &format!("weights:     {} tensors, {} bytes\n", self.weight_count, self.weight_bytes);
        s += "inputs:\n";
        for v in &self.inputs {
            s += &format!("  {}: {}\n", v.name, v.r#type);
        }
        s += "outputs:\n";
        for v in &self.outputs {
            s += &format!("  {}: {}\n", v.name, v.r#type);
        }
        s += &format!("nodes:       {}\n", self.nodes);
        for (op, n) in &self.op_histogram {
            s += &format!("  {op:<20} {n}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    /// A `Where` choosing by a slice of a square boolean table: a causal band gives its window, a plain causal
    /// table none, and any other table is refused (pfx could not tell which prefix keys a query sees).
    #[test]
    fn windows_sliced_from_tables() {
        let table = |keep: &dyn Fn(usize, usize) -> bool| {
            let mut g = Graph::default();
            let v: Vec<bool> = (0..36).map(|x| keep(x / 6, x % 6)).collect();
            let t = g.add_const("table", Tensor::bool(vec![1, 1, 6, 6], v));
            let (s, e, a) = (Tensor::vec_i64(&[0]), Tensor::vec_i64(&[4]), Tensor::vec_i64(&[2]));
            let (s, e, a) = (g.add_const("s", s), g.add_const("e", e), g.add_const("a", a));
            let cond = g.op1("Slice", &[&t, &s, &e, &a], vec![], "cond");
            let x = g.add_const("x", Tensor::f32(vec![1], vec![1.0]));
            g.op1("Where", &[&cond, &x, &x], vec![], "masked");
            local_windows(&g).map(|w| w.into_values().collect::<Vec<_>>())
        };
        assert_eq!(table(&|i, j| j <= i && i - j < 2).unwrap(), vec![2]);
        assert!(table(&|i, j| j <= i).unwrap().is_empty());
        let e = table(&|_, _| true).unwrap_err().to_string();
        assert!(e.contains("neither causal nor a causal window"), "{e}");
    }

    /// `key > (query - 3)` over Range-made indices, as transformers 5 writes Mistral's sliding window.
    #[test]
    fn a_window_computed_from_indices_is_found() {
        let mut g = Graph::default();
        let (zero, one, n) = (Tensor::scalar_i64(0), Tensor::scalar_i64(1), Tensor::scalar_i64(8));
        let (zero, one, n) = (g.add_const("zero", zero), g.add_const("one", one), g.add_const("n", n));
        let keys = g.op1("Range", &[&zero, &n, &one], vec![], "keys");
        let queries = g.op1("Range", &[&zero, &n, &one], vec![], "queries");
        let w = g.add_const("w", Tensor::vec_i64(&[3]));
        let bound = g.op1("Sub", &[&queries, &w], vec![], "bound");
        g.op1("Greater", &[&keys, &bound], vec![], "near");
        assert_eq!(computed_windows(&g), vec![3]);
        // The same comparison against a weight-derived value is no window.
        let weight = g.add_const("weight", Tensor::f32(vec![1], vec![2.0]));
        let other = g.op1("Sub", &[&weight, &w], vec![], "other");
        g.op1("Greater", &[&keys, &other], vec![], "not_a_window");
        assert_eq!(computed_windows(&g), vec![3]);
    }

    /// The end-of-text ids beside an export, as transformers reads them: the format's one from config.json (the
    /// first of a list), and every id generate stops at from generation_config.json, else config.json.
    #[test]
    fn eos_ids_come_from_config_and_generation_config() {
        let dir = std::env::temp_dir().join(format!("pfx-inspect-eos-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let export = dir.join("model.onnx");
        let write =
            |name: &str, ids: &str| std::fs::write(dir.join(name), format!("{{\"eos_token_id\": {ids}}}")).unwrap();
        let both = || {
            let c = ModelConfig::beside(&export).unwrap();
            (c.eos_token_id, c.eos_token_ids)
        };
        assert_eq!(both(), (None, vec![]));
        write("config.json", "[128001, 128008, 128009]");
        assert_eq!(both(), (Some(128001), vec![128001, 128008, 128009]));
        write("config.json", "128009");
        write("generation_config.json", "[128001, 128009]");
        assert_eq!(both(), (Some(128009), vec![128001, 128009]));
        // generation_config.json, when there, is all generate reads: an unset id (null) there is no id (the
        // format's end token still comes from config.json).
        write("generation_config.json", "null");
        assert_eq!(both(), (Some(128009), vec![]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Forced first and last tokens come from generation_config.json when there is one, else config.json, as
    /// generate takes them.
    #[test]
    fn forced_ids_prefer_generation_config() {
        let dir = std::env::temp_dir().join(format!("pfx-inspect-forced-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let export = dir.join("model.onnx");
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        let forced = || {
            let c = ModelConfig::beside(&export).unwrap();
            (c.forced_bos_token_id, c.forced_eos_token_id)
        };
        assert_eq!(forced(), (None, None));
        write("config.json", "{\"forced_bos_token_id\": 250004, \"forced_eos_token_id\": 2}");
        assert_eq!(forced(), (Some(250004), Some(2)));
        // With a generation_config.json, config.json's generation settings are not read (HF's generate): unset
        // there (null or absent) is unset.
        write("generation_config.json", "{\"forced_eos_token_id\": 3, \"forced_bos_token_id\": null}");
        assert_eq!(forced(), (None, Some(3)));
        write("generation_config.json", "{}");
        assert_eq!(forced(), (None, None));
        write("generation_config.json", "{\"forced_eos_token_id\": [2]}");
        let m = format!("{:#}", ModelConfig::beside(&export).unwrap_err());
        assert!(m.contains("generation_config.json: forced_eos_token_id is [2]"), "{m}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The search settings generate would apply by default, and those pfx does not do, from the generation settings.
    #[test]
    fn search_settings_come_from_the_generation_config() {
        let dir = std::env::temp_dir().join(format!("pfx-inspect-search-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let export = dir.join("model.onnx");
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        // bart-large-cnn's settings, plus a penalty, one setting pfx does not apply and neutral ones it ignores.
        write(
            "config.json",
            "{\"num_beams\": 4, \"length_penalty\": 2.0, \"no_repeat_ngram_size\": 3, \"early_stopping\": true, \
             \"min_length\": 56, \"max_length\": 142, \"repetition_penalty\": 1.2, \"do_sample\": false, \
             \"encoder_no_repeat_ngram_size\": 3, \"diversity_penalty\": 0.0, \"num_beam_groups\": 2, \
             \"decoder_start_token_id\": 2}",
        );
        let c = ModelConfig::beside(&export).unwrap();
        let want = GenerationSettings {
            num_beams: Some(4),
            length_penalty: Some(2.0),
            no_repeat_ngram_size: Some(3),
            early_stopping: Some(EarlyStopping::Early),
            min_length: Some(56),
            max_length: Some(142),
            encoder_no_repeat_ngram_size: Some(3),
            repetition_penalty: Some(1.2),
            do_sample: Some(false),
            unapplied: vec!["num_beam_groups 2".into()],
            ..GenerationSettings::default()
        };
        assert_eq!((c.search, c.generation_start_token_id), (want, Some(2)));
        // A generation_config.json replaces them all (a chat model's sampling settings here).
        write(
            "generation_config.json",
            "{\"early_stopping\": \"never\", \"bos_token_id\": 0, \"do_sample\": true, \"temperature\": 0.6, \
             \"top_p\": 0.9, \"top_k\": 0, \"min_p\": 0.05, \"typical_p\": 0.95, \"max_new_tokens\": 7, \
             \"encoder_repetition_penalty\": 0.5, \"eta_cutoff\": 0.001}",
        );
        let c = ModelConfig::beside(&export).unwrap();
        let want = GenerationSettings {
            early_stopping: Some(EarlyStopping::Never),
            do_sample: Some(true),
            temperature: Some(0.6),
            top_p: Some(0.9),
            top_k: Some(0),
            min_p: Some(0.05),
            typical_p: Some(0.95),
            max_new_tokens: Some(7),
            encoder_repetition_penalty: Some(0.5),
            eta_cutoff: Some(0.001),
            ..GenerationSettings::default()
        };
        assert_eq!((&c.search, c.generation_start_token_id), (&want, Some(0)));
        assert_eq!(c.decoder_start_token_id, Some(2), "training's start is config.json's");
        // Written into manifests as HF writes it, and read back.
        let json = serde_json::to_string(&c.search).unwrap();
        assert!(json.contains("\"early_stopping\":\"never\""), "{json}");
        assert_eq!(serde_json::from_str::<GenerationSettings>(&json).unwrap(), want);
        let old: GenerationSettings = serde_json::from_str("{\"early_stopping\": true}").unwrap();
        assert_eq!(old.early_stopping, Some(EarlyStopping::Early), "a bundle of session 16 reads as it was written");
        // What such a bundle recorded as unapplied and pfx now does is applied; the rest stays named.
        let old: GenerationSettings = serde_json::from_str(
            "{\"num_beams\": 2, \"unapplied\": [\"repetition_penalty 1.3\", \"do_sample true\", \"num_beam_groups 2\", \
             \"early_stopping \\\"never\\\"\", \"bad_words_ids [[5]]\"]}",
        )
        .unwrap();
        let want = GenerationSettings {
            num_beams: Some(2),
            repetition_penalty: Some(1.3),
            do_sample: Some(true),
            early_stopping: Some(EarlyStopping::Never),
            bad_words_ids: vec![vec![5]],
            unapplied: vec!["num_beam_groups 2".into()],
            ..GenerationSettings::default()
        };
        assert_eq!(old.recovered(), want);
        assert_eq!(want.recovered(), want, "nothing to recover");
        for (key, odd) in [
            ("num_beams", "2.5"),
            ("num_beams", "0"),
            ("num_beams", "\"4\""),
            ("early_stopping", "\"always\""),
            ("repetition_penalty", "0"),
            ("temperature", "-1"),
            ("top_p", "1.5"),
            ("typical_p", "0"),
            ("do_sample", "1"),
            ("max_new_tokens", "0"),
            ("num_return_sequences", "0"),
            ("top_h", "0"),
            ("renormalize_logits", "1"),
            ("exponential_decay_length_penalty", "[2]"),
            ("exponential_decay_length_penalty", "[-1,1.5]"),
            ("exponential_decay_length_penalty", "[2,0]"),
        ] {
            write("generation_config.json", &format!("{{\"{key}\": {odd}}}"));
            let m = format!("{:#}", ModelConfig::beside(&export).unwrap_err());
            assert!(m.contains(&format!("generation_config.json: {key} is {odd}")), "{m}");
        }
        write(
            "generation_config.json",
            "{\"suppress_tokens\": [], \"begin_suppress_tokens\": [7, 8], \"bad_words_ids\": [[5], [6, 9]], \
             \"sequence_bias\": [[[3], -2.5], [[4, 1], 1.0]]}",
        );
        let c = ModelConfig::beside(&export).unwrap().search;
        assert!(c.unapplied.is_empty() && c.suppress_tokens.is_empty(), "{c:?}");
        write(
            "generation_config.json",
            "{\"exponential_decay_length_penalty\": [3, 1.25], \"renormalize_logits\": true, \"top_h\": 0.4, \
             \"remove_invalid_values\": false, \"stop_strings\": [\"\\n\"], \"guidance_scale\": 1.0, \
             \"token_healing\": false, \"penalty_alpha\": 0.6}",
        );
        let d = ModelConfig::beside(&export).unwrap().search;
        assert_eq!(d.exponential_decay_length_penalty, Some((3, 1.25)));
        assert_eq!((d.renormalize_logits, d.remove_invalid_values, d.top_h), (Some(true), Some(false), Some(0.4)));
        assert_eq!(d.unapplied, ["penalty_alpha 0.6"], "{d:?}");
        assert_eq!(d.stop_strings, ["\n"]);
        // A bundle that recorded them as unapplied applies them now.
        let old: GenerationSettings =
            serde_json::from_str("{\"unapplied\": [\"exponential_decay_length_penalty [3,1.25]\"]}").unwrap();
        assert_eq!(old.recovered().exponential_decay_length_penalty, Some((3, 1.25)));
        assert_eq!((c.begin_suppress_tokens, c.bad_words_ids), (vec![7, 8], vec![vec![5], vec![6, 9]]));
        assert_eq!(c.sequence_bias, [(vec![3], -2.5), (vec![4, 1], 1.0)]);
        for (key, odd) in [
            ("suppress_tokens", "[1.5]"),
            ("bad_words_ids", "[5]"),
            ("bad_words_ids", "[[]]"),
            ("sequence_bias", "[[[3]]]"),
            ("sequence_bias", "{\"3\": 1.0}"),
        ] {
            write("generation_config.json", &format!("{{\"{key}\": {odd}}}"));
            let m = format!("{:#}", ModelConfig::beside(&export).unwrap_err());
            assert!(m.contains(&format!("generation_config.json: {key} is")), "{m}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A config.json or generation_config.json that is there but broken, or holds something else than token ids
    /// or a window, is an error naming the file, not a silent "no setting".
    #[test]
    fn broken_model_json_files_are_errors_naming_them() {
        let dir = std::env::temp_dir().join(format!("pfx-inspect-broken-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let export = dir.join("model.onnx");
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        let message = || format!("{:#}", ModelConfig::beside(&export).unwrap_err());
        write("generation_config.json", "{");
        let m = message();
        assert!(m.contains("generation_config.json is not valid JSON"), "{m}");
        for odd in ["[2.0]", "[95, -1]", "\"</s>\"", "4294967296", "[]"] {
            write("generation_config.json", &format!("{{\"eos_token_id\": {odd}}}"));
            let m = message();
            assert!(m.contains("generation_config.json: eos_token_id is"), "{odd}: {m}");
        }
        // config.json's is read first for the format's end token: refused there too.
        std::fs::remove_file(dir.join("generation_config.json")).unwrap();
        write("config.json", "{\"eos_token_id\": [95, -1]}");
        assert!(message().contains("config.json: eos_token_id is"));
        // Valid JSON that is not an object of settings is no config either.
        for not_object in ["[1, 2]", "null", "7"] {
            write("config.json", not_object);
            let m = config_model_type(&export).unwrap_err().to_string();
            assert!(m.contains("config.json holds") && m.contains("not an object"), "{not_object}: {m}");
            assert_eq!(message(), m);
        }
        write("config.json", "{\"model_type\": 3}");
        assert!(config_model_type(&export).unwrap_err().to_string().contains("config.json: model_type is 3"));
        assert!(message().contains("config.json: model_type is 3"));
        write("config.json", "{\"model_type\": \"qwen2\", \"sliding_window\": \"4k\"}");
        assert!(message().contains("sliding_window is \"4k\""));
        write("config.json", "{\"model_type\": \"qwen2\", \"sliding_window\": null}");
        assert_eq!(config_model_type(&export).unwrap().as_deref(), Some("qwen2"));
        assert_eq!(ModelConfig::beside(&export).unwrap().sliding_window, None);
        write("config.json", "{\"use_sliding_window\": false, \"sliding_window\": \"4k\"}");
        assert_eq!(ModelConfig::beside(&export).unwrap().sliding_window, None);
        write("config.json", "{\"sliding_window\": 4096}");
        assert_eq!(ModelConfig::beside(&export).unwrap().sliding_window, Some(4096));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
