//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors` holding `prompt_embeddings`
//! [P, 2·L·d], the prefix with the MLP already applied (what PEFT saves for prefix tuning). pfx writes them
//! with `prefix_projection: false`, the form PEFT loads back as-is.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::bundle::Manifest;
use crate::tensor::{read_safetensors, safetensors_to_bytes, HostTensor};

/// [P, 2Ld]: the generator's output for a prefix (MLP applied when the bundle reparametrizes).
pub fn prompt_embeddings(m: &Manifest, prefix: &BTreeMap<String, HostTensor>) -> Result<HostTensor> {
    let get =
        |n: &str| -> Result<&[f32]> { prefix.get(n).with_context(|| format!("the prefix has no '{n}'"))?.as_f32() };
    let p = m.prefix_len;
    let width = 2 * m.layers * m.hidden;
    let emb = get("embedding.weight")?;
    let Some(mid) = m.mid_dim.filter(|_| m.reparam) else {
        return HostTensor::from_f32(vec![p, width], emb.to_vec());
    };
    let d = m.hidden;
    let (w0, b0, w2, b2) =
        (get("transform.0.weight")?, get("transform.0.bias")?, get("transform.2.weight")?, get("transform.2.bias")?);
    let mut out = vec![0f32; p * width];
    for i in 0..p {
        let h: Vec<f64> = (0..mid)
            .map(|j| {
                let s: f64 = (0..d).map(|k| emb[i * d + k] as f64 * w0[j * d + k] as f64).sum();
                (s + b0[j] as f64).tanh()
            })
            .collect();
        for o in 0..width {
            let s: f64 = (0..mid).map(|j| h[j] * w2[o * mid + j] as f64).sum();
            out[i * width + o] = (s + b2[o] as f64) as f32;
        }
    }
    HostTensor::from_f32(vec![p, width], out)
}

/// BART bundles in the paper's layout (enc/dec/cross generators) have no PEFT counterpart.
fn refuse_bart_paper(m: &Manifest) -> Result<()> {
    if m.family == "bart" && m.trainable.iter().any(|t| t.name.starts_with("enc.")) {
        bail!(
            "this BART bundle uses the paper's prefixes (encoder, decoder and cross-attention), which PEFT cannot \
             represent; PEFT adapters exist for bundles compiled with --bart-prefix peft"
        );
    }
    Ok(())
}

pub fn export_adapter(m: &Manifest, prefix: &BTreeMap<String, HostTensor>, dir: &Path, base_model: &str) -> Result<()> {
    refuse_bart_paper(m)?;
    let emb = prompt_embeddings(m, prefix)?;
    // PEFT's seq2seq prefix model counts two transformer submodules (encoder and decoder).
    let (task, submodules) = if m.family == "bart" { ("SEQ_2_SEQ_LM", 2) } else { ("CAUSAL_LM", 1) };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = json!({
        "peft_type": "PREFIX_TUNING",
        "task_type": task,
        "num_virtual_tokens": m.prefix_len,
        "token_dim": m.hidden,
        "num_transformer_submodules": submodules,
        "num_attention_heads": m.heads,
        "num_layers": m.layers,
        "encoder_hidden_size": m.hidden,
        "prefix_projection": false,
        "inference_mode": true,
        "base_model_name_or_path": base_model,
        "revision": null,
        "modules_to_save": null,
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&config)?)?;
    let tensors: BTreeMap<String, HostTensor> = [("prompt_embeddings".to_string(), emb)].into();
    std::fs::write(dir.join("adapter_model.safetensors"), safetensors_to_bytes(&tensors, None)?)?;
    Ok(())
}

/// Reads a PEFT prefix-tuning adapter as the `embedding.weight` of a `--no-reparam` bundle.
pub fn import_adapter(m: &Manifest, dir: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", cfg_path.display()))?;
    if !cfg.is_object() {
        bail!("{} is not an adapter config (a JSON object)", cfg_path.display());
    }
    if cfg["peft_type"] != "PREFIX_TUNING" {
        bail!("{} is a {} adapter, not PREFIX_TUNING", cfg_path.display(), cfg["peft_type"]);
    }
    refuse_bart_paper(m)?;
    let want_task = if m.family == "bart" { "SEQ_2_SEQ_LM" } else { "CAUSAL_LM" };
    if cfg["task_type"].as_str().is_some_and(|t| t != want_task) {
        bail!("{} is a {} adapter; this bundle ({}) needs {want_task}", cfg_path.display(), cfg["task_type"], m.family);
    }
    if m.reparam {
        bail!(
            "a PEFT adapter holds the prefix with the MLP applied ([P, 2·L·d]); load it into a bundle compiled \
             with --no-reparam"
        );
    }
    let t = read_safetensors(dir.join("adapter_model.safetensors"))?;
    let emb = t
        .get("prompt_embeddings")
        .with_context(|| format!("{}/adapter_model.safetensors has no prompt_embeddings", dir.display()))?;
    // The sizes the adapter says it has must be the bundle's: [P, 2·L·d] alone can match other L and d.
    for (key, want) in [
        ("num_virtual_tokens", m.prefix_len),
        ("num_layers", m.layers),
        ("token_dim", m.hidden),
        ("num_attention_heads", m.heads),
    ] {
        match cfg.get(key) {
            None | Some(serde_json::Value::Null) => {}
            Some(v) if v.as_u64() == Some(want as u64) => {}
            Some(v) => bail!("{} has {key} = {v}; this bundle has {want}", cfg_path.display()),
        }
    }
    let want = [m.prefix_len, 2 * m.layers * m.hidden];
    if emb.shape() != want {
        bail!(
            "prompt_embeddings has shape {:?}; this bundle needs {:?} (prefix length, 2·layers·hidden)",
            emb.shape(),
            want
        );
    }
    if emb.to_f64_vec().iter().any(|x| !x.is_finite()) {
        bail!("{}/adapter_model.safetensors: prompt_embeddings holds NaN or infinite values", dir.display());
    }
    Ok([("embedding.weight".to_string(), emb.clone())].into())
}
