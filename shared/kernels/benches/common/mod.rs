//! What the benchmarks share.

use std::time::Instant;

/// Seconds per call of `f`: the fastest of the calls that fit in a second (three at least),
/// after one to warm up. On a shared machine, other work slows some calls down: the mean of all
/// of them moved by a third from run to run, the fastest by a few percent.
pub fn seconds(mut f: impl FnMut()) -> f64 {
    f();
    let (mut runs, mut fastest, start) = (0, f64::MAX, Instant::now());
    while runs < 3 || start.elapsed().as_secs_f64() < 1.0 {
        let call = Instant::now();
        f();
        fastest = fastest.min(call.elapsed().as_secs_f64());
        runs += 1;
    }
    fastest
}
