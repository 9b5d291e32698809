//! The in-memory graph every pass edits.
//!
//! Values are named (as in ONNX) and the graph keeps its nodes in topological order. Passes edit the node
//! list and the initializer map directly and call the small helpers here for the bookkeeping (fresh names,
//! use/def maps, renaming, dead-code removal), so that no pass has to juggle strings by hand.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, Result};

use crate::tensor::{DType, Tensor};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(usize),
    Sym(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => write!(f, "{s}"),
        }
    }
}

/// Element type and (possibly partial or unknown) shape of a value.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueType {
    pub dtype: DType,
    /// None when not even the rank is known.
    pub shape: Option<Vec<Dim>>,
}

impl ValueType {
    pub fn known(dtype: DType, shape: &[usize]) -> ValueType {
        ValueType { dtype, shape: Some(shape.iter().map(|&d| Dim::Known(d)).collect()) }
    }
    /// The concrete shape when every dimension is known.
    pub fn concrete(&self) -> Option<Vec<usize>> {
        self.shape.as_ref()?.iter().map(|d| if let Dim::Known(n) = d { Some(*n) } else { None }).collect()
    }
    pub fn describe(&self) -> String {
        match &self.shape {
            None => format!("{}[?]", self.dtype.short()),
            Some(dims) => {
                format!("{}[{}]", self.dtype.short(), dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub ty: ValueType,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Floats(Vec<f32>),
    Str(String),
    Strs(Vec<String>),
    Tensor(Tensor),
    Graph(Box<Graph>),
    /// Inside a local function body: the value of the caller's attribute of this name.
    Ref(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: String,
    /// "" for the default ONNX domain.
    pub domain: String,
    /// "" marks an omitted optional input.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: BTreeMap<String, Attr>,
}

impl Node {
    pub fn new(name: impl Into<String>, op: impl Into<String>, inputs: Vec<String>, outputs: Vec<String>) -> Node {
        Node { name: name.into(), op: op.into(), domain: String::new(), inputs, outputs, attrs: BTreeMap::new() }
    }
    pub fn with_attr(mut self, key: &str, a: Attr) -> Node {
        self.attrs.insert(key.to_string(), a);
        self
    }
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.attrs.get(key) {
            Some(Attr::Int(i)) => Some(*i),
            _ => None,
        }
    }
    pub fn ints(&self, key: &str) -> Option<&[i64]> {
        match self.attrs.get(key) {
            Some(Attr::Ints(v)) => Some(v),
            _ => None,
        }
    }
    pub fn float(&self, key: &str) -> Option<f32> {
        match self.attrs.get(key) {
            Some(Attr::Float(f)) => Some(*f),
            _ => None,
        }
    }
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.attrs.get(key) {
            Some(Attr::Str(s)) => Some(s),
            _ => None,
        }
    }
    /// The i-th input, or None when absent or omitted.
    pub fn input(&self, i: usize) -> Option<&str> {
        self.inputs.get(i).map(|s| s.as_str()).filter(|s| !s.is_empty())
    }
    /// "Op 'name'" for error messages.
    pub fn label(&self) -> String {
        let dom = if self.domain.is_empty() { String::new() } else { format!("{}::", self.domain) };
        format!("{dom}{} node '{}'", self.op, self.name)
    }
}

/// A local function of the model (inlined during canonicalization).
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub name: String,
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attr_names: Vec<String>,
    /// Default values of attributes (`attribute_proto`).
    pub attr_defaults: BTreeMap<String, Attr>,
    pub nodes: Vec<Node>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    pub name: String,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub nodes: Vec<Node>,
    /// Constants: weights and folded values. Never shares a name with a graph input.
    pub initializers: BTreeMap<String, Tensor>,
    /// Known types of intermediate values (from the file's value_info and from shape inference).
    pub types: HashMap<String, ValueType>,
    used_names: HashSet<String>,
}

impl Graph {
    /// A name not used yet anywhere in the graph, derived from `hint` (stable: the same edits give the same
    /// names).
    pub fn fresh(&mut self, hint: &str) -> String {
        if self.used_names.is_empty() {
            self.collect_names();
        }
        if !self.used_names.contains(hint) {
            self.used_names.insert(hint.to_string());
            return hint.to_string();
        }
        let mut i = 1;
        loop {
            let cand = format!("{hint}_{i}");
            if !self.used_names.contains(&cand) {
                self.used_names.insert(cand.clone());
                return cand;
            }
            i += 1;
        }
    }

    /// Records every name now in the graph for [`Graph::fresh`], before a pass takes the node list out to rebuild
    /// it (names of the nodes taken out would otherwise be unknown to it).
    pub fn remember_names(&mut self) {
        if self.used_names.is_empty() {
            self.collect_names();
        }
    }

    fn collect_names(&mut self) {
        let mut s: HashSet<String> = HashSet::new();
        s.extend(self.inputs.iter().map(|v| v.name.clone()));
        s.extend(self.outputs.iter().map(|v| v.name.clone()));
        s.extend(self.initializers.keys().cloned());
        for n in &self.nodes {
            s.insert(n.name.clone());
            s.extend(n.outputs.iter().cloned());
        }
        s.insert(String::new());
        self.used_names = s;
    }

    /// Adds a constant and returns its name.
    pub fn add_const(&mut self, hint: &str, t: Tensor) -> String {
        let name = self.fresh(hint);
        self.types.insert(name.clone(), ValueType::known(t.dtype(), &t.shape));
        self.initializers.insert(name.clone(), t);
        name
    }

    /// Appends a node with fresh output names `hint`, `hint_1`, ...; returns the output names.
    /// The caller keeps the node list topologically ordered (append after the producers, or call `toposort`).
    pub fn add_node(
        &mut self,
        op: &str,
        inputs: Vec<String>,
        n_outputs: usize,
        attrs: Vec<(&str, Attr)>,
        hint: &str,
    ) -> Vec<String> {
        let outputs: Vec<String> = (0..n_outputs).map(|_| self.fresh(hint)).collect();
        let name = self.fresh(&format!("{hint}.node"));
        let mut node = Node::new(name, op, inputs, outputs.clone());
        for (k, a) in attrs {
            node.attrs.insert(k.to_string(), a);
        }
        self.nodes.push(node);
        outputs
    }

    /// Shorthand for a single-output node.
    pub fn op1(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>, hint: &str) -> String {
        let ins = inputs.iter().map(|s| s.to_string()).collect();
        self.add_node(op, ins, 1, attrs, hint).pop().unwrap()
    }

    pub fn is_input(&self, name: &str) -> bool {
        self.inputs.iter().any(|v| v.name == name)
    }
    pub fn is_output(&self, name: &str) -> bool {
        self.outputs.iter().any(|v| v.name == name)
    }

    /// value name -> index of the node producing it.
    pub fn producers(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for o in &n.outputs {
                if !o.is_empty() {
                    m.insert(o.clone(), i);
                }
            }
        }
        m
    }

    /// value name -> indices of the nodes reading it.
    pub fn consumers(&self) -> HashMap<String, Vec<usize>> {
        let mut m: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for inp in &n.inputs {
                if !inp.is_empty() {
                    m.entry(inp.clone()).or_default().push(i);
                }
            }
        }
        m
    }

    /// Replaces every use of `old` by `new` (node inputs and graph outputs keep their names: an output
    /// that was `old` is re-pointed through the producer instead, see `replace_value`).
    pub fn rename_uses(&mut self, old: &str, new: &str) {
        for n in &mut self.nodes {
            for inp in &mut n.inputs {
                if inp == old {
                    *inp = new.to_string();
                }
            }
        }
    }

    /// Makes every reader of `old` read `new` instead. When `old` is a graph output, the output keeps its
    /// public name: the producer of `new` is renamed to produce `old` (if `new` is produced by a node and is
    /// not itself public), else an Identity is inserted.
    pub fn replace_value(&mut self, old: &str, new: &str) {
        if old == new {
            return;
        }
        self.rename_uses(old, new);
        if self.is_output(old) {
            let new_is_public = self.is_input(new) || self.is_output(new) || self.initializers.contains_key(new);
            let prod = self.producers().get(new).copied();
            match prod {
                Some(p) if !new_is_public => {
                    // Rename `new` to `old` everywhere (it now carries the public name).
                    for o in &mut self.nodes[p].outputs {
                        if o == new {
                            *o = old.to_string();
                        }
                    }
                    self.rename_uses(new, old);
                    if let Some(t) = self.types.remove(new) {
                        self.types.insert(old.to_string(), t);
                    }
                }
                _ => {
                    let name = self.fresh(&format!("{old}.identity"));
                    // The old producer (if any) is now dead; the Identity takes over the name.
                    for n in &mut self.nodes {
                        for o in &mut n.outputs {
                            if o == old {
                                *o = String::new();
                            }
                        }
                    }
                    self.nodes.push(Node::new(name, "Identity", vec![new.to_string()], vec![old.to_string()]));
                }
            }
        }
    }

    /// Removes nodes whose outputs are never used and unused initializers. Returns whether anything went.
    pub fn dce(&mut self) -> bool {
        let mut live: HashSet<String> = self.outputs.iter().map(|v| v.name.clone()).collect();
        let mut keep = vec![false; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate().rev() {
            if n.outputs.iter().any(|o| !o.is_empty() && live.contains(o)) {
                keep[i] = true;
                for inp in &n.inputs {
                    live.insert(inp.clone());
                }
                // Values used inside subgraphs count as live too.
                for a in n.attrs.values() {
                    if let Attr::Graph(g) = a {
                        live.extend(g.outer_references());
                    }
                }
            }
        }
        let before = (self.nodes.len(), self.initializers.len());
        let mut i = 0;
        self.nodes.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        self.initializers.retain(|k, _| live.contains(k));
        self.types.retain(|k, _| live.contains(k));
        before != (self.nodes.len(), self.initializers.len())
    }

    /// Names a subgraph reads from its enclosing scope.
    pub fn outer_references(&self) -> HashSet<String> {
        let mut defined: HashSet<String> = self.inputs.iter().map(|v| v.name.clone()).collect();
        defined.extend(self.initializers.keys().cloned());
        let mut refs = HashSet::new();
        for n in &self.nodes {
            for inp in &n.inputs {
                if !inp.is_empty() && !defined.contains(inp) {
                    refs.insert(inp.clone());
                }
            }
            for a in n.attrs.values() {
                if let Attr::Graph(g) = a {
                    refs.extend(g.outer_references().into_iter().filter(|r| !defined.contains(r)));
                }
            }
            defined.extend(n.outputs.iter().cloned());
        }
        for o in &self.outputs {
            if !defined.contains(&o.name) {
                refs.insert(o.name.clone());
            }
        }
        refs
    }

    /// Reorders nodes topologically (stable: keeps the current order where it is already valid).
    /// Fails on a cycle or a value read but never defined.
    pub fn toposort(&mut self) -> Result<()> {
        let mut defined: HashSet<String> = self.inputs.iter().map(|v| v.name.clone()).collect();
        defined.extend(self.initializers.keys().cloned());
        defined.insert(String::new());
        let mut pending: Vec<Node> = std::mem::take(&mut self.nodes);
        let mut out = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
            let before = pending.len();
            let mut rest = Vec::new();
            for n in pending {
                let ready = n.inputs.iter().all(|i| defined.contains(i))
                    && n.attrs.values().all(|a| match a {
                        Attr::Graph(g) => g.outer_references().iter().all(|r| defined.contains(r)),
                        _ => true,
                    });
                if ready {
                    for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                        if !defined.insert(o.clone()) {
                            bail!("{} defines '{o}', which is already defined (an input, an initializer or another node's output)", n.label());
                        }
                    }
                    out.push(n);
                } else {
                    rest.push(n);
                }
            }
            if rest.len() == before {
                let n = &rest[0];
                let missing: Vec<&String> = n.inputs.iter().filter(|i| !defined.contains(*i)).collect();
                bail!("{} reads {:?}, which nothing defines (or the graph has a cycle)", n.label(), missing);
            }
            pending = rest;
        }
        self.nodes = out;
        Ok(())
    }

    /// The type of a value, if known (initializers always are).
    pub fn type_of(&self, name: &str) -> Option<ValueType> {
        if let Some(t) = self.initializers.get(name) {
            return Some(ValueType::known(t.dtype(), &t.shape));
        }
        if let Some(v) = self.inputs.iter().find(|v| v.name == name) {
            return Some(v.ty.clone());
        }
        self.types.get(name).cloned()
    }

    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.type_of(name)?.concrete()
    }

    /// Number of nodes, those inside subgraphs (If branches) included.
    pub fn node_count_deep(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| {
                1 + n
                    .attrs
                    .values()
                    .map(|a| if let Attr::Graph(g) = a { g.node_count_deep() } else { 0 })
                    .sum::<usize>()
            })
            .sum()
    }

    /// Histogram of op types (sorted by name).
    pub fn op_histogram(&self) -> BTreeMap<String, usize> {
        let mut h = BTreeMap::new();
        for n in &self.nodes {
            *h.entry(n.op.clone()).or_insert(0) += 1;
        }
        h
    }

    /// Drops the name cache; call after bulk edits that bypass `fresh`.
    pub fn forget_names(&mut self) {
        self.used_names.clear();
    }
}

/// A whole model: the main graph plus what the file said around it.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub graph: Graph,
    /// Version of the default ("" / "ai.onnx") domain.
    pub opset: i64,
    /// Other imported domains and versions.
    pub other_opsets: Vec<(String, i64)>,
    pub ir_version: i64,
    pub producer_name: String,
    pub producer_version: String,
    pub functions: Vec<Function>,
    pub metadata: Vec<(String, String)>,
}
