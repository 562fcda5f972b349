//! Every SIMD product this CPU runs against the scalar definition (same quantized activations:
//! equal up to float summation order) and against candle's dequantized weights in f32 (the
//! quantization of the activations is the only difference).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use llm_kernels::{
    float_matmuls, float_matmuls_with, matmul, matmul_with, matmuls, matmuls_with, products, scalar, BlockType, Float, FloatMatrix, Kernels, Matrix, QMatrix,
    QuantizedRows, FLOAT_ROW_MULTIPLE,
};
use rand::{Rng, SeedableRng};

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

const TYPES: [BlockType; 21] = [
    BlockType::Q8_0,
    BlockType::Q8_0Interleaved,
    BlockType::Q4_0,
    BlockType::Q4_0ScalesFirst,
    BlockType::Q4_0Interleaved,
    BlockType::Q4_1,
    BlockType::Q4_1Interleaved,
    BlockType::Q5_0,
    BlockType::Q5_0Interleaved,
    BlockType::Q5_1,
    BlockType::Q5_1Interleaved,
    BlockType::Q2K,
    BlockType::Q2KInterleaved,
    BlockType::Q3K,
    BlockType::Q3KInterleaved,
    BlockType::Q4K,
    BlockType::Q4KInterleaved,
    BlockType::Q5K,
    BlockType::Q5KInterleaved,
    BlockType::Q6K,
    BlockType::Q6KInterleaved,
];

/// A random `rows × cols` matrix quantized by candle (the GGUF block layout) and its f32 value.
fn weights(ty: BlockType, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    weights_of(ty, random(rows * cols, 7), rows, cols)
}

/// `values`, `rows × cols`, quantized by candle (and laid out as `ty`), and their f32 value.
fn weights_of(ty: BlockType, values: Vec<f32>, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let dtype = match ty.in_file() {
        BlockType::Q8_0 => GgmlDType::Q8_0,
        BlockType::Q4_0 => GgmlDType::Q4_0,
        BlockType::Q4_1 => GgmlDType::Q4_1,
        BlockType::Q5_0 => GgmlDType::Q5_0,
        BlockType::Q5_1 => GgmlDType::Q5_1,
        BlockType::Q2K => GgmlDType::Q2K,
        BlockType::Q3K => GgmlDType::Q3K,
        BlockType::Q4K => GgmlDType::Q4K,
        BlockType::Q5K => GgmlDType::Q5K,
        BlockType::Q6K => GgmlDType::Q6K,
        _ => unreachable!("the kernels' layouts, not a file's type"),
    };
    let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let dense = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut bytes = q.data().unwrap().into_owned();
    ty.rearrange(&mut bytes, cols, false);
    (bytes, dense)
}

#[test]
fn the_best_kernels_are_simd_on_x86_64_and_arm64() {
    if cfg!(target_arch = "x86_64") {
        assert_ne!(Kernels::best(), Kernels::Scalar, "the build targets AVX2");
    }
    if cfg!(target_arch = "aarch64") {
        assert_eq!(Kernels::best(), Kernels::NeonDot, "every arm64 Lambda host (Graviton2 and later) has dot products");
    }
}

#[test]
fn the_kernels_can_be_capped_at_slower_ones() {
    assert_eq!(Kernels::fastest_up_to(Kernels::Scalar), Kernels::Scalar);
    assert_eq!(Kernels::fastest_up_to(Kernels::SIMD[0]), Kernels::SIMD.into_iter().find(|k| k.runs_here()).unwrap_or(Kernels::Scalar));
    if Kernels::Avx2.runs_here() {
        assert_eq!(Kernels::fastest_up_to(Kernels::Avx2), Kernels::Avx2, "AVX-512 is above the cap");
    }
    assert_eq!(Kernels::named("avx2"), Some(Kernels::Avx2));
    assert_eq!(Kernels::named("neon-dot"), Some(Kernels::NeonDot));
    assert_eq!(Kernels::named("AVX2"), None);
}

#[test]
fn simd_equals_the_scalar_definition_and_f32_within_activation_rounding() {
    let kernels: Vec<Kernels> = Kernels::SIMD.into_iter().filter(|k| k.runs_here()).collect();
    eprintln!("kernels this CPU runs: {kernels:?}");
    for (kernels, ty) in kernels.iter().flat_map(|&k| TYPES.map(|ty| (k, ty))) {
        // Row and activation counts that leave remainders after every tile and panel size, and
        // both sides of where the panels start (AVX-512: 7 rows for the K-quants, 12 for the
        // others, 7 for Q4_0 and Q4_1 on a Zen 4; AVX2: 12, 16 for Q4_0 and Q4_1, 20 for Q5_0
        // and Q5_1, 32 for Q8_0).
        let shapes = [
            (1, 32, 1),
            (5, 64, 2),
            (8, 256, 3),
            (67, 96, 7),
            (64, 512, 1),
            (130, 128, 16),
            (9, 768, 5),
            (67, 96, 33),
            (37, 768, 41),
            (3, 608, 2),
            (9, 768, 6),
            (9, 768, 7),
            (67, 96, 11),
            (67, 96, 12),
            (9, 768, 11),
            (9, 768, 12),
            (9, 768, 15),
            (9, 768, 16),
            (37, 256, 19),
            (37, 256, 20),
            (67, 96, 31),
            (67, 96, 32),
            // Rows of more than 10 KiB in every type but Q4_K and Q5_K, whose tiles then ask
            // for the tiles ahead into L2.
            (3, 32768, 1),
            (2, 32768, 2),
            // Whole groups of 16 rows, which the 16-row layouts take, by every tile of 1–4
            // activation rows, tiles left over, and panels (from 16, 24, 32 or 128 rows for those
            // layouts).
            (16, 96, 4),
            (16, 256, 130),
            (16, 768, 1),
            (32, 256, 2),
            (48, 512, 3),
            (16, 256, 6),
            (32, 768, 7),
            (16, 512, 13),
            (16, 256, 33),
            (16, 32768, 1),
        ];
        for (rows, cols, m) in shapes.into_iter().filter(|(rows, cols, _)| cols % ty.block_values() == 0 && rows % ty.rows_together() == 0) {
            let (bytes, dense) = weights(ty, rows, cols);
            let w = QMatrix::new(ty, rows, cols, &bytes).unwrap();
            let x = random(m * cols, 11);
            let mut y = vec![f32::NAN; m * rows];
            matmul_with(kernels, &w, &x, &mut y).unwrap();

            assert_scalar(kernels, &w, &x, &y);
            for i in 0..m {
                for r in 0..rows {
                    let got = y[i * rows + r];
                    let f32_dot: f32 = (0..cols).map(|j| x[i * cols + j] * dense[r * cols + j]).sum();
                    // Activations rounded to 1/254 of each block's (super-block's) largest magnitude.
                    let bound = 0.01 * (cols as f32).sqrt();
                    assert!((got - f32_dot).abs() <= bound, "{kernels:?} {ty:?} {rows}x{cols} [{i},{r}]: {got} vs f32 {f32_dot}");
                }
            }
        }
    }
}

/// `y`, what `kernels` computed for `x · Wᵀ`, is the scalar definition's value up to float
/// summation order.
fn assert_scalar(kernels: Kernels, w: &QMatrix, x: &[f32], y: &[f32]) {
    let (ty, rows, cols) = (w.ty, w.rows, w.cols);
    let q = QuantizedRows::new(x, cols, ty.block_values());
    for i in 0..x.len() / cols {
        for r in 0..rows {
            let got = y[i * rows + r];
            let exact = scalar::dot(ty.in_file(), &w.row_in_file(r), &q, i);
            assert!((got - exact).abs() <= 1e-4 * (1.0 + exact.abs()), "{kernels:?} {ty:?} {rows}x{cols} [{i},{r}]: {got} vs {exact}");
        }
    }
}

/// Random values seldom come near what the integer sums can hold; these put every code and
/// every activation at an extreme (all weights but one per 16 equal, activations ±1), for a
/// decode step, tiles of 3 and 4 activation rows (and 4 + 2) and a panel.
#[test]
fn extreme_codes_and_activations_do_not_overflow() {
    let (rows, cols) = (16, 512);
    for kernels in Kernels::SIMD.into_iter().filter(|k| k.runs_here()) {
        for ty in TYPES {
            let sign = |r: usize| if r.is_multiple_of(2) { 1.0 } else { -1.0 };
            let values = (0..rows * cols).map(|at| (at / cols, at % cols)).map(|(r, j)| sign(r) * if j % 16 == r % 16 { -1.0 } else { 1.0 }).collect();
            let (bytes, _) = weights_of(ty, values, rows, cols);
            let w = QMatrix::new(ty, rows, cols, &bytes).unwrap();
            for m in [1, 3, 4, 6, 40] {
                let x: Vec<f32> = (0..m * cols).map(|at| sign(at / cols)).collect();
                let mut y = vec![f32::NAN; m * rows];
                matmul_with(kernels, &w, &x, &mut y).unwrap();
                assert_scalar(kernels, &w, &x, &y);
            }
        }
    }
}

#[test]
fn shapes_that_do_not_match_are_refused() {
    let (bytes, _) = weights(BlockType::Q8_0, 4, 64);
    assert!(QMatrix::new(BlockType::Q8_0, 4, 48, &bytes).is_err(), "48 values are not whole blocks");
    assert!(QMatrix::new(BlockType::Q8_0, 5, 64, &bytes).is_err(), "too few bytes for 5 rows");
    let (q4_k, _) = weights(BlockType::Q4K, 8, 256);
    assert!(QMatrix::new(BlockType::Q4K, 8, 256, &q4_k).is_ok());
    assert!(QMatrix::new(BlockType::Q4KInterleaved, 8, 256, &q4_k).is_err(), "its layout takes rows 16 at a time");
    let (q4_0, _) = weights(BlockType::Q4_0, 24, 64);
    assert!(QMatrix::new(BlockType::Q4_0Interleaved, 24, 64, &q4_0).is_err(), "its layout takes rows 16 at a time");
    let w = QMatrix::new(BlockType::Q8_0, 4, 64, &bytes).unwrap();
    assert!(matmul(&w, &[0.0; 65], &mut [0.0; 4]).is_err());
    assert!(matmul(&w, &[0.0; 64], &mut [0.0; 3]).is_err());
    let (wide, _) = weights(BlockType::Q8_0, 4, 96);
    let wide = QMatrix::new(BlockType::Q8_0, 4, 96, &wide).unwrap();
    assert!(matmuls(&mut [(w, &mut [0.0; 4]), (wide, &mut [0.0; 4])], &[0.0; 64]).is_err(), "products of one input take rows of one length");
}

/// Matrices of types whose kernels read the activations differently (blocks of 32 or 256
/// values, panels of groups of 32 or 16) in one job: each output is what its product alone
/// gives, for a decode step, a few rows, a batch's rows that go through panels for some types
/// and tiles for others (8 with AVX-512, 16 with AVX2), and a prompt's panels.
#[test]
fn several_products_of_one_input_equal_each_alone() {
    let cols = 512;
    // Q3_K and Q6_K (and Q4_0 and Q8_0) read alike but for their code offsets; a matrix of no
    // rows has no work items, so the next one's start at the same item.
    let shapes = [
        (BlockType::Q4K, 67),
        (BlockType::Q6K, 16),
        (BlockType::Q3K, 9),
        (BlockType::Q8_0, 33),
        (BlockType::Q2K, 0),
        (BlockType::Q4_0, 20),
        (BlockType::Q4_0ScalesFirst, 7),
        (BlockType::Q4K, 5),
        (BlockType::Q4KInterleaved, 32),
        (BlockType::Q4_0Interleaved, 16),
        (BlockType::Q5_0Interleaved, 32),
        (BlockType::Q8_0Interleaved, 16),
        (BlockType::Q4_1Interleaved, 16),
        (BlockType::Q5_1Interleaved, 32),
        (BlockType::Q6KInterleaved, 16),
        (BlockType::Q5KInterleaved, 32),
        (BlockType::Q3KInterleaved, 16),
        (BlockType::Q2KInterleaved, 32),
    ];
    let matrices: Vec<(Vec<u8>, usize)> = shapes.iter().map(|&(ty, rows)| (weights(ty, rows, cols).0, rows)).collect();
    let ws: Vec<QMatrix> = shapes.iter().zip(&matrices).map(|(&(ty, rows), (bytes, _))| QMatrix::new(ty, rows, cols, bytes).unwrap()).collect();
    for kernels in Kernels::SIMD.into_iter().filter(|k| k.runs_here()) {
        for m in [1, 3, 8, 16, 40] {
            let x = random(m * cols, 5);
            let alone: Vec<Vec<f32>> = ws
                .iter()
                .map(|w| {
                    let mut y = vec![f32::NAN; m * w.rows];
                    matmul_with(kernels, w, &x, &mut y).unwrap();
                    y
                })
                .collect();
            let mut together: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; m * w.rows]).collect();
            let mut products: Vec<(QMatrix, &mut [f32])> = ws.iter().copied().zip(together.iter_mut().map(Vec::as_mut_slice)).collect();
            matmuls_with(kernels, &mut products, &x).unwrap();
            assert_eq!(together, alone, "{kernels:?}, {m} activation rows");
        }
    }
}

/// Float weights (f32, f16, bf16): every kernel set this CPU runs (the scalar fallback, which
/// arm64 takes, too) against the product in `f64` of the same values, for a decode step, the few
/// rows of a batch, and a prompt's tiles with rows left over (weight rows and activation rows not
/// whole tiles); several products in one job equal each alone.
#[test]
fn float_products_equal_f64_sums_of_the_same_values() {
    // Short rows; rows longer than a tile's block of activations from two activation rows on
    // (later blocks add to the sums of the first, the last block shorter for every tile height);
    // and rows longer than a block even for one activation row (a decode step).
    // From 16 (f32) or 32 (f16, bf16) activation rows, with AVX-512, the products go through
    // panels of 48 activation rows, and f32 ones with AVX2 (and AVX-512 under 24 rows: 16, 20)
    // through panels of 16: one just under each threshold, panels of one, two and three
    // registers, a last panel narrower than the others (100) and as wide (80). Groups of 64
    // weight rows leave 4 to a tile of 4 with AVX2's tiles of 6, and so do groups of 12 (520
    // rows at 16 threads) with AVX-512's tiles of 8; the 37 rows leave rows for tiles of one.
    for cols in [FLOAT_ROW_MULTIPLE * 10, FLOAT_ROW_MULTIPLE * 263, FLOAT_ROW_MULTIPLE * 523] {
        let shapes =
            if cols == FLOAT_ROW_MULTIPLE * 10 { vec![(520, 15), (37, 11), (4, 12), (1, 13), (0, 14)] } else { vec![(37, 11), (4, 12), (1, 13), (0, 14)] };
        for ty in [Float::F32, Float::F16, Float::Bf16] {
            let matrices: Vec<(Vec<u8>, Vec<f32>)> = shapes.iter().map(|&(rows, seed)| stored(ty, &random(rows * cols, seed))).collect();
            let ws: Vec<FloatMatrix> = shapes.iter().zip(&matrices).map(|(&(rows, _), (b, _))| FloatMatrix::new(ty, rows, cols, b).unwrap()).collect();
            for kernels in Kernels::SIMD.into_iter().chain([Kernels::Scalar]).filter(|k| k.runs_here()) {
                for m in [1, 2, 3, 5, 6, 7, 8, 13, 15, 16, 20, 24, 31, 32, 47, 80, 100] {
                    let x = random(m * cols, 5);
                    let mut together: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; m * w.rows]).collect();
                    let mut products: Vec<(FloatMatrix, &mut [f32])> = ws.iter().copied().zip(together.iter_mut().map(Vec::as_mut_slice)).collect();
                    float_matmuls_with(kernels, &mut products, &x).unwrap();
                    for ((w, (_, values)), y) in ws.iter().zip(&matrices).zip(&together) {
                        let mut alone = vec![f32::NAN; m * w.rows];
                        float_matmuls_with(kernels, &mut [(*w, &mut alone)], &x).unwrap();
                        assert_eq!(&alone, y, "{ty:?}, {kernels:?}, {m}×{cols}: one job of several products");
                        for i in 0..m {
                            for r in 0..w.rows {
                                let exact: f64 = (0..cols).map(|k| f64::from(values[r * cols + k]) * f64::from(x[i * cols + k])).sum();
                                let got = y[i * w.rows + r];
                                assert!(
                                    (f64::from(got) - exact).abs() < 1e-5 * cols as f64,
                                    "{ty:?}, {kernels:?}, {m}×{cols}: y[{i}][{r}] = {got}, not {exact}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `values` in `ty` as a file holds them (little-endian), and the values those bytes stand for.
fn stored(ty: Float, values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let each = |v: f32| match ty {
        Float::F32 => (v.to_le_bytes().to_vec(), v),
        Float::F16 => (half::f16::from_f32(v).to_le_bytes().to_vec(), half::f16::from_f32(v).to_f32()),
        Float::Bf16 => (half::bf16::from_f32(v).to_le_bytes().to_vec(), half::bf16::from_f32(v).to_f32()),
    };
    let (mut bytes, mut exact) = (Vec::new(), Vec::new());
    for (b, v) in values.iter().map(|&v| each(v)) {
        bytes.extend(b);
        exact.push(v);
    }
    (bytes, exact)
}

#[test]
fn float_shapes_that_do_not_match_are_refused() {
    let bytes = vec![0u8; 2 * 4 * 32];
    assert!(FloatMatrix::new(Float::F16, 4, 24, &bytes[..2 * 4 * 24]).is_err(), "rows of 24 values are not whole registers");
    assert!(FloatMatrix::new(Float::Bf16, 5, 32, &bytes).is_err(), "too few bytes for 5 rows");
    assert!(FloatMatrix::new(Float::F32, 4, 32, &bytes).is_err(), "too few bytes for 4 rows of f32");
    assert!(FloatMatrix::new(Float::F32, 2, 32, &bytes).is_ok());
    let w = FloatMatrix::new(Float::F16, 4, 32, &bytes).unwrap();
    assert!(float_matmuls(&mut [(w, &mut [0.0; 4])], &[0.0; 33]).is_err());
    assert!(float_matmuls(&mut [(w, &mut [0.0; 3])], &[0.0; 32]).is_err());
}

/// [`products`]: block and float matrices that take one input, in one call, each giving what it
/// gives alone; matrices of the two kinds whose rows differ in length are refused.
#[test]
fn products_of_both_kinds_equal_each_alone() {
    let cols = 64;
    let (blocks, _) = weights(BlockType::Q8_0, 5, cols);
    let halves: Vec<u8> = random(3 * cols, 3).into_iter().flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect();
    let (q, h) = (QMatrix::new(BlockType::Q8_0, 5, cols, &blocks).unwrap(), FloatMatrix::new(Float::F16, 3, cols, &halves).unwrap());
    let x = random(2 * cols, 9);
    let (mut yq, mut yh) = (vec![f32::NAN; 2 * 5], vec![f32::NAN; 2 * 3]);
    products(&mut [(Matrix::Blocks(q), &mut yq), (Matrix::Float(h), &mut yh)], &x).unwrap();
    let (mut alone_q, mut alone_h) = (vec![f32::NAN; 2 * 5], vec![f32::NAN; 2 * 3]);
    matmul(&q, &x, &mut alone_q).unwrap();
    float_matmuls(&mut [(h, &mut alone_h)], &x).unwrap();
    assert_eq!((yq.clone(), yh), (alone_q, alone_h));
    let wide = vec![0u8; 2 * 3 * 96];
    let wide = FloatMatrix::new(Float::F16, 3, 96, &wide).unwrap();
    assert!(products(&mut [(Matrix::Blocks(q), &mut yq), (Matrix::Float(wide), &mut [0.0; 6])], &x).is_err(), "one input, rows of one length");
}
