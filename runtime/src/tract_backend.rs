//! tract backend: pure Rust, CPU. The model is parsed once; for every distinct input signature
//! (dtypes + concrete shapes) the inputs' facts are fixed, the model is optimized and a plan is cached.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::internal::DimLike;

use crate::backend::{select_inputs, spec_to_keep, Backend, IoSpec, KeptEdit};
use crate::tensor::{DType, HostTensor, TensorData};

type Plan = Arc<TypedRunnableModel>;
type Signature = Vec<(DType, Vec<usize>)>;

/// Runs one ONNX model on tract.
pub struct TractBackend {
    path: PathBuf,
    /// The parsed model, kept only until the first plan is built: its weights are unpacked copies that the
    /// optimized plan no longer reads (~340 MB for GPT-2 small). A later input signature reparses the file.
    model: Option<InferenceModel>,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
    plans: HashMap<Signature, Plan>,
    /// Inputs kept between runs (`Backend::keep_input`), as the tensors tract reads.
    kept: HashMap<String, (DType, Arc<Tensor>)>,
}

impl std::fmt::Debug for TractBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractBackend")
            .field("path", &self.path)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("cached_plans", &self.plans.len())
            .finish()
    }
}

fn dtype_of(dt: DatumType) -> Option<DType> {
    Some(match dt {
        DatumType::F32 => DType::F32,
        DatumType::F64 => DType::F64,
        DatumType::F16 => DType::F16,
        DatumType::I64 => DType::I64,
        DatumType::I32 => DType::I32,
        DatumType::I8 => DType::I8,
        DatumType::U8 => DType::U8,
        DatumType::Bool => DType::Bool,
        _ => return None,
    })
}

fn datum_of(dt: DType) -> DatumType {
    match dt {
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        DType::F16 => DatumType::F16,
        DType::I64 => DatumType::I64,
        DType::I32 => DatumType::I32,
        DType::I8 => DatumType::I8,
        DType::U8 => DatumType::U8,
        DType::Bool => DatumType::Bool,
    }
}

fn spec_of(name: String, fact: &InferenceFact) -> IoSpec {
    let dtype = fact.datum_type.concretize().and_then(dtype_of);
    let shape = if fact.shape.is_open() {
        None
    } else {
        Some(fact.shape.dims().map(|d| d.concretize().and_then(|d| d.to_usize().ok())).collect())
    };
    IoSpec { name, dtype, shape }
}

/// Converts a host tensor to a tract tensor (copies).
pub fn to_tract(t: &HostTensor) -> Result<Tensor> {
    let shape = t.shape();
    Ok(match t.data() {
        TensorData::F32(v) => Tensor::from_shape(shape, v)?,
        TensorData::F64(v) => Tensor::from_shape(shape, v)?,
        TensorData::F16(v) => {
            let v: Vec<f16> = v.iter().map(|&b| f16::from_bits(b)).collect();
            Tensor::from_shape(shape, &v)?
        }
        TensorData::I64(v) => Tensor::from_shape(shape, v)?,
        TensorData::I32(v) => Tensor::from_shape(shape, v)?,
        TensorData::I8(v) => Tensor::from_shape(shape, v)?,
        TensorData::U8(v) => Tensor::from_shape(shape, v)?,
        TensorData::Bool(v) => Tensor::from_shape(shape, v)?,
    })
}

/// Converts a tract tensor to a host tensor (copies). Shape-valued (TDim) tensors become int64.
pub fn from_tract(t: Tensor) -> Result<HostTensor> {
    let t = if t.datum_type() == DatumType::TDim { t.cast_to_dt(DatumType::I64)?.into_owned() } else { t };
    let dt = t.datum_type();
    let t = t.into_plain_ram()?;
    let shape = t.shape().to_vec();
    let view = t.try_as_plain_ram()?;
    let data = match dt {
        DatumType::F32 => TensorData::F32(view.as_slice::<f32>()?.to_vec()),
        DatumType::F64 => TensorData::F64(view.as_slice::<f64>()?.to_vec()),
        DatumType::F16 => TensorData::F16(view.as_slice::<f16>()?.iter().map(|x| x.to_bits()).collect()),
        DatumType::I64 => TensorData::I64(view.as_slice::<i64>()?.to_vec()),
        DatumType::I32 => TensorData::I32(view.as_slice::<i32>()?.to_vec()),
        DatumType::I8 => TensorData::I8(view.as_slice::<i8>()?.to_vec()),
        DatumType::U8 => TensorData::U8(view.as_slice::<u8>()?.to_vec()),
        DatumType::Bool => TensorData::Bool(view.as_slice::<bool>()?.to_vec()),
        other => bail!("tract produced a {other:?} tensor, which HostTensor cannot hold"),
    };
    HostTensor::new(shape, data)
}

/// Parses an ONNX model with tract, from an absolute path so that external data resolves next to the model
/// whatever the working directory; returns the model and that path.
fn parse(path: &Path) -> Result<(InferenceModel, PathBuf)> {
    let abs = std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let model = tract_onnx::onnx()
        .model_for_path(&abs)
        .with_context(|| format!("tract could not load ONNX model {}", path.display()))?;
    Ok((model, abs))
}

impl TractBackend {
    /// Parses an ONNX model. External data is resolved relative to the model's folder.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        init_process();
        let path = path.as_ref();
        if !path.is_file() {
            bail!("model file {} does not exist or is not a file", path.display());
        }
        let (model, abs) = parse(path)?;
        let inputs = model
            .input_outlets()?
            .iter()
            .map(|o| Ok(spec_of(model.node(o.node).name.clone(), model.outlet_fact(*o)?)))
            .collect::<Result<Vec<_>>>()?;
        // Output names as the file declares them: tract labels an outlet once, so two outputs that are the
        // same value (e.g. two gradients that fold to one constant) would otherwise share a name.
        let declared = pfx_compiler::onnx_io::output_names(&abs).unwrap_or_default();
        let outputs = model
            .output_outlets()?
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let name = declared.get(i).cloned().unwrap_or_else(|| {
                    model.outlet_label(*o).map(str::to_string).unwrap_or_else(|| model.node(o.node).name.clone())
                });
                Ok(spec_of(name, model.outlet_fact(*o)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TractBackend {
            path: path.to_path_buf(),
            model: Some(model),
            inputs,
            outputs,
            plans: HashMap::new(),
            kept: HashMap::new(),
        })
    }

    /// Number of optimized plans cached (one per distinct input signature seen).
    pub fn cached_plans(&self) -> usize {
        self.plans.len()
    }

    fn plan_for(&mut self, sig: &Signature) -> Result<Plan> {
        if let Some(p) = self.plans.get(sig) {
            return Ok(p.clone());
        }
        let mut model = match self.model.take() {
            Some(m) => m,
            None => parse(&self.path)?.0,
        };
        for (ix, (dt, shape)) in sig.iter().enumerate() {
            model.set_input_fact(ix, InferenceFact::dt_shape(datum_of(*dt), shape.as_slice()))?;
        }
        let describe = || {
            let s: Vec<String> =
                self.inputs.iter().zip(sig).map(|(i, (dt, sh))| format!("{}: {dt} {sh:?}", i.name)).collect();
            format!("tract could not prepare {} for inputs {}", self.path.display(), s.join(", "))
        };
        let plan = optimize(model).and_then(|m| m.into_runnable()).with_context(describe)?;
        // The parsed model's weights are freed by now; their pages go back (they would stay in the heap).
        crate::alloc::return_freed_memory();
        self.plans.insert(sig.clone(), plan.clone());
        Ok(plan)
    }
}

/// pfx's rewrites of tract's typed model, applied by [`optimize_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrites {
    /// Each AdamW update as one op (`tract_adamw`); `PFX_TRACT_ADAMW=graph` turns it off.
    pub fuse_adamw: bool,
    /// Batched matrix-vector products (decode attention) without packing (`tract_gemv`); `PFX_TRACT_GEMV=tract`
    /// turns it off.
    pub batched_gemv: bool,
    /// Weight products of at most 8 rows (decode) on packed-panel kernels (`tract_skinny`);
    /// `PFX_TRACT_SKINNY=tract` turns it off.
    pub skinny_products: bool,
    /// Products contracted over more than 8192 (the LM head's gradient) as sums of products over pieces
    /// (`tract_split`); `PFX_TRACT_SPLIT=off` turns it off.
    pub split_long_contractions: bool,
}

impl Rewrites {
    pub const ALL: Rewrites =
        Rewrites { fuse_adamw: true, batched_gemv: true, skinny_products: true, split_long_contractions: true };

    /// All of them, less those the environment turns off.
    pub fn from_env() -> Rewrites {
        let var = |key: &str| std::env::var(key).ok();
        Rewrites {
            fuse_adamw: var("PFX_TRACT_ADAMW").as_deref() != Some("graph"),
            batched_gemv: var("PFX_TRACT_GEMV").as_deref() != Some("tract"),
            skinny_products: var("PFX_TRACT_SKINNY").as_deref() != Some("tract"),
            split_long_contractions: var("PFX_TRACT_SPLIT").as_deref() != Some("off"),
        }
    }
}

/// tract's optimized model, as `pfxrun` runs it: typed, weights stored in f16 widened once, large shared
/// weights split per reader, pfx's rewrites
/// (as the environment allows: [`Rewrites::from_env`]), optimized.
pub fn optimize(model: InferenceModel) -> TractResult<TypedModel> {
    optimize_with(model, Rewrites::from_env())
}

/// [`optimize`], with the rewrites chosen by the caller.
pub fn optimize_with(model: InferenceModel, rewrites: Rewrites) -> TractResult<TypedModel> {
    let mut typed = model.into_typed()?;
    widen_stored_weights(&mut typed)?;
    split_shared_weights(&mut typed)?;
    if rewrites.fuse_adamw {
        crate::tract_adamw::fuse_adamw(&mut typed)?;
    }
    // The products are matched once tract has folded transposes and split concatenations into them.
    typed.declutter()?;
    if rewrites.batched_gemv {
        crate::tract_gemv::use_batched_gemv(&mut typed)?;
    }
    if rewrites.skinny_products {
        crate::tract_skinny::use_skinny_products(&mut typed)?;
    }
    if rewrites.split_long_contractions {
        crate::tract_split::split_long_contractions(&mut typed)?;
    }
    typed.optimize()?;
    Ok(typed)
}

/// The ONNX model at `path` optimized for the given input values (by input name), with those values in the
/// model's input order and its output names: what benches and tests need to run a graph as pfxrun plans it.
pub fn optimized_for_inputs(
    path: &Path,
    given: &BTreeMap<String, HostTensor>,
    rewrites: Rewrites,
) -> Result<(TypedModel, TVec<TValue>, Vec<String>)> {
    init_process();
    let (mut model, _) = parse(path)?;
    let mut values: TVec<TValue> = tvec!();
    for (ix, o) in model.input_outlets()?.to_vec().iter().enumerate() {
        let name = model.node(o.node).name.clone();
        let t = to_tract(given.get(&name).ok_or_else(|| anyhow!("{}: no value for input {name}", path.display()))?)?;
        model.set_input_fact(ix, InferenceFact::dt_shape(t.datum_type(), t.shape()))?;
        values.push(t.into_tvalue());
    }
    let names = model
        .output_outlets()?
        .iter()
        .map(|o| model.outlet_label(*o).map(str::to_string).unwrap_or_else(|| model.node(o.node).name.clone()))
        .collect();
    let typed =
        optimize_with(model, rewrites).with_context(|| format!("tract could not prepare {}", path.display()))?;
    Ok((typed, values, names))
}

/// Each `Cast` of a float constant to another float type (a weight stored in f16 by `pfxc compile --weights f16`)
/// becomes the widened constant. tract keeps such a Cast in the plan and would widen every weight on every run;
/// once it is a constant, the products pack it as they pack any weight (and the few-row products pack it back
/// in f16, as every value is one).
fn widen_stored_weights(model: &mut TypedModel) -> TractResult<()> {
    use tract_onnx::tract_core::ops::{cast::Cast, konst::Const};
    let casts: Vec<(usize, Arc<Tensor>, DatumType)> = model
        .nodes
        .iter()
        .filter_map(|n| {
            let to = n.op_as::<Cast>()?.to;
            let input = model.node(n.inputs.first()?.node);
            let value = input.op_as::<Const>()?.val().clone();
            (value.datum_type().is_float() && to.is_float()).then_some((n.id, value, to))
        })
        .collect();
    for (id, value, to) in casts {
        let node = model.node(id);
        let wide = widen(&value, to)?;
        let mut patch = TypedModelPatch::default();
        let konst = patch.add_const(format!("{}.value", node.name), wide)?;
        patch.shunt_outside(model, OutletId::new(id, 0), konst)?;
        patch.apply(model)?;
    }
    Ok(())
}

/// `value` as `to`: f16 to f32 in blocks (on F16C where the CPU has it; tract converts value by value).
fn widen(value: &Tensor, to: DatumType) -> TractResult<Tensor> {
    use half::slice::HalfFloatSliceExt;
    if value.datum_type() != f16::datum_type() || to != f32::datum_type() {
        return Ok(value.cast_to_dt(to)?.into_owned());
    }
    let view = value.try_as_plain_ram()?;
    let halves = view.as_slice::<f16>()?;
    let mut wide = vec![0f32; halves.len()];
    halves.convert_to_f32_slice(&mut wide);
    // Moved into the tensor, not copied: the LM head's weight alone is 154 MB.
    Ok(tract_ndarray::ArrayD::from_shape_vec(value.shape(), wide)?.into_tensor())
}

/// Gives every reader of a large constant its own `Const` node (sharing the same tensor).
///
/// tract packs a matrix product's constant operand once, at optimization, only when that constant has a single
/// reader or is under 4 MiB (it will not duplicate a large weight per reader). A training graph reads its tied
/// embedding three times (lookup, LM head, the LM head's backward), so without this tract re-packs the 154 MB
/// GPT-2 embedding on every step (~0.1 s of a 2 s step). Split, each product folds its own packed copy and the
/// unpacked tensor is freed once nothing reads it.
fn split_shared_weights(model: &mut TypedModel) -> TractResult<()> {
    // tract's CONST_FOLD_MEM_BUDGET: anything up to this size is folded whatever its readers.
    const BUDGET: usize = 4 << 20;
    let shared: Vec<(usize, Arc<Tensor>)> = model
        .nodes
        .iter()
        .filter(|n| n.outputs.len() == 1 && n.outputs[0].successors.len() > 1)
        .filter_map(|n| n.op_as::<tract_onnx::tract_core::ops::konst::Const>().map(|c| (n.id, c.val().clone())))
        .filter(|(_, v)| v.volume() * v.datum_type().size_of() > BUDGET)
        .collect();
    for (id, value) in shared {
        let readers: Vec<InletId> = model.nodes[id].outputs[0].successors.iter().skip(1).cloned().collect();
        for (k, inlet) in readers.into_iter().enumerate() {
            let name = format!("{}.reader{}", model.nodes[id].name, k + 1);
            let fact = model.nodes[id].outputs[0].fact.clone();
            let op = tract_onnx::tract_core::ops::konst::Const::new(value.clone())?;
            let copy = model.add_node(name, op, tvec!(fact))?;
            model.add_edge(OutletId::new(copy, 0), inlet)?;
        }
    }
    Ok(())
}

impl Backend for TractBackend {
    fn name(&self) -> String {
        "tract".to_string()
    }

    fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }

    fn run(&mut self, inputs: &BTreeMap<String, HostTensor>) -> Result<BTreeMap<String, HostTensor>> {
        // Inputs the caller must give: all but those kept here (a kept one given anyway is the caller's).
        let needed: Vec<IoSpec> = self.inputs.iter().filter(|s| !self.kept.contains_key(&s.name)).cloned().collect();
        select_inputs(&needed, inputs).with_context(|| format!("running {}", self.path.display()))?;
        let mut sig: Signature = Vec::with_capacity(self.inputs.len());
        let mut values: TVec<TValue> = tvec!();
        for spec in &self.inputs {
            match (inputs.get(&spec.name), self.kept.get(&spec.name)) {
                (Some(t), kept) => {
                    if kept.is_some() {
                        spec.check(t)?; // select_inputs checked the others
                    }
                    sig.push((t.dtype(), t.shape().to_vec()));
                    values.push(to_tract(t)?.into_tvalue());
                }
                // A kept input goes in as a shared reference: no copy.
                (None, Some((dtype, t))) => {
                    sig.push((*dtype, t.shape().to_vec()));
                    values.push(t.clone().into_tvalue());
                }
                (None, None) => unreachable!("select_inputs checked that `{}` is given", spec.name),
            }
        }
        let plan = self.plan_for(&sig)?;
        let outs = without_panics(|| plan.run(values))
            .with_context(|| format!("tract failed running {}", self.path.display()))?;
        if outs.len() != self.outputs.len() {
            bail!("tract returned {} outputs, the model declares {}", outs.len(), self.outputs.len());
        }
        self.outputs
            .iter()
            .zip(outs)
            .map(|(spec, v)| {
                let t = from_tract(v.into_tensor()).with_context(|| format!("output `{}`", spec.name))?;
                Ok((spec.name.clone(), t))
            })
            .collect()
    }

    fn keep_input(&mut self, name: &str, value: HostTensor) -> Result<Option<HostTensor>> {
        spec_to_keep(&self.inputs, &self.path, name, &value)?;
        self.kept.insert(name.to_string(), (value.dtype(), Arc::new(to_tract(&value)?)));
        Ok(None)
    }

    fn edit_kept(&mut self, name: &str, edit: &KeptEdit) -> Result<bool> {
        let Some((_, t)) = self.kept.get_mut(name) else { return Ok(false) };
        // Unshared once the last run is over (tract drops its inputs); otherwise this copies.
        let t = Arc::make_mut(t);
        let mut view = t.try_as_plain_ram_mut()?;
        edit.apply(view.as_slice_mut::<f32>().with_context(|| format!("kept input `{name}` is not f32"))?)?;
        Ok(true)
    }
}

/// Process set-up for tract, once: matrix products on every core (or `PFX_THREADS`; tract uses one thread unless
/// told otherwise), large freed blocks kept for the next step (`crate::alloc`), and the measured kernel choice
/// checked and linked in (`crate::tract_kernels`).
pub fn init_process() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        crate::alloc::keep_freed_memory();
        crate::tract_kernels::measured_rule_active();
        let n = crate::backend::threads_from_env()
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        if n > 1 {
            tract_linalg::multithread::set_default_executor(tract_linalg::multithread::Executor::multithread(n));
        }
    });
}

/// Threads of the pool tract's matrix products run on (`PFX_THREADS`; 1 where tract runs single-threaded): pfx's
/// own ops split their work over the same threads.
pub(crate) fn product_threads() -> usize {
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) => pool.current_num_threads(),
        _ => 1,
    }
}

thread_local! {
    /// Set while [`without_panics`] runs: the panic hook keeps the message here instead of printing it.
    static CAUGHT: std::cell::RefCell<Option<Option<String>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (tract's part of a call) so that a panic inside it becomes an error. tract checks some inputs with
/// a panic: a Gather index past its table (a token id past the vocabulary, more tokens than positions).
fn without_panics<T>(f: impl FnOnce() -> TractResult<T>) -> Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let kept = CAUGHT.with(|c| match c.borrow_mut().as_mut() {
                Some(slot) => {
                    let payload = info.payload();
                    let what = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    let place = info.location().map(|l| format!(", {}:{}", l.file(), l.line())).unwrap_or_default();
                    *slot = Some(format!("{what}{place}"));
                    true
                }
                None => false,
            });
            if !kept {
                default(info);
            }
        }));
    });
    CAUGHT.with(|c| *c.borrow_mut() = Some(None));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let message = CAUGHT.with(|c| c.borrow_mut().take()).flatten();
    match result {
        Ok(r) => r,
        Err(_) => bail!(
            "tract stopped on an input outside what the graph accepts ({}); check that token ids are within the \
             vocabulary and lengths within the model's positions",
            message.unwrap_or_else(|| "no message".into())
        ),
    }
}

/// Runs the jobs on the pool tract's matrix products run on and the calling thread, all at once, and returns when
/// all are done; in turn on the calling thread where tract runs single-threaded or there is one job.
pub(crate) fn run_on_product_pool<'a>(jobs: Vec<Box<dyn FnOnce() + Send + 'a>>) {
    match tract_linalg::multithread::current_tract_executor() {
        // The calling thread runs the first job itself: it is awake already, and one worker fewer has to wake
        // (decode's few-row products: 22.3 → 18.8 ms per B=8 step, medians of 5 runs; training unchanged).
        tract_linalg::multithread::Executor::MultiThread(pool) if jobs.len() > 1 => {
            let mut jobs = jobs.into_iter();
            let first = jobs.next().expect("more than one job");
            pool.in_place_scope(|s| {
                for job in jobs {
                    s.spawn(move |_| job());
                }
                first();
            })
        }
        _ => jobs.into_iter().for_each(|job| job()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::cast::Cast;
    use tract_onnx::tract_core::ops::einsum::EinSum;

    /// A weight stored in f16 whose f32 form is over tract's 4 MiB folding budget stays a Cast in tract's plan
    /// (it would widen the weight on every run); widened first, the plan holds the f32 constant.
    #[test]
    fn large_f16_weights_are_widened_once_before_planning() {
        let (k, n) = (1100, 1024); // 4.5 MB in f32
        let values: Vec<half::f16> = (0..k * n).map(|i| half::f16::from_f32(((i % 97) as f32 - 48.0) / 64.0)).collect();
        let build = |widen: bool| {
            let mut m = TypedModel::default();
            let x = m.add_source("x", f32::fact([1, k])).unwrap();
            let w = m.add_const("w", Tensor::from_shape(&[k, n], &values).unwrap()).unwrap();
            let w = m.wire_node("w.to_f32", Cast::new(f32::datum_type()), &[w]).unwrap()[0];
            let expr = "mk,kn->mn".parse().unwrap();
            let y = m.wire_node("product", EinSum::new(expr, f32::datum_type()), &[x, w]).unwrap();
            m.select_output_outlets(&y).unwrap();
            if widen {
                widen_stored_weights(&mut m).unwrap();
            }
            m.into_optimized().unwrap()
        };
        let casts = |m: &TypedModel| m.nodes.iter().filter(|n| n.op_is::<Cast>()).count();
        assert_eq!(casts(&build(false)), 1, "tract alone keeps the Cast (else this test shows nothing)");
        let widened = build(true);
        assert_eq!(casts(&widened), 0);
        let x: Vec<f32> = (0..k).map(|i| (i % 7) as f32 / 8.0).collect();
        let out = widened.into_runnable().unwrap().run(tvec![Tensor::from_shape(&[1, k], &x).unwrap().into()]).unwrap();
        let got = out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        for j in [0, 1, n / 2, n - 1] {
            let want: f64 = (0..k).map(|i| x[i] as f64 * values[i * n + j].to_f64()).sum();
            assert!((got[j] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "column {j}: {} vs {want}", got[j]);
        }
    }
}
