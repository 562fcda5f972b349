//! What the benchmarks share.

use std::time::Instant;

/// Seconds per call of `f`: one call to warm up, then as many as fit in half a second (three at
/// least).
pub fn seconds(mut f: impl FnMut()) -> f64 {
    f();
    let (mut runs, start) = (0, Instant::now());
    while runs < 3 || start.elapsed().as_secs_f64() < 0.5 {
        f();
        runs += 1;
    }
    start.elapsed().as_secs_f64() / runs as f64
}
