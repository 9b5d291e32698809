//! Generation graphs with a fixed-capacity KV cache (static shapes throughout).
//!
//! - `prefill`: the prompt (left-padded to Tp) with the prefix bound as past; returns the last position's
//!   logits and every layer's keys/values [R, H, P+Tp, D], prefix included.
//! - `decode`: one token against a cache of capacity C = P + Tp + max_new - 1; returns the logits and the new
//!   token's keys/values [R, H, 1, D] only. The runtime writes them into the cache in place: no
//!   concatenation, no O(n²) copying. The prefix lives in the cache, so decode needs no trainable input.
//!
//! Position ids are inputs of both graphs: the runtime numbers real tokens P, P+1, ... from the mask, so a
//! left-padded prompt generates what it generates alone.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};

use super::prefix::{self, Positions, PrefixShape};
use crate::ir::{Model, Node};
use crate::simplify::simplify;
use crate::specialize::{specialize, Dims};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenShape {
    /// Rows decoded together (batch × beams).
    pub rows: usize,
    /// Prompt length Tp (prompts are left-padded to it).
    pub prompt_len: usize,
    pub max_new: usize,
}

impl GenShape {
    pub fn capacity(&self, p: usize) -> usize {
        p + self.prompt_len + self.max_new.max(1) - 1
    }
}

fn load_with_past(source: &Path) -> Result<Model> {
    let model = crate::load_canonical(source)?;
    if !model.graph.inputs.iter().any(|v| v.name.starts_with("past_key_values")) {
        bail!(
            "{}: generation needs an export with past (KV-cache) inputs, e.g. optimum's \
             --task text-generation-with-past or torch.onnx.export with past_key_values",
            source.display()
        );
    }
    Ok(model)
}

/// Keeps only the last position of `name` along `axis` (an output keeps its name).
pub(super) fn keep_last(model: &mut Model, name: &str, axis: usize) -> Result<()> {
    let g = &mut model.graph;
    let s = g.shape_of(name).ok_or_else(|| anyhow::anyhow!("unknown shape of '{name}'"))?;
    let n = s[axis] as i64;
    let inner = g.fresh(&format!("{name}.all"));
    for node in &mut g.nodes {
        for o in &mut node.outputs {
            if o == name {
                *o = inner.clone();
            }
        }
    }
    g.rename_uses(name, &inner);
    let (st, en, ax) = (
        g.add_const(&format!("{name}.last_start"), Tensor::vec_i64(&[n - 1])),
        g.add_const(&format!("{name}.last_end"), Tensor::vec_i64(&[n])),
        g.add_const(&format!("{name}.last_axis"), Tensor::vec_i64(&[axis as i64])),
    );
    let node = g.fresh(&format!("{name}.last"));
    g.nodes.push(Node::new(node, "Slice", vec![inner, st, en, ax], vec![name.to_string()]));
    g.types.remove(name);
    Ok(())
}

/// The prefill graph. With `baked`, the trainable tensors are constants (the generator folds away).
pub fn build_prefill(
    source: &Path,
    shape: &PrefixShape,
    gs: &GenShape,
    baked: Option<&BTreeMap<String, Tensor>>,
) -> Result<Model> {
    let mut model = load_with_past(source)?;
    prefix::expose_positions(&mut model.graph, 0)?;
    let dims = Dims { batch: gs.rows, seq: gs.prompt_len, past: Some(shape.len), src_len: None };
    specialize(&mut model, &dims)?;
    let g = &mut model.graph;
    let kv = prefix::build_generator(g, shape, "", gs.rows)?;
    prefix::bind_past(g, &kv, shape.len, gs.rows, gs.prompt_len, Positions::Input)?;
    if let Some(values) = baked {
        let names: Vec<String> = shape.trainables("").into_iter().map(|t| t.0).collect();
        super::bake::inputs_to_constants(g, &names, values)?;
    }
    // Presents carry prefix + prompt keys/values: the runtime seeds its cache with them.
    g.outputs.retain(|o| o.name == "logits" || o.name.starts_with("present"));
    model.graph.types.clear();
    simplify(&mut model.graph)?;
    keep_last(&mut model, "logits", 1)?;
    simplify(&mut model.graph)?;
    super::lower::lower_for_inference(&mut model.graph)?;
    Ok(model)
}

/// The one-token decode graph over a cache of capacity C.
pub fn build_decode(source: &Path, p: usize, gs: &GenShape) -> Result<Model> {
    let mut model = load_with_past(source)?;
    prefix::expose_positions(&mut model.graph, 0)?;
    let c = gs.capacity(p);
    let dims = Dims { batch: gs.rows, seq: 1, past: Some(c), src_len: None };
    specialize(&mut model, &dims)?;
    let presents: Vec<String> =
        model.graph.outputs.iter().filter(|o| o.name.starts_with("present")).map(|o| o.name.clone()).collect();
    for name in &presents {
        keep_last(&mut model, name, 2)?;
    }
    simplify(&mut model.graph)?;
    super::lower::lower_for_inference(&mut model.graph)?;
    Ok(model)
}
