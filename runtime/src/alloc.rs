//! Keeps large freed blocks in the process instead of handing them back to the OS after every use.
//!
//! glibc serves each allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap` and unmaps it on
//! free. A training step allocates the same [batch, seq, vocab] tensors every time (64 MB each for GPT-2 at
//! B·T = 320), so each step faults in and zeroes hundreds of MB of new pages: on tract that was ~18% of a GPT-2
//! small step (`cargo bench --bench tract_profile`, 2.03 -> 1.67 s/step). With mmap off and the heap's trim
//! threshold at its maximum, freed blocks are reused by the next step (at ~+80 MB of peak RSS). ONNX Runtime keeps
//! its own arena and gains nothing, so only the tract backend asks for this (`tract_backend::init_process`, when
//! the first model is opened). `PFX_GLIBC_MMAP=1` keeps glibc's defaults. Linux with glibc only; elsewhere this
//! does nothing.

/// Switches glibc to reusing large blocks; affects the whole process from the next allocation on.
pub fn keep_freed_memory() {
    if std::env::var("PFX_GLIBC_MMAP").as_deref() == Ok("1") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (glibc takes its own lock); no pointer is involved.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}
