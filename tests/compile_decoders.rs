//! Decoder-only exports other than GPT-2 (tiny Llama, OPT, GPT-Neo, Qwen3, Gemma, Falcon (also multi-query), Qwen2,
//! Mistral, Phi-3 and StableLM from optimum, with past;
//! a Llama with grouped-query attention; OPT, GPT-Neo, Llama, Qwen3, Phi-3 and Gemma without past; torch.onnx dynamo
//! exports of OPT, GPT-Neo, Llama, Gemma and Qwen3)
//! compile to prefix-tuning graphs that equal PyTorch + PEFT: loss, gradients and eval loss with and without
//! reparametrization, and greedy tokens with a fixed prefix, on tract and on ONNX Runtime. References by `graphs/make_decoder_fixtures.py` (same batch, prefix sizes and prompts as
//! `graphs/peft/` and `graphs/peft-generate/`).

mod common;

use common::{backends, check_bundle, check_norm, id_rows, rel, run, scalar};

use std::collections::BTreeMap;
use std::path::PathBuf;

use pfx_compiler::compile::generate::GenShape;
use pfx_compiler::compile::{compile, CompileOptions, Manifest};
use pfx_runtime::bundle::Bundle;
use pfx_runtime::generate::{GenConfig, Generator};
use pfx_runtime::{open, HostTensor, OrtOptions};

/// Optimum exports with past. Qwen3's and Gemma's heads are wider than width / heads; Gemma's export has no
/// position_ids input (its rotary angles and its causal mask both read cache_position); Falcon splits its fused
/// QKV with constant-index Gathers.
/// Qwen2 (biased QKV), Mistral (no window), Phi-3 (fused QKV) and StableLM (rotary on half of each head) need
/// nothing of their own; multi-query Falcon's prefix holds its one key/value head (PEFT's, with token_dim 8 and
/// one head given to its config, which would otherwise size it for all 4). Mistral with a sliding window of 6
/// (shorter than prefix + sequence and than the generation cache): the generation graphs count it in real tokens,
/// so a left-padded prompt's window ends where it would alone. Gemma 2 windows every other layer only (and soft-caps
/// its attention and final logits). Phi (partial rotary, attention and MLP in parallel) needs nothing of its own;
/// multi-query GPT-BigCode (StarCoder's layout, fused c_attn) has a one-head prefix as multi-query Falcon. GPT-J
/// and CodeGen rotate neighbouring pairs (strided slices, which have their own gradient rule), CodeGen from a
/// sin/cos table narrower than the embeddings read by position id; GPT-NeoX is Pythia's layout.
const FAMILIES: &[&str] = &[
    "llama-tiny",
    "opt-tiny",
    "gptneo-tiny",
    "llama-gqa-tiny",
    "qwen3-tiny",
    "gemma-tiny",
    "falcon-tiny",
    "qwen2-tiny",
    "mistral-tiny",
    "phi3-tiny",
    "stablelm-tiny",
    "falcon-mqa-tiny",
    "mistral-window-tiny",
    "gemma2-tiny",
    "phi-tiny",
    "bigcode-tiny",
    "gptj-tiny",
    "codegen-tiny",
    "neox-tiny",
];
/// The exports whose compiled graphs are snapshotted: the first four families, and where a later one needed a
/// rewrite of its own: the prefix repeated per query head without past (llama-gqa-nopast), position ids for the
/// rotary angles only, not the mask (gemma), Gather splits as slices (falcon), Gelu spelled out (gemma-dynamo), a
/// one-head prefix beside multi-query attention's broadcast key/value head (falcon-mqa-nopast), a computed sliding
/// window counted in real tokens when generating (mistral-window) and given to the prefix's columns without past
/// (mistral-window-nopast).
const SNAPSHOT_FAMILIES: &[&str] = &[
    "llama-tiny",
    "opt-tiny",
    "gptneo-tiny",
    "llama-gqa-tiny",
    "llama-gqa-nopast-tiny",
    "gemma-tiny",
    "falcon-tiny",
    "gemma-dynamo-tiny",
    "falcon-mqa-nopast-tiny",
    "mistral-window-tiny",
    "mistral-window-nopast-tiny",
];
const MODES: &[&str] = &["reparam", "noreparam"];
const EOS: i64 = 95;

fn reference(family: &str, mode: &str) -> BTreeMap<String, HostTensor> {
    pfx_runtime::read_safetensors(common::graphs_dir().join(format!("peft-decoders/{family}-{mode}.safetensors")))
        .unwrap()
}

fn options(mode: &str) -> CompileOptions {
    let generation = Some(GenShape { rows: 3, prompt_len: 6, max_new: 8 });
    common::gpt2_options((mode == "reparam").then_some(16), generation)
}

/// Each test compiles into its own folder (tests run in parallel threads of one process).
fn compile_fixture(family: &str, mode: &str, test: &str) -> (PathBuf, Manifest) {
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfx-dec-{test}-{family}-{mode}"));
    let model = common::graphs_dir().join(family).join("model.onnx");
    let m = compile(&model, &options(mode), &out).unwrap_or_else(|e| panic!("compiling {family}: {e:#}"));
    (out, m)
}

/// Loss, gradients and eval loss of `family`'s bundle against the PEFT reference `r`.
fn check_training(family: &str, mode: &str, r: &BTreeMap<String, HostTensor>) {
    let (dir, m) = compile_fixture(family, mode, "grads");
    check_bundle(&dir);
    let names: Vec<String> = m.trainable.iter().map(|t| t.name.clone()).collect();
    for kind in backends() {
        let what = format!("{family} {mode} {kind}");
        let mut b = open(dir.join("grads.onnx"), kind, &OrtOptions::default()).unwrap();
        let out = run(&mut b, r, &what);
        let e = rel(scalar(&out["loss"]), scalar(&r["loss"]));
        assert!(e <= 1e-5, "{what}: loss {} vs PEFT {} (rel {e:e})", scalar(&out["loss"]), scalar(&r["loss"]));
        let mut worst = 0.0f64;
        for n in &names {
            let g = format!("grad.{n}");
            assert_eq!(out[&g].shape(), r[&g].shape(), "{what}: {g} has PEFT's shape");
            worst = worst.max(check_norm(&format!("{what} {g}"), &out[&g], &r[&g], 1e-4));
        }
        let mut ev = open(dir.join("eval_step.onnx"), kind, &OrtOptions::default()).unwrap();
        let el = scalar(&run(&mut ev, r, &what)["loss"]);
        let ee = rel(el, scalar(&r["loss"]));
        assert!(ee <= 1e-5, "{what}: eval loss {el} vs PEFT {} (rel {ee:e})", scalar(&r["loss"]));
        println!("{what:<32} loss rel err {e:.1e}, eval {ee:.1e}, worst gradient rel err {worst:.1e}");
    }
}

#[test]
fn loss_and_gradients_equal_peft() {
    for mode in MODES {
        for family in FAMILIES {
            check_training(family, mode, &reference(family, mode));
        }
    }
}

/// (export, the fixture whose PEFT references it shares).
const NO_PAST_EXPORTS: &[(&str, &str)] = &[
    ("opt-nopast-tiny", "opt-tiny"),
    ("gptneo-nopast-tiny", "gptneo-tiny"),
    // Rotary and grouped-query: positions P + t through its position_ids, the prefix's 2 key/value heads
    // repeated for the 4 query heads at each attention, as PEFT's cache is.
    ("llama-gqa-nopast-tiny", "llama-gqa-tiny"),
    // Qwen3's wide heads; Phi-3's fused QKV; Gemma's export has no position_ids input (angles from
    // cache_position, which its causal mask reads too): it gets one, the mask keeps its own.
    ("qwen3-nopast-tiny", "qwen3-tiny"),
    ("phi3-nopast-tiny", "phi3-tiny"),
    ("gemma-nopast-tiny", "gemma-tiny"),
    // One key/value head broadcast over the 4 query heads (not repeated): the prefix's is too.
    ("falcon-mqa-nopast-tiny", "falcon-mqa-tiny"),
    // A sliding window computed in the graph (6 < prefix 4 + 7): later queries do not see the first prefix
    // positions (with them all visible the loss was 3.7e-3 away from PEFT's).
    ("mistral-window-nopast-tiny", "mistral-window-tiny"),
    // The same on every other layer (Gemma 2), the other layers seeing the whole prefix.
    ("gemma2-nopast-tiny", "gemma2-tiny"),
    // Phi's partial rotary; GPT-BigCode's one key/value head broadcast, as Falcon's.
    ("phi-nopast-tiny", "phi-tiny"),
    ("bigcode-nopast-tiny", "bigcode-tiny"),
    // GPT-J's strided rotary slices on the prefix's gradient path without past too.
    ("gptj-nopast-tiny", "gptj-tiny"),
];

/// Exports without past (`--task text-generation`, the same weights as their with-past fixtures, whose references
/// they use) get the prefix at their attention sites. OPT's positions are numbered from the mask as transformers'
/// OPT numbers them under PEFT, so the batch's left-padded row (row 2) gives PEFT's loss too (numbered P + t it
/// did not); GPT-Neo's are P + t, as for GPT-2.
#[test]
fn exports_without_past_equal_peft() {
    for mode in MODES {
        for &(export, weights) in NO_PAST_EXPORTS {
            check_training(export, mode, &reference(weights, mode));
        }
    }
}

/// (export, the fixture whose PEFT references it shares).
const DYNAMO_EXPORTS: &[(&str, &str)] = &[
    ("opt-dynamo-tiny", "opt-tiny"),
    ("opt-dynamo-nopast-tiny", "opt-tiny"),
    ("gptneo-dynamo-nopast-tiny", "gptneo-tiny"),
    ("llama-dynamo-tiny", "llama-tiny"),
    // Without past, rotary angles from cache_position: they get position ids P + t.
    ("llama-dynamo-nopast-tiny", "llama-gqa-tiny"),
    // GELU as one opset-20 `Gelu` node; Qwen3's wide heads as dynamo writes them.
    ("gemma-dynamo-tiny", "gemma-tiny"),
    ("qwen3-dynamo-tiny", "qwen3-tiny"),
    // Multi-query Falcon's key and value picked by GatherND (rewritten as slices).
    ("falcon-mqa-dynamo-tiny", "falcon-mqa-tiny"),
    ("falcon-mqa-dynamo-nopast-tiny", "falcon-mqa-tiny"),
];

/// torch.onnx dynamo exports of the same HF folders (references: theirs). OPT's numbers its positions from the mask
/// inside the graph (optimum's adds 2 to a position_ids input): without past the left-padded row's loss equals
/// PEFT's only when that is recognized. GPT-Neo's local window is read from the dynamo graph's table. Llama's
/// RMSNorm is Reciprocal(Sqrt), and its rotary positions come from the past length (`greedy_tokens_equal_peft`
/// checks that its generation graphs take position ids instead).
#[test]
fn dynamo_exports_equal_peft() {
    for mode in MODES {
        for &(export, weights) in DYNAMO_EXPORTS {
            check_training(export, mode, &reference(weights, mode));
        }
    }
    // OPT's position table serves 64 positions in the dynamo export too.
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-dec-dynamo-opt-positions");
    let model = common::graphs_dir().join("opt-dynamo-nopast-tiny").join("model.onnx");
    let at = CompileOptions { seq: 61, generation: None, ..options("noreparam") };
    let e = format!("{:#}", compile(&model, &at, &out).unwrap_err());
    assert!(e.contains("needs 65 positions, but the model has 64"), "{e}");
}

/// Grouped-query attention (4 query heads, 2 key/value heads): PEFT's prefix holds the key/value heads
/// (token_dim 16, not the width 32), and so does pfx's: the trainables, the manifest and the generation cache.
#[test]
fn gqa_prefix_has_peft_sizes() {
    for mode in MODES {
        let r = reference("llama-gqa-tiny", mode);
        let (_, m) = compile_fixture("llama-gqa-tiny", mode, "sizes");
        assert_eq!(
            (m.layers, m.heads, m.head_dim, m.hidden),
            (2, 2, 8, 16),
            "{mode}: PEFT's num_attention_heads, token_dim"
        );
        for t in &m.trainable {
            assert_eq!(t.shape, r[&t.name].shape(), "{mode}: {} has PEFT's shape", t.name);
        }
    }
}

/// A GQA prefix goes through PEFT's adapter files both ways: PEFT's `save_pretrained` folder (prompt_embeddings
/// [4, 64], token_dim 16, num_attention_heads 2) imports into a --no-reparam bundle with PEFT's loss, and pfx
/// exports the reparam prefix as PEFT saved it.
#[test]
fn gqa_adapter_round_trips_as_peft_saves_it() {
    let r = reference("llama-gqa-tiny", "reparam");
    let saved = common::graphs_dir().join("peft-decoders/adapter-llama-gqa-tiny");
    let (nr, _) = compile_fixture("llama-gqa-tiny", "noreparam", "adapter");
    let prefix = pfx_runtime::peft::import_adapter(&Bundle::open(&nr).unwrap().manifest, &saved).unwrap();
    let mut batch = r.clone();
    batch.retain(|k, _| ["input_ids", "attention_mask", "labels"].contains(&k.as_str()));
    batch.extend(prefix);
    for kind in backends() {
        let mut ev = open(nr.join("eval_step.onnx"), kind, &OrtOptions::default()).unwrap();
        let l = scalar(&run(&mut ev, &batch, &format!("gqa adapter {kind}"))["loss"]);
        let e = rel(l, scalar(&r["loss"]));
        assert!(e <= 1e-5, "{kind}: PEFT's adapter gives loss {l}, PEFT {} (rel {e:e})", scalar(&r["loss"]));
        println!("PEFT's GQA adapter on {kind}: loss rel err {e:.1e}");
    }
    let (rp, _) = compile_fixture("llama-gqa-tiny", "reparam", "adapter");
    let b = Bundle::open(&rp).unwrap();
    let init: BTreeMap<String, HostTensor> =
        b.trainable_names().into_iter().map(|n| (n.clone(), r[&n].clone())).collect();
    let out = rp.join("adapter");
    pfx_runtime::peft::export_adapter(&b.manifest, &init, &out, "graphs/llama-gqa-tiny/hf").unwrap();
    let ours = pfx_runtime::read_safetensors(out.join("adapter_model.safetensors")).unwrap();
    let peft = pfx_runtime::read_safetensors(saved.join("adapter_model.safetensors")).unwrap();
    assert_eq!(ours["prompt_embeddings"].shape(), peft["prompt_embeddings"].shape());
    let e = ours["prompt_embeddings"].norm_rel_error(&peft["prompt_embeddings"]).unwrap();
    assert!(e < 1e-6, "prompt_embeddings differ from PEFT's by {e:e}");
    let cfg = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap()).unwrap()
    };
    let (ours, peft) = (cfg(&out), cfg(&saved));
    for key in ["token_dim", "num_attention_heads", "num_layers", "num_virtual_tokens", "task_type", "peft_type"] {
        assert_eq!(ours[key], peft[key], "adapter_config.json: {key}");
    }
    pfx_runtime::peft::import_adapter(&Bundle::open(&nr).unwrap().manifest, &out).expect("ours imports back");
}

#[test]
fn greedy_tokens_equal_peft() {
    // The dynamo exports compute their positions in the graph: OPT's generation graphs read the table 2 rows in,
    // Llama's rotate by the position ids, not the cache slots. (Exports without past have no generation graphs.)
    let dynamo = DYNAMO_EXPORTS.iter().copied().filter(|(export, _)| !export.contains("nopast"));
    let exports = FAMILIES.iter().map(|&f| (f, f)).chain(dynamo);
    for mode in MODES {
        for (family, weights) in exports.clone() {
            let r = reference(weights, mode);
            let prompts = id_rows(&r["prompts"], Some(&r["prompt_mask"]));
            let (dir, _) = compile_fixture(family, mode, "tokens");
            let b = Bundle::open(&dir).unwrap();
            let prefix: BTreeMap<String, HostTensor> =
                b.trainable_names().into_iter().map(|n| (n.clone(), r[&n].clone())).collect();
            let want = id_rows(&r["greedy"], None);
            let bare = id_rows(&r["greedy_noprefix"], None);
            assert_ne!(want, bare, "{family} {mode}: the prefix must change PEFT's tokens");
            for kind in backends() {
                let what = format!("{family} {mode} {kind}");
                let mut g = Generator::open(&b, kind, &OrtOptions::default(), prefix.clone()).unwrap();
                let cfg =
                    GenConfig { max_new: 8, min_new: 8, beams: 1, eos: Some(EOS), pad: EOS, ..GenConfig::default() };
                // The left-padded batch gives each prompt's tokens alone (PEFT's are made one prompt at a time).
                let greedy = g.greedy(&prompts, &cfg).unwrap();
                assert_eq!(greedy, want, "{what}: greedy tokens differ from PEFT");
                let no_prefix = GenConfig { no_prefix: true, ..cfg.clone() };
                assert_eq!(g.greedy(&prompts, &no_prefix).unwrap(), bare, "{what}: the bare model's tokens");
                println!("{what:<28} greedy {greedy:?}");
            }
        }
    }
}

/// Two end-of-sequence ids (as Llama 3's generation config lists several): generation stops at either, as
/// Hugging Face's greedy and beam search do (beam: the hypotheses ending in the second id finish, and the top
/// 3·K candidates are kept where HF keeps them). References: HF's `generate` with `eos_token_id=[95, s]`, s a
/// token the first prompt's search gives without it.
#[test]
fn generation_stops_at_every_listed_eos_like_hf() {
    for mode in MODES {
        let r = reference("llama-gqa-tiny", mode);
        let prompts = id_rows(&r["prompts"], Some(&r["prompt_mask"]));
        let (dir, _) = compile_fixture("llama-gqa-tiny", mode, "stop");
        let b = Bundle::open(&dir).unwrap();
        let prefix: BTreeMap<String, HostTensor> =
            b.trainable_names().into_iter().map(|n| (n.clone(), r[&n].clone())).collect();
        for kind in backends() {
            let mut g = Generator::open(&b, kind, &OrtOptions::default(), prefix.clone()).unwrap();
            for (key, beams) in [("greedy", 1), ("beam3", 3)] {
                let what = format!("{mode} {kind} {key}");
                let stop = r[&format!("{key}_stop_id")].as_i64().unwrap()[0];
                let cfg = GenConfig {
                    max_new: 8,
                    beams,
                    eos: Some(EOS),
                    more_eos: vec![stop],
                    pad: EOS,
                    ..GenConfig::default()
                };
                let got =
                    if beams == 1 { g.greedy(&prompts, &cfg).unwrap() } else { g.beam_search(&prompts, &cfg).unwrap() };
                assert_eq!(got, id_rows(&r[&format!("{key}_stop")], None), "{what}: stopping at {stop} too");
                println!("{what:<28} stop {stop}: {got:?}");
            }
        }
    }
}

/// Readable snapshots of the graphs where the families differ from GPT-2: the loss graph (prefix bound as the
/// past, positions, mask) and the prefill (reparam, P=4, M=16, B=3, T=7; 3 rows, prompt 6, 8 new).
#[test]
fn compiled_graph_snapshots() {
    for family in SNAPSHOT_FAMILIES {
        let model = common::graphs_dir().join(family).join("model.onnx");
        let c = pfx_compiler::compile::compile_models(&model, &options("reparam")).unwrap();
        for (role, m) in c.graphs.iter().filter(|(role, _)| role == "eval_step" || role == "prefill") {
            insta::assert_snapshot!(format!("compiled__{family}__{role}"), pfx_compiler::text::model_text(m));
        }
    }
}

/// OPT's position table has 2 rows more than the positions it serves: the length check counts only those.
#[test]
fn opt_positions_end_two_rows_before_its_table() {
    let model = common::graphs_dir().join("opt-tiny").join("model.onnx");
    let at = |seq: usize| CompileOptions { seq, generation: None, ..options("noreparam") };
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-dec-opt-positions");
    compile(&model, &at(60), &out).expect("4 + 60 positions fit the 64 OPT serves");
    let e = compile(&model, &at(61), &out).unwrap_err();
    assert!(format!("{e:#}").contains("needs 65 positions, but the model has 64"), "{e:#}");
}

/// A sliding window that pfx does not read from the graph (Mistral's and Gemma's are computed, not sliced from a
/// table as GPT-Neo's) would be counted in cache slots when generating: a generation cache not shorter than the
/// `sliding_window` of the export's config.json is refused, a shorter one (where no key falls outside) is not.
#[test]
fn generation_past_an_unread_sliding_window_is_refused() {
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-dec-sliding-window");
    let export = tmp.join("export");
    std::fs::create_dir_all(&export).unwrap();
    std::fs::copy(common::graphs_dir().join("llama-tiny/model.onnx"), export.join("model.onnx")).unwrap();
    let config = |w: usize| format!("{{\"model_type\": \"mistral\", \"sliding_window\": {w}}}");
    // The cache: prefix 4 + prompt 6 + 8 new - 1 = 17 slots.
    std::fs::write(export.join("config.json"), config(17)).unwrap();
    let e = format!("{:#}", compile(&export.join("model.onnx"), &options("noreparam"), &tmp.join("b")).unwrap_err());
    assert!(e.contains("sliding_window 17") && e.contains("--max-new 0"), "{e}");
    let training_only = CompileOptions { generation: None, ..options("noreparam") };
    compile(&export.join("model.onnx"), &training_only, &tmp.join("b")).expect("training graphs with any window");
    std::fs::write(export.join("config.json"), config(18)).unwrap();
    compile(&export.join("model.onnx"), &options("noreparam"), &tmp.join("b")).expect("a cache under the window");
}

/// An export without past whose tokens pfx cannot number after the prefix (rotary, with neither a position table,
/// a `position_ids` input nor angles computed from a range it can replace) is refused with what to export instead,
/// not compiled with the prefix's positions wrong. Made from llama-gqa-nopast-tiny: its position ids computed in the
/// graph from the mask (cumsum - 1) instead of given.
#[test]
fn rotary_export_without_position_ids_is_refused() {
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-dec-mask-positions");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut m = pfx_compiler::onnx_io::load(&common::graphs_dir().join("llama-gqa-nopast-tiny/model.onnx")).unwrap();
    m.producer_name = "hand-edited".into();
    let g = &mut m.graph;
    let at = g.inputs.iter().position(|v| v.name == "position_ids").unwrap();
    g.inputs.remove(at);
    let axis = g.add_const("positions.axis", pfx_compiler::tensor::Tensor::vec_i64(&[1]));
    let one = g.add_const("positions.one", pfx_compiler::tensor::Tensor::vec_i64(&[1]));
    let count = g.op1("CumSum", &["attention_mask", &axis], vec![], "positions.count");
    let ids = g.op1("Sub", &[&count, &one], vec![], "positions.ids");
    g.replace_value("position_ids", &ids);
    g.toposort().unwrap();
    let path = tmp.join("model.onnx");
    pfx_compiler::onnx_io::save(&m, &path, None).unwrap();
    let training_only = CompileOptions { generation: None, ..options("noreparam") };
    let e = format!("{:#}", compile(&path, &training_only, &tmp.join("b")).unwrap_err());
    assert!(e.contains("no position ids") && e.contains("--task text-generation"), "{e}");
    assert!(!tmp.join("b").exists(), "a refused compile leaves no bundle");
}
