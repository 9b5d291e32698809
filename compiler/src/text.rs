//! A readable text form of a graph, for snapshots and `pfxc` output. One line per node:
//! `out: type = Op(in, ...) {attrs}`; initializers are listed with their type (and values when tiny).

use std::fmt::Write;

use crate::ir::{Attr, Graph, Model};

pub fn model_text(m: &Model) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "opset {}", m.opset);
    s += &graph_text(&m.graph, "");
    s
}

pub fn graph_text(g: &Graph, indent: &str) -> String {
    let mut s = String::new();
    let ty = |name: &str| g.type_of(name).map(|t| t.describe()).unwrap_or_else(|| "?".into());
    let _ = writeln!(s, "{indent}inputs:");
    for v in &g.inputs {
        let _ = writeln!(s, "{indent}  {}: {}", v.name, v.ty.describe());
    }
    let _ = writeln!(s, "{indent}outputs:");
    for v in &g.outputs {
        let _ = writeln!(s, "{indent}  {}: {}", v.name, ty(&v.name));
    }
    let bytes: usize = g.initializers.values().map(|t| t.byte_len()).sum();
    let _ = writeln!(s, "{indent}initializers: {} ({} bytes)", g.initializers.len(), bytes);
    for (k, t) in &g.initializers {
        let _ = writeln!(s, "{indent}  {k}: {}", t.describe());
    }
    let _ = writeln!(s, "{indent}nodes: {}", g.nodes.len());
    for n in &g.nodes {
        let outs: Vec<String> =
            n.outputs.iter().map(|o| if o.is_empty() { "_".into() } else { format!("{o}: {}", ty(o)) }).collect();
        let ins: Vec<&str> = n.inputs.iter().map(|i| if i.is_empty() { "_" } else { i.as_str() }).collect();
        let dom = if n.domain.is_empty() { String::new() } else { format!("{}::", n.domain) };
        let mut line = format!("{indent}  {} = {dom}{}({})", outs.join(", "), n.op, ins.join(", "));
        let attrs: Vec<String> = n
            .attrs
            .iter()
            .filter(|(_, a)| !matches!(a, Attr::Graph(_)))
            .map(|(k, a)| format!("{k}={}", attr_text(a)))
            .collect();
        if !attrs.is_empty() {
            line += &format!(" {{{}}}", attrs.join(", "));
        }
        let _ = writeln!(s, "{line}");
        for (k, a) in &n.attrs {
            if let Attr::Graph(sub) = a {
                let _ = writeln!(s, "{indent}    {k}:");
                s += &graph_text(sub, &format!("{indent}      "));
            }
        }
    }
    s
}

fn attr_text(a: &Attr) -> String {
    match a {
        Attr::Int(i) => i.to_string(),
        Attr::Ints(v) => format!("{v:?}"),
        Attr::Float(f) => format!("{f:?}"),
        Attr::Floats(v) => format!("{v:?}"),
        Attr::Str(s) => format!("{s:?}"),
        Attr::Strs(v) => format!("{v:?}"),
        Attr::Tensor(t) => t.describe(),
        Attr::Graph(g) => format!("<graph, {} nodes>", g.nodes.len()),
        Attr::Ref(r) => format!("@{r}"),
    }
}
