//! tract runs a decode graph's products on pfx's own ops: attention's batched matrix-vector products
//! (`pfx_runtime::tract_gemv`) and, on AVX-512 machines, the weight products of a few rows
//! (`pfx_runtime::tract_skinny`). On the compiled decode graphs of both GPT-2 exporters and of BART (self- and
//! cross-attention over the cache), every layer's products must be rewritten, and the graph's outputs (logits,
//! the new keys and values) must be what tract's own plan of the same graph gives. (That generation still
//! equals PEFT and HF is `generate_peft` and `generate_bart`, which run the rewritten plans.) A bundle compiled
//! with `--weights f16` must get the same rewrites, its weights packed in f16 panels.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use pfx_compiler::compile::bart::{compile_bart, BartPrefix};
use pfx_compiler::compile::bart_generate::BartGenShape;
use pfx_compiler::compile::generate::GenShape;
use pfx_compiler::compile::storage::WeightStorage;
use pfx_compiler::compile::{compile, CompileOptions};
use pfx_runtime::bundle::Bundle;
use pfx_runtime::tract_backend::Rewrites;
use pfx_runtime::HostTensor;

/// Inputs of the bundle's decode graph: ids and positions in range, masks all ones, caches of varied values.
fn decode_inputs(bundle: &Bundle) -> BTreeMap<String, HostTensor> {
    let io = &bundle.manifest.io["decode"];
    let mut given = BTreeMap::new();
    for (i, spec) in io.inputs.iter().enumerate() {
        let n: usize = spec.shape.iter().product();
        let t = if spec.dtype == "i64" {
            let v = if spec.name.contains("mask") { vec![1; n] } else { (0..n as i64).map(|j| 1 + j % 5).collect() };
            HostTensor::from_i64(spec.shape.clone(), v)
        } else {
            HostTensor::from_f32(spec.shape.clone(), common::uniform_f32(n, 7 + i as u64))
        };
        given.insert(spec.name.clone(), t.unwrap());
    }
    given
}

/// Runs the graph with the given rewrites; returns its outputs by name, how many nodes of each of pfx's
/// product ops the plan has, and the infos of its few-row weight products.
fn run(
    path: &Path,
    given: &BTreeMap<String, HostTensor>,
    rewrites: Rewrites,
) -> (BTreeMap<String, HostTensor>, [usize; 2], Vec<String>) {
    let (outs, ops, infos) = common::run_tract_plan(path, given, rewrites);
    let count = |op: &str| ops.iter().filter(|o| *o == op).count();
    let skinny = ops.iter().zip(infos).filter(|(o, _)| *o == "PfxSkinnyProduct").map(|(_, i)| i).collect();
    (outs, [count("PfxBatchedGemv"), count("PfxSkinnyProduct")], skinny)
}

/// How many of the decode graph's products per layer must be rewritten at least: attention's, weights'.
fn check(dir: &Path, attention_products: usize, weight_products: usize) {
    let bundle = Bundle::open(dir).unwrap();
    let given = decode_inputs(&bundle);
    let path = bundle.graph_path("decode").unwrap();
    let tract_only = Rewrites { batched_gemv: false, skinny_products: false, ..Rewrites::ALL };
    let (plain, none, _) = run(&path, &given, tract_only);
    let (ours, [gemv, skinny], infos) = run(&path, &given, Rewrites::ALL);
    assert_eq!(none, [0, 0]);
    let layers = bundle.manifest.layers;
    let want = attention_products * layers;
    assert!(gemv >= want, "{}: {gemv} attention products rewritten, expected at least {want}", dir.display());
    // The weight kernel exists for AVX-512F only; elsewhere tract keeps them all.
    let want = if pfx_runtime::tract_skinny::Kernel::chosen().is_some() { weight_products * layers + 1 } else { 0 };
    assert!(skinny >= want, "{}: {skinny} weight products rewritten, expected at least {want}", dir.display());
    // Weights stored in f16 are packed in f16 panels (every value is one); f32 weights, in f32.
    let panels = format!("{} panels", bundle.manifest.weights_dtype.name());
    for info in &infos {
        assert!(info.contains(&panels), "{}: a weight product packed as {info}, expected {panels}", dir.display());
    }
    for (name, t) in &plain {
        let e = ours[name].scaled_max_error(t).unwrap();
        assert!(e <= 1e-5, "{} {name}: rewritten vs tract's plan, scaled max error {e:e}", dir.display());
    }
}

#[test]
fn gpt2_decode_products_are_rewritten_and_agree_with_tract() {
    let cases = [
        ("gpt2-dynamo-past", WeightStorage::F32),
        ("gpt2-optimum", WeightStorage::F32),
        ("gpt2-dynamo-past", WeightStorage::F16),
    ];
    for (fixture, weights) in cases {
        let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("pfx-tract-gemv-{fixture}-{}", weights.name()));
        let generation = Some(GenShape { rows: 3, prompt_len: 6, max_new: 8 });
        let opts = CompileOptions { weights, ..common::gpt2_options(Some(16), generation) };
        compile(&common::graphs_dir().join(fixture).join("model.onnx"), &opts, &out).unwrap();
        check(&out, 2, 6); // q·Kᵀ and p·V; q, k, v, the attention's and the MLP's two (+ the LM head)
    }
}

#[test]
fn bart_decode_products_are_rewritten_and_agree_with_tract() {
    for mode in [BartPrefix::Paper, BartPrefix::Peft] {
        let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfx-tract-gemv-bart-{mode}"));
        let opts = common::bart_options(mode, Some(16), Some(BartGenShape { rows: 4, src_len: 7, max_new: 8 }));
        compile_bart(&common::graphs_dir().join("bart-dec-deep"), &opts, &out).unwrap();
        check(&out, 4, 6); // self- and cross-attention, q·Kᵀ and p·V each; at least as many weights as GPT-2
    }
}
