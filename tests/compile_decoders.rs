//! Decoder-only exports other than GPT-2 (tiny Llama, OPT, GPT-Neo, Qwen3, Gemma, Falcon (also multi-query), Qwen2,
//! Mistral, Phi-3, StableLM, Bloom and MPT (ALiBi) and the other families of `graphs/decoder-fixtures.json` from
//! optimum, with past;
//! a Llama with grouped-query attention; OPT, GPT-Neo, Llama, Qwen3, Phi-3 and Gemma without past; torch.onnx dynamo
//! exports of OPT, GPT-Neo, Llama, Gemma and Qwen3)
//! compile to prefix-tuning graphs that equal PyTorch + PEFT: loss, gradients and eval loss with and without
//! reparametrization, and greedy and beam-search tokens with a fixed prefix, on tract and on ONNX Runtime. References
//! by `graphs/make_decoder_fixtures.py` (same batch, prefix sizes and prompts as `graphs/peft/` and
//! `graphs/peft-generate/`).

mod common;

use common::{backends, check_bundle, check_norm, id_rows, rel, run, scalar};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pfx_compiler::compile::generate::GenShape;
use pfx_compiler::compile::{compile, CompileOptions, Manifest};
use pfx_runtime::bundle::Bundle;
use pfx_runtime::generate::{GenConfig, Generator};
use pfx_runtime::{open, HostTensor, OrtOptions};

/// One fixture of `graphs/decoder-fixtures.json`: a folder of `graphs/` holding a `model.onnx`.
struct Fixture {
    name: String,
    /// The family whose PEFT references (and HF weights) it shares: its own name for a family.
    weights: String,
    /// Whether the export takes a past (and so has generation graphs).
    past: bool,
    /// Whether its compiled graphs are snapshotted (`compiled_graph_snapshots`).
    snapshot: bool,
    /// Whether its references also hold generation stopping at a second end-of-sequence id.
    second_eos: bool,
}

/// The fixture lists of `graphs/decoder-fixtures.json`, the file `graphs/make_decoder_fixtures.py` makes them from
/// (its entries say what each covers), in its order.
struct Fixtures {
    /// Optimum exports with past, each with its own HF folder and PEFT references.
    families: Vec<Fixture>,
    /// Optimum exports without past (`--task text-generation`) of a family's HF folder, sharing its references.
    nopast: Vec<Fixture>,
    /// torch.onnx dynamo exports of a family's HF folder, with past or without, sharing its references.
    dynamo: Vec<Fixture>,
}

/// The fixtures, all of them, or those `PFX_DECODER_FIXTURES` names (comma-separated), to check a few on a slow
/// machine (a test that needs a kind of fixture the selection lacks then fails, saying so).
fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let mut all = load_fixtures(&Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/decoder-fixtures.json"));
        if let Ok(names) = std::env::var("PFX_DECODER_FIXTURES") {
            let names: Vec<&str> = names.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
            let known =
                |n: &&str| [&all.families, &all.nopast, &all.dynamo].iter().any(|l| l.iter().any(|f| f.name == *n));
            if let Some(n) = names.iter().find(|n| !known(n)) {
                panic!("PFX_DECODER_FIXTURES names '{n}', which graphs/decoder-fixtures.json does not list");
            }
            for list in [&mut all.families, &mut all.nopast, &mut all.dynamo] {
                list.retain(|f| names.contains(&f.name.as_str()));
            }
            eprintln!("PFX_DECODER_FIXTURES: only {names:?}");
        }
        all
    })
}

fn malformed(path: &Path, what: std::fmt::Arguments) -> ! {
    panic!("{}: {what}", path.display())
}

/// Reads and checks the lists as `graphs/make_decoder_fixtures.py` does: panics naming the file and the entry on
/// anything malformed.
fn load_fixtures(path: &Path) -> Fixtures {
    // (list, required fields, optional fields)
    const LISTS: [(&str, &[&str], &[&str]); 3] = [
        ("families", &["name", "why"], &["snapshot", "second_eos", "weight_seed_shift"]),
        ("nopast", &["name", "hf", "why"], &["snapshot"]),
        ("dynamo", &["name", "hf", "past", "why"], &["snapshot"]),
    ];
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| malformed(path, format_args!("cannot read the decoder fixture lists: {e}")));
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| malformed(path, format_args!("not valid JSON: {e}")));
    let top = json.as_object().unwrap_or_else(|| malformed(path, format_args!("expected an object")));
    if let Some(k) = top.keys().find(|k| k.as_str() != "about" && !LISTS.iter().any(|l| l.0 == k.as_str())) {
        malformed(path, format_args!("unknown list \"{k}\" (expected families, nopast, dynamo and about)"));
    }
    let mut lists = LISTS.iter().map(|&(key, required, optional)| {
        let entries = top.get(key).and_then(|v| v.as_array()).filter(|l| !l.is_empty());
        let entries = entries.unwrap_or_else(|| malformed(path, format_args!("\"{key}\" must be a non-empty list")));
        let read = |(i, entry): (usize, &serde_json::Value)| {
            let e =
                entry.as_object().unwrap_or_else(|| malformed(path, format_args!("{key}[{i}]: expected an object")));
            let at = format!("{key}[{i}] ({})", e.get("name").map_or("no name".to_string(), |n| n.to_string()));
            if let Some(f) = e.keys().find(|f| !required.contains(&f.as_str()) && !optional.contains(&f.as_str())) {
                malformed(path, format_args!("{at}: unknown field \"{f}\""));
            }
            if let Some(f) = required.iter().find(|f| !e.contains_key(**f)) {
                malformed(path, format_args!("{at}: missing \"{f}\""));
            }
            let text = |f: &str| {
                e.get(f).map(|v| match v.as_str() {
                    Some(s) if !s.is_empty() => s.to_string(),
                    _ => malformed(path, format_args!("{at}: \"{f}\" must be a non-empty string")),
                })
            };
            let flag = |f: &str| {
                e.get(f).map(|v| {
                    v.as_bool().unwrap_or_else(|| malformed(path, format_args!("{at}: \"{f}\" must be true or false")))
                })
            };
            if e.get("weight_seed_shift").is_some_and(|v| !v.is_i64()) {
                malformed(path, format_args!("{at}: \"weight_seed_shift\" must be an integer"));
            }
            text("why");
            let name = text("name").unwrap();
            Fixture {
                weights: text("hf").unwrap_or_else(|| name.clone()),
                past: flag("past").unwrap_or(key == "families"),
                snapshot: text("snapshot").is_some(),
                second_eos: flag("second_eos").unwrap_or(false),
                name,
            }
        };
        entries.iter().enumerate().map(read).collect::<Vec<_>>()
    });
    let (families, nopast, dynamo) = (lists.next().unwrap(), lists.next().unwrap(), lists.next().unwrap());
    let mut names = std::collections::BTreeSet::new();
    for (key, list) in [("families", &families), ("nopast", &nopast), ("dynamo", &dynamo)] {
        for (i, f) in list.iter().enumerate() {
            if !names.insert(f.name.as_str()) {
                malformed(path, format_args!("{key}[{i}] (\"{}\"): listed twice", f.name));
            }
            if !families.iter().any(|fam| fam.name == f.weights) {
                malformed(
                    path,
                    format_args!("{key}[{i}] (\"{}\"): \"hf\" \"{}\" is not one of the families", f.name, f.weights),
                );
            }
        }
    }
    Fixtures { families, nopast, dynamo }
}

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
        for f in &fixtures().families {
            check_training(&f.name, mode, &reference(&f.weights, mode));
        }
    }
}

/// Exports without past (`--task text-generation`, the same weights as their with-past fixtures, whose references
/// they use) get the prefix at their attention sites. OPT's positions are numbered from the mask as transformers'
/// OPT numbers them under PEFT, so the batch's left-padded row (row 2) gives PEFT's loss too (numbered P + t it
/// did not); GPT-Neo's are P + t, as for GPT-2.
#[test]
fn exports_without_past_equal_peft() {
    for mode in MODES {
        for f in &fixtures().nopast {
            check_training(&f.name, mode, &reference(&f.weights, mode));
        }
    }
}

/// torch.onnx dynamo exports of the same HF folders (references: theirs). OPT's numbers its positions from the mask
/// inside the graph (optimum's adds 2 to a position_ids input): without past the left-padded row's loss equals
/// PEFT's only when that is recognized. GPT-Neo's local window is read from the dynamo graph's table. Llama's
/// RMSNorm is Reciprocal(Sqrt), and its rotary positions come from the past length
/// (`greedy_and_beam_tokens_equal_peft` checks that its generation graphs take position ids instead).
#[test]
fn dynamo_exports_equal_peft() {
    for mode in MODES {
        for f in &fixtures().dynamo {
            check_training(&f.name, mode, &reference(&f.weights, mode));
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

/// Greedy tokens (PEFT's, by full forwards) and beam search's (HF's `generate`, 3 beams, exactly 8 tokens; MPT's by
/// full forwards, `graphs/make_decoder_fixtures.py`) of the three prompts, with the prefix and without, on every
/// export with past.
#[test]
fn greedy_and_beam_tokens_equal_peft() {
    // The dynamo exports compute their positions in the graph: OPT's generation graphs read the table 2 rows in,
    // Llama's rotate by the position ids, not the cache slots. (Exports without past have no generation graphs.)
    let d = fixtures();
    let exports = d.families.iter().chain(d.dynamo.iter().filter(|f| f.past));
    for mode in MODES {
        for Fixture { name: family, weights, .. } in exports.clone() {
            let r = reference(weights, mode);
            let prompts = id_rows(&r["prompts"], Some(&r["prompt_mask"]));
            let (dir, _) = compile_fixture(family, mode, "tokens");
            let b = Bundle::open(&dir).unwrap();
            let prefix: BTreeMap<String, HostTensor> =
                b.trainable_names().into_iter().map(|n| (n.clone(), r[&n].clone())).collect();
            let want = id_rows(&r["greedy"], None);
            let bare = id_rows(&r["greedy_noprefix"], None);
            assert_ne!(want, bare, "{family} {mode}: the prefix must change PEFT's tokens");
            let want_beam = id_rows(&r["beam3"], None);
            let bare_beam = id_rows(&r["beam3_noprefix"], None);
            assert_ne!(want_beam, bare_beam, "{family} {mode}: the prefix must change HF's beam tokens");
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
                // Beam search reorders the cache rows (the prefix's too) every step, in each family's layout: 3
                // beams of one prompt fill the bundle's 3 rows.
                let beam_cfg = GenConfig { beams: 3, ..cfg.clone() };
                let beam = g.beam_search(&prompts, &beam_cfg).unwrap();
                assert_eq!(beam, want_beam, "{what}: beam tokens differ from HF's beam search with the prefix");
                let no_prefix = GenConfig { no_prefix: true, ..beam_cfg };
                assert_eq!(g.beam_search(&prompts, &no_prefix).unwrap(), bare_beam, "{what}: the bare model's beams");
                println!("{what:<28} greedy {greedy:?} beam {beam:?}");
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
    let families: Vec<&str> = fixtures().families.iter().filter(|f| f.second_eos).map(|f| f.name.as_str()).collect();
    assert!(!families.is_empty(), "graphs/decoder-fixtures.json: no family has \"second_eos\" references");
    for mode in MODES {
        for &family in &families {
            let r = reference(family, mode);
            let prompts = id_rows(&r["prompts"], Some(&r["prompt_mask"]));
            let (dir, _) = compile_fixture(family, mode, "stop");
            let b = Bundle::open(&dir).unwrap();
            let prefix: BTreeMap<String, HostTensor> =
                b.trainable_names().into_iter().map(|n| (n.clone(), r[&n].clone())).collect();
            for kind in backends() {
                let mut g = Generator::open(&b, kind, &OrtOptions::default(), prefix.clone()).unwrap();
                for (key, beams) in [("greedy", 1), ("beam3", 3)] {
                    let what = format!("{family} {mode} {kind} {key}");
                    let stop = r[&format!("{key}_stop_id")].as_i64().unwrap()[0];
                    let cfg = GenConfig {
                        max_new: 8,
                        beams,
                        eos: Some(EOS),
                        more_eos: vec![stop],
                        pad: EOS,
                        ..GenConfig::default()
                    };
                    let got = if beams == 1 {
                        g.greedy(&prompts, &cfg).unwrap()
                    } else {
                        g.beam_search(&prompts, &cfg).unwrap()
                    };
                    assert_eq!(got, id_rows(&r[&format!("{key}_stop")], None), "{what}: stopping at {stop} too");
                    println!("{what:<28} stop {stop}: {got:?}");
                }
            }
        }
    }
}

/// Readable snapshots of the graphs where the families differ from GPT-2: the loss graph (prefix bound as the
/// past, positions, mask) and the prefill (reparam, P=4, M=16, B=3, T=7; 3 rows, prompt 6, 8 new).
#[test]
fn compiled_graph_snapshots() {
    let d = fixtures();
    for family in d.families.iter().chain(&d.nopast).chain(&d.dynamo).filter(|f| f.snapshot).map(|f| &f.name) {
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

/// MPT's ALiBi table serves max_seq_len positions (64 in the fixture), and transformers cannot run more keys: a
/// generation cache with more (prefix 4 + prompt 50 + 20 new) is refused with the limit, not numbered past it.
#[test]
fn mpt_generation_past_its_alibi_table_is_refused() {
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pfx-dec-mpt-table");
    let model = common::graphs_dir().join("mpt-tiny").join("model.onnx");
    let long =
        CompileOptions { generation: Some(GenShape { rows: 3, prompt_len: 50, max_new: 20 }), ..options("noreparam") };
    let e = format!("{:#}", compile(&model, &long, &out).unwrap_err());
    assert!(e.contains("serves 64 positions") && e.contains("74 keys"), "{e}");
    let fits =
        CompileOptions { generation: Some(GenShape { rows: 3, prompt_len: 50, max_new: 10 }), ..options("noreparam") };
    compile(&model, &fits, &out).expect("4 + 50 + 10 keys fit the 64 positions");
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
