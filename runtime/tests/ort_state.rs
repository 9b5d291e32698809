//! The training step with its state kept in ONNX Runtime between steps (IoBinding, ping-pong buffers) against
//! the host path (state copied in and out of every run), on ORT CPU; and checkpoint/resume on the device path.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::ort_wanted;
use common::state::*;
use pfx_runtime::backend::{state_pairs, HostStateStep, StatefulStep};
use pfx_runtime::bundle::Bundle;
use pfx_runtime::train::{TrainConfig, Trainer};
use pfx_runtime::{BackendKind, HostTensor, OrtBackend, OrtOptions};

#[test]
fn device_state_matches_the_host_path() {
    if !ort_wanted() {
        return;
    }
    let dir = fresh_dir("match");
    let b = bundle(&dir.join("bundle"));
    let pairs = state_pairs(&b.manifest.io["train_step"]).unwrap();
    assert_eq!(pairs.len(), 3 * b.manifest.trainable.len(), "one pair per parameter and per Adam moment");
    let options = OrtOptions::default();
    let mut device = b.open_train_step(BackendKind::Ort, &options).unwrap();
    assert!(device.name().contains("state on the device"), "{}", device.name());
    let graph = OrtBackend::open(b.graph_path("train_step").unwrap(), &options).unwrap();
    let mut host = HostStateStep::new(Box::new(graph), pairs).unwrap();

    let init = initial_state(&b);
    device.set_state(&init).unwrap();
    host.set_state(&init).unwrap();
    assert_states_close("after set_state", &device.state().unwrap(), &init, 0.0);

    let data = rows(4 * BATCH, b.manifest.vocab);
    for (k, chunk) in data.chunks(BATCH).enumerate() {
        let inputs = step_inputs(chunk, 2e-2 * (k + 1) as f32, k as i64 + 1);
        let d = device.step(&inputs).unwrap();
        let h = host.step(&inputs).unwrap();
        assert_eq!(d.keys().collect::<Vec<_>>(), vec!["grad_norm", "loss"], "only loss and metrics come back");
        assert_eq!(d.keys().collect::<Vec<_>>(), h.keys().collect::<Vec<_>>());
        for name in ["loss", "grad_norm"] {
            let (x, y) = (d[name].to_f64_vec()[0], h[name].to_f64_vec()[0]);
            assert!(x.is_finite() && rel(x, y) <= 1e-6, "step {}: {name} {x} on the device path vs {y}", k + 1);
        }
    }
    let final_state = device.state().unwrap();
    assert_states_close("after 4 steps", &final_state, &host.state().unwrap(), 1e-6);
    // The steps moved the prefix and filled the moments (the comparison above is not of two unchanged states).
    for (name, t) in &init {
        assert!(
            final_state[name].norm_rel_error(t).unwrap() > 1e-3 || name.starts_with("adam."),
            "{name} did not move"
        );
    }
    let m = final_state.iter().find(|(n, _)| n.starts_with("adam.m.")).unwrap().1;
    assert!(m.to_f64_vec().iter().any(|&x| x != 0.0), "Adam moments stayed zero");
}

#[test]
fn device_state_errors_are_clear() {
    if !ort_wanted() {
        return;
    }
    let dir = fresh_dir("errors");
    let b = bundle(&dir.join("bundle"));
    let mut step = b.open_train_step(BackendKind::Ort, &OrtOptions::default()).unwrap();
    let data = rows(BATCH, b.manifest.vocab);
    let e = format!("{:#}", step.step(&step_inputs(&data, 1e-2, 1)).unwrap_err());
    assert!(e.contains("state was never set"), "{e}");
    let e = format!("{:#}", step.state().unwrap_err());
    assert!(e.contains("state was never set"), "{e}");

    let mut state = initial_state(&b);
    let name = format!("adam.v.{}", b.manifest.trainable[0].name);
    state.remove(&name);
    let e = format!("{:#}", step.set_state(&state).unwrap_err());
    assert!(e.contains(&format!("lacks `{name}`")), "{e}");
    state.insert(name.clone(), HostTensor::from_f32(vec![1], vec![0.0]).unwrap());
    let e = format!("{:#}", step.set_state(&state).unwrap_err());
    assert!(e.contains(&format!("input `{name}` must have shape")), "{e}");

    step.set_state(&initial_state(&b)).unwrap();
    let mut inputs = step_inputs(&data, 1e-2, 1);
    inputs.remove("labels");
    let e = format!("{:#}", step.step(&inputs).unwrap_err());
    assert!(e.contains("missing model input `labels`"), "{e}");
    // A failed step leaves the state where it was.
    assert_states_close("after a failed step", &step.state().unwrap(), &initial_state(&b), 0.0);
    step.step(&step_inputs(&data, 1e-2, 1)).unwrap();
}

fn config(out: &Path, max_steps: Option<usize>) -> TrainConfig {
    TrainConfig {
        epochs: 2,
        lr: 3e-2,
        warmup_steps: 1,
        seed: 11,
        checkpoint_every: 0,
        out_dir: out.to_path_buf(),
        max_steps,
        progress: false,
        shuffle: true,
    }
}

fn trainer(b: &Bundle, dir: &Path) -> Trainer {
    let b = Bundle::open(&b.dir).unwrap();
    let prefix = b.init_prefix().unwrap();
    let _ = dir;
    Trainer::new(b, BackendKind::Ort, &OrtOptions::default(), prefix, true, Arc::new(AtomicBool::new(false))).unwrap()
}

/// Checkpoints copy the device state back; resuming copies it in again and continues exactly.
#[test]
fn checkpoint_and_resume_on_the_device_path() {
    if !ort_wanted() {
        return;
    }
    let dir = fresh_dir("resume");
    let b = bundle(&dir.join("bundle"));
    let data = rows(4 * BATCH, b.manifest.vocab);
    let dev = rows(BATCH + 1, b.manifest.vocab);

    let whole = dir.join("whole");
    let mut t = trainer(&b, &dir);
    let want = t.train(&config(&whole, None), &data, Some(&dev)).unwrap();
    assert_eq!(want.len(), 8);
    let want_prefix = t.prefix().unwrap();

    // The same run on tract (host state): the device path trains the same prefix.
    let tract_out = dir.join("tract");
    let mut tt = Trainer::new(
        Bundle::open(&b.dir).unwrap(),
        BackendKind::Tract,
        &OrtOptions::default(),
        b.init_prefix().unwrap(),
        true,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    let tract_losses = tt.train(&config(&tract_out, None), &data, Some(&dev)).unwrap();
    for (k, (a, b)) in want.iter().zip(&tract_losses).enumerate() {
        assert!(rel(*a, *b) <= 1e-5, "step {}: ORT device path {a} vs tract {b}", k + 1);
    }
    assert_states_close("ORT vs tract prefix", &want_prefix, &tt.prefix().unwrap(), 1e-4);

    let cut = dir.join("cut");
    let mut first = trainer(&b, &dir);
    let before = first.train(&config(&cut, Some(3)), &data, Some(&dev)).unwrap();
    assert_eq!(before.len(), 3);
    let saved = pfx_runtime::read_safetensors(cut.join("checkpoint.safetensors")).unwrap();
    assert_eq!(saved.len(), 3 * b.manifest.trainable.len(), "the checkpoint holds the whole state");
    drop(first);
    let mut second = trainer(&b, &dir);
    second.resume(&cut).unwrap();
    assert_eq!(second.pos.step, 3);
    let after = second.train(&config(&cut, None), &data, Some(&dev)).unwrap();
    let got: Vec<f64> = before.iter().chain(&after).copied().collect();
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(rel(*g, *w) <= 1e-6, "step {}: {g} after resuming vs {w} uninterrupted", k + 1);
    }
    assert_states_close("final prefix after resuming", &second.prefix().unwrap(), &want_prefix, 1e-6);
    let on_disk = pfx_runtime::read_safetensors(cut.join("prefix.safetensors")).unwrap();
    assert_states_close("prefix.safetensors", &on_disk, &want_prefix, 1e-6);
}

/// The `.gpu` variant of the step (the loss read off a LogSoftmax, for ONNX Runtime on GPUs) against the step:
/// the same losses, grad norms and state, here on ORT CPU (CI has no GPU; `gpu_ort.rs` runs the variant there).
#[test]
fn the_gpu_variant_of_the_step_matches_the_step() {
    if !ort_wanted() {
        return;
    }
    let dir = fresh_dir("gpu-variant");
    let b = bundle(&dir.join("bundle"));
    let pairs = state_pairs(&b.manifest.io["train_step"]).unwrap();
    let options = OrtOptions::default();
    let cpu = b.graph_path_on("train_step", BackendKind::Ort, &options).unwrap();
    assert_eq!(cpu, b.graph_path("train_step").unwrap(), "ORT on the CPU runs the step itself");
    let cuda = OrtOptions { device: pfx_runtime::OrtDevice::Cuda(0), ..Default::default() };
    let variant = b.graph_path_on("train_step", BackendKind::Ort, &cuda).unwrap();
    assert!(variant.ends_with("train_step.gpu.onnx"), "{}", variant.display());
    let open = |p: &Path| HostStateStep::new(Box::new(OrtBackend::open(p, &options).unwrap()), pairs.clone()).unwrap();
    let (mut plain, mut gpu) = (open(&cpu), open(&variant));
    let init = initial_state(&b);
    plain.set_state(&init).unwrap();
    gpu.set_state(&init).unwrap();
    let data = rows(3 * BATCH, b.manifest.vocab);
    for (k, chunk) in data.chunks(BATCH).enumerate() {
        let inputs = step_inputs(chunk, 2e-2, k as i64 + 1);
        let (p, g) = (plain.step(&inputs).unwrap(), gpu.step(&inputs).unwrap());
        for name in ["loss", "grad_norm"] {
            let (x, y) = (g[name].to_f64_vec()[0], p[name].to_f64_vec()[0]);
            assert!(x.is_finite() && rel(x, y) <= 1e-5, "step {}: {name} {x} (variant) vs {y}", k + 1);
        }
    }
    assert_states_close("after 3 steps", &gpu.state().unwrap(), &plain.state().unwrap(), 1e-5);
}
