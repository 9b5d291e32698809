//! What the `pfxrun` subcommands do (the binary only parses arguments).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::backend::BackendKind;
use crate::bundle::Bundle;
use crate::data::{read_examples, Encoded, Overlong, TableToText};
use crate::generate::{GenConfig, Generator};
use crate::ort_backend::OrtOptions;
use crate::partial_output::PartialOutput;
use crate::search::{EarlyStopping, Sampling};
use crate::seq2seq::Seq2SeqGenerator;
use crate::seq2seq_data::SourceTarget;
use crate::tensor::HostTensor;
use crate::tokenize::Tokenizer;
use crate::train::{TrainConfig, Trainer};
use pfx_compiler::compile::bart::{read_bart_spec, BartSpec};

/// The engine a command runs on.
#[derive(Clone, Debug)]
pub struct Engine {
    pub backend: BackendKind,
    pub ort: OrtOptions,
}

/// Model types trained with GPT-2's tokens (`<|endoftext|>` among them): the table-to-text format is theirs.
const GPT2_TOKEN_MODELS: &[&str] = &["gpt2", "gpt_neo", "gptj", "phi", "codegen"];

/// A decoder bundle's `model_type` when it names a model not trained with GPT-2's tokens (Llama, OPT, ...).
fn other_token_model(bundle: &Bundle) -> Option<&str> {
    let m = &bundle.manifest;
    m.model_type.as_deref().filter(|t| m.family != "bart" && !GPT2_TOKEN_MODELS.contains(t))
}

/// Another tokenizer than the one a model's export came with is warned about: ids from another vocabulary train
/// and generate nonsense without an error.
fn warn_foreign_tokenizer(bundle: &Bundle, tok: &Tokenizer, explicit: bool) {
    let Some(t) = other_token_model(bundle) else { return };
    let own = bundle.dir.join("tokenizer.json");
    if explicit && own.exists() && std::fs::read(&own).ok() != std::fs::read(tok.origin()).ok() {
        eprintln!(
            "warning: {} was compiled from a `{t}` model and carries its export's tokenizer.json; --tokenizer {} is \
             another: ids from another vocabulary train and generate nonsense without an error",
            bundle.dir.display(),
            tok.origin().display()
        );
    }
}

/// The table-to-text format of a decoder bundle: GPT-2's for GPT-2's family (and bundles that do not say their
/// model), the model's own tokens otherwise (its end-of-text id recorded from its `config.json`). The format is
/// printed once, so that a user sees which tokens frame the examples.
fn text_format<'t>(bundle: &Bundle, tok: &'t Tokenizer) -> Result<TableToText<'t>> {
    let Some(t) = other_token_model(bundle) else { return TableToText::new(tok) };
    let Some(eos) = bundle.manifest.eos_token_id else {
        bail!(
            "{} was compiled from a `{t}` model whose end-of-text token pfxc did not find (no eos_token_id in the \
             config.json or generation_config.json beside the export): pfxrun's train, eval and generate frame \
             examples with it. Put the model's config.json beside the export and compile again, or run its graphs \
             on token ids with `pfxrun run`",
            bundle.dir.display()
        );
    };
    let fmt = TableToText::with_model_eos(tok, eos).with_context(|| format!("{} (`{t}`)", bundle.dir.display()))?;
    // Once per run (train formats its training and dev files).
    static TOLD: std::sync::Once = std::sync::Once::new();
    TOLD.call_once(|| eprintln!("examples as {}", fmt.describe()));
    Ok(fmt)
}

/// The tokenizer: `--tokenizer`, else the bundle's `tokenizer.json`.
pub fn tokenizer_for(bundle: &Bundle, explicit: Option<&Path>) -> Result<Tokenizer> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let p = bundle.dir.join("tokenizer.json");
            if !p.exists() {
                bail!(
                    "the bundle {} has no tokenizer.json (pfxc compile copies the one next to the model); pass \
                     --tokenizer FILE",
                    bundle.dir.display()
                );
            }
            p
        }
    };
    let tok = Tokenizer::from_file(&path)?;
    // Ids past the model's embedding would index outside it (tract stops with a panic there).
    let model = bundle.manifest.vocab;
    if model > 0 && tok.id_bound() > model {
        bail!(
            "the tokenizer {} has token ids up to {}, but the model of {} has {model} tokens: it is not this \
             model's tokenizer; pass the model's tokenizer.json with --tokenizer",
            path.display(),
            tok.id_bound() - 1,
            bundle.dir.display()
        );
    }
    warn_foreign_tokenizer(bundle, &tok, explicit.is_some());
    Ok(tok)
}

/// The prefix to use: `--prefix FILE`, else the bundle's initial one (none for baked bundles).
pub fn prefix_for(bundle: &Bundle, explicit: Option<&Path>) -> Result<BTreeMap<String, HostTensor>> {
    if bundle.manifest.baked {
        if explicit.is_some() {
            bail!("{} is baked: its prefix is inside the graphs, --prefix does not apply", bundle.dir.display());
        }
        return Ok(BTreeMap::new());
    }
    match explicit {
        Some(p) => bundle.read_prefix(p),
        None => bundle.init_prefix(),
    }
}

/// A bundle's BART section, if it is a BART bundle.
fn bart_spec(bundle: &Bundle) -> Result<Option<BartSpec>> {
    if bundle.manifest.family != "bart" {
        return Ok(None);
    }
    read_bart_spec(&bundle.dir)?.map(Some).with_context(|| {
        format!("{} says family bart but has no \"bart\" section in manifest.json", bundle.dir.display())
    })
}

/// An encoder-decoder bundle's source/target format. Its end token is the tokenizer's `</s>`: when the model's
/// generation config lists other end ids, the tokenizer is likely not the model's, which is said (once per run).
fn seq2seq_format<'t>(bundle: &Bundle, b: &BartSpec, tok: &'t Tokenizer) -> Result<SourceTarget<'t>> {
    let fmt = SourceTarget::new(tok, b.pad_token_id, bundle.manifest.model_type.as_deref(), b.languages.as_ref())?;
    let ids = &bundle.manifest.eos_token_ids;
    if !ids.is_empty() && !ids.iter().any(|&e| e as i64 == fmt.eos_id()) {
        static TOLD: std::sync::Once = std::sync::Once::new();
        TOLD.call_once(|| {
            eprintln!(
                "warning: {}'s `</s>` is id {}, but the model's end-of-sequence ids are {ids:?} (its \
                 generation_config.json or config.json): texts end with {} here; is this the model's tokenizer?",
                tok.origin().display(),
                fmt.eos_id(),
                fmt.eos_id()
            )
        });
    }
    Ok(fmt)
}

/// Rows of a data file in the bundle's format: GPT-2's table-to-text rows of T tokens, or BART's source [S] /
/// labels [T] rows.
fn encode_file(bundle: &Bundle, tok: &Tokenizer, path: &Path, overlong: Overlong, what: &str) -> Result<Vec<Encoded>> {
    let data = read_examples(path)?;
    if let Some(w) = data.bad_lines_summary() {
        eprintln!("warning: {w}");
    }
    let (rows, report) = match bart_spec(bundle)? {
        Some(b) => seq2seq_format(bundle, &b, tok)?.encode_dataset(&data, b.src_len, b.tgt_len, overlong)?,
        None => text_format(bundle, tok)?.encode_dataset(&data, bundle.manifest.seq_len, overlong)?,
    };
    eprintln!("{what} {}: {report}", path.display());
    Ok(rows)
}

pub struct TrainArgs {
    pub bundle: PathBuf,
    pub train: PathBuf,
    pub dev: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub prefix: Option<PathBuf>,
    pub overlong: Overlong,
    pub cfg: TrainConfig,
    pub resume: bool,
}

/// A run stopped by Ctrl-C or SIGTERM after saving: `pfxrun` exits 130, as shells report an interrupted command.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped by a signal")
    }
}

impl std::error::Error for Interrupted {}

pub fn train(args: TrainArgs, engine: &Engine) -> Result<()> {
    // The folder is made early, to be locked: a run refused before writing anything leaves none behind.
    let out = args.cfg.out_dir.clone();
    if out.is_file() {
        bail!("--output {} is a file, not a folder", out.display());
    }
    // The missing folders above it (`-o a/b/c` with no `a`), deepest first: a refused run removes them too.
    let missing_parents: Vec<PathBuf> = out
        .ancestors()
        .skip(1)
        .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
        // `x/y/..` names `x`, which comes later in the list (and cannot be removed by that name).
        .filter(|p| p.file_name().is_some())
        .map(Path::to_path_buf)
        .collect();
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // Made by this process (not merely missing when looked at: a run started at the same moment may make it).
    let made = match std::fs::create_dir(&out) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", out.display())),
    };
    let result = train_into_locked_folder(args, engine);
    if made && result.is_err() {
        // remove_dir removes only empty folders: anything written, here or by another run, stays. No stop at the
        // first failure: `c/d/../d` and `c/d` name one folder, whose second removal fails before `c`.
        for dir in std::iter::once(&out).chain(&missing_parents) {
            let _ = std::fs::remove_dir(dir);
        }
    }
    result
}

fn train_into_locked_folder(args: TrainArgs, engine: &Engine) -> Result<()> {
    let bundle = Bundle::open(&args.bundle)?;
    bundle.refuse_baked()?;
    // The output folder first: before a long tokenization, and so that no earlier run is overwritten.
    let out = &args.cfg.out_dir;
    let _lock = crate::run_lock::lock_folder(out, &format!("--output {}", out.display()))?;
    if !args.resume {
        if out.join("checkpoint.safetensors").exists() {
            bail!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another --output",
                out.display()
            );
        }
        let earlier = ["prefix.safetensors", "metrics.jsonl", crate::train::BEST_PREFIX];
        if let Some(f) = earlier.iter().map(|f| out.join(f)).find(|p| p.exists()) {
            bail!(
                "{} already holds {} of an earlier run: choose another --output, or delete it",
                out.display(),
                f.file_name().unwrap_or_default().to_string_lossy()
            );
        }
    }
    let tok = tokenizer_for(&bundle, args.tokenizer.as_deref())?;
    let rows = encode_file(&bundle, &tok, &args.train, args.overlong, "train")?;
    let dev = match &args.dev {
        Some(p) => Some(encode_file(&bundle, &tok, p, args.overlong, "dev")?),
        None => None,
    };
    let prefix = prefix_for(&bundle, args.prefix.as_deref())?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // Ctrl-C (and SIGTERM) finishes the current step, saves a checkpoint and exits.
    let _ = ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
    let mut trainer = Trainer::new(bundle, engine.backend, &engine.ort, prefix, dev.is_some(), stop.clone())?;
    if args.resume {
        trainer.resume(&args.cfg.out_dir)?;
        eprintln!(
            "resuming at step {} (epoch {}, batch {})",
            trainer.pos.step,
            trainer.pos.epoch + 1,
            trainer.pos.batch_in_epoch
        );
    }
    let losses = trainer.train(&args.cfg, &rows, dev.as_deref())?;
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        // Not a finished run: a script must not go on as if it were.
        return Err(anyhow::Error::new(Interrupted)
            .context(format!("interrupted after step {}; continue with --resume", trainer.pos.step)));
    }
    if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
        eprintln!(
            "trained {} step{}: loss {first:.4} -> {last:.4}; prefix in {}",
            losses.len(),
            if losses.len() == 1 { "" } else { "s" },
            args.cfg.out_dir.join("prefix.safetensors").display()
        );
    }
    if let Some((loss, epoch)) = trainer.pos.best_dev {
        eprintln!(
            "lowest dev loss {loss:.4}, after epoch {epoch}: that prefix is in {}",
            args.cfg.out_dir.join(crate::train::BEST_PREFIX).display()
        );
    }
    Ok(())
}

/// Mean loss of a dataset under a prefix.
pub fn eval(
    bundle: &Path,
    data: &Path,
    tokenizer: Option<&Path>,
    prefix: Option<&Path>,
    engine: &Engine,
) -> Result<f64> {
    let b = Bundle::open(bundle)?;
    b.refuse_baked()?;
    let tok = tokenizer_for(&b, tokenizer)?;
    let rows = encode_file(&b, &tok, data, Overlong::Truncate, "eval")?;
    let prefix = prefix_for(&b, prefix)?;
    let mut graph = b.open_graph("eval_step", engine.backend, &engine.ort)?;
    // The loss is the graph's: with the label smoothing it was compiled with, which plain cross-entropy is not.
    if let Some(eps) = bart_spec(&b)?.map(|s| s.label_smoothing).filter(|&e| e > 0.0) {
        eprintln!("note: the loss is label-smoothed (ε = {eps}, as the bundle was compiled), not plain cross-entropy");
    }
    crate::train::mean_loss(&b, graph.as_mut(), &prefix, &rows)?.context("no labels to evaluate")
}

pub struct GenerateArgs {
    pub bundle: PathBuf,
    pub prefix: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    /// Sources: one `--input`, or a file (E2E / JSONL / DART: its distinct sources; other files: one per line).
    pub input: Option<String>,
    pub inputs: Option<PathBuf>,
    pub cfg: GenConfig,
    /// Force the first/last tokens the model's generation config forces (`forced_bos_token_id`,
    /// `forced_eos_token_id`), as Hugging Face's `generate` does.
    pub forced_tokens: bool,
    /// Written as batches finish, through `OUTPUT.partial` (`crate::partial_output`).
    pub output: Option<PathBuf>,
    /// Continue the `OUTPUT.partial` an interrupted run left.
    pub resume: bool,
    /// Write the references of each distinct source (blank-line separated groups), for `pfxrun score`.
    pub refs_out: Option<PathBuf>,
}

/// `pfxrun generate`'s search flags, each `None` unless given.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SearchFlags {
    /// Stop after this many new tokens (at most the bundle's `pfxc compile --max-new`). Default: the
    /// generation config's `max_new_tokens`, else its `max_length` (which counts a decoder's prompt, and an
    /// encoder-decoder's start token), else the bundle's.
    #[arg(long)]
    pub max_new: Option<usize>,
    /// Beam width (1: greedy). Default: the model's generation config's `num_beams` (as HF's `generate`), else 1.
    #[arg(long)]
    pub beams: Option<usize>,
    /// Beam search's length penalty (HF's: scores divided by length^penalty). Default: the generation
    /// config's, else 1.
    #[arg(long, allow_negative_numbers = true)]
    pub length_penalty: Option<f32>,
    /// No n-gram of this size twice in an output (HF's `no_repeat_ngram_size`; 0: off). Default: the
    /// generation config's, else 0.
    #[arg(long)]
    pub no_repeat_ngram: Option<usize>,
    /// When beam search stops a source (HF's `early_stopping`): `true` once it has as many finished
    /// hypotheses as beams; `false` also once its best live beam cannot beat them at the current length;
    /// `never` as false, judged at the length limit when the length penalty is positive. Default: the
    /// generation config's, else false.
    #[arg(long)]
    pub early_stopping: Option<EarlyStopping>,
    /// No end of sequence before this many new tokens. Default: the generation config's `min_new_tokens`, else
    /// its `min_length` (which counts a decoder's prompt, and an encoder-decoder's start token), else 0.
    #[arg(long)]
    pub min_new: Option<usize>,
    /// The output repeats no n-gram of this size of the source, or of a decoder's prompt (HF's
    /// `encoder_no_repeat_ngram_size`, BlenderBot's default 3; 0: off). Default: the generation config's.
    #[arg(long)]
    pub encoder_no_repeat_ngram: Option<usize>,
    /// Make tokens already in the output (and a decoder's prompt) less likely: negative scores are multiplied
    /// by it, positive ones divided (HF's `repetition_penalty`; 1: off). Default: the generation config's, else 1.
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// The same for the tokens of the source (a decoder's prompt), inverted: above 1 favours them (HF's
    /// `encoder_repetition_penalty`). Default: the generation config's, else 1.
    #[arg(long)]
    pub encoder_repetition_penalty: Option<f64>,
    /// Draw each token from the model's distribution instead of taking the best (HF's `do_sample`; with
    /// --beams, beam sampling). Default: on when a sampling flag below is given, else the generation config's.
    #[arg(long)]
    pub sample: Option<bool>,
    /// Sampling: divide the scores by this. Default: the generation config's, else 1.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Sampling: only the k best tokens (0: all). Default: the generation config's, else 50 (HF's).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sampling: only the most probable tokens whose probabilities add up to p. Default: the config's, else 1.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Sampling: only tokens at least this fraction as probable as the best one. Default: the config's, else off.
    #[arg(long)]
    pub min_p: Option<f64>,
    /// Sampling: typical sampling's probability mass. Default: the generation config's, else 1 (off).
    #[arg(long)]
    pub typical_p: Option<f64>,
    /// Sampling: only tokens at least this probable (HF's `epsilon_cutoff`). Default: the config's, else off.
    #[arg(long)]
    pub epsilon_cutoff: Option<f64>,
    /// Sampling: eta sampling's floor min(eta, √eta · e^-entropy) (HF's `eta_cutoff`). Default: the config's,
    /// else off.
    #[arg(long)]
    pub eta_cutoff: Option<f64>,
    /// Sampling: top-H, of the 100 best tokens the most probable ones whose entropy terms add up to at most this
    /// fraction of their entropy (HF's `top_h`). Default: the config's, else off.
    #[arg(long)]
    pub top_h: Option<f64>,
    /// Sampling: the seed (each input draws from its own stream of it, whatever its batch); it does not turn
    /// sampling on. Default: a new one, printed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// End a generation when this text appears in it (prompt included) ending inside its last token, which is kept
    /// (repeatable; HF's `stop_strings`). Default: the generation config's.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Outputs per input (HF's `num_return_sequences`), consecutive lines of --output: beam search's best N
    /// (N at most --beams), or N samples. Default: the generation config's, else 1.
    #[arg(long)]
    pub num_return: Option<usize>,
}

impl SearchFlags {
    /// The flags given that shape sampling's distribution (each turns sampling on unless `--sample false`; a seed
    /// alone does not change the search, as in HF).
    fn sampling_flags(&self) -> Vec<&'static str> {
        let given = [
            ("--temperature", self.temperature.is_some()),
            ("--top-k", self.top_k.is_some()),
            ("--top-p", self.top_p.is_some()),
            ("--min-p", self.min_p.is_some()),
            ("--typical-p", self.typical_p.is_some()),
            ("--epsilon-cutoff", self.epsilon_cutoff.is_some()),
            ("--eta-cutoff", self.eta_cutoff.is_some()),
            ("--top-h", self.top_h.is_some()),
        ];
        given.into_iter().filter(|g| g.1).map(|g| g.0).collect()
    }

    /// Refuses values generate refuses.
    fn check(&self) -> Result<()> {
        let positive = |name: &str, v: Option<f64>| match v {
            Some(x) if !(x > 0.0 && x.is_finite()) => bail!("{name} must be a number above 0 (got {x})"),
            _ => Ok(()),
        };
        if let Some(p) = self.length_penalty.filter(|p| !p.is_finite()) {
            bail!("--length-penalty must be a finite number (got {p})");
        }
        positive("--repetition-penalty", self.repetition_penalty)?;
        positive("--encoder-repetition-penalty", self.encoder_repetition_penalty)?;
        positive("--temperature", self.temperature)?;
        let fractions = [
            ("--top-p", self.top_p, false),
            ("--min-p", self.min_p, false),
            ("--typical-p", self.typical_p, true),
            ("--epsilon-cutoff", self.epsilon_cutoff, false),
            ("--eta-cutoff", self.eta_cutoff, false),
            ("--top-h", self.top_h, true),
        ];
        for (name, v, low_open) in fractions {
            if let Some(x) = v.filter(|&x| !(x <= 1.0 && (x > 0.0 || (!low_open && x == 0.0)))) {
                let range = if low_open { "above 0, at most 1" } else { "from 0 to 1" };
                bail!("{name} must be a number {range} (got {x})");
            }
        }
        if self.sample == Some(false) {
            if let Some(f) = self.sampling_flags().first() {
                bail!("{f} shapes sampling, which --sample false turns off");
            }
        }
        Ok(())
    }
}

/// Sets `cfg`'s search settings as Hugging Face's `generate` would pick them: a flag given, else the model's
/// generation config (recorded by `pfxc compile`), else HF's default (greedy, no penalty, no bans; when sampling:
/// top-k 50). `--max-new` defaults to the generation config's limit, at most the bundle's. Returns notes to print:
/// what came from the generation config, what it sets that pfx's search does not do, the seed of a sampling run.
pub fn apply_search_settings(
    cfg: &mut GenConfig,
    flags: &SearchFlags,
    m: &pfx_compiler::compile::Manifest,
) -> Result<Vec<String>> {
    flags.check()?;
    // A bundle from an older pfxc recorded as unapplied some settings pfx now applies.
    let gs = &m.generation_settings.recovered();
    // Both families record their generation shapes here.
    let (rows, bundle_max) = m.generation.as_ref().map_or((1, 1), |g| (g.rows, g.max_new));
    let seq2seq = m.family == "bart";
    let mut from_config = Vec::new();
    let mut notes = Vec::new();
    // The length limit: max_new_tokens, else max_length, at most what the graphs were compiled for. An
    // encoder-decoder's max_length counts the start token; a decoder's counts the prompt, so each prompt gets its
    // own number of new tokens (`GenConfig::max_length`).
    if let (Some(n), Some(m), None) = (gs.max_new_tokens, gs.max_length, flags.max_new) {
        notes.push(format!("the model's generation config sets max_new_tokens {n}, which replaces its max_length {m}"));
    }
    let configured_max = match (gs.max_new_tokens, gs.max_length) {
        (Some(n), _) => Some(n),
        // As HF's generate, which refuses a start token as long as max_length.
        (None, Some(n)) if seq2seq && n <= 1 && flags.max_new.is_none() => bail!(
            "the model's generation config sets max_length {n}, which counts the decoder's start token: nothing is \
             left to generate; pass --max-new N (new tokens, which replaces max_length)"
        ),
        (None, Some(n)) if seq2seq => Some(n.saturating_sub(1).max(1)),
        (None, Some(n)) => {
            if flags.max_new.is_none() {
                from_config.push(format!("at most {n} tokens with the prompt (max_length)"));
                cfg.max_length = Some(n);
            }
            None
        }
        (None, None) => None,
    };
    cfg.max_new = match (flags.max_new, configured_max) {
        (Some(n), _) => n,
        (None, Some(n)) if n > bundle_max => {
            notes.push(format!(
                "the model's generation config allows {n} new tokens, but the bundle generates at most {bundle_max} \
                 (pfxc compile --max-new): {bundle_max}"
            ));
            bundle_max
        }
        (None, Some(n)) => {
            from_config.push(format!("at most {n} new token{}", if n == 1 { "" } else { "s" }));
            n
        }
        (None, None) => bundle_max,
    };
    // Sampling: --sample, else a sampling flag, else the config's do_sample.
    let sampling_flags = flags.sampling_flags();
    let sample = match (flags.sample, gs.do_sample) {
        (Some(s), _) => s,
        (None, Some(true)) => {
            from_config.push("sampling".into());
            true
        }
        (None, _) => !sampling_flags.is_empty(),
    };
    // Sampling with beams is HF's beam sampling, whichever of the two the config sets.
    cfg.beams = match (flags.beams, gs.num_beams) {
        (Some(b), _) => b,
        (None, Some(b)) if b > rows => {
            notes.push(format!(
                "the model's generation config asks for {b} beams, but the bundle decodes {rows} rows \
                 (pfxc compile --gen-rows): {rows} beams"
            ));
            rows
        }
        (None, Some(b)) => {
            if b > 1 {
                from_config.push(format!("{b} beams"));
            }
            b.max(1)
        }
        (None, None) => 1,
    };
    let beam = cfg.beams > 1;
    if sample && beam && flags.beams.is_none() {
        notes.push(format!(
            "sampling with the generation config's {} beams: beam sampling (--beams 1 samples one token at a time)",
            cfg.beams
        ));
    }
    // Length penalty and early stopping act in beam search only: said only there.
    cfg.length_penalty = flags.length_penalty.unwrap_or_else(|| {
        gs.length_penalty.filter(|_| beam).inspect(|p| from_config.push(format!("length penalty {p}"))).unwrap_or(1.0)
    });
    cfg.no_repeat_ngram = flags.no_repeat_ngram.unwrap_or_else(|| {
        gs.no_repeat_ngram_size
            .filter(|&n| n > 0)
            .inspect(|n| from_config.push(format!("no repeated {n}-grams")))
            .unwrap_or(0)
    });
    cfg.early_stopping = flags.early_stopping.unwrap_or_else(|| {
        gs.early_stopping
            .filter(|&e| e != EarlyStopping::Heuristic && beam)
            .inspect(|e| {
                from_config
                    .push(if *e == EarlyStopping::Never { "early stopping \"never\"" } else { "early stopping" }.into())
            })
            .unwrap_or_default()
    });
    // HF's encoder_input_ids: an encoder-decoder's source, a decoder's prompt.
    let source = if seq2seq { "the source" } else { "the prompt" };
    cfg.encoder_no_repeat_ngram = flags.encoder_no_repeat_ngram.unwrap_or_else(|| {
        gs.encoder_no_repeat_ngram_size
            .filter(|&n| n > 0)
            .inspect(|n| from_config.push(format!("no repeated {n}-grams of {source}")))
            .unwrap_or(0)
    });
    cfg.repetition_penalty = flags.repetition_penalty.unwrap_or_else(|| {
        gs.repetition_penalty
            .filter(|&p| p != 1.0)
            .inspect(|p| from_config.push(format!("repetition penalty {p}")))
            .unwrap_or(1.0)
    });
    cfg.encoder_repetition_penalty = flags.encoder_repetition_penalty.unwrap_or_else(|| {
        gs.encoder_repetition_penalty
            .filter(|&p| p != 1.0)
            .inspect(|p| from_config.push(format!("encoder repetition penalty {p} ({source}'s tokens)")))
            .unwrap_or(1.0)
    });
    // A min_new_tokens (even 0) replaces min_length, as in HF. HF's min_length counts an encoder-decoder's start
    // token, and a decoder's prompt (`GenConfig::min_length`).
    if let (Some(n), Some(m), None) = (gs.min_new_tokens, gs.min_length, flags.min_new) {
        notes.push(format!("the model's generation config sets min_new_tokens {n}, which replaces its min_length {m}"));
    }
    if let (Some(min), Some(max), None, None, None) =
        (gs.min_length, gs.max_length, gs.min_new_tokens, gs.max_new_tokens, flags.max_new.or(flags.min_new))
    {
        if min > max {
            notes.push(format!(
                "the model's generation config sets min_length {min} above its max_length {max}: generation stops at \
                 max_length"
            ));
        }
    }
    let configured = match (gs.min_new_tokens, gs.min_length) {
        (Some(n), _) => n,
        (None, Some(n)) if seq2seq => n.saturating_sub(1),
        (None, Some(n)) if n > 0 && flags.min_new.is_none() => {
            from_config.push(format!("at least {n} tokens with the prompt (min_length)"));
            cfg.min_length = Some(n);
            0
        }
        _ => 0,
    };
    cfg.min_new = flags.min_new.unwrap_or_else(|| {
        if configured > 0 {
            from_config.push(format!("at least {configured} new tokens"));
        }
        configured
    });
    // Bans and biases of token ids: from the generation config only (ids are the config's business).
    let to_i64 = |v: &[u32]| v.iter().map(|&t| t as i64).collect::<Vec<i64>>();
    cfg.suppress = to_i64(&gs.suppress_tokens);
    cfg.begin_suppress = to_i64(&gs.begin_suppress_tokens);
    cfg.bad_words = gs.bad_words_ids.iter().map(|w| to_i64(w)).collect();
    cfg.sequence_bias = gs.sequence_bias.iter().map(|(w, b)| (to_i64(w), *b)).collect();
    let counted = [
        (gs.suppress_tokens.len(), "suppress_tokens"),
        (gs.begin_suppress_tokens.len(), "begin_suppress_tokens"),
        (gs.bad_words_ids.len(), "bad_words_ids"),
        (gs.sequence_bias.len(), "sequence_bias"),
    ];
    for (n, key) in counted.into_iter().filter(|c| c.0 > 0) {
        from_config.push(format!("{key} ({n})"));
    }
    cfg.stop_strings = if flags.stop.is_empty() {
        if !gs.stop_strings.is_empty() {
            from_config.push(format!("stop strings {:?}", gs.stop_strings));
        }
        gs.stop_strings.clone()
    } else {
        flags.stop.clone()
    };
    if let Some(t) = cfg.stop_strings.iter().find(|t| t.is_empty()) {
        bail!("--stop {t:?}: a stop string cannot be empty");
    }
    // The end-of-sequence length decay and the score clean-ups: from the generation config only.
    cfg.length_decay = gs.exponential_decay_length_penalty;
    if let Some((start, factor)) = cfg.length_decay {
        from_config.push(format!("end-of-sequence length decay after {start} new tokens (factor {factor})"));
    }
    cfg.renormalize = gs.renormalize_logits == Some(true);
    cfg.remove_invalid = gs.remove_invalid_values == Some(true);
    for (on, what) in
        [(cfg.renormalize, "renormalized scores (beam search)"), (cfg.remove_invalid, "non-finite scores made finite")]
    {
        if on {
            from_config.push(what.into());
        }
    }
    cfg.num_return = flags.num_return.unwrap_or_else(|| {
        gs.num_return_sequences
            .filter(|&n| n > 1)
            .inspect(|n| from_config.push(format!("{n} outputs per input")))
            .unwrap_or(1)
    });
    cfg.sampling = if sample {
        // HF's defaults for what neither says: temperature 1, top-k 50, top-p 1, no min-p, typical-p 1.
        let mut pick = |flag: Option<f64>, config: Option<f64>, neutral: f64, name: &str| match (flag, config) {
            (Some(x), _) => Some(x),
            (None, Some(x)) => {
                if x != neutral {
                    from_config.push(format!("{name} {x}"));
                }
                Some(x)
            }
            (None, None) => None,
        };
        let temperature = pick(flags.temperature, gs.temperature, 1.0, "temperature").unwrap_or(1.0);
        let top_p = pick(flags.top_p, gs.top_p, 1.0, "top-p").unwrap_or(1.0);
        let min_p = pick(flags.min_p, gs.min_p, -1.0, "min-p");
        let typical_p = pick(flags.typical_p, gs.typical_p, 1.0, "typical-p").unwrap_or(1.0);
        // HF applies the cutoffs strictly between 0 and 1 only.
        let cutoff = |x: Option<f64>| x.filter(|&e| e > 0.0 && e < 1.0).unwrap_or(0.0) as f32;
        let epsilon = cutoff(pick(flags.epsilon_cutoff, gs.epsilon_cutoff, 0.0, "epsilon cutoff"));
        let eta = cutoff(pick(flags.eta_cutoff, gs.eta_cutoff, 0.0, "eta cutoff"));
        let top_h = pick(flags.top_h, gs.top_h, -1.0, "top-h").map(|h| h as f32);
        let top_k = flags.top_k.unwrap_or_else(|| {
            gs.top_k.filter(|&k| k != 50).inspect(|k| from_config.push(format!("top-k {k}"))).unwrap_or(50)
        });
        if temperature <= 0.0 {
            bail!(
                "the model's generation config sets temperature {temperature}, which sampling cannot use: give \
                 --temperature (above 0), or --sample false"
            );
        }
        Some(Sampling {
            temperature: temperature as f32,
            top_h,
            top_k,
            top_p: top_p as f32,
            min_p: min_p.map(|p| p as f32),
            typical_p: typical_p as f32,
            epsilon,
            eta,
            seed: flags.seed.unwrap_or_else(fresh_seed),
        })
    } else {
        None
    };
    if !from_config.is_empty() {
        notes.push(format!("from the model's generation config (flags change them): {}", from_config.join(", ")));
    }
    if cfg.sampling.is_none() && flags.seed.is_some() {
        notes.push("--seed has no effect: this run does not sample (--sample true, or a sampling flag, does)".into());
    }
    if !gs.unapplied.is_empty() {
        notes.push(format!(
            "the model's generation config also sets {}, which pfxrun generate does not do",
            gs.unapplied.join(", ")
        ));
    }
    Ok(notes)
}

/// A seed for a run not given one: the clock's nanoseconds and the process id.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    // Small enough to type back.
    (nanos ^ (std::process::id() as u64).rotate_left(32)) % 1_000_000_000
}

/// What `pfxrun generate` reads from an inputs file.
pub struct Sources {
    /// Distinct sources (a source named with two prefixes is two).
    pub texts: Vec<String>,
    /// Each one's references (none where the file has none).
    pub refs: Vec<Vec<String>>,
    /// Each one's own prefix file (a JSONL line's "prefix", relative to the file's folder), else the run's.
    pub prefixes: Vec<Option<NamedPrefix>>,
}

/// A prefix file an input names, and where (`file:line` of the first line naming it with that source).
#[derive(Clone, Debug)]
pub struct NamedPrefix {
    pub path: PathBuf,
    pub origin: String,
}

/// Distinct sources, their references and prefixes from a file.
pub fn sources_of(path: &Path) -> Result<Sources> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if matches!(ext, "txt" | "e2e" | "jsonl" | "json") {
        let data = crate::data::read_sources(path)?;
        if let Some(w) = data.bad_lines_summary() {
            eprintln!("warning: {w}");
        }
        let groups = data.group_by_source();
        let folder = path.parent().unwrap_or(Path::new(""));
        Ok(Sources {
            refs: groups.iter().map(|g| g.targets.iter().filter(|t| !t.is_empty()).cloned().collect()).collect(),
            prefixes: groups
                .iter()
                .map(|g| g.prefix.as_ref().map(|p| NamedPrefix { path: folder.join(p), origin: g.origin.clone() }))
                .collect(),
            texts: groups.into_iter().map(|g| g.source).collect(),
        })
    } else {
        let text = crate::data::read_text(path, "sources file")?;
        let blank: Vec<usize> =
            text.lines().enumerate().filter(|(_, l)| l.trim().is_empty()).map(|(i, _)| i + 1).collect();
        if !blank.is_empty() {
            eprintln!(
                "warning: {} has {} blank line(s) (line {}), skipped: output line N is the N-th non-blank source",
                path.display(),
                blank.len(),
                first_few(&blank)
            );
        }
        let srcs: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(String::from).collect();
        let n = srcs.len();
        Ok(Sources { texts: srcs, refs: vec![Vec::new(); n], prefixes: vec![None; n] })
    }
}

/// What a generation run makes, for `--resume` to tell its own partial output from another run's: the sources,
/// the search settings, the bundle (its manifest and a sample of its weights) and the prefix and tokenizer files,
/// by their contents (a file moved or touched is the same; one replaced by another of the same size is not).
/// Fingerprints stable across builds: a run killed by one pfxrun is resumed by the next.
fn work_key(
    args: &GenerateArgs,
    bundle: &Bundle,
    sources: &[String],
    cfg: &GenConfig,
    own: &InputPrefixes,
) -> Result<String> {
    use crate::fingerprint::{file_contents, file_sample, Fnv};
    let files = |paths: &mut dyn Iterator<Item = &Path>| -> Result<String> {
        let mut h = Fnv::new();
        for p in paths {
            h.field(file_contents(p)?.as_bytes());
        }
        Ok(h.hex())
    };
    let (mut text, mut choice) = (Fnv::new(), Fnv::new());
    for s in sources {
        text.field(s.as_bytes());
    }
    for &i in &own.of {
        choice.write(&(i as u64).to_le_bytes());
    }
    let weights = file_sample(&bundle.dir.join(&bundle.manifest.weights_file))?;
    // One field per thing that can differ, so that a refusal can say which did (`partial_output`).
    Ok([
        format!("sources {} {}", sources.len(), text.hex()),
        format!("settings {}", Fnv::new().write(format!("{cfg:?}").as_bytes()).hex()),
        format!(
            "bundle {}",
            Fnv::new()
                .field(file_contents(&bundle.dir.join("manifest.json"))?.as_bytes())
                .field(weights.as_bytes())
                .hex()
        ),
        format!("prefix {}", files(&mut args.prefix.as_deref().into_iter())?),
        format!("input-prefixes {} {}", files(&mut own.files.iter().map(PathBuf::as_path))?, choice.hex()),
        format!("tokenizer {}", files(&mut args.tokenizer.as_deref().into_iter())?),
    ]
    .join(" | "))
}

/// The prefixes inputs name for themselves (a JSONL line's "prefix"), each file read once.
struct InputPrefixes {
    /// The distinct files, in the order inputs first name them, and their tensors (moved into the generator).
    files: Vec<PathBuf>,
    tensors: Vec<BTreeMap<String, HostTensor>>,
    /// Each input's prefix among the generator's: 0 the run's (`--prefix`, else the bundle's initial one), i + 1
    /// `files[i]`. Empty when no input names one.
    of: Vec<usize>,
}

impl InputPrefixes {
    /// `run_prefix`: the run's `--prefix`, which lines naming the same file share.
    fn read(
        bundle: &Bundle,
        named: &[Option<NamedPrefix>],
        run_prefix: Option<&Path>,
        no_prefix: bool,
    ) -> Result<InputPrefixes> {
        let mut own = InputPrefixes { files: Vec::new(), tensors: Vec::new(), of: Vec::new() };
        let count = named.iter().filter(|p| p.is_some()).count();
        if count == 0 {
            return Ok(own);
        }
        if bundle.manifest.baked {
            bail!(
                "{} is baked: its prefix is inside the graphs, but {count} input(s) name a prefix of their own \
                 (\"prefix\"); generate with the bundle they were trained for (not baked)",
                bundle.dir.display()
            );
        }
        if no_prefix {
            eprintln!("note: --no-prefix: the prefixes {count} input(s) name are not used (the bare model)");
            return Ok(own);
        }
        // One read (and one prefill run per batch) per file, however the lines spell its path: indices by the
        // path as written (no file-system call per line), then by the file itself.
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let run_file = run_prefix.map(canonical);
        let mut by_spelling: HashMap<&Path, usize> = HashMap::new();
        let mut by_file: HashMap<PathBuf, usize> = HashMap::new();
        for p in named {
            let Some(NamedPrefix { path, origin }) = p else {
                own.of.push(0);
                continue;
            };
            if let Some(&i) = by_spelling.get(path.as_path()) {
                own.of.push(i);
                continue;
            }
            let file = canonical(path);
            let i = match by_file.get(&file) {
                Some(&i) => i,
                None if run_file.as_ref() == Some(&file) => 0,
                None => {
                    let tensors = bundle
                        .read_prefix(&file)
                        .with_context(|| format!("{origin}: reading the prefix this line names"))?;
                    own.files.push(file.clone());
                    own.tensors.push(tensors);
                    by_file.insert(file, own.files.len());
                    own.files.len()
                }
            };
            by_spelling.insert(path, i);
            own.of.push(i);
        }
        eprintln!(
            "note: {count} input(s) name their own prefix ({} file(s) besides --prefix); inputs with different \
             prefixes share the batches",
            own.files.len()
        );
        Ok(own)
    }
}

/// One line for all the inputs cut to the bundle's length, naming the first few.
fn warn_cut(cut: &[usize], what: &str, how: &str) {
    if cut.is_empty() {
        return;
    }
    eprintln!("warning: {} {what}(s) {how}, the bundle's --prompt-len ({what} {})", cut.len(), first_few(cut));
}

/// The first numbers of a list for a message: "2, 5, 9, …".
fn first_few(numbers: &[usize]) -> String {
    let mut s: Vec<String> = numbers.iter().take(8).map(|n| n.to_string()).collect();
    if numbers.len() > 8 {
        s.push("…".into());
    }
    s.join(", ")
}

/// Refuses, before any work, output paths that would fail at the end or overwrite the inputs or each other.
fn check_outputs(args: &GenerateArgs, no_references: bool) -> Result<()> {
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    let outs = [("--output", args.output.as_deref()), ("--refs-out", args.refs_out.as_deref())];
    for (flag, path) in outs.iter().filter_map(|(f, p)| p.map(|p| (*f, p))) {
        if path.is_dir() {
            bail!("{flag} {} is a folder: give a file path", path.display());
        }
        if let Some(file) = path.ancestors().skip(1).find(|a| a.is_file()) {
            bail!("{flag} {}: {} is a file, not a folder", path.display(), file.display());
        }
        if let Some(inputs) = &args.inputs {
            if same(path, inputs) {
                bail!("{flag} {} is the --inputs file: it would be overwritten; write elsewhere", path.display());
            }
        }
    }
    if let (Some(o), Some(r)) = (&args.output, &args.refs_out) {
        if same(o, r) {
            bail!("--output and --refs-out are the same file {}: give two paths", o.display());
        }
    }
    if args.refs_out.is_some() && no_references {
        bail!(
            "--refs-out: the sources have no references to write (one source per line, or --input); it needs an \
             E2E (.txt), JSONL or DART file"
        );
    }
    Ok(())
}

/// A generator's search over prompts with a config: GPT-2 and BART behind one type.
type SearchFn = dyn FnMut(&[Vec<i64>], &GenConfig) -> Result<Vec<Vec<i64>>>;

pub fn generate(args: GenerateArgs, engine: &Engine) -> Result<Vec<String>> {
    let bundle = Bundle::open(&args.bundle)?;
    let m = bundle.manifest.clone();
    let tok = tokenizer_for(&bundle, args.tokenizer.as_deref())?;
    let Sources { texts: sources, refs, prefixes: named } = match (&args.input, &args.inputs) {
        (Some(s), None) => Sources { texts: vec![s.clone()], refs: vec![vec![]], prefixes: vec![None] },
        (None, Some(p)) => sources_of(p)?,
        _ => bail!("give either --input TEXT or --inputs FILE"),
    };
    if sources.is_empty() {
        bail!("no inputs to generate from");
    }
    let prefix = prefix_for(&bundle, args.prefix.as_deref())?;
    let mut own = InputPrefixes::read(&bundle, &named, args.prefix.as_deref(), args.cfg.no_prefix)?;
    // Moved into the generator (a reparametrized prefix holds its MLP: megabytes each).
    let own_tensors = std::mem::take(&mut own.tensors);
    let initial = if own.of.is_empty() { sources.len() } else { own.of.iter().filter(|&&i| i == 0).count() };
    if args.prefix.is_none() && !m.baked && !args.cfg.no_prefix && initial > 0 {
        let which =
            if initial < sources.len() { format!("{initial} input(s) without a \"prefix\": ") } else { String::new() };
        eprintln!(
            "note: no --prefix: {which}generating with {}'s untrained initial prefix (pass a trained prefix.safetensors)",
            bundle.dir.display()
        );
    }
    let mut cfg = args.cfg.clone();
    if !cfg.stop_strings.is_empty() {
        // As HF's StopStringCriteria: a stop string fires when it occurs in the sequence's text (prompt and new
        // tokens, special tokens written out) ending inside the last token's text, not only at its end.
        let stop_tok = tokenizer_for(&bundle, args.tokenizer.as_deref())?;
        let texts = cfg.stop_strings.clone();
        cfg.stop = Some(crate::search::StopCheck::new(move |seq: &[i64]| {
            let ids: Vec<u32> = seq.iter().filter_map(|&t| u32::try_from(t).ok()).collect();
            let (Ok(full), Ok(before)) = (
                stop_tok.decode_with_specials(&ids),
                stop_tok.decode_with_specials(&ids[..ids.len().saturating_sub(1)]),
            ) else {
                return false;
            };
            // Where the last token's text starts (the texts share what came before it).
            let start = full.bytes().zip(before.bytes()).take_while(|(a, b)| a == b).count();
            texts.iter().any(|t| full.match_indices(t.as_str()).any(|(at, _)| at + t.len() > start))
        }));
    }
    // Like HF's generate, stop at any end-of-sequence id the model's generation config lists, and force the
    // tokens it forces (unless --no-forced-tokens cleared them).
    cfg.more_eos = m.eos_token_ids.iter().map(|&t| t as i64).collect();
    let forced_bos = m.forced_bos_token_id.filter(|_| args.forced_tokens).map(i64::from);
    cfg.forced_eos = m.forced_eos_token_id.filter(|_| args.forced_tokens).map(i64::from);
    let no_generation = || pfx_compiler::compile::no_generation_graphs(&args.bundle);
    let mut model: Box<SearchFn>;
    let (rows, prompts) = if let Some(b) = bart_spec(&bundle)? {
        let spec = b.generation.clone().ok_or_else(no_generation)?;
        let fmt = seq2seq_format(&bundle, &b, &tok)?;
        cfg.eos = Some(fmt.eos_id());
        cfg.pad = fmt.pad_id();
        // mBART-50's, NLLB's or M2M100's target language, else the config's forced_bos_token_id. HF forces it where
        // the decoder has only its start token, which is every row of an encoder-decoder (a decoder-only model's
        // prompt is longer but for one-token prompts, so it is left out there).
        cfg.forced_bos = fmt.forced_bos().or(forced_bos);
        let mut prompts = Vec::new();
        let mut cut = Vec::new();
        for (i, s) in sources.iter().enumerate() {
            let (ids, was_cut) = fmt.encode_source(s, spec.src_len)?;
            if was_cut {
                cut.push(i + 1);
            }
            prompts.push(ids);
        }
        warn_cut(
            &cut,
            "source",
            &format!("cut to {} tokens (their text shortened, the special tokens kept)", spec.src_len),
        );
        crate::search::check_request(&prompts, "source", spec.src_len, spec.max_new, spec.rows, &cfg)?;
        let bare = if m.graphs.contains_key("encode_bare") {
            Some(bundle.open_graph("encode_bare", engine.backend, &engine.ort)?)
        } else {
            None
        };
        let mut g = Seq2SeqGenerator::new(
            bundle.open_graph("encode", engine.backend, &engine.ort)?,
            bare,
            bundle.open_graph("decode", engine.backend, &engine.ort)?,
            spec.clone(),
            prefix,
            // mBART-cc25's target language, else where the generation config starts the decoder.
            fmt.decoder_start().or(b.generation_start_token_id).unwrap_or(b.decoder_start_token_id),
        );
        for t in own_tensors {
            g.add_prefix(t)?;
        }
        model = Box::new(move |p, c| crate::search::search_all(&mut g, p, c));
        (spec.rows, prompts)
    } else {
        let spec = m.generation.clone().ok_or_else(no_generation)?;
        let fmt = text_format(&bundle, &tok)?;
        cfg.eos = Some(fmt.eos_id() as i64);
        cfg.pad = fmt.pad_id() as i64;
        let mut prompts = Vec::new();
        let mut cut = Vec::new();
        // The BOS a model's tokenizer puts first stays first (the model was never trained without it).
        let head = fmt.prompt_head_len().min(spec.prompt_len);
        for (i, s) in sources.iter().enumerate() {
            let mut ids: Vec<i64> = fmt.encode_prompt(s)?.into_iter().map(|t| t as i64).collect();
            if ids.len() > spec.prompt_len {
                if head + 1 >= spec.prompt_len {
                    bail!(
                        "prompt {} has {} tokens, and the bundle's --prompt-len {} leaves no room for its source after \
                         the {head} special token(s) prompts start with and the one that ends them: recompile with a \
                         larger --prompt-len",
                        i + 1,
                        ids.len(),
                        spec.prompt_len
                    );
                }
                cut.push(i + 1);
                ids.drain(head..head + ids.len() - spec.prompt_len);
            }
            prompts.push(ids);
        }
        let kept = if head > 0 { format!(" after the {head} special token(s) they start with") } else { String::new() };
        // The generation config's lengths count the prompt as the model sees it.
        let counted = if cfg.max_length.or(cfg.min_length).is_some() {
            " (the generation config's max_length/min_length count them as cut)"
        } else {
            ""
        };
        warn_cut(&cut, "prompt", &format!("cut to their last {} tokens{kept}{counted}", spec.prompt_len - head));
        crate::search::check_request(&prompts, "prompt", spec.prompt_len, spec.max_new, spec.rows, &cfg)?;
        if let Some(max_length) = cfg.max_length {
            // HF would generate up to max_length; the bundle's graphs end sooner.
            let capped = prompts.iter().filter(|p| cfg.limit(p.len()) < max_length - p.len()).count();
            if capped > 0 {
                eprintln!(
                    "note: the model's generation config's max_length {max_length} leaves {capped} prompt(s) more \
                     than the {} new tokens the bundle generates (pfxc compile --max-new): {0} at most",
                    cfg.max_new
                );
            }
        }
        let mut g = Generator::open(&bundle, engine.backend, &engine.ort, prefix)?;
        for t in own_tensors {
            g.add_prefix(t)?;
        }
        model = Box::new(move |p, c| crate::search::search_all(&mut g, p, c));
        (spec.rows, prompts)
    };
    if args.resume && args.output.is_none() {
        bail!("--resume continues an --output file: give --output");
    }
    // Said once the request is known to run (a refused one must not show a seed nobody can use).
    if let Some(s) = &cfg.sampling {
        eprintln!("note: sampling with seed {0} (--seed {0} draws the same tokens again)", s.seed);
    }
    check_outputs(&args, refs.iter().all(|r| r.is_empty()))?;
    // The generations so far: those an interrupted run left, when resumed.
    // Outputs per source (`--num-return`): consecutive lines of the output.
    let n_out = cfg.num_return.max(1);
    let (mut partial, mut texts) = match &args.output {
        Some(p) => {
            let key = work_key(&args, &bundle, &sources, &cfg, &own)?;
            let (partial, done) = PartialOutput::open(p, &key, args.resume, prompts.len() * n_out)?;
            (Some(partial), done)
        }
        None => (None, Vec::new()),
    };
    // Batches are written whole, so a resumed file holds whole groups.
    let done = texts.len() / n_out;
    if done > 0 {
        eprintln!("resuming after {done} of {} generations", prompts.len());
    }
    let started = std::time::Instant::now();
    // A running count where someone watches; a log gets a line every half minute, and the total.
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut logged = std::time::Instant::now();
    // Inputs per call: what the rows hold (beams, or samples, per input).
    let per_input = if cfg.beams > 1 { cfg.beams } else { n_out };
    let chunk = (rows / per_input).max(1);
    // Generated ids the tokenizer has no token for (a model with more rows than its tokenizer has ids).
    let mut unknown_ids = 0;
    for (i, c) in prompts[done..].chunks(chunk).enumerate() {
        // Sampling draws follow each input's place among all of them (so a resumed run draws what the whole would).
        let at = done + i * chunk;
        let prefix_of = own.of.get(at..at + c.len()).map(<[usize]>::to_vec).unwrap_or_default();
        let cfg = GenConfig { input_offset: at as u64, prefix_of, ..cfg.clone() };
        let toks = model(c, &cfg).with_context(|| match &partial {
            Some(p) => format!(
                "after {} of {} generations, which are in {} (rerun with --resume to continue)",
                texts.len() / n_out,
                prompts.len(),
                p.partial_path().display()
            ),
            None => format!("after {} of {} generations", texts.len() / n_out, prompts.len()),
        })?;
        // One line per generation, whatever the model generated.
        let new = toks
            .iter()
            .map(|t| {
                let ids: Vec<u32> = t.iter().map(|&x| x as u32).collect();
                let (text, unknown) = tok.decode_generated(&ids)?;
                unknown_ids += unknown;
                Ok(text.trim().replace(['\n', '\r'], " "))
            })
            .collect::<Result<Vec<String>>>()?;
        if let Some(p) = partial.as_mut() {
            p.push(&new)?;
        }
        texts.extend(new);
        let generated = texts.len() / n_out;
        if prompts.len() > chunk && progress {
            eprint!("\rgenerated {generated}/{}", prompts.len());
        } else if logged.elapsed().as_secs() >= 30 && generated < prompts.len() {
            logged = std::time::Instant::now();
            eprintln!("generated {generated}/{} ({:.0}s)", prompts.len(), started.elapsed().as_secs_f64());
        }
    }
    if prompts.len() > chunk {
        eprintln!(
            "{}generated {} in {:.1}s",
            if progress { "\r" } else { "" },
            texts.len() / n_out,
            started.elapsed().as_secs_f64()
        );
    }
    if unknown_ids > 0 {
        eprintln!(
            "note: {unknown_ids} generated token(s) had ids with no token in {} (ids below {} it lacks, or past \
             them: the model has more rows than the tokenizer has tokens): left out of the texts, as Hugging Face's \
             decode leaves them out",
            tok.origin().display(),
            tok.id_bound()
        );
    }
    match partial {
        Some(p) => {
            p.finish()?;
        }
        None => {
            for (s, group) in sources.iter().zip(texts.chunks(n_out)) {
                println!("{s}");
                for t in group {
                    println!("  -> {t}");
                }
            }
        }
    }
    if let Some(p) = &args.refs_out {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        // One group per output line: a source's references repeated for each of its outputs.
        let groups: Vec<String> = refs.iter().flat_map(|g| std::iter::repeat_n(g.join("\n"), n_out)).collect();
        std::fs::write(p, groups.join("\n\n") + "\n").with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(texts)
}
