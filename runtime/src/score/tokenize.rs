//! Tokenizers and n-gram counting shared by the metrics.
//!
//! - [`split_py`]: Python's `str.split()` (what sacrebleu's `tokenize='none'`, NLTK and coco-caption do
//!   with already tokenized text).
//! - [`tokenize_13a`]: sacrebleu's default `13a` tokenizer (mteval-v13a's normalisation, without its
//!   lowercasing).
//! - [`rouge_tokens`]: rouge-score's default tokenizer (lowercase, non-alphanumerics become spaces).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A small non-cryptographic hasher (rotate, xor, multiply per 8-byte word, as rustc's "Fx" hash):
/// n-gram tables are hashed a lot and never see adversarial input.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl FastHasher {
    const K: u64 = 0x517c_c1b7_2722_0a95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
/// A `HashSet` with [`FastHasher`].
pub type FastSet<K> = HashSet<K, BuildHasherDefault<FastHasher>>;

/// `str.isspace()` of Python: Unicode White_Space plus the ASCII separators U+001C..U+001F.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split()` with no argument: runs of whitespace separate, no empty tokens.
pub fn split_py(s: &str) -> Vec<String> {
    s.split(is_py_space).filter(|t| !t.is_empty()).map(str::to_owned).collect()
}

/// Characters that 13a puts spaces around: the class `[\{-\~\[-\` -\&\(-\+\:-\@\/]`, i.e. `{|}~`,
/// ``[\]^_` ``, space and `!"#$%&`, `()*+`, `:;<=>?@` and `/` (not `'`, `-`, `,` or `.`).
fn is_13a_punct(c: char) -> bool {
    matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/')
}

/// One `re.sub` pass of a pattern that matches exactly two characters: scan left to right, and where
/// `hit(a, b)` holds replace the pair by `repl(a, b)` and continue after it (matches do not overlap).
fn sub_pairs(s: &[char], hit: impl Fn(char, char) -> bool, repl: impl Fn(char, char, &mut Vec<char>)) -> Vec<char> {
    let mut out = Vec::with_capacity(s.len() + 8);
    let mut i = 0;
    while i < s.len() {
        if i + 1 < s.len() && hit(s[i], s[i + 1]) {
            repl(s[i], s[i + 1], &mut out);
            i += 2;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// sacrebleu's `13a` tokenizer (`Tokenizer13a`), returning the tokens. Steps, in sacrebleu's order:
/// drop `<skipped>`, join `-\n` line breaks, newlines to spaces, unescape `&quot; &amp; &lt; &gt;`, then
/// on ` {line} `: space out `{|}~[\]^_`, the backtick and `!"#$%&()*+:;<=>?@/`; split `.`/`,` from a
/// preceding non-digit (`\1 \2 `); split `.`/`,` from a following non-digit (` \1 \2`); split `-` after a digit
/// (`\1 \2 `); finally split on whitespace.
pub fn tokenize_13a(line: &str) -> Vec<String> {
    let mut line = line.replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if line.contains('&') {
        line = line.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    let mut s: Vec<char> = Vec::with_capacity(line.len() + 16);
    s.push(' ');
    for c in line.chars() {
        if is_13a_punct(c) {
            s.extend([' ', c, ' ']);
        } else {
            s.push(c);
        }
    }
    s.push(' ');
    let digit = |c: char| c.is_ascii_digit();
    let period_comma = |c: char| c == '.' || c == ',';
    let s = sub_pairs(&s, |a, b| !digit(a) && period_comma(b), |a, b, o| o.extend([a, ' ', b, ' ']));
    let s = sub_pairs(&s, |a, b| period_comma(a) && !digit(b), |a, b, o| o.extend([' ', a, ' ', b]));
    let s = sub_pairs(&s, |a, b| digit(a) && b == '-', |a, b, o| o.extend([a, ' ', b, ' ']));
    split_py(&s.into_iter().collect::<String>())
}

/// rouge-score's `tokenize.tokenize` without stemming: lowercase, every run of characters outside
/// `[a-z0-9]` becomes a separator, tokens are the remaining runs.
pub fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Counts of every n-gram of order `min_n..=max_n` in `tokens`, keyed by the token slice.
pub fn ngram_counts(tokens: &[String], min_n: usize, max_n: usize) -> FastMap<&[String], usize> {
    let mut counts = FastMap::default();
    for n in min_n..=max_n {
        for w in tokens.windows(n) {
            *counts.entry(w).or_insert(0) += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(s: &str) -> String {
        tokenize_13a(s).join(" ")
    }

    #[test]
    fn thirteen_a_matches_sacrebleu_examples() {
        // Expected strings are what sacrebleu 2.6's Tokenizer13a prints for these inputs.
        assert_eq!(tok("Hello, world. It's 3.5 -- ok?"), "Hello , world . It's 3.5 -- ok ?");
        assert_eq!(tok("prices £20-25, (cheap)!"), "prices £20 - 25 , ( cheap ) !");
        assert_eq!(tok("a..b 1,000 x.y"), "a . . b 1,000 x . y");
        assert_eq!(tok("&quot;q&quot; &amp; <skipped>end"), "\" q \" & end");
    }

    #[test]
    fn rouge_tokenizer() {
        assert_eq!(rouge_tokens("The Café's £20-25 price!"), ["the", "caf", "s", "20", "25", "price"]);
    }
}
