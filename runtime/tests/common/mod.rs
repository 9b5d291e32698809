#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use pfx_runtime::{read_safetensors, HostTensor};

pub mod state;

/// The tiny test graphs made by graphs/unit/make_unit_graphs.py.
pub fn unit_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("graphs").join("unit")
}

pub fn model(graph: &str) -> PathBuf {
    unit_dir().join(format!("{graph}.onnx"))
}

/// Graphs and their cases (several input shapes each: the graphs have symbolic dims).
pub const CASES: &[(&str, &[&str])] = &[("matmul_softmax", &["b2", "b5"]), ("embed_external", &["b2s3", "b1s4"])];

pub fn case(graph: &str, case: &str) -> (BTreeMap<String, HostTensor>, BTreeMap<String, HostTensor>) {
    let dir = unit_dir();
    let inputs = read_safetensors(dir.join(format!("{graph}.{case}.inputs.safetensors"))).unwrap();
    let expected = read_safetensors(dir.join(format!("{graph}.{case}.expected.safetensors"))).unwrap();
    (inputs, expected)
}

pub const TOL: f64 = 1e-5;

/// Float outputs within TOL (norm-relative and max-abs scaled by the reference's largest magnitude),
/// everything else exactly equal; the same set of names on both sides.
pub fn assert_close(what: &str, actual: &BTreeMap<String, HostTensor>, expected: &BTreeMap<String, HostTensor>) {
    let a: Vec<_> = actual.keys().collect();
    let e: Vec<_> = expected.keys().collect();
    assert_eq!(a, e, "{what}: output names differ");
    for (name, exp) in expected {
        let act = &actual[name];
        assert_eq!(act.dtype(), exp.dtype(), "{what}: `{name}` dtype");
        assert_eq!(act.shape(), exp.shape(), "{what}: `{name}` shape");
        if exp.dtype().is_float() {
            let n = act.norm_rel_error(exp).unwrap();
            let m = act.scaled_max_error(exp).unwrap();
            assert!(n <= TOL && m <= TOL, "{what}: `{name}` norm-rel {n:e}, scaled-max {m:e} > {TOL:e}");
        } else {
            assert_eq!(act, exp, "{what}: `{name}` differs");
        }
    }
}

/// True when the ONNX Runtime checks should run. They run unless PFX_SKIP_ORT=1; when ONNX Runtime
/// cannot be found they FAIL with the install hint (they never skip silently).
pub fn ort_wanted() -> bool {
    if std::env::var("PFX_SKIP_ORT").as_deref() == Ok("1") {
        eprintln!("PFX_SKIP_ORT=1: skipping the ONNX Runtime checks");
        return false;
    }
    if let Err(e) = pfx_runtime::ort_runtime(None) {
        panic!("ONNX Runtime is needed by this test (set PFX_SKIP_ORT=1 to skip it): {e:#}");
    }
    true
}

/// A fresh scratch folder for one test.
/// The `--backend`s to run: tract, and ONNX Runtime unless `PFX_SKIP_ORT=1`.
pub fn backends() -> Vec<&'static str> {
    let mut v = vec!["tract"];
    if ort_wanted() {
        v.push("ort");
    }
    v
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pfx-runtime").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Eight E2E sources in a JSONL file, six naming a prefix of their own (`users/alice.safetensors`,
/// `users/bob.safetensors`: a bundle's initial prefix scaled and shifted, so that they generate differently), for tests of
/// batches that mix prefixes.
pub struct MixedPrefixes {
    pub dir: PathBuf,
    /// The bundle's initial prefix: the run's `--prefix`.
    pub init: PathBuf,
    /// `dir/users/inputs.jsonl`.
    pub inputs: PathBuf,
    lines: Vec<String>,
}

impl MixedPrefixes {
    /// Who owns input i % 4 (alice's file spelled two ways: one file all the same).
    const OWNERS: [Option<&'static str>; 4] = [None, Some("alice"), Some("bob"), Some("./alice")];

    pub fn write(dir: &std::path::Path, init: &std::path::Path) -> MixedPrefixes {
        let users = dir.join("users");
        std::fs::create_dir_all(&users).unwrap();
        let start = read_safetensors(init).unwrap();
        for (name, scale) in [("alice", 3.0f32), ("bob", -2.0)] {
            let scaled: BTreeMap<String, HostTensor> = start
                .iter()
                .map(|(k, t)| {
                    let v = t
                        .as_f32()
                        .unwrap()
                        .iter()
                        .enumerate()
                        .map(|(j, x)| x * scale + (j as f32 * scale).sin())
                        .collect();
                    (k.clone(), HostTensor::from_f32(t.shape().to_vec(), v).unwrap())
                })
                .collect();
            pfx_runtime::write_safetensors(users.join(format!("{name}.safetensors")), &scaled).unwrap();
        }
        let names = ["name : The Eagle", "name : Aromi | food : Chinese", "name : Blue Spice | area : riverside"];
        let lines = (0..8)
            .map(|i| {
                let source = format!("{} | priceRange : {}", names[i % 3], ["cheap", "high", "moderate"][(i / 3) % 3]);
                let mut line = serde_json::json!({ "source": source });
                if let Some(u) = Self::owner(i) {
                    line["prefix"] = format!("{u}.safetensors").into();
                }
                line.to_string()
            })
            .collect::<Vec<_>>();
        let inputs = users.join("inputs.jsonl");
        std::fs::write(&inputs, lines.join("\n") + "\n").unwrap();
        MixedPrefixes { dir: dir.to_path_buf(), init: init.to_path_buf(), inputs, lines }
    }

    fn owner(i: usize) -> Option<&'static str> {
        Self::OWNERS[i % 4]
    }

    /// `pfxrun generate bundle --inputs INPUTS --prefix PREFIX --output OUT EXTRA...`: the output lines and the log.
    fn generate(
        bundle: &std::path::Path,
        inputs: &std::path::Path,
        prefix: &std::path::Path,
        out: &std::path::Path,
        extra: &[&str],
    ) -> (Vec<String>, String) {
        let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
        let mut args = vec![
            "generate".to_string(),
            s(bundle),
            "--inputs".into(),
            s(inputs),
            "--prefix".into(),
            s(prefix),
            "--output".into(),
            s(out),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_pfxrun")).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{args:?}: {err}");
        (std::fs::read_to_string(out).unwrap().lines().map(String::from).collect(), err)
    }

    /// The mixed file generates what each owner's sources generate alone with its prefix as `--prefix`, and not
    /// what they all generate with the run's prefix.
    pub fn check(&self, bundle: &std::path::Path, extra: &[&str]) {
        let (together, log) = Self::generate(bundle, &self.inputs, &self.init, &self.dir.join("mixed.txt"), extra);
        assert!(log.contains("6 input(s) name their own prefix (2 file(s) besides --prefix)"), "{log}");
        let alone = |who: Option<&str>, keep: &dyn Fn(usize) -> bool| {
            let own: String = self
                .lines
                .iter()
                .enumerate()
                .filter(|(i, _)| keep(*i))
                .map(|(_, l)| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v.as_object_mut().unwrap().remove("prefix");
                    format!("{v}\n")
                })
                .collect();
            let file = self.dir.join("alone.jsonl");
            std::fs::write(&file, own).unwrap();
            let prefix = who.map_or(self.init.clone(), |u| self.dir.join("users").join(format!("{u}.safetensors")));
            Self::generate(bundle, &file, &prefix, &self.dir.join("alone.txt"), extra).0
        };
        let mut expected = vec![String::new(); self.lines.len()];
        for who in Self::OWNERS {
            let mine: Vec<usize> = (0..self.lines.len()).filter(|&i| Self::owner(i) == who).collect();
            for (i, o) in mine.iter().zip(alone(who, &|i| Self::owner(i) == who)) {
                expected[*i] = o;
            }
        }
        assert_eq!(together, expected, "{extra:?}");
        assert_ne!(together, alone(None, &|_| true), "{extra:?}: the prefixes changed nothing");
    }
}
