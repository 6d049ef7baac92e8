//! Process-wide allocator setting for tensor workloads.
//!
//! Every candle op allocates its output, and a CNN step at batch 128 allocates feature maps of
//! several MB. glibc serves blocks above its mmap threshold with a fresh `mmap` and returns
//! them with `munmap` on free (and trims the heap top above its trim threshold), so each such
//! tensor pays page faults on first touch and a TLB shootdown on free. Measured on an
//! elastification run (2-vCPU AMD EPYC, 1 kernel thread): page-fault handling was ~7 % of the
//! training thread's time, and raising both thresholds made stage 1 10 % faster
//! (542 -> 595 samples/s) and stage 0 5 % faster. The cost: freed memory stays in the process
//! (bounded by the peak working set) instead of going back to the OS.

/// Keeps freed tensor memory in the process for reuse: raises glibc's mmap threshold to its
/// maximum (32 MiB on 64-bit) and stops heap trimming. Call once at program start, before
/// threads start; a no-op on other C libraries and platforms. Returns whether it applied.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; both values are in range.
        unsafe {
            let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            let pad = libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            mmap == 1 && trim == 1 && pad == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Gives freed memory back to the OS (glibc `malloc_trim`): for the end of a phase that held
/// far more than what follows, such as the edge agent's search (its cross-generation cache
/// may hold GBs of activations) before serving, since [`retain_freed_memory`] keeps freed
/// memory in the process otherwise. A no-op elsewhere; returns whether memory was released.
pub fn release_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free heap memory to the OS.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
