//! BART generation graphs: the encoder runs once, the decoder decodes one token at a time over a KV cache.
//!
//! - `encode`: the source [R, S] (with the `enc.*` prefix in the encoder, paper mode) to what the decoder
//!   needs for every step: per decoder layer the cross-attention keys/values `cross.{l}.key|value`
//!   [R, H, P'+S, D] (paper: the `cross.*` prefix in front, P' = P; peft: none, P' = 0) and the decoder
//!   self-attention prefix `self_prefix.{l}.key|value` [R, H, P, D] (paper: `dec.*`; peft: PEFT's rows). The
//!   cross keys/values are the decoder export's own projections of the encoder output (its
//!   `present.{l}.encoder.*` outputs), so nothing of the model is re-implemented here.
//! - `encode_bare` (paper mode only): the same without any prefix, [R, H, S, D] cross keys/values, for running
//!   the bare model (`--no-prefix`); in peft mode `encode`'s cross keys/values are already the bare ones.
//! - `decode`: optimum's `decoder_with_past_model.onnx` (or the merged decoder's cache branch) over a self cache
//!   of fixed capacity C = P + max_new - 1 and a cross cache of P'+S slots. Two inputs are added: `position_ids`
//!   [R, 1] (paper numbers the target from 0, peft from P, as PEFT's cache makes HF do) and `attention_mask`
//!   [R, C+1] over the self cache and the new token (the export has no self-attention mask: a fixed-capacity cache
//!   needs one for its empty slots, and `--no-prefix` masks the prefix slots). It returns the logits and only the
//!   new token's self keys/values [R, H, 1, D]; the runtime writes them into its cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::bart::{self, BartDims, BartExport, BartPrefix};
use super::prefix::{self, PrefixShape};
use crate::inspect::{detect_family, Family};
use crate::ir::{Attr, Graph, Model, Node, ValueInfo, ValueType};
use crate::onnx_io;
use crate::simplify::simplify;
use crate::specialize::{specialize, Dims};
use crate::tensor::{DType, Tensor};

/// The shapes the generation graphs are specialized to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BartGenShape {
    /// Rows decoded together (sources × beams).
    pub rows: usize,
    /// Source length S (sources are right-padded to it).
    pub src_len: usize,
    pub max_new: usize,
}

impl BartGenShape {
    /// Self cache slots: the prefix, then every fed token but the last.
    pub fn capacity(&self, p: usize) -> usize {
        p + self.max_new.max(1) - 1
    }
}

/// What the runtime needs to drive the generation graphs (the manifest's `bart.generation`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BartGeneration {
    pub rows: usize,
    pub src_len: usize,
    pub max_new: usize,
    /// Self cache capacity C.
    pub capacity: usize,
    /// Prefix slots at the front of the self cache (P).
    pub self_prefix: usize,
    /// Prefix slots at the front of the cross cache (P in paper mode, 0 in peft mode).
    pub cross_prefix: usize,
    /// Position of the first target token (the decoder start): 0 (paper) or P (peft).
    pub first_position: usize,
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// The prefix generators as the training graph builds them (same names, same shapes).
struct Sizes {
    dims: BartDims,
    p: usize,
    mid: Option<usize>,
}

impl Sizes {
    fn shape(&self, layers: usize, heads: usize) -> PrefixShape {
        PrefixShape {
            len: self.p,
            layers,
            heads,
            head_dim: self.dims.hidden / heads,
            hidden: self.dims.hidden,
            mid: self.mid,
        }
    }
}

/// The decoder graph that generation decodes with: the with-past export, or the merged one's cache branch.
fn with_past_decoder(export: &BartExport) -> Result<(PathBuf, bool)> {
    let dir = &export.dir;
    if dir.join("decoder_with_past_model.onnx").exists() {
        Ok((dir.join("decoder_with_past_model.onnx"), false))
    } else if dir.join("decoder_model_merged.onnx").exists() {
        Ok((dir.join("decoder_model_merged.onnx"), true))
    } else {
        bail!(
            "{} has no decoder with past: generation needs decoder_with_past_model.onnx (or optimum's \
             decoder_model_merged.onnx); export with `--task text2text-generation-with-past`, or compile without \
             generation graphs (--max-new 0)",
            dir.display()
        )
    }
}

/// Inputs no node reads are dropped (the linked decoder's `labels`, unused in `encode`).
fn drop_unused_inputs(g: &mut Graph) {
    let used: std::collections::HashSet<&String> = g.nodes.iter().flat_map(|n| n.inputs.iter()).collect();
    let outs: Vec<String> = g.outputs.iter().map(|o| o.name.clone()).collect();
    let keep: Vec<bool> = g.inputs.iter().map(|v| used.contains(&v.name) || outs.contains(&v.name)).collect();
    let mut it = keep.into_iter();
    g.inputs.retain(|_| it.next().unwrap());
}

fn identity(g: &mut Graph, from: &str, to: &str) {
    let id = g.fresh(&format!("{to}.node"));
    g.nodes.push(Node::new(id, "Identity", vec![from.to_string()], vec![to.to_string()]));
}

/// The `encode` graph (or `encode_bare` with `bare`). With `baked`, the trainable tensors are constants.
pub fn build_encode(
    dir: &Path,
    mode: BartPrefix,
    prefix_len: usize,
    mid: Option<usize>,
    gs: &BartGenShape,
    bare: bool,
    baked: Option<&BTreeMap<String, Tensor>>,
) -> Result<Model> {
    let export = bart::find_export(dir)?;
    let t5 = super::t5::is_t5(&export.model_type);
    let (mut enc, enc_info) = bart::load_part(&export.encoder, Family::BartEncoder, false, t5)?;
    let (mut dec, dec_info) = bart::load_part(&export.decoder, Family::BartDecoder, export.merged, t5)?;
    bart::check_fit(&enc.graph, &dec.graph, &export)?;
    let sizes = Sizes { dims: bart::dims_of(&enc_info, &dec_info, &export)?, p: prefix_len, mid };
    let d = &sizes.dims;
    if let Some(n) = d.encoder_positions {
        if gs.src_len > n {
            bail!(
                "the generation source length {} (--prompt-len, default --src-len) exceeds the encoder's {n} positions",
                gs.src_len
            );
        }
    }
    let r = gs.rows;
    specialize(&mut enc, &Dims { batch: r, seq: gs.src_len, past: None, src_len: None })
        .with_context(|| format!("specializing {}", export.encoder.display()))?;
    specialize(&mut dec, &Dims { batch: r, seq: 1, past: None, src_len: Some(gs.src_len) })
        .with_context(|| format!("specializing {}", export.decoder.display()))?;
    let enc_sites: Vec<String> = bart::attention_softmaxes(&enc.graph).into_iter().map(|s| s.0).collect();
    let keep = |o: &str| o.starts_with("present.") && o.contains(".encoder.");
    let (mut model, _memory) = bart::link(enc, dec, &export, r, 1, &keep)?;
    let g = &mut model.graph;
    let present = |l: usize, kind: &str| format!("present.{l}.encoder.{kind}");
    for l in 0..d.decoder_layers {
        for kind in ["key", "value"] {
            if !g.is_output(&present(l, kind)) {
                bail!(
                    "{} has no output {}: pfx reads the cross-attention keys/values there",
                    export.decoder.display(),
                    present(l, kind)
                );
            }
        }
    }
    let mut outputs: Vec<(String, String)> = Vec::new(); // (value, output name)
    let mut trainable_names = Vec::new();
    let with_prefix = !bare;
    // Cross-attention keys/values, with the cross prefix in front in paper mode.
    let cross_kv = if with_prefix && mode == BartPrefix::Paper {
        let enc_shape = sizes.shape(d.encoder_layers, d.encoder_heads);
        let kv = prefix::build_generator(g, &enc_shape, "enc.", r)?;
        if enc_sites.len() != d.encoder_layers {
            bail!("found {} attentions in the encoder, but it has {} layers", enc_sites.len(), d.encoder_layers);
        }
        for (l, sm) in enc_sites.iter().enumerate() {
            prefix::inject_one(g, sm, &kv[l], None, prefix_len, &Default::default(), None)
                .map_err(|e| e.context(format!("binding the enc.* prefix of layer {l} (Softmax '{sm}')")))?;
        }
        trainable_names.extend(enc_shape.trainables("enc.").into_iter().map(|t| t.0));
        let cross_shape = sizes.shape(d.decoder_layers, d.decoder_heads);
        trainable_names.extend(cross_shape.trainables("cross.").into_iter().map(|t| t.0));
        Some(prefix::build_generator(g, &cross_shape, "cross.", r)?)
    } else {
        None
    };
    for l in 0..d.decoder_layers {
        for (i, kind) in ["key", "value"].into_iter().enumerate() {
            let own = present(l, kind);
            let v = match &cross_kv {
                Some(kv) => {
                    let pk = if i == 0 { &kv[l].0 } else { &kv[l].1 };
                    g.op1("Concat", &[pk, &own], vec![("axis", Attr::Int(2))], &format!("cross.{l}.{kind}.with_prefix"))
                }
                None => own,
            };
            outputs.push((v, format!("cross.{l}.{kind}")));
        }
    }
    // The decoder self-attention prefix, which seeds the self cache.
    if with_prefix {
        type LayerPick = Box<dyn Fn(usize) -> usize>;
        let (kv, pick): (Vec<(String, String)>, LayerPick) = match mode {
            BartPrefix::Paper => {
                let sh = sizes.shape(d.decoder_layers, d.decoder_heads);
                trainable_names.extend(sh.trainables("dec.").into_iter().map(|t| t.0));
                (prefix::build_generator(g, &sh, "dec.", r)?, Box::new(|l| l))
            }
            BartPrefix::Peft => {
                let layers = d.encoder_layers.max(d.decoder_layers);
                let sh = sizes.shape(layers, d.decoder_heads);
                trainable_names.extend(sh.trainables("").into_iter().map(|t| t.0));
                // PEFT: decoder layer i reads generator layer 2i mod L (see bart.rs).
                (prefix::build_generator(g, &sh, "", r)?, Box::new(move |l| (2 * l) % layers))
            }
        };
        for l in 0..d.decoder_layers {
            let (k, v) = &kv[pick(l)];
            outputs.push((k.clone(), format!("self_prefix.{l}.key")));
            outputs.push((v.clone(), format!("self_prefix.{l}.value")));
        }
    }
    g.outputs.clear();
    for (v, name) in &outputs {
        identity(g, v, name);
        g.outputs.push(ValueInfo { name: name.clone(), ty: ValueType::known(DType::F32, &[]) });
    }
    g.toposort()?;
    g.dce();
    drop_unused_inputs(g);
    if let Some(values) = baked {
        super::bake::inputs_to_constants(g, &trainable_names, values)?;
    }
    let inputs: Vec<String> = g.inputs.iter().map(|v| v.name.clone()).collect();
    g.types.retain(|k, _| inputs.contains(k));
    simplify(g)?;
    super::lower::lower_for_inference(g)?;
    // Output declarations get their concrete shapes back from inference.
    for o in &mut g.outputs {
        if let Some(t) = g.types.get(&o.name) {
            o.ty = t.clone();
        }
    }
    Ok(model)
}

/// The one-token `decode` graph over a self cache of capacity C and a cross cache of `cross_len` slots.
pub fn build_decode(
    dir: &Path,
    capacity: usize,
    cross_len: usize,
    rows: usize,
    t5: Option<&super::t5::DecodeSpec>,
) -> Result<Model> {
    let export = bart::find_export(dir)?;
    let (path, merged) = with_past_decoder(&export)?;
    let mut model = onnx_io::load(&path)?;
    let fam = detect_family(&model.graph);
    if fam != Family::BartDecoder {
        bail!("{} is a {fam} graph, expected the BART decoder", path.display());
    }
    if merged {
        bart::take_branch(&mut model, true)
            .with_context(|| format!("taking the cache branch of {}", path.display()))?;
    }
    crate::canonicalize::canonicalize(&mut model)
        .map_err(|e| e.context(format!("canonicalizing {}", path.display())))?;
    // BART's learned positions sit 2 rows into the table (inspect::table_offset). T5 has none: its bias is numbered
    // from the position ids below.
    let t5_table = match t5 {
        Some(t) => {
            Some(super::t5::bias_table(&model.graph, t.heads).with_context(|| format!("reading {}", path.display()))?.1)
        }
        None => {
            prefix::expose_positions(&mut model.graph)
                .with_context(|| format!("exposing the positions of {}", path.display()))?;
            None
        }
    };
    specialize(&mut model, &Dims { batch: rows, seq: 1, past: Some(capacity), src_len: Some(cross_len) })
        .with_context(|| format!("specializing {}", path.display()))?;
    let g = &mut model.graph;
    if g.is_input("attention_mask") {
        bail!("{} already has an attention_mask input; pfx adds its own self-attention mask", path.display());
    }
    // Self-attentions are those whose keys come from the cached decoder keys.
    let self_roots: Vec<String> =
        g.inputs.iter().filter(|v| v.name.contains(".decoder.")).map(|v| v.name.clone()).collect();
    let mut from_self = std::collections::HashSet::new();
    for root in &self_roots {
        from_self.extend(bart::derived_from(g, root));
    }
    let sites: Vec<String> =
        bart::attention_softmaxes(g).into_iter().filter(|(_, k)| from_self.contains(k)).map(|s| s.0).collect();
    let layers = self_roots.len() / 2;
    if sites.len() != layers {
        bail!("found {} decoder self-attentions in {}, expected {layers}", sites.len(), path.display());
    }
    if let (Some(t), Some(table)) = (t5, &t5_table) {
        g.inputs.push(ValueInfo { name: "position_ids".into(), ty: ValueType::known(DType::I64, &[rows, 1]) });
        super::t5::bias_from_positions(g, &sites, capacity, rows, table, t)
            .with_context(|| format!("numbering the relative bias of {}", path.display()))?;
    }
    add_self_mask(g, &sites, rows, capacity + 1)?;
    let presents: Vec<String> = g
        .outputs
        .iter()
        .filter(|o| o.name.starts_with("present.") && o.name.contains(".decoder."))
        .map(|o| o.name.clone())
        .collect();
    g.outputs.retain(|o| o.name == "logits" || presents.contains(&o.name));
    for name in &presents {
        super::generate::keep_last(&mut model, name, 2)?;
    }
    simplify(&mut model.graph)?;
    super::lower::lower_for_inference(&mut model.graph)?;
    super::generate::read_cache_in_parts(&mut model.graph)?;
    simplify(&mut model.graph)?;
    Ok(model)
}

/// Adds the `attention_mask` input [R, K] (1 = attend) and its additive bias in front of each self-attention
/// Softmax (HF's large negative for masked slots).
fn add_self_mask(g: &mut Graph, softmaxes: &[String], rows: usize, keys: usize) -> Result<()> {
    g.inputs.push(ValueInfo { name: "attention_mask".into(), ty: ValueType::known(DType::I64, &[rows, keys]) });
    let b = g.op1(
        "Cast",
        &["attention_mask"],
        vec![("to", Attr::Int(DType::Bool.onnx_code() as i64))],
        "self_mask/visible",
    );
    let zero = g.add_const("self_mask/zero", Tensor::scalar_f32(0.0));
    let neg = g.add_const("self_mask/min", Tensor::scalar_f32(f32::MIN));
    let bias = g.op1("Where", &[&b, &zero, &neg], vec![], "self_mask/bias");
    let shape = g.add_const("self_mask/shape", Tensor::vec_i64(&[rows as i64, 1, 1, keys as i64]));
    let bias = g.op1("Reshape", &[&bias, &shape], vec![], "self_mask/bias4");
    for sm in softmaxes {
        bart::add_to_scores(g, sm, &bias, &format!("{sm}.self_mask"))?;
    }
    g.toposort()
}

/// The generation spec the manifest carries for these graphs. T5's decode graphs take the decoder token's index as
/// its position (its bias needs only differences), so its first position is 0 in either layout.
pub fn generation_spec(mode: BartPrefix, p: usize, dims: &BartDims, gs: &BartGenShape) -> BartGeneration {
    let numbered_after_prefix = mode == BartPrefix::Peft && !dims.relative_bias;
    BartGeneration {
        rows: gs.rows,
        src_len: gs.src_len,
        max_new: gs.max_new,
        capacity: gs.capacity(p),
        self_prefix: p,
        cross_prefix: if mode == BartPrefix::Paper { p } else { 0 },
        first_position: if numbered_after_prefix { p } else { 0 },
        layers: dims.decoder_layers,
        heads: dims.decoder_heads,
        head_dim: dims.hidden / dims.decoder_heads,
    }
}

/// All generation graphs of a bundle: (role, graph).
pub fn build_generation_graphs(
    dir: &Path,
    mode: BartPrefix,
    prefix_len: usize,
    mid: Option<usize>,
    dims: &BartDims,
    gs: &BartGenShape,
    baked: Option<&BTreeMap<String, Tensor>>,
) -> Result<Vec<(String, Model)>> {
    if gs.rows == 0 || gs.src_len == 0 || gs.max_new == 0 {
        bail!("--gen-rows, --prompt-len and --max-new must be at least 1 for generation graphs");
    }
    let spec = generation_spec(mode, prefix_len, dims, gs);
    if let Some(n) = dims.decoder_positions {
        let need = spec.first_position + gs.max_new;
        if need > n {
            // PEFT's layout numbers the decoder's tokens after the prefix.
            let why = match spec.first_position {
                0 => String::new(),
                f => format!(" (the first token's position {f}, after the prefix, + {})", gs.max_new),
            };
            bail!(
                "--max-new {} needs {need} decoder positions{why}, but the decoder has {n}; use a smaller --max-new \
                 (0 writes no generation graphs)",
                gs.max_new
            );
        }
    }
    let mut out = vec![("encode".to_string(), build_encode(dir, mode, prefix_len, mid, gs, false, baked)?)];
    if mode == BartPrefix::Paper {
        out.push(("encode_bare".to_string(), build_encode(dir, mode, prefix_len, mid, gs, true, None)?));
    }
    let cross_len = spec.cross_prefix + gs.src_len;
    let t5 = match dims.relative_bias {
        true => Some(super::t5::DecodeSpec {
            heads: dims.decoder_heads,
            max_distance: super::t5::read_config(&dir.join("config.json"))?.max_distance,
            prefix: prefix_len,
            max_new: gs.max_new,
            paper: mode == BartPrefix::Paper,
        }),
        false => None,
    };
    out.push(("decode".to_string(), build_decode(dir, spec.capacity, cross_len, gs.rows, t5.as_ref())?));
    Ok(out)
}
