//! glibc's malloc thresholds, set for a forward pass's activations.
//!
//! Every product's output is a fresh buffer of up to tens of MiB (a 512-token prompt's MLP
//! projections: 11.5 MiB each). By default glibc serves such sizes with `mmap` and gives them
//! back with `munmap`, or from the heap, which it trims after: either way the next layer's
//! buffers are faulted in again, page by page, zeroed by the kernel (`perf`, 512-token prompt:
//! page faults, page clearing and `memset` about 4 % of the samples, on every thread). Keeping
//! freed memory lets the next layer reuse it, as llama.cpp's one compute buffer is reused (Q4_0,
//! 512-token prompt, 2 threads, paired runs: prefill +10–13 %, peak RSS +30 MiB on a 609 MiB
//! file).

/// Allocations up to this size come from the heap and are reused once freed (glibc's largest
/// allowed value on 64-bit).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory kept at the heap's top before any is given back.
const TRIM_THRESHOLD: i32 = 64 << 20;

/// Sets the thresholds; once per process, before the first forward pass
/// ([`crate::threads::configure`] calls it).
pub fn keep_activation_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` changes two of glibc's malloc parameters, under its own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Gives the memory malloc holds free back to the system, from every thread's heap. Called once
/// a model's tokenizer is built (reading Llama 3's frees tens of MiB that the thresholds above
/// would otherwise keep while the weights are paged in or downloaded, which is when the process
/// peaks) and once a download ends (`llm_api::model_source`).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free pages, under malloc's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
