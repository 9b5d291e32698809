//! Source/target rows for encoder-decoder bundles (BART's layout), in Hugging Face's fine-tuning convention: the
//! source is the text as the model's tokenizer frames it (`<s> source </s>` for BART, `source </s>` for Marian and
//! Pegasus) right-padded to S, the labels the target framed the same way and padded with -100 to T (the decoder's
//! inputs are derived from them inside the graph, shifted right behind the decoder start token).

use anyhow::{anyhow, bail, Result};

use crate::data::{Dataset, EncodeReport, Encoded, Overlong, IGNORE_INDEX};
use crate::tokenize::Tokenizer;

pub struct SourceTarget<'t> {
    tok: &'t Tokenizer,
    /// `<s>` before every text (BART), or nothing (Marian, Pegasus).
    bos: Option<u32>,
    eos: u32,
    pad: i64,
}

impl<'t> SourceTarget<'t> {
    /// `pad` comes from the bundle (the export's config), `model_type` from its manifest (BART when it has none);
    /// `<s>` and `</s>` from the tokenizer.
    pub fn new(tok: &'t Tokenizer, pad: i64, model_type: Option<&str>) -> Result<Self> {
        let id = |t: &str, frame: &str| {
            tok.token_id(t)
                .ok_or_else(|| anyhow!("tokenizer {} has no `{t}` token, which {frame}", tok.origin().display()))
        };
        Ok(match model_type.unwrap_or("bart") {
            "bart" => {
                let frame = "BART's format puts around every text (`<s> text </s>`)";
                SourceTarget { tok, bos: Some(id("<s>", frame)?), eos: id("</s>", frame)?, pad }
            }
            other => {
                let frame = format!("{other}'s format puts after every text (`text </s>`)");
                SourceTarget { tok, bos: None, eos: id("</s>", &frame)?, pad }
            }
        })
    }

    pub fn eos_id(&self) -> i64 {
        self.eos as i64
    }

    pub fn pad_id(&self) -> i64 {
        self.pad
    }

    /// `<s> text </s>` (BART) or `text </s>` without the tokenizer's own post-processing (so any tokenizer.json
    /// gives the same ids).
    fn wrap(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.tok.encode(text.trim())?);
        ids.push(self.eos);
        Ok(ids)
    }

    /// The source ids, cut to `max_len` (keeping the final `</s>`) when longer. Returns whether it was cut.
    pub fn encode_source(&self, source: &str, max_len: usize) -> Result<(Vec<i64>, bool)> {
        Ok(self.cut_keeping_eos(&self.wrap(source)?, max_len))
    }

    /// A wrapped sequence cut to `max_len` keeping its final `</s>`, as HF tokenizers truncate (sources and
    /// targets alike: a target cut without it would teach the model never to stop).
    fn cut_keeping_eos(&self, wrapped: &[u32], max_len: usize) -> (Vec<i64>, bool) {
        let mut ids: Vec<i64> = wrapped.iter().map(|&t| t as i64).collect();
        let cut = ids.len() > max_len;
        if cut {
            ids.truncate(max_len.max(1) - 1);
            ids.push(self.eos as i64);
        }
        (ids, cut)
    }

    /// One row of a wrapped source and target: source [S] with its mask, labels [T]; `None` when too long under
    /// `Skip` (the second value says whether either side was cut).
    fn row(&self, source: &[u32], target: &[u32], s: usize, t: usize, overlong: Overlong) -> Option<(Encoded, bool)> {
        let (src, src_cut) = self.cut_keeping_eos(source, s);
        let (tgt, tgt_cut) = self.cut_keeping_eos(target, t);
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
            let (source, target) = (self.wrap(&ex.source)?, self.wrap(&ex.target)?);
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
