//! Sizing the compute thread pools. candle's quantized kernels read `RAYON_NUM_THREADS`, its
//! dense matmuls use rayon's global pool: both must agree, and be set before first use.

pub fn configure(threads: Option<usize>) -> anyhow::Result<()> {
    let Some(n) = threads else {
        return Ok(());
    };
    anyhow::ensure!(n > 0, "--threads must be at least 1");
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("cannot size the thread pool: {e}"))
}
