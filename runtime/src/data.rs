//! Datasets for table-to-text prefix-tuning: reading examples, formatting and tokenizing them the way
//! the prefix-tuning reference code does, and shuffled batches.
//!
//! # Files ([`read_examples`])
//!
//! The format comes from the extension:
//!
//! - `.txt`, `.e2e`: E2E, the reference code's line format `MR||text`, one example per line, e.g.
//!   `name : Alimentum | area : city centre||There is a place in the city centre .`;
//! - `.jsonl`: one JSON object per line, `{"source": "...", "target": "..."}` (other fields ignored; for
//!   generation, [`read_sources`], an optional `"prefix"` names the prefix file that source generates with);
//! - `.json`: DART, a JSON list of entries
//!   `{"tripleset": [[s, p, o], ...], "annotations": [{"source": ..., "text": ...}, ...]}`, one example per
//!   annotation.
//!
//! DART sources are linearized as the reference code does for DART: `s : p : o` per triple, the predicate
//! lower-cased, triples joined with `" | "` (`name : The Vaults | ...` style, like E2E's MRs). Its WebNLG
//! reader differs (it writes `" | "` before every triple, the first one included, and keeps the predicate's
//! case); WebNLG files are not read here: convert them to JSONL.
//!
//! Source and target are trimmed of surrounding whitespace (E2E lines end with a space; the reference keeps
//! it, which only changes the whitespace token before EOS). Blank lines are skipped. A line that cannot be
//! used is kept as a [`BadLine`] (`file:line` and why) and reported by the caller; a file with no usable
//! example is an error that names it and its first bad lines. Every [`Example`] records its `file:line`
//! (for DART, the line where its annotation starts).
//!
//! # Format and labels ([`TableToText`])
//!
//! As in the reference code (GPT-2, BOS = EOS = `<|endoftext|>`), an example is the text
//! `' ' + source + ' ' + BOS + ' ' + target + ' ' + EOS`; the model is trained on the target tokens and the
//! final EOS, and sees `' ' + source + ' ' + BOS` as the prompt at generation time
//! ([`TableToText::encode_prompt`]). The source part `' ' + source + ' ' + BOS` and the target part
//! `' ' + target + ' ' + EOS` are tokenized separately and their ids concatenated, so the boundary between
//! unlabelled and labelled tokens is exact. This gives the same ids as tokenizing the whole text at once,
//! because the special token always ends a pre-token. With GPT-2's tokenizer the special token does not absorb
//! the spaces around it, so the space before each `<|endoftext|>` is a token of its own (`Ġ`, 220), in
//! training and in the prompt alike (as Hugging Face's GPT-2 tokenizers give it).
//!
//! A model trained with its own special tokens (Llama, OPT, Qwen, ...: any `model_type` outside GPT-2's family)
//! gets the same layout in its tokens ([`TableToText::with_model_eos`]): the source encoded as the tokenizer
//! encodes a text (`tokenizer(source)` in Hugging Face's terms: with the BOS its post-processor adds, Llama's
//! `<s>`, OPT's `</s>`, none for Qwen), then the model's EOS (its `config.json`'s `eos_token_id`) where GPT-2's
//! ends the prompt with `<|endoftext|>`, its own EOS (not a second one when the post-processor already ends a
//! text with it, as Llama's with `add_eos_token`); then the target encoded without special tokens, and EOS.
//! No spaces are added: SentencePiece tokenizers (Llama's) mark word starts themselves and would make a leading
//! space a token of its own.
//!
//! Labels are aligned with `input_ids` (the loss shifts them): [`IGNORE_INDEX`] (-100) on the source part,
//! through the BOS, then the target ids and the final EOS. Rows have a fixed length T, right-padded with the
//! EOS id, attention 0 and label -100 on padding. A longer example is cut at the end ([`Overlong::Truncate`],
//! kept only if at least one target label remains) or dropped ([`Overlong::Skip`]).
//!
//! # Batches ([`batches`])
//!
//! Each epoch visits every example once in an order shuffled by a seeded SplitMix64 (Fisher–Yates), the
//! same on every run and platform for the same (seed, epoch). The last batch, if partial, is filled up by
//! wrapping around to the start of that epoch's order; those rows are marked `real = false`, and the trainer
//! must set their labels to -100 ([`Encoded::ignore_labels`]) so that no example counts twice in an epoch.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::tokenize::{Tokenizer, GPT2_EOS};

/// Label value the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// How many bad lines error messages and summaries quote.
const QUOTED_BAD_LINES: usize = 5;

/// One source/target pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The table, linearized (E2E MR, DART triples, JSONL `source`).
    pub source: String,
    /// One reference text.
    pub target: String,
    /// Where it came from: `file:line`.
    pub origin: String,
    /// A JSONL line's `"prefix"` read for generation ([`read_sources`]): the prefix file (as written) this source
    /// generates with, instead of the run's.
    pub prefix: Option<String>,
}

/// What one line gives: source, target, prefix.
type Fields = (String, String, Option<String>);

/// A line (or DART entry / annotation) that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// `file:line`.
    pub origin: String,
    pub reason: String,
}

impl fmt::Display for BadLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.reason)
    }
}

/// The file formats [`read_examples`] reads (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `MR||text` lines (`.txt`, `.e2e`).
    E2e,
    /// `{"source": ..., "target": ...}` lines (`.jsonl`).
    Jsonl,
    /// DART json (`.json`).
    Dart,
}

impl Format {
    /// The format of a file, from its extension.
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("txt" | "e2e") => Ok(Format::E2e),
            Some("jsonl") => Ok(Format::Jsonl),
            Some("json") => Ok(Format::Dart),
            // A missing file is the error to report, whatever its name.
            _ if !path.exists() => bail!("cannot read dataset {}: no such file", path.display()),
            _ => bail!(
                "cannot tell the format of {} from its extension: use .txt or .e2e for E2E `MR||text` lines, \
                 .jsonl for {{\"source\": ..., \"target\": ...}} lines, .json for DART",
                path.display()
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::E2e => "E2E",
            Format::Jsonl => "JSONL",
            Format::Dart => "DART",
        }
    }

    /// What a bad item of the file is called in messages: DART's are entries and annotations, not lines.
    fn bad_items(self) -> &'static str {
        match self {
            Format::Dart => "entries or annotations",
            _ => "line(s)",
        }
    }
}

/// The examples of one file, and the lines that could not be read.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub format: Format,
    pub examples: Vec<Example>,
    pub bad_lines: Vec<BadLine>,
}

impl Dataset {
    /// A warning about the bad lines (count and the first few), or `None` if there are none.
    pub fn bad_lines_summary(&self) -> Option<String> {
        if self.bad_lines.is_empty() {
            return None;
        }
        Some(format!(
            "{}: skipped {} bad {} of {} ({} examples read):\n{}",
            self.path.display(),
            self.bad_lines.len(),
            self.format.bad_items(),
            self.format.name(),
            self.examples.len(),
            quote_bad_lines(&self.bad_lines)
        ))
    }

    /// [`group_by_source`] of the examples.
    pub fn group_by_source(&self) -> Vec<SourceGroup> {
        group_by_source(&self.examples)
    }
}

fn quote_bad_lines(bad: &[BadLine]) -> String {
    let mut s: Vec<String> = bad.iter().take(QUOTED_BAD_LINES).map(|b| format!("  {b}")).collect();
    if bad.len() > QUOTED_BAD_LINES {
        s.push(format!("  ... and {} more", bad.len() - QUOTED_BAD_LINES));
    }
    s.join("\n")
}

/// A text file's contents, its byte-order mark dropped; a byte sequence that is not UTF-8 is reported with its
/// line. `what` names the file in messages ("reference file").
pub fn read_text(path: &Path, what: &str) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        anyhow::anyhow!("{what} {}:{line}: not valid UTF-8", path.display())
    })?;
    Ok(text.strip_prefix('\u{feff}').map(str::to_owned).unwrap_or(text))
}

/// Reads a dataset, its format chosen by the extension ([`Format::from_path`]).
pub fn read_examples(path: impl AsRef<Path>) -> Result<Dataset> {
    let path = path.as_ref();
    read_examples_as(path, Format::from_path(path)?)
}

/// Reads a dataset in the given format, whatever its extension.
pub fn read_examples_as(path: impl AsRef<Path>, format: Format) -> Result<Dataset> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read dataset {}", path.display()))?;
    parse_examples(&bytes, format, path)
}

/// The sources of a dataset, for generation: as [`read_examples`], but a target may be missing (E2E lines
/// with no `||text`, JSONL lines with no "target"); such examples have an empty target.
pub fn read_sources(path: impl AsRef<Path>) -> Result<Dataset> {
    let path = path.as_ref();
    let format = Format::from_path(path)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read dataset {}", path.display()))?;
    parse_dataset(&bytes, format, path, true)
}

/// Parses the contents of a dataset file; `path` names it in origins and errors.
pub fn parse_examples(bytes: &[u8], format: Format, path: &Path) -> Result<Dataset> {
    parse_dataset(bytes, format, path, false)
}

fn parse_dataset(bytes: &[u8], format: Format, path: &Path, sources_only: bool) -> Result<Dataset> {
    let name = path.display().to_string();
    let (examples, bad_lines) = match (format, sources_only) {
        (Format::E2e, false) => parse_lines(bytes, &name, parse_e2e_line),
        (Format::E2e, true) => parse_lines(bytes, &name, parse_e2e_source),
        (Format::Jsonl, false) => parse_lines(bytes, &name, parse_jsonl_line),
        (Format::Jsonl, true) => parse_lines(bytes, &name, parse_jsonl_source),
        (Format::Dart, _) => parse_dart(bytes, &name)?,
    };
    if examples.is_empty() {
        let blank = bytes.iter().all(|b| b.is_ascii_whitespace());
        if bad_lines.is_empty() && (blank || format != Format::Dart) {
            bail!("dataset {name} has no examples: the file is empty or blank (expected {})", format.name());
        }
        if bad_lines.is_empty() {
            bail!("dataset {name} has no examples: its list of DART entries is empty");
        }
        bail!(
            "dataset {name} has no usable {} examples: all {} {} are bad:\n{}",
            format.name(),
            bad_lines.len(),
            format.bad_items(),
            quote_bad_lines(&bad_lines)
        );
    }
    Ok(Dataset { path: path.to_path_buf(), format, examples, bad_lines })
}

/// Splits a line-based file, skipping blank lines; `parse` turns one line into (source, target) or a reason.
fn parse_lines(
    bytes: &[u8],
    name: &str,
    parse: fn(&str) -> std::result::Result<Fields, String>,
) -> (Vec<Example>, Vec<BadLine>) {
    let mut examples = Vec::new();
    let mut bad = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let origin = format!("{name}:{}", i + 1);
        let Ok(line) = std::str::from_utf8(raw) else {
            bad.push(BadLine { origin, reason: "not valid UTF-8".into() });
            continue;
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = if i == 0 { line.trim_start_matches('\u{feff}') } else { line };
        if line.trim().is_empty() {
            continue;
        }
        match parse(line) {
            Ok((source, target, prefix)) => examples.push(Example { source, target, origin, prefix }),
            Err(reason) => bad.push(BadLine { origin, reason }),
        }
    }
    (examples, bad)
}

fn parse_e2e_line(line: &str) -> std::result::Result<Fields, String> {
    let parts: Vec<&str> = line.split("||").collect();
    let (source, target) = match parts[..] {
        [source, target] => (source.trim(), target.trim()),
        [_] => return Err("no `||` between the MR and the text (expected `MR||text`)".into()),
        _ => return Err(format!("{} `||` separators (expected one: `MR||text`)", parts.len() - 1)),
    };
    if source.is_empty() {
        return Err("empty MR before `||`".into());
    }
    if target.is_empty() {
        return Err("empty text after `||`".into());
    }
    Ok((source.to_string(), target.to_string(), None))
}

/// An E2E line for generation: the MR, with or without `||text`.
fn parse_e2e_source(line: &str) -> std::result::Result<Fields, String> {
    let parts: Vec<&str> = line.split("||").map(str::trim).collect();
    match parts[..] {
        [""] | ["", _] => Err("empty MR".into()),
        [source] | [source, _] => Ok((source.to_string(), parts.get(1).unwrap_or(&"").to_string(), None)),
        _ => parse_e2e_line(line),
    }
}

fn parse_jsonl_line(line: &str) -> std::result::Result<Fields, String> {
    parse_jsonl(line, true)
}

/// A JSONL line for generation: "source", with or without "target" and "prefix".
fn parse_jsonl_source(line: &str) -> std::result::Result<Fields, String> {
    parse_jsonl(line, false)
}

/// `for_training`: "target" is needed and "prefix" ignored (it chooses a prefix to generate with).
fn parse_jsonl(line: &str, for_training: bool) -> std::result::Result<Fields, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err("not a JSON object (expected {\"source\": ..., \"target\": ...})".into());
    };
    let field = |key: &str| -> std::result::Result<String, String> {
        match object.get(key) {
            None => Err(format!("no \"{key}\" field (expected {{\"source\": ..., \"target\": ...}})")),
            Some(Value::String(s)) if s.trim().is_empty() => Err(format!("empty \"{key}\"")),
            Some(Value::String(s)) => Ok(s.trim().to_string()),
            Some(other) => Err(format!("\"{key}\" is not a string: {}", json_kind(other))),
        }
    };
    let target = match object.get("target") {
        None | Some(Value::Null) if !for_training => String::new(),
        _ => field("target")?,
    };
    let prefix = if for_training {
        None
    } else {
        if let Some(k) = object.keys().find(|k| *k != "prefix" && k.eq_ignore_ascii_case("prefix")) {
            return Err(format!("\"{k}\": the prefix a source generates with is \"prefix\" (lower case)"));
        }
        match object.get("prefix") {
            None | Some(Value::Null) => None,
            Some(_) => Some(field("prefix")?),
        }
    };
    Ok((field("source")?, target, prefix))
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// One DART entry, fields kept raw so that problems are reported with their line.
#[derive(Deserialize)]
struct DartEntry<'a> {
    #[serde(default)]
    tripleset: Option<Value>,
    #[serde(borrow, default)]
    annotations: Option<Vec<&'a RawValue>>,
}

fn parse_dart(bytes: &[u8], name: &str) -> Result<(Vec<Example>, Vec<BadLine>)> {
    let text = std::str::from_utf8(bytes).map_err(|e| anyhow!("dataset {name} is not valid UTF-8: {e}"))?;
    let text = text.trim_start_matches('\u{feff}');
    if text.trim().is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let entries: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
        let webnlg = serde_json::from_str::<Value>(text).ok().is_some_and(|v| v.get("entries").is_some());
        if webnlg {
            anyhow!(
                "{name} looks like WebNLG json (an object with \"entries\"), which is not read here: \
                 convert it to JSONL ({{\"source\": ..., \"target\": ...}} per line)"
            )
        } else {
            anyhow!(
                "{name} is not DART json (a list of {{\"tripleset\": [[s, p, o], ...], \"annotations\": \
                 [{{\"text\": ...}}, ...]}} entries): {e}"
            )
        }
    })?;
    // Byte offsets of line starts, to turn the position of a raw value into a line number.
    let newlines: Vec<usize> = text.bytes().enumerate().filter(|&(_, b)| b == b'\n').map(|(i, _)| i).collect();
    let origin_of = |raw: &RawValue| {
        let offset = raw.get().as_ptr() as usize - text.as_ptr() as usize;
        format!("{name}:{}", newlines.partition_point(|&nl| nl < offset) + 1)
    };

    let mut examples = Vec::new();
    let mut bad = Vec::new();
    for (k, raw) in entries.iter().enumerate() {
        let origin = origin_of(raw);
        let entry: DartEntry = match serde_json::from_str(raw.get()) {
            Ok(entry) => entry,
            Err(e) => {
                let reason = format!("entry {k} is not {{\"tripleset\": [...], \"annotations\": [...]}}: {e}");
                bad.push(BadLine { origin, reason });
                continue;
            }
        };
        let source = match entry.tripleset.as_ref().map(linearize_triples) {
            Some(Ok(source)) => source,
            Some(Err(reason)) => {
                bad.push(BadLine { origin, reason: format!("entry {k}: {reason}") });
                continue;
            }
            None => {
                bad.push(BadLine { origin, reason: format!("entry {k} has no \"tripleset\"") });
                continue;
            }
        };
        let annotations = match entry.annotations {
            Some(a) if !a.is_empty() => a,
            _ => {
                bad.push(BadLine { origin, reason: format!("entry {k} has no \"annotations\"") });
                continue;
            }
        };
        for (j, raw) in annotations.into_iter().enumerate() {
            let origin = origin_of(raw);
            let text = serde_json::from_str::<Value>(raw.get()).ok();
            match text.as_ref().and_then(|a| a.get("text")) {
                Some(Value::String(t)) if !t.trim().is_empty() => examples.push(Example {
                    source: source.clone(),
                    target: t.trim().to_string(),
                    origin,
                    prefix: None,
                }),
                Some(Value::String(_)) => {
                    bad.push(BadLine { origin, reason: format!("entry {k}, annotation {j}: empty \"text\"") })
                }
                _ => bad.push(BadLine {
                    origin,
                    reason: format!("entry {k}, annotation {j}: no \"text\" string (expected {{\"text\": ...}})"),
                }),
            }
        }
    }
    Ok((examples, bad))
}

/// DART triples as the reference code linearizes them: `s : p : o` with `p` lower-cased, joined by `" | "`.
pub fn linearize_triples(tripleset: &Value) -> std::result::Result<String, String> {
    let Value::Array(triples) = tripleset else {
        return Err(format!("\"tripleset\" is {}, not a list of triples", json_kind(tripleset)));
    };
    if triples.is_empty() {
        return Err("empty \"tripleset\"".into());
    }
    let mut parts = Vec::with_capacity(triples.len());
    for (i, triple) in triples.iter().enumerate() {
        match triple.as_array().map(|t| t.as_slice()) {
            Some([Value::String(s), Value::String(p), Value::String(o)]) => {
                parts.push(format!("{s} : {} : {o}", p.to_lowercase()))
            }
            _ => return Err(format!("triple {i} is not [subject, predicate, object] strings: {triple}")),
        }
    }
    Ok(parts.join(" | "))
}

/// A distinct source (with the prefix it generates with) and all its targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceGroup {
    pub source: String,
    /// [`Example::prefix`].
    pub prefix: Option<String>,
    pub targets: Vec<String>,
    /// Where the source first appears (`file:line`).
    pub origin: String,
}

/// Distinct sources with all their targets, in the order sources first appear (E2E has several references
/// per MR; generation and scoring work per distinct source). A source named with two prefixes is two sources.
pub fn group_by_source(examples: &[Example]) -> Vec<SourceGroup> {
    let mut index: HashMap<(&str, Option<&str>), usize> = HashMap::new();
    let mut groups: Vec<SourceGroup> = Vec::new();
    for ex in examples {
        let i = *index.entry((ex.source.as_str(), ex.prefix.as_deref())).or_insert_with(|| {
            groups.push(SourceGroup {
                source: ex.source.clone(),
                prefix: ex.prefix.clone(),
                targets: Vec::new(),
                origin: ex.origin.clone(),
            });
            groups.len() - 1
        });
        groups[i].targets.push(ex.target.clone());
    }
    groups
}

/// One training row of fixed length T.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, right-padded with the pad (= EOS) id.
    pub input_ids: Vec<i64>,
    /// 1 on tokens, 0 on padding.
    pub attention_mask: Vec<i64>,
    /// Aligned with `input_ids`: the target ids and the final EOS, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i64>,
}

impl Encoded {
    /// The tokens the model reads for this row: its real input tokens and, for an encoder-decoder row
    /// (`seq2seq`), the target tokens its decoder reads as well (the input being the source alone).
    pub fn tokens_read(&self, seq2seq: bool) -> usize {
        let input = self.attention_mask.iter().filter(|&&m| m != 0).count();
        let target = if seq2seq { self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count() } else { 0 };
        input + target
    }

    /// Sets every label to [`IGNORE_INDEX`] (for batch rows that are repeats: `Batch::real` false).
    pub fn ignore_labels(&mut self) {
        self.labels.fill(IGNORE_INDEX);
    }

    /// Number of labels that count in the loss.
    pub fn n_labels(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// What to do with an example longer than T tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlong {
    /// Cut the end off; keep it only if at least one target label remains (else skip it).
    Truncate,
    /// Drop it.
    Skip,
}

/// What [`TableToText::encode_dataset`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodeReport {
    /// Rows produced (truncated ones included).
    pub kept: usize,
    /// Rows cut to T tokens.
    pub truncated: usize,
    /// Examples dropped for being too long.
    pub skipped: usize,
    /// Bad lines of the file (not encoded at all).
    pub bad_lines: usize,
    /// Longest example in tokens (before truncation): a T at least this long keeps everything whole. For
    /// sources and targets in separate sequences (BART), the longest source.
    pub longest: usize,
    /// The longest target, where targets have a sequence of their own (BART; 0 otherwise).
    pub longest_target: usize,
    /// Origins of the first few skipped examples.
    pub skipped_origins: Vec<String>,
}

impl EncodeReport {
    /// Counts one example's outcome (`Some((row, truncated))`, or `None` when skipped) and keeps its row.
    pub fn record(&mut self, outcome: Option<(Encoded, bool)>, origin: &str, rows: &mut Vec<Encoded>) {
        match outcome {
            Some((row, truncated)) => {
                rows.push(row);
                self.kept += 1;
                self.truncated += truncated as usize;
            }
            None => {
                self.skipped += 1;
                if self.skipped_origins.len() < QUOTED_BAD_LINES {
                    self.skipped_origins.push(origin.to_string());
                }
            }
        }
    }
}

impl fmt::Display for EncodeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} examples kept ({} truncated), {} skipped as too long, ",
            self.kept, self.truncated, self.skipped
        )?;
        if self.longest_target > 0 {
            write!(
                f,
                "{} bad lines; longest source {} tokens, longest target {}",
                self.bad_lines, self.longest, self.longest_target
            )
        } else {
            write!(f, "{} bad lines; longest {} tokens", self.bad_lines, self.longest)
        }
    }
}

/// How an example's source and target become token ids (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// The reference code's GPT-2 text, `' ' + source + ' ' + BOS` and `' ' + target + ' ' + EOS`.
    Gpt2,
    /// A model with its own special tokens: the source as the tokenizer encodes a text (with the BOS its
    /// post-processor adds), the model's EOS; the target, EOS.
    ModelTokens,
}

/// The table-to-text format: the prefix-tuning reference's for GPT-2, or its counterpart with a model's own
/// special tokens (see the module docs).
#[derive(Debug)]
pub struct TableToText<'t> {
    tok: &'t Tokenizer,
    layout: Layout,
    /// The token that ends the prompt: GPT-2's BOS (= EOS), the model's EOS otherwise.
    bos_id: u32,
    eos_id: u32,
}

impl<'t> TableToText<'t> {
    /// GPT-2's format: BOS = EOS = pad = `<|endoftext|>`. Errors if the tokenizer lacks it or does not treat
    /// it as a special token.
    pub fn new(tok: &'t Tokenizer) -> Result<Self> {
        let this = Self { tok, layout: Layout::Gpt2, bos_id: tok.bos_id()?, eos_id: tok.eos_id()? };
        let probe = tok.encode(&this.source_text("x"))?;
        ensure!(
            probe.last() == Some(&this.bos_id) && probe.iter().filter(|&&t| t == this.bos_id).count() == 1,
            "tokenizer {} does not encode `{GPT2_EOS}` as one token (got {probe:?} for {:?}): it must be an \
             added special token of the tokenizer.json",
            tok.origin().display(),
            this.source_text("x")
        );
        Ok(this)
    }

    /// The format for a model with its own special tokens, `eos` its end-of-text id (its `config.json`'s
    /// `eos_token_id`): prompt `tokenizer(source) + [eos]` (no second EOS when the tokenizer ends a text with it),
    /// target `tokenizer(target, no specials) + [eos]`.
    /// Errors if the tokenizer has no token `eos`.
    pub fn with_model_eos(tok: &'t Tokenizer, eos: u32) -> Result<Self> {
        ensure!(
            tok.id_token(eos).is_some(),
            "the model's end-of-text id {eos} (eos_token_id of its config.json) is not a token of {} (ids below {})",
            tok.origin().display(),
            tok.id_bound()
        );
        Ok(Self { tok, layout: Layout::ModelTokens, bos_id: eos, eos_id: eos })
    }

    pub fn tokenizer(&self) -> &'t Tokenizer {
        self.tok
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The padding id (= EOS).
    pub fn pad_id(&self) -> u32 {
        self.eos_id
    }

    /// GPT-2's `' ' + source + ' ' + BOS`: the unlabelled part, and the generation prompt.
    pub fn source_text(&self, source: &str) -> String {
        format!(" {source} {GPT2_EOS}")
    }

    /// GPT-2's `' ' + target + ' ' + EOS`: the labelled part.
    pub fn target_text(&self, target: &str) -> String {
        format!(" {target} {GPT2_EOS}")
    }

    /// How the format reads, for a line in the commands' output.
    pub fn describe(&self) -> String {
        let token = |id: u32| self.tok.id_token(id).unwrap_or_else(|| id.to_string());
        match self.layout {
            Layout::Gpt2 => format!("' ' + source + ' {0}' + ' ' + target + ' {0}' (GPT-2's)", token(self.eos_id)),
            Layout::ModelTokens => {
                let (lead, mut trail) = self.tok.text_specials().unwrap_or_default();
                if trail.last() != Some(&self.bos_id) {
                    trail.push(self.bos_id);
                }
                let words = |ids: &[u32]| ids.iter().map(|&t| token(t)).collect::<Vec<_>>().join(" ");
                let start = if lead.is_empty() { String::new() } else { words(&lead) + " " };
                format!("{start}source {} target {} (the model's own tokens)", words(&trail), token(self.eos_id))
            }
        }
    }

    /// The tokens the model sees before generating.
    pub fn encode_prompt(&self, source: &str) -> Result<Vec<u32>> {
        match self.layout {
            Layout::Gpt2 => self.tok.encode(&self.source_text(source)),
            Layout::ModelTokens => {
                let mut ids = self.tok.encode_as_text_start(source)?;
                // A tokenizer that ends a text with EOS itself (Llama's with add_eos_token) has closed it already.
                if ids.last() != Some(&self.bos_id) {
                    ids.push(self.bos_id);
                }
                Ok(ids)
            }
        }
    }

    /// How many tokens every prompt starts with whatever its source (the BOS a model's tokenizer puts first): a
    /// prompt cut to fit keeps them.
    pub fn prompt_head_len(&self) -> usize {
        match self.layout {
            Layout::Gpt2 => 0,
            Layout::ModelTokens => self.tok.text_specials().map_or(0, |(lead, _)| lead.len()),
        }
    }

    /// The labelled tokens: the target and the final EOS.
    fn encode_target(&self, target: &str) -> Result<Vec<u32>> {
        match self.layout {
            Layout::Gpt2 => self.tok.encode(&self.target_text(target)),
            Layout::ModelTokens => {
                let mut ids = self.tok.encode(target)?;
                ids.push(self.eos_id);
                Ok(ids)
            }
        }
    }

    /// (source part ids, target part ids), tokenized separately.
    pub fn encode_pair(&self, example: &Example) -> Result<(Vec<u32>, Vec<u32>)> {
        let source = self.encode_prompt(&example.source).with_context(|| format!("example {}", example.origin))?;
        let target = self.encode_target(&example.target).with_context(|| format!("example {}", example.origin))?;
        Ok((source, target))
    }

    /// One row of length `max_len`, or `None` if it is too long under `overlong` (the second value says
    /// whether it was truncated).
    pub fn encode_example(
        &self,
        example: &Example,
        max_len: usize,
        overlong: Overlong,
    ) -> Result<Option<(Encoded, bool)>> {
        let (source, target) = self.encode_pair(example)?;
        Ok(self.row(&source, &target, max_len, overlong))
    }

    fn row(&self, source: &[u32], target: &[u32], max_len: usize, overlong: Overlong) -> Option<(Encoded, bool)> {
        let len = source.len() + target.len();
        let truncated = len > max_len;
        if truncated && (overlong == Overlong::Skip || source.len() >= max_len) {
            return None;
        }
        let n_target = target.len().min(max_len - source.len());
        let pad = max_len - source.len() - n_target;
        let target = &target[..n_target];
        let ids = source.iter().chain(target).map(|&t| t as i64);
        let input_ids: Vec<i64> = ids.chain(std::iter::repeat_n(self.pad_id() as i64, pad)).collect();
        let mut attention_mask = vec![1i64; max_len - pad];
        attention_mask.resize(max_len, 0);
        let mut labels = vec![IGNORE_INDEX; source.len()];
        labels.extend(target.iter().map(|&t| t as i64));
        labels.resize(max_len, IGNORE_INDEX);
        Some((Encoded { input_ids, attention_mask, labels }, truncated))
    }

    /// Rows of length `max_len` for every example of `data` that fits (see [`Overlong`]).
    pub fn encode_dataset(
        &self,
        data: &Dataset,
        max_len: usize,
        overlong: Overlong,
    ) -> Result<(Vec<Encoded>, EncodeReport)> {
        let (rows, mut report) = self.encode_examples(&data.examples, max_len, overlong)?;
        report.bad_lines = data.bad_lines.len();
        Ok((rows, report))
    }

    /// Rows of length `max_len` for every example that fits. Errors if none does.
    pub fn encode_examples(
        &self,
        examples: &[Example],
        max_len: usize,
        overlong: Overlong,
    ) -> Result<(Vec<Encoded>, EncodeReport)> {
        ensure!(max_len >= 2, "sequence length {max_len} is too short (a row needs the source, BOS and a target)");
        let mut rows = Vec::with_capacity(examples.len());
        let mut report = EncodeReport::default();
        for example in examples {
            let (source, target) = self.encode_pair(example)?;
            report.longest = report.longest.max(source.len() + target.len());
            report.record(self.row(&source, &target, max_len, overlong), &example.origin, &mut rows);
        }
        if rows.is_empty() && !examples.is_empty() {
            bail!(
                "no example fits in {max_len} tokens (the longest has {}, the first skipped: {}): raise the \
                 sequence length{}",
                report.longest,
                report.skipped_origins.join(", "),
                if overlong == Overlong::Skip { " or truncate" } else { "" }
            );
        }
        Ok((rows, report))
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014; Vigna's constants): a tiny seeded generator whose outputs are the
/// same on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias (Lemire's multiply-and-reject).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "SplitMix64::below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// SplitMix64's output function (a bijective 64-bit mixer).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `0..n` in the order of epoch `epoch` under `seed` (Fisher–Yates with SplitMix64 seeded by both).
pub fn shuffled(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    // Each (seed, epoch) gets its own stream: mixing keeps nearby seeds and epochs unrelated.
    let mut rng = SplitMix64::new(mix64(seed ^ mix64(epoch ^ 0x5046_585F_4550_4F43)));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// One batch: example indices, and whether each row is a real visit (false: a repeat that fills the last
/// batch; its labels must be ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub rows: Vec<usize>,
    pub real: Vec<bool>,
}

/// The batches of one epoch: [`shuffled`] order cut into `batch`-sized batches; the last one, if partial, is
/// filled by wrapping around to the start of the epoch's order, those rows marked `real = false`. Every
/// example is a real row exactly once per epoch. No examples: no batches.
pub fn batches(n_examples: usize, batch: usize, seed: u64, epoch: u64) -> Vec<Batch> {
    assert!(batch > 0, "batch size must be positive");
    let order = shuffled(n_examples, seed, epoch);
    let n_batches = n_examples.div_ceil(batch);
    (0..n_batches)
        .map(|b| {
            let range = b * batch..(b + 1) * batch;
            Batch {
                rows: range.clone().map(|i| order[i % n_examples]).collect(),
                real: range.map(|i| i < n_examples).collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_read_count_the_decoder_s_target_of_an_encoder_decoder_row() {
        let ig = IGNORE_INDEX;
        // A decoder-only row reads source and target in its input; its labels mark the target only.
        let gpt =
            Encoded { input_ids: vec![5, 6, 7, 0], attention_mask: vec![1, 1, 1, 0], labels: vec![ig, ig, 7, ig] };
        assert_eq!(gpt.tokens_read(false), 3);
        // An encoder-decoder row's input is the source; its decoder reads the target (labels of their own length).
        let bart = Encoded { input_ids: vec![5, 6, 1], attention_mask: vec![1, 1, 0], labels: vec![8, 9, 2, ig, ig] };
        assert_eq!(bart.tokens_read(true), 5);
    }

    #[test]
    fn generation_reads_sources_with_or_without_targets() {
        let (ok, bad) = parse_lines(b"a : 1||text\nb : 2\nc : 3||\n||only text\nx||y||z\n", "f.txt", parse_e2e_source);
        let got: Vec<(&str, &str)> = ok.iter().map(|e| (e.source.as_str(), e.target.as_str())).collect();
        assert_eq!(got, [("a : 1", "text"), ("b : 2", ""), ("c : 3", "")]);
        assert_eq!(bad.iter().map(|b| b.origin.as_str()).collect::<Vec<_>>(), ["f.txt:4", "f.txt:5"]);
        let (ok, bad) = parse_lines(
            b"{\"source\": \"s\"}\n{\"source\": \"t\", \"target\": \"u\"}\n{\"target\": \"v\"}\n",
            "f.jsonl",
            parse_jsonl_source,
        );
        let got: Vec<(&str, &str)> = ok.iter().map(|e| (e.source.as_str(), e.target.as_str())).collect();
        assert_eq!(got, [("s", ""), ("t", "u")]);
        assert_eq!(bad.len(), 1);
        // Training still needs both.
        assert!(parse_e2e_line("b : 2").is_err() && parse_jsonl_line("{\"source\": \"s\"}").is_err());
    }

    #[test]
    fn a_missing_dataset_is_reported_as_missing_an_unknown_extension_as_such() {
        let e = Format::from_path(Path::new("/nonexistent/train")).unwrap_err().to_string();
        assert!(e.contains("no such file"), "{e}");
        let dir = std::env::temp_dir().join(format!("pfx-data-format-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let odd = dir.join("train.csv");
        std::fs::write(&odd, "a,b\n").unwrap();
        let e = Format::from_path(&odd).unwrap_err().to_string();
        assert!(e.contains("cannot tell the format") && e.contains(".jsonl"), "{e}");
        assert_eq!(Format::from_path(Path::new("/nonexistent/train.txt")).unwrap(), Format::E2e);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
