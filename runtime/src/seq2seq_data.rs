//! Source/target rows for encoder-decoder bundles (BART's layout), in Hugging Face's fine-tuning convention: the
//! source is the text as the model's tokenizer frames it (`<s> source </s>` for BART; `source </s>` for Marian,
//! Pegasus and BlenderBot; `source` for BlenderBot-small; `source </s> en_XX` for mBART-cc25, `en_XX source </s>` for
//! mBART-50, `eng_Latn source </s>` for NLLB and M2M100) right-padded to S, the labels the target framed the same
//! way (with the target's language) and padded with -100 to T (the decoder's inputs are derived from them inside the
//! graph, shifted right behind the decoder start token).

use anyhow::{anyhow, bail, Result};
use pfx_compiler::compile::bart::{nllb_legacy_behaviour, Languages};

use crate::data::{Dataset, EncodeReport, Encoded, Overlong, IGNORE_INDEX};
use crate::tokenize::Tokenizer;

/// The special tokens a tokenizer puts around one side's text.
#[derive(Clone, Debug)]
struct Frame {
    head: Vec<u32>,
    tail: Vec<u32>,
}

impl Frame {
    fn wrap(&self, text: Vec<u32>) -> Vec<u32> {
        [&self.head[..], &text, &self.tail].concat()
    }

    /// A wrapped sequence cut to `max_len` keeping its specials (the text is cut), as HF tokenizers truncate
    /// (sources and targets alike: a target cut without its `</s>` would teach the model never to stop).
    fn cut(&self, wrapped: &[u32], max_len: usize) -> (Vec<i64>, bool) {
        let cut = wrapped.len() > max_len;
        let kept: Vec<u32> = if !cut {
            wrapped.to_vec()
        } else if let Some(room) = max_len.checked_sub(self.head.len() + self.tail.len()) {
            let text = &wrapped[self.head.len()..wrapped.len() - self.tail.len()];
            self.wrap(text[..room].to_vec())
        } else {
            // No room for the specials themselves (a length of 1 or 2): the last ones, as before.
            wrapped[wrapped.len() - max_len..].to_vec()
        };
        (kept.into_iter().map(|t| t as i64).collect(), cut)
    }
}

/// An M2M100/NLLB language code's token: M2M100's `__en__` for `en` (its tokenizer's `src_lang="en"` names it so;
/// looked up first, as `en` alone may be an ordinary piece), else the code as written (NLLB's `eng_Latn`, `__en__`).
fn m2m100_code(tok: &Tokenizer, code: &str) -> Option<u32> {
    tok.token_id(&format!("__{code}__")).or_else(|| tok.token_id(code))
}

pub struct SourceTarget<'t> {
    tok: &'t Tokenizer,
    source: Frame,
    target: Frame,
    eos: u32,
    pad: i64,
    /// The first decoder token generation starts with instead of the config's (mBART-cc25: the target language).
    start: Option<i64>,
    /// The first new token generation forces (mBART-50, NLLB, M2M100: the target language, after the start token
    /// `</s>`).
    forced_bos: Option<i64>,
}

impl<'t> SourceTarget<'t> {
    /// `pad` comes from the bundle (the export's config), `model_type` from its manifest (BART when it has none),
    /// `languages` from its "bart" section (mBART's, M2M100's and NLLB's); `<s>`, `</s>` and the language codes from
    /// the tokenizer.
    pub fn new(tok: &'t Tokenizer, pad: i64, model_type: Option<&str>, languages: Option<&Languages>) -> Result<Self> {
        let id = |t: &str, frame: &str| {
            tok.token_id(t)
                .ok_or_else(|| anyhow!("tokenizer {} has no `{t}` token, which {frame}", tok.origin().display()))
        };
        let same = |f: Frame| (f.clone(), f);
        let (frames, eos, start, forced_bos) = match model_type.unwrap_or("bart") {
            "bart" => {
                let frame = "BART's format puts around every text (`<s> text </s>`)";
                let eos = id("</s>", frame)?;
                (same(Frame { head: vec![id("<s>", frame)?], tail: vec![eos] }), eos, None, None)
            }
            "mbart" => {
                let Some(l) = languages else {
                    bail!(
                        "this mBART bundle was compiled without --src-lang/--tgt-lang: its tokenizer frames every \
                         text with a language code, and generation starts with the target's. Compile it again with \
                         them (e.g. --src-lang en_XX --tgt-lang ro_RO); token-level data needs none"
                    )
                };
                let eos = id("</s>", "mBART's format puts after every text")?;
                let code = |c: &str, flag: &str| id(c, &format!("the bundle's {flag} names"));
                let (src, tgt) = (code(&l.source, "--src-lang")?, code(&l.target, "--tgt-lang")?);
                // mBART-50's tokenizer puts the code first (`en_XX text </s>`), cc25's last (`text </s> en_XX`).
                let (lead, _) = tok.text_specials()?;
                let around = |head: Vec<u32>, tail: Vec<u32>| Frame { head, tail };
                if lead.is_empty() {
                    let frames = (around(vec![], vec![eos, src]), around(vec![], vec![eos, tgt]));
                    (frames, eos, Some(tgt as i64), None)
                } else {
                    let frames = (around(vec![src], vec![eos]), around(vec![tgt], vec![eos]));
                    (frames, eos, None, Some(tgt as i64))
                }
            }
            "m2m_100" => {
                let Some(l) = languages else {
                    bail!(
                        "this M2M100/NLLB bundle was compiled without --src-lang/--tgt-lang: its tokenizer frames \
                         every text with a language code, and generation forces the target's first. Compile it again \
                         with them (e.g. --src-lang eng_Latn --tgt-lang fra_Latn for NLLB, --src-lang en --tgt-lang \
                         fr for M2M100); token-level data needs none"
                    )
                };
                let eos = id("</s>", "M2M100's and NLLB's format puts after every text")?;
                let code = |c: &str, flag: &str| {
                    m2m100_code(tok, c).ok_or_else(|| {
                        anyhow!(
                            "tokenizer {} has no `{c}` token (nor `__{c}__`), which the bundle's {flag} names",
                            tok.origin().display()
                        )
                    })
                };
                let (src, tgt) = (code(&l.source, "--src-lang")?, code(&l.target, "--tgt-lang")?);
                // NLLB puts the code first (`eng_Latn text </s>`), or last (`text </s> eng_Latn`) with
                // legacy_behaviour: HF goes by the tokenizer_config.json beside the tokenizer.json when there is one,
                // else the tokenizer.json's post-processor tells (as HF saves it). M2M100's own tokenizer (slow only)
                // puts it first, as does any tokenizer.json without that post-processor.
                let (lead, trail) = tok.text_specials()?;
                let config = match tok.origin().parent() {
                    Some(dir) => nllb_legacy_behaviour(dir)?,
                    None => None,
                };
                // A tokenizer_config.json beside the tokenizer in use decides, else the export's (recorded at
                // compile), else the post-processor.
                let legacy = config.or(l.nllb_legacy).unwrap_or(lead.is_empty() && trail.len() == 2 && trail[0] == eos);
                let around = |head: Vec<u32>, tail: Vec<u32>| Frame { head, tail };
                let frames = if legacy {
                    (around(vec![], vec![eos, src]), around(vec![], vec![eos, tgt]))
                } else {
                    (around(vec![src], vec![eos]), around(vec![tgt], vec![eos]))
                };
                // Either way HF's recipe starts the decoder with the config's `</s>` and forces the target
                // language (`generate(forced_bos_token_id=...)`).
                (frames, eos, None, Some(tgt as i64))
            }
            "blenderbot-small" => {
                // Its tokenizer adds nothing around a text (HF's BlenderbotSmallTokenizer): targets carry no end
                // token, as in HF's fine-tuning; generation still stops at `__end__`.
                let eos = id("__end__", "BlenderBot-small's generation stops at")?;
                (same(Frame { head: vec![], tail: vec![] }), eos, None, None)
            }
            other => {
                let eos = id("</s>", &format!("{other}'s format puts after every text (`text </s>`)"))?;
                (same(Frame { head: vec![], tail: vec![eos] }), eos, None, None)
            }
        };
        Ok(SourceTarget { tok, source: frames.0, target: frames.1, eos, pad, start, forced_bos })
    }

    pub fn eos_id(&self) -> i64 {
        self.eos as i64
    }

    pub fn pad_id(&self) -> i64 {
        self.pad
    }

    /// The decoder start token generation uses in place of the config's, if any (mBART-cc25's target language, as
    /// its users pass `generate(decoder_start_token_id=...)`).
    pub fn decoder_start(&self) -> Option<i64> {
        self.start
    }

    /// The first new token generation forces, if any (the target language of mBART-50, NLLB and M2M100, as
    /// `forced_bos_token_id`).
    pub fn forced_bos(&self) -> Option<i64> {
        self.forced_bos
    }

    /// The framed ids of one side, without the tokenizer's own post-processing (so any tokenizer.json gives the
    /// same ids).
    fn wrap(&self, frame: &Frame, text: &str) -> Result<Vec<u32>> {
        Ok(frame.wrap(self.tok.encode(text.trim())?))
    }

    /// The source ids, cut to `max_len` (keeping its specials) when longer. Returns whether it was cut.
    pub fn encode_source(&self, source: &str, max_len: usize) -> Result<(Vec<i64>, bool)> {
        Ok(self.source.cut(&self.wrap(&self.source, source)?, max_len))
    }

    /// One row of a wrapped source and target: source [S] with its mask, labels [T]; `None` when too long under
    /// `Skip` (the second value says whether either side was cut).
    fn row(&self, source: &[u32], target: &[u32], s: usize, t: usize, overlong: Overlong) -> Option<(Encoded, bool)> {
        let (src, src_cut) = self.source.cut(source, s);
        let (tgt, tgt_cut) = self.target.cut(target, t);
        let cut = src_cut || tgt_cut;
        if cut && overlong == Overlong::Skip {
            return None;
        }
        let mut input_ids = src.clone();
        input_ids.resize(s, self.pad);
        let mut attention_mask = vec![1i64; src.len()];
        attention_mask.resize(s, 0);
        let mut labels = tgt;
        labels.resize(t, IGNORE_INDEX);
        Some((Encoded { input_ids, attention_mask, labels }, cut))
    }

    /// Rows for every example that fits. Errors if none does.
    pub fn encode_dataset(
        &self,
        data: &Dataset,
        s: usize,
        t: usize,
        overlong: Overlong,
    ) -> Result<(Vec<Encoded>, EncodeReport)> {
        let mut rows = Vec::new();
        let mut report = EncodeReport { bad_lines: data.bad_lines.len(), ..EncodeReport::default() };
        for ex in &data.examples {
            // Each side tokenized once: its length for the report, then the row.
            let (source, target) = (self.wrap(&self.source, &ex.source)?, self.wrap(&self.target, &ex.target)?);
            report.longest = report.longest.max(source.len());
            report.longest_target = report.longest_target.max(target.len());
            report.record(self.row(&source, &target, s, t, overlong), &ex.origin, &mut rows);
        }
        if rows.is_empty() && !data.examples.is_empty() {
            bail!(
                "no example fits in source {s} / target {t} tokens (the longest source has {}, the longest target \
                 {}): compile with larger --src-len/--tgt-len, or pass --overlong truncate",
                report.longest,
                report.longest_target
            );
        }
        Ok((rows, report))
    }
}
