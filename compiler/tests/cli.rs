//! `pfxc` on bad input: a clear message and a non-zero exit, never a panic; and `inspect` on every fixture.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pfx_compiler::onnx_io;

fn graphs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs")
}

fn pfxc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfxc")).args(args).output().expect("pfxc runs")
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfxc-cli-{tag}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Asserts a failure with a message containing every `needles`, and no panic.
fn fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure, got success; stderr: {err}");
    assert_eq!(out.status.code(), Some(1), "expected exit code 1 (error), got {:?}: {err}", out.status.code());
    assert!(!err.contains("panicked"), "pfxc panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn truncated_file() {
    let d = tmp("trunc");
    let bytes = std::fs::read(graphs().join("gpt2-legacy/model.onnx")).unwrap();
    let f = d.join("model.onnx");
    std::fs::write(&f, &bytes[..bytes.len() / 3]).unwrap();
    fails_with(&pfxc(&["inspect", s(&f)]), &["model.onnx", "not an ONNX model"]);
    // Cut right after the graph: exporters write the opset imports last, so a file cut there decodes, without
    // them. Made by writing the model again without its opset imports.
    use onnx_protobuf::ModelProto;
    use protobuf::Message;
    let mut proto = ModelProto::parse_from_bytes(&bytes).unwrap();
    proto.opset_import.clear();
    std::fs::write(&f, proto.write_to_bytes().unwrap()).unwrap();
    fails_with(&pfxc(&["inspect", s(&f)]), &["model.onnx is truncated or not an ONNX model: it has no opset import"]);
}

#[test]
fn not_onnx() {
    let d = tmp("notonnx");
    let f = d.join("notes.onnx");
    std::fs::write(&f, "these are not the weights you are looking for\n").unwrap();
    fails_with(&pfxc(&["inspect", s(&f)]), &["notes.onnx", "not an ONNX model"]);
    fails_with(&pfxc(&["inspect", s(&d.join("missing.onnx"))]), &["cannot read", "missing.onnx"]);
}

#[test]
fn unknown_op_names_op_domain_node_and_opset() {
    let d = tmp("unknownop");
    let mut m = onnx_io::load(&graphs().join("gpt2-legacy/model.onnx")).unwrap();
    let node = m.graph.nodes.iter_mut().find(|n| n.op == "Softmax").unwrap();
    node.op = "FancyAttention".into();
    let name = node.name.clone();
    let f = d.join("model.onnx");
    onnx_io::save(&m, &f, None).unwrap();
    fails_with(&pfxc(&["inspect", s(&f)]), &["unsupported op", "FancyAttention", "ai.onnx", &name, "opset 14"]);
    fails_with(
        &pfxc(&["specialize", s(&f), "--batch", "1", "--seq", "4", "-o", s(&d.join("o.onnx"))]),
        &["FancyAttention"],
    );
}

#[test]
fn unsupported_opset() {
    let d = tmp("opset");
    let mut m = onnx_io::load(&graphs().join("gpt2-legacy/model.onnx")).unwrap();
    m.opset = 9;
    let f = d.join("model.onnx");
    onnx_io::save(&m, &f, None).unwrap();
    fails_with(&pfxc(&["inspect", s(&f)]), &["opset 9 is not supported", "11 to 24"]);
}

/// Copies the external-data fixture into a fresh folder, letting `edit` change the data file.
fn external_copy(tag: &str, location: &str, data: Option<&[u8]>) -> PathBuf {
    let d = tmp(tag);
    let model = std::fs::read(graphs().join("gpt2-dynamo/model.onnx")).unwrap();
    // The location string sits verbatim in the protobuf; a same-length replacement keeps it valid.
    let from = b"model.onnx.data";
    assert_eq!(location.len(), from.len());
    let patched = replace_all(&model, from, location.as_bytes());
    std::fs::write(d.join("model.onnx"), patched).unwrap();
    if let Some(bytes) = data {
        std::fs::write(d.join(location), bytes).unwrap();
    }
    d
}

fn replace_all(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    let mut n = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
            n += 1;
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    assert!(n > 0, "location string not found");
    out
}

#[test]
fn missing_and_short_external_data() {
    let data = std::fs::read(graphs().join("gpt2-dynamo/model.onnx.data")).unwrap();
    let d = external_copy("extmissing", "model.onnx.data", None);
    fails_with(
        &pfxc(&["inspect", s(&d.join("model.onnx"))]),
        &["external data file", "model.onnx.data", "does not exist"],
    );
    let d = external_copy("extshort", "model.onnx.data", Some(&data[..data.len() / 2]));
    fails_with(&pfxc(&["inspect", s(&d.join("model.onnx"))]), &["model.onnx.data", "short or truncated"]);
}

#[test]
fn external_data_outside_the_model_folder_is_refused() {
    let data = std::fs::read(graphs().join("gpt2-dynamo/model.onnx.data")).unwrap();
    // A relative path that climbs out.
    let d = external_copy("extescape", "../el.onnx.data", None);
    std::fs::write(d.parent().unwrap().join("el.onnx.data"), &data).unwrap();
    fails_with(&pfxc(&["inspect", s(&d.join("model.onnx"))]), &["outside the model's folder", "../el.onnx.data"]);
    // An absolute path.
    let abs = "/tmp/abs.onnx.d";
    let d = external_copy("extabs", abs, None);
    std::fs::write(abs, &data).unwrap();
    fails_with(&pfxc(&["inspect", s(&d.join("model.onnx"))]), &["outside the model's folder", abs]);
    // A symlink inside the folder that points out of it.
    let d = external_copy("extlink", "model.onnx.data", None);
    let outside = d.parent().unwrap().join(format!("outside-{}.data", std::process::id()));
    std::fs::write(&outside, &data).unwrap();
    std::os::unix::fs::symlink(&outside, d.join("model.onnx.data")).unwrap();
    fails_with(&pfxc(&["inspect", s(&d.join("model.onnx"))]), &["outside the model's folder", "refused"]);
}

#[test]
fn zero_sizes_are_refused() {
    let d = tmp("zero");
    let m = graphs().join("gpt2-legacy/model.onnx");
    let o = d.join("o.onnx");
    fails_with(
        &pfxc(&["specialize", s(&m), "--batch", "0", "--seq", "4", "-o", s(&o)]),
        &["--batch must be at least 1"],
    );
    fails_with(&pfxc(&["specialize", s(&m), "--batch", "2", "--seq", "0", "-o", s(&o)]), &["--seq must be at least 1"]);
    fails_with(
        &pfxc(&["specialize", s(&m), "--batch", "2", "--seq", "3", "--past", "2", "-o", s(&o)]),
        &["no past_key_values"],
    );
    // Past the position table (64 rows): named by the lengths, not by the lookup that cannot fold.
    let past = graphs().join("gpt2-dynamo-past/model.onnx");
    fails_with(
        &pfxc(&["specialize", s(&past), "--batch", "1", "--seq", "30", "--past", "40", "-o", s(&o)]),
        &["--past 40 + --seq 30 needs 70 positions, but the model has 64"],
    );
    // OPT's 66-row table starts 2 rows in, as BART's: 64 positions.
    let opt = graphs().join("opt-tiny/model.onnx");
    fails_with(
        &pfxc(&["specialize", s(&opt), "--batch", "1", "--seq", "6", "--past", "60", "-o", s(&o)]),
        &["--past 60 + --seq 6 needs 66 positions, but the model has 64"],
    );
    assert!(!o.exists(), "nothing must be written on error");
}

#[test]
fn specialize_writes_a_graph_with_external_data_on_request() {
    let d = tmp("specext");
    let m = graphs().join("gpt2-dynamo/model.onnx");
    let o = d.join("spec.onnx");
    let out = pfxc(&["specialize", s(&m), "--batch", "1", "--seq", "4", "--external-data", "-o", s(&o)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.join("spec.onnx.data").exists());
    let back = onnx_io::load(&o).unwrap();
    let orig = onnx_io::load(&m).unwrap();
    // Weights round-trip bit for bit through the shared external file.
    let w = "model.transformer.h.0.attn.c_attn.weight";
    assert_eq!(back.graph.initializers[w], orig.graph.initializers[w]);
}

/// `pfxc inspect` on every fixture graph: family and dimensions (reviewed snapshot).
#[test]
fn inspect_every_fixture() {
    let mut models: Vec<PathBuf> = Vec::new();
    for dir in std::fs::read_dir(graphs()).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() || dir.file_name().unwrap() == "unit" {
            continue;
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().map(|e| e == "onnx").unwrap_or(false) {
                models.push(f);
            }
        }
    }
    models.sort();
    assert!(models.len() >= 8, "fixtures missing: {models:?}");
    for m in models {
        let out = pfxc(&["inspect", s(&m)]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{}: {}", m.display(), String::from_utf8_lossy(&out.stderr));
        let rel = m.strip_prefix(graphs()).unwrap().to_string_lossy().replace('/', "__");
        insta::assert_snapshot!(format!("inspect__{rel}"), text);
        let json = pfxc(&["inspect", "--json", s(&m)]);
        let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("inspect --json prints JSON");
        assert!(v["family"].is_string());
    }
}

/// A GPT-2 export folder compiles as the model.onnx in it (the same graphs as naming the file); a folder with
/// neither that nor a BART export's files is an error that says what to pass.
#[test]
fn a_gpt2_export_folder_stands_for_its_model() {
    let d = tmp("folder");
    let args = ["--prefix-len", "2", "--mid-dim", "8", "--batch", "2", "--seq", "6"];
    let (by_file, by_folder) = (d.join("file"), d.join("folder"));
    let file = graphs().join("gpt2-legacy/model.onnx");
    for (model, out) in [(file.clone(), &by_file), (graphs().join("gpt2-legacy"), &by_folder)] {
        let o = pfxc(&[&["compile", s(&model), "-o", s(out)][..], &args].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for g in ["train_step.onnx", "eval_step.onnx", "grads.onnx"] {
        assert_eq!(std::fs::read(by_file.join(g)).unwrap(), std::fs::read(by_folder.join(g)).unwrap(), "{g}");
    }
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = pfxc(&[&["compile", s(&empty), "-o", s(&d.join("x"))][..], &args].concat());
    fails_with(&o, &["empty", "without a model.onnx", "--bart-prefix"]);
    fails_with(&pfxc(&["inspect", s(&empty)]), &["holds no .onnx file"]);
    // A BART folder: each of its graphs, named.
    let o = pfxc(&["inspect", s(&graphs().join("bart-enc-deep"))]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("encoder_model.onnx\nfamily:      BART encoder"), "{text}");
    assert_eq!(text.matches("\nfamily:      BART decoder").count(), 3, "{text}");
}

#[test]
fn a_failed_write_of_the_results_is_an_error_not_a_crash() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_pfxc"))
        .args(["inspect", s(&graphs().join("gpt2-legacy/model.onnx"))])
        .stdout(full)
        .output()
        .unwrap();
    fails_with(&out, &["failed printing to stdout", "No space left on device"]);
}

/// A broken generation_config.json beside an export is refused by compile before any work, naming the file (read
/// as "no setting" it would drop the end ids generation stops at); inspect still describes the graph, warning.
#[test]
fn a_broken_model_json_file_is_refused_by_compile_named_by_inspect() {
    let d = tmp("brokenjson");
    let export = d.join("export");
    std::fs::create_dir_all(&export).unwrap();
    for f in ["model.onnx", "config.json"] {
        std::fs::copy(graphs().join("llama-gqa-tiny").join(f), export.join(f)).unwrap();
    }
    std::fs::write(export.join("generation_config.json"), "{\"eos_token_id\": [2, 95,]}").unwrap();
    let args = ["--prefix-len", "2", "--batch", "2", "--seq", "6", "--max-new", "0"];
    let out = d.join("bundle");
    let o = pfxc(&[&["compile", s(&export.join("model.onnx")), "-o", s(&out)][..], &args].concat());
    fails_with(&o, &["generation_config.json is not valid JSON", "line 1", "fix the file or move it away"]);
    assert!(!out.join("manifest.json").exists());
    let o = pfxc(&["inspect", s(&export.join("model.onnx"))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("config.json: llama"));
    std::fs::write(export.join("generation_config.json"), "{\"eos_token_id\": [2, -1]}").unwrap();
    let o = pfxc(&[&["compile", s(&export.join("model.onnx")), "-o", s(&out)][..], &args].concat());
    fails_with(&o, &["generation_config.json: eos_token_id is [2,-1]", "a whole number"]);
}
