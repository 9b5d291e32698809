//! Reverse-mode differentiation of a specialized graph.
//!
//! Only the nodes on a path from the trainable inputs to the loss are differentiated (frozen branches cost
//! nothing). Each op type has one rule in `rules.rs`, written against concrete shapes: specialization ran
//! first, so no rule needs a dynamic-shape twin.

mod rules;

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, Result};

use crate::ir::{Attr, Graph, Node};
use crate::tensor::{DType, Tensor};

pub use rules::has_rule;

/// What a rule sees: the forward node, the gradients of its outputs, which inputs want a gradient.
pub struct RuleCtx<'a> {
    pub g: &'a mut Graph,
    pub node: Node,
    /// Gradient of each output (None when no gradient flows into it).
    pub dy: Vec<Option<String>>,
    /// Whether input i needs a gradient.
    pub need: Vec<bool>,
    hint: String,
}

impl RuleCtx<'_> {
    pub fn x(&self, i: usize) -> String {
        self.node.inputs[i].clone()
    }
    pub fn y(&self, i: usize) -> String {
        self.node.outputs[i].clone()
    }
    /// Gradient of output i, or zeros of its shape when none flows (multi-output ops).
    pub fn dy(&mut self, i: usize) -> Result<String> {
        match &self.dy[i] {
            Some(d) => Ok(d.clone()),
            None => {
                let y = self.y(i);
                let s = self.shape(&y)?;
                Ok(self.zeros(&s))
            }
        }
    }
    pub fn shape(&self, v: &str) -> Result<Vec<usize>> {
        match self.g.shape_of(v) {
            Some(s) => Ok(s),
            None => bail!("{}: the shape of '{v}' is not known (specialize first)", self.node.label()),
        }
    }
    pub fn dtype(&self, v: &str) -> DType {
        self.g.type_of(v).map(|t| t.dtype).unwrap_or(DType::F32)
    }
    /// Adds a node; returns its (first) output.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let hint = format!("grad/{}/{}", self.hint, op);
        self.g.op1(op, inputs, attrs, &hint)
    }
    /// The float type gradients of this node are computed in: that of its first output.
    pub fn float_dtype(&self) -> DType {
        let dt = self.dtype(&self.y(0));
        if dt.is_float() {
            dt
        } else {
            DType::F32
        }
    }
    /// A scalar constant of the node's float type.
    pub fn const_f(&mut self, x: f64) -> String {
        let name = format!("grad/{}/c", self.hint);
        self.g.add_const(&name, float_tensor(self.float_dtype(), &[], x))
    }
    pub fn const_i(&mut self, v: &[i64]) -> String {
        let name = format!("grad/{}/i", self.hint);
        self.g.add_const(&name, Tensor::vec_i64(v))
    }
    /// Zeros of the node's float type.
    pub fn zeros(&mut self, shape: &[usize]) -> String {
        let name = format!("grad/{}/zeros", self.hint);
        self.g.add_const(&name, float_tensor(self.float_dtype(), shape, 0.0))
    }
}

/// A tensor of `shape` filled with `x`, of float type `dt` (f32 for types the folder does not compute on).
fn float_tensor(dt: DType, shape: &[usize], x: f64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_f64s(dt, shape.to_vec(), vec![x; n]).unwrap_or_else(|_| Tensor::f32(shape.to_vec(), vec![x as f32; n]))
}

/// The element type of `v` when it is a float type, else f32.
fn float_type_of(g: &Graph, v: &str) -> DType {
    g.type_of(v).map(|t| t.dtype).filter(|d| d.is_float()).unwrap_or(DType::F32)
}

pub type Rule = fn(&mut RuleCtx) -> Result<Vec<Option<String>>>;

/// Adds the gradient of the scalar `loss` with respect to each of `wrt` (graph inputs or values) and returns
/// wrt-name -> gradient value. Shapes must be concrete (run specialization / type inference first).
pub fn build_gradients(g: &mut Graph, loss: &str, wrt: &[String]) -> Result<BTreeMap<String, String>> {
    let one = float_tensor(float_type_of(g, loss), &g.shape_of(loss).unwrap_or_default(), 1.0);
    let seed = g.add_const("grad/seed", one);
    build_gradients_from(g, loss, &seed, wrt)
}

/// The same, starting from a value `root` whose gradient `droot` is already in the graph (a loss's gradient
/// written in closed form): only the nodes between the trainable tensors and `root` are differentiated.
pub fn build_gradients_from(
    g: &mut Graph,
    root: &str,
    droot: &str,
    wrt: &[String],
) -> Result<BTreeMap<String, String>> {
    let loss = root;
    g.toposort()?;
    // Values that depend on a trainable tensor.
    let mut tainted: HashSet<String> = wrt.iter().cloned().collect();
    for n in &g.nodes {
        if n.inputs.iter().any(|i| tainted.contains(i)) {
            for o in &n.outputs {
                if !o.is_empty() && g.type_of(o).map(|t| t.dtype.is_float()).unwrap_or(true) {
                    tainted.insert(o.clone());
                }
            }
        }
    }
    if !tainted.contains(loss) {
        bail!("the loss '{loss}' does not depend on any trainable tensor ({})", wrt.join(", "));
    }
    // Nodes on a path from a trainable tensor to the loss.
    let mut reaches: HashSet<String> = [loss.to_string()].into();
    let mut on_path = vec![false; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate().rev() {
        if n.outputs.iter().any(|o| reaches.contains(o)) && n.inputs.iter().any(|x| tainted.contains(x)) {
            on_path[i] = true;
            for x in &n.inputs {
                if tainted.contains(x) {
                    reaches.insert(x.clone());
                }
            }
        }
    }
    let path: Vec<Node> = g.nodes.iter().zip(&on_path).filter(|(_, &p)| p).map(|(n, _)| n.clone()).collect();
    let missing: Vec<String> =
        path.iter().filter(|n| !has_rule(&n.op)).map(|n| format!("{} ('{}')", n.op, n.name)).collect();
    if !missing.is_empty() {
        let mut ops: Vec<&str> = path.iter().filter(|n| !has_rule(&n.op)).map(|n| n.op.as_str()).collect();
        ops.sort();
        ops.dedup();
        bail!(
            "no gradient rule for op type(s) {} on the path from the trainable tensors to the loss: nodes {}",
            ops.join(", "),
            missing.join(", ")
        );
    }

    let mut contrib: HashMap<String, Vec<String>> = HashMap::new();
    contrib.insert(loss.to_string(), vec![droot.to_string()]);
    for node in path.into_iter().rev() {
        let dy: Vec<Option<String>> = node.outputs.iter().map(|o| accumulate(g, &mut contrib, o)).collect();
        if dy.iter().all(|d| d.is_none()) {
            continue;
        }
        let need: Vec<bool> = node.inputs.iter().map(|x| !x.is_empty() && reaches.contains(x)).collect();
        let hint = node.name.clone();
        let rule = rules::rule(&node.op).expect("checked above");
        let mut ctx = RuleCtx { g, node: node.clone(), dy, need: need.clone(), hint };
        let dx = rule(&mut ctx).map_err(|e| e.context(format!("differentiating {}", node.label())))?;
        for (i, d) in dx.into_iter().enumerate() {
            if let (Some(d), true) = (d, need.get(i).copied().unwrap_or(false)) {
                contrib.entry(node.inputs[i].clone()).or_default().push(d);
            }
        }
    }
    let mut out = BTreeMap::new();
    for w in wrt {
        let grad = match accumulate(g, &mut contrib, w) {
            Some(d) => d,
            None => {
                let zeros = float_tensor(float_type_of(g, w), &g.shape_of(w).unwrap_or_default(), 0.0);
                g.add_const(&format!("grad/{w}/zeros"), zeros)
            }
        };
        out.insert(w.clone(), grad);
    }
    Ok(out)
}

/// Sums the gradient contributions to `v` into one value (None when nothing flowed).
fn accumulate(g: &mut Graph, contrib: &mut HashMap<String, Vec<String>>, v: &str) -> Option<String> {
    let parts = contrib.remove(v)?;
    let mut acc = parts[0].clone();
    for p in &parts[1..] {
        acc = g.op1("Add", &[&acc, p], vec![], &format!("grad/{v}/sum"));
    }
    contrib.insert(v.to_string(), vec![acc.clone()]);
    Some(acc)
}
