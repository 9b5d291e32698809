//! A BART bundle through the pfxrun binary, on the small BART of `graphs/bart-e2e-small`: JSONL
//! `{"source", "target"}` training data, train, eval, generate (greedy and beam, with and without the prefix),
//! and a baked bundle generating what the bundle generates. Plus the source/target row format itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use pfx_compiler::compile::bart::{compile_bart, BartOptions, BartPrefix, Languages};
use pfx_compiler::compile::bart_generate::BartGenShape;
use pfx_compiler::compile::optimizer::AdamW;
use pfx_runtime::data::{read_examples, Overlong};
use pfx_runtime::seq2seq_data::SourceTarget;
use pfx_runtime::tokenize::Tokenizer;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/bart-e2e-small")
}

fn pfxrun(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfxrun")).args(args).output().expect("pfxrun starts")
}

fn ok(args: &[&str]) -> String {
    let o = pfxrun(args);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "pfxrun {args:?} failed: {err}");
    format!("{out}{err}")
}

fn fails(args: &[&str]) -> String {
    let o = pfxrun(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "pfxrun {args:?} succeeded");
    assert!(!err.contains("panicked"), "pfxrun {args:?} panicked: {err}");
    err
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Eight E2E examples as JSONL (two MRs with several references each).
fn write_jsonl(dir: &Path) -> PathBuf {
    let train = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/e2e_train.txt");
    let text = std::fs::read_to_string(train).unwrap();
    let lines: Vec<String> = text
        .lines()
        .take(8)
        .map(|l| {
            let (s, t) = l.split_once("||").unwrap();
            serde_json::json!({"source": s.trim(), "target": t.trim()}).to_string()
        })
        .collect();
    let path = dir.join("train.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn source_target_rows_follow_hf() {
    let tok = Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();
    let fmt = SourceTarget::new(&tok, 1, Some("bart"), None).unwrap();
    let dir = scratch("bart_rows");
    let data = read_examples(write_jsonl(&dir)).unwrap();
    let ex = &data.examples[0];
    let (rows, report) = fmt.encode_dataset(&data, 64, 72, Overlong::Truncate).unwrap();
    assert_eq!(report.kept, 8);
    let r = &rows[0];
    // <s> source </s>, right-padded with pad (1) and masked.
    let src: Vec<i64> =
        [0].into_iter().chain(tok.encode(&ex.source).unwrap().into_iter().map(|t| t as i64)).chain([2]).collect();
    assert_eq!(&r.input_ids[..src.len()], &src[..]);
    assert!(r.input_ids[src.len()..].iter().all(|&t| t == 1));
    assert_eq!(r.attention_mask.iter().sum::<i64>() as usize, src.len());
    // Labels: <s> target </s>, then -100.
    let tgt: Vec<i64> =
        [0].into_iter().chain(tok.encode(&ex.target).unwrap().into_iter().map(|t| t as i64)).chain([2]).collect();
    assert_eq!(&r.labels[..tgt.len()], &tgt[..]);
    assert!(r.labels[tgt.len()..].iter().all(|&t| t == -100));
    // A source cut to S keeps its final </s>; Skip drops what does not fit.
    let (cut, was_cut) = fmt.encode_source(&ex.source, 5).unwrap();
    assert!(was_cut && cut.len() == 5 && cut[0] == 0 && cut[4] == 2, "{cut:?}");
    // A target cut to T keeps its final </s> too, as HF's tokenizers truncate (truncation=True): a row without
    // it would teach the model never to stop.
    let (rows, report) = fmt.encode_dataset(&data, 64, 6, Overlong::Truncate).unwrap();
    assert_eq!(rows[0].labels, [&tgt[..5], &[2]].concat());
    assert_eq!(report.truncated, 8, "{report}");
    let shown = report.to_string();
    assert!(shown.contains(&format!("longest target {}", report.longest_target)) && shown.contains("longest source"));
    let (rows, report) = fmt.encode_dataset(&data, 64, 18, Overlong::Skip).unwrap();
    assert!(!rows.is_empty() && rows.len() + report.skipped == 8 && report.skipped > 0, "{report}");
    let err = fmt.encode_dataset(&data, 8, 72, Overlong::Skip).unwrap_err();
    assert!(format!("{err:#}").contains("--src-len"), "{err:#}");
}

/// Pegasus's and Marian's tokenizers put `</s>` after a text and nothing before: the rows of a bundle compiled from
/// such an export hold the ids Hugging Face's `tokenizer(source)` and `tokenizer(text_target=target)` give
/// (`graphs/make_text_references.py`, a Pegasus-style tokenizer).
#[test]
fn source_target_rows_of_pegasus_follow_hf() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tokenizers");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("seq2seq-format-cases.json")).unwrap()).unwrap();
    let want = &all["pegasus-style"];
    let tok = Tokenizer::from_file(dir.join("pegasus-style")).unwrap();
    let pad = want["pad"].as_i64().unwrap();
    let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect::<Vec<_>>();
    let cases = want["cases"].as_array().unwrap();
    let lines: Vec<String> =
        cases.iter().map(|c| serde_json::json!({"source": c["source"], "target": c["target"]}).to_string()).collect();
    let scratch = scratch("pegasus_rows");
    std::fs::write(scratch.join("cases.jsonl"), lines.join("\n") + "\n").unwrap();
    let data = read_examples(scratch.join("cases.jsonl")).unwrap();
    for model_type in ["pegasus", "marian"] {
        let fmt = SourceTarget::new(&tok, pad, Some(model_type), None).unwrap();
        assert_eq!(fmt.eos_id(), want["eos"].as_i64().unwrap());
        let (rows, report) = fmt.encode_dataset(&data, 64, 64, Overlong::Skip).unwrap();
        assert_eq!(report.kept, cases.len());
        for (row, case) in rows.iter().zip(cases) {
            let (src, tgt) = (ids(&case["input_ids"]), ids(&case["labels"]));
            assert_eq!(&row.input_ids[..src.len()], &src[..], "{model_type}: source of {}", case["source"]);
            assert!(row.input_ids[src.len()..].iter().all(|&t| t == pad));
            assert_eq!(&row.labels[..tgt.len()], &tgt[..], "{model_type}: labels of {}", case["target"]);
            assert!(row.labels[tgt.len()..].iter().all(|&t| t == -100));
            assert_eq!(fmt.encode_source(case["source"].as_str().unwrap(), 64).unwrap().0, src);
        }
    }
    // BART's format needs `<s>`, which this tokenizer does not have: refused, naming it.
    let e = SourceTarget::new(&tok, pad, None, None).err().unwrap().to_string();
    assert!(e.contains("pegasus-style") && e.contains("`<s>`"), "{e}");
    // A tokenizer without `</s>` (Qwen-style) for a Marian bundle: refused, saying where the token goes.
    let qwen = Tokenizer::from_file(dir.join("qwen-style")).unwrap();
    let e = SourceTarget::new(&qwen, 0, Some("marian"), None).err().unwrap().to_string();
    assert!(e.contains("has no `</s>` token, which marian's format puts after every text (`text </s>`)"), "{e}");
}

#[test]
fn train_eval_generate_and_bake_a_bart_bundle() {
    let dir = scratch("bart_cli");
    let data = write_jsonl(&dir);
    let bundle = dir.join("bundle");
    let opts = BartOptions {
        mode: BartPrefix::Paper,
        prefix_len: 4,
        mid_dim: Some(32),
        batch: 4,
        src_len: 64,
        tgt_len: 72,
        label_smoothing: 0.0,
        optimizer: AdamW::default(),
        seed: 0,
        generation: Some(BartGenShape { rows: 4, src_len: 64, max_new: 12 }),
        weights: Default::default(),
        languages: None,
    };
    compile_bart(&model_dir(), &opts, &bundle).unwrap();
    assert!(bundle.join("tokenizer.json").exists(), "the export's tokenizer travels with the bundle");
    let run = dir.join("run");
    let log = ok(&["train", p(&bundle), "--train", p(&data), "--epochs", "1", "--lr", "1e-2", "-o", p(&run)]);
    assert!(log.contains("trained 2 steps"), "{log}");
    let prefix = run.join("prefix.safetensors");
    let log = ok(&["eval", p(&bundle), "--data", p(&data), "--prefix", p(&prefix)]);
    assert!(log.contains("loss"), "{log}");
    let hyp = dir.join("hyp.txt");
    ok(&["generate", p(&bundle), "--prefix", p(&prefix), "--inputs", p(&data), "--output", p(&hyp)]);
    let lines = std::fs::read_to_string(&hyp).unwrap();
    assert_eq!(lines.lines().count(), 2, "one line per distinct source: {lines}");
    assert!(lines.lines().all(|l| !l.trim().is_empty()), "{lines}");
    // A run killed mid-way leaves its finished lines in OUTPUT.partial; the same command again is refused (it
    // would start over), other settings cannot --resume it, and --resume ends with an uninterrupted run's text.
    let many = dir.join("many.jsonl");
    let sources: Vec<String> = (0..400)
        .map(|i| serde_json::json!({"source": format!("name : The Eagle {i} | food : French")}).to_string())
        .collect();
    std::fs::write(&many, sources.join("\n") + "\n").unwrap();
    let whole = dir.join("whole.txt");
    let args = ["generate", p(&bundle), "--prefix", p(&prefix), "--inputs", p(&many), "--output"];
    ok(&[&args[..], &[p(&whole)]].concat());
    let again = dir.join("again.txt");
    let partial = dir.join("again.txt.partial");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pfxrun"))
        .args([&args[..], &[p(&again)]].concat())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while std::fs::read_to_string(&partial).map_or(true, |t| t.is_empty()) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // A second run on the same output while the first is writing it would interleave their lines: refused. The
    // first is paused meanwhile, so that it cannot finish before the second starts.
    unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
    let e = fails(&[&args[..], &[p(&again), "--resume"]].concat());
    assert!(e.contains("is in use by another running pfxrun"), "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
    let done = std::fs::read_to_string(&partial).unwrap().lines().count();
    assert!(done < 400 && !again.exists(), "the run was to be killed before its end ({done} lines)");
    let e = fails(&[&args[..], &[p(&again)]].concat());
    assert!(e.contains("add --resume"), "{e}");
    let e = fails(&[&args[..], &[p(&again), "--resume", "--beams", "3"]].concat());
    assert!(e.contains("was written for another run (not the same settings)"), "{e}");
    // The prefix file counts by its contents: another of the same size, with the same modification time, is
    // refused; the same contents under another name resume.
    let stamp = std::fs::metadata(&prefix).unwrap().modified().unwrap();
    let trained = std::fs::read(&prefix).unwrap();
    let mut tensors = pfx_runtime::tensor::read_safetensors(&prefix).unwrap();
    let first = tensors.values_mut().next().unwrap();
    first.as_f32_mut().unwrap()[0] += 1.0;
    pfx_runtime::tensor::write_safetensors(&prefix, &tensors).unwrap();
    assert_eq!(std::fs::metadata(&prefix).unwrap().len(), trained.len() as u64);
    std::fs::File::options().write(true).open(&prefix).unwrap().set_modified(stamp).unwrap();
    let e = fails(&[&args[..], &[p(&again), "--resume"]].concat());
    assert!(e.contains("was written for another run (not the same prefix)"), "{e}");
    let moved = dir.join("moved.safetensors");
    std::fs::write(&moved, &trained).unwrap();
    std::fs::write(&prefix, &trained).unwrap();
    let mut moved_args = args.to_vec();
    moved_args[3] = p(&moved);
    let log = ok(&[&moved_args[..], &[p(&again), "--resume"]].concat());
    assert!(log.contains(&format!("resuming after {done} of 400 generations")), "{log}");
    assert_eq!(std::fs::read_to_string(&again).unwrap(), std::fs::read_to_string(&whole).unwrap());
    assert!(!partial.exists());
    for extra in [&["--beams", "3"][..], &["--no-prefix"][..]] {
        let out = dir.join("extra.txt");
        let mut args = vec!["generate", p(&bundle), "--inputs", p(&data), "--output", p(&out)];
        if extra[0] != "--no-prefix" {
            args.extend(["--prefix", p(&prefix)]);
        }
        args.extend(extra);
        ok(&args);
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);
    }
    // The export's generation config forces </s> as the last token at the length limit (forced_eos_token_id), as
    // HF's generate does. BART's targets start with <s>: with two new tokens, <s> </s>, so empty lines; with
    // --no-forced-tokens, <s> and a word.
    let one = |extra: &[&str]| {
        let out = dir.join("one.txt");
        let args = ["generate", p(&bundle), "--prefix", p(&prefix), "--inputs", p(&data), "--max-new", "2"];
        ok(&[&args[..], &["--output", p(&out)], extra].concat());
        std::fs::read_to_string(&out).unwrap()
    };
    assert_eq!(one(&[]), "\n\n", "forced </s> as the second new token");
    let free = one(&["--no-forced-tokens"]);
    assert!(free.lines().count() == 2 && free.lines().all(|l| !l.trim().is_empty()), "{free:?}");
    // Baked: the prefix inside the graphs, the same text.
    let baked = dir.join("baked");
    pfx_compiler::compile::bake::bake(&bundle, &prefix, &baked).unwrap();
    assert!(!baked.join("grads.onnx").exists());
    assert!(baked.join("tokenizer.json").exists(), "bake copies the tokenizer");
    let hyp_baked = dir.join("hyp.baked.txt");
    ok(&["generate", p(&baked), "--inputs", p(&data), "--output", p(&hyp_baked)]);
    assert_eq!(std::fs::read_to_string(&hyp_baked).unwrap(), lines);
}

/// `dir/export`: a BART-layout fixture's three graphs and its `configs`, with the tokenizer.json of
/// `graphs/tokenizers/<tokenizer>`.
fn export_with_tokenizer(dir: &Path, fixture: &str, configs: &[&str], tokenizer: &str) -> PathBuf {
    let export = dir.join("export");
    std::fs::create_dir_all(&export).unwrap();
    let graphs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs");
    for f in ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"].iter().chain(configs) {
        std::fs::copy(graphs.join(fixture).join(f), export.join(f)).unwrap();
    }
    std::fs::copy(graphs.join("tokenizers").join(tokenizer).join("tokenizer.json"), export.join("tokenizer.json"))
        .unwrap();
    export
}

/// A language pair for `pfxc compile --src-lang --tgt-lang` (the NLLB framing read from the tokenizer).
fn languages(source: &str, target: &str) -> Option<Languages> {
    Some(Languages { source: source.into(), target: target.into(), nllb_legacy: None })
}

/// Options of the translation bundles the text commands run on: PEFT layout, prefix 4 with an MLP of 16, batch 4,
/// sources of `src_len` tokens, targets of 48, 4 generation rows of `max_new` new tokens.
fn text_bundle_options(src_len: usize, max_new: usize, languages: Option<Languages>) -> BartOptions {
    BartOptions {
        mode: BartPrefix::Peft,
        prefix_len: 4,
        mid_dim: Some(16),
        batch: 4,
        src_len,
        tgt_len: 48,
        label_smoothing: 0.0,
        optimizer: AdamW::default(),
        seed: 0,
        generation: Some(BartGenShape { rows: 4, src_len, max_new }),
        weights: Default::default(),
        languages,
    }
}

/// Trains `bundle` on 2 steps of text (`write_jsonl`), evaluates and generates with the trained prefix, each
/// through the CLI; returns the data file.
fn text_commands_run(bundle: &Path, dir: &Path) -> PathBuf {
    let data = write_jsonl(dir);
    let run = dir.join("run");
    let log = ok(&["train", p(bundle), "--train", p(&data), "--epochs", "1", "-o", p(&run)]);
    assert!(log.contains("trained 2 steps"), "{log}");
    let prefix = run.join("prefix.safetensors");
    assert!(ok(&["eval", p(bundle), "--data", p(&data), "--prefix", p(&prefix)]).contains("loss"));
    let hyp = dir.join("hyp.txt");
    ok(&["generate", p(bundle), "--prefix", p(&prefix), "--inputs", p(&data), "--output", p(&hyp)]);
    assert_eq!(std::fs::read_to_string(&hyp).unwrap().lines().count(), 2);
    data
}

/// The rows `fmt` makes of a cases pair of `graphs/make_text_references.py` hold HF's ids: sources and labels, both
/// cut as HF's truncation cuts them (the text, never the special tokens around it), and with `shift_start` the
/// decoder inputs (the labels shifted right behind it). Returns the ids compared.
fn rows_follow_hf(
    fmt: &SourceTarget,
    pair: &serde_json::Value,
    pad: i64,
    scratch: &Path,
    what: &str,
    shift_start: Option<i64>,
) -> usize {
    let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect::<Vec<_>>();
    let cases = pair["cases"].as_array().unwrap();
    let lines: Vec<String> =
        cases.iter().map(|c| serde_json::json!({"source": c["source"], "target": c["target"]}).to_string()).collect();
    std::fs::write(scratch.join("cases.jsonl"), lines.join("\n") + "\n").unwrap();
    let data = read_examples(scratch.join("cases.jsonl")).unwrap();
    let (rows, report) = fmt.encode_dataset(&data, 128, 128, Overlong::Skip).unwrap();
    assert_eq!(report.kept, cases.len(), "{what}");
    let (cut_rows, _) = fmt.encode_dataset(&data, 128, 6, Overlong::Truncate).unwrap();
    let mut compared = 0;
    for ((row, cut), case) in rows.iter().zip(&cut_rows).zip(cases) {
        let (src, tgt) = (ids(&case["input_ids"]), ids(&case["labels"]));
        assert_eq!(&row.input_ids[..src.len()], &src[..], "{what}: source of {}", case["source"]);
        assert!(row.input_ids[src.len()..].iter().all(|&t| t == pad));
        assert_eq!(&row.labels[..tgt.len()], &tgt[..], "{what}: labels of {}", case["target"]);
        assert!(row.labels[tgt.len()..].iter().all(|&t| t == -100));
        if let Some(start) = shift_start {
            let shifted: Vec<i64> = std::iter::once(start).chain(tgt[..tgt.len() - 1].iter().copied()).collect();
            assert_eq!(shifted, ids(&case["decoder_input_ids"]), "{what}");
        }
        let source = case["source"].as_str().unwrap();
        assert_eq!(fmt.encode_source(source, 128).unwrap().0, src, "{what}");
        assert_eq!(fmt.encode_source(source, 8).unwrap(), (ids(&case["input_ids_max8"]), true), "{what}");
        assert_eq!(cut.labels, ids(&case["labels_max6"]), "{what}: target cut to 6");
        compared += src.len() + tgt.len() + 8 + 6;
    }
    compared
}

/// mBART's tokenizers frame a text with the language code: cc25's `text </s> code`, mBART-50's `code text </s>`
/// (sources with the source language, targets with the target's). The rows hold the ids Hugging Face's
/// `tokenizer(source)` / `tokenizer(text_target=...)` give with src_lang/tgt_lang set, also cut to 8 and 6 tokens
/// (`graphs/make_text_references.py`: mbart-style, mbart50-style); generation starts with the target language
/// (cc25: as the decoder start token; mBART-50: forced after the start token `</s>`).
#[test]
fn source_target_rows_of_mbart_follow_hf() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tokenizers");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("mbart-format-cases.json")).unwrap()).unwrap();
    let scratch = scratch("mbart_rows");
    for style in ["mbart-style", "mbart50-style"] {
        let want = &all[style];
        let tok = Tokenizer::from_file(dir.join(style)).unwrap();
        let pad = want["pad"].as_i64().unwrap();
        for pair in want["pairs"].as_array().unwrap() {
            let languages = Languages {
                source: pair["src_lang"].as_str().unwrap().to_string(),
                target: pair["tgt_lang"].as_str().unwrap().to_string(),
                nllb_legacy: None,
            };
            let what = format!("{style} {} -> {}", languages.source, languages.target);
            let target_code = want["lang_code_ids"][&languages.target].as_i64().unwrap();
            let fmt = SourceTarget::new(&tok, pad, Some("mbart"), Some(&languages)).unwrap();
            assert_eq!(fmt.eos_id(), want["eos"].as_i64().unwrap());
            if style == "mbart-style" {
                assert_eq!((fmt.decoder_start(), fmt.forced_bos()), (Some(target_code), None), "{what}");
            } else {
                assert_eq!((fmt.decoder_start(), fmt.forced_bos()), (None, Some(target_code)), "{what}");
            }
            rows_follow_hf(&fmt, pair, pad, &scratch, &what, None);
        }
    }
    // Without languages (a bundle compiled without --src-lang/--tgt-lang), or with a code the tokenizer lacks.
    let tok = Tokenizer::from_file(dir.join("mbart-style")).unwrap();
    let e = SourceTarget::new(&tok, 1, Some("mbart"), None).err().unwrap().to_string();
    assert!(e.contains("--src-lang/--tgt-lang"), "{e}");
    let odd = Languages { source: "en_XX".into(), target: "xx_YY".into(), nllb_legacy: None };
    let e = SourceTarget::new(&tok, 1, Some("mbart"), Some(&odd)).err().unwrap().to_string();
    assert!(e.contains("has no `xx_YY` token") && e.contains("--tgt-lang"), "{e}");
}

/// BlenderBot-small's tokenizer adds nothing around a text: the rows hold HF's `tokenizer(source)` /
/// `tokenizer(text_target=target)` ids as they are (`graphs/make_text_references.py`: blenderbot-small-style), cut
/// to 8 and 6 tokens as its truncation cuts; generation stops at `__end__`.
#[test]
fn source_target_rows_of_blenderbot_small_follow_hf() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tokenizers");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("blenderbot-small-format-cases.json")).unwrap())
            .unwrap();
    let want = &all["blenderbot-small-style"];
    let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect::<Vec<_>>();
    let tok = Tokenizer::from_file(dir.join("blenderbot-small-style")).unwrap();
    let pad = want["pad"].as_i64().unwrap();
    let fmt = SourceTarget::new(&tok, pad, Some("blenderbot-small"), None).unwrap();
    assert_eq!(fmt.eos_id(), want["eos"].as_i64().unwrap());
    let cases = want["cases"].as_array().unwrap();
    let lines: Vec<String> =
        cases.iter().map(|c| serde_json::json!({"source": c["source"], "target": c["target"]}).to_string()).collect();
    let scratch = scratch("blenderbot_small_rows");
    std::fs::write(scratch.join("cases.jsonl"), lines.join("\n") + "\n").unwrap();
    let data = read_examples(scratch.join("cases.jsonl")).unwrap();
    let (rows, report) = fmt.encode_dataset(&data, 128, 128, Overlong::Skip).unwrap();
    assert_eq!(report.kept, cases.len());
    let (cut_rows, _) = fmt.encode_dataset(&data, 128, 6, Overlong::Truncate).unwrap();
    for ((row, cut), case) in rows.iter().zip(&cut_rows).zip(cases) {
        let (src, tgt) = (ids(&case["input_ids"]), ids(&case["labels"]));
        assert_eq!(&row.input_ids[..src.len()], &src[..], "source of {}", case["source"]);
        assert!(row.input_ids[src.len()..].iter().all(|&t| t == pad));
        assert_eq!(&row.labels[..tgt.len()], &tgt[..], "labels of {}", case["target"]);
        assert!(row.labels[tgt.len()..].iter().all(|&t| t == -100));
        let source = case["source"].as_str().unwrap();
        assert_eq!(fmt.encode_source(source, 8).unwrap(), (ids(&case["input_ids_max8"]), true));
        assert_eq!(cut.labels, ids(&case["labels_max6"]));
    }
}

/// An mBART export with its tokenizer, through the commands: compiled with its languages, trained and evaluated
/// on text, generating text; a language its tokenizer lacks, or languages for a BART export, refused at compile.
#[test]
fn train_and_generate_an_mbart_bundle_from_text() {
    let dir = scratch("mbart_cli");
    let export = export_with_tokenizer(&dir, "mbart-tiny", &["config.json"], "mbart-style");
    let opts = text_bundle_options(48, 6, languages("en_XX", "ro_RO"));
    let e =
        compile_bart(&export, &BartOptions { languages: languages("en_XX", "xx_YY"), ..opts.clone() }, &dir.join("x"))
            .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("--tgt-lang xx_YY is not a language code of") && e.contains("ro_RO"), "{e}");
    let e = compile_bart(&model_dir(), &opts, &dir.join("y")).unwrap_err();
    assert!(format!("{e:#}").contains("a bart export, whose tokenizer adds none"), "{e:#}");
    let bundle = dir.join("bundle");
    compile_bart(&export, &opts, &bundle).unwrap();
    let data = text_commands_run(&bundle, &dir);
    // A model whose generation config ends sequences with another id than its tokenizer's `</s>`: said.
    let other_eos = dir.join("other-eos");
    std::fs::create_dir_all(&other_eos).unwrap();
    for f in std::fs::read_dir(&export).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, other_eos.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(other_eos.join("generation_config.json"), "{\"eos_token_id\": 5}").unwrap();
    let odd = dir.join("odd");
    compile_bart(&other_eos, &opts, &odd).unwrap();
    let log = ok(&["eval", p(&odd), "--data", p(&data)]);
    assert!(log.contains("`</s>` is id 2, but the model's end-of-sequence ids are [5]"), "{log}");
    assert!(!ok(&["eval", p(&bundle), "--data", p(&data)]).contains("end-of-sequence ids"));
    // A generation config with search settings: pfxrun generate takes them as its defaults, as HF's generate does,
    // says so, and says what it does not apply; a flag given wins.
    std::fs::write(
        other_eos.join("generation_config.json"),
        r#"{"num_beams": 2, "no_repeat_ngram_size": 2, "early_stopping": true, "repetition_penalty": 1.3,
            "num_beam_groups": 2, "decoder_start_token_id": 89, "eos_token_id": 2, "forced_eos_token_id": 2}"#,
    )
    .unwrap();
    let searching = dir.join("searching");
    compile_bart(&other_eos, &opts, &searching).unwrap();
    let args = ["generate", p(&searching), "--inputs", p(&data)];
    let log = ok(&args);
    assert!(
        log.contains(
            "from the model's generation config (flags change them): 2 beams, no repeated 2-grams, early stopping, \
             repetition penalty 1.3"
        ),
        "{log}"
    );
    assert!(log.contains("also sets num_beam_groups 2, which pfxrun generate does not do"), "{log}");
    let log = ok(&[&args[..], &["--beams", "1", "--no-repeat-ngram", "0", "--repetition-penalty", "1"]].concat());
    assert!(!log.contains("from the model's generation config"), "early stopping does nothing in greedy search: {log}");
    // min_new_tokens replaces min_length (which counts the start token), as in HF.
    for (settings, want) in [
        (r#"{"min_length": 20, "decoder_start_token_id": 89}"#, Some("at least 19 new tokens")),
        (r#"{"min_length": 20, "min_new_tokens": 3, "decoder_start_token_id": 89}"#, Some("at least 3 new tokens")),
        (r#"{"min_length": 20, "min_new_tokens": 0, "decoder_start_token_id": 89}"#, None),
    ] {
        std::fs::write(other_eos.join("generation_config.json"), settings).unwrap();
        let minimal = dir.join("minimal");
        compile_bart(&other_eos, &opts, &minimal).unwrap();
        let log = ok(&["generate", p(&minimal), "--inputs", p(&data)]);
        match want {
            Some(w) => assert!(log.contains(&format!("(flags change them): {w}")), "{settings}: {log}"),
            None => assert!(!log.contains("new tokens"), "{settings}: {log}"),
        }
    }
    // A max_length of 1 leaves nothing after the start token: refused, as HF's generate does; --max-new replaces it.
    std::fs::write(other_eos.join("generation_config.json"), r#"{"max_length": 1, "decoder_start_token_id": 89}"#)
        .unwrap();
    let one = dir.join("one");
    compile_bart(&other_eos, &opts, &one).unwrap();
    let e = fails(&["generate", p(&one), "--inputs", p(&data)]);
    assert!(e.contains("sets max_length 1, which counts the decoder's start token: nothing is left"), "{e}");
    ok(&["generate", p(&one), "--inputs", p(&data), "--max-new", "2"]);
    // Compiled without languages: the text commands say what is missing.
    let bare = dir.join("bare");
    compile_bart(&export, &BartOptions { languages: None, ..opts.clone() }, &bare).unwrap();
    let e = fails(&["train", p(&bare), "--train", p(&data), "--epochs", "1", "-o", p(&dir.join("run2"))]);
    assert!(e.contains("compiled without --src-lang/--tgt-lang"), "{e}");
}

/// The NLLB tokenizers of `graphs/tokenizers` (`graphs/make_text_references.py`): nllb-style and nllb-legacy-style.
fn nllb_cases() -> serde_json::Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tokenizers");
    serde_json::from_str(&std::fs::read_to_string(dir.join("nllb-format-cases.json")).unwrap()).unwrap()
}

/// nllb-style's tokenizer.json with its language codes renamed as M2M100's tokenizer writes them (`__en__`, ...) and
/// no post-processor (M2M100's checkpoints ship none: whoever writes one for it may leave it out), in `dir`.
fn m2m100_style_tokenizer(dir: &Path) -> PathBuf {
    let tokenizers = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tokenizers");
    let mut text = std::fs::read_to_string(tokenizers.join("nllb-style/tokenizer.json")).unwrap();
    for (nllb, m2m) in [("eng_Latn", "__en__"), ("fra_Latn", "__fr__"), ("deu_Latn", "__de__"), ("ron_Latn", "__ro__")]
    {
        text = text.replace(&format!("\"{nllb}\""), &format!("\"{m2m}\""));
    }
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["post_processor"] = serde_json::Value::Null;
    let path = dir.join("m2m100-style.json");
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    path
}

/// NLLB's tokenizer frames a text as `code text </s>` (with legacy_behaviour, `text </s> code`; its tokenizer.json's
/// post-processor says which), sources with the source language and targets with the target's; M2M100's does as
/// NLLB's current one. The rows hold the ids HF's NllbTokenizer gives with src_lang/tgt_lang set, also cut to 8 and
/// 6 tokens; generation starts with `</s>` (the config's decoder start) and forces the target language.
#[test]
fn source_target_rows_of_nllb_and_m2m100_follow_hf() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tokenizers");
    let all = nllb_cases();
    let scratch = scratch("nllb_rows");
    let m2m100 = Tokenizer::from_file(m2m100_style_tokenizer(&scratch)).unwrap();
    let mut compared = 0;
    // (tokenizer, its cases, the languages given to pfx): M2M100's as its users name them (`en` for `__en__`).
    let mut runs = Vec::new();
    for style in ["nllb-style", "nllb-legacy-style"] {
        for pair in all[style]["pairs"].as_array().unwrap() {
            let (s, t) = (pair["src_lang"].as_str().unwrap(), pair["tgt_lang"].as_str().unwrap());
            runs.push((
                style.to_string(),
                Tokenizer::from_file(dir.join(style)).unwrap(),
                pair,
                s.to_string(),
                t.to_string(),
            ));
        }
    }
    let first = &all["nllb-style"]["pairs"][0];
    assert_eq!((first["src_lang"].as_str(), first["tgt_lang"].as_str()), (Some("eng_Latn"), Some("fra_Latn")));
    runs.push(("m2m100-style".into(), m2m100, first, "en".into(), "fr".into()));
    // nllb-style's tokenizer.json beside nllb-legacy-style's tokenizer_config.json: HF goes by the config's
    // legacy_behaviour, not by the post-processor (make_text_references.py checks it), and so does pfx.
    let mixed = scratch.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(dir.join("nllb-style/tokenizer.json"), mixed.join("tokenizer.json")).unwrap();
    std::fs::copy(dir.join("nllb-legacy-style/tokenizer_config.json"), mixed.join("tokenizer_config.json")).unwrap();
    for pair in all["nllb-legacy-style"]["pairs"].as_array().unwrap() {
        let (s, t) = (pair["src_lang"].as_str().unwrap(), pair["tgt_lang"].as_str().unwrap());
        runs.push(("mixed".into(), Tokenizer::from_file(&mixed).unwrap(), pair, s.to_string(), t.to_string()));
    }
    for (style, tok, pair, source, target) in &runs {
        let want = &all[match style.as_str() {
            "m2m100-style" => "nllb-style",
            "mixed" => "nllb-legacy-style",
            style => style,
        }];
        let languages = Languages { source: source.clone(), target: target.clone(), nllb_legacy: None };
        let what = format!("{style} {source} -> {target}");
        let pad = want["pad"].as_i64().unwrap();
        let target_code = want["lang_code_ids"][pair["tgt_lang"].as_str().unwrap()].as_i64().unwrap();
        let fmt = SourceTarget::new(tok, pad, Some("m2m_100"), Some(&languages)).unwrap();
        assert_eq!(fmt.eos_id(), want["eos"].as_i64().unwrap());
        assert_eq!((fmt.decoder_start(), fmt.forced_bos()), (None, Some(target_code)), "{what}");
        // The decoder's inputs are the labels shifted right behind `</s>` (the graph's shift, no mBART rotation).
        let start = all["nllb-style"]["decoder_start_token_id"].as_i64().unwrap();
        compared += rows_follow_hf(&fmt, pair, pad, &scratch, &what, Some(start));
    }
    eprintln!("{compared} ids equal to HF's");
    // Without languages, or with a code the tokenizer lacks.
    let tok = Tokenizer::from_file(dir.join("nllb-style")).unwrap();
    let e = SourceTarget::new(&tok, 1, Some("m2m_100"), None).err().unwrap().to_string();
    assert!(e.contains("compiled without --src-lang/--tgt-lang") && e.contains("eng_Latn"), "{e}");
    let odd = Languages { source: "eng_Latn".into(), target: "xxx_Yyyy".into(), nllb_legacy: None };
    let e = SourceTarget::new(&tok, 1, Some("m2m_100"), Some(&odd)).err().unwrap().to_string();
    assert!(e.contains("has no `xxx_Yyyy` token") && e.contains("--tgt-lang"), "{e}");
}

/// graphs/m2m100-tiny (M2M100's and NLLB-200's architecture) with the nllb-style tokenizer, through the commands:
/// compiled with its languages, trained and evaluated on text, generating text; without a prefix its greedy text
/// is HF's `generate(forced_bos_token_id=fra_Latn)` (`graphs/tokenizers/nllb-format-cases.json`), and with the codes
/// made ordinary tokens the text shows the forced target language first.
#[test]
fn train_and_generate_an_m2m100_bundle_from_text() {
    let dir = scratch("m2m100_cli");
    let export = export_with_tokenizer(&dir, "m2m100-tiny", &["config.json", "generation_config.json"], "nllb-style");
    let tokenizers = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tokenizers");
    let want = nllb_cases()["generate"].clone();
    let (src_len, max_new) = (want["src_len"].as_u64().unwrap() as usize, want["max_new_tokens"].as_u64().unwrap());
    let langs = languages(want["src_lang"].as_str().unwrap(), want["tgt_lang"].as_str().unwrap());
    let opts = text_bundle_options(src_len, max_new as usize, langs);
    let e = compile_bart(
        &export,
        &BartOptions { languages: languages("eng_Latn", "xx_YY"), ..opts.clone() },
        &dir.join("x"),
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("--tgt-lang xx_YY is not a language code of") && e.contains("fra_Latn"), "{e}");
    // A tokenizer_config.json whose legacy_behaviour disagrees with the tokenizer.json's post-processor: HF goes
    // by the config, so the bundle records it (only tokenizer.json is copied in) and its text rows follow it.
    let legacy_config = tokenizers.join("nllb-legacy-style/tokenizer_config.json");
    std::fs::copy(&legacy_config, export.join("tokenizer_config.json")).unwrap();
    let legacy = dir.join("legacy");
    compile_bart(&export, &opts, &legacy).unwrap();
    let spec = pfx_compiler::compile::bart::read_bart_spec(&legacy).unwrap().unwrap();
    let recorded = spec.languages.clone().unwrap();
    assert_eq!(recorded.nllb_legacy, Some(true));
    let tok = Tokenizer::from_file(legacy.join("tokenizer.json")).unwrap();
    let fmt = SourceTarget::new(&tok, 1, Some("m2m_100"), Some(&recorded)).unwrap();
    let (ids, _) = fmt.encode_source("the", 48).unwrap();
    let src_code = nllb_cases()["nllb-style"]["lang_code_ids"][want["src_lang"].as_str().unwrap()].as_i64().unwrap();
    assert_eq!(ids[ids.len() - 2..], [2, src_code], "legacy framing `text </s> code`: {ids:?}");
    std::fs::copy(tokenizers.join("nllb-style/tokenizer_config.json"), export.join("tokenizer_config.json")).unwrap();
    let bundle = dir.join("bundle");
    compile_bart(&export, &opts, &bundle).unwrap();
    let data = text_commands_run(&bundle, &dir);
    // The bare model: HF's text for the same sources (cut to src_len as HF's truncation cuts them).
    let sources: Vec<&str> = want["sources"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let inputs = dir.join("sources.lines");
    std::fs::write(&inputs, sources.join("\n") + "\n").unwrap();
    let bare = dir.join("bare.txt");
    ok(&["generate", p(&bundle), "--no-prefix", "--inputs", p(&inputs), "--output", p(&bare)]);
    let texts: Vec<&str> = want["texts"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(std::fs::read_to_string(&bare).unwrap().lines().collect::<Vec<_>>(), texts);
    // With the codes ordinary tokens (decoded, not skipped), each text starts with the forced target language.
    let mut shown: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("tokenizer.json")).unwrap()).unwrap();
    for t in shown["added_tokens"].as_array_mut().unwrap() {
        if t["content"].as_str().unwrap().contains('_') {
            t["special"] = false.into();
        }
    }
    let shown_path = dir.join("shown.json");
    std::fs::write(&shown_path, shown.to_string()).unwrap();
    let forced = dir.join("forced.txt");
    let args = ["generate", p(&bundle), "--no-prefix", "--inputs", p(&inputs), "--output", p(&forced)];
    ok(&[&args[..], &["--tokenizer", p(&shown_path)]].concat());
    let lines: Vec<String> = std::fs::read_to_string(&forced).unwrap().lines().map(String::from).collect();
    assert_eq!(lines.len(), texts.len());
    for (line, text) in lines.iter().zip(&texts) {
        assert!(line.starts_with("fra_Latn") && line.ends_with(text), "{line:?} vs HF's {text:?}");
    }
    // M2M100's own naming: `--src-lang en` for its `__en__` (checked against the tokenizer beside the export).
    let m2m100 = dir.join("m2m100-export");
    std::fs::create_dir_all(&m2m100).unwrap();
    for f in std::fs::read_dir(&export).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, m2m100.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::copy(m2m100_style_tokenizer(&dir), m2m100.join("tokenizer.json")).unwrap();
    std::fs::remove_file(m2m100.join("tokenizer_config.json")).unwrap(); // NLLB's
    let m2m100_bundle = dir.join("m2m100-bundle");
    compile_bart(&m2m100, &BartOptions { languages: languages("en", "fr"), ..opts.clone() }, &m2m100_bundle).unwrap();
    let m2m100_bare = dir.join("m2m100-bare.txt");
    ok(&["generate", p(&m2m100_bundle), "--no-prefix", "--inputs", p(&inputs), "--output", p(&m2m100_bare)]);
    assert_eq!(std::fs::read_to_string(&m2m100_bare).unwrap(), std::fs::read_to_string(&bare).unwrap());
    let e = compile_bart(&m2m100, &BartOptions { languages: languages("en", "xx"), ..opts.clone() }, &dir.join("y"))
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("--tgt-lang xx is not a language code of") && e.contains("__fr__"), "{e}");
    // Compiled without languages: the text commands say what is missing.
    let no_languages = dir.join("no-languages");
    compile_bart(&export, &BartOptions { languages: None, ..opts.clone() }, &no_languages).unwrap();
    let e = fails(&["train", p(&no_languages), "--train", p(&data), "--epochs", "1", "-o", p(&dir.join("run2"))]);
    assert!(e.contains("compiled without --src-lang/--tgt-lang"), "{e}");
}

/// T5 through the commands, with a T5-style tokenizer (`graphs/make_text_references.py t5`): its rows hold HF's
/// `T5TokenizerFast` ids (`text </s>`, decoder inputs behind the start token 0, also cut), the bundle trains,
/// evaluates and generates from text, and the bare model's greedy texts are HF's `generate` on graphs/t5-tiny
/// (`graphs/tokenizers/t5-format-cases.json`; a random model: it repeats one token, `<pad>` for the cut source).
#[test]
fn train_and_generate_a_t5_bundle_from_text() {
    let dir = scratch("t5_cli");
    let (all, _) = t5_rows_follow_hf(&dir, "t5-format-cases.json", "t5-style");
    let export = export_with_tokenizer(&dir, "t5-tiny", &["config.json", "generation_config.json"], "t5-style");
    let want = &all["generate"];
    let (src_len, max_new) = (want["src_len"].as_u64().unwrap() as usize, want["max_new_tokens"].as_u64().unwrap());
    let bundle = dir.join("bundle");
    compile_bart(&export, &text_bundle_options(src_len, max_new as usize, None), &bundle).unwrap();
    text_commands_run(&bundle, &dir);
    bare_texts_follow_hf(&bundle, &dir, want);
}

/// The T5 cases of `graphs/tokenizers/<cases>` for the tokenizer `graphs/tokenizers/<style>`: its end token, rows
/// (sources, labels, decoder inputs, cuts) as HF makes them. Returns the cases and the tokenizer.
fn t5_rows_follow_hf(dir: &Path, cases: &str, style_name: &str) -> (serde_json::Value, Tokenizer) {
    let tokenizers = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tokenizers");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tokenizers.join(cases)).unwrap()).unwrap();
    let style = &all[style_name];
    let tok = Tokenizer::from_file(tokenizers.join(style_name).join("tokenizer.json")).unwrap();
    let pad = style["pad"].as_i64().unwrap();
    let fmt = SourceTarget::new(&tok, pad, Some("t5"), None).unwrap();
    assert_eq!(fmt.eos_id(), style["eos"].as_i64().unwrap());
    let start = style["decoder_start_token_id"].as_i64();
    assert!(rows_follow_hf(&fmt, style, pad, dir, style_name, start) > 0);
    (all, tok)
}

/// `pfxrun generate --no-prefix` of the reference's sources (some cut to its `src_len`) writes HF's texts.
fn bare_texts_follow_hf(bundle: &Path, dir: &Path, want: &serde_json::Value) {
    let sources: Vec<&str> = want["sources"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let inputs = dir.join("sources.lines");
    std::fs::write(&inputs, sources.join("\n") + "\n").unwrap();
    let bare = dir.join("bare.txt");
    let log = ok(&["generate", p(bundle), "--no-prefix", "--inputs", p(&inputs), "--output", p(&bare)]);
    assert!(log.contains(&format!("cut to {} tokens", want["src_len"])), "{log}");
    let texts: Vec<&str> = want["texts"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(std::fs::read_to_string(&bare).unwrap().lines().collect::<Vec<_>>(), texts);
}

/// T5's tokenizer.json as its checkpoints have it (`graphs/make_text_references.py t5-sp`: a SentencePiece model with
/// nmt_nfkc normalization converted by transformers, so a `Precompiled` normalizer, and `<extra_id_N>` sentinels as
/// special tokens after the pieces, `<extra_id_0>` the last id): the rows, lone texts (empty and blank ones too) and
/// decodes hold HF's ids and text through full-width characters, ligatures, odd spaces, combining accents, unknown
/// characters and sentinels written in the text (`graphs/tokenizers/t5-sp-format-cases.json`); the bare
/// graphs/t5-tiny generates HF's text with it (a sentinel, as `<pad>`, decodes to nothing).
#[test]
fn t5_rows_and_texts_with_a_sentencepiece_tokenizer_follow_hf() {
    let dir = scratch("t5_sp");
    let (all, tok) = t5_rows_follow_hf(&dir, "t5-sp-format-cases.json", "t5-sp-style");
    let style = &all["t5-sp-style"];
    assert_eq!(tok.vocab_size(), 100);
    let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect::<Vec<_>>();
    let fmt = SourceTarget::new(&tok, style["pad"].as_i64().unwrap(), Some("t5"), None).unwrap();
    for case in style["texts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(fmt.encode_source(text, 128).unwrap().0, ids(&case["input_ids"]), "{text:?}");
    }
    for (sentinel, id) in style["sentinels"].as_object().unwrap() {
        assert_eq!(tok.token_id(sentinel), Some(id.as_u64().unwrap() as u32), "{sentinel}");
    }
    for case in style["decodes"].as_array().unwrap() {
        let given: Vec<u32> = ids(&case["ids"]).into_iter().map(|t| t as u32).collect();
        assert_eq!(tok.decode(&given).unwrap(), case["text"].as_str().unwrap(), "decode of {given:?}");
    }
    let want = &all["generate"];
    let (src_len, max_new) = (want["src_len"].as_u64().unwrap() as usize, want["max_new_tokens"].as_u64().unwrap());
    let sources: Vec<&str> = want["sources"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    for (source, cut) in sources.iter().zip(want["input_ids"].as_array().unwrap()) {
        assert_eq!(fmt.encode_source(source, src_len).unwrap().0, ids(cut), "{source:?}");
    }
    let export = export_with_tokenizer(&dir, "t5-tiny", &["config.json", "generation_config.json"], "t5-sp-style");
    let bundle = dir.join("bundle");
    compile_bart(&export, &text_bundle_options(src_len, max_new as usize, None), &bundle).unwrap();
    bare_texts_follow_hf(&bundle, &dir, want);
}

/// Sources that name their own prefix share batches on the BART path too (the encoder, which computes every
/// prefix's keys and values, runs once per prefix; the decode steps are shared), in both layouts: each generates
/// what it generates alone with its prefix as `--prefix`.
#[test]
fn bart_sources_with_their_own_prefixes_share_batches() {
    for mode in [BartPrefix::Paper, BartPrefix::Peft] {
        let dir = scratch(&format!("bart_mixed_{mode:?}"));
        let bundle = dir.join("bundle");
        let opts = BartOptions {
            mode,
            prefix_len: 4,
            mid_dim: Some(16),
            batch: 2,
            src_len: 32,
            tgt_len: 16,
            label_smoothing: 0.0,
            optimizer: AdamW::default(),
            seed: 0,
            generation: Some(BartGenShape { rows: 3, src_len: 32, max_new: 6 }),
            weights: Default::default(),
            languages: None,
        };
        compile_bart(&model_dir(), &opts, &bundle).unwrap();
        let mixed = MixedPrefixes::write(&dir, &bundle.join("prefix.init.safetensors"));
        for backend in backends() {
            for beams in ["1", "3"] {
                mixed.check(&bundle, &["--backend", backend, "--beams", beams]);
            }
        }
    }
}
