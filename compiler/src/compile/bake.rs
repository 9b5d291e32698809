//! `pfxc bake`: standalone inference graphs with a trained prefix as constants (no MLP, no trainable inputs),
//! for any ONNX runtime. The graph that takes the prefix (GPT-2's prefill, BART's encode) gets its values as
//! initializers, then folding evaluates the generators (MLP included) once, at compile time; the other
//! generation graphs are copied.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use super::storage::{store_weights_with, Rounded, WeightStorage};
use super::{read_manifest, Manifest};
use crate::onnx_io::{self, WeightsFile};
use crate::simplify::simplify;
use crate::tensor::{DType, Tensor};

/// Reads the named f32 tensors from a safetensors file (other tensors in it are ignored).
pub fn read_f32_safetensors(path: &Path, names: &[String]) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if !names.contains(&name) {
            continue;
        }
        if view.dtype() != safetensors::Dtype::F32 {
            bail!("{}: tensor '{name}' is {:?}; a prefix is float32", path.display(), view.dtype());
        }
        out.insert(name.to_string(), Tensor::from_le_bytes(DType::F32, view.shape().to_vec(), view.data())?);
    }
    Ok(out)
}

/// A safetensors file as PEFT saves an adapter (`adapter_model.safetensors`, keys under `base_model.` or
/// `prompt_embeddings`).
fn is_peft_adapter(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else { return false };
    let Ok(st) = safetensors::SafeTensors::deserialize(&bytes) else { return false };
    st.names().iter().any(|n| n.starts_with("base_model.") || n.starts_with("prompt_embeddings"))
}

/// The generation graphs a bundle may hold; the first two of a family take the prefix as inputs.
const GENERATION_ROLES: [&str; 4] = ["prefill", "encode", "decode", "encode_bare"];

pub fn bake(bundle: &Path, prefix: &Path, out: &Path) -> Result<Manifest> {
    bake_with(bundle, prefix, out, None)
}

/// [`bake`], the frozen weights stored as `weights` says (None: as the bundle stores them). Storing an f32
/// bundle's weights in f16 rounds the frozen model only: the prefix becomes constants after, in f32.
pub fn bake_with(bundle: &Path, prefix: &Path, out: &Path, weights: Option<WeightStorage>) -> Result<Manifest> {
    let mut manifest = read_manifest(bundle)?;
    super::bundle_dir::BundleDir::check(out, bundle, "bundle")?;
    let storage = weights.unwrap_or(manifest.weights_dtype);
    if manifest.weights_dtype == WeightStorage::F16 && storage == WeightStorage::F32 {
        bail!(
            "{} stores its weights in f16 (pfxc compile --weights f16): baking cannot give them back their f32 \
             values; compile the export again without --weights f16",
            bundle.display()
        );
    }
    if manifest.baked {
        bail!("{} is already baked", bundle.display());
    }
    let roles: Vec<&str> = GENERATION_ROLES.into_iter().filter(|r| manifest.graphs.contains_key(*r)).collect();
    if !roles.contains(&"decode") {
        return Err(super::no_generation_graphs(bundle).context("cannot bake"));
    }
    let names: Vec<String> = manifest.trainable.iter().map(|t| t.name.clone()).collect();
    let values = read_f32_safetensors(prefix, &names)?;
    for t in &manifest.trainable {
        let v = values.get(&t.name).ok_or_else(|| {
            anyhow!(
                "{} has no tensor '{}' (the bundle's prefix is {}): it is not a prefix of this bundle{}",
                prefix.display(),
                t.name,
                names.join(", "),
                if is_peft_adapter(prefix) {
                    "; it looks like a PEFT adapter: `pfxrun import-peft` converts one into this bundle's prefix"
                } else {
                    ""
                }
            )
        })?;
        if v.shape != t.shape {
            bail!(
                "{}: '{}' has shape {:?}, the bundle needs {:?}: the prefix was trained for another bundle (other \
                 --prefix-len, --mid-dim or --no-reparam)",
                prefix.display(),
                t.name,
                v.shape,
                t.shape
            );
        }
        if v.as_f64s().is_some_and(|x| x.iter().any(|x| !x.is_finite())) {
            bail!(
                "{}: '{}' holds NaN or infinite values (a diverged training?); baking it would give graphs that \
                 generate nothing sensible",
                prefix.display(),
                t.name
            );
        }
    }
    let dir = super::bundle_dir::BundleDir::create(out, bundle, "bundle")?;
    let mut w = WeightsFile::create(&dir.path("weights.bin"))?;
    let mut graphs = BTreeMap::new();
    let mut rounded = Rounded::default();
    for role in &roles {
        let mut m = onnx_io::load(&bundle.join(&manifest.graphs[*role]))?;
        store_weights_with(&mut m.graph, storage, &mut rounded);
        let takes_prefix = m.graph.inputs.iter().any(|i| names.contains(&i.name));
        if takes_prefix {
            inputs_to_constants(&mut m.graph, &names, &values)?;
            simplify(&mut m.graph)?;
            let left: Vec<&str> = m
                .graph
                .nodes
                .iter()
                .filter(|n| n.op == "Tanh" && n.name.contains("prefix"))
                .map(|n| n.name.as_str())
                .collect();
            if !left.is_empty() {
                bail!("the prefix generator of the {role} graph did not fold to constants ({left:?})");
            }
        }
        let file = format!("{role}.onnx");
        onnx_io::save(&m, &dir.path(&file), Some(&mut w))?;
        graphs.insert(role.to_string(), file);
    }
    // The tokenizer travels with the graphs, so the baked bundle generates text on its own.
    manifest.tokenizer = super::bundle_dir::copy_tokenizer(&dir, Some(&bundle.join("tokenizer.json")))?;
    manifest.baked = true;
    manifest.weights_dtype = storage;
    manifest.trainable.clear();
    manifest.graphs = graphs;
    manifest.io.retain(|k, _| roles.contains(&k.as_str()));
    for io in manifest.io.values_mut() {
        io.inputs.retain(|i| i.role != "trainable");
    }
    // Family sections (BART's "bart") travel unchanged.
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json"))?)?;
    let mut json = serde_json::to_value(&manifest)?;
    if let (Some(obj), Some(src)) = (json.as_object_mut(), raw.as_object()) {
        for (k, v) in src {
            obj.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    dir.finish(&serde_json::to_string_pretty(&json)?)?;
    Ok(manifest)
}

/// The trainable inputs among `names` that `g` takes become constants with the given values (what baking does;
/// also the generation graphs built already baked).
pub(crate) fn inputs_to_constants(
    g: &mut crate::ir::Graph,
    names: &[String],
    values: &BTreeMap<String, Tensor>,
) -> Result<()> {
    for name in names {
        if !g.is_input(name) {
            continue;
        }
        let t = values.get(name).ok_or_else(|| anyhow!("the prefix has no tensor '{name}'"))?;
        g.inputs.retain(|v| &v.name != name);
        g.initializers.insert(name.clone(), t.clone());
    }
    Ok(())
}
