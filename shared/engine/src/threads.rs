//! Sizing the compute thread pools. candle's quantized kernels and its barrier pool (which
//! `llm-kernels` runs on) read `RAYON_NUM_THREADS`, its dense matmuls use rayon's global pool:
//! both must agree, and be set before first use. The allocator is set up for the computation
//! at the same time ([`crate::allocator`]).

use crate::error::{EngineError, Result};

/// Sizes both pools to `threads`; `None` leaves them at one thread per core. Call before any
/// computation, once per process.
pub fn configure(threads: Option<usize>) -> Result<()> {
    crate::allocator::keep_activation_memory();
    let Some(n) = threads else {
        return Ok(());
    };
    if n == 0 {
        return Err(EngineError::Threads("the count must be at least 1".into()));
    }
    tracing::info!(threads = n, "compute threads");
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| EngineError::Threads(format!("cannot size the pool: {e}")))
}
