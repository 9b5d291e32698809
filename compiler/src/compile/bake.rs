//! `pfxc bake`: standalone inference graphs with a trained prefix as constants (no MLP, no trainable inputs),
//! for any ONNX runtime. The bundle's prefill graph gets the prefix values as initializers, then folding
//! evaluates the generator (MLP included) once, at compile time.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

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

pub fn bake(bundle: &Path, prefix: &Path, out: &Path) -> Result<Manifest> {
    let mut manifest = read_manifest(bundle)?;
    if manifest.baked {
        bail!("{} is already baked", bundle.display());
    }
    let (Some(prefill), Some(decode)) = (manifest.graphs.get("prefill"), manifest.graphs.get("decode")) else {
        bail!(
            "{} has no generation graphs (prefill/decode): compile an export with past inputs to bake",
            bundle.display()
        );
    };
    let names: Vec<String> = manifest.trainable.iter().map(|t| t.name.clone()).collect();
    let values = read_f32_safetensors(prefix, &names)?;
    let mut pre = onnx_io::load(&bundle.join(prefill))?;
    for t in &manifest.trainable {
        let v = values.get(&t.name).ok_or_else(|| anyhow!("{} has no tensor '{}'", prefix.display(), t.name))?;
        if v.shape != t.shape {
            bail!("{}: '{}' has shape {:?}, the bundle needs {:?}", prefix.display(), t.name, v.shape, t.shape);
        }
        pre.graph.inputs.retain(|i| i.name != t.name);
        pre.graph.initializers.insert(t.name.clone(), v.clone());
    }
    simplify(&mut pre.graph)?;
    let left: Vec<&str> = pre
        .graph
        .nodes
        .iter()
        .filter(|n| n.op == "Tanh" && n.name.contains("prefix"))
        .map(|n| n.name.as_str())
        .collect();
    if !left.is_empty() {
        bail!("the prefix generator did not fold to constants ({left:?})");
    }
    let dec = onnx_io::load(&bundle.join(decode))?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = WeightsFile::create(&out.join("weights.bin"))?;
    onnx_io::save(&pre, &out.join("prefill.onnx"), Some(&mut w))?;
    onnx_io::save(&dec, &out.join("decode.onnx"), Some(&mut w))?;
    manifest.baked = true;
    manifest.trainable.clear();
    manifest.graphs =
        [("prefill".to_string(), "prefill.onnx".to_string()), ("decode".to_string(), "decode.onnx".to_string())].into();
    manifest.io.retain(|k, _| k == "prefill" || k == "decode");
    if let Some(io) = manifest.io.get_mut("prefill") {
        io.inputs.retain(|i| i.role != "trainable");
    }
    let json = serde_json::to_string_pretty(&manifest)?;
    onnx_io::write_atomically(&out.join("manifest.json"), json.as_bytes())?;
    Ok(manifest)
}
