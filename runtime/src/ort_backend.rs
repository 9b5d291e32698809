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
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use ort::logging::LogLevel;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{IoBinding, RunOptions, Session, SessionInputValue, SessionInputs};
use ort::value::{DynTensor, DynTensorValueType, Tensor, TensorElementType, TensorRef, ValueRef, ValueType};

use crate::backend::{
    check_pairs, check_state, select_inputs, spec_to_keep, write_on_host, Backend, IoSpec, KeptEdit, SlotWrites,
    StatePair, StatefulStep,
};
use crate::tensor::{DType, HostTensor, TensorData};

/// What to tell a user who has no ONNX Runtime library.
pub const ORT_INSTALL_HINT: &str =
    "install it with `pip install -U 'onnxruntime>=1.23'` (or `onnxruntime-gpu` for CUDA/TensorRT) \
so that `python3` (or the interpreter $PFX_PYTHON names) can `import onnxruntime`, or pass \
`--ort-lib /path/to/libonnxruntime.so` (or set ORT_DYLIB_PATH)";

/// The oldest ONNX Runtime pfx runs on. The `ort` crate's API needs 1.MINOR_VERSION, but its copies between host
/// and device run through a one-node session at optimization level 3, which ONNX Runtime 1.20-1.22 refuse
/// ("graph_optimization_level is not valid"): training and generation failed there while eval worked.
pub const MIN_ORT_MINOR: u32 = if ort::MINOR_VERSION > 23 { ort::MINOR_VERSION } else { 23 };

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

    /// The CUDA device whose memory the session's buffers are in; `None` on the CPU.
    pub(crate) fn cuda_ordinal(self) -> Option<u32> {
        match self {
            OrtDevice::Cpu => None,
            OrtDevice::Cuda(n) | OrtDevice::TensorRt(n) => Some(n),
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
        let bad = || {
            anyhow!("invalid device `{s}`: expected `cpu`, `cuda[:N]` (or `gpu[:N]`) or `tensorrt[:N]` (or `trt[:N]`)")
        };
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
    /// Capture the graph once and replay it (CUDA EP `enable_cuda_graph`, TensorRT `trt_cuda_graph_enable`);
    /// inputs and outputs then live in fixed device buffers. GPU devices only.
    pub cuda_graph: bool,
    /// TF32 matrix products on the CUDA provider (`use_tf32`); `None` keeps ONNX Runtime's default.
    pub tf32: Option<bool>,
    /// TensorRT builds fp16 engines (`trt_fp16_enable`).
    pub trt_fp16: bool,
    /// Folder for TensorRT's engine and timing caches (built once, reused by later runs).
    pub trt_cache: Option<PathBuf>,
    /// On a GPU device, let the CPU provider run the nodes the GPU providers cannot (off: such a model is an
    /// error that lists them).
    pub allow_cpu_fallback: bool,
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

/// The interpreter asked for the `onnxruntime` package: `$PFX_PYTHON`, else `python3`.
fn python_interpreter() -> String {
    std::env::var(PYTHON_ENV).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "python3".to_string())
}

fn python_ort_dir() -> Result<PathBuf> {
    let python = python_interpreter();
    let out = std::process::Command::new(&python)
        .args(["-c", "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))"])
        .output()
        .with_context(|| format!("could not run `{python}`"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
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
    check_not_truncated(path)?;
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

/// Refuses an ELF file cut short (an interrupted copy or download): the dynamic loader maps it and crashes the
/// process with SIGBUS when it reads past the end. The section headers come last in the file, so their end
/// must be within it.
fn check_not_truncated(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut head = [0u8; 64];
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    // Only 64-bit little-endian ELF is checked; anything else goes to the loader, which reports it.
    if f.read_exact(&mut head).is_err() || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Ok(());
    }
    let shoff = u64::from_le_bytes(head[0x28..0x30].try_into().expect("8 bytes"));
    let entry = u16::from_le_bytes([head[0x3A], head[0x3B]]) as u64;
    let count = u16::from_le_bytes([head[0x3C], head[0x3D]]) as u64;
    if shoff.saturating_add(entry * count) > len {
        bail!(
            "{} is truncated ({len} bytes; its section headers end at byte {}): reinstall onnxruntime or copy the \
             library again",
            path.display(),
            shoff.saturating_add(entry * count)
        );
    }
    Ok(())
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
            "ONNX Runtime {}\n  library:   {}\n  found via: {}\n  providers: {}\n  needs:     ONNX Runtime >= 1.{}\n  build:     {}",
            self.version,
            self.lib_path.display(),
            self.source,
            self.providers.join(", "),
            MIN_ORT_MINOR,
            self.build_info
        )
    }

    /// One line for a command's log: which library and providers a run uses.
    pub fn summary(&self) -> String {
        format!(
            "ONNX Runtime {} ({}, found via {}; providers: {})",
            self.version,
            self.lib_path.display(),
            self.source,
            self.providers.join(", ")
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
        Some(m) if version.starts_with("1.") && m >= MIN_ORT_MINOR => {}
        _ => {
            // The package pfx found through an interpreter is upgraded with that interpreter's pip.
            let pip = match source {
                OrtLibSource::Python => format!("{} -m pip", python_interpreter()),
                _ => "pip".to_string(),
            };
            bail!(
                "ONNX Runtime {version} at {} is too old or unrecognised: pfx needs >= 1.{MIN_ORT_MINOR}; upgrade it \
                 (`{pip} install -U 'onnxruntime>=1.{MIN_ORT_MINOR}'`, or onnxruntime-gpu) or pass a newer library \
                 with --ort-lib",
                lib_path.display(),
            )
        }
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

fn element_type_of(dt: DType) -> TensorElementType {
    match dt {
        DType::F32 => TensorElementType::Float32,
        DType::F64 => TensorElementType::Float64,
        DType::F16 => TensorElementType::Float16,
        DType::I64 => TensorElementType::Int64,
        DType::I32 => TensorElementType::Int32,
        DType::I8 => TensorElementType::Int8,
        DType::U8 => TensorElementType::Uint8,
        DType::Bool => TensorElementType::Bool,
    }
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

/// Where ONNX Runtime put a session's nodes, read from its "Node placements" log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placements {
    /// Provider name -> its nodes.
    pub providers: BTreeMap<String, PlacedNodes>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlacedNodes {
    pub count: usize,
    /// `OpType (node name)`, as ONNX Runtime lists them (it lists none when one provider takes everything).
    pub nodes: Vec<String>,
}

impl Placements {
    /// Reads the messages ONNX Runtime logs from `VerifyEachNodeIsAssignedToAnEp`: `All nodes placed on [EP].
    /// Number of nodes: N`, or per provider `Node(s) placed on [EP]. Number of nodes: N` and one message per node.
    pub fn parse<'a>(messages: impl IntoIterator<Item = &'a str>) -> Placements {
        fn header(m: &str) -> Option<(String, usize)> {
            let rest = m.split_once("placed on [")?.1;
            let (provider, rest) = rest.split_once(']')?;
            let count = rest.rsplit_once(':')?.1.trim().parse().ok()?;
            Some((provider.to_string(), count))
        }
        let mut p = Placements::default();
        let mut current: Option<String> = None;
        for m in messages {
            if let Some((provider, count)) = header(m) {
                p.providers.insert(provider.clone(), PlacedNodes { count, nodes: vec![] });
                current = if m.contains("All nodes") { None } else { Some(provider) };
            } else if let Some(c) = &current {
                let node = m.trim();
                if !node.is_empty() {
                    p.providers.get_mut(c).expect("inserted with its header").nodes.push(node.to_string());
                }
            }
        }
        p
    }

    /// Nodes placed on the CPU provider.
    pub fn on_cpu(&self) -> Option<&PlacedNodes> {
        self.providers.get("CPUExecutionProvider").filter(|n| n.count > 0)
    }

    /// `N node(s): A (a), B (b), ...` for the CPU's share, at most `max` listed.
    pub fn describe_cpu(&self, max: usize) -> Option<String> {
        let n = self.on_cpu()?;
        let mut s = format!("{} node(s)", n.count);
        if !n.nodes.is_empty() {
            let shown: Vec<&str> = n.nodes.iter().take(max).map(String::as_str).collect();
            s += &format!(": {}", shown.join(", "));
            if n.nodes.len() > max {
                s += &format!(", ... ({} more)", n.nodes.len() - max);
            }
        }
        Some(s)
    }
}

impl OrtOptions {
    /// Options that need a device the chosen one is not are errors (named by their flags).
    pub fn check(&self) -> Result<()> {
        let gpu = self.device != OrtDevice::Cpu;
        let trt = matches!(self.device, OrtDevice::TensorRt(_));
        if self.cuda_graph && !gpu {
            bail!("--cuda-graph needs a GPU device (--device cuda[:N] or tensorrt[:N]), not {}", self.device);
        }
        if self.tf32.is_some() && !gpu {
            bail!(
                "--tf32 sets the CUDA provider's TF32 mode: it needs --device cuda[:N] or tensorrt[:N], not {}",
                self.device
            );
        }
        if (self.trt_fp16 || self.trt_cache.is_some()) && !trt {
            bail!(
                "--trt-fp16 and --trt-cache are TensorRT options: they need --device tensorrt[:N], not {}",
                self.device
            );
        }
        Ok(())
    }
}

/// `name:AxB,...` for TensorRT's `trt_profile_{min,opt,max}_shapes`, from the declared input shapes; `None`
/// when some input has a dynamic dim (TensorRT then profiles at run time) or a name the format cannot carry.
/// Scalars are left out (a profile has nothing to say about them).
fn trt_profile(inputs: &[(String, Option<Vec<usize>>)]) -> Option<String> {
    let mut parts = Vec::new();
    for (name, shape) in inputs {
        let shape = shape.as_ref()?;
        if name.contains([',', ':']) {
            return None;
        }
        if !shape.is_empty() {
            parts.push(format!("{name}:{}", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")));
        }
    }
    (!parts.is_empty()).then(|| parts.join(","))
}

fn cuda_provider(device_id: u32, options: &OrtOptions, cuda_graph: bool) -> ort::ep::ExecutionProviderDispatch {
    let mut ep = ort::ep::CUDA::default().with_device_id(device_id as i32).with_cuda_graph(cuda_graph);
    if let Some(tf32) = options.tf32 {
        ep = ep.with_tf32(tf32);
    }
    ep.build().error_on_failure()
}

fn tensorrt_provider(model: &Path, device_id: u32, options: &OrtOptions) -> Result<ort::ep::ExecutionProviderDispatch> {
    let mut ep = ort::ep::TensorRT::default()
        .with_device_id(device_id as i32)
        .with_fp16(options.trt_fp16)
        .with_cuda_graph(options.cuda_graph);
    if let Some(dir) = &options.trt_cache {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the TensorRT cache folder {} (--trt-cache)", dir.display()))?;
        let dir = dir.display().to_string();
        ep = ep
            .with_engine_cache(true)
            .with_engine_cache_path(&dir)
            .with_timing_cache(true)
            .with_timing_cache_path(&dir);
    }
    let declared = pfx_compiler::onnx_io::declared_inputs(model)?;
    let shapes: Vec<(String, Option<Vec<usize>>)> =
        declared.iter().map(|v| (v.name.clone(), v.ty.concrete())).collect();
    if let Some(profile) = trt_profile(&shapes) {
        ep = ep.with_profile_min_shapes(&profile).with_profile_opt_shapes(&profile).with_profile_max_shapes(&profile);
    }
    Ok(ep.build().error_on_failure())
}

/// A committed session and what ONNX Runtime said while making it.
struct OpenedSession {
    session: Session,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
    placements: Placements,
}

/// Opens `model` on `options.device`. On a GPU device the CPU provider may not take nodes unless
/// `--allow-cpu-fallback`; the nodes it does take are reported.
fn open_session(model: &Path, options: &OrtOptions) -> Result<OpenedSession> {
    let forbid_cpu = options.device != OrtDevice::Cpu && !options.allow_cpu_fallback;
    let opened = open_session_with(model, options, forbid_cpu)?;
    if options.device != OrtDevice::Cpu {
        if let Some(cpu) = opened.placements.describe_cpu(8) {
            eprintln!(
                "warning: ONNX Runtime runs {cpu} of {} on the CPU, not on {} (--allow-cpu-fallback)",
                model.display(),
                options.device
            );
        }
    }
    Ok(opened)
}

fn open_session_with(model: &Path, options: &OrtOptions, forbid_cpu: bool) -> Result<OpenedSession> {
    if !model.is_file() {
        bail!("model file {} does not exist or is not a file", model.display());
    }
    options.check()?;
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
    let err = match commit(rt, model, options, forbid_cpu) {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    let text = format!("{err:#}");
    let refused_cpu = text.contains("fallback to CPU EP has been explicitly disabled");
    // Older releases say "CUDA Graph feature", 1.2x "graph capture feature".
    let refused_graph = text.contains("graph capture feature") || text.contains("CUDA Graph feature");
    if !(refused_cpu || refused_graph) {
        // A GPU build on a machine without the CUDA libraries fails deep in ORT's provider loader.
        if options.device != OrtDevice::Cpu && text.contains("cannot open shared object file") {
            let driver = match crate::devices::cuda_devices() {
                crate::devices::CudaReport::NoDriver => "no CUDA driver is installed here either",
                _ => "`pfxrun devices` shows the driver and devices",
            };
            return Err(err.context(format!(
                "{} needs CUDA libraries this machine lacks (the missing one is named below; {driver}): install \
                 the CUDA and cuDNN versions onnxruntime-gpu {} was built for, or use --device cpu",
                options.device.provider_names().join(" / "),
                rt.version
            )));
        }
        return Err(err);
    }
    // ORT's refusal names no node: open once more, CPU allowed and no graph capture, to list them.
    let mut relaxed = options.clone();
    relaxed.cuda_graph = false;
    let listed = commit(rt, model, &relaxed, false).ok().and_then(|s| s.placements.describe_cpu(12));
    if refused_cpu {
        let what = listed.unwrap_or_else(|| "some nodes".to_string());
        bail!(
            "{} on {}: ONNX Runtime's {} cannot run {what}, and falling back to the CPU is off; pass \
             --allow-cpu-fallback to run them on the CPU (slower: data crosses between host and device), or use \
             --device cpu",
            model.display(),
            options.device,
            options.device.provider_names().join(" / ")
        );
    }
    let on_cpu = listed.map(|n| format!(" (on the CPU: {n})")).unwrap_or_default();
    bail!(
        "{} on {}: ONNX Runtime cannot capture this graph for --cuda-graph{on_cpu}: {}; run without --cuda-graph",
        model.display(),
        options.device,
        text.trim()
    )
}

fn commit(rt: &OrtRuntime, model: &Path, options: &OrtOptions, forbid_cpu: bool) -> Result<OpenedSession> {
    let placement_log: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = placement_log.clone();
    let logger: ort::logging::LoggerFunction = Arc::new(move |level, _category, _id, location, message| {
        if level == LogLevel::Verbose && location.contains("VerifyEachNodeIsAssignedToAnEp") {
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(message.to_string());
        } else if level == LogLevel::Warning && !message.contains("not assigned to the preferred execution providers") {
            // Passed on as ORT would print them, but for the placement warning (our own report replaces it);
            // errors come back as statuses.
            eprintln!("onnxruntime: {message}");
        }
    });
    let mut b = Session::builder(&rt.env)
        .map_err(ort_err)?
        .with_logger(logger)
        .map_err(ort_err)?
        // Verbose for the placement log while the session is made; runs log at Warning (see run_options).
        .with_log_level(LogLevel::Verbose)
        .map_err(ort_err)?;
    if options.disable_optimizations {
        b = b.with_optimization_level(GraphOptimizationLevel::Disable).map_err(ort_err)?;
    }
    if let Some(n) = options.intra_threads {
        b = b.with_intra_threads(n).map_err(ort_err)?;
    }
    if forbid_cpu {
        b = b.with_disable_cpu_fallback().map_err(ort_err)?;
    }
    // A diagnostic for the benches: ORT's own per-node timings (PREFIX_<time>.json, written when the session
    // closes). On CUDA a node's time is its launch unless CUDA_LAUNCH_BLOCKING=1 makes every launch wait.
    if let Some(prefix) = std::env::var_os("PFX_ORT_PROFILE") {
        b = b.with_profiling(prefix).map_err(ort_err)?;
    }
    if options.device == OrtDevice::Cpu {
        // ORT's memory pattern pre-plans one block for every intermediate of a run; on the GPT-2-small train
        // step it raised peak RSS from 1966 to 2536 MiB with no measurable speed-up (benches/README.md).
        b = b.with_memory_pattern(false).map_err(ort_err)?;
    }
    let eps = match options.device {
        OrtDevice::Cpu => vec![],
        OrtDevice::Cuda(n) => vec![cuda_provider(n, options, options.cuda_graph)],
        // TensorRT captures the graph itself when asked; only one provider may.
        OrtDevice::TensorRt(n) => vec![tensorrt_provider(model, n, options)?, cuda_provider(n, options, false)],
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
    let log = placement_log.lock().unwrap_or_else(|p| p.into_inner());
    let placements = Placements::parse(log.iter().map(String::as_str));
    Ok(OpenedSession { session, inputs, outputs, placements })
}

fn run_options(graph_id: Option<usize>) -> Result<RunOptions> {
    let mut o = RunOptions::new().map_err(ort_err)?;
    o.set_log_level(LogLevel::Warning).map_err(ort_err)?;
    if let Some(id) = graph_id {
        // ORT reserves annotation 0; each id captures (then replays) its own CUDA graph.
        o.set("gpu_graph_id", id.to_string()).map_err(ort_err)?;
    }
    Ok(o)
}

/// Runs one ONNX model on ONNX Runtime.
pub struct OrtBackend {
    path: PathBuf,
    device: OrtDevice,
    session: Session,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
    placements: Placements,
    run_options: RunOptions,
    /// With --cuda-graph: every input and output in a fixed device buffer (what graph replay needs).
    bound: Option<BoundRunner>,
    /// Inputs kept on the session's device (`Backend::keep_input`), once there are any.
    kept: Option<KeptInputs>,
    /// On a GPU, edits of kept inputs queued and not yet waited for: the next run waits for them first (one wait
    /// for every cache a step edits).
    edits_in_flight: bool,
}

/// Inputs kept in buffers on the session's device between runs, and the binding that feeds them: a run binds
/// each kept buffer as it is (no copy) and each given input from the host, and reads every output into host
/// memory. On a GPU the caches then stay in device memory, and only the new rows cross ([`Backend::edit_kept`]).
struct KeptInputs {
    binding: IoBinding,
    values: BTreeMap<String, DynTensor>,
    /// On a GPU, the outputs bound to device memory because a run writes them into kept inputs there
    /// ([`Backend::run_writing`]); every other output is bound to host memory.
    on_device: std::collections::BTreeSet<String>,
    /// On a GPU, a beam reorder's snapshot of one cache (`edit_buffer` grows it as needed).
    scratch: Option<DynTensor>,
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
        let OpenedSession { session, inputs, outputs, placements } = open_session(model, options)?;
        let bound = if options.cuda_graph {
            Some(BoundRunner::new(&session, model, options, &inputs, &outputs, vec![], false)?)
        } else {
            None
        };
        Ok(OrtBackend {
            path: model.to_path_buf(),
            device: options.device,
            session,
            inputs,
            outputs,
            placements,
            run_options: run_options(None)?,
            bound,
            kept: None,
            edits_in_flight: false,
        })
    }

    pub fn device(&self) -> OrtDevice {
        self.device
    }

    /// Where ONNX Runtime put the nodes.
    pub fn placements(&self) -> &Placements {
        &self.placements
    }
}

/// Fixed shape of a declared input or output, or an error naming it (device buffers are made once).
fn static_shape(spec: &IoSpec, model: &Path) -> Result<(TensorElementType, Vec<usize>)> {
    let dims = spec.shape.as_ref().filter(|d| d.iter().all(Option::is_some));
    match (spec.dtype, dims) {
        (Some(dt), Some(dims)) => Ok((element_type_of(dt), dims.iter().map(|d| d.expect("checked")).collect())),
        _ => bail!(
            "{}: `{spec}` has no fixed dtype and shape, which keeping it in a device buffer needs (compiled bundles \
             have them; run without --cuda-graph)",
            model.display()
        ),
    }
}

/// ONNX Runtime's allocator for buffers on a session's device.
enum DeviceAllocator<'s> {
    Session(&'s Allocator),
    Own(Allocator, OrtDevice),
}

impl<'s> DeviceAllocator<'s> {
    fn new(session: &'s Session, device: OrtDevice) -> Result<DeviceAllocator<'s>> {
        Ok(match device {
            OrtDevice::Cpu => DeviceAllocator::Session(session.allocator()),
            OrtDevice::Cuda(n) | OrtDevice::TensorRt(n) => {
                let info =
                    MemoryInfo::new(AllocationDevice::CUDA, n as i32, AllocatorType::Device, MemoryType::Default)
                        .map_err(ort_err)?;
                let allocator = Allocator::new(session, info)
                    .map_err(ort_err)
                    .with_context(|| format!("getting ONNX Runtime's allocator for {device}"))?;
                DeviceAllocator::Own(allocator, device)
            }
        })
    }

    /// A new buffer (contents undefined) for the input or output `name`.
    fn buffer(&self, name: &str, ty: TensorElementType, shape: Vec<usize>) -> Result<DynTensor> {
        let (allocator, device) = match self {
            DeviceAllocator::Session(a) => (*a, OrtDevice::Cpu),
            DeviceAllocator::Own(a, d) => (a, *d),
        };
        DynTensor::new(allocator, ty, shape)
            .map_err(ort_err)
            .with_context(|| format!("allocating `{name}` on {device}"))
    }
}

/// An ORT-owned host tensor holding a copy of `t`.
fn owned_value(t: &HostTensor) -> Result<DynTensor> {
    let shape = t.shape().to_vec();
    Ok(match t.data() {
        TensorData::F32(v) => Tensor::from_array((shape, v.clone())).map_err(ort_err)?.upcast(),
        TensorData::F64(v) => Tensor::from_array((shape, v.clone())).map_err(ort_err)?.upcast(),
        TensorData::I64(v) => Tensor::from_array((shape, v.clone())).map_err(ort_err)?.upcast(),
        TensorData::I32(v) => Tensor::from_array((shape, v.clone())).map_err(ort_err)?.upcast(),
        TensorData::I8(v) => Tensor::from_array((shape, v.clone())).map_err(ort_err)?.upcast(),
        TensorData::U8(v) => Tensor::from_array((shape, v.clone())).map_err(ort_err)?.upcast(),
        TensorData::Bool(v) => Tensor::from_array((shape, v.clone())).map_err(ort_err)?.upcast(),
        TensorData::F16(v) => {
            let v: Vec<half::f16> = v.iter().map(|&b| half::f16::from_bits(b)).collect();
            Tensor::from_array((shape, v)).map_err(ort_err)?.upcast()
        }
    })
}

/// Copies a host tensor into a buffer on any device (ORT's own copy: an Identity session per device pair).
fn upload(t: &HostTensor, dst: &mut DynTensor) -> Result<()> {
    owned_value(t)?.copy_into(dst).map_err(ort_err)
}

/// Copies a buffer on any device back to the host.
fn download(src: &DynTensor) -> Result<HostTensor> {
    let host = src.to(AllocationDevice::CPU, 0).map_err(ort_err)?;
    from_ort(&host.view().into_dyn())
}

/// Runs a session through IoBinding with buffers ORT allocated on the session's device that stay at the same
/// address from run to run (what CUDA graph replay needs). Host inputs are copied into their buffers and the
/// outputs read back from theirs, except state: each [`StatePair`] has a buffer in each of two sets, and run k
/// reads set k and writes set 1-k (ping-pong), so the state never leaves the device between runs. With
/// `ping_pong` off, every run reads set 0 and writes set 1, which is then copied back into set 0 on the device:
/// one binding, fixed addresses, for a provider that replays a single captured graph (TensorRT's).
struct BoundRunner {
    path: PathBuf,
    pairs: Vec<StatePair>,
    /// Inputs fed from the host each run, and their buffers.
    fed: Vec<(IoSpec, DynTensor)>,
    /// Outputs that are not state, and their buffers.
    read: Vec<(String, DynTensor)>,
    /// `state[k][i]`: pair i's tensor in set k.
    state: [Vec<DynTensor>; 2],
    /// `bindings[k]` reads `state[k]` and writes `state[1 - k]`.
    bindings: [IoBinding; 2],
    run_options: [RunOptions; 2],
    /// The set holding the current state.
    current: usize,
    ping_pong: bool,
    state_set: bool,
    /// Fed inputs kept in their buffers (`Backend::keep_input`): not copied in by a run.
    kept: std::collections::BTreeSet<String>,
    /// A reorder's snapshot of a kept buffer on a GPU (`edit_buffer`).
    scratch: Option<DynTensor>,
    /// The session's device: on a GPU, inputs and outputs cross with the CUDA driver's copies (`cuda_edit`),
    /// not ONNX Runtime's (which runs a one-node session per copy).
    device: OrtDevice,
}

impl BoundRunner {
    fn new(
        session: &Session,
        model: &Path,
        options: &OrtOptions,
        inputs: &[IoSpec],
        outputs: &[IoSpec],
        pairs: Vec<StatePair>,
        ping_pong: bool,
    ) -> Result<BoundRunner> {
        let allocator = DeviceAllocator::new(session, options.device)?;
        let buffer = |spec: &IoSpec| -> Result<DynTensor> {
            let (ty, shape) = static_shape(spec, model)?;
            allocator.buffer(&spec.name, ty, shape)
        };
        let is_state_input = |n: &str| pairs.iter().any(|p| p.input == n);
        let is_state_output = |n: &str| pairs.iter().any(|p| p.output == n);
        let fed = inputs
            .iter()
            .filter(|s| !is_state_input(&s.name))
            .map(|s| Ok((s.clone(), buffer(s)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut read = outputs
            .iter()
            .filter(|s| !is_state_output(&s.name))
            .map(|s| Ok((s.name.clone(), buffer(s)?)))
            .collect::<Result<Vec<_>>>()?;
        let set = || -> Result<Vec<DynTensor>> {
            pairs
                .iter()
                .map(|p| {
                    let spec = inputs.iter().find(|s| s.name == p.input).expect("pairs checked against the inputs");
                    buffer(spec)
                })
                .collect()
        };
        let mut state = [set()?, set()?];
        let mut bindings = [session.create_binding().map_err(ort_err)?, session.create_binding().map_err(ort_err)?];
        for (k, binding) in bindings.iter_mut().enumerate() {
            let [set0, set1] = &mut state;
            let (from, to) = if k == 0 { (set0, set1) } else { (set1, set0) };
            for (i, p) in pairs.iter().enumerate() {
                binding.bind_input(&p.input, &from[i]).map_err(ort_err)?;
                binding.bind_output(&p.output, &mut to[i]).map_err(ort_err)?;
            }
        }
        for binding in bindings.iter_mut() {
            for (name, buf) in read.iter_mut() {
                binding.bind_output(name.as_str(), &mut *buf).map_err(ort_err)?;
            }
        }
        let graph_ids = if options.cuda_graph { [Some(1), Some(2)] } else { [None, None] };
        let run_options = [run_options(graph_ids[0])?, run_options(graph_ids[1])?];
        Ok(BoundRunner {
            path: model.to_path_buf(),
            state_set: pairs.is_empty(),
            pairs,
            fed,
            read,
            state,
            bindings,
            run_options,
            current: 0,
            ping_pong,
            kept: Default::default(),
            scratch: None,
            device: options.device,
        })
    }

    /// Copies `value` into the fed input `name`'s buffer, which runs then read instead of a given value.
    fn keep(&mut self, name: &str, value: &HostTensor) -> Result<()> {
        let Some((_, buf)) = self.fed.iter_mut().find(|(s, _)| s.name == name) else {
            bail!("{}: input `{name}` is state, which the runner keeps already", self.path.display());
        };
        upload(value, buf).with_context(|| format!("copying `{name}` to the device"))?;
        self.kept.insert(name.to_string());
        Ok(())
    }

    /// Applies `edit` to the kept input `name`'s buffer; false where `name` is not kept.
    fn edit(&mut self, session: &Session, device: OrtDevice, name: &str, edit: &KeptEdit) -> Result<bool> {
        if !self.kept.contains(name) {
            return Ok(false);
        }
        let (_, buf) = self.fed.iter_mut().find(|(s, _)| s.name == name).expect("kept inputs are fed inputs");
        edit_buffer(session, device, buf, &mut self.scratch, edit).with_context(|| format!("editing `{name}`"))?;
        Ok(true)
    }

    fn set_state(&mut self, specs: &[IoSpec], state: &BTreeMap<String, HostTensor>) -> Result<()> {
        check_state(specs, &self.pairs, state)?;
        for (i, p) in self.pairs.iter().enumerate() {
            upload(&state[&p.input], &mut self.state[self.current][i])
                .with_context(|| format!("copying `{}` to the device", p.input))?;
        }
        self.state_set = true;
        Ok(())
    }

    fn state(&self) -> Result<BTreeMap<String, HostTensor>> {
        if !self.state_set {
            bail!("{}: the state was never set", self.path.display());
        }
        self.pairs
            .iter()
            .zip(&self.state[self.current])
            .map(|(p, buf)| {
                Ok((p.input.clone(), download(buf).with_context(|| format!("copying `{}` back", p.input))?))
            })
            .collect()
    }

    /// One run: the given inputs copied into their buffers, the state swapped, then `writes`' outputs written
    /// into their kept inputs where they lie; returns the other outputs, read back to the host.
    fn run(
        &mut self,
        session: &mut Session,
        inputs: &BTreeMap<String, HostTensor>,
        writes: Option<&SlotWrites>,
    ) -> Result<BTreeMap<String, HostTensor>> {
        if !self.state_set {
            bail!("{}: the state was never set", self.path.display());
        }
        if let Some(name) = self.kept.iter().find(|n| inputs.contains_key(*n)) {
            bail!(
                "{}: input `{name}` is kept in its device buffer, which --cuda-graph replays at a fixed address; \
                 keep the new value instead of giving it",
                self.path.display()
            );
        }
        let specs: Vec<IoSpec> =
            self.fed.iter().filter(|(s, _)| !self.kept.contains(&s.name)).map(|(s, _)| s.clone()).collect();
        let picked = select_inputs(&specs, inputs).with_context(|| format!("running {}", self.path.display()))?;
        self.feed(picked)?;
        let k = self.current;
        for (spec, buf) in self.fed.iter() {
            // Bound again each run: ORT copies at bind time when it wants the input on another device.
            self.bindings[k].bind_input(spec.name.as_str(), buf).map_err(ort_err)?;
        }
        session
            .run_binding_with_options(&self.bindings[k], &self.run_options[k])
            .map_err(ort_err)
            .with_context(|| format!("ONNX Runtime failed running {}", self.path.display()))?;
        if self.ping_pong {
            self.current = 1 - k;
        } else {
            let [set0, set1] = &mut self.state;
            for (i, (from, to)) in set1.iter().zip(set0.iter_mut()).enumerate() {
                from.copy_into(to).map_err(ort_err).with_context(|| format!("keeping `{}`", self.pairs[i].input))?;
            }
        }
        let written = match writes {
            Some(w) => self.write_slots(w)?,
            None => Default::default(),
        };
        self.read
            .iter()
            .filter(|(name, _)| !written.contains(name))
            .map(|(name, buf)| Ok((name.clone(), self.fetch(buf).with_context(|| format!("output `{name}`"))?)))
            .collect()
    }

    /// Copies `picked` (one per fed input that is not kept, in order) into their buffers.
    fn feed(&mut self, picked: Vec<&HostTensor>) -> Result<()> {
        let fed = self.fed.iter_mut().filter(|(s, _)| !self.kept.contains(&s.name));
        let Some(ordinal) = self.device.cuda_ordinal() else {
            for ((spec, buf), t) in fed.zip(picked) {
                upload(t, buf).with_context(|| format!("copying input `{}` to the device", spec.name))?;
            }
            return Ok(());
        };
        let mut copies = Vec::with_capacity(picked.len());
        for ((spec, buf), t) in fed.zip(picked) {
            let bytes = host_bytes(t);
            if bytes.len() != element_count(buf) * t.dtype().size_of() {
                bail!("{}: input `{}` does not fit its device buffer", self.path.display(), spec.name);
            }
            if !bytes.is_empty() {
                copies.push((buf.data_ptr() as u64, bytes));
            }
        }
        crate::cuda_edit::upload(ordinal, &copies).with_context(|| format!("running {}", self.path.display()))
    }

    /// An output buffer's contents on the host.
    fn fetch(&self, buf: &DynTensor) -> Result<HostTensor> {
        let Some(ordinal) = self.device.cuda_ordinal() else { return download(buf) };
        let shape: Vec<usize> = buf.shape().iter().map(|&d| d as usize).collect();
        let (n, ptr) = (element_count(buf), buf.data_ptr() as u64);
        if n == 0 {
            return download(buf);
        }
        let ty = match buf.dtype() {
            ValueType::Tensor { ty, .. } => *ty,
            other => bail!("a device buffer holds a {other:?}, not a tensor"),
        };
        match ty {
            TensorElementType::Float32 => {
                let mut v = vec![0f32; n];
                crate::cuda_edit::download(ordinal, ptr, as_bytes_mut(&mut v))?;
                HostTensor::from_f32(shape, v)
            }
            TensorElementType::Int64 => {
                let mut v = vec![0i64; n];
                crate::cuda_edit::download(ordinal, ptr, as_bytes_mut(&mut v))?;
                HostTensor::from_i64(shape, v)
            }
            _ => download(buf),
        }
    }

    /// Writes each of `writes`' outputs whose input is kept into that input's buffer (on a GPU, a copy on the
    /// device); returns the outputs so written.
    fn write_slots(&mut self, writes: &SlotWrites) -> Result<std::collections::BTreeSet<String>> {
        let mut written = std::collections::BTreeSet::new();
        let mut writer = SlotWriter::new(writes, self.device);
        for (output, kept) in writes.pairs {
            let Some(src) = self.read.iter().position(|(n, _)| n == output) else {
                bail!("{} has no output `{output}`", self.path.display());
            };
            if !self.kept.contains(kept) {
                continue;
            }
            let dst = self.fed.iter().position(|(s, _)| &s.name == kept).expect("kept inputs are fed inputs");
            writer
                .write(&self.read[src].1, &mut self.fed[dst].1)
                .with_context(|| format!("writing `{output}` into `{kept}`"))?;
            written.insert(output.clone());
        }
        writer.finish().with_context(|| format!("running {}", self.path.display()))?;
        Ok(written)
    }
}

/// One run's slot writes into kept caches, where those lie: done at once in host memory; on a GPU gathered, then
/// made as one batch of device copies and one wait (`finish`).
struct SlotWriter<'w> {
    writes: &'w SlotWrites<'w>,
    ordinal: Option<u32>,
    on_device: Vec<(crate::cuda_edit::DeviceF32, crate::cuda_edit::DeviceF32)>,
}

impl<'w> SlotWriter<'w> {
    fn new(writes: &'w SlotWrites<'w>, device: OrtDevice) -> SlotWriter<'w> {
        SlotWriter { writes, ordinal: device.cuda_ordinal(), on_device: Vec::new() }
    }

    /// Writes the output `new` into slot `writes.slot` of `cache` (on a GPU: at `finish`).
    fn write(&mut self, new: &DynTensor, cache: &mut DynTensor) -> Result<()> {
        if self.ordinal.is_some() {
            self.on_device.push((device_f32(new), device_f32(cache)));
            return Ok(());
        }
        let (_, new) = new.try_extract_tensor::<f32>().map_err(ort_err)?;
        let (_, cache) = cache.try_extract_tensor_mut::<f32>().map_err(ort_err)?;
        self.writes.edit(new).apply(cache)
    }

    fn finish(self) -> Result<()> {
        match self.ordinal {
            Some(n) if !self.on_device.is_empty() => {
                let w = self.writes;
                crate::cuda_edit::write_slots(n, &self.on_device, w.capacity, w.slot, w.width)
            }
            _ => Ok(()),
        }
    }
}

/// A tensor in device memory, as the driver's copies take it.
fn device_f32(t: &DynTensor) -> crate::cuda_edit::DeviceF32 {
    crate::cuda_edit::DeviceF32 { ptr: t.data_ptr() as u64, len: element_count(t) }
}

/// The bytes of a host tensor's values.
fn host_bytes(t: &HostTensor) -> &[u8] {
    match t.data() {
        TensorData::F32(v) => as_bytes(v),
        TensorData::F64(v) => as_bytes(v),
        TensorData::F16(v) => as_bytes(v),
        TensorData::I64(v) => as_bytes(v),
        TensorData::I32(v) => as_bytes(v),
        TensorData::I8(v) => as_bytes(v),
        TensorData::U8(v) => as_bytes(v),
        TensorData::Bool(v) => as_bytes(v),
    }
}

/// Marks the element types whose values are plain bytes (no padding, every byte pattern written by a device
/// copy of the same type valid).
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for f64 {}
impl Plain for u16 {}
impl Plain for i64 {}
impl Plain for i32 {}
impl Plain for i8 {}
impl Plain for u8 {}
impl Plain for bool {}

fn as_bytes<T: Plain>(v: &[T]) -> &[u8] {
    // SAFETY: `Plain` types have no padding; the bytes live as long as `v`.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

/// `Plain` types whose every byte pattern is a value (not bool), so that a copy may write their bytes.
trait AnyBits: Plain {}
impl AnyBits for f32 {}
impl AnyBits for i64 {}

fn as_bytes_mut<T: AnyBits>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as `as_bytes`, and any bytes written are valid values of `T`.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

/// A training step on ONNX Runtime whose parameters and optimizer moments stay on the session's device
/// between steps (see [`BoundRunner`]); per step only the batch goes in and the loss and metrics come out.
pub struct OrtStatefulStep {
    device: OrtDevice,
    session: Session,
    inputs: Vec<IoSpec>,
    placements: Placements,
    runner: BoundRunner,
}

impl OrtStatefulStep {
    pub fn open(model: impl AsRef<Path>, options: &OrtOptions, pairs: Vec<StatePair>) -> Result<OrtStatefulStep> {
        let model = model.as_ref();
        let OpenedSession { session, inputs, outputs, placements } = open_session(model, options)?;
        check_pairs(&model.display().to_string(), &inputs, &outputs, &pairs)?;
        // CUDA EP graphs are kept per `gpu_graph_id`, one for each buffer set; TensorRT's replay is taken to
        // know a single graph, so there the state is copied back instead of swapped.
        let ping_pong = !(options.cuda_graph && matches!(options.device, OrtDevice::TensorRt(_)));
        let runner = BoundRunner::new(&session, model, options, &inputs, &outputs, pairs, ping_pong)?;
        Ok(OrtStatefulStep { device: options.device, session, inputs, placements, runner })
    }

    pub fn placements(&self) -> &Placements {
        &self.placements
    }
}

impl StatefulStep for OrtStatefulStep {
    fn name(&self) -> String {
        format!("ort ({}), state on the device", self.device)
    }

    fn pairs(&self) -> &[StatePair] {
        &self.runner.pairs
    }

    fn set_state(&mut self, state: &BTreeMap<String, HostTensor>) -> Result<()> {
        self.runner.set_state(&self.inputs, state)
    }

    fn state(&self) -> Result<BTreeMap<String, HostTensor>> {
        self.runner.state()
    }

    fn step(&mut self, inputs: &BTreeMap<String, HostTensor>) -> Result<BTreeMap<String, HostTensor>> {
        self.runner.run(&mut self.session, inputs, None)
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
        self.wait_for_edits()?;
        if let Some(bound) = self.bound.as_mut() {
            return bound.run(&mut self.session, inputs, None);
        }
        if self.kept.is_some() {
            return self.run_with_kept(inputs, None);
        }
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
            .run_with_options(SessionInputs::from(feeds), &self.run_options)
            .map_err(ort_err)
            .with_context(|| format!("ONNX Runtime failed running {}", path.display()))?;
        let mut result = BTreeMap::new();
        for (name, value) in outs.iter() {
            let t = from_ort(&value).with_context(|| format!("output `{name}`"))?;
            result.insert(name.to_string(), t);
        }
        Ok(result)
    }

    /// Keeps an f32 input in a buffer on the session's device: with --cuda-graph, the fixed buffer the runner
    /// has for it already (no longer copied in each run); otherwise one of its own. Other dtypes are handed back.
    fn keep_input(&mut self, name: &str, value: HostTensor) -> Result<Option<HostTensor>> {
        spec_to_keep(&self.inputs, &self.path, name, &value)?;
        if value.dtype() != DType::F32 {
            return Ok(Some(value));
        }
        if let Some(bound) = self.bound.as_mut() {
            bound.keep(name, &value)?;
            return Ok(None);
        }
        if self.kept.is_none() {
            let mut binding = self.session.create_binding().map_err(ort_err)?;
            let host = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)
                .map_err(ort_err)?;
            for out in &self.outputs {
                binding.bind_output_to_device(out.name.as_str(), &host).map_err(ort_err)?;
            }
            self.kept =
                Some(KeptInputs { binding, values: BTreeMap::new(), on_device: Default::default(), scratch: None });
        }
        let kept = self.kept.as_mut().expect("made above");
        let mut buf = match kept.values.remove(name) {
            Some(b) if b.shape().iter().map(|&d| d as usize).eq(value.shape().iter().copied()) => b,
            _ => DeviceAllocator::new(&self.session, self.device)?.buffer(
                name,
                TensorElementType::Float32,
                value.shape().to_vec(),
            )?,
        };
        upload(&value, &mut buf).with_context(|| format!("copying `{name}` to {}", self.device))?;
        kept.values.insert(name.to_string(), buf);
        Ok(None)
    }

    fn run_writing(
        &mut self,
        inputs: &BTreeMap<String, HostTensor>,
        writes: &SlotWrites,
    ) -> Result<BTreeMap<String, HostTensor>> {
        self.wait_for_edits()?;
        if let Some(bound) = self.bound.as_mut() {
            return bound.run(&mut self.session, inputs, Some(writes));
        }
        if self.kept.is_some() {
            return self.run_with_kept(inputs, Some(writes));
        }
        let out = self.run(inputs)?;
        write_on_host(self, out, writes)
    }

    fn edit_kept(&mut self, name: &str, edit: &KeptEdit) -> Result<bool> {
        let done = if let Some(bound) = self.bound.as_mut() {
            bound.edit(&self.session, self.device, name, edit)?
        } else if let Some(kept) = self.kept.as_mut() {
            match kept.values.get_mut(name) {
                Some(buf) => {
                    edit_buffer(&self.session, self.device, buf, &mut kept.scratch, edit)
                        .with_context(|| format!("editing kept input `{name}`"))?;
                    true
                }
                None => false,
            }
        } else {
            false
        };
        self.edits_in_flight |= done && self.device.cuda_ordinal().is_some();
        Ok(done)
    }
}

/// Values in a tensor.
fn element_count(t: &DynTensor) -> usize {
    t.shape().iter().map(|&d| d as usize).product()
}

/// Applies `edit` to the f32 buffer `buf` where it lies: in host memory directly; in CUDA memory with driver
/// copies (`cuda_edit`), a reorder's snapshot going to `scratch` (made or grown here when a reorder needs it),
/// queued: `OrtBackend` waits for them before its next run.
fn edit_buffer(
    session: &Session,
    device: OrtDevice,
    buf: &mut DynTensor,
    scratch: &mut Option<DynTensor>,
    edit: &KeptEdit,
) -> Result<()> {
    match device {
        OrtDevice::Cpu => {
            let (_, data) = buf.try_extract_tensor_mut::<f32>().map_err(ort_err)?;
            edit.apply(data)
        }
        OrtDevice::Cuda(n) | OrtDevice::TensorRt(n) => {
            let len = element_count(buf);
            let reorder = matches!(edit, KeptEdit::Reorder { .. });
            if reorder && scratch.as_ref().is_none_or(|t| element_count(t) < len) {
                let allocator = DeviceAllocator::new(session, device)?;
                *scratch = Some(allocator.buffer("reorder scratch", TensorElementType::Float32, vec![len])?);
            }
            let snapshot = if reorder { scratch.as_ref().map(device_f32) } else { None };
            crate::cuda_edit::apply(n, device_f32(buf), snapshot, edit)
        }
    }
}

impl OrtBackend {
    /// Waits for the queued edits of kept inputs on the GPU, if any.
    fn wait_for_edits(&mut self) -> Result<()> {
        if let (true, Some(n)) = (self.edits_in_flight, self.device.cuda_ordinal()) {
            crate::cuda_edit::synchronize(n)?;
        }
        self.edits_in_flight = false;
        Ok(())
    }

    /// A run through the kept inputs' binding: kept buffers bound as they are, given inputs from the host (a
    /// given input wins over a kept one of the same name). Then `writes`' outputs go into their kept inputs where
    /// those lie (on a GPU they are bound to device memory for that, and copied there), and the other outputs
    /// come back to the host.
    fn run_with_kept(
        &mut self,
        inputs: &BTreeMap<String, HostTensor>,
        writes: Option<&SlotWrites>,
    ) -> Result<BTreeMap<String, HostTensor>> {
        let kept = self.kept.as_mut().expect("called with kept inputs");
        let ordinal = self.device.cuda_ordinal();
        let written: Vec<(&str, &str)> = writes
            .map(|w| w.pairs.iter().filter(|(_, k)| kept.values.contains_key(k)).map(|(o, k)| (o.as_str(), k.as_str())))
            .into_iter()
            .flatten()
            .collect();
        if let Some(n) = ordinal {
            for &(output, _) in &written {
                if kept.on_device.insert(output.to_string()) {
                    let info =
                        MemoryInfo::new(AllocationDevice::CUDA, n as i32, AllocatorType::Device, MemoryType::Default)
                            .map_err(ort_err)?;
                    kept.binding.bind_output_to_device(output, &info).map_err(ort_err)?;
                }
            }
        }
        let fed: Vec<IoSpec> = self
            .inputs
            .iter()
            .filter(|s| inputs.contains_key(&s.name) || !kept.values.contains_key(&s.name))
            .cloned()
            .collect();
        let picked = select_inputs(&fed, inputs).with_context(|| format!("running {}", self.path.display()))?;
        for (spec, t) in fed.iter().zip(picked) {
            let value = owned_value(t).with_context(|| format!("input `{}`", spec.name))?;
            kept.binding.bind_input(spec.name.as_str(), &value).map_err(ort_err)?;
        }
        for spec in self.inputs.iter().filter(|s| !inputs.contains_key(&s.name)) {
            if let Some(buf) = kept.values.get(&spec.name) {
                kept.binding.bind_input(spec.name.as_str(), buf).map_err(ort_err)?;
            }
        }
        let outs = self
            .session
            .run_binding_with_options(&kept.binding, &self.run_options)
            .map_err(ort_err)
            .with_context(|| format!("ONNX Runtime failed running {}", self.path.display()))?;
        if let Some(writes) = writes {
            let mut writer = SlotWriter::new(writes, self.device);
            for &(output, name) in &written {
                let new =
                    outs.get(output).with_context(|| format!("{} has no output `{output}`", self.path.display()))?;
                let new = new.view().downcast::<DynTensorValueType>().map_err(ort_err)?;
                let cache = kept.values.get_mut(name).expect("written pairs have kept inputs");
                writer.write(&new, cache).with_context(|| format!("writing `{output}` into `{name}`"))?;
            }
            writer.finish().with_context(|| format!("running {}", self.path.display()))?;
        }
        let mut result = BTreeMap::new();
        for (name, value) in outs.iter() {
            if written.iter().any(|&(o, _)| o == name) {
                continue;
            }
            let tensor = outs.get(name).expect("an output listed").view().downcast::<DynTensorValueType>();
            let tensor = tensor.map_err(ort_err)?;
            let t = if tensor.memory_info().allocation_device() == AllocationDevice::CPU {
                from_ort(&value)
            } else {
                // An output bound to the device for an earlier run's writes (`on_device`).
                tensor.to(AllocationDevice::CPU, 0).map_err(ort_err).and_then(|h| from_ort(&h.view().into_dyn()))
            };
            result.insert(name.to_string(), t.with_context(|| format!("output `{name}`"))?);
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_scratch::Scratch;

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
    fn placements_from_the_log() {
        // As ONNX Runtime 1.2x-1.32 logs them from VerifyEachNodeIsAssignedToAnEp (one message per line).
        let mixed = [
            "Node placements",
            " Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 40",
            "  MatMul (/h.0/attn/MatMul)",
            " Node(s) placed on [CPUExecutionProvider]. Number of nodes: 2",
            "  Shape (/Shape)",
            "  Gather (/Gather_3)",
        ];
        let p = Placements::parse(mixed);
        assert_eq!(p.providers["CUDAExecutionProvider"].count, 40);
        assert_eq!(p.on_cpu().unwrap().nodes, vec!["Shape (/Shape)", "Gather (/Gather_3)"]);
        assert_eq!(p.describe_cpu(1).unwrap(), "2 node(s): Shape (/Shape), ... (1 more)");
        let all =
            Placements::parse(["Node placements", " All nodes placed on [CUDAExecutionProvider]. Number of nodes: 9"]);
        assert_eq!(all.providers["CUDAExecutionProvider"].count, 9);
        assert!(all.on_cpu().is_none() && all.describe_cpu(5).is_none());
        assert_eq!(Placements::parse(["something else"]), Placements::default());
    }

    #[test]
    fn tensorrt_profiles_from_static_shapes() {
        let s = |n: &str, d: Option<Vec<usize>>| (n.to_string(), d);
        let static_inputs = [s("input_ids", Some(vec![4, 48])), s("lr", Some(vec![])), s("adam.m.x", Some(vec![512]))];
        assert_eq!(trt_profile(&static_inputs).unwrap(), "input_ids:4x48,adam.m.x:512");
        assert_eq!(trt_profile(&[s("x", None), s("y", Some(vec![2]))]), None, "a dynamic input: no profile");
        assert_eq!(trt_profile(&[s("a:b", Some(vec![2]))]), None, "a name the format cannot carry");
        assert_eq!(trt_profile(&[s("lr", Some(vec![]))]), None, "scalars only");
    }

    #[test]
    fn options_need_their_device() {
        let cpu = OrtOptions::default();
        cpu.check().unwrap();
        let e = OrtOptions { cuda_graph: true, ..Default::default() }.check().unwrap_err().to_string();
        assert!(e.contains("--cuda-graph needs a GPU device"), "{e}");
        let e = OrtOptions { tf32: Some(false), ..Default::default() }.check().unwrap_err().to_string();
        assert!(e.contains("--tf32") && e.contains("cuda"), "{e}");
        let cuda = OrtOptions { device: OrtDevice::Cuda(0), trt_fp16: true, ..Default::default() };
        let e = cuda.check().unwrap_err().to_string();
        assert!(e.contains("--trt-fp16") && e.contains("tensorrt"), "{e}");
        let trt = OrtOptions {
            device: OrtDevice::TensorRt(1),
            trt_fp16: true,
            trt_cache: Some("/tmp/x".into()),
            cuda_graph: true,
            tf32: Some(true),
            ..Default::default()
        };
        trt.check().unwrap();
    }

    fn ort_here() -> bool {
        std::env::var("PFX_SKIP_ORT").as_deref() != Ok("1")
    }

    fn unit_model(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../graphs/unit").join(name)
    }

    /// On a GPU device ORT refuses CPU nodes; its refusal names none, ours lists them and the flag. The CPU
    /// session here is refused the same way when fallback is forbidden, so the real message is checked.
    #[test]
    fn a_refused_cpu_fallback_lists_the_nodes_and_the_flag() {
        if !ort_here() {
            return;
        }
        let model = unit_model("matmul_softmax.onnx");
        let e = format!("{:#}", open_session_with(&model, &OrtOptions::default(), true).err().unwrap());
        assert!(e.contains("--allow-cpu-fallback") && e.contains("matmul_softmax.onnx"), "{e}");
        // One provider took every node, so ORT counts them without listing them (a GPU's refusal lists them).
        assert!(e.contains("cannot run 2 node(s)"), "{e}");
        let opened = open_session_with(&model, &OrtOptions::default(), false).unwrap();
        assert!(opened.placements.on_cpu().is_some_and(|n| n.count >= 2), "{:?}", opened.placements);
    }

    /// A compiled bundle of the random GPT-2 fixture, and inputs for one of its graphs (fixed values).
    fn small_bundle(tag: &str) -> Scratch {
        small_bundle_of(tag, "gpt2-optimum", None)
    }

    /// A compiled bundle of the GPT-2 fixture `fixture`, with generation graphs of `generation`'s shape.
    fn small_bundle_of(
        tag: &str,
        fixture: &str,
        generation: Option<pfx_compiler::compile::generate::GenShape>,
    ) -> Scratch {
        let dir = Scratch::new(&format!("ort-unit-{tag}"));
        let opts = pfx_compiler::compile::CompileOptions {
            prefix_len: 2,
            mid_dim: None,
            batch: 2,
            seq: 5,
            optimizer: Default::default(),
            seed: 1,
            generation,
            weights: Default::default(),
        };
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        pfx_compiler::compile::compile(&root.join("graphs").join(fixture).join("model.onnx"), &opts, &dir).unwrap();
        dir
    }

    /// A session of `model` and --cuda-graph's runner over it (fixed buffers, no state), with its inputs.
    fn fixed_buffers(model: &Path, options: &OrtOptions) -> (Session, Vec<IoSpec>, BoundRunner) {
        let OpenedSession { session, inputs, outputs, .. } = open_session(model, options).unwrap();
        let bound = BoundRunner::new(&session, model, options, &inputs, &outputs, vec![], true).unwrap();
        (session, inputs, bound)
    }

    fn inputs_for(specs: &[IoSpec]) -> BTreeMap<String, HostTensor> {
        let mut inputs = BTreeMap::new();
        for spec in specs {
            let shape: Vec<usize> = spec.shape.clone().unwrap().into_iter().map(Option::unwrap).collect();
            let n = shape.iter().product::<usize>();
            let ramp = |m: i64, k: i64| (0..n as i64).map(|i| (i * k) % m).collect::<Vec<_>>();
            let t = match (spec.dtype.unwrap(), spec.name.as_str()) {
                (DType::I64, "labels") => HostTensor::from_i64(shape, ramp(90, 1)),
                (DType::I64, "input_ids") => HostTensor::from_i64(shape, ramp(90, 7)),
                (DType::I64, _) => HostTensor::from_i64(shape, vec![1; n]),
                (_, "lr") => Ok(HostTensor::scalar_f32(0.05)),
                (_, name) if name.starts_with("adam.") => HostTensor::from_f32(shape, vec![0.0; n]),
                _ => HostTensor::from_f32(shape, (0..n).map(|i| ((i % 13) as f32 - 6.0) * 0.05).collect()),
            };
            inputs.insert(spec.name.clone(), t.unwrap());
        }
        inputs
    }

    /// The fixed-buffer path that --cuda-graph uses (no state pairs), on the CPU: same outputs as a plain run;
    /// a model without fixed shapes is refused by name.
    #[test]
    fn fixed_buffers_run_like_a_plain_session() {
        if !ort_here() {
            return;
        }
        let bundle = small_bundle("fixed");
        let model = bundle.join("grads.onnx");
        let options = OrtOptions::default();
        let mut plain = OrtBackend::open(&model, &options).unwrap();
        let inputs = inputs_for(plain.inputs());
        let want = plain.run(&inputs).unwrap();
        let (mut session, _, mut bound) = fixed_buffers(&model, &options);
        for _ in 0..2 {
            let got = bound.run(&mut session, &inputs, None).unwrap();
            assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
            for (name, t) in &want {
                assert_eq!(&got[name], t, "{name}");
            }
        }
        let dynamic = unit_model("matmul_softmax.onnx");
        let OpenedSession { session, inputs: specs, outputs, .. } = open_session(&dynamic, &options).unwrap();
        let e =
            BoundRunner::new(&session, &dynamic, &options, &specs, &outputs, vec![], true).err().unwrap().to_string();
        assert!(e.contains("`x: float32 [?, 4]` has no fixed dtype and shape") && e.contains("--cuda-graph"), "{e}");
    }

    /// Inputs kept in the fixed buffers (--cuda-graph's runner), on the CPU: not copied in by a run, edited in
    /// place (a run then gives what a plain run of the edited value gives), and not to be given as well.
    #[test]
    fn fixed_buffers_keep_inputs() {
        if !ort_here() {
            return;
        }
        let bundle = small_bundle("fixed-kept");
        let model = bundle.join("grads.onnx");
        let options = OrtOptions::default();
        let mut plain = OrtBackend::open(&model, &options).unwrap();
        let mut inputs = inputs_for(plain.inputs());
        let (mut session, specs, mut bound) = fixed_buffers(&model, &options);
        let spec = specs.iter().find(|s| s.dtype == Some(DType::F32) && s.name != "lr").unwrap().clone();
        let mut value = inputs.remove(&spec.name).unwrap();
        let (rows, width) = (value.shape()[0], value.shape()[1..].iter().product::<usize>());
        assert!(rows >= 2, "`{}` {:?} has rows to reorder", spec.name, value.shape());
        bound.keep(&spec.name, &value).unwrap();
        let new: Vec<f32> = (0..width).map(|i| i as f32 * 0.125 - 1.0).collect();
        let parents: Vec<usize> = (0..rows).map(|r| (r + 1) % rows).collect();
        let edits = [
            KeptEdit::WriteSlot { new: &new, capacity: rows, slot: 1, width },
            KeptEdit::Reorder { parents: &parents, rows, per_row: width },
        ];
        for edit in [None, Some(&edits[0]), Some(&edits[1])] {
            if let Some(edit) = edit {
                assert!(bound.edit(&session, OrtDevice::Cpu, &spec.name, edit).unwrap());
                edit.apply(value.as_f32_mut().unwrap()).unwrap();
            }
            let mut given = inputs.clone();
            given.insert(spec.name.clone(), value.clone());
            let want = plain.run(&given).unwrap();
            let got = bound.run(&mut session, &inputs, None).unwrap();
            for (name, t) in &want {
                assert_eq!(&got[name], t, "{name} after {edit:?}");
            }
        }
        assert!(!bound.edit(&session, OrtDevice::Cpu, "input_ids", &edits[0]).unwrap(), "not kept");
        inputs.insert(spec.name.clone(), value);
        let e = bound.run(&mut session, &inputs, None).unwrap_err().to_string();
        assert!(e.contains(&format!("input `{}` is kept in its device buffer", spec.name)), "{e}");
    }

    /// A decode step whose new keys and values go into kept caches ([`Backend::run_writing`]) leaves, on each
    /// ONNX Runtime path on the CPU (kept inputs; --cuda-graph's fixed buffers), the caches that writing the
    /// returned outputs by hand gives, and returns the other outputs unchanged; a backend keeping nothing returns
    /// them all. An output the graph lacks is an error naming it.
    #[test]
    fn decode_outputs_go_into_kept_caches() {
        if !ort_here() {
            return;
        }
        let shape = pfx_compiler::compile::generate::GenShape { rows: 2, prompt_len: 3, max_new: 4 };
        let dir = small_bundle_of("slots", "gpt2-dynamo-past", Some(shape));
        let model = dir.join("decode.onnx");
        let options = OrtOptions::default();
        let mut plain = OrtBackend::open(&model, &options).unwrap();
        let inputs = inputs_for(plain.inputs());
        let caches: Vec<IoSpec> =
            plain.inputs().iter().filter(|s| s.name.starts_with("past_key_values.")).cloned().collect();
        assert!(caches.len() >= 4, "{caches:?}");
        let shape: Vec<usize> = caches[0].shape.clone().unwrap().into_iter().map(Option::unwrap).collect();
        let pairs: Vec<(String, String)> =
            caches.iter().map(|s| (s.name.replace("past_key_values.", "present."), s.name.clone())).collect();
        let writes = SlotWrites { pairs: &pairs, capacity: shape[2], slot: shape[2] - 2, width: shape[3] };
        let out = plain.run(&inputs).unwrap();
        let mut want_caches = BTreeMap::new();
        for (output, cache) in &pairs {
            let mut v = inputs[cache].clone();
            writes.edit(out[output].as_f32().unwrap()).apply(v.as_f32_mut().unwrap()).unwrap();
            assert_ne!(v, inputs[cache], "{output} changes {cache}");
            want_caches.insert(cache.clone(), v);
        }
        let mut want_rest = out.clone();
        want_rest.retain(|k, _| !k.starts_with("present."));
        let mut rest = inputs.clone();
        rest.retain(|k, _| !k.starts_with("past_key_values."));
        assert_eq!(plain.run_writing(&inputs, &writes).unwrap(), out, "keeping nothing, every output comes back");

        let mut kept = OrtBackend::open(&model, &options).unwrap();
        for (_, cache) in &pairs {
            assert!(kept.keep_input(cache, inputs[cache].clone()).unwrap().is_none());
        }
        assert_eq!(kept.run_writing(&rest, &writes).unwrap(), want_rest, "kept inputs");
        for (cache, want) in &want_caches {
            let (_, got) = kept.kept.as_ref().unwrap().values[cache].try_extract_tensor::<f32>().unwrap();
            assert_eq!(got, want.as_f32().unwrap(), "kept inputs: {cache}");
        }

        let (mut session, _, mut bound) = fixed_buffers(&model, &options);
        for (_, cache) in &pairs {
            bound.keep(cache, &inputs[cache]).unwrap();
        }
        assert_eq!(bound.run(&mut session, &rest, Some(&writes)).unwrap(), want_rest, "fixed buffers");
        for (cache, want) in &want_caches {
            let (_, buf) = bound.fed.iter().find(|(s, _)| &s.name == cache).unwrap();
            assert_eq!(buf.try_extract_tensor::<f32>().unwrap().1, want.as_f32().unwrap(), "fixed buffers: {cache}");
        }

        let mut with_absent = pairs.clone();
        with_absent.push(("present.99.key".into(), pairs[0].1.clone()));
        let absent = SlotWrites { pairs: &with_absent, ..writes };
        let e = format!("{:#}", kept.run_writing(&rest, &absent).unwrap_err());
        assert!(e.contains("no output `present.99.key`"), "{e}");
        let e = format!("{:#}", bound.run(&mut session, &rest, Some(&absent)).unwrap_err());
        assert!(e.contains("no output `present.99.key`"), "{e}");
        let e = format!("{:#}", plain.run_writing(&inputs, &absent).unwrap_err());
        assert!(e.contains("no output `present.99.key`"), "{e}");
    }

    /// The copy-back mode (one binding, fixed addresses: TensorRT with --cuda-graph) trains exactly as the
    /// ping-pong mode does.
    #[test]
    fn copied_back_state_matches_swapped_state() {
        if !ort_here() {
            return;
        }
        let dir = small_bundle("copyback");
        let model = dir.join("train_step.onnx");
        let manifest = pfx_compiler::compile::read_manifest(&dir).unwrap();
        let pairs = crate::backend::state_pairs(&manifest.io["train_step"]).unwrap();
        let options = OrtOptions::default();
        let mut runs = Vec::new();
        for ping_pong in [true, false] {
            let OpenedSession { mut session, inputs: specs, outputs, .. } = open_session(&model, &options).unwrap();
            let mut bound =
                BoundRunner::new(&session, &model, &options, &specs, &outputs, pairs.clone(), ping_pong).unwrap();
            let mut inputs = inputs_for(&specs);
            bound.set_state(&specs, &inputs).unwrap();
            let mut losses = Vec::new();
            for step in 1..=3 {
                inputs.insert("step".into(), HostTensor::scalar_i64(step));
                losses.push(bound.run(&mut session, &inputs, None).unwrap()["loss"].to_f64_vec()[0]);
            }
            runs.push((losses, bound.state().unwrap()));
        }
        assert!(runs[0].0[2] != runs[0].0[0], "the loss moved: {:?}", runs[0].0);
        assert_eq!(runs[0], runs[1]);
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
