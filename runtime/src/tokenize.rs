//! Tokenization: a thin wrapper over the Hugging Face `tokenizers` crate (0.23.x) reading a
//! `tokenizer.json`.
//!
//! pfx only needs a few things from a tokenizer, and needs them without surprises:
//! - [`Tokenizer::encode`] never adds special tokens (BOS/EOS are written into the text by
//!   [`crate::data::TableToText`], where the format says they go), and never truncates or pads, even if the
//!   file asks for it; [`Tokenizer::encode_as_text_start`] adds those the file's post-processor adds (Llama's
//!   and OPT's BOS), as Hugging Face's `tokenizer(text)` does;
//! - [`Tokenizer::decode`] skips special tokens and rejects ids outside the vocabulary instead of dropping
//!   them silently; [`Tokenizer::decode_generated`] drops them as Hugging Face's decode does, and counts them
//!   (a model may have more embedding rows than its tokenizer has ids: Qwen2.5, Phi-3);
//! - GPT-2's `<|endoftext|>` is both BOS and EOS ([`Tokenizer::eos_id`], [`Tokenizer::bos_id`]).
//!
//! The crate is built with `default-features = false, features = ["fancy-regex"]`: fancy-regex (pure Rust)
//! runs the GPT-2 pre-tokenizer regex, so neither Oniguruma (a C build) nor hf-hub (network) is linked.
//!
//! A GPT-2 tokenizer.json is committed at `graphs/tokenizers/gpt2/tokenizer.json`, built from the original
//! `encoder.json` + `vocab.bpe` by `graphs/tokenizers/make_gpt2_tokenizer.py`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// GPT-2's only special token, used as BOS, EOS and padding by the table-to-text format.
pub const GPT2_EOS: &str = "<|endoftext|>";

/// How to get a tokenizer that has `<|endoftext|>`.
const EOS_HINT: &str = "pfx formats table-to-text examples the GPT-2 way, with `<|endoftext|>` as BOS and EOS; \
     use the GPT-2 tokenizer.json the model was trained with (GPT-2 and GPT-Neo models), e.g. \
     graphs/tokenizers/gpt2/tokenizer.json (rebuilt by graphs/tokenizers/make_gpt2_tokenizer.py from encoder.json \
     + vocab.bpe)";

/// A `tokenizer.json` loaded for encoding and decoding. See the module docs for the guarantees.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it was loaded from, for error messages.
    origin: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("origin", &self.origin).field("vocab_size", &self.vocab_size()).finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json` (or the one in the given folder).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let given = path.as_ref();
        let inside = given.join("tokenizer.json");
        let path = if given.is_dir() { inside.as_path() } else { given };
        if given.is_dir() && !path.is_file() {
            bail!(
                "{} is a folder without a tokenizer.json: pass a Hugging Face tokenizer.json (GPT-2's vocab.json + \
                 merges.txt become one with `tokenizers`' `Tokenizer.save`)",
                given.display()
            );
        }
        let bytes = std::fs::read(path).with_context(|| format!("cannot read tokenizer file {}", path.display()))?;
        Self::from_bytes(&bytes, path)
    }

    /// Loads a `tokenizer.json` already in memory; `origin` names it in error messages.
    pub fn from_bytes(json: &[u8], origin: impl AsRef<Path>) -> Result<Self> {
        let origin = origin.as_ref().to_path_buf();
        let mut inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| {
            anyhow!(
                "{} is not a tokenizer.json that tokenizers 0.23 can read: {e} \
                 (expected a Hugging Face `tokenizer.json`, not vocab.json/merges.txt/tokenizer_config.json)",
                origin.display()
            )
        })?;
        // Lengths are pfx's business (data::TableToText pads and truncates itself, with labels).
        inner.with_truncation(None).map_err(|e| anyhow!("{}: cannot disable truncation: {e}", origin.display()))?;
        inner.with_padding(None);
        Ok(Self { inner, origin })
    }

    /// Where this tokenizer was loaded from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Token ids of `text`, with no special tokens added. Special tokens written in the text (e.g.
    /// `<|endoftext|>`) are recognized as single tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer {} cannot encode {:?}: {e}", self.origin.display(), preview(text)))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` with the special tokens the tokenizer's post-processor adds around one sequence
    /// (Llama's `<s>` before it, OPT's `</s>`; none for GPT-2), as Hugging Face's `tokenizer(text)` gives them.
    pub fn encode_as_text_start(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow!("tokenizer {} cannot encode {:?}: {e}", self.origin.display(), preview(text)))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The special tokens the post-processor puts before and after a text (Llama's `[<s>]` and `[]`; with
    /// `add_eos_token`, `[<s>]` and `[</s>]`), read off the encoding of one word.
    pub fn text_specials(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        let encoding = self
            .inner
            .encode("x", true)
            .map_err(|e| anyhow!("tokenizer {} cannot encode \"x\": {e}", self.origin.display()))?;
        let (ids, special) = (encoding.get_ids(), encoding.get_special_tokens_mask());
        let lead = special.iter().take_while(|&&m| m == 1).count();
        let trail = special[lead..].iter().rev().take_while(|&&m| m == 1).count();
        Ok((ids[..lead].to_vec(), ids[ids.len() - trail..].to_vec()))
    }

    /// The text of `ids`, skipping special tokens. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let size = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= size || self.inner.id_to_token(id).is_none()) {
            bail!("token id {bad} is not in the vocabulary of {} (size {size})", self.origin.display());
        }
        self.inner.decode(ids, true).map_err(|e| anyhow!("tokenizer {} cannot decode: {e}", self.origin.display()))
    }

    /// The text of generated `ids`, as Hugging Face's `decode(ids, skip_special_tokens=True)` gives it: ids with
    /// no token (the model's rows past the tokenizer's ids) are left out. Also returns how many were.
    pub fn decode_generated(&self, ids: &[u32]) -> Result<(String, usize)> {
        let known: Vec<u32> = ids.iter().copied().filter(|&id| self.inner.id_to_token(id).is_some()).collect();
        let text = self.decode(&known)?;
        Ok((text, ids.len() - known.len()))
    }

    /// The text of `ids` with special tokens written out (as HF's stop strings read a sequence's tokens); ids with no
    /// token are left out.
    pub fn decode_with_specials(&self, ids: &[u32]) -> Result<String> {
        let known: Vec<u32> = ids.iter().copied().filter(|&id| self.inner.id_to_token(id).is_some()).collect();
        self.inner.decode(&known, false).map_err(|e| anyhow!("tokenizer {} cannot decode: {e}", self.origin.display()))
    }

    /// The id of one token (as written in the vocabulary, e.g. `"Ġthe"`, or an added token such as
    /// `"<|endoftext|>"`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token of one id, as written in the vocabulary.
    pub fn id_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included (50257 for GPT-2).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// One past the largest id this tokenizer can produce (added tokens may sit past the vocabulary's size).
    pub fn id_bound(&self) -> usize {
        self.inner.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1)
    }

    /// The end-of-text id: GPT-2's `<|endoftext|>` (50256).
    pub fn eos_id(&self) -> Result<u32> {
        self.token_id(GPT2_EOS)
            .ok_or_else(|| anyhow!("tokenizer {} has no `{GPT2_EOS}` token: {EOS_HINT}", self.origin.display()))
    }

    /// The beginning-of-text id: the same `<|endoftext|>` as [`Tokenizer::eos_id`] (GPT-2 has one special
    /// token).
    pub fn bos_id(&self) -> Result<u32> {
        self.eos_id()
    }

    /// The wrapped `tokenizers` object, for anything not covered here.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// The start of a long text, for error messages.
fn preview(text: &str) -> String {
    const MAX: usize = 60;
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_stands_for_its_tokenizer_json() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/e2e-small/tokenizer.json");
        let dir = std::env::temp_dir().join(format!("pfx-tokenizer-folder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Tokenizer::from_file(&dir).unwrap_err().to_string();
        assert!(e.contains("folder without a tokenizer.json"), "{e}");
        std::fs::copy(&shipped, dir.join("tokenizer.json")).unwrap();
        let t = Tokenizer::from_file(&dir).unwrap();
        assert_eq!(t.vocab_size(), Tokenizer::from_file(&shipped).unwrap().vocab_size());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
