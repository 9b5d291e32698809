//! `pfxrun devices`: the GPUs the CUDA driver reports (cudarc, loaded at run time) and what ONNX Runtime
//! offers. Everything here is guarded: without a driver or a GPU it says so, it never panics.

use std::fmt::Write as _;
use std::path::Path;

use cudarc::driver::{result as cu, sys};

use crate::ort_backend::{ort_runtime, OrtDevice};

/// One GPU as the CUDA driver describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaDevice {
    pub index: usize,
    pub name: String,
    pub total_memory: usize,
    /// (major, minor)
    pub compute_capability: (i32, i32),
}

/// What the CUDA driver said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaReport {
    /// libcuda could not be loaded.
    NoDriver,
    /// The driver loaded but failed (no GPU, a broken install, ...).
    DriverError(String),
    Devices {
        /// e.g. 13000 for CUDA 13.0.
        driver_version: i32,
        devices: Vec<CudaDevice>,
    },
}

/// Runs `f`, turning a panic into `None` without printing it (cudarc panics on missing libraries or symbols).
pub(crate) fn without_panics<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Option<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(f).ok();
    std::panic::set_hook(hook);
    r
}

/// Asks the CUDA driver for its devices.
pub fn cuda_devices() -> CudaReport {
    // SAFETY: only tries to open the library by its usual names.
    let present = without_panics(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return CudaReport::NoDriver;
    }
    let query = || -> Result<CudaReport, cu::DriverError> {
        cu::init()?;
        let mut driver_version = 0;
        // SAFETY: a plain out-parameter.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }.result()?;
        let n = cu::device::get_count()?;
        let mut devices = Vec::new();
        for index in 0..n {
            let dev = cu::device::get(index)?;
            // SAFETY: `dev` comes from cuDeviceGet.
            let (total_memory, major, minor) = unsafe {
                (
                    cu::device::total_mem(dev)?,
                    cu::device::get_attribute(
                        dev,
                        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                    )?,
                    cu::device::get_attribute(
                        dev,
                        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                    )?,
                )
            };
            let name = cu::device::get_name(dev)?;
            devices.push(CudaDevice { index: index as usize, name, total_memory, compute_capability: (major, minor) });
        }
        Ok(CudaReport::Devices { driver_version, devices })
    };
    match without_panics(query) {
        Some(Ok(r)) => r,
        Some(Err(e)) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => {
            CudaReport::Devices { driver_version: 0, devices: vec![] }
        }
        Some(Err(e)) => {
            // The driver's own words (error_string calls into it, so guarded too); the code alone otherwise.
            let words = without_panics(|| e.error_string().ok().map(|s| s.to_string_lossy().into_owned())).flatten();
            CudaReport::DriverError(match words {
                Some(w) => format!("{:?} ({w})", e.0),
                None => format!("{:?}", e.0),
            })
        }
        None => CudaReport::DriverError("the CUDA driver library lacks a function pfx needs (too old?)".into()),
    }
}

/// The report `pfxrun devices` prints: CUDA devices, then ONNX Runtime's library, version and providers.
/// The flag says whether ONNX Runtime loaded.
pub fn describe(ort_lib: Option<&Path>) -> (String, bool) {
    let mut s = String::from("CUDA\n");
    let cuda = cuda_devices();
    let gpus = match &cuda {
        CudaReport::NoDriver => {
            s += "  no CUDA driver found (libcuda could not be loaded): --device cuda/tensorrt cannot run here\n";
            0
        }
        CudaReport::DriverError(e) => {
            let _ = writeln!(s, "  the CUDA driver is installed but failed: {e}");
            0
        }
        CudaReport::Devices { driver_version, devices } => {
            if devices.is_empty() {
                s += "  CUDA driver found, but no CUDA device\n";
            } else {
                let _ = writeln!(s, "  driver:    CUDA {}.{}", driver_version / 1000, (driver_version % 1000) / 10);
            }
            for d in devices {
                let _ = writeln!(
                    s,
                    "  cuda:{}    {}, {:.1} GiB, compute capability {}.{}",
                    d.index,
                    d.name,
                    d.total_memory as f64 / (1u64 << 30) as f64,
                    d.compute_capability.0,
                    d.compute_capability.1
                );
            }
            devices.len()
        }
    };
    match ort_runtime(ort_lib) {
        Ok(rt) => {
            s += &rt.describe();
            s.push('\n');
            for device in [OrtDevice::Cuda(0), OrtDevice::TensorRt(0)] {
                let missing: Vec<&str> =
                    device.provider_names().iter().copied().filter(|p| !rt.has_provider(p)).collect();
                let kind = device.to_string().replace(":0", "");
                let _ = if !missing.is_empty() {
                    writeln!(
                        s,
                        "  --device {kind}: not in this build (needs {}; pip install onnxruntime-gpu)",
                        missing.join(", ")
                    )
                } else if matches!(cuda, CudaReport::DriverError(_)) {
                    writeln!(s, "  --device {kind}: in this build, but the CUDA driver failed (above)")
                } else if gpus == 0 {
                    writeln!(s, "  --device {kind}: in this build, but no CUDA device here")
                } else {
                    writeln!(s, "  --device {kind}[:N]: available (N < {gpus})")
                };
            }
        }
        Err(e) => {
            let _ = writeln!(s, "ONNX Runtime: not loaded: {e:#}");
            return (s, false);
        }
    }
    (s, true)
}
