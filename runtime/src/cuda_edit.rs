//! Edits of KV caches that ONNX Runtime keeps in CUDA memory (`ort_backend`, [`Backend::edit_kept`],
//! [`Backend::run_writing`]): a decode step's new keys and values go into their slot with one strided copy per
//! cache (from the step's outputs on the device, or from the host), and a beam reorder copies rows on the device
//! from a snapshot. Without this the whole cache would cross to the GPU
//! before every step (62 MB at B=8 for GPT-2 small).
//!
//! The copies use the CUDA driver (cudarc, loaded at run time) in the device's primary context, the one ONNX
//! Runtime's CUDA provider runs in, and are waited for before ONNX Runtime's next run (which may be on a stream
//! that does not wait for them). Every driver error (and a missing driver: cudarc panics
//! then) is returned as an error.
//!
//! [`Backend::edit_kept`]: crate::backend::Backend::edit_kept
//! [`Backend::run_writing`]: crate::backend::Backend::run_writing

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{result as cu, sys};

use crate::backend::KeptEdit;

/// Device memory holding `len` f32 values, as a raw CUDA address.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeviceF32 {
    pub ptr: u64,
    pub len: usize,
}

/// Applies `edit` to `cache` on CUDA device `ordinal`. A reorder needs `scratch` (at least as long as the cache)
/// for the snapshot it copies rows from; writing a slot needs none. The copies are queued in order on the
/// context's default stream: call [`synchronize`] before ONNX Runtime reads the cache (one wait for all the
/// caches a step edits).
pub(crate) fn apply(ordinal: u32, cache: DeviceF32, scratch: Option<DeviceF32>, edit: &KeptEdit) -> Result<()> {
    edit.check(cache.len)?;
    let scratch = match (edit, scratch) {
        (KeptEdit::WriteSlot { .. }, _) => DeviceF32 { ptr: 0, len: 0 },
        (KeptEdit::Reorder { .. }, Some(s)) if s.len >= cache.len => s,
        (KeptEdit::Reorder { .. }, s) => bail!(
            "a reorder of a cache of {} values needs a scratch buffer as long, got {}",
            cache.len,
            s.map_or(0, |s| s.len)
        ),
    };
    on_device(ordinal, "editing a kept cache", move || {
        match *edit {
            KeptEdit::WriteSlot { new, capacity, slot, width } => {
                let rows = Rows { count: new.len() / width, width, capacity, slot };
                // SAFETY: `check` bounded the rows written by the cache's length; `new` outlives the call, which
                // returns once the host memory has been read.
                unsafe { copy_rows_into_slot(Source::Host(new.as_ptr()), cache, rows)? };
            }
            KeptEdit::Reorder { parents, rows, per_row } => {
                let bytes = per_row * F;
                // SAFETY: both buffers hold at least rows · per_row values (`check`, and the caller's scratch).
                unsafe { cu::memcpy_dtod_sync(scratch.ptr, cache.ptr, rows * bytes)? };
                for i in 0..rows {
                    let from = parents.get(i).copied().unwrap_or(parents[0]);
                    if from != i {
                        let (dst, src) = (cache.ptr + (i * bytes) as u64, scratch.ptr + (from * bytes) as u64);
                        // SAFETY: row blocks inside the buffers (`check` bounds every parent by `rows`).
                        unsafe { cu::memcpy_dtod_sync(dst, src, bytes)? };
                    }
                }
            }
        }
        Ok(())
    })
}

/// Waits until every copy queued on device `ordinal` (by [`apply`]) has finished.
pub(crate) fn synchronize(ordinal: u32) -> Result<()> {
    on_device(ordinal, "waiting for the cache edits", cu::ctx::synchronize)
}

/// Writes each `(new, cache)` pair's rows `new` [N, width], already in device memory (a decode step's output),
/// into slot `slot` of `cache` [N, capacity, width]: one 2-D copy per pair on the device, and one wait for them
/// all. The new keys and values never visit the host.
pub(crate) fn write_slots(
    ordinal: u32,
    pairs: &[(DeviceF32, DeviceF32)],
    capacity: usize,
    slot: usize,
    width: usize,
) -> Result<()> {
    for (new, cache) in pairs {
        crate::backend::check_slot_write(new.len, capacity, slot, width, cache.len)?;
    }
    on_device(ordinal, "writing new keys and values into the kept caches", || {
        for &(new, cache) in pairs {
            let rows = Rows { count: new.len / width, width, capacity, slot };
            // SAFETY: both ranges checked above against the buffers' lengths.
            unsafe { copy_rows_into_slot(Source::Device(new.ptr), cache, rows)? };
        }
        cu::ctx::synchronize()
    })
}

/// Copies host bytes into device memory at each `(address, bytes)`, and waits until they have all landed (the
/// next ONNX Runtime run may be on a stream that does not wait for these copies).
pub(crate) fn upload(ordinal: u32, copies: &[(u64, &[u8])]) -> Result<()> {
    on_device(ordinal, "copying inputs to the device", || {
        for &(dst, bytes) in copies {
            // SAFETY: the caller's buffer at `dst` holds at least `bytes.len()` bytes.
            unsafe { cu::memcpy_htod_sync(dst, bytes)? };
        }
        cu::ctx::synchronize()
    })
}

/// Copies `out.len()` bytes at device address `src` into `out`.
pub(crate) fn download(ordinal: u32, src: u64, out: &mut [u8]) -> Result<()> {
    on_device(ordinal, "copying an output from the device", || {
        // SAFETY: the caller's buffer at `src` holds at least `out.len()` bytes; device-to-host copies into
        // pageable memory return once done.
        unsafe { cu::memcpy_dtoh_sync(out, src) }
    })
}

const F: usize = size_of::<f32>();

/// Where the rows of a slot write come from.
#[derive(Clone, Copy)]
enum Source {
    Host(*const f32),
    Device(u64),
}

/// `count` rows of `width` values, one per block of `capacity` rows in the cache, going into row `slot`.
#[derive(Clone, Copy)]
struct Rows {
    count: usize,
    width: usize,
    capacity: usize,
    slot: usize,
}

/// One 2-D copy: source rows (packed) -> `cache` at `slot` of each block.
///
/// # Safety
/// The source holds `rows.count · rows.width` values and `cache` at least `rows.count · rows.capacity ·
/// rows.width`, with `rows.slot < rows.capacity`.
unsafe fn copy_rows_into_slot(src: Source, cache: DeviceF32, rows: Rows) -> Result<(), cu::DriverError> {
    let (src_type, src_host, src_device) = match src {
        Source::Host(p) => (sys::CUmemorytype::CU_MEMORYTYPE_HOST, p.cast(), 0),
        Source::Device(p) => (sys::CUmemorytype::CU_MEMORYTYPE_DEVICE, std::ptr::null(), p),
    };
    let copy = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: src_type,
        srcHost: src_host,
        srcDevice: src_device,
        srcArray: std::ptr::null_mut(),
        srcPitch: rows.width * F,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: cache.ptr + (rows.slot * rows.width * F) as u64,
        dstArray: std::ptr::null_mut(),
        dstPitch: rows.capacity * rows.width * F,
        WidthInBytes: rows.width * F,
        Height: rows.count,
    };
    // SAFETY: the caller's bounds.
    unsafe { sys::cuMemcpy2D_v2(&copy) }.result()
}

/// Runs `work` with device `ordinal`'s primary context current; a driver error, or a missing driver (cudarc
/// panics then), becomes an error saying what was being done.
fn on_device(ordinal: u32, what: &str, work: impl FnOnce() -> Result<(), cu::DriverError>) -> Result<()> {
    let run = move || -> Result<(), cu::DriverError> {
        make_current(ordinal)?;
        work()
    };
    match crate::devices::without_panics(std::panic::AssertUnwindSafe(run)) {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(anyhow!("CUDA failed {what} on device {ordinal}: {e}")),
        None => Err(anyhow!("the CUDA driver library could not be loaded for {what} on device {ordinal}")),
    }
}

/// Makes device `ordinal`'s primary context current on this thread, retaining it once per process.
fn make_current(ordinal: u32) -> Result<(), cu::DriverError> {
    static RETAINED: OnceLock<Mutex<HashMap<u32, usize>>> = OnceLock::new();
    let mut retained = RETAINED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let ctx = match retained.get(&ordinal) {
        Some(&ctx) => ctx as sys::CUcontext,
        None => {
            cu::init()?;
            let dev = cu::device::get(ordinal as i32)?;
            // SAFETY: `dev` comes from cuDeviceGet; the context is never released (it lives as long as ORT's).
            let ctx = unsafe { cu::primary_ctx::retain(dev)? };
            retained.insert(ordinal, ctx as usize);
            ctx
        }
    };
    // SAFETY: a context retained above.
    unsafe { cu::ctx::set_current(ctx) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nowhere(len: usize) -> DeviceF32 {
        DeviceF32 { ptr: 0, len }
    }

    /// An edit outside the cache is refused before any copy (whether or not a GPU is there).
    #[test]
    fn edits_outside_the_cache_are_refused_first() {
        let new = [1.0f32; 8];
        let write = KeptEdit::WriteSlot { new: &new, capacity: 4, slot: 4, width: 2 };
        let e = apply(0, nowhere(64), None, &write).unwrap_err().to_string();
        assert!(e.contains("slot 4"), "{e}");
        let reorder = KeptEdit::Reorder { parents: &[0, 3], rows: 2, per_row: 8 };
        let e = apply(0, nowhere(64), Some(nowhere(64)), &reorder).unwrap_err().to_string();
        assert!(e.contains("cannot reorder"), "{e}");
        let fits = KeptEdit::Reorder { parents: &[1, 0], rows: 2, per_row: 8 };
        let e = apply(0, nowhere(64), Some(nowhere(32)), &fits).unwrap_err().to_string();
        assert!(e.contains("needs a scratch buffer as long"), "{e}");
        // Device-to-device slot writes: each pair is checked before any copy.
        let e = write_slots(0, &[(nowhere(8), nowhere(64)), (nowhere(8), nowhere(15))], 4, 1, 2).unwrap_err();
        assert!(e.to_string().contains("cache of 15 values"), "{e}");
    }

    /// Without a CUDA driver an edit is an error that says so, not a panic.
    #[test]
    fn no_driver_is_an_error() {
        // SAFETY: only tries to open the library by its usual names.
        let present = crate::devices::without_panics(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
        if present {
            eprintln!("a CUDA driver is here: this checks the machines without one");
            return;
        }
        let new = [1.0f32; 8];
        let write = KeptEdit::WriteSlot { new: &new, capacity: 4, slot: 1, width: 2 };
        let e = apply(0, nowhere(64), None, &write).unwrap_err().to_string();
        assert!(e.contains("CUDA driver library could not be loaded") || e.contains("CUDA failed"), "{e}");
        let e = write_slots(0, &[(nowhere(8), nowhere(64))], 4, 1, 2).unwrap_err().to_string();
        assert!(e.contains("CUDA driver library could not be loaded") || e.contains("CUDA failed"), "{e}");
        let e = upload(0, &[(0, &[0u8; 4][..])]).unwrap_err().to_string();
        assert!(e.contains("CUDA driver library could not be loaded") || e.contains("CUDA failed"), "{e}");
    }
}
