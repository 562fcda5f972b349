//! The loader's rearranging of a matrix into the layout the kernels read it in: out of place
//! (`BlockType::rearrange_into`, a local file's piece on its way into memory) and in place
//! (`BlockType::rearrange`, a download's), 512 rows of TinyLlama-1.1B's `ffn_up` width (about
//! one of the loader's 1 MiB pieces), in cache:
//!
//!     RAYON_NUM_THREADS=1 cargo bench -p llm-kernels --bench layout
//!
//! Prints the bytes rearranged per second, one line per layout; arguments keep the layouts
//! named (`-- Q4KInterleaved Q8_0Interleaved`).

mod common;
use common::{seconds, TYPES};

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

fn main() {
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let (rows, cols) = (512, 2048);
    for (ty, dtype) in TYPES {
        if ty == ty.in_file() || !wanted.is_empty() && !wanted.contains(&format!("{ty:?}")) {
            continue;
        }
        let w = Tensor::randn(0f32, 0.02, (rows, cols), &Device::Cpu).unwrap();
        let file = QTensor::quantize(&w, dtype).unwrap().data().unwrap().into_owned();
        let mut laid_out = vec![0u8; file.len()];
        let out_of_place = seconds(|| ty.rearrange_into(&file, &mut laid_out, cols, false));
        // Laid out again and again: the speed does not depend on what the bytes are.
        let in_place = seconds(|| ty.rearrange(&mut laid_out, cols, false));
        let rate = |seconds: f64| file.len() as f64 / seconds / 1e9;
        println!("{ty:?} {rows}x{cols} ({} KiB), GB/s: out of place {:.2}, in place {:.2}", file.len() >> 10, rate(out_of_place), rate(in_place));
    }
}
