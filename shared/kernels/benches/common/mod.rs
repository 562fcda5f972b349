//! What the benchmarks share.

use std::time::Instant;

use candle_core::quantized::GgmlDType;
use llm_kernels::BlockType;

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

/// Every block type the kernels take, with candle's name for it (to quantize test weights).
#[allow(dead_code)] // the attention benchmark has no weights
pub const TYPES: [(BlockType, GgmlDType); 21] = [
    (BlockType::Q8_0, GgmlDType::Q8_0),
    (BlockType::Q8_0Interleaved, GgmlDType::Q8_0),
    (BlockType::Q4_0, GgmlDType::Q4_0),
    (BlockType::Q4_0ScalesFirst, GgmlDType::Q4_0),
    (BlockType::Q4_0Interleaved, GgmlDType::Q4_0),
    (BlockType::Q4_1, GgmlDType::Q4_1),
    (BlockType::Q4_1Interleaved, GgmlDType::Q4_1),
    (BlockType::Q5_0, GgmlDType::Q5_0),
    (BlockType::Q5_0Interleaved, GgmlDType::Q5_0),
    (BlockType::Q5_1, GgmlDType::Q5_1),
    (BlockType::Q5_1Interleaved, GgmlDType::Q5_1),
    (BlockType::Q2K, GgmlDType::Q2K),
    (BlockType::Q2KInterleaved, GgmlDType::Q2K),
    (BlockType::Q3K, GgmlDType::Q3K),
    (BlockType::Q3KInterleaved, GgmlDType::Q3K),
    (BlockType::Q4K, GgmlDType::Q4K),
    (BlockType::Q4KInterleaved, GgmlDType::Q4K),
    (BlockType::Q5K, GgmlDType::Q5K),
    (BlockType::Q5KInterleaved, GgmlDType::Q5K),
    (BlockType::Q6K, GgmlDType::Q6K),
    (BlockType::Q6KInterleaved, GgmlDType::Q6K),
];
