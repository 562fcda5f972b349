//! Sizing the compute thread pools. `llm-kernels`' pool and candle's operations read
//! `RAYON_NUM_THREADS`, candle's dense matmuls use rayon's global pool: all must agree, and be
//! set before first use. The allocator is set up for the computation
//! at the same time ([`crate::allocator`]).

use crate::error::{EngineError, Result};

/// Variables of candle's and rayon's that a user may set to override these choices (not the
/// functions' settings: the template does not set them).
const RAYON_NUM_THREADS: &str = "RAYON_NUM_THREADS";
const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Sizes both pools to `threads`; `None` sizes them to [`usable_cores`], unless
/// `RAYON_NUM_THREADS` already says. Either way the variable is set: without it, candle counts
/// the cores again at each operation that asks how many threads it has, by reading
/// `/proc/cpuinfo` (9,921 times in one `llm bench` of TinyLlama-shape Q4_0, 128 + 64 tokens:
/// about 50 a decoded token), and decode ran at 57.5–67.0 tok/s against 89.6–95.9 with it set
/// (Zen 5, two threads). Call before any computation, once per process.
pub fn configure(threads: Option<usize>) -> Result<()> {
    crate::allocator::keep_activation_memory();
    let n = match threads {
        Some(0) => return Err(EngineError::Threads("the count must be at least 1".into())),
        Some(n) => n,
        None if std::env::var_os(RAYON_NUM_THREADS).is_some() => return Ok(()),
        None => usable_cores(),
    };
    tracing::info!(threads = n, "compute threads");
    std::env::set_var(RAYON_NUM_THREADS, n.to_string());
    // candle's barrier pool (its elementwise operations on 64 Ki values or more: a prompt's)
    // spins 25,000 times after each job by default, holding the CPU the kernels' pool wakes on
    // next. Zen 5, two threads, 128-token prompt, prefill tok/s, three rounds: TinyLlama-shape
    // Q4_K_M 271.6–331.9 → 386.5–397.3, Llama 3.2 1B-shape Q4_K_M 91.7–424.8 → 411.4–446.3.
    if std::env::var_os(SPIN_LIMIT).is_none() {
        std::env::set_var(SPIN_LIMIT, "1000");
    }
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global().map_err(|e| EngineError::Threads(format!("cannot size the pool: {e}")))
}

/// One thread per core, as candle counts them (physical cores: a second hardware thread of a
/// core adds nothing to products that keep its vector units busy), but no more than this
/// process may run on at once: its CPU affinity (`taskset`, a container's cpuset) and its CPU
/// quota (a container's `--cpus`), which candle's count ignores. Threads that share a CPU take
/// turns at it, and a product waits for the turn of any that holds some of its work. Zen 5,
/// TinyLlama-shape Q4_0, decode tok/s with candle's count (two threads) against one: pinned to
/// one of the two vCPUs (`taskset -c 0`) 3.4–4.3 against 53.4–54.9 on candle's barrier pool,
/// 45.6–46.0 against 48.3–49.5 on `llm-kernels`' own; under a quota of one CPU 33.7 against
/// 55.5 (candle's).
fn usable_cores() -> usize {
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    candle_core::utils::get_num_threads().min(allowed)
}
