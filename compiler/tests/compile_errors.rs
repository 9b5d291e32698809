//! `pfxc compile` on bad input: clear errors, a non-zero exit, no panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pfx_compiler::onnx_io;

fn graphs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs")
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfxc-compile-{tag}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn compile(model: &Path, extra: &[&str], out: &Path) -> Output {
    let mut args = vec!["compile", model.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_pfxc")).args(&args).output().unwrap()
}

fn fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

const SMALL: &[&str] = &["--batch", "2", "--seq", "5", "--mid-dim", "8"];

#[test]
fn prefix_len_zero() {
    let d = tmp("p0");
    let mut a = vec!["--prefix-len", "0"];
    a.extend_from_slice(SMALL);
    fails_with(
        &compile(&graphs().join("gpt2-legacy/model.onnx"), &a, &d.join("b")),
        &["--prefix-len must be at least 1"],
    );
}

#[test]
fn bart_graph_on_the_gpt2_path() {
    let d = tmp("bart");
    let mut a = vec!["--prefix-len", "2"];
    a.extend_from_slice(SMALL);
    fails_with(
        &compile(&graphs().join("bart-enc-deep/encoder_model.onnx"), &a, &d.join("b")),
        &["BART encoder", "not a GPT-2 decoder"],
    );
    fails_with(
        &compile(&graphs().join("bart-enc-deep/decoder_model.onnx"), &a, &d.join("b")),
        &["BART decoder", "not a GPT-2 decoder"],
    );
}

#[test]
fn sequence_beyond_the_positions() {
    let d = tmp("long");
    // 64 positions: prefix 4 + 61 tokens do not fit.
    let out = compile(
        &graphs().join("gpt2-dynamo/model.onnx"),
        &["--prefix-len", "4", "--batch", "1", "--seq", "61"],
        &d.join("b"),
    );
    fails_with(&out, &["--seq 61 needs 65 positions, but the model has 64"]);
    // Without past inputs there are no generation graphs, so their lengths (prompt = --seq 40, 32 new tokens by
    // default: 75 positions) do not count.
    let out = compile(
        &graphs().join("gpt2-dynamo/model.onnx"),
        &["--prefix-len", "4", "--batch", "1", "--seq", "40", "--mid-dim", "8"],
        &d.join("c"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn generation_beyond_the_positions() {
    let d = tmp("genlong");
    // 64 positions: prefix 4 + prompt 40 + 29 fed tokens (the 30th is generated, never fed) do not fit.
    let gen = ["--prefix-len", "4", "--batch", "1", "--seq", "8", "--prompt-len", "40"];
    let out = compile(
        &graphs().join("gpt2-dynamo-past/model.onnx"),
        &[&gen[..], &["--max-new", "30"]].concat(),
        &d.join("b"),
    );
    fails_with(&out, &["generation graphs (--max-new 0 writes none)", "--max-new 30 - 1 needs 73 positions"]);
    assert!(!d.join("b").exists(), "a refused compile creates no folder");
    // One token less fits exactly; --max-new 0 writes no generation graphs at all.
    let out = compile(
        &graphs().join("gpt2-dynamo-past/model.onnx"),
        &[&gen[..], &["--max-new", "21"]].concat(),
        &d.join("b"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out =
        compile(&graphs().join("gpt2-dynamo-past/model.onnx"), &[&gen[..], &["--max-new", "0"]].concat(), &d.join("c"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest = std::fs::read_to_string(d.join("c/manifest.json")).unwrap();
    assert!(manifest.contains("\"generation\": null") && !d.join("c/decode.onnx").exists(), "{manifest}");
}

#[test]
fn sizes_too_large_to_build_are_refused_not_aborted() {
    let d = tmp("huge");
    let m = graphs().join("gpt2-optimum/model.onnx");
    let base = ["--prefix-len", "4", "--batch", "2", "--seq", "16"];
    for (extra, needle) in [
        (&["--mid-dim", "100000000"][..], "the prefix would have 16100000256 parameters"),
        (&["--gen-rows", "1000000000000"][..], "tokens in one run is more than pfx builds graphs for"),
        (&["--max-new", "18446744073709551615"][..], "overflows"),
    ] {
        fails_with(&compile(&m, &[&base[..], extra].concat(), &d.join("b")), &[needle]);
    }
    let huge_batch = ["--prefix-len", "4", "--batch", "1000000000000", "--seq", "16"];
    fails_with(&compile(&m, &huge_batch, &d.join("b")), &["--batch × (--prefix-len + --seq) = 20000000000000 tokens"]);
    assert!(!d.join("b").exists());
}

#[test]
fn hyperparameters_json_cannot_hold_or_the_family_does_not_take_are_refused() {
    let d = tmp("hyper");
    let m = graphs().join("gpt2-optimum/model.onnx");
    let base = ["--prefix-len", "4", "--batch", "2", "--seq", "16"];
    for (extra, needle) in [
        (&["--weight-decay", "nan"][..], "--weight-decay must be a finite number"),
        (&["--weight-decay=-1"][..], "--weight-decay must be a finite number ≥ 0 (got -1)"),
        (&["--max-grad-norm", "inf"][..], "--max-grad-norm must be a finite number"),
        (&["--label-smoothing", "0.1"][..], "--label-smoothing is for BART-layout exports"),
        (&["--src-len", "8"][..], "--src-len is for BART-layout exports"),
        (&["--src-lang", "en_XX", "--tgt-lang", "ro_RO"][..], "--src-lang is for BART-layout exports"),
    ] {
        fails_with(&compile(&m, &[&base[..], extra].concat(), &d.join("b")), &[needle]);
    }
    let bart = ["--bart-prefix", "paper", "--prefix-len", "2", "--batch", "2", "--src-len", "8", "--tgt-len", "8"];
    fails_with(
        &compile(&graphs().join("bart-enc-deep"), &[&bart[..], &["--seq", "8"]].concat(), &d.join("b")),
        &["--seq is GPT-2's sequence length"],
    );
}

#[test]
fn op_without_gradient_rule_on_the_path() {
    let d = tmp("norule");
    let mut m = onnx_io::load(&graphs().join("gpt2-legacy/model.onnx")).unwrap();
    // The GELU's Tanh becomes Sin: shapes and folding know it, autodiff has no rule for it.
    let n = m.graph.nodes.iter_mut().find(|n| n.op == "Tanh").unwrap();
    n.op = "Sin".into();
    let name = n.name.clone();
    let f = d.join("model.onnx");
    onnx_io::save(&m, &f, None).unwrap();
    let mut a = vec!["--prefix-len", "2"];
    a.extend_from_slice(SMALL);
    fails_with(&compile(&f, &a, &d.join("b")), &["no gradient rule", "Sin", &name]);
}

/// Exports whose names look right but that pfx would compile into wrong or unusable graphs are refused, each
/// saying why: half-precision weights, a token-type input (BERT-style), a position-like table narrower than the
/// embeddings (T5's relative buckets), and a folder whose config names another encoder-decoder.
#[test]
fn lookalike_exports_are_refused() {
    use pfx_compiler::tensor::{DType, Data, Tensor};
    let d = tmp("lookalike");
    let mut a = vec!["--prefix-len", "2"];
    a.extend_from_slice(SMALL);
    let legacy = || onnx_io::load(&graphs().join("gpt2-legacy/model.onnx")).unwrap();
    let table = |m: &pfx_compiler::ir::Model, rows: usize| {
        m.graph.initializers.iter().find(|(_, t)| t.shape.len() == 2 && t.shape[0] == rows).unwrap().0.clone()
    };

    // The token embedding (96 rows) in float16.
    let mut m = legacy();
    let wte = table(&m, 96);
    let n = m.graph.initializers[&wte].len();
    let t = Tensor::new(vec![96, n / 96], Data::Raw(DType::F16, vec![0; 2 * n]));
    m.graph.initializers.insert(wte, t);
    let f = d.join("f16.onnx");
    onnx_io::save(&m, &f, None).unwrap();
    fails_with(&compile(&f, &a, &d.join("b")), &["stores its weights in float16", "--weights f16"]);

    // A token_type_ids input.
    let mut m = legacy();
    let mut tt = m.graph.inputs[0].clone();
    tt.name = "token_type_ids".into();
    m.graph.inputs.push(tt);
    let f = d.join("bert.onnx");
    onnx_io::save(&m, &f, None).unwrap();
    fails_with(&compile(&f, &a, &d.join("b")), &["takes token_type_ids"]);

    // The position table (64 rows) as narrow as T5's relative bias table ([buckets, heads]).
    let mut m = legacy();
    let wpe = table(&m, 64);
    m.graph.initializers.insert(wpe, Tensor::f32(vec![64, 4], vec![0.0; 256]));
    let f = d.join("t5.onnx");
    onnx_io::save(&m, &f, None).unwrap();
    fails_with(&compile(&f, &a, &d.join("b")), &["looks up a 64×4 table", "T5"]);
    // `pfxc inspect` says so too.
    let o = Command::new(env!("CARGO_BIN_EXE_pfxc")).args(["inspect", f.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("not supported: the graph looks up a 64×4 table"), "{text}");

    // A BART export whose config says T5: its graphs have no relative position bias table.
    let folder = d.join("t5-export");
    std::fs::create_dir_all(&folder).unwrap();
    for e in std::fs::read_dir(graphs().join("bart-enc-deep")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, folder.join(p.file_name().unwrap())).unwrap();
        }
    }
    let cfg = std::fs::read_to_string(folder.join("config.json")).unwrap();
    std::fs::write(folder.join("config.json"), cfg.replace("\"model_type\": \"bart\"", "\"model_type\": \"t5\""))
        .unwrap();
    let bart = ["--bart-prefix", "peft", "--prefix-len", "2", "--batch", "2", "--src-len", "5", "--tgt-len", "4"];
    fails_with(
        &compile(&folder, &bart, &d.join("b")),
        &["found 0 relative position bias tables", "says T5 (model_type t5 or mt5), but its graphs are not T5's"],
    );
    // Another model type (LongT5; UMT5, whose layers each have a bias table): the path names those it compiles.
    for other in ["longt5", "umt5"] {
        let named = cfg.replace("\"model_type\": \"bart\"", &format!("\"model_type\": \"{other}\""));
        std::fs::write(folder.join("config.json"), named).unwrap();
        fails_with(
            &compile(&folder, &bart, &d.join("b")),
            &[
                &format!("says model_type \"{other}\""),
                "compiles bart, marian, pegasus, mbart, blenderbot, blenderbot-small, m2m_100, t5, mt5 exports only",
            ],
        );
    }
    // M2M100 (NLLB-200's model_type too) is on the path: its positions numbered from the ids are read off its graphs
    // (tests/compile_bart.rs checks graphs/m2m100-tiny against PyTorch + PEFT), so the name alone refuses nothing.
    std::fs::write(folder.join("config.json"), cfg.replace("\"model_type\": \"bart\"", "\"model_type\": \"m2m_100\""))
        .unwrap();
    let o = compile(&folder, &bart, &d.join("m2m"));
    assert!(o.status.success(), "model_type m2m_100 refused: {}", String::from_utf8_lossy(&o.stderr));
    // Languages are mBART's, M2M100's and NLLB's, checked against the tokenizer beside the export.
    let mut langs = bart.to_vec();
    langs.extend(["--src-lang", "en_XX", "--tgt-lang", "ro_RO"]);
    std::fs::copy(graphs().join("tokenizers/nllb-style/tokenizer.json"), folder.join("tokenizer.json")).unwrap();
    fails_with(
        &compile(&folder, &langs, &d.join("b")),
        &[
            "--src-lang en_XX is not a language code of",
            "tokenizer.json (neither `en_XX` nor `__en_XX__` is one of its tokens)",
            "(its language codes: eng_Latn, fra_Latn, deu_Latn, ron_Latn)",
        ],
    );
    let mut nllb = bart.to_vec();
    nllb.extend(["--src-lang", "eng_Latn", "--tgt-lang", "fra_Latn"]);
    let o = compile(&folder, &nllb, &d.join("nllb"));
    assert!(o.status.success(), "NLLB's languages refused: {}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(folder.join("tokenizer.json")).unwrap();
    std::fs::write(folder.join("config.json"), &cfg).unwrap();
    fails_with(
        &compile(&folder, &langs, &d.join("b")),
        &["--src-lang/--tgt-lang name the language codes of mBART, M2M100 and NLLB", "a bart export"],
    );
    // A forced token past the vocabulary (HF's generate fails on it): refused naming the file.
    let gen_cfg = std::fs::read_to_string(folder.join("generation_config.json")).unwrap();
    std::fs::write(
        folder.join("generation_config.json"),
        gen_cfg.replace("\"forced_eos_token_id\": 2", "\"forced_eos_token_id\": 5000"),
    )
    .unwrap();
    fails_with(
        &compile(&folder, &bart, &d.join("b")),
        &["generation_config.json: forced_eos_token_id is 5000, past the model's vocabulary (96 tokens)"],
    );
    // So is a banned or biased one.
    std::fs::write(folder.join("generation_config.json"), gen_cfg.replacen('{', "{\"bad_words_ids\": [[3, 96]],", 1))
        .unwrap();
    fails_with(
        &compile(&folder, &bart, &d.join("b")),
        &["generation_config.json: bad_words_ids holds 96, past the model's vocabulary (96 tokens)"],
    );
    std::fs::write(folder.join("generation_config.json"), gen_cfg).unwrap();
    // One that does not say: a T5 export would compile into wrong graphs on the BART path.
    std::fs::write(folder.join("config.json"), cfg.replace("\"model_type\": \"bart\",", "")).unwrap();
    fails_with(&compile(&folder, &bart, &d.join("b")), &["no model_type", "add its \"model_type\""]);
}
