//! The training loop over a bundle's `train_step` graph: shuffled batches, HF's linear schedule with warmup,
//! dev loss per epoch, metrics log, loss curve, atomic checkpoints, exact resume, Ctrl-C that saves.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendKind, StatefulStep};
use crate::bundle::Bundle;
use crate::data::{batches, Encoded};
use crate::fingerprint::{file_sample, fnv1a};
use crate::ort_backend::OrtOptions;
use crate::tensor::{safetensors_from_bytes, safetensors_to_bytes, HostTensor};

#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub epochs: usize,
    pub lr: f32,
    pub warmup_steps: usize,
    pub seed: u64,
    /// Checkpoint every N optimizer steps (0: only at the end).
    pub checkpoint_every: usize,
    pub out_dir: PathBuf,
    /// Stop after this many steps in this run (tests, quick looks).
    pub max_steps: Option<usize>,
    pub progress: bool,
    /// Shuffle each epoch (seeded); false keeps the file order (reference comparisons).
    pub shuffle: bool,
}

/// Where training stands; saved in checkpoints.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Position {
    /// Optimizer steps done.
    pub step: u64,
    pub epoch: u64,
    /// Batches of `epoch` done.
    pub batch_in_epoch: u64,
    pub seed: u64,
    pub total_steps: u64,
    /// What the run was started with; a resumed run must match it (absent in checkpoints before it existed).
    #[serde(default)]
    pub settings: Option<RunSettings>,
    /// The lowest dev loss so far and the epoch it was reached after: its prefix is in `best.safetensors`.
    #[serde(default)]
    pub best_dev: Option<(f64, u64)>,
}

/// The settings that decide a run's batches and schedule: resuming with others would silently train another run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunSettings {
    pub lr: f32,
    pub epochs: usize,
    pub warmup_steps: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// The bundle's batch size (another bundle's checkpoint can have the same tensors).
    pub batch: usize,
    /// Training rows after encoding (another data file almost always has another count).
    pub train_rows: usize,
    /// Fingerprints (FNV-1a) of the encoded training rows and of the bundle's training setup, for the other
    /// file of the same length and the other bundle with tensors of the same names (absent in older checkpoints:
    /// then not compared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_fingerprint: Option<String>,
}

impl RunSettings {
    /// Whether a run with `self` continues one started with `before`; fingerprints count when both have them.
    fn continues(&self, before: &RunSettings) -> bool {
        let same = |a: &Option<String>, b: &Option<String>| a.is_none() || b.is_none() || a == b;
        let plain = |s: &RunSettings| RunSettings { data_fingerprint: None, bundle_fingerprint: None, ..s.clone() };
        plain(self) == plain(before)
            && same(&self.data_fingerprint, &before.data_fingerprint)
            && same(&self.bundle_fingerprint, &before.bundle_fingerprint)
    }

    /// What besides the printed settings differs from `before`.
    fn hidden_differences(&self, before: &RunSettings) -> String {
        let differs = |a: &Option<String>, b: &Option<String>| a.is_some() && b.is_some() && a != b;
        let mut what = Vec::new();
        if differs(&self.data_fingerprint, &before.data_fingerprint) {
            what.push("the training rows differ");
        }
        if differs(&self.bundle_fingerprint, &before.bundle_fingerprint) {
            what.push("the bundle differs");
        }
        if what.is_empty() {
            String::new()
        } else {
            format!(" ({})", what.join("; "))
        }
    }
}

/// The training rows as encoded (tokens, mask and labels).
fn data_fingerprint(data: &[Encoded]) -> String {
    fnv1a(data.iter().flat_map(|r| {
        [&r.input_ids, &r.attention_mask, &r.labels].into_iter().flat_map(|v| v.iter().flat_map(|x| x.to_le_bytes()))
    }))
}

/// What in a bundle decides the training run: the model's sizes, the prefix, the optimizer, the batch shape, the
/// weights' storage, BART's settings (lengths, layout, label smoothing) and the frozen weights themselves, by
/// samples (not paths or the compiler's version: a bundle compiled again is the same bundle).
fn bundle_fingerprint(bundle: &Bundle) -> Result<String> {
    let m = &bundle.manifest;
    let bart = pfx_compiler::compile::bart::read_bart_spec(&bundle.dir)?;
    let id = serde_json::json!({
        "family": m.family, "injection": m.injection, "batch": m.batch, "seq_len": m.seq_len,
        "prefix_len": m.prefix_len, "reparam": m.reparam, "mid_dim": m.mid_dim, "layers": m.layers,
        "heads": m.heads, "head_dim": m.head_dim, "hidden": m.hidden, "vocab": m.vocab,
        "optimizer": m.optimizer, "trainable": m.trainable, "weights_dtype": m.weights_dtype,
        "bart": bart.map(|b| serde_json::json!({
            "mode": b.mode, "src_len": b.src_len, "tgt_len": b.tgt_len, "label_smoothing": b.label_smoothing,
            "pad": b.pad_token_id, "decoder_start": b.decoder_start_token_id,
        })),
        "weights": file_sample(&bundle.dir.join(&m.weights_file))?,
    });
    Ok(fnv1a(id.to_string().into_bytes()))
}

impl std::fmt::Display for RunSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--lr {} --epochs {} --warmup-steps {} --seed {}{}, batch {}, {} training rows",
            self.lr,
            self.epochs,
            self.warmup_steps,
            self.seed,
            if self.shuffle { "" } else { " --no-shuffle" },
            self.batch,
            self.train_rows
        )
    }
}

#[derive(Clone, Debug, Serialize)]
struct StepLog {
    step: u64,
    epoch: u64,
    loss: f64,
    grad_norm: f64,
    lr: f64,
    tokens: usize,
    elapsed_s: f64,
}

pub struct Trainer {
    bundle: Bundle,
    /// The train_step graph; it holds the trainable tensors and Adam moments (`adam.m.*`, `adam.v.*`) between
    /// steps (on the device with ONNX Runtime).
    step_graph: Box<dyn StatefulStep>,
    eval_graph: Option<Box<dyn Backend>>,
    pub pos: Position,
    stop: Arc<AtomicBool>,
}

/// HF's `get_linear_schedule_with_warmup`: the factor applied at optimizer step `k` (0-based).
pub fn linear_schedule(k: u64, warmup: u64, total: u64) -> f64 {
    if k < warmup {
        return k as f64 / warmup.max(1) as f64;
    }
    ((total.saturating_sub(k)) as f64 / (total.saturating_sub(warmup)).max(1) as f64).max(0.0)
}

impl Trainer {
    pub fn new(
        bundle: Bundle,
        kind: BackendKind,
        ort: &OrtOptions,
        prefix: BTreeMap<String, HostTensor>,
        with_eval: bool,
        stop: Arc<AtomicBool>,
    ) -> Result<Trainer> {
        let mut step_graph = bundle.open_train_step(kind, ort)?;
        let eval_graph = if with_eval { Some(bundle.open_graph("eval_step", kind, ort)?) } else { None };
        let mut state = BTreeMap::new();
        for t in &bundle.manifest.trainable {
            let p = prefix.get(&t.name).with_context(|| format!("the prefix has no '{}'", t.name))?;
            state.insert(t.name.clone(), p.clone());
            let zeros = HostTensor::from_f32(t.shape.clone(), vec![0.0; t.shape.iter().product()])?;
            state.insert(format!("adam.m.{}", t.name), zeros.clone());
            state.insert(format!("adam.v.{}", t.name), zeros);
        }
        step_graph.set_state(&state)?;
        let pos =
            Position { step: 0, epoch: 0, batch_in_epoch: 0, seed: 0, total_steps: 0, settings: None, best_dev: None };
        Ok(Trainer { bundle, step_graph, eval_graph, pos, stop })
    }

    /// The trainable tensors (a host copy).
    pub fn prefix(&self) -> Result<BTreeMap<String, HostTensor>> {
        let mut state = self.step_graph.state()?;
        Ok(self.bundle.trainable_names().into_iter().filter_map(|n| state.remove_entry(&n)).collect())
    }

    /// Mean dev loss (weighted by each batch's number of labels).
    pub fn dev_loss(&mut self, dev: &[Encoded]) -> Result<Option<f64>> {
        if self.eval_graph.is_none() {
            return Ok(None);
        }
        let prefix = self.prefix()?;
        let Some(eval) = self.eval_graph.as_mut() else { return Ok(None) };
        mean_loss(&self.bundle, eval.as_mut(), &prefix, dev)
    }

    fn batch_of(bundle: &Bundle, rows: &[&Encoded]) -> Result<BTreeMap<String, HostTensor>> {
        // Source and labels may differ in length (BART's S and T).
        let b = bundle.manifest.batch;
        let (s, t) = (rows[0].input_ids.len(), rows[0].labels.len());
        let mut m = BTreeMap::new();
        let cat = |f: &dyn Fn(&Encoded) -> &Vec<i64>| -> Vec<i64> {
            rows.iter().flat_map(|r| f(r).iter().copied()).collect()
        };
        m.insert("input_ids".into(), HostTensor::from_i64(vec![b, s], cat(&|r| &r.input_ids))?);
        m.insert("attention_mask".into(), HostTensor::from_i64(vec![b, s], cat(&|r| &r.attention_mask))?);
        m.insert("labels".into(), HostTensor::from_i64(vec![b, t], cat(&|r| &r.labels))?);
        Ok(m)
    }

    /// Trains; returns the per-step losses of this run. Stops early (after saving) on Ctrl-C.
    pub fn train(&mut self, cfg: &TrainConfig, data: &[Encoded], dev: Option<&[Encoded]>) -> Result<Vec<f64>> {
        if data.is_empty() {
            bail!("no training rows");
        }
        let b = self.bundle.manifest.batch;
        let per_epoch = data.len().div_ceil(b) as u64;
        let total = per_epoch * cfg.epochs as u64;
        let settings = RunSettings {
            lr: cfg.lr,
            epochs: cfg.epochs,
            warmup_steps: cfg.warmup_steps,
            seed: cfg.seed,
            shuffle: cfg.shuffle,
            batch: b,
            train_rows: data.len(),
            data_fingerprint: Some(data_fingerprint(data)),
            bundle_fingerprint: Some(bundle_fingerprint(&self.bundle)?),
        };
        let resumed = self.pos.step > 0;
        if let Some(before) = self.pos.settings.as_ref().filter(|s| resumed && !settings.continues(s)) {
            let shown = before.to_string() != settings.to_string();
            let what = if shown {
                format!("was made with {before}; this run has {settings}{}", settings.hidden_differences(before))
            } else {
                format!("was made with the same settings{}", settings.hidden_differences(before))
            };
            bail!(
                "the checkpoint in {} {what}: resume with the same data, bundle and settings, or train into another \
                 --output",
                cfg.out_dir.display()
            );
        }
        if resumed && self.pos.step >= total {
            eprintln!(
                "the run in {} is finished ({} of {total} steps): nothing to do",
                cfg.out_dir.display(),
                self.pos.step
            );
            return Ok(Vec::new());
        }
        self.pos.seed = cfg.seed;
        self.pos.total_steps = total;
        self.pos.settings = Some(settings);
        std::fs::create_dir_all(&cfg.out_dir).with_context(|| format!("cannot create {}", cfg.out_dir.display()))?;
        let metrics_path = cfg.out_dir.join("metrics.jsonl");
        // A resumed run's log continues the counts of the steps it keeps.
        let (tokens_before, elapsed_before) =
            if resumed { drop_logged_steps_after(&metrics_path, self.pos.step)? } else { (0, 0.0) };
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("cannot open {}", metrics_path.display()))?;
        let started = Instant::now();
        // Where this run stops: the progress line counts to it (--max-steps may end a run early).
        let stop_at = cfg.max_steps.map_or(total, |m| (self.pos.step + m as u64).min(total));
        let mut losses = Vec::new();
        let mut tokens = 0usize;
        let seq2seq = pfx_compiler::compile::bart::read_bart_spec(&self.bundle.dir)?.is_some();
        let mut run_steps = 0usize;
        let mut warned_zero_gradient = false;
        let mut first_grad_norm = None;
        let tty = std::io::stderr().is_terminal();
        'epochs: while self.pos.epoch < cfg.epochs as u64 {
            let order = if cfg.shuffle {
                batches(data.len(), b, cfg.seed, self.pos.epoch)
            } else {
                sequential_batches(data.len(), b)
            };
            while (self.pos.batch_in_epoch as usize) < order.len() {
                let batch = &order[self.pos.batch_in_epoch as usize];
                let mut rows: Vec<Encoded> = batch.rows.iter().map(|&i| data[i].clone()).collect();
                for (r, &real) in rows.iter_mut().zip(&batch.real) {
                    if !real {
                        r.ignore_labels();
                    }
                }
                let refs: Vec<&Encoded> = rows.iter().collect();
                let mut inputs = Self::batch_of(&self.bundle, &refs)?;
                let lr = cfg.lr as f64 * linear_schedule(self.pos.step, cfg.warmup_steps as u64, total);
                inputs.insert("lr".into(), HostTensor::scalar_f32(lr as f32));
                inputs.insert("step".into(), HostTensor::scalar_i64(self.pos.step as i64 + 1));
                let out =
                    self.step_graph.step(&inputs).with_context(|| format!("training step {}", self.pos.step + 1))?;
                let loss = out["loss"].to_f64_vec()[0];
                let grad_norm = out["grad_norm"].to_f64_vec()[0];
                if !loss.is_finite() {
                    bail!("the loss became {loss} at step {}; lower --lr", self.pos.step + 1);
                }
                self.pos.step += 1;
                self.pos.batch_in_epoch += 1;
                run_steps += 1;
                // Repeated rows (filling the last batch) are not counted twice.
                let real = rows.iter().zip(&batch.real).filter(|(_, &real)| real);
                tokens += real.map(|(r, _)| r.tokens_read(seq2seq)).sum::<usize>();
                losses.push(loss);
                let log = StepLog {
                    step: self.pos.step,
                    epoch: self.pos.epoch,
                    loss,
                    grad_norm,
                    lr,
                    tokens: tokens_before + tokens,
                    elapsed_s: elapsed_before + started.elapsed().as_secs_f64(),
                };
                writeln!(metrics, "{}", serde_json::to_string(&log)?)?;
                if cfg.progress {
                    progress(tty, &self.pos, stop_at, loss, Rate { steps: run_steps, tokens, started });
                }
                // A prefix pushed far out (a huge --lr) saturates the softmaxes: training goes on, learning nothing,
                // with a gradient a millionth of this run's first or less, and tiny (a run whose first step had a
                // huge gradient is not warned about for settling down).
                let first = *first_grad_norm.get_or_insert(grad_norm);
                if grad_norm <= 1e-6 * first && grad_norm < 1e-6 && loss > 0.0 && !warned_zero_gradient {
                    warned_zero_gradient = true;
                    eprintln!(
                        "{}warning: the gradient has vanished at step {} (norm {grad_norm:e}) with loss {loss:.4}: \
                         the prefix no longer learns (--lr {:e} too high?)",
                        if tty && cfg.progress { "\n" } else { "" },
                        self.pos.step,
                        cfg.lr
                    );
                }
                let stop = self.stop.load(Ordering::SeqCst);
                let limit = cfg.max_steps.map(|m| run_steps >= m).unwrap_or(false);
                if (cfg.checkpoint_every > 0 && self.pos.step.is_multiple_of(cfg.checkpoint_every as u64))
                    || stop
                    || limit
                {
                    self.save_checkpoint(&cfg.out_dir)?;
                }
                if stop {
                    eprintln!("\ninterrupted: checkpoint saved at step {}; continue with --resume", self.pos.step);
                    break 'epochs;
                }
                if limit {
                    break 'epochs;
                }
            }
            self.pos.epoch += 1;
            self.pos.batch_in_epoch = 0;
            if let Some(dev) = dev {
                if let Some(dl) = self.dev_loss(dev)? {
                    // The prefix of the lowest dev loss is kept apart (HF's Trainer loads its best model at the end
                    // in the same way): later epochs can overfit a small dataset.
                    let best = self.pos.best_dev.is_none_or(|(b, _)| dl < b);
                    if best {
                        self.pos.best_dev = Some((dl, self.pos.epoch));
                        let bytes = safetensors_to_bytes(&self.prefix()?, None)?;
                        write_atomic(&cfg.out_dir.join(BEST_PREFIX), &bytes)?;
                    }
                    writeln!(
                        metrics,
                        "{}",
                        serde_json::json!({"epoch": self.pos.epoch, "step": self.pos.step, "dev_loss": dl, "best": best})
                    )?;
                    if cfg.progress {
                        let mark = if best { format!(" (lowest so far: {BEST_PREFIX})") } else { String::new() };
                        eprintln!("{}epoch {} dev loss {dl:.4}{mark}", if tty { "\n" } else { "" }, self.pos.epoch);
                    }
                }
            }
        }
        if cfg.progress && tty {
            eprintln!();
        }
        self.save_checkpoint(&cfg.out_dir)?;
        write_loss_curve(&metrics_path, &cfg.out_dir.join("loss.svg"))?;
        Ok(losses)
    }

    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let mut meta = std::collections::HashMap::new();
        meta.insert("pfx_position".to_string(), serde_json::to_string(&self.pos)?);
        let state = self.step_graph.state()?;
        // A diverged step: keep the last good checkpoint rather than one no lower --lr can resume from.
        for name in self.bundle.trainable_names() {
            if state.get(&name).is_some_and(|t| t.to_f64_vec().iter().any(|x| !x.is_finite())) {
                bail!(
                    "the prefix became NaN or infinite at step {} ('{name}'; the learning rate is too high?): the \
                     checkpoint in {} is left as it was",
                    self.pos.step,
                    dir.display()
                );
            }
        }
        let bytes = safetensors_to_bytes(&state, Some(meta))?;
        write_atomic(&dir.join("checkpoint.safetensors"), &bytes)?;
        let prefix = self
            .bundle
            .trainable_names()
            .into_iter()
            .filter_map(|n| state.get_key_value(&n))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let prefix_bytes = safetensors_to_bytes(&prefix, None)?;
        write_atomic(&dir.join("prefix.safetensors"), &prefix_bytes)
    }

    /// Restores state and position from `dir/checkpoint.safetensors`.
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        let p = dir.join("checkpoint.safetensors");
        let bytes = std::fs::read(&p).with_context(|| format!("cannot read {} to resume", p.display()))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).with_context(|| format!("{} is damaged", p.display()))?;
        let pos = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("pfx_position"))
            .with_context(|| format!("{} holds no training position", p.display()))?;
        self.pos = serde_json::from_str(pos)
            .with_context(|| format!("{}: its training position (pfx_position) is damaged", p.display()))?;
        let mut tensors = safetensors_from_bytes(&bytes, &p.display().to_string())?;
        let mut state = BTreeMap::new();
        for pair in self.step_graph.pairs() {
            let v = tensors
                .remove(&pair.input)
                .with_context(|| format!("{} lacks '{}' (another bundle's checkpoint?)", p.display(), pair.input))?;
            state.insert(pair.input.clone(), v);
        }
        self.step_graph.set_state(&state).with_context(|| format!("restoring the state from {}", p.display()))
    }
}

/// The prefix of the lowest dev loss, beside `prefix.safetensors` (the last one).
pub const BEST_PREFIX: &str = "best.safetensors";

/// A resumed run logs again the steps after its checkpoint: drop the earlier lines for them. Returns the
/// tokens and seconds logged by the last step kept, which the resumed run's counts continue from.
fn drop_logged_steps_after(path: &Path, step: u64) -> Result<(usize, f64)> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok((0, 0.0)) };
    let mut counts = (0, 0.0);
    let mut kept = Vec::new();
    for line in text.lines() {
        let v = serde_json::from_str::<serde_json::Value>(line).ok();
        if v.as_ref().and_then(|v| v.get("step")?.as_u64()).is_some_and(|s| s > step) {
            continue;
        }
        if let Some(v) = &v {
            if let (Some(t), Some(e)) = (v.get("tokens").and_then(|t| t.as_u64()), v.get("elapsed_s")) {
                counts = (t as usize, e.as_f64().unwrap_or(0.0));
            }
        }
        kept.push(line);
    }
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())?;
    Ok(counts)
}

/// The mean loss of `rows` under `prefix` through a bundle's `eval_step` graph, weighted by each batch's number
/// of labels (None when no row has one). The last batch is filled with label-free copies.
pub fn mean_loss(
    bundle: &Bundle,
    eval: &mut dyn Backend,
    prefix: &BTreeMap<String, HostTensor>,
    rows: &[Encoded],
) -> Result<Option<f64>> {
    let b = bundle.manifest.batch;
    let (mut total, mut count) = (0.0, 0usize);
    // A count of batches where someone watches a long pass (a dev set, `pfxrun eval` of a large file).
    // A log gets a line every half minute instead.
    let batches = rows.len().div_ceil(b);
    let show = batches > 4 && std::io::stderr().is_terminal();
    let mut logged = Instant::now();
    // The prefix once; each batch's rows replace the last one's (cloning a GPT-2 prefix per batch copied ~75 MB).
    let mut inputs = prefix.clone();
    for (k, chunk) in rows.chunks(b).enumerate() {
        if show {
            eprint!("\rloss over {} rows: batch {}/{batches}", rows.len(), k + 1);
        } else if logged.elapsed().as_secs() >= 30 {
            logged = Instant::now();
            eprintln!("loss over {} rows: batch {}/{batches}", rows.len(), k + 1);
        }
        let mut batch: Vec<Encoded> = chunk.to_vec();
        while batch.len() < b {
            let mut r = chunk[0].clone();
            r.ignore_labels();
            batch.push(r);
        }
        // GPT-2's eval_step shifts labels by one inside its loss, BART's does not: weight by what it counts.
        let skip = if bundle.manifest.family == "bart" { 0 } else { 1 };
        let n_shifted: usize = batch.iter().map(|r| r.labels[skip..].iter().filter(|&&l| l != -100).count()).sum();
        if n_shifted == 0 {
            continue;
        }
        let refs: Vec<&Encoded> = batch.iter().collect();
        inputs.extend(Trainer::batch_of(bundle, &refs)?);
        let out = eval.run(&inputs)?;
        total += out["loss"].to_f64_vec()[0] * n_shifted as f64;
        count += n_shifted;
    }
    if show {
        eprint!("\r{:60}\r", "");
    }
    Ok(if count > 0 { Some(total / count as f64) } else { None })
}

/// Batches in file order; the last one filled by wrapping around (those rows are not real).
fn sequential_batches(n: usize, b: usize) -> Vec<crate::data::Batch> {
    (0..n.div_ceil(b))
        .map(|k| crate::data::Batch {
            rows: (k * b..(k + 1) * b).map(|i| i % n).collect(),
            real: (k * b..(k + 1) * b).map(|i| i < n).collect(),
        })
        .collect()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))
}

/// This run's pace (a resumed run's too: the steps before it ran at another time).
struct Rate {
    steps: usize,
    tokens: usize,
    started: Instant,
}

fn progress(tty: bool, pos: &Position, total: u64, loss: f64, rate: Rate) {
    let el = rate.started.elapsed().as_secs_f64();
    let done = pos.step as f64 / total.max(1) as f64;
    let width = 24;
    let filled = (done * width as f64) as usize;
    let bar: String = "#".repeat(filled.min(width)) + &".".repeat(width - filled.min(width));
    let tps = rate.tokens as f64 / el.max(1e-9);
    let eta = el / rate.steps.max(1) as f64 * total.saturating_sub(pos.step) as f64;
    let line = format!(
        "epoch {} [{bar}] step {}/{} loss {loss:.4} {tps:.0} tok/s ETA {}:{:02}",
        pos.epoch + 1,
        pos.step,
        total,
        (eta as u64) / 60,
        (eta as u64) % 60
    );
    if tty {
        eprint!("\r{line}");
    } else if pos.step.is_multiple_of(10) || pos.step == total {
        eprintln!("{line}");
    }
}

/// A small SVG of the training loss (and dev loss points) from the metrics log.
pub fn write_loss_curve(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)?;
    let mut train = Vec::new();
    let mut dev = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["dev_loss"].as_f64() {
            dev.push((step, l));
        }
    }
    if train.is_empty() {
        return Ok(());
    }
    let (w, h, m) = (640.0, 360.0, 40.0);
    let xmax = train.iter().chain(&dev).map(|p| p.0).fold(1.0, f64::max);
    let ymax = train.iter().chain(&dev).map(|p| p.1).fold(f64::MIN, f64::max);
    let ymin = train.iter().chain(&dev).map(|p| p.1).fold(f64::MAX, f64::min).min(ymax - 1e-6);
    let x = |s: f64| m + s / xmax * (w - 2.0 * m);
    let y = |l: f64| h - m - (l - ymin) / (ymax - ymin) * (h - 2.0 * m);
    let pts: Vec<String> = train.iter().map(|&(s, l)| format!("{:.1},{:.1}", x(s), y(l))).collect();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{m}\" y=\"{}\">step (max {xmax})</text><text x=\"4\" y=\"{}\">{ymax:.3}</text><text x=\"4\" y=\"{}\">{ymin:.3}</text>\n\
         <polyline fill=\"none\" stroke=\"steelblue\" stroke-width=\"1.5\" points=\"{}\"/>\n",
        h - m,
        w - m,
        h - m,
        h - m,
        h - 8.0,
        m,
        h - m,
        pts.join(" ")
    );
    for (s, l) in dev {
        svg += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"darkorange\"/>\n", x(s), y(l));
    }
    svg += "<text x=\"460\" y=\"20\" fill=\"steelblue\">train loss</text><text x=\"540\" y=\"20\" fill=\"darkorange\">dev loss</text>\n</svg>\n";
    write_atomic(out, svg.as_bytes())
}
