//! Matrix products on the CPU: `y = x · Wᵀ` with `W` in a GGML block format (or of plain floats).
//!
//! Owns the hot loop of inference. The weights are read in place (the bytes of the GGUF tensor,
//! never copied; only the quantized types' are rearranged, in place, 16 rows together where
//! AVX-512's tiles read them, and Q4_0's otherwise where AVX2's do:
//! [`Kernels::layout`]); the activations are quantized once per product (once for the products
//! of one input that read them alike, [`matmuls`]) to 8-bit blocks, as llama.cpp does, so that
//! each weight block meets an activation block in an integer dot product. Many activation rows
//! (a prompt) share every weight load: the product is computed in tiles of weight rows ×
//! activation rows, so prefill is a matrix product, not repeated vector products.
//! Work is spread over the crate's own pool of threads ([`threads`]), whose waiting threads soon
//! give up their CPU (to candle's pool among others), a product's rows in one contiguous share a
//! thread (`shares`). Matrices of plain floats (f32, f16, bf16) go through tiles of their own
//! ([`float_matmuls`]), in place too, their activations left in `f32`.
//!
//! The SIMD kernels are chosen at run time ([`Kernels::best`]): the binary is built for the
//! AVX2 that every Lambda x86_64 host has, and uses AVX-512 VNNI where the host has it too; on
//! arm64 it uses NEON's dot products, which every Graviton has. On a CPU without any of these
//! the caller keeps candle's kernels. [`scalar`] is the portable definition
//! the SIMD kernels are tested against.
//!
//! Also owns the other loops a forward pass spends its time in beside the weights: attention
//! of the new positions over the KV cache, a decode step's and a prompt's ([`attention`]); and
//! the MLP's gating between two products ([`silu_mul`]), whose exponentials candle takes one
//! libm call at a time.

/// Defines `fn $name($args)`, which runs `$portable` (an `#[inline(always)]` function whose loops
/// are written so that they vectorize) compiled for the widest registers [`Kernels::best`] has.
macro_rules! widest_registers {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $portable:path) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,fma")]
            unsafe fn avx512($($arg: $ty),*) {
                $portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                $portable($($arg),*)
            }
            match $crate::Kernels::best() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX-512 (`Kernels::best` found it).
                $crate::Kernels::Avx512Vnni => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above, AVX2 and FMA.
                $crate::Kernels::Avx2 => unsafe { avx2($($arg),*) },
                _ => $portable($($arg),*),
            }
        }
    };
}

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod activations;
mod attention;
mod blocks;
mod exp;
mod floats;
mod pool;
pub mod scalar;
mod shares;
mod softmax;
mod swiglu;
mod tiles;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::borrow::Cow;
use std::sync::OnceLock;

pub use activations::QuantizedRows;
pub use attention::{attention, AttentionShape, CachedKv};
pub use blocks::BlockType;
pub use floats::{float_matmuls, float_matmuls_with, Float, FloatMatrix, FLOAT_ROW_MULTIPLE};
pub use pool::threads;
pub use swiglu::silu_mul;

/// An implementation of the products, by the instructions it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// 512-bit registers and `vpdpbusd` (Intel since Cascade Lake, AMD since Zen 4).
    Avx512Vnni,
    /// 256-bit `maddubs`/`madd` with FMA and F16C.
    Avx2,
    /// 128-bit NEON with `sdot` (arm64 since Graviton2 and Apple M1).
    NeonDot,
    /// [`scalar`]: correct everywhere, too slow to serve with.
    Scalar,
}

/// [`Kernels::best`], once chosen.
static BEST: OnceLock<Kernels> = OnceLock::new();

impl Kernels {
    /// Every SIMD implementation, fastest first.
    pub const SIMD: [Self; 3] = [Self::Avx512Vnni, Self::Avx2, Self::NeonDot];

    /// The fastest kernels this CPU runs ([`Kernels::limit`] aside); detected once.
    pub fn best() -> Self {
        *BEST.get_or_init(|| Self::fastest_up_to(Self::SIMD[0]))
    }

    /// Makes [`Kernels::best`] no faster than `limit`, so that one machine measures what a host
    /// without the faster kernels runs (`llm bench --kernels avx2`); returns what it chose.
    /// Only before the first product: afterwards the choice stands and this returns it.
    pub fn limit(limit: Self) -> Self {
        *BEST.get_or_init(|| Self::fastest_up_to(limit))
    }

    /// The fastest kernels this CPU runs among `limit` and the slower ones.
    pub fn fastest_up_to(limit: Self) -> Self {
        let slower = Self::SIMD.iter().position(|&k| k == limit).map_or(&[][..], |at| &Self::SIMD[at..]);
        slower.iter().copied().find(|k| k.runs_here()).unwrap_or(Self::Scalar)
    }

    /// The kernels called `name` (`avx512-vnni`, `avx2`, `neon-dot` or `scalar`).
    pub fn named(name: &str) -> Option<Self> {
        Self::NAMES.into_iter().find_map(|(n, k)| (n == name).then_some(k))
    }

    /// What [`Kernels::named`] calls these.
    pub fn name(self) -> &'static str {
        Self::NAMES.into_iter().find_map(|(n, k)| (k == self).then_some(n)).expect("every kernel set has a name")
    }

    const NAMES: [(&'static str, Self); 4] = [("avx512-vnni", Self::Avx512Vnni), ("avx2", Self::Avx2), ("neon-dot", Self::NeonDot), ("scalar", Self::Scalar)];

    /// How these kernels read `m` activation rows [`activations::Interleaved`] against `ty`'s
    /// weights, if they do: x86's panels.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // only x86 has panels
    fn interleaving(self, ty: BlockType, m: usize) -> Option<activations::Interleaving> {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni | Self::Avx2 => x86::interleaving(ty, m, self == Self::Avx512Vnni),
            _ => None,
        }
    }

    /// The layout these kernels read `ty`'s matrices of `rows` rows in fastest, which the loader
    /// may rearrange them into: with AVX-512, the 16-row layouts of every quantized type
    /// ([`BlockType::Q8_0Interleaved`], [`BlockType::Q4_0Interleaved`], ...,
    /// [`BlockType::Q4KInterleaved`], ..., [`BlockType::Q2KInterleaved`]; a whole number of their
    /// groups of rows);
    /// [`BlockType::Q4_0ScalesFirst`] for other Q4_0 matrices where AVX2's tiles decode them
    /// (AVX2, and AVX-512 on a Zen 4); otherwise `ty` as the file has it.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // only x86 has layouts
    pub fn layout(self, ty: BlockType, rows: usize) -> BlockType {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni | Self::Avx2 => x86::layout(ty, rows, self == Self::Avx512Vnni),
            _ => ty,
        }
    }

    /// Whether this CPU has the instructions these kernels need.
    pub fn runs_here(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => x86::avx512::detected(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => x86::avx2::detected(),
            #[cfg(target_arch = "aarch64")]
            Self::NeonDot => aarch64::detected(),
            Self::Scalar => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// Whether this CPU has a SIMD kernel; when it does not, [`matmul`] would fall back to the
/// slow [`scalar`] one and the caller had better use another implementation.
pub fn available() -> bool {
    Kernels::best() != Kernels::Scalar
}

/// Shape errors: the caller's tensors do not match the product it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

/// A weight matrix of `rows` rows of `cols` values, in `ty`'s blocks, row after row.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    pub ty: BlockType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

impl<'a> QMatrix<'a> {
    pub fn new(ty: BlockType, rows: usize, cols: usize, bytes: &'a [u8]) -> Result<Self, ShapeError> {
        if cols == 0 || !cols.is_multiple_of(ty.block_values()) {
            return Err(ShapeError(format!("a {ty:?} row must be a whole number of {}-value blocks, not {cols}", ty.block_values())));
        }
        if !rows.is_multiple_of(ty.rows_together()) {
            return Err(ShapeError(format!("a {ty:?} matrix has rows in groups of {}, not {rows}", ty.rows_together())));
        }
        let expected = rows * ty.row_bytes(cols);
        if bytes.len() != expected {
            return Err(ShapeError(format!("a {rows}×{cols} {ty:?} matrix takes {expected} bytes, not {}", bytes.len())));
        }
        Ok(Self { ty, rows, cols, bytes })
    }

    /// Row `r` as a file has it, in `self.ty.in_file()`'s blocks (rearranged back from a
    /// kernels' layout: [`scalar::dot`] reads it).
    pub fn row_in_file(&self, r: usize) -> Cow<'a, [u8]> {
        let (len, together) = (self.ty.row_bytes(self.cols), self.ty.rows_together());
        let first = r / together * together;
        let rows = &self.bytes[first * len..(first + together) * len];
        if self.ty == self.ty.in_file() {
            return Cow::Borrowed(&rows[(r - first) * len..][..len]);
        }
        let mut rows = rows.to_vec();
        self.ty.rearrange(&mut rows, self.cols, true);
        Cow::Owned(rows[(r - first) * len..][..len].to_vec())
    }
}

/// How a matrix the kernels read stores its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Blocks(BlockType),
    /// Plain little-endian floats ([`FloatMatrix`]).
    Float(Float),
}

impl WeightFormat {
    /// What a row's length must be a whole number of.
    pub const fn row_multiple(self) -> usize {
        match self {
            Self::Blocks(ty) => ty.block_values(),
            Self::Float(_) => FLOAT_ROW_MULTIPLE,
        }
    }

    pub const fn row_bytes(self, cols: usize) -> usize {
        match self {
            Self::Blocks(ty) => ty.row_bytes(cols),
            Self::Float(ty) => ty.bytes() * cols,
        }
    }

    /// How many rows the layout keeps together ([`BlockType::rows_together`]).
    pub const fn rows_together(self) -> usize {
        match self {
            Self::Blocks(ty) => ty.rows_together(),
            Self::Float(_) => 1,
        }
    }
}

/// A weight matrix in any [`WeightFormat`].
#[derive(Debug, Clone, Copy)]
pub enum Matrix<'a> {
    Blocks(QMatrix<'a>),
    Float(FloatMatrix<'a>),
}

impl<'a> Matrix<'a> {
    pub fn new(format: WeightFormat, rows: usize, cols: usize, bytes: &'a [u8]) -> Result<Self, ShapeError> {
        Ok(match format {
            WeightFormat::Blocks(ty) => Self::Blocks(QMatrix::new(ty, rows, cols, bytes)?),
            WeightFormat::Float(ty) => Self::Float(FloatMatrix::new(ty, rows, cols, bytes)?),
        })
    }

    pub fn rows(&self) -> usize {
        match self {
            Self::Blocks(w) => w.rows,
            Self::Float(w) => w.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Self::Blocks(w) => w.cols,
            Self::Float(w) => w.cols,
        }
    }
}

/// [`matmuls`] for matrices of any format: those in blocks in one job of the compute pool, those
/// of plain floats ([`float_matmuls`]) in another.
pub fn products(products: &mut [(Matrix, &mut [f32])], x: &[f32]) -> Result<(), ShapeError> {
    input_rows(products.iter().map(|(w, y)| (w.rows(), w.cols(), y.len())), x.len())?;
    let (mut blocks, mut floats) = (Vec::new(), Vec::new());
    for (w, y) in products.iter_mut() {
        match *w {
            Matrix::Blocks(w) => blocks.push((w, &mut **y)),
            Matrix::Float(w) => floats.push((w, &mut **y)),
        }
    }
    matmuls(&mut blocks, x)?;
    float_matmuls(&mut floats, x)
}

/// `y[m × w.rows] = x[m × w.cols] · Wᵀ`, row-major, on the compute pool, with [`Kernels::best`].
pub fn matmul(w: &QMatrix, x: &[f32], y: &mut [f32]) -> Result<(), ShapeError> {
    matmuls(&mut [(*w, y)], x)
}

/// [`matmul`] with the given kernels, for tests and benchmarks to compare them.
///
/// # Panics
/// If this CPU cannot run `kernels` ([`Kernels::runs_here`]).
pub fn matmul_with(kernels: Kernels, w: &QMatrix, x: &[f32], y: &mut [f32]) -> Result<(), ShapeError> {
    matmuls_with(kernels, &mut [(*w, y)], x)
}

/// [`matmul`] for several matrices that take the same activations (a layer's q, k and v; its
/// gate and up): one job of the compute pool for all of them, and the activations quantized
/// once for each way the matrices read them. A job ends when its slowest thread does, and a
/// thread's stream of weights starts cold at each job; a decode step had seven of them a layer.
pub fn matmuls(products: &mut [(QMatrix, &mut [f32])], x: &[f32]) -> Result<(), ShapeError> {
    matmuls_with(Kernels::best(), products, x)
}

/// [`matmuls`] with the given kernels.
///
/// # Panics
/// If this CPU cannot run `kernels` ([`Kernels::runs_here`]).
pub fn matmuls_with(kernels: Kernels, products: &mut [(QMatrix, &mut [f32])], x: &[f32]) -> Result<(), ShapeError> {
    assert!(kernels.runs_here(), "this CPU cannot run the {kernels:?} kernels");
    let m = input_rows(products.iter().map(|(w, y)| (w.rows, w.cols, y.len())), x.len())?;
    let Some(cols) = products.first().map(|(w, _)| w.cols) else { return Ok(()) };
    let mut forms: Vec<((usize, Option<activations::Interleaving>), QuantizedRows)> = Vec::new();
    let form_of: Vec<usize> = products
        .iter()
        .map(|(w, _)| {
            let form = (w.ty.block_values(), kernels.interleaving(w.ty, m));
            forms.iter().position(|(f, _)| *f == form).unwrap_or_else(|| {
                forms.push((form, QuantizedRows::for_product(x, cols, form.0, form.1)));
                forms.len() - 1
            })
        })
        .collect();
    let parts: Vec<(QMatrix, &QuantizedRows, OutPtr<f32>)> =
        products.iter_mut().zip(form_of).map(|((w, y), form)| (*w, &forms[form].1, OutPtr(y.as_mut_ptr()))).collect();
    let rows: Vec<(usize, usize)> = parts.iter().map(|(w, _, _)| (w.rows, w.ty.rows_together())).collect();
    in_row_groups(&rows, m, |p, rows| {
        let (w, x, out) = &parts[p];
        // SAFETY: a group's rows are its own columns of the output, which outlives the pool's
        // execution; `kernels` run here.
        unsafe { product_rows(kernels, w, x, rows, out) };
    });
    Ok(())
}

/// The rows of `x` (`x_len` values) that products of `(weight rows, cols, output values)` take
/// as their one input, or why they cannot.
fn input_rows(products: impl Iterator<Item = (usize, usize, usize)>, x_len: usize) -> Result<usize, ShapeError> {
    let mut input_cols = None;
    for (rows, cols, y_len) in products {
        let first = *input_cols.get_or_insert(cols);
        if cols != first {
            return Err(ShapeError(format!("products of one input take rows of {first} values, not {cols}")));
        }
        if !x_len.is_multiple_of(cols) {
            return Err(ShapeError(format!("{x_len} activations are not rows of {cols}")));
        }
        let m = x_len / cols;
        if y_len != m * rows {
            return Err(ShapeError(format!("the output of {m}×{rows} has {} values, not {y_len}", m * rows)));
        }
    }
    Ok(input_cols.map_or(0, |cols| x_len / cols))
}

/// `f(product, weight rows)` for every group of each product's weight rows (`rows[product]` is
/// how many, and how many its layout keeps together; against `m` activation rows), in one job
/// of the compute pool. A group's rows are the same columns of every row of its product's
/// output, so no two groups write the same element.
fn in_row_groups(rows: &[(usize, usize)], m: usize, f: impl Fn(usize, std::ops::Range<usize>) + Sync) {
    let group: Vec<usize> = rows.iter().map(|&(r, together)| group_rows(r, together, m)).collect();
    // Product p's work items are `first_item[p]..`, one per `group[p]` of its rows.
    let (mut first_item, mut items) = (Vec::with_capacity(rows.len()), 0);
    for ((r, _), g) in rows.iter().zip(&group) {
        first_item.push(items);
        items += r.div_ceil(*g);
    }
    shares::in_shares(items, |item| {
        let p = first_item.partition_point(|&first| first <= item) - 1;
        let g = item - first_item[p];
        f(p, g * group[p]..rows[p].0.min((g + 1) * group[p]));
    });
}

/// Weight rows per work item: enough items for the pool to balance, few enough that a group
/// (its rows re-read from cache for every activation row) stays in L2; whole groups of the
/// `together` rows of the weights' layout.
fn group_rows(rows: usize, together: usize, m: usize) -> usize {
    let per_item = if m == 1 { 16 } else { 64 };
    per_item.min(rows.div_ceil(4 * pool::threads()).next_multiple_of(4)).max(4).next_multiple_of(together)
}

/// Values per work item of [`in_chunks`]' users (64 KiB of `f32`).
const CHUNK_VALUES: usize = 16 * 1024;

/// `f(values, &mut x[values])` for consecutive runs of `chunk` values of `x` (the last one
/// shorter): on the compute pool when there are more than two, otherwise on the calling thread
/// (a decode step's few values are not worth waking the pool).
fn in_chunks(x: &mut [f32], chunk: usize, f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync) {
    let (len, chunks) = (x.len(), x.len().div_ceil(chunk));
    if chunks <= 2 {
        return f(0..len, x);
    }
    let out = OutPtr(x.as_mut_ptr());
    pool::in_runs(chunks, |items| {
        let values = items.start * chunk..len.min(items.end * chunk);
        // SAFETY: each work item has its own chunks of `x`, which outlives the pool's execution.
        f(values.clone(), unsafe { out.slice(values) });
    });
}

/// An output that the compute pool's work items write, each its own elements.
struct OutPtr<T>(*mut T);
// SAFETY: the work items of each user write disjoint elements (see `in_row_groups`,
// `attention`, `QuantizedRows::for_product`, `in_chunks`).
unsafe impl<T: Send> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// Elements `range` of the output.
    ///
    /// # Safety
    /// They are inside the output, and no other work item touches them while the slice lives.
    #[allow(clippy::mut_from_ref)] // a raw pointer's target, not `self`, is borrowed
    unsafe fn slice(&self, range: std::ops::Range<usize>) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(range.start), range.len())
    }
}

/// Columns `rows` of every output row.
///
/// # Safety
/// `kernels` run here; `out` points to `x.rows() × w.rows` values that no other thread writes
/// in these columns.
unsafe fn product_rows(kernels: Kernels, w: &QMatrix, x: &QuantizedRows, rows: std::ops::Range<usize>, out: &OutPtr<f32>) {
    match kernels {
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512Vnni => return x86::avx512::product_rows(w, x, rows, out.0),
        // AVX2 reads Q4_K as the file has it, NEON Q4_0 and Q4_K ([`Kernels::layout`]); other
        // kernels' layouts go through the scalar definition.
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx2 if w.ty.rows_together() == 1 => return x86::avx2::product_rows(w, x, rows, out.0),
        #[cfg(target_arch = "aarch64")]
        Kernels::NeonDot if w.ty == w.ty.in_file() => return aarch64::product_rows(w, x, rows, out.0),
        _ => {}
    }
    for r in rows {
        let row = w.row_in_file(r);
        for i in 0..x.rows() {
            *out.0.add(i * w.rows + r) = scalar::dot(w.ty.in_file(), &row, x, i);
        }
    }
}
