//! The repetition penalties and the sampling warpers equal Hugging Face's logits processors on crafted rows of
//! scores (ties at the top-k and top-p boundaries, -inf entries, peaked and flat rows): references by
//! `graphs/sampling-ref/make_warper_references.py`.

mod common;

use pfx_runtime::processors::{make_finite, warp, Penalties, Sampling};
use pfx_runtime::HostTensor;

fn rows(t: &HostTensor) -> Vec<Vec<f32>> {
    let v = t.as_f32().unwrap();
    v.chunks(t.shape()[1]).map(|r| r.to_vec()).collect()
}

fn ids(t: &HostTensor) -> Vec<Vec<i64>> {
    let v = t.as_i64().unwrap();
    v.chunks(t.shape()[1]).map(|r| r.to_vec()).collect()
}

/// The same tokens filtered (-inf), and the kept scores within `tol` of HF's.
fn assert_same(got: &[f32], want: &[f32], tol: f32, what: &str) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == f32::NEG_INFINITY || g == f32::NEG_INFINITY {
            assert_eq!(g, w, "{what}: token {i} filtered in one only");
        } else {
            assert!((g - w).abs() <= tol * w.abs().max(1.0), "{what}: token {i}: {g} vs HF's {w}");
        }
    }
}

#[test]
fn warpers_and_penalties_equal_hf() {
    let r = pfx_runtime::read_safetensors(common::graphs_dir().join("sampling-ref/warpers.safetensors")).unwrap();
    let logits = rows(&r["logits"]);
    let history = ids(&r["history"]);
    // Every warper off (HF's defaults but top-k 50): each case turns on what it tests.
    let off = Sampling { top_k: 0, ..Sampling::default() };
    let source = ids(&r["source"]);
    // (key, warpers, the fewest tokens each keeps: 1 when sampling, 1 + the end-of-sequence ids in beam sampling)
    let chain = Sampling { temperature: 0.7, top_k: 20, top_p: 0.9, min_p: Some(0.05), ..off.clone() };
    let warpers = [
        ("temp07", Sampling { temperature: 0.7, ..off.clone() }, 1),
        ("topk5", Sampling { top_k: 5, ..off.clone() }, 1),
        ("topp09", Sampling { top_p: 0.9, ..off.clone() }, 1),
        ("minp01", Sampling { min_p: Some(0.1), ..off.clone() }, 1),
        ("typical09", Sampling { typical_p: 0.9, ..off.clone() }, 1),
        ("eps002", Sampling { epsilon: 0.02, ..off.clone() }, 1),
        ("eta002", Sampling { eta: 0.02, ..off.clone() }, 1),
        ("chain", chain.clone(), 1),
        ("topk1_keep2", Sampling { top_k: 1, ..off.clone() }, 2),
        ("topp03_keep2", Sampling { top_p: 0.3, ..off.clone() }, 2),
        ("minp09_keep2", Sampling { min_p: Some(0.9), ..off.clone() }, 2),
        ("typical02_keep2", Sampling { typical_p: 0.2, ..off.clone() }, 2),
        ("eps02_keep2", Sampling { epsilon: 0.2, ..off.clone() }, 2),
        ("eta09_keep2", Sampling { eta: 0.9, ..off.clone() }, 2),
        ("chain_keep3", chain, 3),
        ("toph055", Sampling { top_h: Some(0.55), ..off.clone() }, 1),
    ];
    // Rows where top-p cuts inside a group of equal scores: which of them HF removes follows torch.sort's unstable
    // order (pfx removes the lower ids first), so only the kept scores, sorted, are defined (the README says which).
    let tie_cut = [
        ("topp09", 5),
        ("topp09", 6),
        ("chain", 5),
        ("topp03_keep2", 2),
        ("topp03_keep2", 5),
        ("chain_keep3", 5),
        ("toph055", 5),
    ];
    for (key, s, keep) in warpers {
        let want = rows(&r[key]);
        for (i, row) in logits.iter().enumerate() {
            let mut got = row.clone();
            warp(&mut got, &s, keep);
            let what = format!("{key} row {i}");
            if tie_cut.contains(&(key, i)) {
                let sorted = |v: &[f32]| {
                    let mut v = v.to_vec();
                    v.sort_by(f32::total_cmp);
                    v
                };
                assert_eq!(sorted(&got), sorted(&want[i]), "{what}: the kept scores");
                continue;
            }
            // The scores themselves are HF's arithmetic (a division at most): equal to the last bit.
            assert_same(&got, &want[i], 0.0, &what);
        }
    }
    for (i, row) in logits.iter().enumerate() {
        let v = row.len();
        let mut got = row.clone();
        Penalties::new(&[], 1.0, &[], 1.3, &history[i], v).unwrap().apply(&mut got);
        assert_same(&got, &rows(&r["reppen13"])[i], 0.0, &format!("reppen13 row {i}"));
        // Beam search feeds the penalty log-probabilities (float64 here: within rounding of torch's).
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        let mut got: Vec<f32> = row.iter().map(|&x| (x as f64 - max - lse) as f32).collect();
        Penalties::new(&[], 1.0, &[], 1.3, &history[i], v).unwrap().apply(&mut got);
        assert_same(&got, &rows(&r["reppen13_logsoftmax"])[i], 1e-6, &format!("reppen13_logsoftmax row {i}"));
        let mut got = row.clone();
        Penalties::new(&[], 0.5, &source[i], 1.0, &history[i], v).unwrap().apply(&mut got);
        assert_same(&got, &rows(&r["encreppen05"])[i], 0.0, &format!("encreppen05 row {i}"));
        // The length decay 2 tokens past its start (1.5² - 1), on eos ids 2 and 47.
        let mut got = row.clone();
        Penalties::with_eos_decay(None, &[2, 47], 1.5f64.powi(2) - 1.0, v).unwrap().apply(&mut got);
        assert_same(&got, &rows(&r["decay15"])[i], 0.0, &format!("decay15 row {i}"));
        let mut got = rows(&r["logits_invalid"])[i].clone();
        make_finite(&mut got);
        assert_eq!(got, rows(&r["infnan"])[i], "infnan row {i}");
    }
}
