//! Greedy and beam search over any model that decodes R rows one token at a time (GPT-2's prefill/decode
//! graphs, BART's encode/decode graphs): the search only sees logits, and asks for cache rows to be reordered.

use anyhow::Result;

pub use crate::processors::Sampling;
use crate::processors::{draw_distinct, make_finite, Draws, Penalties};
pub use pfx_compiler::inspect::EarlyStopping;

#[derive(Clone, Debug)]
pub struct GenConfig {
    pub max_new: usize,
    /// No end-of-sequence before this many new tokens (its logit is masked, as HF's min_new_tokens does).
    pub min_new: usize,
    /// Limits that count a row's history (a decoder's prompt) with its new tokens, as HF's `max_length` and
    /// `min_length` do: each prompt gets its own `max_length` - its length new tokens (at most `max_new`), and no
    /// end-of-sequence before its sequence is `min_length` long. (HF counts a batch's padding as prompt; here
    /// each prompt's own tokens count, which is HF's one prompt at a time.)
    pub max_length: Option<usize>,
    pub min_length: Option<usize>,
    pub beams: usize,
    /// Beam scores are sum(log p) / len^length_penalty.
    pub length_penalty: f32,
    pub eos: Option<i64>,
    /// More end-of-sequence ids, stopping a row as `eos` does (a model whose generation_config.json lists
    /// several, as Llama 3's chat models: `<|end_of_text|>`, `<|eot_id|>`, ...).
    pub more_eos: Vec<i64>,
    /// Token used for padding and for idle rows.
    pub pad: i64,
    /// Mask the prefix out and number positions from 0: the bare model, for comparison.
    pub no_prefix: bool,
    /// The first new token, whatever the logits say (HF's `forced_bos_token_id`: mBART-50's target language).
    pub forced_bos: Option<i64>,
    /// The `max_new`-th new token when generation gets that far (HF's `forced_eos_token_id`, which BART's,
    /// Marian's and Pegasus's configs set to `</s>`). It wins over `forced_bos` when `max_new` is 1, as in HF.
    pub forced_eos: Option<i64>,
    /// No n-gram of this size twice in a row's sequence (HF's `no_repeat_ngram_size`; 0: off). The sequence is
    /// what HF's `input_ids` hold: the decoder start token and the new tokens (an encoder-decoder), or the prompt
    /// and the new tokens (a decoder: [`Start::history`]).
    pub no_repeat_ngram: usize,
    /// No n-gram of this size of an encoder-decoder's source in the output (HF's `encoder_no_repeat_ngram_size`,
    /// BlenderBot's default 3; 0: off): after the output's last n - 1 tokens, none that follows them in the source.
    pub encoder_no_repeat_ngram: usize,
    /// When beam search ends a prompt (HF's `early_stopping`).
    pub early_stopping: EarlyStopping,
    /// HF's `repetition_penalty` over what its `input_ids` hold (the row's [`RowContext::history`] and new
    /// tokens) and `encoder_repetition_penalty` over the source (a decoder's prompt); 1: off.
    pub repetition_penalty: f64,
    pub encoder_repetition_penalty: f64,
    /// Sample each token instead of taking the best (HF's `do_sample`); with beams, beam sampling: each step's
    /// candidates are drawn from all beams' warped scores instead of taken best first.
    pub sampling: Option<Sampling>,
    /// The index of the first input among all of a run's inputs: sampling draws input i's tokens from the stream
    /// (seed, i), whatever batch the input is in (with greedy search, sample j of N from stream i·N + j).
    pub input_offset: u64,
    /// Outputs per input (HF's `num_return_sequences`): beam search's best hypotheses (at most `beams`), or as many
    /// samples; consecutive in the searches' results.
    pub num_return: usize,
    /// The prefix each input of the call generates with: an index into the generator's prefixes (`add_prefix`);
    /// empty, or shorter than the inputs: the first one for the rest. Inputs with different prefixes share the
    /// rows (a batch that mixes users' prefixes).
    pub prefix_of: Vec<usize>,
    /// Tokens never chosen (HF's `suppress_tokens`), never as the first new token (`begin_suppress_tokens`; the
    /// second when `forced_bos` takes the first), and never completing one of `bad_words` (`bad_words_ids`: a
    /// one-token word is never chosen; an end-of-sequence id alone is left out, as HF does).
    pub suppress: Vec<i64>,
    pub begin_suppress: Vec<i64>,
    pub bad_words: Vec<Vec<i64>>,
    /// (sequence, bias): the bias is added to the sequence's last token's score wherever the rest of it ends the
    /// row's sequence (always for a one-token sequence; HF's `sequence_bias`).
    pub sequence_bias: Vec<(Vec<i64>, f32)>,
    /// (start, factor): after `start` new tokens, the end-of-sequence scores grow by |score| · (factor^k - 1), k
    /// tokens past the start (HF's `exponential_decay_length_penalty`).
    pub length_decay: Option<(usize, f64)>,
    /// Log-softmax of the processed scores, after everything (HF's `renormalize_logits`): changes the scores
    /// beam search adds up (greedy and sampling pick the same either way).
    pub renormalize: bool,
    /// NaN scores become 0, infinite ones the largest finite float (HF's `remove_invalid_values`), applied to the
    /// model's logits before the processors (HF applies it after its bans, whose -inf then become finite: a banned
    /// end id can come back under the length decay there; here bans stay bans).
    pub remove_invalid: bool,
    /// Texts that end a generation (HF's `stop_strings`), which `stop` tests with the tokenizer.
    pub stop_strings: Vec<String>,
    /// Whether a row's sequence (its history and new tokens) ends a generation, as HF's `stop_strings` do: the
    /// token that completes it is kept, and a beam that hits it finishes.
    pub stop: Option<StopCheck>,
}

/// A test of a row's whole sequence (history and new tokens).
pub type SequenceTest = dyn Fn(&[i64]) -> bool + Send + Sync;

/// Whether a row's sequence ends its generation, e.g. its text ends with a stop string.
#[derive(Clone)]
pub struct StopCheck(pub std::sync::Arc<SequenceTest>);

impl std::fmt::Debug for StopCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StopCheck")
    }
}

impl StopCheck {
    pub fn new(hits: impl Fn(&[i64]) -> bool + Send + Sync + 'static) -> StopCheck {
        StopCheck(std::sync::Arc::new(hits))
    }
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            max_new: 32,
            min_new: 0,
            max_length: None,
            min_length: None,
            beams: 1,
            length_penalty: 1.0,
            eos: None,
            more_eos: Vec::new(),
            pad: 0,
            no_prefix: false,
            forced_bos: None,
            forced_eos: None,
            no_repeat_ngram: 0,
            encoder_no_repeat_ngram: 0,
            early_stopping: EarlyStopping::Heuristic,
            repetition_penalty: 1.0,
            encoder_repetition_penalty: 1.0,
            sampling: None,
            input_offset: 0,
            num_return: 1,
            prefix_of: Vec::new(),
            suppress: Vec::new(),
            begin_suppress: Vec::new(),
            bad_words: Vec::new(),
            sequence_bias: Vec::new(),
            length_decay: None,
            renormalize: false,
            remove_invalid: false,
            stop_strings: Vec::new(),
            stop: None,
        }
    }
}

impl GenConfig {
    /// The prefix input `i` of the call generates with ([`GenConfig::prefix_of`]).
    pub fn prefix_index(&self, i: usize) -> usize {
        self.prefix_of.get(i).copied().unwrap_or(0)
    }

    /// Whether `t` ends a sequence.
    pub fn is_eos(&self, t: i64) -> bool {
        Some(t) == self.eos || self.more_eos.contains(&t)
    }

    /// Whether the bans or biases look at the row's sequence (beam search builds it only then).
    fn reads_sequence(&self) -> bool {
        self.no_repeat_ngram > 0
            || self.encoder_no_repeat_ngram > 0
            || !self.suppress.is_empty()
            || !self.begin_suppress.is_empty()
            || !self.bad_words.is_empty()
            || !self.sequence_bias.is_empty()
    }

    /// Candidates per beam that keep a beam search going when every end-of-sequence id is among them (HF's
    /// beams_to_keep / num_beams, and beam sampling's min_tokens_to_keep).
    fn continuations(&self) -> usize {
        2.max(1 + self.eos_ids().count())
    }

    /// Whether `seq` (a row's history and new tokens) hits a stop check.
    fn stops(&self, seq: &[i64]) -> bool {
        self.stop.as_ref().is_some_and(|s| (s.0)(seq))
    }

    /// The end-of-sequence ids.
    fn eos_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.eos.into_iter().chain(self.more_eos.iter().copied().filter(move |&t| Some(t) != self.eos))
    }

    /// The new tokens a row whose history holds `history_len` tokens may generate: `max_new`, or fewer where
    /// `max_length` (which counts the history) ends it sooner.
    pub fn limit(&self, history_len: usize) -> usize {
        self.max_length.map_or(self.max_new, |m| m.saturating_sub(history_len).min(self.max_new))
    }

    /// The token forced as new token `n_generated` + 1 of a row that may generate `limit` tokens, if any. As HF's
    /// logits processors, forcing sets every other token's log-probability to -inf and the forced one's to 0,
    /// after the early-eos ban (which it overrides).
    fn forced(&self, n_generated: usize, limit: usize) -> Option<i64> {
        match (self.forced_eos, self.forced_bos) {
            (Some(t), _) if n_generated + 1 == limit => Some(t),
            (_, Some(t)) if n_generated == 0 => Some(t),
            _ => None,
        }
    }
}

/// The bundle's generation shapes against a request: inputs of 1..=`max_len` tokens (`what`: "prompt",
/// "source"), `max_new` and `beams` within what the graphs were compiled for.
pub fn check_request(
    inputs: &[Vec<i64>],
    what: &str,
    max_len: usize,
    max_new: usize,
    rows: usize,
    cfg: &GenConfig,
) -> Result<()> {
    for (i, p) in inputs.iter().enumerate() {
        if p.is_empty() {
            anyhow::bail!("{what} {i} is empty");
        }
        if p.len() > max_len {
            anyhow::bail!(
                "{what} {i} has {} tokens; the bundle's generation graphs take at most {max_len} (recompile with a \
                 larger --prompt-len)",
                p.len()
            );
        }
    }
    if cfg.max_new == 0 || cfg.max_new > max_new {
        anyhow::bail!("--max-new must be between 1 and {max_new} (the bundle's --max-new)");
    }
    // As HF's generate, which refuses an input as long as max_length (nothing would be left to generate).
    if let Some(m) = cfg.max_length {
        if let Some((i, p)) = inputs.iter().enumerate().find(|(_, p)| p.len() >= m) {
            anyhow::bail!(
                "{what} {} has {} tokens, and the model's generation config sets max_length {m} (which counts the \
                 {what}): nothing is left to generate; pass --max-new N (new tokens, which replaces max_length)",
                i + 1,
                p.len()
            );
        }
    }
    if cfg.beams == 0 || cfg.beams > rows {
        anyhow::bail!("--beams must be between 1 and {rows} (the bundle's --gen-rows)");
    }
    match cfg.num_return {
        0 => anyhow::bail!("--num-return must be at least 1"),
        1 => {}
        n if cfg.beams > 1 && n > cfg.beams => {
            anyhow::bail!("--num-return {n} asks for more hypotheses than beam search keeps (--beams {})", cfg.beams)
        }
        n if cfg.beams == 1 && cfg.sampling.is_none() => anyhow::bail!(
            "--num-return {n} needs beam search (--beams {n} or more) or sampling (--sample true): greedy search has \
             one output"
        ),
        _ => {}
    }
    if let Some(s) = &cfg.sampling {
        if !(s.temperature > 0.0 && s.temperature.is_finite()) {
            anyhow::bail!("sampling needs a temperature above 0 (got {})", s.temperature);
        }
    }
    Ok(())
}

/// R rows being decoded, their caches filled up to the tokens fed so far.
pub trait Decoding {
    /// Feeds one token per row (`n_generated` tokens were generated before it); returns each row's logits.
    fn step(&mut self, tokens: &[i64], n_generated: usize) -> Result<Vec<Vec<f32>>>;
    /// Row i of the new state is row `parents[i]` of the old one (rows beyond `parents` copy `parents[0]`).
    fn reorder(&mut self, parents: &[usize]) -> Result<()>;
}

/// A model the searches drive R rows at a time, each row started from one input (a prompt, a source).
pub trait Start {
    type Running<'a>: Decoding
    where
        Self: 'a;
    /// Rows decoded together (the generation graphs' batch).
    fn rows(&self) -> usize;
    /// Refuses a request the generation graphs cannot serve (`check_request`).
    fn check(&self, inputs: &[Vec<i64>], cfg: &GenConfig) -> Result<()>;
    /// Starts `rows()` rows from as many inputs, row i with prefix `prefixes[i]` (0 where the list is short);
    /// returns the running state and each row's first logits.
    fn start<'a>(
        &'a mut self,
        inputs: &[Vec<i64>],
        prefixes: &[usize],
        cfg: &GenConfig,
    ) -> Result<(Self::Running<'a>, Vec<Vec<f32>>)>;
    /// What a row started from `input` bans n-grams against ([`RowContext`]).
    fn context(&self, input: &[i64]) -> RowContext;
}

/// What a row's n-gram bans and penalties look at (`no_repeat_ngram`, `encoder_no_repeat_ngram`, the repetition
/// penalties), and where its samples come from.
#[derive(Clone, Debug, Default)]
pub struct RowContext {
    /// The sequence before the first new token, as HF's `input_ids` hold it: the prompt of a decoder, the start
    /// token of an encoder-decoder's decoder.
    pub history: Vec<i64>,
    /// What HF's `encoder_input_ids` hold: an encoder-decoder's source, a decoder's prompt.
    pub source: Vec<i64>,
    /// The input's index among the run's inputs (set by the searches: [`GenConfig::input_offset`] + its place).
    pub input: u64,
}

/// Greedy decoding (or sampling) of any number of inputs, R rows at a time (idle rows hold a pad token). Returns
/// each input's new tokens (`cfg.num_return` samples of each, consecutive), stopping after eos (not included).
pub fn greedy_all<M: Start>(model: &mut M, inputs: &[Vec<i64>], cfg: &GenConfig) -> Result<Vec<Vec<i64>>> {
    model.check(inputs, cfg)?;
    let r = model.rows();
    let n = cfg.num_return.max(1) as u64;
    // Each row: (input, its stream: sample j of input i draws from stream (offset + i) · n + j, its prefix).
    let items: Vec<(&Vec<i64>, u64, usize)> = inputs
        .iter()
        .enumerate()
        .flat_map(|(i, p)| (0..n).map(move |j| (p, (cfg.input_offset + i as u64) * n + j, cfg.prefix_index(i))))
        .collect();
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(r) {
        let mut rows: Vec<Vec<i64>> = chunk.iter().map(|(p, ..)| (*p).clone()).collect();
        rows.resize(r, vec![cfg.pad]);
        // Idle rows take the first row's prefix: no run of the prefill for them alone.
        let mut prefixes: Vec<usize> = chunk.iter().map(|c| c.2).collect();
        prefixes.resize(r, chunk[0].2);
        let contexts: Vec<RowContext> = rows
            .iter()
            .enumerate()
            .map(|(i, p)| RowContext { input: chunk.get(i).map_or(0, |c| c.1), ..model.context(p) })
            .collect();
        let (mut state, logits) = model.start(&rows, &prefixes, cfg)?;
        out.extend(greedy(&mut state, logits, chunk.len(), cfg, contexts)?);
    }
    Ok(out)
}

/// Beam search over any number of inputs, as many at a time as the rows hold (R / beams). Returns each input's
/// best `cfg.num_return` hypotheses' new tokens, best first.
pub fn beam_all<M: Start>(model: &mut M, inputs: &[Vec<i64>], cfg: &GenConfig) -> Result<Vec<Vec<i64>>> {
    model.check(inputs, cfg)?;
    let (r, k) = (model.rows(), cfg.beams);
    let mut out = Vec::with_capacity(inputs.len());
    for (c, chunk) in inputs.chunks(r / k).enumerate() {
        let mut rows: Vec<Vec<i64>> = chunk.iter().flat_map(|p| std::iter::repeat_n(p.clone(), k)).collect();
        rows.resize(r, chunk[0].clone());
        let at = c * (r / k);
        let mut prefixes: Vec<usize> =
            (0..chunk.len()).flat_map(|i| std::iter::repeat_n(cfg.prefix_index(at + i), k)).collect();
        prefixes.resize(r, cfg.prefix_index(at));
        let first = cfg.input_offset + at as u64;
        let contexts: Vec<RowContext> =
            chunk.iter().enumerate().map(|(i, p)| RowContext { input: first + i as u64, ..model.context(p) }).collect();
        let (mut state, logits) = model.start(&rows, &prefixes, cfg)?;
        out.extend(beam_groups(&mut state, logits, &contexts, cfg)?);
    }
    Ok(out)
}

/// Beam search when `cfg.beams` > 1, else greedy decoding, over any number of inputs.
pub fn search_all<M: Start>(model: &mut M, inputs: &[Vec<i64>], cfg: &GenConfig) -> Result<Vec<Vec<i64>>> {
    if cfg.beams > 1 {
        beam_all(model, inputs, cfg)
    } else {
        greedy_all(model, inputs, cfg)
    }
}

/// Greedy decoding of the first `live` rows, starting from the logits after the prompt; `contexts` holds what
/// each row bans n-grams against ([`Start::context`]). Returns each row's new tokens, stopping after eos (not
/// included).
pub fn greedy(
    state: &mut dyn Decoding,
    mut logits: Vec<Vec<f32>>,
    live: usize,
    cfg: &GenConfig,
    mut contexts: Vec<RowContext>,
) -> Result<Vec<Vec<i64>>> {
    let r = logits.len();
    let mut gen: Vec<Vec<i64>> = vec![Vec::new(); r];
    let mut done = vec![false; r];
    contexts.resize(r, RowContext::default());
    let mut draws: Vec<Option<Draws>> =
        contexts.iter().map(|c| cfg.sampling.as_ref().map(|s| Draws::new(s.seed, c.input))).collect();
    let limits: Vec<usize> = contexts.iter().map(|c| cfg.limit(c.history.len())).collect();
    for n in 0..cfg.max_new {
        if cfg.remove_invalid {
            logits.iter_mut().for_each(|row| make_finite(row));
        }
        let mut next = vec![cfg.pad; r];
        for row in 0..r {
            let t = match cfg.forced(n, limits[row]) {
                Some(t) => t,
                None => {
                    let ctx = &contexts[row];
                    match (&cfg.sampling, &mut draws[row]) {
                        (Some(s), Some(d)) => {
                            crate::processors::draw(&sampling_scores(cfg, s, n, ctx, &logits[row]), d.uniform()) as i64
                        }
                        _ => {
                            let banned = banned_tokens(cfg, n, &ctx.history, &ctx.source);
                            let penalties = penalties(cfg, ctx, &[], logits[row].len(), n);
                            best_penalized(&logits[row], 1, banned, penalties.as_ref(), |x| x)
                                .first()
                                .map_or(0, |&(t, _)| t as i64)
                        }
                    }
                }
            };
            contexts[row].history.push(t);
            if !done[row] {
                if cfg.is_eos(t) {
                    done[row] = true;
                } else {
                    gen[row].push(t);
                    // A stop string ends the row with its last token kept (HF's StopStringCriteria).
                    done[row] = n + 1 >= limits[row] || cfg.stops(&contexts[row].history);
                }
            }
            next[row] = t;
        }
        if n + 1 == cfg.max_new || done.iter().take(live).all(|&d| d) {
            break;
        }
        logits = state.step(&next, n)?;
    }
    gen.truncate(live);
    Ok(gen)
}

/// Beam search over rows that all hold the same prompt (`context`: what its n-gram bans look at); `cfg.beams` of
/// them are live. Returns the best hypothesis's new tokens (eos not included).
pub fn beam(
    state: &mut dyn Decoding,
    logits: Vec<Vec<f32>>,
    context: &RowContext,
    cfg: &GenConfig,
) -> Result<Vec<i64>> {
    Ok(beam_groups(state, logits, std::slice::from_ref(context), cfg)?.into_iter().next().unwrap_or_default())
}

/// One prompt's search: its live beams and finished hypotheses.
struct Group {
    /// (tokens, sum of log-probabilities); only beam 0 is live at the start (its K rows are identical).
    beams: Vec<(Vec<i64>, f64)>,
    finished: Vec<(Vec<i64>, f64)>,
    done: bool,
}

/// Beam search for `groups` prompts at once: rows [g·K, (g+1)·K) hold prompt g (K = `cfg.beams`), rows past
/// groups·K are idle. Returns each prompt's best `cfg.num_return` hypotheses (eos not included), best first.
/// Follows Hugging Face's beam search with `early_stopping=False`: at step t (t tokens generated) the top-C
/// candidates are ranked (C = 2K, or (1 + E)·K with E > 1 end-of-sequence ids, as HF keeps); those among the top K
/// that end in eos (all of the top K at the last step) finish with score sum(log p) / t^length_penalty (the eos
/// counted); the best K candidates that do not end in eos live on; a prompt is done when K hypotheses are finished
/// and its best live beam's score / t^length_penalty cannot beat the worst of them (at once with `early_stopping`
/// true; judged at the length limit with "never" and a positive length penalty). `contexts[g]` is what prompt g's
/// n-gram bans and penalties look at. With `cfg.sampling` (HF's beam sampling) each beam's log-probabilities are
/// also warped, and the C candidates are drawn without replacement from the softmax of all beams' scores (from
/// prompt g's stream of the seed), then ranked as above.
pub fn beam_groups(
    state: &mut dyn Decoding,
    mut logits: Vec<Vec<f32>>,
    contexts: &[RowContext],
    cfg: &GenConfig,
) -> Result<Vec<Vec<i64>>> {
    let (r, k, groups) = (logits.len(), cfg.beams, contexts.len());
    if groups * k > r {
        anyhow::bail!("{groups} prompts × {k} beams need {} rows; the graphs decode {r}", groups * k);
    }
    let norm = |s: f64, t: usize| s / (t as f64).powf(cfg.length_penalty as f64);
    // Enough candidates that K live ones remain when every end-of-sequence id is among them.
    let keep = cfg.continuations() * k;
    let mut gs: Vec<Group> =
        (0..groups).map(|_| Group { beams: vec![(Vec::new(), 0.0)], finished: Vec::new(), done: false }).collect();
    let mut draws: Vec<Option<Draws>> =
        contexts.iter().map(|c| cfg.sampling.as_ref().map(|s| Draws::new(s.seed, c.input))).collect();
    let limits: Vec<usize> = contexts.iter().map(|c| cfg.limit(c.history.len())).collect();
    for n in 0..cfg.max_new {
        if cfg.remove_invalid {
            logits.iter_mut().for_each(|row| make_finite(row));
        }
        let t = n + 1;
        // Rows keep their place unless a group's beams move; idle and finished rows are fed padding.
        let mut parents: Vec<usize> = (0..r).collect();
        let mut tokens = vec![cfg.pad; r];
        for (gi, g) in gs.iter_mut().enumerate().filter(|(_, g)| !g.done) {
            let base = gi * k;
            let limit = limits[gi];
            let last = t == limit;
            let forced = cfg.forced(n, limit);
            // Only the best C candidates matter, and a beam's score is the same for all its tokens: the best C
            // of each beam hold them all. (Two logits a rounding apart can give one log-probability, and the pick
            // then keeps the higher logit where a full sort would keep the lower token; that can only change the
            // C-th candidate, which a step never uses: K live beams are filled from the first C - 1, as at most
            // E of them end a sequence.) Then the K·C are ordered.
            let mut cands: Vec<(f64, usize, i64)> = Vec::new();
            for (b, (_, s)) in g.beams.iter().enumerate() {
                if let Some(tok) = forced {
                    // Log-probability 0 for the forced token, -inf for the rest: one candidate per beam.
                    cands.push((*s, b, tok));
                    continue;
                }
                if cfg.sampling.is_some() || cfg.renormalize {
                    // Every token's processed score is needed: the warpers and the renormalization read the row.
                    let lps = beam_step_scores(cfg, n, &contexts[gi], &g.beams[b].0, &logits[base + b]);
                    if cfg.sampling.is_some() {
                        let finite = lps.iter().enumerate().filter(|(_, lp)| lp.is_finite());
                        cands.extend(finite.map(|(tok, &lp)| (s + lp as f64, b, tok as i64)));
                    } else {
                        let best = best_tokens(&lps, keep, &[]).into_iter().filter(|(_, lp)| lp.is_finite());
                        cands.extend(best.map(|(tok, lp)| (s + lp as f64, b, tok as i64)));
                    }
                    continue;
                }
                // As HF: log-softmax over the whole vocabulary first, then the penalties, then forbid an early
                // eos and repeated n-grams.
                let banned = if cfg.reads_sequence() {
                    let seq = [&contexts[gi].history[..], &g.beams[b].0].concat();
                    banned_tokens(cfg, n, &seq, &contexts[gi].source)
                } else {
                    eos_banned(cfg, n, contexts[gi].history.len())
                };
                let row = &logits[base + b];
                let penalties = penalties(cfg, &contexts[gi], &g.beams[b].0, row.len(), n);
                let (max, log_sum) = log_sum_exp(row);
                for (tok, lp) in best_penalized(row, keep, banned, penalties.as_ref(), |x| x - max - log_sum) {
                    if lp.is_finite() {
                        cands.push((s + lp as f64, b, tok as i64));
                    }
                }
            }
            if let (Some(d), None) = (&mut draws[gi], forced) {
                let max = cands.iter().map(|c| c.0).fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = cands.iter().map(|c| (c.0 - max).exp()).collect();
                cands = draw_distinct(&weights, keep, d).into_iter().map(|i| cands[i]).collect();
            }
            let order = |a: &(f64, usize, i64), b: &(f64, usize, i64)| {
                b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
            };
            cands.sort_by(order);
            cands.truncate(keep);
            let mut next: Vec<(Vec<i64>, f64, usize)> = Vec::new();
            for (rank, &(s, b, tok)) in cands.iter().enumerate() {
                let is_eos = cfg.is_eos(tok);
                // A candidate that completes a stop string finishes as an eos does (its token kept), or is dropped.
                // (Decoded only where it can finish or live on.)
                let stops = !is_eos
                    && (rank < k || next.len() < k)
                    && cfg.stop.is_some()
                    && cfg.stops(&[&contexts[gi].history[..], &g.beams[b].0, &[tok]].concat());
                if rank < k && (is_eos || stops || last) {
                    let mut toks = g.beams[b].0.clone();
                    if !is_eos {
                        toks.push(tok);
                    }
                    g.finished.push((toks, norm(s, t)));
                } else if !is_eos && !stops && next.len() < k && !last {
                    let mut toks = g.beams[b].0.clone();
                    toks.push(tok);
                    next.push((toks, s, b));
                }
            }
            g.finished.sort_by(|a, b| b.1.total_cmp(&a.1));
            g.finished.truncate(k);
            let full = g.finished.len() == k;
            // The length the best live beam is judged at: "never" with a positive length penalty assumes it grows
            // to the limit.
            let judged = match cfg.early_stopping {
                EarlyStopping::Never if cfg.length_penalty > 0.0 => limit,
                _ => t,
            };
            let stop = last
                || next.is_empty()
                || (full
                    && (cfg.early_stopping == EarlyStopping::Early || norm(next[0].1, judged) <= g.finished[k - 1].1));
            if stop {
                g.done = true;
                continue;
            }
            for (i, (toks, _, b)) in next.iter().enumerate() {
                parents[base + i] = base + b;
                tokens[base + i] = *toks.last().unwrap();
            }
            g.beams = next.into_iter().map(|(t, s, _)| (t, s)).collect();
        }
        if gs.iter().all(|g| g.done) {
            break;
        }
        // Reorder the cache rows to follow the surviving beams.
        state.reorder(&parents)?;
        logits = state.step(&tokens, n)?;
    }
    // Each prompt's best `num_return` (HF keeps `beams` finished hypotheses; one that ended with fewer fills in
    // with empty outputs).
    let n = cfg.num_return.max(1);
    Ok(gs
        .into_iter()
        .flat_map(|g| {
            let mut best: Vec<Vec<i64>> = g.finished.into_iter().take(n).map(|f| f.0).collect();
            best.resize(n, Vec::new());
            best
        })
        .collect())
}

/// Copies row blocks of `per_row` elements: row i takes row `parents[i]` (or `parents[0]` past the end).
///
/// The caches are tens of MB per step, so a row that keeps its own block is not touched, and only the blocks
/// that are read by another row and overwritten themselves are saved before the copies.
pub fn reorder_rows<T: Copy>(data: &mut [T], parents: &[usize], rows: usize, per_row: usize) {
    let src = |i: usize| parents.get(i).copied().unwrap_or(parents[0]);
    let block = |r: usize| r * per_row..(r + 1) * per_row;
    let mut saved: Vec<(usize, Vec<T>)> = Vec::new();
    for i in 0..rows {
        let s = src(i);
        if s != i && src(s) != s && !saved.iter().any(|(r, _)| *r == s) {
            saved.push((s, data[block(s)].to_vec()));
        }
    }
    for i in 0..rows {
        let s = src(i);
        if s == i {
            continue;
        }
        match saved.iter().find(|(r, _)| *r == s) {
            Some((_, copy)) => data[block(i)].copy_from_slice(copy),
            None => data.copy_within(block(s), i * per_row),
        }
    }
}

/// The tokens a row may not choose next: the end-of-sequence ids while too early ([`eos_banned`]), every token
/// that would end an n-gram `seq` already holds (HF's NoRepeatNGramLogitsProcessor: the last n - 1 tokens
/// followed by it occur earlier), and every token that would end an n-gram of `source` (its
/// EncoderNoRepeatNGramLogitsProcessor).
fn banned_tokens(cfg: &GenConfig, n_generated: usize, seq: &[i64], source: &[i64]) -> Vec<usize> {
    let mut banned = eos_banned(cfg, n_generated, seq.len() - n_generated);
    let mut ban = |t: i64| {
        if let Ok(t) = usize::try_from(t) {
            if !banned.contains(&t) {
                banned.push(t);
            }
        }
    };
    cfg.suppress.iter().for_each(|&t| ban(t));
    // HF's begin index: the first new token, the second when a forced first token takes it (encoder-decoders).
    let begin = if cfg.forced_bos.is_some() && seq.len() - n_generated == 1 { 1 } else { 0 };
    if n_generated == begin {
        cfg.begin_suppress.iter().for_each(|&t| ban(t));
    }
    for w in cfg.bad_words.iter().filter(|w| !w.is_empty()) {
        let (head, last) = w.split_at(w.len() - 1);
        if (w.len() > 1 || !cfg.is_eos(last[0])) && seq.ends_with(head) {
            ban(last[0]);
        }
    }
    // `seq` itself holds an n-gram once it is n long; the source's count once `seq` has their first n - 1.
    let n = cfg.no_repeat_ngram;
    if n > 0 && seq.len() >= n {
        ban_continuations(seq, &seq[seq.len() + 1 - n..], &mut banned);
    }
    let n = cfg.encoder_no_repeat_ngram;
    if n > 0 && seq.len() + 1 >= n {
        ban_continuations(source, &seq[seq.len() + 1 - n..], &mut banned);
    }
    banned
}

/// Adds to `banned` every token of `within` that follows an occurrence of `tail` there.
fn ban_continuations(within: &[i64], tail: &[i64], banned: &mut Vec<usize>) {
    let n = tail.len() + 1;
    if within.len() < n {
        return;
    }
    for start in 0..=within.len() - n {
        if within[start..start + n - 1] == *tail {
            let t = within[start + n - 1] as usize;
            if !banned.contains(&t) {
                banned.push(t);
            }
        }
    }
}

/// The biases, repetition penalties and length decay of a row whose context is `ctx` and which generated `new` past
/// its history (beam search keeps a beam's tokens apart; greedy search pushes them onto the history), after
/// `n_generated` new tokens.
fn penalties(cfg: &GenConfig, ctx: &RowContext, new: &[i64], vocab: usize, n_generated: usize) -> Option<Penalties> {
    let penalties = scaled_or_biased(cfg, ctx, new, vocab);
    match cfg.length_decay {
        // HF's regulation starts after `start` new tokens (it counts the whole sequence against its first length).
        Some((start, factor)) if n_generated > start => {
            let eos: Vec<i64> = cfg.eos_ids().collect();
            let boost = factor.powi((n_generated - start).min(i32::MAX as usize) as i32) - 1.0;
            Penalties::with_eos_decay(penalties, &eos, boost, vocab)
        }
        _ => penalties,
    }
}

/// The biases and repetition penalties (see [`penalties`]).
fn scaled_or_biased(cfg: &GenConfig, ctx: &RowContext, new: &[i64], vocab: usize) -> Option<Penalties> {
    if cfg.repetition_penalty == 1.0 && cfg.encoder_repetition_penalty == 1.0 && cfg.sequence_bias.is_empty() {
        return None;
    }
    let seq = [&ctx.history[..], new].concat();
    let biases: Vec<(i64, f32)> = cfg
        .sequence_bias
        .iter()
        .filter(|(s, _)| !s.is_empty() && seq.ends_with(&s[..s.len() - 1]))
        .map(|(s, b)| (s[s.len() - 1], *b))
        .collect();
    Penalties::new(&biases, cfg.encoder_repetition_penalty, &ctx.source, cfg.repetition_penalty, &seq, vocab)
}

/// The `count` best tokens of a row after the penalties and bans, best first (ties to the lower id), with their
/// scores: `score` maps a logit to what the processors see (the logit in greedy search, its log-probability in beam
/// search). Only the penalized tokens change order, so the others are found among the raw logits.
fn best_penalized(
    row: &[f32],
    count: usize,
    mut banned: Vec<usize>,
    penalties: Option<&Penalties>,
    score: impl Fn(f32) -> f32,
) -> Vec<(usize, f32)> {
    let Some(p) = penalties else {
        return best_tokens(row, count, &banned).into_iter().map(|(t, x)| (t, score(x))).collect();
    };
    let penalized: Vec<(usize, f32)> =
        p.scores(|t| score(row[t])).into_iter().filter(|(t, x)| !x.is_nan() && !banned.contains(t)).collect();
    banned.extend(p.tokens());
    let mut best: Vec<(usize, f32)> =
        best_tokens(row, count, &banned).into_iter().map(|(t, x)| (t, score(x))).chain(penalized).collect();
    best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    best.truncate(count);
    best
}

/// The scores HF's sampling draws from (through their softmax) for a row whose context is `ctx` after
/// `n_generated` new tokens: its logits penalized, banned tokens at -inf, then the warpers of `s`.
pub fn sampling_scores(cfg: &GenConfig, s: &Sampling, n_generated: usize, ctx: &RowContext, row: &[f32]) -> Vec<f32> {
    processed(cfg, Some(s), 1, n_generated, ctx, &[], row.to_vec())
}

/// What beam search adds to a beam's score for each token (HF's processed `scores` of beam search and beam
/// sampling): the log-softmax of its logits, penalized, banned tokens at -inf, then with `cfg.sampling` the
/// warpers, each keeping at least one token more than there are end-of-sequence ids (2 at least), and with
/// `cfg.renormalize` the log-softmax of the result. `new` holds the beam's tokens so far.
pub fn beam_step_scores(cfg: &GenConfig, n_generated: usize, ctx: &RowContext, new: &[i64], row: &[f32]) -> Vec<f32> {
    let (max, log_sum) = log_sum_exp(row);
    let lps = row.iter().map(|&x| x - max - log_sum).collect();
    let mut v = processed(cfg, cfg.sampling.as_ref(), cfg.continuations(), n_generated, ctx, new, lps);
    if cfg.renormalize {
        let (max, log_sum) = log_sum_exp(&v);
        v.iter_mut().for_each(|x| *x -= max + log_sum);
    }
    v
}

/// Scores `v` of a row (logits, or log-probabilities in beam search) through the penalties, the bans and the
/// warpers of `s` (each keeping at least `keep` tokens); `new`: tokens past the context's history.
fn processed(
    cfg: &GenConfig,
    s: Option<&Sampling>,
    keep: usize,
    n_generated: usize,
    ctx: &RowContext,
    new: &[i64],
    mut v: Vec<f32>,
) -> Vec<f32> {
    if let Some(p) = penalties(cfg, ctx, new, v.len(), n_generated) {
        p.apply(&mut v);
    }
    let seq = [&ctx.history[..], new].concat();
    // Ids past the scores (an end id of the config, a prompt token) have no score to ban.
    for t in banned_tokens(cfg, n_generated, &seq, &ctx.source) {
        if let Some(x) = v.get_mut(t) {
            *x = f32::NEG_INFINITY;
        }
    }
    if let Some(s) = s {
        crate::processors::warp(&mut v, s, keep);
    }
    v
}

/// The end-of-sequence ids while they may not be chosen yet (HF's min_new_tokens, and its min_length, which counts
/// the row's history of `history_len` tokens).
fn eos_banned(cfg: &GenConfig, n_generated: usize, history_len: usize) -> Vec<usize> {
    if n_generated < cfg.min_new || cfg.min_length.is_some_and(|m| history_len + n_generated < m) {
        cfg.eos_ids().map(|e| e as usize).collect()
    } else {
        Vec::new()
    }
}

/// The `count` highest values and their indices, best first, ties to the lower index, `banned` left out. One pass
/// with a short sorted list: `count` is 1 (greedy) or 2·beams. A NaN is never chosen (a model whose logits hold
/// NaN is broken; before, greedy chose token 0 when the row began with one).
pub(crate) fn best_tokens(v: &[f32], count: usize, banned: &[usize]) -> Vec<(usize, f32)> {
    const BLOCK: usize = 16;
    let mut best: Vec<(usize, f32)> = Vec::with_capacity(count + 1);
    for (b, block) in v.chunks(BLOCK).enumerate() {
        // Most blocks hold nothing better than the list's worst once it is full: one vectorized max skips them.
        if best.len() == count && block.iter().copied().fold(f32::NEG_INFINITY, f32::max) <= best[count - 1].1 {
            continue;
        }
        for (j, &x) in block.iter().enumerate() {
            let i = b * BLOCK + j;
            if x.is_nan() || (best.len() == count && x <= best[count - 1].1) || banned.contains(&i) {
                continue;
            }
            // After the equal ones: they have lower indices.
            let at = best.partition_point(|&(_, y)| y >= x);
            best.insert(at, (i, x));
            best.truncate(count);
        }
    }
    best
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// (max, ln Σ exp(x − max)) of a row: log p(x) = x − max − ln Σ. Beam search needs it for every row at every
/// step (5 × 50257 values for GPT-2 at beam 5), so the exponentials are [`exp_non_positive`], which the compiler
/// vectorizes, summed in f32 lanes per block of 1024 and the blocks in f64. Built twice: for x86-64's baseline (4
/// lanes) and for AVX2 (8 lanes), chosen at run time; both give the same bits (no fused multiply-adds in either).
fn log_sum_exp(v: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: this CPU has AVX2.
        return unsafe { log_sum_exp_avx2(v) };
    }
    log_sum_exp_any(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn log_sum_exp_avx2(v: &[f32]) -> (f32, f32) {
    log_sum_exp_any(v)
}

#[inline(always)]
fn log_sum_exp_any(v: &[f32]) -> (f32, f32) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0f64;
    for block in v.chunks(1024) {
        let mut lanes = [0f32; 8];
        let mut eights = block.chunks_exact(8);
        for e in &mut eights {
            for (lane, &x) in lanes.iter_mut().zip(e) {
                *lane += exp_non_positive(x - max);
            }
        }
        let rest: f32 = eights.remainder().iter().map(|&x| exp_non_positive(x - max)).sum();
        total += (lanes.iter().sum::<f32>() + rest) as f64;
    }
    (max, total.ln() as f32)
}

/// e^x for x ≤ 0 within 2 ulp (−∞ and anything below −87 give ~1e-38, nothing next to the row's max term, 1):
/// x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by its Taylor series to r⁷ (the next term is under 6e-9), 2^n in the
/// exponent bits. No branches and no library calls, so a loop over it runs several lanes at once.
#[inline(always)]
fn exp_non_positive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding and subtracting it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4; // ln 2 in two parts, so that n · LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    // n as an integer is in `shifted`'s low bits (`as i32` would be a saturating scalar conversion).
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    p * f32::from_bits(((n_int + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bans of ids past the scores (a config's end id, a suppressed id) and empty bad words or biased sequences do
    /// nothing; the others apply.
    #[test]
    fn out_of_range_and_empty_bans_are_ignored() {
        let s = Sampling { top_k: 0, ..Sampling::default() };
        let cfg = GenConfig {
            min_new: 1,
            eos: Some(10),
            more_eos: vec![99],
            suppress: vec![50],
            bad_words: vec![vec![], vec![7]],
            sequence_bias: vec![(vec![], 1.0), (vec![2], 1.0)],
            sampling: Some(s.clone()),
            ..GenConfig::default()
        };
        let ctx = RowContext { history: vec![1, 2], source: vec![120], input: 0 };
        let v = sampling_scores(&cfg, &s, 0, &ctx, &[0.0; 8]);
        assert_eq!(v, [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        let greedy = GenConfig { sampling: None, ..cfg };
        let banned = banned_tokens(&greedy, 0, &ctx.history, &ctx.source);
        let p = penalties(&greedy, &ctx, &[], 8, 0);
        assert_eq!(best_penalized(&[0.0; 8], 1, banned, p.as_ref(), |x| x), [(2, 1.0)]);
    }

    /// Sampling's warpers keep at least 1 token, beam sampling's 1 + the end-of-sequence ids (HF's
    /// min_tokens_to_keep; a slip once gave sampling beam sampling's floor).
    #[test]
    fn sampling_keeps_one_token_and_beam_sampling_one_per_end_more() {
        let s = Sampling { top_k: 1, ..Sampling::default() };
        let cfg = GenConfig { eos: Some(0), more_eos: vec![2], ..GenConfig::default() };
        let (ctx, row) = (RowContext::default(), [0.5f32, 3.0, 1.0, 2.0, -1.0]);
        let kept = |v: Vec<f32>| v.iter().filter(|x| x.is_finite()).count();
        assert_eq!(kept(sampling_scores(&cfg, &s, 0, &ctx, &row)), 1);
        let beam = GenConfig { beams: 2, sampling: Some(s), ..cfg };
        assert_eq!(kept(beam_step_scores(&beam, 0, &ctx, &[], &row)), 3);
    }

    /// Within 2 ulp of f64's exp over [−87, 0], exactly 1 at 0, and nothing above ~1e-38 below −87.
    #[test]
    fn the_vectorizable_exp_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let x = -87.0 * i as f32 / 2_000_000.0;
            let want = (x as f64).exp();
            let got = exp_non_positive(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst <= 2.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
        assert_eq!(exp_non_positive(0.0), 1.0);
        for x in [-88.0, -1e6, f32::NEG_INFINITY, f32::NAN] {
            assert!(exp_non_positive(x) < 1e-37, "{x}");
        }
    }

    /// log-sum-exp of GPT-2-sized rows (wide logits, -inf masked entries) within 1e-6 of the f64 value.
    #[test]
    fn log_sum_exp_matches_f64() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        for scale in [0.1f32, 3.0, 30.0] {
            let mut v: Vec<f32> = (0..50257).map(|_| (next() - 0.5) * 2.0 * scale).collect();
            v[17] = f32::NEG_INFINITY;
            let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let want = v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            let (max, got) = log_sum_exp(&v);
            assert_eq!((max, got), log_sum_exp_any(&v), "the AVX2 build gives the baseline's bits");
            assert_eq!(max as f64, m);
            assert!((got as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "scale {scale}: {got} vs {want}");
        }
    }

    /// The best `count` of a row are those a full sort (value descending, then index) puts first, with the banned
    /// index and NaN left out.
    #[test]
    fn best_tokens_equal_the_head_of_a_full_sort() {
        let v = [0.5, 2.0, f32::NAN, 2.0, -1.0, 7.0, 2.0, f32::NEG_INFINITY, 0.5, 7.0];
        for count in 1..=v.len() {
            for banned in [&[][..], &[5], &[3], &[9, 1]] {
                let mut want: Vec<(usize, f32)> =
                    v.iter().copied().enumerate().filter(|&(i, x)| !x.is_nan() && !banned.contains(&i)).collect();
                want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                want.truncate(count);
                assert_eq!(best_tokens(&v, count, banned), want, "count {count}, banned {banned:?}");
            }
        }
    }

    /// Every parent assignment of 4 rows (and lists shorter than the rows) gives what a copy of the old rows,
    /// gathered, gives.
    #[test]
    fn reorder_rows_equals_a_gather_of_the_old_rows() {
        let (rows, per_row) = (4, 3);
        let old: Vec<u32> = (0..(rows * per_row) as u32).collect();
        for code in 0..4usize.pow(4) {
            for len in 1..=rows {
                let parents: Vec<usize> = (0..len).map(|i| code / 4usize.pow(i as u32) % 4).collect();
                let mut data = old.clone();
                reorder_rows(&mut data, &parents, rows, per_row);
                for i in 0..rows {
                    let s = parents.get(i).copied().unwrap_or(parents[0]);
                    assert_eq!(
                        &data[i * per_row..(i + 1) * per_row],
                        &old[s * per_row..(s + 1) * per_row],
                        "{parents:?}"
                    );
                }
            }
        }
    }
}
