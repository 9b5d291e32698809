//! The pfxrun binary: outputs, files, and clean errors (non-zero exit, no panic) on bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use pfx_runtime::read_safetensors;

fn pfxrun(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfxrun")).args(args).output().expect("pfxrun starts")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs pfxrun expecting failure; returns stderr. Checks for a clean error, not a panic.
fn fails(args: &[&str]) -> String {
    let o = pfxrun(args);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "pfxrun {args:?} succeeded: {out}");
    assert!(!err.contains("panicked"), "pfxrun {args:?} panicked: {err}");
    err
}

/// Compile options for the shipped small GPT-2: prefix 2 (no MLP), batch 2, sequence `seq`, generation graphs of
/// `rows` rows, prompts of `prompt_len` and `max_new` new tokens.
fn small_options(seq: usize, rows: usize, prompt_len: usize, max_new: usize) -> pfx_compiler::compile::CompileOptions {
    pfx_compiler::compile::CompileOptions {
        prefix_len: 2,
        mid_dim: None,
        batch: 2,
        seq,
        optimizer: Default::default(),
        seed: 0,
        generation: Some(pfx_compiler::compile::generate::GenShape { rows, prompt_len, max_new }),
        weights: Default::default(),
    }
}

/// The shipped small GPT-2 compiled into `dir/bundle`: prefix 2, batch 2, sequence (and prompt) `seq`, 2
/// generation rows of 4 new tokens.
fn e2e_small_bundle(dir: &Path, mid_dim: Option<usize>, seq: usize) -> std::path::PathBuf {
    let bundle = dir.join("bundle");
    let opts = pfx_compiler::compile::CompileOptions { mid_dim, ..small_options(seq, 2, seq, 4) };
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/e2e-small/model.onnx");
    pfx_compiler::compile::compile(&model, &opts, &bundle).unwrap();
    bundle
}

#[test]
fn run_prints_and_writes_outputs() {
    let dir = scratch("cli_run");
    let unit = unit_dir();
    let inputs = unit.join("matmul_softmax.b5.inputs.safetensors");
    let (_, expected) = case("matmul_softmax", "b5");
    for backend in backends() {
        let out = dir.join(format!("{backend}.safetensors"));
        let o = pfxrun(&[
            "run",
            p(&model("matmul_softmax")),
            "--inputs",
            p(&inputs),
            "--out",
            p(&out),
            "--backend",
            backend,
        ]);
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{backend}: {stderr}");
        assert!(stdout.contains("probs: float32 [5, 3] ["), "{backend}: {stdout}");
        assert!(stdout.contains("logits: float32 [5, 3] ["), "{backend}: {stdout}");
        assert_close(&format!("pfxrun {backend}"), &read_safetensors(&out).unwrap(), &expected);
    }
}

#[test]
fn bad_input_is_a_clean_error() {
    let dir = scratch("cli_errors");
    let unit = unit_dir();
    let mm = model("matmul_softmax");
    let mm_in = unit.join("matmul_softmax.b2.inputs.safetensors");
    let embed_in = unit.join("embed_external.b2s3.inputs.safetensors");
    let garbage = dir.join("garbage.onnx");
    std::fs::write(&garbage, b"not onnx").unwrap();
    let bad_dtype = dir.join("bad_dtype.safetensors");
    let mut t = std::collections::BTreeMap::new();
    t.insert("x".to_string(), pfx_runtime::HostTensor::from_i64([1, 4], vec![1, 2, 3, 4]).unwrap());
    pfx_runtime::write_safetensors(&bad_dtype, &t).unwrap();

    for backend in backends() {
        let b = ["--backend", backend];
        let e = fails(&[&["run", "/no/such/model.onnx", "--inputs", p(&mm_in)][..], &b].concat());
        assert!(e.contains("/no/such/model.onnx"), "{backend}: {e}");
        let e = fails(&[&["run", p(&mm), "--inputs", "/no/such/in.safetensors"][..], &b].concat());
        assert!(e.contains("/no/such/in.safetensors"), "{backend}: {e}");
        let e = fails(&[&["run", p(&garbage), "--inputs", p(&mm_in)][..], &b].concat());
        assert!(e.contains("garbage.onnx"), "{backend}: {e}");
        let e = fails(&[&["run", p(&mm), "--inputs", p(&embed_in)][..], &b].concat());
        assert!(e.contains("missing model input `x`"), "{backend}: {e}");
        let e = fails(&[&["run", p(&mm), "--inputs", p(&bad_dtype)][..], &b].concat());
        assert!(e.contains("must be float32"), "{backend}: {e}");
        let e = fails(&[&["run", p(&mm), "--inputs", p(&garbage)][..], &b].concat());
        assert!(e.contains("not a valid safetensors file"), "{backend}: {e}");
    }
    let e = fails(&["run", p(&mm), "--inputs", p(&mm_in), "--backend", "ort", "--device", "cuda:x"]);
    assert!(e.contains("invalid device"), "{e}");
    let e = fails(&["run", p(&mm), "--inputs", p(&mm_in), "--backend", "onnx"]);
    assert!(e.contains("unknown backend"), "{e}");
    let e = fails(&["run", p(&mm), "--inputs", p(&mm_in), "--device", "cuda"]);
    assert!(e.contains("needs --backend ort"), "{e}");
    let e = fails(&["run", p(&mm), "--inputs", p(&mm_in), "--ort-lib", "/some/libonnxruntime.so"]);
    assert!(e.contains("--ort-lib needs --backend ort"), "{e}");
    let e = fails(&["run", p(&mm), "--inputs", p(&mm_in), "--backend", "ort", "--ort-lib", "/no/such/lib.so"]);
    assert!(e.contains("/no/such/lib.so") && e.contains("does not exist"), "{e}");
    let e = fails(&["ort-info", "--ort-lib", p(&garbage)]);
    assert!(e.contains("garbage.onnx"), "{e}");
    // A library cut short (an interrupted copy): the loader would crash the process with SIGBUS.
    let cut = dir.join("libonnxruntime.so.1.99.0");
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    std::fs::write(&cut, &me[..65536]).unwrap();
    let e = fails(&["ort-info", "--ort-lib", p(&cut)]);
    assert!(e.contains("libonnxruntime.so.1.99.0 is truncated (65536 bytes"), "{e}");
    // Token ids past the embedding: tract checks its Gather indices with a panic, which must reach the user as an
    // error (ONNX Runtime reports them itself).
    let gpt2 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/gpt2-legacy/model.onnx");
    let ids = dir.join("ids_past_the_vocabulary.safetensors");
    let mut t = std::collections::BTreeMap::new();
    t.insert("input_ids".to_string(), pfx_runtime::HostTensor::from_i64([2, 8], vec![1000; 16]).unwrap());
    t.insert("attention_mask".to_string(), pfx_runtime::HostTensor::from_i64([2, 8], vec![1; 16]).unwrap());
    pfx_runtime::write_safetensors(&ids, &t).unwrap();
    let e = fails(&["run", p(&gpt2), "--inputs", p(&ids)]);
    assert!(e.contains("tract stopped on an input outside what the graph accepts") && e.contains("gather"), "{e}");
    let e = fails(&["run", p(&gpt2), "--inputs", p(&ids), "--out", p(&dir)]);
    assert!(e.contains("is a folder"), "{e}");
    // A graph with past whose symbolic sizes tract cannot tie to the inputs: pointed to `pfxc specialize`.
    let with_past = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/e2e-small/model.onnx");
    let mut t = std::collections::BTreeMap::new();
    t.insert("input_ids".to_string(), pfx_runtime::HostTensor::from_i64([2, 5], vec![1; 10]).unwrap());
    t.insert("attention_mask".to_string(), pfx_runtime::HostTensor::from_i64([2, 8], vec![1; 16]).unwrap());
    for i in 0..4 {
        for kv in ["key", "value"] {
            let zeros = pfx_runtime::HostTensor::from_f32(vec![2, 4, 3, 32], vec![0.0; 768]).unwrap();
            t.insert(format!("past_key_values.{i}.{kv}"), zeros);
        }
    }
    let past_in = dir.join("past_inputs.safetensors");
    pfx_runtime::write_safetensors(&past_in, &t).unwrap();
    let e = fails(&["run", p(&with_past), "--inputs", p(&past_in)]);
    assert!(e.contains("its sizes are symbolic") && e.contains("pfxc specialize"), "{e}");
}

#[test]
fn peft_adapters_and_reference_files_are_checked() {
    let dir = scratch("cli_peft_score");
    let bundle = e2e_small_bundle(&dir, None, 16);
    let init = bundle.join("prefix.init.safetensors");
    let adapter = dir.join("adapter");
    let o = pfxrun(&["export-peft", p(&bundle), "--prefix", p(&init), "-o", p(&adapter)]);
    assert!(o.status.success(), "{}", text(&o).1);
    // The round trip gives the prefix back, into a folder that did not exist.
    let back = dir.join("new/folder/prefix.safetensors");
    let o = pfxrun(&["import-peft", p(&bundle), p(&adapter), "-o", p(&back)]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(read_safetensors(&back).unwrap(), read_safetensors(&init).unwrap());
    // The file now exists (a trained prefix, say): not overwritten.
    let e = fails(&["import-peft", p(&bundle), p(&adapter), "-o", p(&back)]);
    assert!(e.contains("exists: choose another --output"), "{e}");
    // An adapter whose config names other sizes is not this bundle's, even when its tensor has the same shape.
    let config = adapter.join("adapter_config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    let mut c: serde_json::Value = serde_json::from_str(&original).unwrap();
    c["num_layers"] = serde_json::json!(99);
    std::fs::write(&config, c.to_string()).unwrap();
    let e = fails(&["import-peft", p(&bundle), p(&adapter), "-o", p(&back)]);
    assert!(e.contains("num_layers = 99; this bundle has 4"), "{e}");
    std::fs::write(&config, &original).unwrap();
    // A baked bundle has no trainable prefix to pair an adapter with.
    let baked = dir.join("baked");
    pfx_compiler::compile::bake::bake(&bundle, &init, &baked).unwrap();
    let e = fails(&["import-peft", p(&baked), p(&adapter), "-o", p(&back)]);
    assert!(e.contains("is baked"), "{e}");
    // eval needs the eval_step graph only; a baked bundle has none.
    let data = dir.join("four.txt");
    let train = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/e2e_train.txt"));
    std::fs::write(&data, train.unwrap().lines().take(4).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    let eval = |b: &Path| {
        let o = pfxrun(&["eval", p(b), "--data", p(&data), "--prefix", p(&init)]);
        assert!(o.status.success(), "{}", text(&o).1);
        text(&o).0
    };
    let with_all = eval(&bundle);
    for g in ["train_step.onnx", "grads.onnx"] {
        std::fs::remove_file(bundle.join(g)).unwrap();
    }
    assert_eq!(eval(&bundle), with_all);
    let e = fails(&["eval", p(&baked), "--data", p(&data)]);
    assert!(e.contains("is baked"), "{e}");
    // One hypothesis: a reference file without blank lines is its group (what `generate --refs-out` writes).
    let (hyp, refs) = (dir.join("one.hyp"), dir.join("one.refs"));
    std::fs::write(&hyp, "the cat sat\n").unwrap();
    std::fs::write(&refs, "the cat sat\nthe cat sits\n").unwrap();
    let o = pfxrun(&["score", "--hyp", p(&hyp), "--refs", p(&refs)]);
    assert!(o.status.success(), "{}", text(&o).1);
    std::fs::write(&hyp, "the cat sat\na dog\n").unwrap();
    std::fs::write(&refs, "the cat sat\nthe cat sits\na dog\n").unwrap();
    let e = fails(&["score", "--hyp", p(&hyp), "--refs", p(&refs)]);
    assert!(e.contains("no blank line, so each line was read as the one reference"), "{e}");
}

#[test]
fn ort_info_reports_the_library() {
    if !ort_wanted() {
        return;
    }
    let o = pfxrun(&["ort-info"]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("ONNX Runtime 1.") && stdout.contains("CPUExecutionProvider"), "{stdout}");
}

/// `pfxrun devices` reports what the CUDA driver says (here, typically: none) and ONNX Runtime's providers,
/// and exits 0 either way.
#[test]
fn devices_reports_cuda_and_onnx_runtime() {
    let o = pfxrun(&["devices"]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success() && !stderr.contains("panicked"), "{stderr}");
    let cuda_outcomes =
        ["no CUDA driver found", "no CUDA device", "cuda:0 ", "the CUDA driver is installed but failed"];
    assert!(cuda_outcomes.iter().any(|c| stdout.contains(c)), "{stdout}");
    if ort_wanted() {
        assert!(stdout.contains("ONNX Runtime 1.") && stdout.contains("--device cuda"), "{stdout}");
    }
}

/// A libcuda without the driver API (cudarc panics on missing symbols): reported, exit 0, no panic.
#[test]
fn devices_survives_a_broken_cuda_driver() {
    let dir = scratch("fake_cuda");
    let lib = dir.join("libcuda.so.1");
    let built = Command::new("cc").args(["-shared", "-x", "c", "/dev/null", "-o", p(&lib)]).status();
    if !built.is_ok_and(|s| s.success()) {
        eprintln!("no C compiler to build a stand-in libcuda; skipping");
        return;
    }
    let o = Command::new(env!("CARGO_BIN_EXE_pfxrun"))
        .arg("devices")
        .env("LD_LIBRARY_PATH", &dir)
        .env("PFX_PYTHON", "/nonexistent/python")
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success() && !stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("the CUDA driver is installed but failed"), "{stdout}");
    assert!(stdout.contains("ONNX Runtime: not loaded") && stdout.contains("/nonexistent/python"), "{stdout}");
    // A library the user names must load: the report, then an error.
    let o = pfxrun(&["devices", "--ort-lib", "/no/such/libonnxruntime.so"]);
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success() && stdout.contains("CUDA") && stdout.contains("not loaded"), "{stdout}");
    assert!(stderr.contains("--ort-lib /no/such/libonnxruntime.so could not be loaded"), "{stderr}");
}

#[test]
fn gpu_options_are_checked_before_anything_runs() {
    let e = fails(&["train", "b", "--train", "t.txt", "-o", "o", "--cuda-graph"]);
    assert!(e.contains("--cuda-graph needs --backend ort"), "{e}");
    let e = fails(&["generate", "b", "--input", "x", "--ort-lib", "/some/libonnxruntime.so"]);
    assert!(e.contains("--ort-lib needs --backend ort"), "{e}");
    let e = fails(&["eval", "b", "--data", "d.txt", "--backend", "ort", "--tf32", "on"]);
    assert!(e.contains("--tf32") && e.contains("not cpu"), "{e}");
    let e = fails(&["generate", "b", "--input", "x", "--backend", "ort", "--device", "cuda:1", "--trt-fp16"]);
    assert!(e.contains("--trt-fp16") && e.contains("--device tensorrt"), "{e}");
    let e = fails(&["eval", "b", "--data", "d.txt", "--backend", "ort", "--tf32", "sometimes"]);
    assert!(e.contains("expected `on` or `off`"), "{e}");
    let e = fails(&["train", "b", "--train", "t.txt", "-o", "o", "--allow-cpu-fallback"]);
    assert!(e.contains("--allow-cpu-fallback needs --backend ort"), "{e}");
}

/// A decoder compiled from a Llama export (`model_type` "llama" in its config.json) frames its text examples with
/// the model's own tokens: its tokenizer's `<s>` before the source, its config's end-of-text id after the source
/// and after the target. Against PEFT (`graphs/make_text_references.py`: the tiny GQA Llama with PEFT's saved
/// adapter and a Llama-style tokenizer): `pfxrun eval` of the text file gives PEFT's loss and `pfxrun generate`
/// its greedy texts, on every backend. Without an end-of-text id the text commands refuse with the reason;
/// another tokenizer than the export's is warned about. A GPT-2 export records "gpt2" and keeps GPT-2's format.
#[test]
fn text_commands_on_models_with_their_own_tokens_equal_peft() {
    let dir = scratch("cli_own_tokens");
    let graphs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(graphs.join("peft-decoders/text-llama-gqa-tiny.json")).unwrap())
            .unwrap();
    // The export folder a user would have: the model, its config.json saying <s> = 1 and </s> = 2 (the tokenizer's),
    // its tokenizer files.
    let export = dir.join("export");
    std::fs::create_dir_all(&export).unwrap();
    std::fs::copy(graphs.join("llama-gqa-tiny/model.onnx"), export.join("model.onnx")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(graphs.join("llama-gqa-tiny/config.json")).unwrap()).unwrap();
    config["bos_token_id"] = 1.into();
    config["eos_token_id"] = reference["eos"].clone();
    std::fs::write(export.join("config.json"), config.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(graphs.join("tokenizers/llama-style").join(f), export.join(f)).unwrap();
    }
    let opts = pfx_compiler::compile::CompileOptions {
        prefix_len: reference["prefix_len"].as_u64().unwrap() as usize,
        mid_dim: None,
        batch: 2,
        seq: reference["seq"].as_u64().unwrap() as usize,
        optimizer: Default::default(),
        seed: 0,
        generation: Some(pfx_compiler::compile::generate::GenShape { rows: 2, prompt_len: 40, max_new: 8 }),
        weights: Default::default(),
    };
    let bundle = dir.join("llama");
    let m = pfx_compiler::compile::compile(&export.join("model.onnx"), &opts, &bundle).unwrap();
    assert_eq!((m.model_type.as_deref(), m.eos_token_id), (Some("llama"), Some(2)));
    let adapter = graphs.join("peft-decoders/adapter-llama-gqa-tiny");
    let prefix = dir.join("peft.safetensors");
    let out = pfxrun(&["import-peft", p(&bundle), p(&adapter), "-o", p(&prefix)]);
    assert!(out.status.success(), "{}", text(&out).1);
    let data = graphs.join("peft-decoders/text-e2e.txt");
    let want_loss = reference["loss"].as_f64().unwrap();
    let want_texts: Vec<&str> = reference["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    for backend in backends() {
        let out = pfxrun(&["eval", p(&bundle), "--data", p(&data), "--prefix", p(&prefix), "--backend", backend]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{backend}: {stderr}");
        assert!(stderr.contains("<s> source </s> target </s>"), "{backend}: the format is told: {stderr}");
        let loss: f64 = stdout.split_whitespace().find_map(|w| w.parse().ok()).expect(&stdout);
        let e = (loss - want_loss).abs() / want_loss;
        assert!(e <= 1e-5, "{backend}: eval loss {loss}, PEFT {want_loss} (rel {e:e})");
        let out = pfxrun(&["generate", p(&bundle), "--inputs", p(&data), "--prefix", p(&prefix), "--backend", backend]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{backend}: {stderr}");
        // Printed under each source, trimmed.
        let got: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("  -> ")).collect();
        assert_eq!(got, want_texts.iter().map(|t| t.trim()).collect::<Vec<_>>(), "{backend}: greedy texts");
        println!("{backend}: eval loss rel err {e:.1e}; greedy texts equal PEFT's");
    }
    // A prompt longer than the compiled 40 tokens is cut before its source, after the `<s>` it starts with.
    let long = "name : Aromi | food : Chinese | area : riverside | eatType : pub | near : Zizzi";
    let out = pfxrun(&["generate", p(&bundle), "--input", long, "--prefix", p(&prefix)]);
    let (_, stderr) = text(&out);
    assert!(out.status.success() && stderr.contains("after the 1 special token(s) they start with"), "{stderr}");
    // A --prompt-len that leaves no room for the source between `<s>` and `</s>` is refused, not cut to nothing.
    let tight = dir.join("tight");
    let gen = Some(pfx_compiler::compile::generate::GenShape { rows: 2, prompt_len: 2, max_new: 8 });
    let tight_opts = pfx_compiler::compile::CompileOptions { generation: gen, ..opts.clone() };
    pfx_compiler::compile::compile(&export.join("model.onnx"), &tight_opts, &tight).unwrap();
    let e = fails(&["generate", p(&tight), "--input", "name : X", "--prefix", p(&prefix)]);
    assert!(e.contains("--prompt-len 2 leaves no room for its source"), "{e}");
    // Another tokenizer than the export's is warned about (the GPT-2-style word tokenizer of a few ids).
    let words = dir.join("words.json");
    std::fs::write(
        &words,
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "name": 1, ":": 2, "X": 3}, "unk_token": "[UNK]"}}"#,
    )
    .unwrap();
    let out = pfxrun(&["eval", p(&bundle), "--data", p(&data), "--tokenizer", p(&words)]);
    let (_, stderr) = text(&out);
    assert!(stderr.contains("warning:") && stderr.contains("is another"), "{stderr}");
    // A tokenizer with fewer ids than the model has rows (as Qwen2.5's and Phi-3's): the ids the model generates
    // past them are left out of the text, with a note, not an error.
    let few = dir.join("few.json");
    std::fs::write(
        &few,
        r#"{"version": "1.0", "truncation": null, "padding": null, "normalizer": null,
            "added_tokens": [{"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": false, "special": true}],
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "name": 3, ":": 4, "X": 5},
                      "unk_token": "<unk>"}}"#,
    )
    .unwrap();
    let out = pfxrun(&["generate", p(&bundle), "--input", "name : X", "--prefix", p(&prefix), "--tokenizer", p(&few)]);
    let (_, stderr) = text(&out);
    assert!(out.status.success() && stderr.contains("left out of the texts"), "{stderr}");
    // No end-of-text id beside the export: the text commands refuse, naming what to do; `run` is not concerned.
    config.as_object_mut().unwrap().remove("eos_token_id");
    std::fs::write(export.join("config.json"), config.to_string()).unwrap();
    std::fs::remove_file(export.join("generation_config.json")).ok();
    let bare = dir.join("bare");
    let m = pfx_compiler::compile::compile(&export.join("model.onnx"), &opts, &bare).unwrap();
    assert_eq!(m.eos_token_id, None);
    let run = dir.join("run");
    for args in [
        vec!["train", p(&bare), "--train", p(&data), "-o", p(&run)],
        vec!["eval", p(&bare), "--data", p(&data)],
        vec!["generate", p(&bare), "--input", "name : X"],
    ] {
        let e = fails(&args);
        assert!(e.contains("`llama` model") && e.contains("eos_token_id") && e.contains("pfxrun run"), "{args:?}: {e}");
    }
    assert!(!run.exists(), "a refused train leaves no folder");
    let gpt2 = pfx_compiler::compile::compile(&graphs.join("gpt2-optimum/model.onnx"), &opts, &dir.join("gpt2"));
    assert_eq!(gpt2.unwrap().model_type.as_deref(), Some("gpt2"));
}

/// `pfxrun generate` refuses, before any work, what would panic, overwrite an input or lose finished work.
#[test]
fn generate_refuses_what_would_fail_late_or_lose_work() {
    let dir = scratch("cli_generate_checks");
    let graphs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs");
    let bundle = e2e_small_bundle(&dir, Some(8), 32);
    let init = bundle.join("prefix.init.safetensors");
    // (train) A run refused for its data leaves no output folder behind (it is made early, to be locked).
    let run = dir.join("run");
    let e = fails(&["train", p(&bundle), "--train", p(&dir.join("missing.txt")), "-o", p(&run)]);
    assert!(e.contains("missing.txt") && !run.exists(), "{e}");
    // Nor the folders it made above it (`-o a/b/run` with no `a`).
    let nested = dir.join("a").join("b").join("run");
    let e = fails(&["train", p(&bundle), "--train", p(&dir.join("missing.txt")), "-o", p(&nested)]);
    assert!(e.contains("missing.txt") && !dir.join("a").exists(), "{e}");
    // Also through `..` (`-o a/b/../run` makes a/b and a/run; `a/b/../b/run` names a/b twice).
    for dotted in ["a/b/../run", "a/b/../b/run"] {
        let e = fails(&["train", p(&bundle), "--train", p(&dir.join("missing.txt")), "-o", p(&dir.join(dotted))]);
        assert!(e.contains("missing.txt") && !dir.join("a").exists(), "{dotted}: {e}");
    }
    let srcs = dir.join("mrs.src");
    std::fs::write(&srcs, "name : The Eagle\n\nname : Aromi\n").unwrap();
    let gen = |extra: &[&str]| -> Vec<String> {
        let mut a = vec!["generate".to_string(), p(&bundle).into(), "--prefix".into(), p(&init).into()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let fails_gen = |extra: &[&str], needle: &str| {
        let args = gen(extra);
        let e = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(e.contains(needle), "{extra:?}: {e}");
    };
    // A tokenizer with ids past the model's 2048 rows (tract panicked in its Gather).
    let gpt2_tokenizer = graphs.join("tokenizers/gpt2/tokenizer.json");
    fails_gen(&["--input", "name : X", "--tokenizer", p(&gpt2_tokenizer)], "has token ids up to 50256");
    fails_gen(&["--input", "name : X", "--beams", "2", "--length-penalty=NaN"], "--length-penalty must be a finite");
    fails_gen(&["--inputs", p(&srcs), "--output", p(&srcs)], "is the --inputs file");
    fails_gen(&["--inputs", p(&srcs), "--output", p(&dir)], "is a folder: give a file path");
    let under_a_file = srcs.join("out.txt");
    fails_gen(&["--inputs", p(&srcs), "--output", p(&under_a_file)], "is a file, not a folder");
    fails_gen(&["--inputs", p(&srcs), "--refs-out", p(&dir.join("refs.txt"))], "no references to write");
    fails_gen(
        &["--input", "name : X", "--beams", "3", "--output", p(&dir.join("o.txt"))],
        "--beams must be between 1 and 2",
    );
    assert!(!dir.join("o.txt.partial").exists(), "a refused request writes nothing");
    // Prefixes that are not float32, or hold NaN, are refused when read, naming the file.
    let mut prefix = pfx_runtime::read_safetensors(&init).unwrap();
    let name = prefix.keys().next().unwrap().clone();
    let shape = prefix[&name].shape().to_vec();
    let n = prefix[&name].len();
    prefix.insert(name.clone(), pfx_runtime::HostTensor::from_f64(shape.clone(), vec![0.0; n]).unwrap());
    let f64_prefix = dir.join("f64.safetensors");
    pfx_runtime::write_safetensors(&f64_prefix, &prefix).unwrap();
    let e = fails(&["generate", p(&bundle), "--prefix", p(&f64_prefix), "--input", "x"]);
    assert!(e.contains("f64.safetensors") && e.contains("a prefix is float32"), "{e}");
    prefix.insert(name, pfx_runtime::HostTensor::from_f32(shape, vec![f32::NAN; n]).unwrap());
    let nan_prefix = dir.join("nan.safetensors");
    pfx_runtime::write_safetensors(&nan_prefix, &prefix).unwrap();
    let e = fails(&["generate", p(&bundle), "--prefix", p(&nan_prefix), "--input", "x"]);
    assert!(e.contains("nan.safetensors") && e.contains("NaN"), "{e}");
    // A blank line in a one-per-line file is reported (outputs are one per non-blank source).
    let out = dir.join("hyp.txt");
    let o = pfxrun(&gen(&["--inputs", p(&srcs), "--output", p(&out)]).iter().map(String::as_str).collect::<Vec<_>>());
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("1 blank line(s) (line 2)"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);
}

/// Sampling and the length limit, from flags and from the model's generation config: the notes say where each
/// setting came from, a seed repeats a run, top-k 1 is greedy search, and what cannot be done is refused.
#[test]
fn sampling_and_length_settings_from_flags_and_the_generation_config() {
    let dir = scratch("cli_sampling");
    let graphs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/e2e-small");
    let export = dir.join("export");
    std::fs::create_dir_all(&export).unwrap();
    for f in ["model.onnx", "tokenizer.json"] {
        std::fs::copy(graphs.join(f), export.join(f)).unwrap();
    }
    let compile = |settings: &str, name: &str| {
        std::fs::write(export.join("generation_config.json"), settings).unwrap();
        let opts = small_options(16, 2, 16, 4);
        let bundle = dir.join(name);
        pfx_compiler::compile::compile(&export.join("model.onnx"), &opts, &bundle).unwrap();
        bundle
    };
    let run = |bundle: &Path, extra: &[&str]| -> (String, String) {
        let mut args = vec!["generate", p(bundle), "--input", "name : The Eagle | food : French"];
        args.extend(extra);
        let o = pfxrun(&args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{args:?}: {err}");
        (out, err)
    };
    let sampling = compile(r#"{"do_sample": true, "temperature": 0.8, "top_k": 20, "max_new_tokens": 3}"#, "sampling");
    let (first, log) = run(&sampling, &["--seed", "5"]);
    assert!(
        log.contains("from the model's generation config (flags change them): at most 3 new tokens, sampling, temperature 0.8, top-k 20"),
        "{log}"
    );
    assert!(log.contains("sampling with seed 5 (--seed 5 draws the same tokens again)"), "{log}");
    assert_eq!(run(&sampling, &["--seed", "5"]).0, first, "a seed repeats the run");
    // Without a seed, a new one is drawn and said.
    let (_, log) = run(&sampling, &[]);
    assert!(log.contains("note: sampling with seed "), "{log}");
    // Top-k 1 keeps the best token only: greedy search's tokens.
    let (greedy, log) = run(&sampling, &["--sample", "false"]);
    assert!(!log.contains("sampling with seed") && !log.contains(", sampling"), "{log}");
    assert_eq!(run(&sampling, &["--top-k", "1", "--seed", "9"]).0, greedy);
    // A length limit above the bundle's is capped, and said.
    let long = compile(r#"{"max_new_tokens": 9, "repetition_penalty": 1.3}"#, "long");
    let (_, log) = run(&long, &[]);
    assert!(
        log.contains("allows 9 new tokens, but the bundle generates at most 4 (pfxc compile --max-new): 4"),
        "{log}"
    );
    assert!(log.contains("(flags change them): repetition penalty 1.3"), "{log}");
    assert!(!log.contains("sampling with seed"), "{log}");
    // What cannot be done, or makes no sense, is refused before anything runs.
    let fails_with = |extra: &[&str], needle: &str| {
        let mut args = vec!["generate", p(&sampling), "--input", "x"];
        args.extend(extra);
        let e = fails(&args);
        assert!(e.contains(needle), "{extra:?}: {e}");
    };
    // Sampling with beams is beam sampling; with top-k 1 (2 kept per beam, as HF's min_tokens_to_keep) two beams
    // offer the 4 candidates a step draws: all of them, whatever the seed.
    let (beam_sampled, log) = run(&sampling, &["--beams", "2", "--seed", "5"]);
    assert!(log.contains("sampling with seed 5"), "{log}");
    assert_eq!(run(&sampling, &["--beams", "2", "--seed", "5"]).0, beam_sampled, "a seed repeats beam sampling");
    let pinned = run(&sampling, &["--beams", "2", "--top-k", "1", "--seed", "1"]).0;
    assert_eq!(run(&sampling, &["--beams", "2", "--top-k", "1", "--seed", "2"]).0, pinned);
    let config_beams = compile(r#"{"do_sample": true, "num_beams": 2, "max_new_tokens": 3}"#, "beam-sampling");
    let (_, log) = run(&config_beams, &["--seed", "5"]);
    assert!(log.contains("sampling with the generation config's 2 beams: beam sampling"), "{log}");
    fails_with(&["--sample", "false", "--temperature", "0.5"], "--temperature shapes sampling, which --sample false");
    fails_with(&["--top-p", "1.5"], "--top-p must be a number from 0 to 1");
    fails_with(&["--temperature", "0"], "--temperature must be a number above 0");
    fails_with(&["--repetition-penalty", "0"], "--repetition-penalty must be a number above 0");
    fails_with(&["--output", p(&dir.join("o.txt")), "--resume"], "give the --seed it printed");
    // A refused run shows no seed (one nobody could use), and a seed alone does not turn sampling on (as in HF).
    let o = dir.join("o.txt");
    let mut args = vec!["generate", p(&sampling), "--input", "x", "--output", p(&o), "--resume"];
    assert!(!fails(&args).contains("sampling with seed"));
    args.truncate(4);
    args.extend(["--sample", "true", "--beams", "9"]);
    assert!(!fails(&args).contains("sampling with seed"));
    let (seeded, log) = run(&long, &["--seed", "3"]);
    assert!(log.contains("--seed has no effect: this run does not sample"), "{log}");
    assert_eq!(seeded, run(&long, &[]).0);
    fails_with(&["--sample", "false", "--num-return", "2"], "greedy search has one output");
    fails_with(&["--sample", "false", "--beams", "2", "--num-return", "3"], "more hypotheses than beam search keeps");
    // Several outputs per source: consecutive lines, on the screen and in --output; --refs-out repeats each
    // source's references for each of its outputs, so `pfxrun score` pairs them.
    let (out, _) = run(&sampling, &["--seed", "5", "--num-return", "3"]);
    assert_eq!(out.lines().filter(|l| l.starts_with("  -> ")).count(), 3, "{out}");
    let e2e = dir.join("two.txt");
    std::fs::write(&e2e, "name : The Eagle||The Eagle is here.\nname : Aromi||Aromi is there.\n").unwrap();
    let (hyp, refs) = (dir.join("hyp.txt"), dir.join("refs.txt"));
    let args = ["--inputs", p(&e2e), "--output", p(&hyp), "--refs-out", p(&refs), "--sample", "false"];
    let mut all = vec!["generate", p(&sampling)];
    all.extend(args);
    all.extend(["--beams", "2", "--num-return", "2"]);
    let o = pfxrun(&all);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(std::fs::read_to_string(&hyp).unwrap().lines().count(), 4);
    let groups = std::fs::read_to_string(&refs).unwrap();
    assert_eq!(
        groups.trim_end().split("\n\n").collect::<Vec<_>>(),
        ["The Eagle is here.", "The Eagle is here.", "Aromi is there.", "Aromi is there."]
    );
    // The length decay, renormalization, non-finite clean-up and top-h are applied from the config, and said.
    let more = r#"{"exponential_decay_length_penalty": [2, 1.5], "renormalize_logits": true,
        "remove_invalid_values": true, "do_sample": true, "top_h": 0.5, "num_beam_groups": 2, "stop_strings": "."}"#;
    let (_, log) = run(&compile(more, "more"), &["--seed", "1"]);
    for said in [
        "end-of-sequence length decay after 2 new tokens (factor 1.5)",
        "renormalized scores",
        "non-finite scores made finite",
        "top-h 0.5",
        "stop strings [\".\"]",
        "also sets num_beam_groups 2, which pfxrun generate does not do",
    ] {
        assert!(log.contains(said), "{said}: {log}");
    }
    fails_with(&["--top-h", "0"], "--top-h must be a number above 0, at most 1");
    let cold = compile(r#"{"do_sample": true, "temperature": 0.0}"#, "cold");
    let e = fails(&["generate", p(&cold), "--input", "x"]);
    assert!(e.contains("sets temperature 0, which sampling cannot use"), "{e}");
}

/// A decoder's `max_length` and `min_length` count the prompt, as in HF's `generate`: each prompt gets its own number
/// of new tokens, greedy and beam search, with a forced last token and early stopping "never" (references:
/// `graphs/e2e-small/make_length_references.py`, the bare model, one prompt per HF call; here the prompts share
/// batches). A prompt as long as max_length is refused, --max-new replaces it, and the bundle's cap is said.
#[test]
fn prompt_counting_length_limits_follow_hf() {
    let dir = scratch("cli_length_limits");
    let graphs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/e2e-small");
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(graphs.join("length-limits.json")).unwrap()).unwrap();
    let count = |key: &str| refs[key].as_u64().unwrap() as usize;
    let export = dir.join("export");
    std::fs::create_dir_all(&export).unwrap();
    for f in ["model.onnx", "tokenizer.json"] {
        std::fs::copy(graphs.join(f), export.join(f)).unwrap();
    }
    let compile = |settings: &serde_json::Value, name: &str| {
        std::fs::write(export.join("generation_config.json"), settings.to_string()).unwrap();
        let bundle = dir.join(name);
        let opts = small_options(16, 3, count("prompt_len"), count("max_new"));
        pfx_compiler::compile::compile(&export.join("model.onnx"), &opts, &bundle).unwrap();
        bundle
    };
    let cases = refs["cases"].as_array().unwrap();
    let sources: Vec<&str> = cases.iter().map(|c| c["source"].as_str().unwrap()).take(4).collect();
    let inputs = dir.join("sources.txt");
    std::fs::write(&inputs, sources.join("\n") + "\n").unwrap();
    let mut checked = 0;
    for (i, group) in cases.chunks(sources.len()).enumerate() {
        let settings = &group[0]["settings"];
        let bundle = compile(settings, &format!("bundle{i}"));
        let o = pfxrun(&["generate", p(&bundle), "--no-prefix", "--inputs", p(&inputs)]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{settings}: {err}");
        let got: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("  -> ")).collect();
        let want: Vec<&str> = group.iter().map(|c| c["text"].as_str().unwrap()).collect();
        assert_eq!(got, want, "{settings}");
        if let Some(n) = settings.get("max_length") {
            assert!(err.contains(&format!("at most {n} tokens with the prompt (max_length)")), "{err}");
        }
        checked += group.len();
    }
    assert_eq!(checked, 28);
    // A prompt as long as max_length leaves nothing to generate: refused, as HF does; --max-new replaces the limit.
    let short = compile(&serde_json::json!({"max_length": 12}), "short");
    let e = fails(&["generate", p(&short), "--no-prefix", "--inputs", p(&inputs)]);
    assert!(e.contains("prompt 1 has 14 tokens, and the model's generation config sets max_length 12"), "{e}");
    let o = pfxrun(&["generate", p(&short), "--no-prefix", "--input", sources[0], "--max-new", "3"]);
    let (out, err) = text(&o);
    assert!(o.status.success() && !err.contains("max_length"), "{err}");
    let three = out.lines().find_map(|l| l.strip_prefix("  -> ")).unwrap();
    assert!(cases[0]["text"].as_str().unwrap().starts_with(three) && three.split(' ').count() == 3, "{three}");
    // Settings HF warns about are said: a max_new_tokens beside max_length (it wins), min_length above max_length.
    let both = compile(&serde_json::json!({"max_length": 30, "max_new_tokens": 3, "min_length": 40}), "both");
    let (_, err) = text(&pfxrun(&["generate", p(&both), "--no-prefix", "--input", sources[0]]));
    assert!(err.contains("sets max_new_tokens 3, which replaces its max_length 30"), "{err}");
    let over = compile(&serde_json::json!({"max_length": 30, "min_length": 40}), "over");
    let (_, err) = text(&pfxrun(&["generate", p(&over), "--no-prefix", "--input", sources[0]]));
    assert!(err.contains("sets min_length 40 above its max_length 30: generation stops at max_length"), "{err}");
    // A max_length beyond what the bundle generates is capped, and said.
    let long = compile(&serde_json::json!({"max_length": 60}), "long");
    let (_, err) = text(&pfxrun(&["generate", p(&long), "--no-prefix", "--inputs", p(&inputs)]));
    assert!(err.contains("max_length 60 leaves 2 prompt(s) more than the 40 new tokens the bundle generates"), "{err}");
}

/// Stop strings end a generation as HF's `generate(stop_strings=...)` does, greedy and beam search, the text that
/// completes one kept (references: `graphs/e2e-small/make_stop_references.py`, the bare model).
#[test]
fn stop_strings_end_generation_as_hfs_do() {
    let dir = scratch("cli_stop_strings");
    let graphs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/e2e-small");
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(graphs.join("stop-strings.json")).unwrap()).unwrap();
    let max_new = refs["max_new"].as_u64().unwrap() as usize;
    let opts = small_options(16, 3, 40, max_new);
    let bundle = dir.join("bundle");
    pfx_compiler::compile::compile(&graphs.join("model.onnx"), &opts, &bundle).unwrap();
    let cases = refs["cases"].as_array().unwrap();
    let mut checked = 0;
    for case in cases {
        let (source, want) = (case["source"].as_str().unwrap(), case["text"].as_str().unwrap());
        let beams = case["beams"].as_u64().unwrap().to_string();
        let mut args = vec!["generate", p(&bundle), "--no-prefix", "--input", source, "--beams", &beams];
        let stops: Vec<&str> = case["stop"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
        for s in &stops {
            args.extend(["--stop", s]);
        }
        let o = pfxrun(&args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{args:?}: {err}");
        let got = out.lines().find_map(|l| l.strip_prefix("  -> ")).unwrap_or_default();
        assert_eq!(got, want, "{stops:?}, {beams} beams, {source}");
        checked += 1;
    }
    assert_eq!(checked, 27);
    // An empty stop string would end every generation at once: refused.
    assert!(fails(&["generate", p(&bundle), "--no-prefix", "--input", "x", "--stop", ""]).contains("cannot be empty"));
}

/// Inputs that name their own prefix (a JSONL line's "prefix", relative to the file) share batches with the others
/// and generate what each generates alone with its prefix as `--prefix` (greedy and beam search, both backends:
/// the prefill runs once per prefix, the decode steps are shared); what cannot be served is refused, naming it.
#[test]
fn inputs_with_their_own_prefixes_share_batches() {
    let dir = scratch("cli_mixed_prefixes");
    // 3 rows: batches of 3 prompts (greedy) hold up to three prefixes at once.
    let bundle = dir.join("bundle");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/e2e-small/model.onnx");
    let opts = pfx_compiler::compile::CompileOptions { mid_dim: Some(8), ..small_options(32, 3, 32, 6) };
    pfx_compiler::compile::compile(&model, &opts, &bundle).unwrap();
    let init = bundle.join("prefix.init.safetensors");
    let mixed = MixedPrefixes::write(&dir, &init);
    for backend in backends() {
        for beams in ["1", "3"] {
            mixed.check(&bundle, &["--backend", backend, "--beams", beams, "--max-new", "6"]);
        }
    }
    let users = dir.join("users");
    // Refused, naming what: a prefix file that is missing, a baked bundle.
    std::fs::write(users.join("missing.jsonl"), "{\"source\": \"name : X\", \"prefix\": \"nobody.safetensors\"}\n")
        .unwrap();
    let e = fails(&["generate", p(&bundle), "--inputs", p(&users.join("missing.jsonl"))]);
    assert!(
        e.contains("missing.jsonl:1: reading the prefix this line names") && e.contains("nobody.safetensors"),
        "{e}"
    );
    let baked = dir.join("baked");
    pfx_compiler::compile::bake::bake(&bundle, &init, &baked).unwrap();
    let e = fails(&["generate", p(&baked), "--inputs", p(&mixed.inputs)]);
    assert!(e.contains("is baked") && e.contains("6 input(s) name a prefix"), "{e}");
    // A "prefix" that is not a string is a bad line, reported with its place.
    std::fs::write(users.join("bad.jsonl"), "{\"source\": \"name : X\"}\n{\"source\": \"name : Y\", \"prefix\": 3}\n")
        .unwrap();
    let o = pfxrun(&["generate", p(&bundle), "--inputs", p(&users.join("bad.jsonl")), "--prefix", p(&init)]);
    let (out, err) = text(&o);
    assert!(o.status.success() && err.contains("bad.jsonl:2") && err.contains("\"prefix\" is not a string"), "{err}");
    assert_eq!(out.matches("->").count(), 1, "{out}");
}
