//! How a bundle stores its frozen weights: f32 as exported, or f16 (half the file, and half the bytes a
//! decode step streams on runtimes that read half-precision weights).
//!
//! In f16 every f32 constant of rank ≥ 2 (the weight matrices, and what the compiler folded out of them, such
//! as a slice of the position table) is rounded to the nearest f16, and the large ones are stored as f16
//! initializers followed by a `Cast` to f32. Every graph still computes in f32, on the rounded weights: the
//! training, evaluation and generation graphs of a bundle compute with the same model, the one PyTorch gets
//! from `p.half().float()` on each parameter of rank ≥ 2.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Result};
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};

use crate::ir::{Attr, Graph, Node};
use crate::tensor::{DType, Data, Tensor};

/// The element type of the frozen weights in a bundle's `weights.bin`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightStorage {
    #[default]
    F32,
    F16,
}

impl WeightStorage {
    pub fn name(self) -> &'static str {
        match self {
            WeightStorage::F32 => "f32",
            WeightStorage::F16 => "f16",
        }
    }
}

impl FromStr for WeightStorage {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" | "float32" => Ok(WeightStorage::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(WeightStorage::F16),
            other => bail!("--weights {other}: expected f32 or f16"),
        }
    }
}

/// Smallest rounded constant stored as f16 behind a Cast: below this its bytes do not pay for the extra node.
pub const MIN_F16_ELEMENTS: usize = 4096;

/// Largest finite f16.
const F16_MAX: f32 = 65504.0;

/// Applies `storage` to the graph's initializers; returns how many were stored in f16.
pub fn store_weights(g: &mut Graph, storage: WeightStorage) -> usize {
    store_weights_with(g, storage, &mut Rounded::default())
}

/// [`store_weights`] for the graphs of one bundle, which share their weights: each is rounded once.
pub fn store_weights_with(g: &mut Graph, storage: WeightStorage, rounded: &mut Rounded) -> usize {
    match storage {
        WeightStorage::F32 => 0,
        WeightStorage::F16 => store_weights_in_f16(g, rounded),
    }
}

/// The f16 forms already made, by the f32 data they came from (held, so that its address is not reused).
#[derive(Default)]
pub struct Rounded(HashMap<usize, (Arc<Data>, Option<Tensor>)>);

impl Rounded {
    /// The rounded form of `t` (None: it stays as it is), made once per data.
    fn of(&mut self, t: &Tensor) -> Option<Tensor> {
        let key = Arc::as_ptr(&t.data) as usize;
        if let Some((_, done)) = self.0.get(&key) {
            return done.clone();
        }
        let made = round(t);
        self.0.insert(key, (t.data.clone(), made.clone()));
        made
    }
}

/// An f32 tensor of rank ≥ 2, all finite in f16's range, rounded to f16: as f16 from [`MIN_F16_ELEMENTS`] values
/// on, else as f32 of the rounded values. None for anything else.
fn round(t: &Tensor) -> Option<Tensor> {
    let Data::F32(v) = &*t.data else { return None };
    if t.shape.len() < 2 || !v.iter().all(|x| x.is_finite() && x.abs() <= F16_MAX) {
        return None;
    }
    // In blocks (F16C where the CPU has it): value by value took seconds on GPT-2's 124 M weights.
    let mut halves = vec![half::f16::ZERO; v.len()];
    halves.convert_from_f32_slice(v);
    if v.len() < MIN_F16_ELEMENTS {
        let mut wide = vec![0f32; v.len()];
        halves.convert_to_f32_slice(&mut wide);
        return Some(Tensor::f32(t.shape.clone(), wide));
    }
    let bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
    Some(Tensor::new(t.shape.clone(), Data::Raw(DType::F16, bytes)))
}

/// Every f32 initializer of rank ≥ 2 whose values are all finite and inside f16's range is rounded to f16
/// (biases, LayerNorm parameters and scalars stay as they are; so do masks holding -3.4e38). Those with at
/// least [`MIN_F16_ELEMENTS`] values become `<name>.f16` (f16) and a `Cast` back to `<name>`, so the graph's
/// nodes read them unchanged; the others keep their f32 type with the rounded values. Returns how many were
/// stored in f16.
fn store_weights_in_f16(g: &mut Graph, rounded: &mut Rounded) -> usize {
    let candidates: Vec<String> = g
        .initializers
        .iter()
        .filter(|(name, t)| t.dtype() == DType::F32 && !g.is_input(name))
        .map(|(n, _)| n.clone())
        .collect();
    let (mut casts, mut halves_of) = (Vec::new(), Vec::new());
    for name in &candidates {
        let Some(r) = rounded.of(&g.initializers[name]) else { continue };
        if r.dtype() == DType::F32 {
            g.initializers.insert(name.clone(), r);
            continue;
        }
        g.initializers.remove(name);
        let stored = g.fresh(&format!("{name}.f16"));
        g.initializers.insert(stored.clone(), r);
        let node_name = g.fresh(&format!("{name}.to_f32"));
        casts.push(to_f32(node_name, stored.clone(), name.clone()));
        halves_of.push((name.clone(), stored));
    }
    let stored = casts.len();
    // Casts read initializers only, so they may run first.
    g.nodes.splice(0..0, casts);
    look_up_in_f16(g, &halves_of);
    stored
}

fn to_f32(name: String, input: String, output: String) -> Node {
    Node::new(name, "Cast", vec![input], vec![output]).with_attr("to", Attr::Int(DType::F32.onnx_code() as i64))
}

/// A lookup in a stored table (the token and position embeddings) reads the f16 table and widens the rows it
/// took: the same values, and a runtime then holds the table for lookups in f16 rather than widened (GPT-2's
/// token table: 77 MB instead of 154 per graph). A table read by nothing else loses its f32 form altogether.
fn look_up_in_f16(g: &mut Graph, halves_of: &[(String, String)]) {
    let mut i = 0;
    while i < g.nodes.len() {
        let node = &g.nodes[i];
        let stored = halves_of.iter().find(|(wide, _)| node.op == "Gather" && node.inputs.first() == Some(wide));
        if let Some((_, half)) = stored {
            let rows = node.outputs[0].clone();
            let half_rows = g.fresh(&format!("{rows}.f16"));
            let cast = to_f32(g.fresh(&format!("{rows}.to_f32")), half_rows.clone(), rows);
            g.nodes[i].inputs[0] = half.clone();
            g.nodes[i].outputs[0] = half_rows;
            g.nodes.insert(i + 1, cast);
            i += 1;
        }
        i += 1;
    }
    // Widenings nothing reads any more go.
    for (wide, _) in halves_of {
        let read = g.nodes.iter().any(|n| n.inputs.contains(wide)) || g.is_output(wide);
        if !read {
            g.nodes.retain(|n| !(n.op == "Cast" && n.outputs[0] == *wide));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{ValueInfo, ValueType};

    fn graph() -> Graph {
        let mut g = Graph::default();
        let w: Vec<f32> = (0..64 * 64).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        g.initializers.insert("w".into(), Tensor::f32(vec![64, 64], w));
        g.initializers.insert("bias".into(), Tensor::f32(vec![64], vec![0.1; 64]));
        g.initializers.insert("small".into(), Tensor::f32(vec![2, 2], vec![0.1, 1.0, -3.0, 1e-9]));
        let mut mask = vec![0f32; 64 * 64];
        mask[5] = f32::MIN;
        g.initializers.insert("mask".into(), Tensor::f32(vec![64, 64], mask));
        g.inputs.push(ValueInfo { name: "x".into(), ty: ValueType::known(DType::F32, &[1, 64]) });
        g.nodes.push(Node::new("mm", "MatMul", vec!["x".into(), "w".into()], vec!["y".into()]));
        g.outputs.push(ValueInfo { name: "y".into(), ty: ValueType::known(DType::F32, &[1, 64]) });
        g
    }

    #[test]
    fn large_weights_become_f16_behind_a_cast() {
        let mut g = graph();
        let original = g.initializers["w"].as_f64s().unwrap();
        assert_eq!(store_weights(&mut g, WeightStorage::F16), 1, "only w is a large finite matrix");
        assert!(!g.initializers.contains_key("w"));
        assert_eq!(g.initializers["bias"], Tensor::f32(vec![64], vec![0.1; 64]), "vectors stay as they are");
        let small = &g.initializers["small"];
        let want = [half::f16::from_f32(0.1).to_f32(), 1.0, -3.0, 0.0];
        assert_eq!(*small, Tensor::f32(vec![2, 2], want.to_vec()), "small matrices: f32, values rounded to f16");
        assert_ne!(want[0], 0.1);
        assert_eq!(g.initializers["mask"].dtype(), DType::F32, "values outside f16's range stay f32");
        let cast = &g.nodes[0];
        assert_eq!((cast.op.as_str(), cast.outputs[0].as_str()), ("Cast", "w"));
        assert_eq!(cast.int("to"), Some(1));
        let stored = &g.initializers[&cast.inputs[0]];
        assert_eq!((stored.dtype(), stored.shape.clone()), (DType::F16, vec![64, 64]));
        // Each stored value is the nearest f16: within half an f16 step (2^-11 relative) of the original.
        let bytes = stored.to_le_bytes();
        for (i, c) in bytes.chunks_exact(2).enumerate() {
            let v = half::f16::from_le_bytes([c[0], c[1]]).to_f32() as f64;
            assert!(
                (v - original[i]).abs() <= original[i].abs() * 2f64.powi(-11) + 1e-7,
                "{i}: {v} vs {}",
                original[i]
            );
        }
        assert_eq!(g.nodes[1].inputs[1], "w", "the product still reads w");
    }

    /// A Gather from a stored table reads the f16 table and widens its rows; the f32 form stays only for the
    /// table's other readers.
    #[test]
    fn lookups_read_the_f16_table() {
        let mut g = graph();
        g.inputs.push(ValueInfo { name: "ids".into(), ty: ValueType::known(DType::I64, &[1, 3]) });
        g.nodes.push(Node::new("lookup", "Gather", vec!["w".into(), "ids".into()], vec!["rows".into()]));
        g.nodes.push(Node::new("use", "Relu", vec!["rows".into()], vec!["out".into()]));
        g.outputs.push(ValueInfo { name: "out".into(), ty: ValueType::known(DType::F32, &[1, 3, 64]) });
        store_weights(&mut g, WeightStorage::F16);
        let half = g.initializers.iter().find(|(_, t)| t.dtype() == DType::F16).map(|(n, _)| n.clone()).unwrap();
        let lookup = g.nodes.iter().position(|n| n.op == "Gather").unwrap();
        assert_eq!(g.nodes[lookup].inputs[0], half, "the lookup reads the f16 table");
        let widen = &g.nodes[lookup + 1];
        assert_eq!((widen.op.as_str(), widen.inputs[0].as_str()), ("Cast", g.nodes[lookup].outputs[0].as_str()));
        assert_eq!(widen.outputs[0], "rows", "its readers read the widened rows");
        assert!(g.nodes.iter().any(|n| n.op == "Cast" && n.outputs[0] == "w"), "the product still reads w");
        // Without the product, nothing reads the widened table.
        let mut g = graph();
        g.nodes.clear();
        g.outputs.clear();
        g.nodes.push(Node::new("lookup", "Gather", vec!["w".into(), "ids".into()], vec!["rows".into()]));
        g.outputs.push(ValueInfo { name: "rows".into(), ty: ValueType::known(DType::F32, &[1, 3, 64]) });
        store_weights(&mut g, WeightStorage::F16);
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op.as_str()).collect();
        assert_eq!(ops, ["Gather", "Cast"], "the lookup and the widening of its rows, no widened table");
    }

    #[test]
    fn f32_storage_changes_nothing() {
        let mut g = graph();
        assert_eq!(store_weights(&mut g, WeightStorage::F32), 0);
        assert_eq!(g.initializers["w"].dtype(), DType::F32);
        assert_eq!(g.nodes.len(), 1);
    }

    #[test]
    fn storage_names_parse() {
        assert_eq!("f16".parse::<WeightStorage>().unwrap(), WeightStorage::F16);
        assert_eq!("f32".parse::<WeightStorage>().unwrap(), WeightStorage::F32);
        assert!("int8".parse::<WeightStorage>().unwrap_err().to_string().contains("expected f32 or f16"));
    }
}
