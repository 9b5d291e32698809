//! Clean-up after graph construction: constant folding, no-op forwarding, common-subexpression elimination
//! and dead-code removal, repeated until nothing changes.

use std::collections::HashMap;

use anyhow::Result;

use crate::ir::Graph;
use crate::specialize::{fold_and_infer, forward_noops};
use crate::tensor::DType;

pub fn simplify(g: &mut Graph) -> Result<()> {
    for _ in 0..10 {
        let folded = fold_and_infer(g)?;
        let forwarded = forward_noops(g)?;
        let merged = cse(g)?;
        let dead = g.dce();
        if folded + forwarded + merged == 0 && !dead {
            break;
        }
    }
    fold_and_infer(g)?;
    Ok(())
}

/// Merges nodes computing the same op on the same inputs with the same attributes, and identical small
/// constants. Returns how many nodes went.
pub fn cse(g: &mut Graph) -> Result<usize> {
    g.toposort()?;
    // Identical small constants first, so that nodes reading them become equal too.
    let mut by_value: HashMap<(DType, Vec<usize>, Vec<u8>), String> = HashMap::new();
    let mut rename: Vec<(String, String)> = Vec::new();
    for (name, t) in &g.initializers {
        if t.len() > 4096 || g.is_output(name) {
            continue;
        }
        let key = (t.dtype(), t.shape.clone(), t.to_le_bytes());
        match by_value.get(&key) {
            Some(first) => rename.push((name.clone(), first.clone())),
            None => {
                by_value.insert(key, name.clone());
            }
        }
    }
    for (old, new) in &rename {
        g.rename_uses(old, new);
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut merged = 0;
    let mut i = 0;
    while i < g.nodes.len() {
        let n = &g.nodes[i];
        if n.outputs.len() != 1 || n.outputs[0].is_empty() || g.is_output(&n.outputs[0]) {
            i += 1;
            continue;
        }
        let key = format!("{}|{}|{:?}|{:?}", n.domain, n.op, n.inputs, n.attrs);
        match seen.get(&key) {
            Some(&j) => {
                let keep = g.nodes[j].outputs[0].clone();
                let gone = g.nodes.remove(i).outputs[0].clone();
                g.rename_uses(&gone, &keep);
                merged += 1;
            }
            None => {
                seen.insert(key, i);
                i += 1;
            }
        }
    }
    Ok(merged)
}
