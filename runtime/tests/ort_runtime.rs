//! Locating and loading ONNX Runtime; device selection. (Its own process: the library loads once.)

mod common;

use std::path::Path;

use common::*;
use pfx_runtime::{ort_runtime, OrtBackend, OrtDevice, OrtLibSource, OrtOptions};

#[test]
fn loads_once_and_describes_itself() {
    if !ort_wanted() {
        return;
    }
    let rt = ort_runtime(None).unwrap();
    assert!(rt.version.starts_with("1."), "{}", rt.version);
    assert!(rt.has_provider("CPUExecutionProvider"), "{:?}", rt.providers);
    let d = rt.describe();
    assert!(d.contains(&rt.version) && d.contains("CPUExecutionProvider"), "{d}");
    // Same library again, explicitly: fine, and the same runtime.
    let again = ort_runtime(Some(&rt.lib_path)).unwrap();
    assert!(std::ptr::eq(rt, again));
    // The folder holding it resolves to the same file.
    ort_runtime(Some(rt.lib_path.parent().unwrap())).unwrap();
    if rt.source == OrtLibSource::Python {
        assert!(rt.lib_path.to_string_lossy().contains("capi"), "{}", rt.lib_path.display());
    }
}

#[test]
fn a_second_library_is_an_error() {
    if !ort_wanted() {
        return;
    }
    let dir = scratch("second_library");
    let other = dir.join("libonnxruntime.so.1.99.0");
    std::fs::write(&other, b"not loaded").unwrap();
    let e = format!("{:#}", ort_runtime(Some(&other)).unwrap_err());
    assert!(e.contains("already loaded") && e.contains("one library per process"), "{e}");
    let e = format!("{:#}", ort_runtime(Some(Path::new("/no/such/libonnxruntime.so"))).unwrap_err());
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn gpu_devices_never_fall_back_silently() {
    if !ort_wanted() {
        return;
    }
    let rt = ort_runtime(None).unwrap();
    for device in [OrtDevice::Cuda(0), OrtDevice::TensorRt(0)] {
        let missing: Vec<_> = device.provider_names().iter().filter(|p| !rt.has_provider(p)).collect();
        let r = OrtBackend::open(model("matmul_softmax"), &OrtOptions { device, ..Default::default() });
        if !missing.is_empty() {
            let e = format!("{:#}", r.unwrap_err());
            assert!(e.contains("does not have") && e.contains("onnxruntime-gpu"), "{device}: {e}");
        } else if let Err(e) = r {
            // Provider compiled in but not usable here (no GPU): still an error, never a CPU session.
            eprintln!("{device}: {e:#}");
        }
    }
}
