//! ONNX Runtime backend through `ort` with `load-dynamic`.
//!
//! The shared library is located (see [`locate_ort_library`]) and loaded once per process with
//! `ort::init_from`, which reports errors (the lazy `ORT_DYLIB_PATH` path of `ort` panics instead).
//! A later request for a different library in the same process is an error.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, CStr};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue, SessionInputs};
use ort::value::{Tensor, TensorElementType, TensorRef, ValueRef, ValueType};

use crate::backend::{select_inputs, Backend, IoSpec};
use crate::tensor::{DType, HostTensor, TensorData};

/// What to tell a user who has no ONNX Runtime library.
pub const ORT_INSTALL_HINT: &str =
    "install it with `pip install onnxruntime` (or `onnxruntime-gpu` for CUDA/TensorRT) \
so that `python3 -c \"import onnxruntime\"` works, or pass `--ort-lib /path/to/libonnxruntime.so` \
(or set ORT_DYLIB_PATH)";

/// Env var naming the Python interpreter used to find the `onnxruntime` package (default `python3`).
pub const PYTHON_ENV: &str = "PFX_PYTHON";

// ---------------------------------------------------------------------------------------------
// Device selection

/// Where ONNX Runtime runs a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum OrtDevice {
    #[default]
    Cpu,
    /// CUDA execution provider on the given device.
    Cuda(u32),
    /// TensorRT execution provider on the given device (CUDA registered after it for the nodes TensorRT
    /// does not take).
    TensorRt(u32),
}

impl OrtDevice {
    /// The execution providers this device needs, in registration order.
    pub fn provider_names(self) -> &'static [&'static str] {
        match self {
            OrtDevice::Cpu => &["CPUExecutionProvider"],
            OrtDevice::Cuda(_) => &["CUDAExecutionProvider"],
            OrtDevice::TensorRt(_) => &["TensorrtExecutionProvider", "CUDAExecutionProvider"],
        }
    }
}

impl fmt::Display for OrtDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrtDevice::Cpu => write!(f, "cpu"),
            OrtDevice::Cuda(n) => write!(f, "cuda:{n}"),
            OrtDevice::TensorRt(n) => write!(f, "tensorrt:{n}"),
        }
    }
}

impl FromStr for OrtDevice {
    type Err = anyhow::Error;
    /// `cpu`, `cuda`, `cuda:N`, `tensorrt`, `tensorrt:N` (also `trt[:N]`), case-insensitive.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || anyhow!("invalid device `{s}`: expected `cpu`, `cuda`, `cuda:N`, `tensorrt` or `tensorrt:N`");
        let lower = s.trim().to_ascii_lowercase();
        let (kind, index) = match lower.split_once(':') {
            Some((k, i)) => (k, Some(i.parse::<u32>().map_err(|_| bad())?)),
            None => (lower.as_str(), None),
        };
        match kind {
            "cpu" if index.is_none() => Ok(OrtDevice::Cpu),
            "cuda" | "gpu" => Ok(OrtDevice::Cuda(index.unwrap_or(0))),
            "tensorrt" | "trt" => Ok(OrtDevice::TensorRt(index.unwrap_or(0))),
            _ => Err(bad()),
        }
    }
}

/// Options for the ONNX Runtime backend.
#[derive(Clone, Debug, Default)]
pub struct OrtOptions {
    /// Explicit library path (`--ort-lib`): a file, or a folder holding `libonnxruntime.so*`.
    pub lib_path: Option<PathBuf>,
    pub device: OrtDevice,
    /// Intra-op threads; `None` lets ONNX Runtime decide.
    pub intra_threads: Option<usize>,
    /// Turn ONNX Runtime's graph optimizations off (they are all on by default).
    pub disable_optimizations: bool,
}

// ---------------------------------------------------------------------------------------------
// Locating and loading the library

/// How the library was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrtLibSource {
    /// `--ort-lib` / [`OrtOptions::lib_path`].
    Explicit,
    /// The `ORT_DYLIB_PATH` environment variable.
    EnvVar,
    /// The `onnxruntime` Python package's `capi` folder.
    Python,
}

impl fmt::Display for OrtLibSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OrtLibSource::Explicit => "--ort-lib",
            OrtLibSource::EnvVar => "ORT_DYLIB_PATH",
            OrtLibSource::Python => "python onnxruntime package",
        })
    }
}

fn is_ort_lib_name(name: &str) -> bool {
    (name.starts_with("libonnxruntime.so") || (name.starts_with("libonnxruntime.") && name.ends_with(".dylib")))
        || name.eq_ignore_ascii_case("onnxruntime.dll")
}

/// Finds the main ONNX Runtime library in a folder (not the `providers_*` plugins); prefers the
/// most specific name (`libonnxruntime.so.1.32.0` over `libonnxruntime.so`).
fn find_lib_in_dir(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(is_ort_lib_name))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.into_iter().next()
}

fn resolve_given(path: &Path, what: &str) -> Result<PathBuf> {
    if path.is_dir() {
        return find_lib_in_dir(path)
            .or_else(|| find_lib_in_dir(&path.join("capi")))
            .or_else(|| find_lib_in_dir(&path.join("lib")))
            .with_context(|| format!("{what} {} is a folder without a libonnxruntime library", path.display()));
    }
    if !path.is_file() {
        bail!("{what} {} does not exist", path.display());
    }
    Ok(path.to_path_buf())
}

fn python_ort_dir() -> Result<PathBuf> {
    let python = std::env::var(PYTHON_ENV).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "python3".to_string());
    let out = std::process::Command::new(&python)
        .args(["-c", "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))"])
        .output()
        .with_context(|| format!("could not run `{python}`"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().filter(|l| !l.trim().is_empty()).last().unwrap_or("").trim().to_string();
        bail!("`{python} -c \"import onnxruntime\"` failed: {last}");
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(dir))
}

/// Finds the ONNX Runtime shared library: `explicit` (a file or a folder), then `ORT_DYLIB_PATH`, then
/// the `capi/` folder of the `onnxruntime` Python package (`python3`, or `$PFX_PYTHON`). A given but
/// wrong path is an error, not a reason to look further.
pub fn locate_ort_library(explicit: Option<&Path>) -> Result<(PathBuf, OrtLibSource)> {
    if let Some(p) = explicit {
        return Ok((resolve_given(p, "--ort-lib")?, OrtLibSource::Explicit));
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|s| !s.is_empty()) {
        return Ok((resolve_given(Path::new(&p), "ORT_DYLIB_PATH")?, OrtLibSource::EnvVar));
    }
    let why = match python_ort_dir() {
        Ok(dir) => match find_lib_in_dir(&dir.join("capi")) {
            Some(p) => return Ok((p, OrtLibSource::Python)),
            None => format!("the onnxruntime package at {} has no capi/libonnxruntime.so*", dir.display()),
        },
        Err(e) => format!("{e:#}"),
    };
    bail!("ONNX Runtime library not found: no --ort-lib, ORT_DYLIB_PATH is not set, and {why}; {ORT_INSTALL_HINT}")
}

/// Reads the version string from a library without initialising `ort` (so that a library too old
/// for the API we use is a clear error, not a crash).
fn library_version(path: &Path) -> Result<String> {
    unsafe {
        let lib = libloading::Library::new(path)
            .with_context(|| format!("could not load ONNX Runtime library {}", path.display()))?;
        let get: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> = lib
            .get(b"OrtGetApiBase")
            .with_context(|| format!("{} is not an ONNX Runtime library (no OrtGetApiBase)", path.display()))?;
        let base = get();
        if base.is_null() {
            bail!("{}: OrtGetApiBase returned null", path.display());
        }
        let v = ((*base).GetVersionString)();
        if v.is_null() {
            bail!("{}: GetVersionString returned null", path.display());
        }
        Ok(CStr::from_ptr(v).to_string_lossy().into_owned())
    }
}

/// The ONNX Runtime library loaded in this process.
pub struct OrtRuntime {
    /// Canonical path of the library.
    pub lib_path: PathBuf,
    pub source: OrtLibSource,
    /// e.g. `1.32.0`.
    pub version: String,
    /// Execution providers this build of the library has (compiled in; not a guarantee that a device works).
    pub providers: Vec<String>,
    /// ONNX Runtime's build information string.
    pub build_info: String,
    env: ort::environment::Environment,
}

impl fmt::Debug for OrtRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrtRuntime")
            .field("lib_path", &self.lib_path)
            .field("source", &self.source)
            .field("version", &self.version)
            .field("providers", &self.providers)
            .finish()
    }
}

impl OrtRuntime {
    /// Multi-line human-readable summary: library, how it was found, version, providers.
    pub fn describe(&self) -> String {
        format!(
            "ONNX Runtime {}\n  library:   {}\n  found via: {}\n  providers: {}\n  needs:     ONNX Runtime >= 1.{} (API version of this build)\n  build:     {}",
            self.version,
            self.lib_path.display(),
            self.source,
            self.providers.join(", "),
            ort::MINOR_VERSION,
            self.build_info
        )
    }

    pub fn has_provider(&self, name: &str) -> bool {
        self.providers.iter().any(|p| p == name)
    }
}

static ORT_RUNTIME: OnceLock<OrtRuntime> = OnceLock::new();
static ORT_INIT_LOCK: Mutex<()> = Mutex::new(());

/// The already-loaded runtime, if any (never loads anything).
pub fn ort_runtime_if_loaded() -> Option<&'static OrtRuntime> {
    ORT_RUNTIME.get()
}

/// Loads ONNX Runtime once per process and returns it. Later calls return the same runtime; a later
/// call that names a different library (explicitly or through `ORT_DYLIB_PATH`) is an error.
pub fn ort_runtime(explicit: Option<&Path>) -> Result<&'static OrtRuntime> {
    let _guard = ORT_INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rt) = ORT_RUNTIME.get() {
        let requested = match explicit {
            Some(p) => Some((resolve_given(p, "--ort-lib")?, "--ort-lib")),
            None => match std::env::var_os("ORT_DYLIB_PATH").filter(|s| !s.is_empty()) {
                Some(p) => Some((resolve_given(Path::new(&p), "ORT_DYLIB_PATH")?, "ORT_DYLIB_PATH")),
                None => None,
            },
        };
        if let Some((p, what)) = requested {
            let canon = std::fs::canonicalize(&p).unwrap_or(p);
            if canon != rt.lib_path {
                bail!(
                    "ONNX Runtime is already loaded from {} in this process; cannot also load {} (from {what}): one library per process",
                    rt.lib_path.display(),
                    canon.display()
                );
            }
        }
        return Ok(rt);
    }
    let (path, source) = locate_ort_library(explicit)?;
    let lib_path = std::fs::canonicalize(&path).with_context(|| format!("resolving {}", path.display()))?;
    let version = library_version(&lib_path)?;
    let minor = version.split('.').nth(1).and_then(|m| m.parse::<u32>().ok());
    match minor {
        Some(m) if version.starts_with("1.") && m >= ort::MINOR_VERSION => {}
        _ => bail!(
            "ONNX Runtime {version} at {} is too old or unrecognised: this build needs >= 1.{}; {ORT_INSTALL_HINT}",
            lib_path.display(),
            ort::MINOR_VERSION
        ),
    }
    let builder = ort::init_from(&lib_path)
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("loading ONNX Runtime from {}", lib_path.display()))?;
    let env = builder
        .with_name("pfx")
        .build()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("creating the ONNX Runtime environment ({})", lib_path.display()))?;
    let providers = available_providers()?;
    let build_info = ort::info().to_string();
    let rt = OrtRuntime { lib_path, source, version, providers, build_info, env };
    let _ = ORT_RUNTIME.set(rt);
    Ok(ORT_RUNTIME.get().expect("just set"))
}

/// Loads ONNX Runtime (if not yet) and describes it.
pub fn describe(explicit: Option<&Path>) -> Result<String> {
    Ok(ort_runtime(explicit)?.describe())
}

fn available_providers() -> Result<Vec<String>> {
    let api = ort::api();
    let mut list: *mut *mut c_char = std::ptr::null_mut();
    let mut n: c_int = 0;
    unsafe {
        let status = (api.GetAvailableProviders)(&mut list, &mut n);
        if !status.0.is_null() {
            let msg = CStr::from_ptr((api.GetErrorMessage)(status.0)).to_string_lossy().into_owned();
            (api.ReleaseStatus)(status.0);
            bail!("GetAvailableProviders failed: {msg}");
        }
        if list.is_null() {
            return Ok(vec![]);
        }
        let names = (0..n as isize).map(|i| CStr::from_ptr(*list.offset(i)).to_string_lossy().into_owned()).collect();
        let status = (api.ReleaseAvailableProviders)(list, n);
        if !status.0.is_null() {
            (api.ReleaseStatus)(status.0);
        }
        Ok(names)
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions

fn dtype_of(ty: TensorElementType) -> Option<DType> {
    Some(match ty {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float64 => DType::F64,
        TensorElementType::Float16 => DType::F16,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Int8 => DType::I8,
        TensorElementType::Uint8 => DType::U8,
        TensorElementType::Bool => DType::Bool,
        _ => return None,
    })
}

fn spec_of(name: &str, ty: &ValueType) -> IoSpec {
    match ty {
        ValueType::Tensor { ty, shape, .. } => IoSpec {
            name: name.to_string(),
            dtype: dtype_of(*ty),
            shape: Some(shape.iter().map(|&d| if d >= 0 { Some(d as usize) } else { None }).collect()),
        },
        _ => IoSpec { name: name.to_string(), dtype: None, shape: None },
    }
}

fn ort_err<R>(e: ort::Error<R>) -> anyhow::Error {
    anyhow!("{e}")
}

/// Runs one ONNX model on ONNX Runtime.
pub struct OrtBackend {
    path: PathBuf,
    device: OrtDevice,
    session: Session,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
}

impl fmt::Debug for OrtBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrtBackend")
            .field("path", &self.path)
            .field("device", &self.device)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl OrtBackend {
    /// Loads ONNX Runtime if needed and creates a session for `model` on `options.device`. A GPU device
    /// whose provider is missing or fails to register is an error (no silent CPU fallback).
    pub fn open(model: impl AsRef<Path>, options: &OrtOptions) -> Result<Self> {
        let model = model.as_ref();
        if !model.is_file() {
            bail!("model file {} does not exist or is not a file", model.display());
        }
        let rt = ort_runtime(options.lib_path.as_deref())?;
        for p in options.device.provider_names() {
            if !rt.has_provider(p) {
                bail!(
                    "device {} needs {p}, which ONNX Runtime {} at {} does not have (available: {}); \
                     install `onnxruntime-gpu` (with matching CUDA/TensorRT libraries) or pass its library with --ort-lib",
                    options.device,
                    rt.version,
                    rt.lib_path.display(),
                    rt.providers.join(", ")
                );
            }
        }
        let mut b = Session::builder(&rt.env).map_err(ort_err)?;
        if options.disable_optimizations {
            b = b.with_optimization_level(GraphOptimizationLevel::Disable).map_err(ort_err)?;
        }
        if let Some(n) = options.intra_threads {
            b = b.with_intra_threads(n).map_err(ort_err)?;
        }
        let eps = match options.device {
            OrtDevice::Cpu => vec![],
            OrtDevice::Cuda(n) => {
                vec![ort::ep::CUDA::default().with_device_id(n as i32).build().error_on_failure()]
            }
            OrtDevice::TensorRt(n) => vec![
                ort::ep::TensorRT::default().with_device_id(n as i32).build().error_on_failure(),
                ort::ep::CUDA::default().with_device_id(n as i32).build().error_on_failure(),
            ],
        };
        if !eps.is_empty() {
            b = b
                .with_execution_providers(eps)
                .map_err(ort_err)
                .with_context(|| format!("registering the execution provider for {}", options.device))?;
        }
        let session = b
            .commit_from_file(model)
            .map_err(ort_err)
            .with_context(|| format!("ONNX Runtime could not load model {}", model.display()))?;
        let inputs = session.inputs().iter().map(|o| spec_of(o.name(), o.dtype())).collect();
        let outputs = session.outputs().iter().map(|o| spec_of(o.name(), o.dtype())).collect();
        Ok(OrtBackend { path: model.to_path_buf(), device: options.device, session, inputs, outputs })
    }

    pub fn device(&self) -> OrtDevice {
        self.device
    }
}

fn to_ort(t: &HostTensor) -> Result<SessionInputValue<'_>> {
    let shape = t.shape().to_vec();
    Ok(match t.data() {
        TensorData::F32(v) => TensorRef::from_array_view((shape, v.as_slice())).map_err(ort_err)?.into(),
        TensorData::F64(v) => TensorRef::from_array_view((shape, v.as_slice())).map_err(ort_err)?.into(),
        TensorData::I64(v) => TensorRef::from_array_view((shape, v.as_slice())).map_err(ort_err)?.into(),
        TensorData::I32(v) => TensorRef::from_array_view((shape, v.as_slice())).map_err(ort_err)?.into(),
        TensorData::I8(v) => TensorRef::from_array_view((shape, v.as_slice())).map_err(ort_err)?.into(),
        TensorData::U8(v) => TensorRef::from_array_view((shape, v.as_slice())).map_err(ort_err)?.into(),
        TensorData::Bool(v) => TensorRef::from_array_view((shape, v.as_slice())).map_err(ort_err)?.into(),
        TensorData::F16(v) => {
            let v: Vec<half::f16> = v.iter().map(|&b| half::f16::from_bits(b)).collect();
            Tensor::from_array((shape, v)).map_err(ort_err)?.into()
        }
    })
}

fn from_ort(v: &ValueRef<'_>) -> Result<HostTensor> {
    fn grab<T: ort::value::PrimitiveTensorElementType + Clone>(v: &ValueRef<'_>) -> Result<(Vec<usize>, Vec<T>)> {
        let (shape, data) = v.try_extract_tensor::<T>().map_err(ort_err)?;
        Ok((shape.iter().map(|&d| d as usize).collect(), data.to_vec()))
    }
    let ty = match v.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => bail!("ONNX Runtime produced a {other:?}, not a tensor"),
    };
    let (shape, data) = match ty {
        TensorElementType::Float32 => grab::<f32>(v).map(|(s, d)| (s, TensorData::F32(d)))?,
        TensorElementType::Float64 => grab::<f64>(v).map(|(s, d)| (s, TensorData::F64(d)))?,
        TensorElementType::Float16 => {
            grab::<half::f16>(v).map(|(s, d)| (s, TensorData::F16(d.iter().map(|x| x.to_bits()).collect())))?
        }
        TensorElementType::Int64 => grab::<i64>(v).map(|(s, d)| (s, TensorData::I64(d)))?,
        TensorElementType::Int32 => grab::<i32>(v).map(|(s, d)| (s, TensorData::I32(d)))?,
        TensorElementType::Int8 => grab::<i8>(v).map(|(s, d)| (s, TensorData::I8(d)))?,
        TensorElementType::Uint8 => grab::<u8>(v).map(|(s, d)| (s, TensorData::U8(d)))?,
        TensorElementType::Bool => grab::<bool>(v).map(|(s, d)| (s, TensorData::Bool(d)))?,
        other => bail!("ONNX Runtime produced a {other} tensor, which HostTensor cannot hold"),
    };
    HostTensor::new(shape, data)
}

impl Backend for OrtBackend {
    fn name(&self) -> String {
        format!("ort ({})", self.device)
    }

    fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }

    fn run(&mut self, inputs: &BTreeMap<String, HostTensor>) -> Result<BTreeMap<String, HostTensor>> {
        let picked = select_inputs(&self.inputs, inputs).with_context(|| format!("running {}", self.path.display()))?;
        let feeds = self
            .inputs
            .iter()
            .zip(picked)
            .map(|(spec, t)| Ok((spec.name.clone(), to_ort(t).with_context(|| format!("input `{}`", spec.name))?)))
            .collect::<Result<Vec<_>>>()?;
        let path = self.path.clone();
        let outs = self
            .session
            .run(SessionInputs::from(feeds))
            .map_err(ort_err)
            .with_context(|| format!("ONNX Runtime failed running {}", path.display()))?;
        let mut result = BTreeMap::new();
        for (name, value) in outs.iter() {
            let t = from_ort(&value).with_context(|| format!("output `{name}`"))?;
            result.insert(name.to_string(), t);
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_parsing() {
        assert_eq!("cpu".parse::<OrtDevice>().unwrap(), OrtDevice::Cpu);
        assert_eq!("CUDA".parse::<OrtDevice>().unwrap(), OrtDevice::Cuda(0));
        assert_eq!("cuda:3".parse::<OrtDevice>().unwrap(), OrtDevice::Cuda(3));
        assert_eq!("tensorrt:1".parse::<OrtDevice>().unwrap(), OrtDevice::TensorRt(1));
        assert_eq!("trt".parse::<OrtDevice>().unwrap(), OrtDevice::TensorRt(0));
        for bad in ["", "cpu:0", "cuda:", "cuda:x", "rocm", "cuda:-1"] {
            let e = bad.parse::<OrtDevice>().unwrap_err().to_string();
            assert!(e.contains("invalid device"), "{bad}: {e}");
        }
        assert_eq!(OrtDevice::Cuda(2).to_string().parse::<OrtDevice>().unwrap(), OrtDevice::Cuda(2));
    }

    #[test]
    fn lib_names() {
        assert!(is_ort_lib_name("libonnxruntime.so.1.32.0"));
        assert!(is_ort_lib_name("libonnxruntime.so"));
        assert!(!is_ort_lib_name("libonnxruntime_providers_shared.so"));
        assert!(is_ort_lib_name("libonnxruntime.1.32.0.dylib"));
        assert!(!is_ort_lib_name("libonnxruntime_providers_shared.dylib"));
    }

    #[test]
    fn missing_explicit_path_is_an_error() {
        let e = locate_ort_library(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
