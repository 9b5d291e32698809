//! A compiled bundle on disk: its manifest, graphs and prefix files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
pub use pfx_compiler::compile::{GenerationSpec, Manifest};

use crate::backend::{open, open_stateful_step, state_pairs, Backend, BackendKind, StatefulStep};
use crate::ort_backend::{OrtDevice, OrtOptions};
use crate::tensor::{read_safetensors, HostTensor};

pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Bundle {
    pub fn open(dir: impl AsRef<Path>) -> Result<Bundle> {
        let dir = dir.as_ref().to_path_buf();
        let manifest = pfx_compiler::compile::read_manifest(&dir)?;
        Ok(Bundle { dir, manifest })
    }

    pub fn graph_path(&self, role: &str) -> Result<PathBuf> {
        let file = self.manifest.graphs.get(role).ok_or_else(|| {
            anyhow!(
                "the bundle {} has no '{role}' graph (it has: {})",
                self.dir.display(),
                self.manifest.graphs.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        Ok(self.dir.join(file))
    }

    /// The graph `role` runs as on `kind`: ONNX Runtime on a GPU reads the role's `.gpu` variant when the bundle
    /// has one (`pfx_compiler::compile::gpu_variant`: the loss off a LogSoftmax, cubes as `Pow`), all else the role.
    pub fn graph_path_on(&self, role: &str, kind: BackendKind, ort: &OrtOptions) -> Result<PathBuf> {
        let variant = format!("{role}{}", pfx_compiler::compile::GPU_VARIANT);
        // PFX_GPU_VARIANTS=off runs the plain graphs on a GPU too (the variants are newer and less travelled).
        let wanted = std::env::var("PFX_GPU_VARIANTS").map_or(true, |v| v != "off");
        if wanted
            && kind == BackendKind::Ort
            && ort.device != OrtDevice::Cpu
            && self.manifest.graphs.contains_key(&variant)
        {
            return self.graph_path(&variant);
        }
        self.graph_path(role)
    }

    pub fn open_graph(&self, role: &str, kind: BackendKind, ort: &OrtOptions) -> Result<Box<dyn Backend>> {
        let p = self.graph_path_on(role, kind, ort)?;
        open(&p, kind, ort).with_context(|| format!("opening the {role} graph of {}", self.dir.display()))
    }

    /// The `train_step` graph as a [`StatefulStep`], its state pairs read from the manifest.
    pub fn open_train_step(&self, kind: BackendKind, ort: &OrtOptions) -> Result<Box<dyn StatefulStep>> {
        let p = self.graph_path_on("train_step", kind, ort)?;
        let io = self
            .manifest
            .io
            .get("train_step")
            .with_context(|| format!("the manifest of {} has no I/O roles for train_step", self.dir.display()))?;
        let pairs = state_pairs(io).with_context(|| format!("the train_step graph of {}", self.dir.display()))?;
        open_stateful_step(&p, kind, ort, pairs)
            .with_context(|| format!("opening the train_step graph of {}", self.dir.display()))
    }

    pub fn trainable_names(&self) -> Vec<String> {
        self.manifest.trainable.iter().map(|t| t.name.clone()).collect()
    }

    /// The bundle's initial prefix.
    pub fn init_prefix(&self) -> Result<BTreeMap<String, HostTensor>> {
        self.read_prefix(&self.dir.join(&self.manifest.init))
    }

    /// Refuses a baked bundle where the command needs the trainable prefix and its graphs (train, eval, PEFT).
    pub fn refuse_baked(&self) -> Result<()> {
        if self.manifest.baked {
            bail!(
                "{} is baked (generation only: its prefix is inside the graphs); use the bundle pfxc compile wrote",
                self.dir.display()
            );
        }
        Ok(())
    }

    /// Reads a prefix file and checks it holds every trainable tensor with the right shape.
    pub fn read_prefix(&self, path: &Path) -> Result<BTreeMap<String, HostTensor>> {
        let all = read_safetensors(path)?;
        let mut out = BTreeMap::new();
        for t in &self.manifest.trainable {
            let v = all.get(&t.name).ok_or_else(|| {
                anyhow!(
                    "{} has no tensor '{}' (this bundle's prefix: {}); was it trained for another bundle?",
                    path.display(),
                    t.name,
                    self.trainable_names().join(", ")
                )
            })?;
            if v.shape() != t.shape.as_slice() {
                bail!("{}: '{}' has shape {:?}, this bundle needs {:?}", path.display(), t.name, v.shape(), t.shape);
            }
            let values = v
                .as_f32()
                .map_err(|_| anyhow!("{}: '{}' is {:?}; a prefix is float32", path.display(), t.name, v.dtype()))?;
            if values.iter().any(|x| !x.is_finite()) {
                bail!(
                    "{}: '{}' holds NaN or infinite values (a training that diverged?); it cannot be used",
                    path.display(),
                    t.name
                );
            }
            out.insert(t.name.clone(), v.clone());
        }
        Ok(out)
    }
}
