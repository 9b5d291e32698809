//! The backend abstraction: run an ONNX graph on named host tensors.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use pfx_compiler::compile::GraphIo;

use crate::ort_backend::{OrtBackend, OrtOptions, OrtStatefulStep};
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
            let ok = dims.len() == t.rank() && dims.iter().zip(t.shape()).all(|(d, &s)| d.is_none_or(|d| d == s));
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

/// A change to a kept f32 input (a KV cache): what generation does to its caches between steps, in a form a
/// backend can apply on the host or in device memory.
#[derive(Clone, Copy, Debug)]
pub enum KeptEdit<'a> {
    /// The input is [N, capacity, width] (N = rows × heads); `new` [N, width] goes into position `slot` of each
    /// of the N blocks (the new token's keys or values).
    WriteSlot { new: &'a [f32], capacity: usize, slot: usize, width: usize },
    /// The input is `rows` blocks of `per_row` values; block i becomes block `parents[i]` (or `parents[0]` past
    /// the end of `parents`): a beam search reorder.
    Reorder { parents: &'a [usize], rows: usize, per_row: usize },
}

impl KeptEdit<'_> {
    /// Applies the edit to data in host memory.
    pub fn apply(&self, data: &mut [f32]) -> Result<()> {
        self.check(data.len())?;
        match *self {
            KeptEdit::WriteSlot { new, capacity, slot, width } => {
                crate::generate::write_slot(data, new, capacity, slot, width)
            }
            KeptEdit::Reorder { parents, rows, per_row } => crate::search::reorder_rows(data, parents, rows, per_row),
        }
        Ok(())
    }

    /// Checks that the edit stays inside an input of `len` values (a device copy would not check it).
    pub fn check(&self, len: usize) -> Result<()> {
        match *self {
            KeptEdit::WriteSlot { new, capacity, slot, width } => {
                check_slot_write(new.len(), capacity, slot, width, len)?
            }
            KeptEdit::Reorder { parents, rows, per_row } => {
                if parents.is_empty() || rows * per_row > len || parents.iter().any(|&p| p >= rows) {
                    bail!("cannot reorder {rows} rows of {per_row} values by {parents:?} in {len} values");
                }
            }
        }
        Ok(())
    }
}

/// Outputs of a decode step that go into kept inputs rather than back to the caller ([`Backend::run_writing`]):
/// each `(output, kept input)` pair writes the new token's keys or values [N, width] into slot `slot` of the
/// cache [N, capacity, width], as [`KeptEdit::WriteSlot`] does.
#[derive(Clone, Copy, Debug)]
pub struct SlotWrites<'a> {
    pub pairs: &'a [(String, String)],
    pub capacity: usize,
    pub slot: usize,
    pub width: usize,
}

impl SlotWrites<'_> {
    /// The edit that writes `new` (one pair's output) into its cache.
    pub fn edit<'a>(&self, new: &'a [f32]) -> KeptEdit<'a> {
        KeptEdit::WriteSlot { new, capacity: self.capacity, slot: self.slot, width: self.width }
    }
}

/// What [`Backend::run_writing`] does where the outputs come back to the host: each pair's output is applied to
/// its kept input with [`Backend::edit_kept`] and dropped from `out`; an output whose input `backend` does not
/// keep stays in `out` for the caller to write.
pub(crate) fn write_on_host(
    backend: &mut (impl Backend + ?Sized),
    mut out: BTreeMap<String, HostTensor>,
    writes: &SlotWrites,
) -> Result<BTreeMap<String, HostTensor>> {
    for (output, kept) in writes.pairs {
        let t = out.get(output).with_context(|| format!("{} has no output `{output}`", backend.name()))?;
        if backend.edit_kept(kept, &writes.edit(t.as_f32()?))? {
            out.remove(output);
        }
    }
    Ok(out)
}

/// Checks that `new` values written as rows of `width` into slot `slot` of a [N, capacity, width] cache stay
/// inside its `len` values.
pub(crate) fn check_slot_write(new: usize, capacity: usize, slot: usize, width: usize, len: usize) -> Result<()> {
    let n = new.checked_div(width).unwrap_or(0);
    if width == 0 || !new.is_multiple_of(width) || slot >= capacity || n * capacity * width > len {
        bail!(
            "cannot write {new} values as rows of {width} into slot {slot} of a [{n}, {capacity}, {width}] cache \
             of {len} values"
        );
    }
    Ok(())
}

/// The declared input `name` of the model at `model`, checked against `value`, for [`Backend::keep_input`]; an
/// error naming the model where it has no such input.
pub(crate) fn spec_to_keep<'a>(
    specs: &'a [IoSpec],
    model: &Path,
    name: &str,
    value: &HostTensor,
) -> Result<&'a IoSpec> {
    let spec = specs
        .iter()
        .find(|s| s.name == name)
        .with_context(|| format!("{} has no input `{name}` to keep", model.display()))?;
    spec.check(value)?;
    Ok(spec)
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

    /// Keeps `value` in the backend as the input `name`, for an input that is large and changes a little between
    /// runs (a KV cache): `run` reads it from there when `inputs` has no entry of that name, without converting
    /// or copying it on every run (on a GPU it stays in device memory), and [`Backend::edit_kept`] changes it in
    /// place. Returns the value back where the backend keeps nothing; the caller then passes it to `run` as usual.
    fn keep_input(&mut self, name: &str, value: HostTensor) -> Result<Option<HostTensor>> {
        let _ = name;
        Ok(Some(value))
    }

    /// Applies `edit` to the f32 input `name` kept by [`Backend::keep_input`], where it lies; false where there
    /// is no such kept input.
    fn edit_kept(&mut self, name: &str, edit: &KeptEdit) -> Result<bool> {
        let _ = (name, edit);
        Ok(false)
    }

    /// Runs the graph, then writes each output of `writes` into its kept input where that lies (on a GPU, without
    /// the output leaving the device). Returns the other outputs, and those whose input this backend does not
    /// keep (the caller writes them); an output the graph does not have is an error.
    fn run_writing(
        &mut self,
        inputs: &BTreeMap<String, HostTensor>,
        writes: &SlotWrites,
    ) -> Result<BTreeMap<String, HostTensor>> {
        let out = self.run(inputs)?;
        write_on_host(self, out, writes)
    }

    fn input_names(&self) -> Vec<String> {
        self.inputs().iter().map(|s| s.name.clone()).collect()
    }
    fn output_names(&self) -> Vec<String> {
        self.outputs().iter().map(|s| s.name.clone()).collect()
    }
}

/// One piece of training state: the graph input that reads it and the output that holds its next value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatePair {
    pub input: String,
    pub output: String,
}

/// Pairs each state input of a training-step graph (manifest roles `trainable`, `optimizer_state`) with the
/// output that updates it: `new.<input>`, role `updated_trainable` / `updated_optimizer_state`.
pub fn state_pairs(io: &GraphIo) -> Result<Vec<StatePair>> {
    let mut pairs = Vec::new();
    for input in io.inputs.iter().filter(|r| r.role == "trainable" || r.role == "optimizer_state") {
        let want_role = if input.role == "trainable" { "updated_trainable" } else { "updated_optimizer_state" };
        let output = format!("new.{}", input.name);
        match io.outputs.iter().find(|o| o.name == output) {
            Some(o) if o.role == want_role && o.shape == input.shape && o.dtype == input.dtype => {}
            Some(o) => bail!(
                "{}: output `{output}` ({} {:?}, role {}) does not match the state input `{}` ({} {:?}, role {})",
                io.file,
                o.dtype,
                o.shape,
                o.role,
                input.name,
                input.dtype,
                input.shape,
                input.role
            ),
            None => bail!("{}: the state input `{}` has no output `{output}` that updates it", io.file, input.name),
        }
        pairs.push(StatePair { input: input.name.clone(), output });
    }
    if pairs.is_empty() {
        bail!("{}: no trainable or optimizer-state inputs in the manifest: not a training step", io.file);
    }
    Ok(pairs)
}

/// Runs a training-step graph whose state (trainable tensors and optimizer moments) carries over from one
/// step to the next. Where the state lives between steps is the implementation's business (host memory,
/// or the ONNX Runtime session's device); it reaches the host only through [`StatefulStep::state`].
pub trait StatefulStep: Send {
    /// Short description, e.g. `tract, state on the host` or `ort (cuda:0), state on the device`.
    fn name(&self) -> String;
    /// The state tensors and the outputs that update them.
    fn pairs(&self) -> &[StatePair];
    /// Replaces the whole state: every pair's input, with the dtype and shape the graph declares.
    fn set_state(&mut self, state: &BTreeMap<String, HostTensor>) -> Result<()>;
    /// A host copy of the state, by input name.
    fn state(&self) -> Result<BTreeMap<String, HostTensor>>;
    /// Runs one step on the per-step inputs (batch, hyperparameters; state entries given here are ignored);
    /// the state advances. Returns the outputs that are not state (loss, metrics).
    fn step(&mut self, inputs: &BTreeMap<String, HostTensor>) -> Result<BTreeMap<String, HostTensor>>;
}

/// The plain [`StatefulStep`]: the state lives in host memory and goes in and out of [`Backend::run`] each
/// step (moved, not copied, on this side).
pub struct HostStateStep {
    graph: Box<dyn Backend>,
    pairs: Vec<StatePair>,
    state: BTreeMap<String, HostTensor>,
}

impl HostStateStep {
    /// Checks that the graph has every pair's input and output.
    pub fn new(graph: Box<dyn Backend>, pairs: Vec<StatePair>) -> Result<HostStateStep> {
        check_pairs(&graph.name(), graph.inputs(), graph.outputs(), &pairs)?;
        Ok(HostStateStep { graph, pairs, state: BTreeMap::new() })
    }
}

/// Fails naming the pairs whose input or output the graph lacks.
pub(crate) fn check_pairs(what: &str, inputs: &[IoSpec], outputs: &[IoSpec], pairs: &[StatePair]) -> Result<()> {
    let names = |specs: &[IoSpec]| specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    let (ins, outs) = (names(inputs), names(outputs));
    for p in pairs {
        if !ins.contains(&p.input) {
            bail!("{what}: the graph has no state input `{}` (inputs: {})", p.input, ins.join(", "));
        }
        if !outs.contains(&p.output) {
            bail!("{what}: the graph has no state output `{}` (outputs: {})", p.output, outs.join(", "));
        }
    }
    Ok(())
}

/// Checks a full state against the pairs and the graph's declarations; returns the specs in pair order.
pub(crate) fn check_state<'a>(
    specs: &'a [IoSpec],
    pairs: &[StatePair],
    state: &BTreeMap<String, HostTensor>,
) -> Result<Vec<&'a IoSpec>> {
    pairs
        .iter()
        .map(|p| {
            let t = state.get(&p.input).with_context(|| {
                format!(
                    "the state lacks `{}` (it has: {})",
                    p.input,
                    state.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
            let spec = specs
                .iter()
                .find(|s| s.name == p.input)
                .with_context(|| format!("the graph has no state input `{}`", p.input))?;
            spec.check(t)?;
            Ok(spec)
        })
        .collect()
}

impl StatefulStep for HostStateStep {
    fn name(&self) -> String {
        format!("{}, state on the host", self.graph.name())
    }

    fn pairs(&self) -> &[StatePair] {
        &self.pairs
    }

    fn set_state(&mut self, state: &BTreeMap<String, HostTensor>) -> Result<()> {
        check_state(self.graph.inputs(), &self.pairs, state)?;
        self.state = self.pairs.iter().map(|p| (p.input.clone(), state[&p.input].clone())).collect();
        Ok(())
    }

    fn state(&self) -> Result<BTreeMap<String, HostTensor>> {
        if self.state.is_empty() {
            bail!("{}: the state was never set", self.graph.name());
        }
        Ok(self.state.clone())
    }

    fn step(&mut self, inputs: &BTreeMap<String, HostTensor>) -> Result<BTreeMap<String, HostTensor>> {
        if self.state.is_empty() {
            bail!("{}: the state was never set", self.graph.name());
        }
        let mut feeds: BTreeMap<String, HostTensor> =
            inputs.iter().filter(|(k, _)| !self.state.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        // Moved in and back out, so a failed step leaves the state as it was.
        let state = std::mem::take(&mut self.state);
        let names: Vec<String> = state.keys().cloned().collect();
        feeds.extend(state);
        let result = self.graph.run(&feeds);
        for n in names {
            let t = feeds.remove(&n).expect("moved in above");
            self.state.insert(n, t);
        }
        let mut out = result?;
        for p in &self.pairs {
            let t =
                out.remove(&p.output).with_context(|| format!("{}: no output `{}`", self.graph.name(), p.output))?;
            self.state.insert(p.input.clone(), t);
        }
        Ok(out)
    }
}

/// Opens a training-step graph as a [`StatefulStep`]: tract keeps the state on the host; ONNX Runtime keeps
/// it on the session's device (IoBinding, ping-pong buffers).
pub fn open_stateful_step(
    model: impl AsRef<Path>,
    kind: BackendKind,
    ort: &OrtOptions,
    pairs: Vec<StatePair>,
) -> Result<Box<dyn StatefulStep>> {
    let model = model.as_ref();
    Ok(match kind {
        BackendKind::Tract => Box::new(HostStateStep::new(Box::new(TractBackend::open(model)?), pairs)?),
        BackendKind::Ort => Box::new(OrtStatefulStep::open(model, ort, pairs)?),
    })
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

/// `PFX_THREADS`: threads for tract's matrix products and ONNX Runtime's intra-op pool (None: each engine's
/// default). A value that is not a number ≥ 1 is reported once and ignored.
pub fn threads_from_env() -> Option<usize> {
    let v = std::env::var("PFX_THREADS").ok()?;
    match v.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Some(n),
        _ => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| eprintln!("warning: PFX_THREADS={v:?} is not a number ≥ 1: ignored"));
            None
        }
    }
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
