//! Killing `pfxrun train` with SIGKILL and resuming gives the same later losses as an uninterrupted run; Ctrl-C,
//! divergence, other settings and earlier runs in the output folder are handled without losing a good state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pfx_compiler::compile::optimizer::AdamW;
use pfx_compiler::compile::{compile, CompileOptions};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn losses(metrics: &Path) -> BTreeMap<u64, f64> {
    logged(metrics, "loss")
}

/// One field of the steps' lines in a metrics log, by step.
fn logged(metrics: &Path, key: &str) -> BTreeMap<u64, f64> {
    let text = std::fs::read_to_string(metrics).unwrap_or_default();
    let mut m = BTreeMap::new();
    for line in text.lines() {
        // A line cut by the kill is skipped; a step redone after resuming overwrites the earlier entry.
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let (Some(s), Some(l)) = (v["step"].as_u64(), v[key].as_f64()) {
                m.insert(s, l);
            }
        }
    }
    m
}

/// Prefix 4, batch 4, sequence 48, no generation graphs.
fn options() -> CompileOptions {
    CompileOptions {
        prefix_len: 4,
        mid_dim: Some(32),
        batch: 4,
        seq: 48,
        optimizer: AdamW::default(),
        seed: 3,
        generation: None,
        weights: Default::default(),
    }
}

/// A scratch folder with the shipped small GPT-2 compiled (prefix 4, batch 4, sequence 48) and the first `rows`
/// E2E training examples: (folder, bundle, data).
fn setup(tag: &str, rows: usize) -> (PathBuf, PathBuf, PathBuf) {
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pfx-resume{tag}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let bundle = tmp.join("bundle");
    compile(&root().join("graphs/e2e-small/model.onnx"), &options(), &bundle).unwrap();
    let text = std::fs::read_to_string(root().join("examples/data/e2e_train.txt")).unwrap();
    let data = tmp.join("train.txt");
    std::fs::write(&data, text.lines().take(rows).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    (tmp, bundle, data)
}

fn train_cmd(bundle: &Path, data: &Path, out: &Path, resume: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pfxrun"));
    c.args(["train", bundle.to_str().unwrap(), "--train", data.to_str().unwrap(), "--epochs", "2", "--lr", "1e-2"])
        .args(["--warmup-steps", "2", "--checkpoint-every", "1", "--seed", "7", "-o", out.to_str().unwrap()]);
    if resume {
        c.arg("--resume");
    }
    c
}

#[test]
fn sigkill_then_resume_matches_an_uninterrupted_run() {
    // 40 examples: 10 steps per epoch, 20 in all.
    let (tmp, bundle, data) = setup("", 40);

    let whole = tmp.join("whole");
    let st = train_cmd(&bundle, &data, &whole, false).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let want = losses(&whole.join("metrics.jsonl"));
    assert_eq!(want.len(), 20);

    let cut = tmp.join("cut");
    let mut child = train_cmd(&bundle, &data, &cut, false).spawn().unwrap();
    let t0 = Instant::now();
    while losses(&cut.join("metrics.jsonl")).len() < 7 {
        assert!(t0.elapsed() < Duration::from_secs(120), "training did not progress");
        assert!(child.try_wait().unwrap().is_none(), "training ended before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second run into the folder while the first trains (checkpoints and log would interleave): refused. The
    // first is paused meanwhile, so that it cannot finish before the second starts.
    unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
    let twin = train_cmd(&bundle, &data, &cut, true).output().unwrap();
    let err = String::from_utf8_lossy(&twin.stderr);
    assert!(!twin.status.success() && err.contains("is in use by another running pfxrun"), "{err}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = losses(&cut.join("metrics.jsonl")).len();
    // Other rows, as many: not this run's data.
    let text = std::fs::read_to_string(root().join("examples/data/e2e_train.txt")).unwrap();
    let other = tmp.join("other.txt");
    std::fs::write(&other, text.lines().skip(40).take(40).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    let st = train_cmd(&bundle, &other, &cut, true).output().unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        !st.status.success() && err.contains("was made with the same settings (the training rows differ)"),
        "{err}"
    );
    // Another model of the same sizes (every weight matrix scaled): not this run's bundle.
    let mut model = pfx_compiler::onnx_io::load(&root().join("graphs/e2e-small/model.onnx")).unwrap();
    for t in model.graph.initializers.values_mut().filter(|t| t.shape.len() == 2) {
        if let pfx_compiler::tensor::Data::F32(v) = &*t.data {
            *t = pfx_compiler::tensor::Tensor::f32(t.shape.clone(), v.iter().map(|x| x * 1.5).collect());
        }
    }
    let scaled = tmp.join("scaled/model.onnx");
    std::fs::create_dir_all(scaled.parent().unwrap()).unwrap();
    pfx_compiler::onnx_io::save(&model, &scaled, None).unwrap();
    std::fs::copy(root().join("graphs/e2e-small/tokenizer.json"), tmp.join("scaled/tokenizer.json")).unwrap();
    let other_bundle = tmp.join("scaled-bundle");
    compile(&scaled, &options(), &other_bundle).unwrap();
    let st = train_cmd(&other_bundle, &data, &cut, true).output().unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(!st.status.success() && err.contains("(the bundle differs)"), "{err}");
    assert!(before < 20, "killed too late");
    // A second plain start refuses to overwrite the checkpoint.
    let again = train_cmd(&bundle, &data, &cut, false).output().unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let st = train_cmd(&bundle, &data, &cut, true).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let got = losses(&cut.join("metrics.jsonl"));
    assert_eq!(got.len(), 20, "steps after resuming");
    for (step, l) in &want {
        let g = got[step];
        assert!((g - l).abs() <= 1e-6 * l.abs(), "step {step}: {g} after resume vs {l} uninterrupted");
    }
    assert_eq!(
        std::fs::read(whole.join("prefix.safetensors")).unwrap(),
        std::fs::read(cut.join("prefix.safetensors")).unwrap(),
        "the final prefixes must be identical"
    );
    // The steps logged after the last checkpoint and redone are logged once.
    let log = std::fs::read_to_string(cut.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"loss\"")).count(), 20, "{log}");
    // The resumed run's counts go on from the checkpoint's: the same tokens as the whole run, time not restarting.
    assert_eq!(logged(&cut.join("metrics.jsonl"), "tokens"), logged(&whole.join("metrics.jsonl"), "tokens"));
    let elapsed: Vec<f64> = logged(&cut.join("metrics.jsonl"), "elapsed_s").into_values().collect();
    assert!(elapsed.windows(2).all(|w| w[0] <= w[1]), "elapsed_s restarted after resuming: {elapsed:?}");
    // A finished run resumes to nothing; other settings cannot resume it.
    let st = train_cmd(&bundle, &data, &cut, true).output().unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success() && err.contains("is finished (20 of 20 steps)"), "{err}");
    let st = train_cmd(&bundle, &data, &cut, true).arg("--no-shuffle").output().unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(!st.status.success() && err.contains("was made with") && err.contains("--seed 7 --no-shuffle"), "{err}");
    assert_eq!(
        std::fs::read(whole.join("prefix.safetensors")).unwrap(),
        std::fs::read(cut.join("prefix.safetensors")).unwrap()
    );
}

/// Ctrl-C saves and exits 130 (a script must not go on with half a run); a diverging run keeps its last
/// good checkpoint; an earlier run's outputs are not overwritten.
#[test]
fn interrupted_diverged_and_earlier_runs_are_kept_apart() {
    let (tmp, bundle, data) = setup("-edges", 400);

    let run = tmp.join("run");
    let child = train_cmd(&bundle, &data, &run, false).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while losses(&run.join("metrics.jsonl")).len() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "training did not progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted after step") && run.join("checkpoint.safetensors").exists(), "{err}");
    // A run into the same folder without --resume: refused, even with the checkpoint gone.
    std::fs::remove_file(run.join("checkpoint.safetensors")).unwrap();
    let st = train_cmd(&bundle, &data, &run, false).output().unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(!st.status.success() && err.contains("prefix.safetensors of an earlier run"), "{err}");

    // A learning rate that sends the prefix past f32's range: the step that does it is not checkpointed.
    let big = tmp.join("big");
    let mut c = Command::new(env!("CARGO_BIN_EXE_pfxrun"));
    c.args(["train", bundle.to_str().unwrap(), "--train", data.to_str().unwrap(), "--lr", "3e38"]).args([
        "--checkpoint-every",
        "1",
        "-o",
        big.to_str().unwrap(),
    ]);
    let st = c.output().unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(!st.status.success() && err.contains("the prefix became NaN or infinite at step 1"), "{err}");
    assert!(err.contains("warning: --lr 3e38 is far above"), "{err}");
    assert!(!big.join("prefix.safetensors").exists() && !big.join("checkpoint.safetensors").exists());

    // One that stays finite but saturates every softmax: the gradient vanishes, and the user is told.
    let mut c = Command::new(env!("CARGO_BIN_EXE_pfxrun"));
    c.args(["train", bundle.to_str().unwrap(), "--train", data.to_str().unwrap(), "--lr", "1e30"]).args([
        "--max-steps",
        "3",
        "-o",
        tmp.join("saturated").to_str().unwrap(),
    ]);
    let st = c.output().unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success() && err.contains("warning: the gradient has vanished at step 2"), "{err}");
    assert_eq!(err.matches("the gradient has vanished").count(), 1, "warned once: {err}");
}

/// With a dev set, the prefix of the lowest dev loss is kept in best.safetensors, across a resumed run: evaluating
/// it gives that loss, and the log marks the epochs that lowered it.
#[test]
fn the_prefix_of_the_lowest_dev_loss_is_kept() {
    let (tmp, bundle, data) = setup("best", 8);
    let text = std::fs::read_to_string(root().join("examples/data/e2e_train.txt")).unwrap();
    let dev = tmp.join("dev.txt");
    std::fs::write(&dev, text.lines().skip(100).take(8).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    let out = tmp.join("run");
    let run = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pfxrun"));
        c.args(["train", bundle.to_str().unwrap(), "--train", data.to_str().unwrap(), "--dev", dev.to_str().unwrap()])
            .args(["--epochs", "4", "--lr", "0.3", "--seed", "7", "-o", out.to_str().unwrap()])
            .args(extra);
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err
    };
    let eval = |prefix: &Path| -> f64 {
        let o = Command::new(env!("CARGO_BIN_EXE_pfxrun"))
            .args(["eval", bundle.to_str().unwrap(), "--data", dev.to_str().unwrap(), "--prefix"])
            .arg(prefix)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().strip_prefix("loss ").unwrap().parse().unwrap()
    };
    // 2 steps an epoch: stop inside epoch 2 (best.safetensors is epoch 1's, prefix.safetensors step 3's), then
    // resume to the end.
    run(&["--max-steps", "3"]);
    let first = logged(&out.join("metrics.jsonl"), "dev_loss");
    assert_eq!(first.keys().copied().collect::<Vec<_>>(), [2], "one dev loss, after epoch 1 (step 2)");
    assert!((eval(&out.join("best.safetensors")) - first[&2]).abs() < 2e-6);
    assert!((eval(&out.join("prefix.safetensors")) - first[&2]).abs() > 1e-4, "step 3's prefix is another one");
    let log = run(&["--resume"]);
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let dev_lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("dev_loss").is_some())
        .collect();
    assert_eq!(dev_lines.len(), 4, "{text}");
    let mut lowest = f64::INFINITY;
    let mut best_epoch = 0;
    for v in &dev_lines {
        let l = v["dev_loss"].as_f64().unwrap();
        assert_eq!(v["best"].as_bool(), Some(l < lowest), "{v}");
        if l < lowest {
            (lowest, best_epoch) = (l, v["epoch"].as_u64().unwrap());
        }
    }
    assert!(log.contains(&format!("lowest dev loss {lowest:.4}, after epoch {best_epoch}")), "{log}");
    let loss = eval(&out.join("best.safetensors"));
    assert!((loss - lowest).abs() < 2e-6, "best.safetensors evaluates to {loss}, the lowest dev loss was {lowest}");
    // A new run into the same folder is refused (best.safetensors belongs to the earlier run).
    std::fs::remove_file(out.join("checkpoint.safetensors")).unwrap();
    std::fs::remove_file(out.join("prefix.safetensors")).unwrap();
    std::fs::remove_file(out.join("metrics.jsonl")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_pfxrun"))
        .args(["train", bundle.to_str().unwrap(), "--train", data.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds best.safetensors of an earlier run"));
    println!("dev losses {:?}", dev_lines.iter().map(|v| v["dev_loss"].as_f64().unwrap()).collect::<Vec<_>>());
}
