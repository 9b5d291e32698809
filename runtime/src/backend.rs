//! The backend abstraction: run an ONNX graph on named host tensors.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Result};

use crate::ort_backend::{OrtBackend, OrtOptions};
use crate::tensor::{DType, HostTensor};
use crate::tract_backend::TractBackend;

/// A graph input or output as the model declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoSpec {
    pub name: String,
    /// `None` when the model does not say (or uses a dtype `HostTensor` cannot hold).
    pub dtype: Option<DType>,
    /// `None` when the rank is unknown; `Some(None)` entries are symbolic/dynamic dims.
    pub shape: Option<Vec<Option<usize>>>,
}

impl IoSpec {
    /// Checks a concrete tensor against this declaration (dtype, rank, fixed dims).
    pub fn check(&self, t: &HostTensor) -> Result<()> {
        if let Some(dt) = self.dtype {
            if dt != t.dtype() {
                bail!(
                    "input `{}` must be {} but a {} tensor was given (shape {:?})",
                    self.name,
                    dt,
                    t.dtype(),
                    t.shape()
                );
            }
        }
        if let Some(dims) = &self.shape {
            let ok = dims.len() == t.rank() && dims.iter().zip(t.shape()).all(|(d, &s)| d.map_or(true, |d| d == s));
            if !ok {
                bail!("input `{}` must have shape {} but shape {:?} was given", self.name, fmt_dims(dims), t.shape());
            }
        }
        Ok(())
    }
}

impl fmt::Display for IoSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.name)?;
        match self.dtype {
            Some(d) => write!(f, "{d}")?,
            None => write!(f, "?")?,
        }
        match &self.shape {
            Some(dims) => write!(f, " {}", fmt_dims(dims)),
            None => write!(f, " [..]"),
        }
    }
}

fn fmt_dims(dims: &[Option<usize>]) -> String {
    let v: Vec<String> = dims.iter().map(|d| d.map_or("?".to_string(), |d| d.to_string())).collect();
    format!("[{}]", v.join(", "))
}

/// Picks, in the model's declared order, the tensors the model needs from `given`; fails naming every
/// missing input (extra entries in `given` are ignored). Each picked tensor is checked against its spec.
pub fn select_inputs<'a>(specs: &[IoSpec], given: &'a BTreeMap<String, HostTensor>) -> Result<Vec<&'a HostTensor>> {
    let missing: Vec<&str> = specs.iter().filter(|s| !given.contains_key(&s.name)).map(|s| s.name.as_str()).collect();
    if !missing.is_empty() {
        bail!(
            "missing model input{} {} (model inputs: {}; given: {})",
            if missing.len() > 1 { "s" } else { "" },
            missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "),
            specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
            if given.is_empty() { "nothing".to_string() } else { given.keys().cloned().collect::<Vec<_>>().join(", ") }
        );
    }
    specs
        .iter()
        .map(|s| {
            let t = &given[&s.name];
            s.check(t)?;
            Ok(t)
        })
        .collect()
}

/// Something that runs one ONNX graph.
pub trait Backend: std::fmt::Debug + Send {
    /// Short description, e.g. `tract` or `ort (cpu)`.
    fn name(&self) -> String;
    /// The graph inputs, in declared order.
    fn inputs(&self) -> &[IoSpec];
    /// The graph outputs, in declared order.
    fn outputs(&self) -> &[IoSpec];
    /// Runs the graph. Feeds only the inputs the graph declares (others in `inputs` are ignored); a
    /// declared input that is missing is an error naming it. Returns every graph output by name.
    fn run(&mut self, inputs: &BTreeMap<String, HostTensor>) -> Result<BTreeMap<String, HostTensor>>;

    fn input_names(&self) -> Vec<String> {
        self.inputs().iter().map(|s| s.name.clone()).collect()
    }
    fn output_names(&self) -> Vec<String> {
        self.outputs().iter().map(|s| s.name.clone()).collect()
    }
}

/// Which engine runs a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum BackendKind {
    /// tract: pure Rust, CPU.
    #[default]
    Tract,
    /// ONNX Runtime, loaded dynamically (CPU, CUDA, TensorRT).
    Ort,
}

impl BackendKind {
    /// Opens `model` with this backend. `ort` is used only by [`BackendKind::Ort`].
    pub fn open(self, model: impl AsRef<Path>, ort: &OrtOptions) -> Result<Box<dyn Backend>> {
        open(model, self, ort)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Tract => "tract",
            BackendKind::Ort => "ort",
        })
    }
}

impl FromStr for BackendKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tract" => Ok(BackendKind::Tract),
            "ort" | "onnxruntime" => Ok(BackendKind::Ort),
            _ => bail!("unknown backend `{s}` (expected `tract` or `ort`)"),
        }
    }
}

/// Opens an ONNX model file with the given backend.
pub fn open(model: impl AsRef<Path>, kind: BackendKind, ort: &OrtOptions) -> Result<Box<dyn Backend>> {
    let model = model.as_ref();
    Ok(match kind {
        BackendKind::Tract => Box::new(TractBackend::open(model)?),
        BackendKind::Ort => Box::new(OrtBackend::open(model, ort)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_and_check() {
        let specs = vec![
            IoSpec { name: "x".into(), dtype: Some(DType::F32), shape: Some(vec![None, Some(4)]) },
            IoSpec { name: "y".into(), dtype: Some(DType::I64), shape: None },
        ];
        let mut given = BTreeMap::new();
        given.insert("x".to_string(), HostTensor::zeros(DType::F32, [3, 4]));
        given.insert("extra".to_string(), HostTensor::scalar_f32(1.0));
        let e = select_inputs(&specs, &given).unwrap_err().to_string();
        assert!(e.contains("`y`") && e.contains("given: extra, x"), "{e}");
        given.insert("y".to_string(), HostTensor::scalar_f32(1.0));
        let e = select_inputs(&specs, &given).unwrap_err().to_string();
        assert!(e.contains("`y` must be int64 but a float32"), "{e}");
        given.insert("y".to_string(), HostTensor::scalar_i64(1));
        assert_eq!(select_inputs(&specs, &given).unwrap().len(), 2);
        given.insert("x".to_string(), HostTensor::zeros(DType::F32, [3, 5]));
        let e = select_inputs(&specs, &given).unwrap_err().to_string();
        assert!(e.contains("[?, 4]"), "{e}");
        assert_eq!("ORT".parse::<BackendKind>().unwrap(), BackendKind::Ort);
        assert!("onnx".parse::<BackendKind>().is_err());
    }
}
