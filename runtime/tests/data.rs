//! Tokenizer (against ids from the Python `tokenizers` package), dataset readers, table-to-text formatting
//! and batching. Inputs live in runtime/tests/data/; the GPT-2 tokenizer in graphs/tokenizers/gpt2/.

use std::path::{Path, PathBuf};

use pfx_runtime::data::{
    batches, group_by_source, read_examples, read_sources, shuffled, Dataset, Example, Format, Overlong, SourceGroup,
    SplitMix64, TableToText, IGNORE_INDEX,
};
use pfx_runtime::tokenize::Tokenizer;

fn data_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn gpt2() -> Tokenizer {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tokenizers/gpt2/tokenizer.json");
    Tokenizer::from_file(path).unwrap()
}

fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(data_path("gpt2_tokenizer_cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids_of(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn example(source: &str, target: &str) -> Example {
    Example { source: source.into(), target: target.into(), origin: "test:1".into(), prefix: None }
}

/// (origin relative to the data folder, reason) of every bad line.
fn bad_lines(data: &Dataset) -> Vec<(String, String)> {
    let dir = format!("{}/", data_path("").display().to_string().trim_end_matches('/'));
    data.bad_lines.iter().map(|b| (b.origin.replace(&dir, ""), b.reason.clone())).collect()
}

fn origins(data: &Dataset) -> Vec<String> {
    let dir = format!("{}/", data_path("").display().to_string().trim_end_matches('/'));
    data.examples.iter().map(|e| e.origin.replace(&dir, "")).collect()
}

// ---------------------------------------------------------------- tokenizer

#[test]
fn gpt2_tokenizer_matches_python_tokenizers() {
    let tok = gpt2();
    let cases = cases();
    assert_eq!(cases["eos_id"], 50256);
    assert_eq!(tok.vocab_size() as u64, cases["vocab_size"].as_u64().unwrap());
    let list = cases["cases"].as_array().unwrap();
    assert!(list.len() >= 10);
    for case in list {
        let text = case["text"].as_str().unwrap();
        let ids = ids_of(&case["ids"]);
        assert_eq!(tok.encode(text).unwrap(), ids, "encode {text:?}");
        let decoded = tok.decode(&ids).unwrap();
        assert_eq!(decoded, case["decoded"].as_str().unwrap(), "decode {text:?}");
        if !text.contains("<|endoftext|>") {
            assert_eq!(decoded, text, "decode(encode(s)) != s");
        }
    }
}

#[test]
fn gpt2_tokenizer_round_trips_and_knows_its_tokens() {
    let tok = gpt2();
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.eos_id().unwrap(), 50256);
    assert_eq!(tok.bos_id().unwrap(), 50256);
    assert_eq!(tok.token_id("<|endoftext|>"), Some(50256));
    assert_eq!(tok.token_id("Ġthe"), Some(262));
    assert_eq!(tok.token_id("not a token"), None);
    assert_eq!(tok.encode("Hello world").unwrap(), [15496, 995]);
    for s in [
        "name : The Eagle | eatType : coffee shop | food : Japanese||The Eagle is a Japanese coffee shop .",
        " leading and trailing  ",
        "Ünïcödé ✓ 🤖\n\ttabs",
        "",
    ] {
        assert_eq!(tok.decode(&tok.encode(s).unwrap()).unwrap(), s);
    }
    // Special tokens are one token, and decode skips them.
    assert_eq!(tok.encode("x<|endoftext|>").unwrap(), [87, 50256]);
    assert_eq!(tok.decode(&[87, 50256, 87]).unwrap(), "xx");
    let err = tok.decode(&[15496, 50257]).unwrap_err().to_string();
    assert!(err.contains("50257") && err.contains("vocabulary"), "{err}");
    // Generated ids past the tokenizer's are left out, as the Python tokenizers' decode leaves them out (its
    // `decode([15496, 50257, 87, 60000, 50256, 11])` is "Hellox,"), and counted.
    assert_eq!(tok.decode_generated(&[15496, 50257, 87, 60000, 50256, 11]).unwrap(), ("Hellox,".to_string(), 2));
}

#[test]
fn tokenizer_errors_name_the_file_and_the_fix() {
    let missing = data_path("no_such_tokenizer.json");
    let err = format!("{:#}", Tokenizer::from_file(&missing).unwrap_err());
    assert!(err.contains("no_such_tokenizer.json"), "{err}");

    let not_a_tokenizer = data_path("dart_small.json");
    let err = format!("{:#}", Tokenizer::from_file(&not_a_tokenizer).unwrap_err());
    assert!(err.contains("dart_small.json") && err.contains("tokenizer.json"), "{err}");

    // A valid tokenizer without <|endoftext|>.
    let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":null,"post_processor":null,"decoder":null,
        "model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,
        "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"vocab":{"a":0,"b":1},"merges":[]}}"#;
    let tok = Tokenizer::from_bytes(json.as_bytes(), "tiny/tokenizer.json").unwrap();
    assert_eq!(tok.vocab_size(), 2);
    assert_eq!(tok.encode("ab").unwrap(), [0, 1]);
    let err = tok.eos_id().unwrap_err().to_string();
    assert!(
        err.contains("tiny/tokenizer.json") && err.contains("<|endoftext|>") && err.contains("make_gpt2_tokenizer.py"),
        "{err}"
    );
    assert!(TableToText::new(&tok).is_err());
}

// ---------------------------------------------------------------- readers

#[test]
fn reads_e2e_lines_and_reports_bad_ones() {
    let data = read_examples(data_path("e2e_small.txt")).unwrap();
    assert_eq!(data.format, Format::E2e);
    assert_eq!(
        origins(&data),
        ["e2e_small.txt:1", "e2e_small.txt:2", "e2e_small.txt:4", "e2e_small.txt:9", "e2e_small.txt:10"]
    );
    assert_eq!(data.examples[0].source, "name : Alimentum | area : city centre | family friendly : no");
    // Trimmed: E2E lines end with a space; the last line ends with CRLF.
    assert_eq!(
        data.examples[0].target,
        "There is a place in the city centre , Alimentum , that is not family - friendly ."
    );
    assert_eq!(data.examples[4].source, "name : Blue Spice");
    assert_eq!(data.examples[4].target, "The Blue Spice .");
    let bad = bad_lines(&data);
    let where_: Vec<&str> = bad.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(where_, ["e2e_small.txt:5", "e2e_small.txt:6", "e2e_small.txt:7", "e2e_small.txt:8"]);
    assert!(bad[0].1.contains("no `||`"), "{:?}", bad[0]);
    assert!(bad[1].1.contains("2 `||` separators"), "{:?}", bad[1]);
    assert!(bad[2].1.contains("empty MR"), "{:?}", bad[2]);
    assert!(bad[3].1.contains("empty text"), "{:?}", bad[3]);
    let summary = data.bad_lines_summary().unwrap();
    assert!(summary.contains("4 bad line") && summary.contains("e2e_small.txt:5: no `||`"), "{summary}");
}

#[test]
fn groups_references_by_source_in_first_seen_order() {
    let data = read_examples(data_path("e2e_small.txt")).unwrap();
    let groups = group_by_source(&data.examples);
    assert_eq!(data.group_by_source(), groups);
    let sources: Vec<&str> = groups.iter().map(|g| g.source.as_str()).collect();
    assert_eq!(
        sources,
        [
            "name : Alimentum | area : city centre | family friendly : no",
            "name : Aromi | eatType : coffee shop",
            "name : Blue Spice"
        ]
    );
    assert_eq!(
        groups[0].targets,
        [
            "There is a place in the city centre , Alimentum , that is not family - friendly .",
            "Alimentum is not a family - friendly place , located in city centre .",
            "Alimentum , in the city centre , is not family - friendly .",
        ]
    );
    assert_eq!(groups[1].targets, ["Aromi is a coffee shop ."]);
    assert!(group_by_source(&[]).is_empty());
}

/// A JSONL line's "prefix" chooses the prefix a source generates with: read for generation only, and a source named
/// with two prefixes is two sources; a "prefix" that is not a string is a bad line.
#[test]
fn jsonl_sources_name_their_prefixes() {
    let dir = std::env::temp_dir().join(format!("pfx-data-prefixes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mixed.jsonl");
    let lines = [
        r#"{"source": "a", "target": "x", "prefix": "alice.safetensors"}"#,
        r#"{"source": "a", "target": "y"}"#,
        r#"{"source": "a", "target": "z", "prefix": "alice.safetensors"}"#,
        r#"{"source": "b", "prefix": "bob.safetensors"}"#,
        r#"{"source": "c", "prefix": 7}"#,
        r#"{"source": "d", "prefix": null}"#,
        r#"{"source": "e", "Prefix": "carol.safetensors"}"#,
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let data = read_sources(&file).unwrap();
    let group = |source: &str, prefix: Option<&str>, targets: &[&str], line: usize| SourceGroup {
        source: source.into(),
        prefix: prefix.map(String::from),
        targets: targets.iter().map(|t| t.to_string()).collect(),
        origin: format!("{}:{line}", file.display()),
    };
    assert_eq!(
        data.group_by_source(),
        [
            group("a", Some("alice.safetensors"), &["x", "z"], 1),
            group("a", None, &["y"], 2),
            group("b", Some("bob.safetensors"), &[""], 4),
            group("d", None, &[""], 6),
        ]
    );
    let bad: Vec<(&str, &str)> = data.bad_lines.iter().map(|b| (b.origin.as_str(), b.reason.as_str())).collect();
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad[0].0.ends_with("mixed.jsonl:5") && bad[0].1.contains("\"prefix\" is not a string"), "{bad:?}");
    assert!(bad[1].0.ends_with("mixed.jsonl:7") && bad[1].1.contains("is \"prefix\" (lower case)"), "{bad:?}");
    // Training reads no prefix (the one it trains is the run's).
    std::fs::write(&file, lines[..3].join("\n")).unwrap();
    assert!(read_examples(&file).unwrap().examples.iter().all(|e| e.prefix.is_none()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reads_jsonl_and_reports_bad_lines() {
    let data = read_examples(data_path("small.jsonl")).unwrap();
    assert_eq!(data.format, Format::Jsonl);
    assert_eq!(origins(&data), ["small.jsonl:1", "small.jsonl:2", "small.jsonl:9"]);
    assert_eq!(
        data.examples[1],
        Example {
            source: "name : The Vaults | eatType : pub".into(),
            target: "A pub called The Vaults.".into(),
            origin: data.examples[1].origin.clone(),
            prefix: None,
        }
    );
    let bad = bad_lines(&data);
    let where_: Vec<&str> = bad.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(where_, ["small.jsonl:3", "small.jsonl:4", "small.jsonl:5", "small.jsonl:6", "small.jsonl:8"]);
    assert!(bad[0].1.starts_with("not JSON"), "{:?}", bad[0]);
    assert!(bad[1].1.contains("not a JSON object"), "{:?}", bad[1]);
    assert!(bad[2].1.contains("no \"target\""), "{:?}", bad[2]);
    assert!(bad[3].1.contains("\"source\" is not a string"), "{:?}", bad[3]);
    assert!(bad[4].1.contains("empty \"target\""), "{:?}", bad[4]);
}

#[test]
fn reads_dart_with_reference_linearization() {
    let data = read_examples(data_path("dart_small.json")).unwrap();
    assert_eq!(data.format, Format::Dart);
    // One example per annotation, at the annotation's line.
    assert_eq!(origins(&data), ["dart_small.json:9", "dart_small.json:10", "dart_small.json:21"]);
    let mars = "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina";
    assert_eq!(data.examples[0].source, mars);
    assert_eq!(data.examples[0].target, "A school from Mars Hill, North Carolina, joined in 1973.");
    assert_eq!(data.examples[1].source, mars);
    assert_eq!(data.examples[2].source, "[TABLECONTEXT] : [title] : Athletics");
    assert_eq!(data.examples[2].target, "Athletics.");
    let bad = bad_lines(&data);
    let where_: Vec<&str> = bad.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(where_, ["dart_small.json:13", "dart_small.json:20", "dart_small.json:24", "dart_small.json:28"]);
    assert!(bad[0].1.contains("entry 1: triple 0 is not [subject, predicate, object]"), "{:?}", bad[0]);
    assert!(bad[1].1.contains("entry 2, annotation 0: no \"text\""), "{:?}", bad[1]);
    assert!(bad[2].1.contains("entry 3 has no \"annotations\""), "{:?}", bad[2]);
    assert!(bad[3].1.contains("entry 4 is not"), "{:?}", bad[3]);
    assert_eq!(data.group_by_source().len(), 2);
}

#[test]
fn unusable_files_are_errors_naming_the_file() {
    let err = format!("{:#}", read_examples(data_path("all_bad.e2e")).unwrap_err());
    assert!(err.contains("all_bad.e2e") && err.contains("all 3 line(s) are bad"), "{err}");
    assert!(err.contains("all_bad.e2e:1: no `||`") && err.contains("all_bad.e2e:4: empty MR"), "{err}");

    let err = format!("{:#}", read_examples(data_path("empty.jsonl")).unwrap_err());
    assert!(err.contains("empty.jsonl") && err.contains("empty"), "{err}");

    // A missing file is reported as missing, whatever its extension (an unknown extension of a file that
    // exists: `data::tests` in the library).
    let err = format!("{:#}", read_examples(data_path("train.csv")).unwrap_err());
    assert!(err.contains("train.csv") && err.contains("no such file"), "{err}");

    let err = format!("{:#}", read_examples(data_path("missing.txt")).unwrap_err());
    assert!(err.contains("missing.txt"), "{err}");

    // A DART file that is not a list.
    let path = Path::new("webnlg.json");
    let err = pfx_runtime::data::parse_examples(br#"{"entries": []}"#, Format::Dart, path).unwrap_err().to_string();
    assert!(err.contains("webnlg.json") && err.contains("WebNLG"), "{err}");
    let err = pfx_runtime::data::parse_examples(b"[1, 2", Format::Dart, path).unwrap_err().to_string();
    assert!(err.contains("not DART json"), "{err}");
    // DART counts entries, not lines; an empty list is not a blank file.
    let err = pfx_runtime::data::parse_examples(b" [ ]\n", Format::Dart, path).unwrap_err().to_string();
    assert!(err.contains("list of DART entries is empty"), "{err}");
    let err = pfx_runtime::data::parse_examples(b"[1, {}]", Format::Dart, path).unwrap_err().to_string();
    assert!(err.contains("all 2 entries or annotations are bad"), "{err}");
}

// ---------------------------------------------------------------- format and labels

/// A model with its own special tokens: the prompt is `tokenizer(source) + [eos]` and the labelled part
/// `tokenizer(target, add_special_tokens=False) + [eos]`, with the ids Hugging Face's tokenizers give
/// (`graphs/make_text_references.py`: a Llama-style SentencePiece tokenizer that adds `<s>`, an OPT-style
/// byte-level one that adds `</s>`; both add a BOS, which GPT-2's format never has).
#[test]
fn formats_with_a_models_own_tokens_like_hugging_face() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/tokenizers");
    let text = std::fs::read_to_string(dir.join("model-format-cases.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (name, want) in all.as_object().unwrap() {
        let tok = Tokenizer::from_file(dir.join(name)).unwrap();
        let eos = want["eos"].as_u64().unwrap() as u32;
        let fmt = TableToText::with_model_eos(&tok, eos).unwrap();
        assert_eq!((fmt.bos_id(), fmt.eos_id(), fmt.pad_id()), (eos, eos, eos), "{name}");
        let cases = want["cases"].as_array().unwrap();
        assert!(cases.len() >= 6, "{name}");
        for case in cases {
            let ex = example(case["source"].as_str().unwrap(), case["target"].as_str().unwrap());
            let (prompt, labelled) = fmt.encode_pair(&ex).unwrap();
            assert_eq!(prompt, ids_of(&case["prompt"]), "{name}: prompt of {:?}", ex.source);
            assert_eq!(labelled, ids_of(&case["labelled"]), "{name}: labelled part of {:?}", ex.target);
            assert_eq!(fmt.encode_prompt(&ex.source).unwrap(), prompt, "{name}");
        }
        assert!(fmt.describe().contains(tok.id_token(eos).unwrap().as_str()), "{name}: {}", fmt.describe());
        // The special tokens around a text, as Hugging Face's tokenizer adds them; a cut prompt keeps those before.
        let (before, after) = tok.text_specials().unwrap();
        assert_eq!(
            (before.clone(), after.clone()),
            (ids_of(&want["specials_before"]), ids_of(&want["specials_after"]))
        );
        assert_eq!(fmt.prompt_head_len(), before.len(), "{name}");
        // The layout line shows them (one EOS after the source when the tokenizer ends a text with it).
        let shown = |ids: &[u32]| ids.iter().map(|&t| tok.id_token(t).unwrap() + " ").collect::<String>();
        let mut close = after;
        if close.last() != Some(&eos) {
            close.push(eos);
        }
        let want_line = format!("{}source {}target {}", shown(&before), shown(&close), tok.id_token(eos).unwrap());
        assert!(fmt.describe().starts_with(&want_line), "{name}: {} (want {want_line})", fmt.describe());
    }
    // An end-of-text id the tokenizer does not have is refused, naming the tokenizer.
    let tok = Tokenizer::from_file(dir.join("llama-style")).unwrap();
    let e = TableToText::with_model_eos(&tok, 5000).unwrap_err().to_string();
    assert!(e.contains("5000") && e.contains("llama-style"), "{e}");
}

#[test]
fn formats_a_known_example_like_the_reference() {
    let tok = gpt2();
    let fmt = TableToText::new(&tok).unwrap();
    assert_eq!((fmt.bos_id(), fmt.eos_id(), fmt.pad_id()), (50256, 50256, 50256));
    let ex = example("name : Alimentum | area : city centre", "There is a place in the city centre .");
    // The whole text, tokenized in one piece by the Python tokenizers package.
    let text =
        " name : Alimentum | area : city centre <|endoftext|> There is a place in the city centre . <|endoftext|>";
    let cases = cases();
    let case = cases["cases"].as_array().unwrap().iter().find(|c| c["text"] == text).unwrap();
    let joint = ids_of(&case["ids"]);
    let bos_at = joint.iter().position(|&t| t == 50256).unwrap();
    assert_eq!(&joint[bos_at - 1..=bos_at], [220, 50256], "the space before BOS is a token");

    let prompt = fmt.encode_prompt(&ex.source).unwrap();
    assert_eq!(prompt, joint[..=bos_at]);
    assert_eq!(tok.decode(&prompt).unwrap(), " name : Alimentum | area : city centre ");
    let (source, target) = fmt.encode_pair(&ex).unwrap();
    assert_eq!([source.clone(), target.clone()].concat(), joint, "split tokenization == joint tokenization");
    assert_eq!(tok.decode(&target).unwrap(), " There is a place in the city centre . ");

    let t = joint.len() + 3;
    let (row, truncated) = fmt.encode_example(&ex, t, Overlong::Skip).unwrap().unwrap();
    assert!(!truncated);
    let expect_ids: Vec<i64> = joint.iter().map(|&x| x as i64).chain([50256; 3]).collect();
    assert_eq!(row.input_ids, expect_ids);
    assert_eq!(row.attention_mask, [vec![1; joint.len()], vec![0; 3]].concat());
    let mut expect_labels = vec![IGNORE_INDEX; bos_at + 1];
    expect_labels.extend(joint[bos_at + 1..].iter().map(|&x| x as i64));
    expect_labels.extend([IGNORE_INDEX; 3]);
    assert_eq!(row.labels, expect_labels);
    assert_eq!(*row.labels.iter().rev().nth(3).unwrap(), 50256, "the final EOS is a label");
    assert_eq!(row.n_labels(), joint.len() - bos_at - 1);
    let mut repeat = row.clone();
    repeat.ignore_labels();
    assert_eq!(repeat.n_labels(), 0);
}

#[test]
fn truncates_or_skips_overlong_examples() {
    let tok = gpt2();
    let fmt = TableToText::new(&tok).unwrap();
    let short = example("name : A", "A .");
    let long_target = example("name : B", &"word ".repeat(40));
    let long_source = example(&"name : C | ".repeat(20), "C .");
    let len = |e: &Example| {
        let (s, t) = fmt.encode_pair(e).unwrap();
        (s.len(), t.len())
    };
    let (s_short, t_short) = len(&short);
    let (s_lt, _) = len(&long_target);
    let (s_ls, _) = len(&long_source);
    let t = 24;
    assert!(s_short + t_short <= t && s_lt < t && s_ls >= t, "fixture lengths changed");
    let examples = vec![short.clone(), long_target.clone(), long_source.clone()];

    let (rows, report) = fmt.encode_examples(&examples, t, Overlong::Truncate).unwrap();
    assert_eq!((report.kept, report.truncated, report.skipped, report.bad_lines), (2, 1, 1, 0));
    assert_eq!(rows.len(), 2);
    assert!(report.longest > t);
    let cut = &rows[1];
    assert!(cut.input_ids.len() == t && cut.attention_mask.iter().all(|&m| m == 1));
    assert_eq!(cut.n_labels(), t - s_lt);
    assert_eq!(cut.labels[..s_lt], vec![IGNORE_INDEX; s_lt]);
    assert_eq!(cut.labels[s_lt..], cut.input_ids[s_lt..]);

    let (rows, report) = fmt.encode_examples(&examples, t, Overlong::Skip).unwrap();
    assert_eq!((report.kept, report.truncated, report.skipped), (1, 0, 2));
    assert_eq!(report.skipped_origins, ["test:1", "test:1"]);
    assert_eq!(rows[0].input_ids.len(), t);
    assert!(report.to_string().contains("2 skipped"), "{report}");

    let err = fmt.encode_examples(&[long_source], t, Overlong::Truncate).unwrap_err().to_string();
    assert!(err.contains("no example fits in 24 tokens"), "{err}");

    // encode_dataset carries the file's bad-line count.
    let data = read_examples(data_path("e2e_small.txt")).unwrap();
    let (rows, report) = fmt.encode_dataset(&data, 64, Overlong::Skip).unwrap();
    assert_eq!((rows.len(), report.kept, report.skipped, report.bad_lines), (5, 5, 0, 4));
}

// ---------------------------------------------------------------- batching

#[test]
fn splitmix64_matches_the_reference_generator() {
    // First outputs of Vigna's splitmix64.c.
    assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    let mut rng = SplitMix64::new(1234567);
    assert_eq!(rng.next_u64(), 6457827717110365317);
    assert_eq!(rng.next_u64(), 3203168211198807973);
    let mut rng = SplitMix64::new(7);
    assert!((0..1000).all(|_| rng.below(3) < 3));
}

#[test]
fn batches_are_deterministic_and_cover_each_example_once_per_epoch() {
    // Frozen: the order must not change across runs, platforms or refactors (it decides training results).
    assert_eq!(shuffled(10, 42, 0), GOLDEN_ORDER);
    let b = batches(10, 4, 42, 0);
    assert_eq!(b.len(), 3);
    assert_eq!(b[0].rows, GOLDEN_ORDER[0..4]);
    assert_eq!(b[2].rows, [GOLDEN_ORDER[8], GOLDEN_ORDER[9], GOLDEN_ORDER[0], GOLDEN_ORDER[1]]);
    assert_eq!(b[2].real, [true, true, false, false]);

    for (n, batch) in [(10, 4), (12, 4), (3, 8), (1, 1), (37, 5)] {
        for epoch in 0..3 {
            let b = batches(n, batch, 7, epoch);
            assert_eq!(b, batches(n, batch, 7, epoch), "deterministic");
            assert_eq!(b.len(), n.div_ceil(batch));
            let mut seen = vec![0; n];
            for (k, batch_k) in b.iter().enumerate() {
                assert_eq!((batch_k.rows.len(), batch_k.real.len()), (batch, batch));
                if k + 1 < b.len() {
                    assert!(batch_k.real.iter().all(|&r| r), "only the last batch has repeats");
                }
                for (&row, &real) in batch_k.rows.iter().zip(&batch_k.real) {
                    assert!(row < n);
                    seen[row] += real as usize;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "n={n} batch={batch}: {seen:?}");
            let fill = b.len() * batch - n;
            assert_eq!(b.last().unwrap().real.iter().filter(|&&r| !r).count(), fill);
        }
    }
    // n < batch wraps around more than once.
    let b = batches(3, 8, 1, 0);
    let order = shuffled(3, 1, 0);
    assert_eq!(b[0].rows, [0, 1, 2, 0, 1, 2, 0, 1].map(|i| order[i]));
    assert!(batches(0, 4, 1, 0).is_empty());

    // Epochs and seeds give different orders.
    assert_ne!(shuffled(50, 42, 0), shuffled(50, 42, 1));
    assert_ne!(shuffled(50, 42, 0), shuffled(50, 43, 0));
    // Every position takes every value about equally often (a biased shuffle would not).
    let mut counts = [[0u32; 5]; 5];
    for epoch in 0..5000 {
        for (pos, &v) in shuffled(5, 3, epoch).iter().enumerate() {
            counts[pos][v] += 1;
        }
    }
    assert!(counts.iter().flatten().all(|&c| (850..1150).contains(&c)), "{counts:?}");
}

/// shuffled(10, 42, 0), also computed by a separate Python transcription of SplitMix64 + Fisher-Yates.
const GOLDEN_ORDER: [usize; 10] = [7, 1, 6, 3, 0, 2, 5, 8, 4, 9];

/// The full E2E dev and DART dev sets, where they are present (not in a fresh clone):
/// `PFX_DATA_DIR=/work/shared/data cargo test -p pfx-runtime --test data -- --ignored`.
#[test]
#[ignore = "needs PFX_DATA_DIR with e2e/valid.txt and dart/dev.json"]
fn full_e2e_and_dart_dev_sets_read_cleanly() {
    let dir = PathBuf::from(std::env::var("PFX_DATA_DIR").expect("set PFX_DATA_DIR"));
    let tok = gpt2();
    let fmt = TableToText::new(&tok).unwrap();

    let e2e = read_examples(dir.join("e2e/valid.txt")).unwrap();
    assert_eq!((e2e.examples.len(), e2e.bad_lines.len(), e2e.group_by_source().len()), (4672, 0, 547));
    let (_, report) = fmt.encode_dataset(&e2e, 128, Overlong::Skip).unwrap();
    assert_eq!(report.skipped, 0, "{report}");
    eprintln!("E2E valid: {report}");

    let dart = read_examples(dir.join("dart/dev.json")).unwrap();
    // Counts from a Python transcription of the reference linearization.
    assert_eq!((dart.examples.len(), dart.bad_lines.len(), dart.group_by_source().len()), (6980, 0, 2721));
    let (_, report) = fmt.encode_dataset(&dart, 1024, Overlong::Skip).unwrap();
    eprintln!("DART dev: {report}");
}
