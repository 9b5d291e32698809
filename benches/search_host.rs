//! The search's own work per generated token, without a model: greedy and beam search over a stand-in that
//! returns fixed GPT-2-sized logits (vocabulary 50257) at every step, as a decode graph's output would arrive.
//! On a GPU the model's step is ~1 ms, so this host work is a real share of the issue's ≤ 2 ms/token goal.
//!
//!     cargo bench --bench search_host
//!
//! Environment: PFX_BENCH_CASES (default `1x1,8x1,1x5,1x1s,1x5s,1x1p,1x5p`: batch x beams, then `s` for sampling with
//! temperature 0.7, HF's default top-k 50 and top-p 0.9 (with beams: beam sampling), `p` for repetition penalty 1.3
//! over a 32-token prompt),
//! PFX_BENCH_RUNS (7: the median is reported), PFX_BENCH_VOCAB (50257).

use std::time::Instant;

use anyhow::Result;
use pfx_runtime::search::{beam_groups, greedy, Decoding, GenConfig, RowContext, Sampling};

const NEW: usize = 64;

/// Rows whose logits are the same every step (a new copy each time, as a model's outputs are).
struct FixedLogits {
    logits: Vec<Vec<f32>>,
}

impl Decoding for FixedLogits {
    fn step(&mut self, _tokens: &[i64], _n: usize) -> Result<Vec<Vec<f32>>> {
        Ok(self.logits.clone())
    }
    fn reorder(&mut self, _parents: &[usize]) -> Result<()> {
        Ok(())
    }
}

fn env(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return Ok(());
    }
    let runs: usize = env("PFX_BENCH_RUNS", "7").parse()?;
    let vocab: usize = env("PFX_BENCH_VOCAB", "50257").parse()?;
    println!("search_host: vocabulary {vocab}, {NEW} new tokens, median of {runs}");
    println!("| batch | beams | settings | ms per token (search only) |");
    println!("|---|---|---|---|");
    for case in env("PFX_BENCH_CASES", "1x1,8x1,1x5,1x1s,1x5s,1x1p,1x5p").split(',') {
        let (settings, case) = match case.strip_suffix('s') {
            Some(c) => ("sampling", c),
            None => case.strip_suffix('p').map_or(("", case), |c| ("repetition penalty", c)),
        };
        let (b, k) = case.split_once('x').ok_or_else(|| anyhow::anyhow!("'{case}' is not BxK[s|p]"))?;
        let (b, k): (usize, usize) = (b.parse()?, k.parse()?);
        // Logits shaped like a language model's: a few large values over a wide, low background.
        let mut seed = 1u64;
        let logits: Vec<Vec<f32>> = (0..b * k)
            .map(|_| {
                (0..vocab)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let u = (seed >> 40) as f32 / (1u64 << 24) as f32;
                        -10.0 * u.powi(4) * 3.0
                    })
                    .collect()
            })
            .collect();
        let mut cfg = GenConfig { max_new: NEW, min_new: NEW, beams: k, eos: Some(0), pad: 0, ..GenConfig::default() };
        let mut history = vec![0];
        match settings {
            "sampling" => {
                cfg.sampling = Some(Sampling { temperature: 0.7, top_p: 0.9, seed: 1, ..Sampling::default() })
            }
            "repetition penalty" => {
                cfg.repetition_penalty = 1.3;
                history = (0..32).map(|i| i * 997 % vocab as i64).collect();
            }
            _ => {}
        }
        let mut times = Vec::new();
        for run in 0..=runs {
            let mut model = FixedLogits { logits: logits.clone() };
            let start = Instant::now();
            // One start token per row (an encoder-decoder's history), or a prompt for the penalty: no n-gram bans.
            let contexts = vec![RowContext { history: history.clone(), ..Default::default() }; b];
            if k > 1 {
                beam_groups(&mut model, logits.clone(), &contexts, &cfg)?;
            } else {
                greedy(&mut model, logits.clone(), b, &cfg, contexts)?;
            }
            if run > 0 {
                times.push(start.elapsed().as_secs_f64()); // run 0 warms up
            }
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!("| {b} | {k} | {settings} | {:.3} |", times[times.len() / 2] / NEW as f64 * 1e3);
    }
    Ok(())
}
