//! Allocation settings: large freed blocks kept in the process, and weights streamed every step on huge pages.
//!
//! Freed blocks:
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

/// Gives the pages of freed blocks back to the OS once (glibc's `malloc_trim`). For after loading a model:
/// parsing holds a copy of the weights that optimization replaces, and with [`keep_freed_memory`] the heap would
/// keep those pages for good.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages (glibc takes its own lock); no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `len` zeros in memory the kernel is asked to back with transparent huge pages (2 MB) where it can (Linux;
/// elsewhere, or where THP is off, plain memory). For large arrays read front to back again and again, like
/// the packed weights of one-token decoding: 4 KB pages cost a TLB miss every 4 KB, and a B=8 GPT-2 decode
/// step's weight products took 26–28 ms on them against 22–24 ms on huge pages (`tract_profile`, 3 runs each).
pub fn zeroed_on_huge_pages<T: Copy + Default>(len: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        // The advice must come before the pages are first written; only whole 2 MB pages inside the block count.
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let (first, end) = (start.next_multiple_of(HUGE), (start + len * size_of::<T>()) / HUGE * HUGE);
        if end > first {
            // SAFETY: the range lies inside `v`'s allocation, and the advice changes no memory contents (a
            // failure, e.g. THP compiled out, leaves plain pages).
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
    v.resize(len, T::default());
    v
}
