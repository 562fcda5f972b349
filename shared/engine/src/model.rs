//! The Llama decoder: RMSNorm pre-norm blocks, grouped-query attention with RoPE, SwiGLU MLP.
//!
//! One forward pass takes a batch of padded rows (`[b, s]` token ids) and extends the
//! per-layer KV cache; padding is masked out so rows of different lengths share every matmul.

use std::ops::Range;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{CpuStorage, DType, Device, Layout, Module, Storage, Tensor};
use llm_kernels::{AttentionShape, CachedKv, Matrix, WeightFormat};

use crate::adapter::{layer_module, PeftAdapter};
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::rope::{interleave_heads, Rope, RopeLayout};
use crate::weights::{check_dims, kernel_format, load_expected, quantize_weight, InPlace, LayerTensor, TensorName, Weight, WeightSource};

/// A weight matrix `[out, in]` applied as `x · Wᵀ`, dense or quantized, plus a LoRA update
/// when an adapter was applied (kept apart, so a quantized base stays quantized).
#[derive(Debug, Clone)]
struct Linear {
    weight: Product,
    dims: (usize, usize),
    lora: Option<LoraDelta>,
}

/// Who computes `x · Wᵀ`: this project's kernels ([`llm_kernels`]) for the formats they cover
/// (GGML blocks, f32, f16, bf16) on a CPU they have SIMD code for, candle's for everything else.
#[derive(Debug, Clone)]
enum Product {
    Candle(QMatMul),
    Kernels(InPlace),
}

impl Product {
    fn new(weight: Weight) -> Result<Self> {
        Ok(match weight {
            Weight::Dense(t) => Self::Candle(QMatMul::Tensor(t)),
            Weight::InPlace(t) => Self::Kernels(t),
            Weight::Quantized(q) => match q.shape().dims().last().and_then(|&cols| kernel_format(q.dtype(), cols)) {
                Some(format) if q.device().is_cpu() => Self::Kernels(InPlace::from_qtensor(&q, format)?),
                _ => Self::Candle(QMatMul::from_arc(q)?),
            },
        })
    }

    /// `x · Wᵀ` for each of `products` (`[out, in]` weights), which take the same `x`: those of
    /// the kernels in one [`llm_kernels::products`] (one job of the compute pool a format, the
    /// activations quantized once), candle's one by one.
    fn forward_all<const N: usize>(products: [(&Self, (usize, usize)); N], x: &Tensor) -> Result<[Tensor; N]> {
        let mut outputs: [Option<Tensor>; N] = std::array::from_fn(|_| None);
        let mut kernels = Vec::with_capacity(N);
        for (i, (product, (out, input))) in products.into_iter().enumerate() {
            match product {
                Self::Candle(m) => outputs[i] = Some(m.forward(x)?),
                Self::Kernels(t) => kernels.push((i, Matrix::new(t.format, out, input, t.bytes()).map_err(kernel_error)?)),
            }
        }
        if !kernels.is_empty() {
            // The kernels take the activations where they lie (weights in place are on the CPU,
            // and so is the model): a copy cost a prompt a fiftieth of its time.
            let x_f32 = x.contiguous()?.to_dtype(DType::F32)?;
            let (storage, layout) = x_f32.storage_and_layout();
            let xs = cpu_f32(&storage, layout)?;
            let m = xs.len() / x.dims().last().expect("a matrix product's input has a last axis");
            let mut ys: Vec<Vec<f32>> = kernels.iter().map(|(_, w)| vec![0f32; m * w.rows()]).collect();
            let mut jobs: Vec<(Matrix, &mut [f32])> = kernels.iter().zip(&mut ys).map(|(&(_, w), y)| (w, y.as_mut_slice())).collect();
            llm_kernels::products(&mut jobs, xs).map_err(kernel_error)?;
            for ((i, w), y) in kernels.into_iter().zip(ys) {
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("a matrix product's input has a last axis") = w.rows();
                outputs[i] = Some(Tensor::from_vec(y, dims, x.device())?);
            }
        }
        Ok(outputs.map(|y| y.expect("every product was computed")))
    }
}

fn kernel_error(e: llm_kernels::ShapeError) -> crate::error::EngineError {
    crate::error::EngineError::InvalidRequest(format!("quantized product: {e}"))
}

/// `x · Aᵀ · (scaling · B)ᵀ`, with both factors stored transposed for the matmuls.
#[derive(Debug, Clone)]
struct LoraDelta {
    a_t: Tensor,
    scaled_b_t: Tensor,
}

impl Linear {
    fn new(weight: Weight) -> Result<Self> {
        let dims = match weight.dims() {
            [out, input] => (*out, *input),
            other => return Err(crate::error::EngineError::InvalidRequest(format!("a projection must be a matrix, not {other:?}"))),
        };
        Ok(Self { weight: Product::new(weight)?, dims, lora: None })
    }

    /// Whether the weights stay in a GGML block format (not plain f16, bf16 or f32 values).
    fn is_quantized(&self) -> bool {
        match &self.weight {
            Product::Kernels(t) => matches!(t.format, WeightFormat::Blocks(_)),
            Product::Candle(m) => matches!(m, QMatMul::QTensor(_)),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [y] = Self::forward_all([self], x)?;
        Ok(y)
    }

    /// [`Linear::forward`] of each of `linears`, which take the same `x` (see
    /// [`Product::forward_all`]).
    fn forward_all<const N: usize>(linears: [&Self; N], x: &Tensor) -> Result<[Tensor; N]> {
        let x = x.contiguous()?;
        let mut ys = Product::forward_all(linears.map(|l| (&l.weight, l.dims)), &x)?;
        for (y, linear) in ys.iter_mut().zip(linears) {
            if let Some(lora) = &linear.lora {
                *y = (&*y + x.broadcast_matmul(&lora.a_t)?.broadcast_matmul(&lora.scaled_b_t)?)?;
            }
        }
        Ok(ys)
    }
}

/// Token embedding table. A table the kernels read in place stays where it lies: rows are
/// converted on lookup.
#[derive(Debug, Clone)]
enum Embedding {
    Candle(QMatMul),
    InPlace(InPlace),
}

impl Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let table = match self {
            Self::Candle(m) => return Ok(m.embedding(ids)?),
            Self::InPlace(t) => t,
        };
        let mut values = Vec::with_capacity(ids.elem_count() * table.dims[1]);
        for id in ids.flatten_all()?.to_vec1::<u32>()? {
            values.extend(table.dequantize_row(id as usize)?);
        }
        let mut dims = ids.dims().to_vec();
        dims.push(table.dims[1]);
        Ok(Tensor::from_vec(values, dims, ids.device())?)
    }
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Each part's attention output for its normed input `xs[i]`, over its own layer cache: the
    /// products take every part's rows together, the attention each part's over its cache.
    fn forward(&self, xs: &[Tensor], rope: &Rope, parts: &mut [PartLayer]) -> Result<Vec<Tensor>> {
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qkv = together(xs, |x| Linear::forward_all([&self.q_proj, &self.k_proj, &self.v_proj], x))?;
        let mut outs = Vec::with_capacity(xs.len());
        for ([q, k, v], part) in qkv.into_iter().zip(parts.iter_mut()) {
            let (b, s, _) = q.dims3()?;
            let heads = |t: Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()?) };
            let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
            let (cos, sin) = part.cos_sin;
            let (q, k) = (rope.apply(&q, cos, sin)?, rope.apply(&k, cos, sin)?);
            part.cache.append(&k, &v)?;
            outs.push(part.cache.attend(&q, part.padding)?.reshape((b, s, nh * hd))?);
        }
        Ok(together(&outs, |x| Ok([self.o_proj.forward(x)?]))?.into_iter().map(|[y]| y).collect())
    }
}

/// What one part of a pass brings to a layer's attention.
struct PartLayer<'a> {
    cos_sin: (&'a Tensor, &'a Tensor),
    padding: &'a [Range<usize>],
    cache: &'a mut LayerCache,
}

/// `f` of the rows of every `[b, s, hidden]` tensor of `xs` at once (one product's weights read
/// once for all of them), its outputs split back into each tensor's `[b, s, out]`; `f` is not
/// called for no tensors.
fn together<const N: usize>(xs: &[Tensor], f: impl FnOnce(&Tensor) -> Result<[Tensor; N]>) -> Result<Vec<[Tensor; N]>> {
    match xs {
        [] => return Ok(Vec::new()),
        [x] => return Ok(vec![f(x)?]),
        _ => {}
    }
    let rows: Vec<Tensor> = xs.iter().map(|x| Ok(x.flatten_to(1)?)).collect::<Result<_>>()?;
    let ys = f(&Tensor::cat(&rows, 0)?)?;
    let mut offset = 0;
    let mut split = Vec::with_capacity(xs.len());
    for x in xs {
        let (b, s, _) = x.dims3()?;
        let part: Vec<Tensor> = ys.iter().map(|y| Ok(y.narrow(0, offset, b * s)?.reshape((b, s, y.dim(1)?))?)).collect::<Result<_>>()?;
        split.push(part.try_into().expect("one of each output"));
        offset += b * s;
    }
    Ok(split)
}

/// Whether the in-place kernels below can take these tensors: `f32`, contiguous, on the CPU.
fn in_place_f32(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// The contiguous `f32` values of a CPU storage that an in-place operation is given.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&values[start..end]),
        _ => candle_core::bail!("the in-place kernels take contiguous f32 tensors"),
    }
}

/// [`contiguous_f32`], to be written.
fn contiguous_f32_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&mut values[start..end]),
        _ => candle_core::bail!("the in-place kernels take contiguous f32 tensors"),
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up] = Linear::forward_all([&self.gate, &self.up], x)?;
        self.down.forward(&swiglu(gate, &up)?)
    }
}

/// `silu(gate) · up`. On the CPU in `f32`, [`llm_kernels::silu_mul`] computes it in place, in one
/// pass over the compute pool: candle's SiLU is a libm call per value on the calling thread, and
/// the product a second pass.
fn swiglu(gate: Tensor, up: &Tensor) -> Result<Tensor> {
    if in_place_f32(&[&gate, up]) && gate.dims() == up.dims() {
        gate.inplace_op2(up, &SiluMul)?;
        return Ok(gate);
    }
    Ok((candle_nn::ops::silu(&gate)? * up)?)
}

/// [`llm_kernels::silu_mul`] as candle's in-place operation on the gate's storage, which the
/// gate's product has just made and nothing else holds.
struct SiluMul;

impl candle_core::InplaceOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, gate: &mut CpuStorage, gate_layout: &Layout, up: &CpuStorage, up_layout: &Layout) -> candle_core::Result<()> {
        llm_kernels::silu_mul(contiguous_f32_mut(gate, gate_layout)?, contiguous_f32(up, up_layout)?).map_err(candle_core::Error::wrap)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

/// Keys and values of every layer, for the rows of a batch.
///
/// Not `Clone`: a layer's buffers are written in place, so a copy would share and see them
/// change.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

/// One layer's keys and values: buffers `[b, kv_heads, head_dim, capacity]` (keys, transposed:
/// see [`llm_kernels::AttentionShape`]) and `[b, kv_heads, capacity, head_dim]` (values) whose
/// first `len` positions are filled. A step writes only its own positions (concatenating
/// copied the whole cache into a fresh allocation, every layer, every step: after a 512-token
/// prompt, decode at 2 threads ran 3–7 % slower), and [`llm_kernels::attention`] reads them
/// where they lie: models are only ever loaded on the CPU (`loader`). Kept in `dtype` (see
/// [`LoadOptions::kv_cache`]).
#[derive(Debug)]
struct LayerCache {
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
    dtype: DType,
}

/// The most positions a layer's buffers grow by at once: a copy every this many tokens, and at
/// most this many positions allocated and unused.
const CACHE_GROWTH: usize = 256;

/// Positions a layer's buffers are counted in.
const CACHE_STEP: usize = 16;

/// The positions a layer's buffers hold for `len` filled ones when they are allocated whole
/// (a prompt's first pass, a truncated or joined cache): those, rounded up to [`CACHE_STEP`].
/// Every allocated position is resident (candle writes `f16` zeros one by one), so room beyond
/// what is filled is memory the request holds for nothing: 256 positions for a 135-token
/// prompt were 10 MiB on SmolLM2-360M's shape, where the prompt needs 5.3.
fn fitted(len: usize) -> usize {
    len.next_multiple_of(CACHE_STEP).max(CACHE_STEP)
}

/// The positions buffers of `capacity` grow to once `len` are filled: twice as many, but at most
/// [`CACHE_GROWTH`] more, so that generation copies a short cache a few times and a long one
/// every 256 tokens.
fn grown(len: usize, capacity: usize) -> usize {
    fitted(len).max(capacity + capacity.min(CACHE_GROWTH))
}

impl LayerCache {
    fn new(dtype: DType) -> Self {
        Self { buffers: None, len: 0, dtype }
    }

    /// The dimensions of the positions in the key and value buffers.
    const K_POSITIONS: usize = 3;
    const V_POSITIONS: usize = 2;

    /// Writes `k`, `v` (`[b, kv_heads, s, head_dim]`) after the cached positions, in the cache's
    /// type.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (k, v) = (k.to_dtype(self.dtype)?, v.to_dtype(self.dtype)?);
        let (b, nkv, s, hd) = k.dims4()?;
        let len = self.len + s;
        let capacity = self.buffers.as_ref().map_or(0, |(_, v)| v.dims()[Self::V_POSITIONS]);
        if len > capacity {
            let capacity = grown(len, capacity);
            let larger = |old: Option<&Tensor>, shape: (usize, usize, usize, usize), positions: usize| -> Result<Tensor> {
                let buffer = Tensor::zeros(shape, self.dtype, k.device())?;
                if let Some(old) = old {
                    buffer.slice_set(&old.narrow(positions, 0, self.len)?.contiguous()?, positions, 0)?;
                }
                Ok(buffer)
            };
            let old = self.buffers.as_ref();
            self.buffers = Some((
                larger(old.map(|(k, _)| k), (b, nkv, hd, capacity), Self::K_POSITIONS)?,
                larger(old.map(|(_, v)| v), (b, nkv, capacity, hd), Self::V_POSITIONS)?,
            ));
        }
        let (k_buffer, v_buffer) = self.buffers.as_ref().expect("allocated above");
        k_buffer.slice_set(&k.transpose(2, 3)?.contiguous()?, Self::K_POSITIONS, self.len)?;
        v_buffer.slice_set(&v.contiguous()?, Self::V_POSITIONS, self.len)?;
        self.len = len;
        Ok(())
    }

    /// Attention of the last `s` positions (`q` `[b, heads, s, head_dim]`, already appended),
    /// each over the cached ones up to its own but its row's `padding`, with
    /// [`llm_kernels::attention`]; `[b, s, heads, head_dim]`.
    fn attend(&self, q: &Tensor, padding: &[Range<usize>]) -> Result<Tensor> {
        let (k, v) = self.buffers.as_ref().expect("a step appends before it attends");
        let (b, heads, s, head_dim) = q.dims4()?;
        let (_, kv_heads, capacity, _) = v.dims4()?;
        let shape = AttentionShape { rows: b, queries: s, heads, kv_heads, head_dim, len: self.len, capacity };
        let q = q.contiguous()?;
        let (q_storage, q_layout) = q.storage_and_layout();
        let mut out = vec![0f32; q.elem_count()];
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        let cached = cached_kv((&k_storage, k_layout), (&v_storage, v_layout))?;
        let scale = 1.0 / (head_dim as f32).sqrt();
        llm_kernels::attention(&shape, scale, cpu_f32(&q_storage, q_layout)?, cached, padding, &mut out).map_err(kernel_error)?;
        Ok(Tensor::from_vec(out, (b, s, heads, head_dim), q.device())?)
    }
}

/// The cache's keys and values where they lie.
fn cached_kv<'a>((k, k_layout): (&'a Storage, &Layout), (v, v_layout): (&'a Storage, &Layout)) -> Result<CachedKv<'a>> {
    Ok(match (k, k_layout.contiguous_offsets(), v, v_layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(k)), Some((k0, k1)), Storage::Cpu(CpuStorage::F32(v)), Some((v0, v1))) => CachedKv::F32 { k: &k[k0..k1], v: &v[v0..v1] },
        (Storage::Cpu(CpuStorage::F16(k)), Some((k0, k1)), Storage::Cpu(CpuStorage::F16(v)), Some((v0, v1))) => CachedKv::F16 { k: &k[k0..k1], v: &v[v0..v1] },
        _ => return Err(candle_core::Error::Msg("the KV cache's buffers are not contiguous f32 or f16 on the CPU".into()).into()),
    })
}

/// The values of a contiguous CPU `f32` tensor, where they lie.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else { unreachable!("the caller checked that the tensor is on the CPU") };
    Ok(contiguous_f32(cpu, layout)?)
}

impl KvCache {
    /// Number of positions cached (padding included).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |layer| layer.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes its buffers take: every position they have room for, not only those filled.
    pub(crate) fn bytes(&self) -> usize {
        let layer = |(k, v): &(Tensor, Tensor)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes();
        self.layers.iter().filter_map(|layer| layer.buffers.as_ref()).map(layer).sum()
    }

    /// Forgets every position from `len` on; later steps write over them. Buffers shrink to fit
    /// what is left when they are larger than a fitted buffer would grow to: a long
    /// conversation's cache cut back to the start a short prompt shares would keep its whole
    /// capacity in the row that goes on. Cut back a few positions (a conversation's next turn
    /// goes on from its cached reply but for its last tokens), they stay, instead of a copy now
    /// and another as they grow again.
    pub(crate) fn truncate(&mut self, len: usize) -> Result<()> {
        for layer in &mut self.layers {
            layer.len = layer.len.min(len);
            let capacity = fitted(layer.len);
            if let Some((k, v)) = &mut layer.buffers {
                if v.dims()[LayerCache::V_POSITIONS] > grown(capacity + 1, capacity) {
                    // Always a copy: a narrowed buffer that is already contiguous would keep the
                    // whole old one alive (`contiguous` returns it as it is).
                    let shrunk = |t: &Tensor, positions| t.narrow(positions, 0, capacity)?.force_contiguous();
                    (*k, *v) = (shrunk(k, LayerCache::K_POSITIONS)?, shrunk(v, LayerCache::V_POSITIONS)?);
                }
            }
        }
        Ok(())
    }

    /// One cache of the rows `rows` (each a cache, one of its rows and that row's padding), in
    /// that order, as long as the longest row without its padding: each row's positions but its
    /// padding move, in order, to the end, and the row is padded at its start instead; with that
    /// padding. This is how sequences of different lengths join one batch and leave it (the
    /// batch then sheds padding that only a row that left needed); positions keep their keys,
    /// whose rotation is already applied, so the row attends as before.
    ///
    /// Each position is copied once, into one new buffer per layer's keys and values: built
    /// from candle's zeros, narrows and concatenations instead, the copies and allocations were
    /// a third of a loaded server's time on the demo model.
    pub fn join(rows: &[(&KvCache, usize, &Range<usize>)]) -> Result<(KvCache, Vec<Range<usize>>)> {
        let unpadded: Vec<usize> = rows.iter().map(|(cache, _, padding)| cache.len() - padding.len()).collect();
        let len = unpadded.iter().copied().max().unwrap_or(0);
        // Room for the next position, which the batch appends at once.
        let capacity = fitted(len + 1);
        let layers = rows.first().map_or(0, |(cache, ..)| cache.layers.len());
        let mut joined = Vec::with_capacity(layers);
        for layer in 0..layers {
            let mut keys = Vec::with_capacity(rows.len());
            let mut values = Vec::with_capacity(rows.len());
            for &(cache, row, padding) in rows {
                let source = &cache.layers[layer];
                let (k, v) = source.buffers.as_ref().ok_or_else(|| candle_core::Error::Msg("cannot join an empty KV cache".into()))?;
                let kept = [0..padding.start, padding.end..source.len];
                keys.push(RowPositions { buffer: k, row, kept: kept.clone() });
                values.push(RowPositions { buffer: v, row, kept });
            }
            let dtype = rows[0].0.layers[layer].dtype;
            let buffers = (joined_buffer(&keys, LayerCache::K_POSITIONS, len, capacity)?, joined_buffer(&values, LayerCache::V_POSITIONS, len, capacity)?);
            joined.push(LayerCache { buffers: Some(buffers), len, dtype });
        }
        let padding = unpadded.iter().map(|&n| 0..len - n).collect();
        Ok((KvCache { layers: joined }, padding))
    }
}

/// The positions `kept` of row `row` of a layer's key or value buffer.
struct RowPositions<'a> {
    buffer: &'a Tensor,
    row: usize,
    kept: [Range<usize>; 2],
}

/// One buffer of `rows.len()` rows (of the sources' other dimensions, positions along `dim`,
/// `capacity` of them) in which each row's kept positions end at `len`, zeros elsewhere.
fn joined_buffer(rows: &[RowPositions], dim: usize, len: usize, capacity: usize) -> Result<Tensor> {
    match rows[0].buffer.dtype() {
        DType::F32 => joined_rows::<f32>(rows, dim, len, capacity),
        DType::F16 => joined_rows::<half::f16>(rows, dim, len, capacity),
        dtype => Err(candle_core::Error::Msg(format!("a KV cache in {dtype:?}: only f32 and f16 are kept")).into()),
    }
}

/// [`joined_buffer`] in `T`. A buffer's dimensions between the row and `dim` are groups of
/// positions, those after `dim` one position's elements: keys `[b, kv_heads, head_dim,
/// capacity]` are `kv_heads × head_dim` groups of one-element positions, values `[b, kv_heads,
/// capacity, head_dim]` `kv_heads` groups of `head_dim`-element positions.
fn joined_rows<T: candle_core::WithDType>(rows: &[RowPositions], dim: usize, len: usize, capacity: usize) -> Result<Tensor> {
    let first = rows[0].buffer;
    let groups: usize = first.dims()[1..dim].iter().product();
    let width: usize = first.dims()[dim + 1..].iter().product();
    let out_row_size = groups * capacity * width;
    let mut out = vec![T::from_f64(0.0); rows.len() * out_row_size];
    for (source, out_row) in rows.iter().zip(out.chunks_exact_mut(out_row_size)) {
        let (storage, layout) = source.buffer.storage_and_layout();
        let (Storage::Cpu(cpu), Some((from, to))) = (&*storage, layout.contiguous_offsets()) else {
            return Err(candle_core::Error::Msg("the KV cache's buffers are not contiguous on the CPU".into()).into());
        };
        let source_capacity = source.buffer.dims()[dim];
        let row_size = groups * source_capacity * width;
        let row = &cpu.as_slice::<T>()?[from..to][source.row * row_size..][..row_size];
        let kept_len: usize = source.kept.iter().map(Range::len).sum();
        for (group, out_group) in row.chunks_exact(source_capacity * width).zip(out_row.chunks_exact_mut(capacity * width)) {
            let mut at = len - kept_len;
            for range in &source.kept {
                out_group[at * width..(at + range.len()) * width].copy_from_slice(&group[range.start * width..range.end * width]);
                at += range.len();
            }
        }
    }
    let mut shape = first.dims().to_vec();
    (shape[0], shape[dim]) = (rows.len(), capacity);
    Ok(Tensor::from_vec(out, shape, first.device())?)
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// `[b, vocab]` for the last position of each row (generation).
    Last,
    /// `[b, s, vocab]` for every position (scoring, tests).
    All,
}

/// Options that change how weights and the KV cache are held in memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Quantize f16/f32 weights to this type while loading.
    pub quantize: Option<GgmlDType>,
    /// The KV cache's type. By default `f16` for a model whose projections stay quantized, as
    /// llama.cpp keeps its cache (half the memory, and half the bytes a decode step reads of
    /// it), and `f32` for a dense one, whose outputs are held to transformers' at `f32`.
    pub kv_cache: Option<KvCacheType>,
}

/// The type a KV cache keeps keys and values in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCacheType {
    F32,
    F16,
}

impl KvCacheType {
    /// Its name as llama.cpp's `--cache-type-k` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }

    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    kv_cache: KvCacheType,
    device: Device,
}

impl Llama {
    pub fn load(config: LlamaConfig, source: &mut dyn WeightSource, rope_layout: RopeLayout, options: LoadOptions, device: &Device) -> Result<Self> {
        let c = &config;
        let q_dim = c.num_heads * c.head_dim;
        let kv_dim = c.num_kv_heads * c.head_dim;
        let maybe_quantize = |w: Weight| match options.quantize {
            Some(dtype) => quantize_weight(w, dtype),
            None => Ok(w),
        };
        let norm = |source: &mut dyn WeightSource, name| -> Result<RmsNorm> {
            let weight = load_expected(source, name, &[c.hidden_size])?.to_f32()?;
            Ok(RmsNorm { weight, eps: c.rms_norm_eps as f32 })
        };
        let linear =
            |source: &mut dyn WeightSource, name, dims: [usize; 2]| -> Result<Linear> { Linear::new(maybe_quantize(load_expected(source, name, &dims)?)?) };

        let embed_weight = maybe_quantize(load_expected(source, TensorName::TokenEmbedding, &[c.vocab_size, c.hidden_size])?)?;
        // Not preallocated: the count comes from the file, and only its tensors vouch for it.
        let mut layers = Vec::new();
        for i in 0..c.num_layers {
            let name = |t| TensorName::Layer(i, t);
            use LayerTensor::*;
            layers.push(DecoderLayer {
                attn_norm: norm(source, name(AttnNorm))?,
                attn: Attention {
                    q_proj: linear(source, name(Q), [q_dim, c.hidden_size])?,
                    k_proj: linear(source, name(K), [kv_dim, c.hidden_size])?,
                    v_proj: linear(source, name(V), [kv_dim, c.hidden_size])?,
                    o_proj: linear(source, name(O), [c.hidden_size, q_dim])?,
                    num_heads: c.num_heads,
                    num_kv_heads: c.num_kv_heads,
                    head_dim: c.head_dim,
                },
                ffn_norm: norm(source, name(FfnNorm))?,
                mlp: Mlp {
                    gate: linear(source, name(Gate), [c.intermediate_size, c.hidden_size])?,
                    up: linear(source, name(Up), [c.intermediate_size, c.hidden_size])?,
                    down: linear(source, name(Down), [c.hidden_size, c.intermediate_size])?,
                },
            });
        }
        let norm = norm(source, TensorName::OutputNorm)?;
        let lm_head = match source.load(TensorName::Output)? {
            Some(w) if !c.tie_word_embeddings => {
                check_dims(&source.display_name(TensorName::Output), w.dims(), &[c.vocab_size, c.hidden_size])?;
                Linear::new(maybe_quantize(w)?)?
            }
            _ => Linear::new(embed_weight.clone())?,
        };
        let embed = match embed_weight {
            Weight::Dense(t) => Embedding::Candle(QMatMul::Tensor(t)),
            Weight::Quantized(q) => Embedding::Candle(QMatMul::QTensor(q)),
            Weight::InPlace(t) => Embedding::InPlace(t),
        };
        let rope_factors = match source.load(TensorName::RopeFreqs)? {
            Some(w) => {
                check_dims(&source.display_name(TensorName::RopeFreqs), w.dims(), &[c.head_dim / 2])?;
                Some(w.to_f32()?.to_vec1::<f32>()?)
            }
            None => None,
        };
        let rope = Rope::new(c, rope_factors.as_deref(), rope_layout, device)?;
        let quantized = layers.first().is_some_and(|layer| layer.attn.k_proj.is_quantized());
        let kv_cache = options.kv_cache.unwrap_or(if quantized && device.is_cpu() { KvCacheType::F16 } else { KvCacheType::F32 });
        Ok(Self { config, embed, layers, norm, lm_head, rope, kv_cache, device: device.clone() })
    }

    /// Adds a PEFT LoRA adapter's updates to the projections it names. Q/K updates are put in
    /// llama.cpp's row order for GGUF models, as its converter does for the weights.
    pub fn apply_adapter(&mut self, adapter: &PeftAdapter) -> Result<()> {
        let scaling = adapter.config.scaling();
        let interleaved = self.rope.layout() == RopeLayout::Interleaved;
        let (heads, kv_heads) = (self.config.num_heads, self.config.num_kv_heads);
        let invalid = |m: String| crate::error::EngineError::InvalidRequest(format!("LoRA adapter: {m}"));
        for (prefix, (a, b)) in &adapter.pairs {
            let (index, module) = layer_module(prefix).ok_or_else(|| invalid(format!("`{prefix}` is not a Llama projection")))?;
            let layer = self.layers.get_mut(index).ok_or_else(|| invalid(format!("`{prefix}`: the model has {} layers", self.config.num_layers)))?;
            let (linear, rope_heads) = match module {
                "q_proj" => (&mut layer.attn.q_proj, Some(heads)),
                "k_proj" => (&mut layer.attn.k_proj, Some(kv_heads)),
                "v_proj" => (&mut layer.attn.v_proj, None),
                "o_proj" => (&mut layer.attn.o_proj, None),
                "gate_proj" => (&mut layer.mlp.gate, None),
                "up_proj" => (&mut layer.mlp.up, None),
                "down_proj" => (&mut layer.mlp.down, None),
                other => return Err(invalid(format!("unknown module `{other}`"))),
            };
            let (out, input) = linear.dims;
            if b.dim(0)? != out || a.dim(1)? != input {
                return Err(invalid(format!("`{prefix}`: A {:?} and B {:?} do not fit a [{out}, {input}] weight", a.dims(), b.dims())));
            }
            let b = match rope_heads {
                Some(h) if interleaved => interleave_heads(b, h)?,
                _ => b.clone(),
            };
            let device = &self.device;
            linear.lora = Some(LoraDelta { a_t: a.to_device(device)?.t()?.contiguous()?, scaled_b_t: (b.to_device(device)?.t()? * scaling)?.contiguous()? });
        }
        Ok(())
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The type [`Llama::new_cache`]'s caches keep keys and values in.
    pub fn kv_cache_type(&self) -> KvCacheType {
        self.kv_cache
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: (0..self.config.num_layers).map(|_| LayerCache::new(self.kv_cache.dtype())).collect() }
    }

    /// Runs `tokens` (`[b, s]`, u32) after what `cache` holds. `padding[r]` are the positions of
    /// row `r` that hold padding, never attended to: at its start (left padding, so that prompts
    /// of different lengths end together), or after a start every row shares.
    pub fn forward(&self, tokens: &Tensor, padding: &[Range<usize>], cache: &mut KvCache, which: Logits) -> Result<Tensor> {
        let mut parts = [Part { tokens, padding, cache, logits: Some(which) }];
        Ok(self.forward_parts(&mut parts)?.pop().flatten().expect("logits were asked for"))
    }

    /// [`Llama::forward`] without logits: the keys and values of a prompt's part that another
    /// part follows, whose last position samples nothing (the output head reads as many
    /// weights as a layer or more: TinyLlama's is 32,000 × 2,048).
    pub fn extend(&self, tokens: &Tensor, padding: &[Range<usize>], cache: &mut KvCache) -> Result<()> {
        self.forward_parts(&mut [Part { tokens, padding, cache, logits: None }])?;
        Ok(())
    }

    /// Runs several parts in one pass, each as [`Llama::forward`] (or [`Llama::extend`] where
    /// it asks for no logits) over its own cache: every weight product takes all of their rows
    /// at once, so the weights are read once for all, and each part attends over its own cache.
    /// A batch's decode step and the next part of each joining prompt run so (vLLM's chunked
    /// prefill mixes them alike): the step's products, which read every weight for a few rows,
    /// then cost the prompts' parts little more than their own. Each part's logits, if asked for.
    pub fn forward_parts(&self, parts: &mut [Part]) -> Result<Vec<Option<Tensor>>> {
        let xs = self.hidden_states(parts)?;
        let mut last = Vec::new();
        for (x, part) in xs.iter().zip(parts.iter()) {
            match part.logits {
                Some(Logits::Last) => last.push(x.narrow(1, x.dim(1)? - 1, 1)?),
                Some(Logits::All) => last.push(x.clone()),
                None => {}
            }
        }
        let head = |x: &Tensor| Ok([self.lm_head.forward(&self.norm.forward(x)?)?.to_dtype(DType::F32)?]);
        let mut heads = together(&last, head)?.into_iter();
        let mut logits = Vec::with_capacity(parts.len());
        for part in parts.iter() {
            logits.push(match part.logits {
                None => None,
                Some(which) => {
                    let [y] = heads.next().expect("one head per part that asks");
                    Some(if which == Logits::Last { y.squeeze(1)? } else { y })
                }
            });
        }
        Ok(logits)
    }

    /// Each part's last layer's output `[b, s, hidden]`, its positions' keys and values added
    /// to its cache.
    fn hidden_states(&self, parts: &mut [Part]) -> Result<Vec<Tensor>> {
        let mut cos_sin = Vec::with_capacity(parts.len());
        let mut xs = Vec::with_capacity(parts.len());
        for part in parts.iter() {
            let (b, s) = part.tokens.dims2()?;
            cos_sin.push(self.rope.cos_sin(&positions(b, s, part.cache.len(), part.padding, &self.device)?)?);
            xs.push(self.embed.forward(part.tokens)?);
        }
        let normed = |xs: &[Tensor], norm: &RmsNorm| xs.iter().map(|x| norm.forward(x)).collect::<Result<Vec<_>>>();
        for (l, layer) in self.layers.iter().enumerate() {
            let mut layers: Vec<PartLayer> = parts
                .iter_mut()
                .zip(&cos_sin)
                .map(|(part, (cos, sin))| PartLayer { cos_sin: (cos, sin), padding: part.padding, cache: &mut part.cache.layers[l] })
                .collect();
            let hs = layer.attn.forward(&normed(&xs, &layer.attn_norm)?, &self.rope, &mut layers)?;
            for (x, h) in xs.iter_mut().zip(hs) {
                *x = (&*x + h)?;
            }
            let hs = together(&normed(&xs, &layer.ffn_norm)?, |x| Ok([layer.mlp.forward(x)?]))?;
            for (x, [h]) in xs.iter_mut().zip(hs) {
                *x = (&*x + h)?;
            }
        }
        Ok(xs)
    }
}

/// One part of a [`Llama::forward_parts`] pass: rows of `tokens` (`[b, s]`, u32) after what
/// `cache` holds, padded at `padding` (see [`Llama::forward`]), and the logits asked for.
pub struct Part<'a> {
    pub tokens: &'a Tensor,
    pub padding: &'a [Range<usize>],
    pub cache: &'a mut KvCache,
    pub logits: Option<Logits>,
}

/// The padding of a batch of one row that has none.
#[allow(clippy::single_range_in_vec_init)] // one row's padding, not a vector of `0..0`'s values
pub const ONE_UNPADDED_ROW: &[Range<usize>] = &[0..0];

/// Position ids `[b, s]`: each row counts its tokens, padding left out (a padding slot, never
/// attended to, takes the position of the padding's start).
fn positions(b: usize, s: usize, past: usize, padding: &[Range<usize>], device: &Device) -> Result<Tensor> {
    let position = |slot: usize, padding: &Range<usize>| match slot {
        _ if slot >= padding.end => slot - padding.len(),
        _ if slot >= padding.start => padding.start,
        _ => slot,
    };
    let ids: Vec<u32> = (0..b).flat_map(|r| (past..past + s).map(move |slot| position(slot, &padding[r]) as u32)).collect();
    Ok(Tensor::from_vec(ids, (b, s), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A float matrix whose rows are not whole registers of the kernels (`--quantize f16` of a
    /// shape that llama.cpp's files never have) goes through candle, and its product works.
    #[test]
    fn float_rows_that_are_not_whole_registers_stay_with_candle() {
        let values = Tensor::randn(0f32, 1.0, (4, 24), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::F16, GgmlDType::F32] {
            let weight = candle_core::quantized::QTensor::quantize(&values, dtype).unwrap();
            let linear = Linear::new(Weight::Quantized(std::sync::Arc::new(weight))).unwrap();
            assert!(matches!(linear.weight, Product::Candle(_)), "{dtype:?}: {:?}", linear.weight);
            let x = Tensor::randn(0f32, 1.0, (2, 24), &Device::Cpu).unwrap();
            assert_eq!(linear.forward(&x).unwrap().dims(), [2, 4]);
        }
    }

    /// Additive mask `[b, 1, s, past + s]`: causal, and hiding each row's padding.
    fn attention_mask(b: usize, s: usize, past: usize, padding: &[Range<usize>], device: &Device) -> Tensor {
        let t = past + s;
        let mut mask = vec![0f32; b * s * t];
        for r in 0..b {
            for i in 0..s {
                let query = past + i;
                for key in 0..t {
                    // A padding query still sees itself, so that its softmax row stays finite.
                    let visible = key == query || (!padding[r].contains(&query) && !padding[r].contains(&key) && key <= query);
                    if !visible {
                        mask[(r * s + i) * t + key] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(mask, (b, 1, s, t), device).unwrap()
    }

    /// Attention as candle's products and softmax with an additive mask, over a cache's filled
    /// positions in `f32`: `[b, s, heads, head_dim]`.
    fn masked_product(cache: &LayerCache, q: &Tensor, padding: &[Range<usize>]) -> Tensor {
        let (k_t, v) = cache.buffers.as_ref().unwrap();
        let (k_t, v) = (k_t.narrow(3, 0, cache.len).unwrap().to_dtype(DType::F32).unwrap(), v.narrow(2, 0, cache.len).unwrap().to_dtype(DType::F32).unwrap());
        let (b, nh, s, hd) = q.dims4().unwrap();
        let nkv = v.dim(1).unwrap();
        let q = q.reshape((b, nkv, nh / nkv * s, hd)).unwrap();
        let scores = (q.matmul(&k_t).unwrap() * (1.0 / (hd as f64).sqrt())).unwrap();
        let mask = attention_mask(b, s, cache.len - s, padding, q.device());
        let scores = scores.reshape((b, nkv, nh / nkv, s, cache.len)).unwrap().broadcast_add(&mask.unsqueeze(2).unwrap()).unwrap();
        let weights = candle_nn::ops::softmax_last_dim(&scores.reshape((b, nkv, nh / nkv * s, cache.len)).unwrap()).unwrap();
        weights.matmul(&v).unwrap().reshape((b, nh, s, hd)).unwrap().transpose(1, 2).unwrap()
    }

    #[test]
    fn the_caches_attention_is_a_masked_product() {
        let dev = Device::Cpu;
        let (b, nh, nkv, hd) = (2, 8, 2, 16);
        // A prompt of 20 positions, the second row left-padded by 6, or both padded after a
        // start they share; three decode steps; a second prompt after them, as a
        // conversation's next turn over its cached prefix.
        for (dtype, padding) in [(DType::F32, [0..0, 0..6]), (DType::F16, [0..0, 0..6]), (DType::F32, [8..10, 8..14])] {
            let mut cache = LayerCache::new(dtype);
            for s in [20, 1, 1, 1, 9] {
                let k = Tensor::randn(0f32, 1.0, (b, nkv, s, hd), &dev).unwrap();
                let v = Tensor::randn(0f32, 1.0, (b, nkv, s, hd), &dev).unwrap();
                cache.append(&k, &v).unwrap();
                assert_eq!(cache.buffers.as_ref().map(|(k, v)| (k.dtype(), v.dtype())), Some((dtype, dtype)));
                let q = Tensor::randn(0f32, 1.0, (b, nh, s, hd), &dev).unwrap();
                let product = masked_product(&cache, &q, &padding);
                let kernel = cache.attend(&q, &padding).unwrap();
                let diff = (kernel - &product).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-5, "{dtype:?} cache, {s} positions after {}: {diff}", cache.len - s);
            }
        }
    }

    /// A prompt's buffers hold what it fills; generation after it doubles them, by at most
    /// [`CACHE_GROWTH`] positions a time.
    #[test]
    fn buffers_fit_a_prompt_then_grow_by_doubling_up_to_a_limit() {
        assert_eq!((fitted(0), fitted(1), fitted(135), fitted(608)), (16, 16, 144, 608));
        let mut capacity = fitted(135);
        let mut sizes = vec![capacity];
        for len in 136..=1200 {
            if len > capacity {
                capacity = grown(len, capacity);
                sizes.push(capacity);
            }
        }
        assert_eq!(sizes, [144, 288, 544, 800, 1056, 1312]);
        assert_eq!(grown(1000, 16), 1008, "a pass longer than the growth takes what it needs");
    }

    /// Cut back a few positions, a cache keeps its buffers; cut far back, they shrink to the
    /// positions it keeps, which keep their values.
    #[test]
    fn a_truncated_cache_keeps_its_start_in_smaller_buffers() {
        let dev = Device::Cpu;
        let mut cache = KvCache { layers: vec![LayerCache::new(DType::F32)] };
        let (k, v) = (Tensor::randn(0f32, 1.0, (1, 2, 600, 8), &dev).unwrap(), Tensor::randn(0f32, 1.0, (1, 2, 600, 8), &dev).unwrap());
        cache.layers[0].append(&k, &v).unwrap();
        let capacity = |cache: &KvCache| cache.layers[0].buffers.as_ref().unwrap().1.dims()[LayerCache::V_POSITIONS];
        assert_eq!(capacity(&cache), 608);
        cache.truncate(590).unwrap();
        assert_eq!((cache.len(), capacity(&cache)), (590, 608));
        cache.truncate(10).unwrap();
        assert_eq!((cache.len(), capacity(&cache)), (10, CACHE_STEP));
        let (k_t, v_kept) = cache.layers[0].buffers.as_ref().unwrap();
        let kept = |t: &Tensor, dim| t.narrow(dim, 0, 10).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(kept(v_kept, 2), kept(&v, 2));
        assert_eq!(kept(k_t, 3), kept(&k.transpose(2, 3).unwrap().contiguous().unwrap(), 3));
    }

    /// Joined, rows keep their positions but their padding, moved to the end of the joined
    /// length, in either type: here a row padded in the middle (a shared start), in reverse
    /// order, beside one of another cache.
    #[test]
    fn joined_rows_keep_their_positions_but_their_padding() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F16] {
            let filled = |rows, len| {
                let mut cache = KvCache { layers: vec![LayerCache::new(dtype)] };
                let (k, v) = (Tensor::randn(0f32, 1.0, (rows, 2, len, 8), &dev).unwrap(), Tensor::randn(0f32, 1.0, (rows, 2, len, 8), &dev).unwrap());
                cache.layers[0].append(&k, &v).unwrap();
                cache
            };
            let (batch, other) = (filled(2, 30), filled(1, 12));
            let padding = [8..10, 8..20];
            let (joined, joined_padding) = KvCache::join(&[(&batch, 1, &padding[1]), (&batch, 0, &padding[0]), (&other, 0, &(0..0))]).unwrap();
            assert_eq!(joined_padding, vec![0..10, 0..0, 0..16]);
            let positions = |cache: &KvCache, row, kept: &[usize]| -> Vec<Vec<f32>> {
                let (k_t, v) = cache.layers[0].buffers.as_ref().unwrap();
                let index = Tensor::new(kept.iter().map(|&p| p as u32).collect::<Vec<_>>(), &dev).unwrap();
                [(k_t, LayerCache::K_POSITIONS), (v, LayerCache::V_POSITIONS)]
                    .map(|(t, dim)| {
                        t.get(row).unwrap().index_select(&index, dim - 1).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
                    })
                    .to_vec()
            };
            let unpadded = |len: usize, padding: &Range<usize>| (0..len).filter(|p| !padding.contains(p)).collect::<Vec<_>>();
            for (row, (source, source_row, source_padding)) in
                [(&batch, 1, &padding[1]), (&batch, 0, &padding[0]), (&other, 0, &(0..0))].into_iter().enumerate()
            {
                let kept = unpadded(source.len(), source_padding);
                let moved: Vec<usize> = (joined.len() - kept.len()..joined.len()).collect();
                assert_eq!(positions(&joined, row, &moved), positions(source, source_row, &kept), "{dtype:?} row {row}");
            }
        }
    }
}
