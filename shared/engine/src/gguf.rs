//! GGUF files as llama.cpp writes them for `general.architecture = llama`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};

/// A GGUF metadata value (re-exported so callers need not depend on candle).
pub use candle_core::quantized::gguf_file::Value as GgufValue;
use candle_core::Device;
use rayon::prelude::*;

use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{EngineError, Result};
use crate::weights::{kernel_format, laid_out, FileBytes, InPlace, TensorName, Weight, WeightSource};
use llm_kernels::{BlockType, WeightFormat};

/// An opened GGUF file: its metadata and tensor directory over the whole file's bytes (memory
/// mapped, or held in memory), from which tensors are read on demand, in place where the kernels
/// take them.
pub struct GgufFile {
    path: PathBuf,
    bytes: FileBytes,
    reader: Cursor<Shared>,
    content: Content,
    /// The matrices laid out anew, in the layout the kernels read fastest
    /// ([`crate::weights::laid_out`]).
    laid_out: HashSet<String>,
}

/// A file's bytes held in memory (downloaded, or read), shared by the tensors read from them.
fn in_memory(bytes: Vec<u8>) -> FileBytes {
    // Chat templates render in forked children, which never read weights.
    #[cfg(target_os = "linux")]
    crate::sandbox::exclude_from_children(&bytes);
    Arc::new(bytes)
}

fn read_content<R: std::io::Read + std::io::Seek>(path: &Path, reader: &mut R) -> Result<Content> {
    // candle's reader bounds-checks lengths against the file size; a hostile header can still
    // trip an arithmetic assertion inside it, which must not take the process down.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(reader)))
        .map_err(|_| EngineError::invalid_file(path, "malformed GGUF header"))?
        .map_err(|e| EngineError::invalid_file(path, e))
}

/// The matrices of `content` that the kernels read fastest in another layout
/// ([`crate::weights::laid_out`]), in the file's order: name, first byte, length, row length and
/// the layout it goes into. The token embeddings are left as they are unless the output
/// multiplies by them (tied): a lookup reads a few rows.
fn matrices_to_lay_out(content: &Content) -> Vec<(&String, usize, usize, usize, BlockType)> {
    let tied = !content.tensor_infos.contains_key(&TensorName::Output.gguf());
    let mut matrices = Vec::new();
    for (name, info) in &content.tensor_infos {
        let &[rows, cols] = info.shape.dims() else { continue };
        let Some(format) = kernel_format(info.ggml_dtype, cols) else { continue };
        if !tied && *name == TensorName::TokenEmbedding.gguf() {
            continue;
        }
        match laid_out(format, rows) {
            WeightFormat::Blocks(layout) if WeightFormat::Blocks(layout) != format => {
                let start = (content.tensor_data_offset + info.offset) as usize;
                matrices.push((name, start, rows * format.row_bytes(cols), cols, layout));
            }
            _ => {}
        }
    }
    matrices.sort_by_key(|&(_, start, ..)| start);
    matrices
}

/// About how many bytes of a file one task of rayon's pool reads or rearranges for the kernels.
const PIECE_BYTES: usize = 1 << 20;

/// A piece of a file's bytes on their way into memory: where it starts in the file, and the
/// layout its rows go into with how many values each holds, where they are a matrix's the
/// kernels read in another layout.
struct Piece<'a> {
    at: usize,
    bytes: &'a mut [u8],
    layout: Option<(BlockType, usize)>,
}

/// `bytes` (the whole file, or the memory it is read into) cut into [`Piece`]s of about
/// [`PIECE_BYTES`], in order: each matrix [`matrices_to_lay_out`] names in whole
/// [`BlockType::rows_together`], and what lies between them. With them, the names of those
/// matrices.
fn pieces<'a>(path: &Path, content: &'a Content, bytes: &'a mut [u8]) -> Result<(Vec<Piece<'a>>, HashSet<String>)> {
    fn cut(bytes: &mut [u8], at: usize, piece_bytes: usize, layout: Option<(BlockType, usize)>) -> impl Iterator<Item = Piece<'_>> {
        let pieces = bytes.chunks_mut(piece_bytes).enumerate();
        pieces.map(move |(i, bytes)| Piece { at: at + i * piece_bytes, bytes, layout })
    }
    let matrices = matrices_to_lay_out(content);
    let (mut pieces, mut rest, mut at) = (Vec::new(), bytes, 0);
    for &(name, start, len, cols, layout) in &matrices {
        let Some(gap) = start.checked_sub(at) else {
            return Err(EngineError::invalid_file(path, format!("tensor `{name}` overlaps the one before it")));
        };
        let (between, after) = rest.split_at_mut(gap);
        let (matrix, after) = after.split_at_mut(len);
        let row_bytes = layout.row_bytes(cols);
        let piece_bytes = (PIECE_BYTES / row_bytes).max(1).next_multiple_of(layout.rows_together()) * row_bytes;
        pieces.extend(cut(between, at, PIECE_BYTES, None).chain(cut(matrix, start, piece_bytes, Some((layout, cols)))));
        (rest, at) = (after, start + len);
    }
    pieces.extend(cut(rest, at, PIECE_BYTES, None));
    Ok((pieces, matrices.into_iter().map(|(name, ..)| name.clone()).collect()))
}

/// The file's bytes as a reader reads them.
struct Shared(FileBytes);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

impl GgufFile {
    /// Maps the file (`crate::memory::map`), its tensors as the file has them: to look at it
    /// (`llm inspect`), and the first step of [`Self::open_for_kernels`].
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        let bytes: FileBytes = match len {
            0 => Arc::new(Vec::<u8>::new()),
            _ => Arc::new(crate::memory::map(&file).map_err(|e| EngineError::io(path, e))?),
        };
        Self::read(path.to_path_buf(), bytes)
    }

    /// Opens the file to run its model: its mapping, where it lies in huge pages and no matrix
    /// of it is laid out for the kernels; otherwise read into memory, as a download is held
    /// ([`Self::from_bytes`]), in huge pages where the system gives them (`crate::memory`).
    pub fn open_for_kernels(path: &Path) -> Result<Self> {
        let mapped = Self::open(path)?;
        let keep = matrices_to_lay_out(&mapped.content).is_empty() && crate::memory::mapped_in_huge_pages((*mapped.bytes).as_ref());
        // Which of the two a load took explains its time (on the Zen 4 VM 0.05–0.54 s mapped,
        // 0.13–3.6 s read, for the same files: slowest where the host backs fresh memory).
        tracing::info!(file = %path.display(), mapped = keep, "weights held");
        if keep {
            return Ok(mapped);
        }
        let Self { path, content, bytes, reader, .. } = mapped;
        // Unmapped before the file is read: both at once would hold it twice.
        drop((reader, bytes));
        Self::read_for_kernels(path, content)
    }

    /// The file of `content` at `path` read into memory ([`crate::memory::weights_buffer`]) in
    /// pieces on rayon's pool, each matrix the kernels read in another layout read a piece at a
    /// time into memory of the task's own and laid out from there into its place. Read whole and
    /// then laid out in place, as a download is, every byte of those matrices would go through
    /// memory twice more.
    fn read_for_kernels(path: PathBuf, content: Content) -> Result<Self> {
        use std::os::unix::fs::FileExt;
        let file = File::open(&path).map_err(|e| EngineError::io(&path, e))?;
        let len = file.metadata().map_err(|e| EngineError::io(&path, e))?.len();
        Self::check_tensor_bounds(&path, &content, len)?;
        let mut bytes = crate::memory::weights_buffer(len as usize);
        let (pieces, laid_out) = pieces(&path, &content, &mut bytes)?;
        let read = pieces.into_par_iter().try_for_each_init(Vec::new, |file_rows, piece| match piece.layout {
            Some((layout, cols)) => {
                file_rows.resize(piece.bytes.len(), 0);
                file.read_exact_at(file_rows, piece.at as u64)?;
                layout.rearrange_into(file_rows, piece.bytes, cols, false);
                Ok(())
            }
            None => file.read_exact_at(piece.bytes, piece.at as u64),
        });
        read.map_err(|e| EngineError::io(&path, e))?;
        Ok(Self::held(path, content, bytes, laid_out))
    }

    /// A GGUF held in memory (downloaded from S3, or the built-in demo): tensors are read from it
    /// in place, the matrices laid out for the kernels. `name` (e.g. its S3 URI) appears in errors.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        let path = PathBuf::from(name);
        let content = read_content(&path, &mut Cursor::new(&bytes[..]))?;
        Self::laid_out_for_kernels(path, content, bytes)
    }

    /// The header (metadata and tensor directory) of a GGUF whose first bytes are `prefix`: a
    /// download still under way. `None` while the header runs past them (or is malformed: the
    /// whole file then says how). No tensor can be read until [`Self::complete`].
    pub fn header_from_prefix(name: &str, prefix: &[u8]) -> Option<Self> {
        let path = PathBuf::from(name);
        let content = read_content(&path, &mut Cursor::new(prefix)).ok()?;
        let bytes: FileBytes = Arc::new(Vec::<u8>::new());
        Some(Self { path, reader: Cursor::new(Shared(bytes.clone())), bytes, content, laid_out: HashSet::new() })
    }

    /// This header over the whole file, downloaded: `bytes` start with the prefix it was read from.
    pub fn complete(self, bytes: Vec<u8>) -> Result<Self> {
        Self::laid_out_for_kernels(self.path, self.content, bytes)
    }

    fn read(path: PathBuf, bytes: FileBytes) -> Result<Self> {
        let len = (*bytes).as_ref().len() as u64;
        let mut reader = Cursor::new(Shared(bytes.clone()));
        let content = read_content(&path, &mut reader)?;
        Self::check_tensor_bounds(&path, &content, len)?;
        Ok(Self { path, bytes, reader, content, laid_out: HashSet::new() })
    }

    /// The file of `content` over `bytes` (the whole file), once every tensor is known to lie
    /// inside it, with the matrices the kernels multiply by rearranged in place into the layout
    /// they read fastest ([`matrices_to_lay_out`]), in pieces of rows on rayon's pool (the vCPUs).
    fn laid_out_for_kernels(path: PathBuf, content: Content, mut bytes: Vec<u8>) -> Result<Self> {
        Self::check_tensor_bounds(&path, &content, bytes.len() as u64)?;
        let (pieces, laid_out) = pieces(&path, &content, &mut bytes)?;
        pieces.into_par_iter().for_each(|piece| {
            if let Some((layout, cols)) = piece.layout {
                layout.rearrange(piece.bytes, cols, false);
            }
        });
        Ok(Self::held(path, content, bytes, laid_out))
    }

    /// The file of `content` held in memory, `bytes`, the matrices `laid_out` for the kernels.
    fn held(path: PathBuf, content: Content, bytes: Vec<u8>, laid_out: HashSet<String>) -> Self {
        let bytes = in_memory(bytes);
        Self { path, reader: Cursor::new(Shared(bytes.clone())), bytes, content, laid_out }
    }

    /// How the kernels read the matrix `name`, of `dtype`, `rows` rows of `cols` values, in this
    /// file's bytes, if they take it.
    fn kernel_format(&self, name: &str, dtype: candle_core::quantized::GgmlDType, rows: usize, cols: usize) -> Option<WeightFormat> {
        kernel_format(dtype, cols).map(|format| if self.laid_out.contains(name) { laid_out(format, rows) } else { format })
    }

    /// Drops the metadata keys under `prefix` (`tokenizer.` once the tokenizer is built from
    /// them: for Llama 3's, 408,403 strings and a copy of tokenizer.json).
    pub fn forget_metadata(&mut self, prefix: &str) {
        self.content.metadata.retain(|key, _| !key.starts_with(prefix));
    }

    /// Removes `key` from the metadata, and returns its value.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.content.metadata.remove(key)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Tensor names with their GGML type and dims (row-major, `[out, in]`), sorted by name.
    pub fn tensor_infos(&self) -> Vec<(String, String, Vec<usize>)> {
        let mut infos: Vec<_> =
            self.content.tensor_infos.iter().map(|(name, info)| (name.clone(), format!("{:?}", info.ggml_dtype), info.shape.dims().to_vec())).collect();
        infos.sort();
        infos
    }

    /// Every tensor must lie inside the file before anything is allocated for it.
    fn check_tensor_bounds(path: &Path, content: &Content, file_len: u64) -> Result<()> {
        for (name, info) in &content.tensor_infos {
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| EngineError::tensor(name, "element count overflows"))?;
            // No weight is empty; and candle would view an empty buffer as a slice of blocks
            // through a misaligned pointer (found by fuzzing).
            if elems == 0 {
                return Err(EngineError::tensor(name, format!("has no elements (shape {:?})", info.shape.dims())));
            }
            let block = info.ggml_dtype.block_size() as u64;
            if elems % block != 0 {
                return Err(EngineError::tensor(name, format!("{elems} elements is not a whole number of {:?} blocks", info.ggml_dtype)));
            }
            let bytes = (elems / block).saturating_mul(info.ggml_dtype.type_size() as u64);
            let start = content.tensor_data_offset.saturating_add(info.offset);
            // GGUF aligns tensor data to `general.alignment`, a multiple of 8; a tensor read in
            // place is viewed as values of up to 4 bytes (an f32 row), which must not straddle it.
            if start % 8 != 0 {
                return Err(EngineError::invalid_file(path, format!("tensor `{name}` starts at byte {start}, not a multiple of 8")));
            }
            let end = start.saturating_add(bytes);
            if end > file_len {
                return Err(EngineError::invalid_file(
                    path,
                    format!("tensor `{name}` ends at byte {end}, past the end of the file ({file_len} bytes): truncated?"),
                ));
            }
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn get_string(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// An integer-valued key, whatever integer width the writer chose.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.to_u64()
                    .or_else(|_| v.to_u32().map(u64::from))
                    .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                    .map(|x| x as usize)
                    .map_err(|_| EngineError::invalid_file(&self.path, format!("`{key}` is not an integer")))
            })
            .transpose()
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).map_err(|_| EngineError::invalid_file(&self.path, format!("`{key}` is not a number"))))
            .transpose()
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.to_bool().ok())
    }

    fn require_usize(&self, key: &str) -> Result<usize> {
        self.get_usize(key)?.ok_or_else(|| EngineError::invalid_file(&self.path, format!("missing metadata key `{key}`")))
    }

    pub fn architecture(&self) -> Result<&str> {
        self.get_string("general.architecture").ok_or_else(|| EngineError::invalid_file(&self.path, "missing `general.architecture`"))
    }

    /// The model hyper-parameters from `llama.*` keys (and tensor shapes where keys are optional).
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?;
        if arch != "llama" {
            return Err(EngineError::UnsupportedArchitecture(arch.to_string()));
        }
        let key = |k: &str| format!("llama.{k}");
        let hidden_size = self.require_usize(&key("embedding_length"))?;
        let num_heads = self.require_usize(&key("attention.head_count"))?;
        let head_dim = match self.get_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / num_heads.max(1),
        };
        let vocab_size = match self.get_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => self
                .content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| EngineError::tensor("token_embd.weight", "missing from the checkpoint"))?,
        };
        let rope_scaling = match self.get_string(&key("rope.scaling.type")) {
            Some("linear") => RopeScaling::Linear { factor: self.get_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0) },
            _ => RopeScaling::None,
        };
        let config = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: self.require_usize(&key("feed_forward_length"))?,
            num_layers: self.require_usize(&key("block_count"))?,
            num_heads,
            num_kv_heads: self.get_usize(&key("attention.head_count_kv"))?.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: self.get_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: self.get_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: self.get_usize(&key("context_length"))?.unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
        };
        config.validate()?;
        Ok(config)
    }
}

/// Reads tensors from a [`GgufFile`] onto the CPU, keeping quantized ones quantized.
pub struct GgufSource<'a> {
    pub file: &'a mut GgufFile,
}

impl WeightSource for GgufSource<'_> {
    fn load(&mut self, name: TensorName) -> Result<Option<Weight>> {
        let key = name.gguf();
        let Some(info) = self.file.content.tensor_infos.get(&key) else {
            return Ok(None);
        };
        if let &[rows, cols] = info.shape.dims() {
            if let Some(format) = self.file.kernel_format(&key, info.ggml_dtype, rows, cols) {
                // Inside the file: checked with the tensor directory when it was opened.
                let start = (self.file.content.tensor_data_offset + info.offset) as usize;
                let range = start..start + rows * format.row_bytes(cols);
                return Ok(Some(Weight::InPlace(InPlace::new(self.file.bytes.clone(), range, format, vec![rows, cols]))));
            }
        }
        let tensor = self.file.content.tensor(&mut self.file.reader, &key, &Device::Cpu).map_err(|e| EngineError::tensor(&key, e))?;
        Ok(Some(Weight::Quantized(Arc::new(tensor))))
    }

    fn display_name(&self, name: TensorName) -> String {
        name.gguf()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::Tensor;
    use llm_kernels::{BlockType, Float, WeightFormat};

    use super::*;

    /// F32, F16 and BF16 matrices stay where they lie in the file, as the block formats do:
    /// candle took them dequantized to `f32`, the file's memory again (twice for 16-bit ones).
    #[test]
    fn float_matrices_are_read_in_place() {
        let values = Tensor::randn(0f32, 1.0, (4, 32), &Device::Cpu).unwrap();
        let [f32, f16, bf16] = [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16].map(|dtype| QTensor::quantize(&values, dtype).unwrap());
        let mut bytes = Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &[], &[("token_embd.weight", &f16), ("output.weight", &bf16), ("blk.0.attn_q.weight", &f32)]).unwrap();
        let mut file = GgufFile::from_bytes("floats.gguf", bytes.into_inner()).unwrap();
        let mut source = GgufSource { file: &mut file };
        let query = TensorName::Layer(0, crate::weights::LayerTensor::Q);
        for (name, ty, written) in [(TensorName::TokenEmbedding, Float::F16, &f16), (TensorName::Output, Float::Bf16, &bf16), (query, Float::F32, &f32)] {
            let weight = source.load(name).unwrap().unwrap();
            let Weight::InPlace(matrix) = &weight else { panic!("{name:?} was copied: {weight:?}") };
            assert_eq!(matrix.format, WeightFormat::Float(ty));
            let expected: Vec<f32> = written.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(weight.to_f32().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected);
        }
    }

    /// Matrices are laid out anew where the kernels read another layout faster (x86: Q4_0 with
    /// AVX2, the legacy types, Q4_K, Q5_K and Q6_K with AVX-512), in a download and in a file
    /// read from disk, which stays as it was, and read back as written: whole, and as the rows
    /// an embedding lookup takes. The token embeddings of a model with its own output matrix stay
    /// as the file has them.
    #[test]
    fn matrices_are_laid_out_for_the_kernels_and_read_back_as_written() {
        // With AVX-512, the 16-row layouts keep 16 rows together: row 20 is read back from the
        // second group; 6 rows of Q4_0 are laid out otherwise (scales first with AVX2 and on a
        // Zen 4) or not at all.
        let shapes = [
            (GgmlDType::Q4_0, BlockType::Q4_0, 6, 96, 4),
            (GgmlDType::Q4_0, BlockType::Q4_0, 32, 96, 20),
            (GgmlDType::Q5_0, BlockType::Q5_0, 32, 64, 20),
            (GgmlDType::Q8_0, BlockType::Q8_0, 32, 64, 20),
            (GgmlDType::Q4_1, BlockType::Q4_1, 32, 64, 20),
            (GgmlDType::Q5_1, BlockType::Q5_1, 32, 64, 20),
            (GgmlDType::Q4K, BlockType::Q4K, 32, 256, 20),
            (GgmlDType::Q5K, BlockType::Q5K, 32, 256, 20),
            (GgmlDType::Q6K, BlockType::Q6K, 32, 256, 20),
            (GgmlDType::Q3K, BlockType::Q3K, 32, 256, 20),
            (GgmlDType::Q2K, BlockType::Q2K, 32, 256, 20),
        ];
        for (dtype, ty, rows, cols, row) in shapes {
            laid_out_and_read_back(dtype, ty, rows, cols, row);
        }
    }

    fn laid_out_and_read_back(dtype: GgmlDType, ty: BlockType, rows: usize, cols: usize, row: usize) {
        let values = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&values, dtype).unwrap();
        let written: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let on_disk = std::env::temp_dir().join(format!("llm-engine-laid-out-{}.gguf", std::process::id()));
        let files = |tensors: &[(&str, &QTensor)]| {
            let mut bytes = Cursor::new(Vec::new());
            gguf_file::write(&mut bytes, &[], tensors).unwrap();
            std::fs::write(&on_disk, bytes.get_ref()).unwrap();
            [GgufFile::from_bytes("laid-out.gguf", bytes.into_inner()).unwrap(), GgufFile::open_for_kernels(&on_disk).unwrap()]
        };
        let kernels = WeightFormat::Blocks(llm_kernels::Kernels::best().layout(ty, rows));
        let untied = [("token_embd.weight", &q), ("output.weight", &q), ("blk.0.attn_q.weight", &q)];
        let tied = [("token_embd.weight", &q), ("blk.0.attn_q.weight", &q)];
        let query = TensorName::Layer(0, crate::weights::LayerTensor::Q);
        for (tensors, expected) in [
            (&untied[..], &[(TensorName::TokenEmbedding, WeightFormat::Blocks(ty)), (TensorName::Output, kernels), (query, kernels)][..]),
            (&tied[..], &[(TensorName::TokenEmbedding, kernels), (query, kernels)][..]),
        ] {
            for mut file in files(tensors) {
                let mut source = GgufSource { file: &mut file };
                for &(name, format) in expected {
                    let weight = source.load(name).unwrap().unwrap();
                    let Weight::InPlace(matrix) = &weight else { panic!("{name:?} was copied: {weight:?}") };
                    assert_eq!(matrix.format, format, "{name:?}");
                    assert_eq!(weight.to_f32().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), written, "{name:?}");
                    assert_eq!(matrix.dequantize_row(row).unwrap(), written[row * cols..(row + 1) * cols], "{name:?}'s row {row}");
                }
            }
            let mut reread = GgufFile::open(&on_disk).unwrap();
            let Some(Weight::InPlace(matrix)) = GgufSource { file: &mut reread }.load(query).unwrap() else { panic!("the query matrix is read in place") };
            assert_eq!(matrix.format, WeightFormat::Blocks(ty), "as the file has it");
            assert_eq!(
                matrix.to_qtensor().unwrap().dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                written,
                "on disk as written"
            );
        }
        std::fs::remove_file(on_disk).unwrap();
    }

    /// A file on disk is laid out on its way into memory as a download is in place, byte for
    /// byte, the pieces of a matrix (Q8_0's here, of 1,088 KiB) and of the tensors around them
    /// (2.5 MiB of f32 before, 3 MiB of norm after) each put in its place.
    #[test]
    fn a_file_is_read_into_memory_as_a_download_is_laid_out() {
        let random = |rows: usize, cols: usize, dtype| QTensor::quantize(&Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap(), dtype).unwrap();
        let (embeddings, q8_0, q4_0) = (random(640, 1024, GgmlDType::F32), random(1024, 1024, GgmlDType::Q8_0), random(64, 1024, GgmlDType::Q4_0));
        let norm = QTensor::quantize(&Tensor::randn(0f32, 1.0, 3 << 18, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
        let tensors = [("token_embd.weight", &embeddings), ("output.weight", &q8_0), ("blk.0.attn_q.weight", &q4_0), ("output_norm.weight", &norm)];
        let mut written = Cursor::new(Vec::new());
        gguf_file::write(&mut written, &[], &tensors).unwrap();
        let on_disk = std::env::temp_dir().join(format!("llm-engine-read-{}.gguf", std::process::id()));
        std::fs::write(&on_disk, written.get_ref()).unwrap();
        let GgufFile { path, content, .. } = GgufFile::open(&on_disk).unwrap();
        let read = GgufFile::read_for_kernels(path, content);
        std::fs::remove_file(&on_disk).unwrap();
        let (read, downloaded) = (read.unwrap(), GgufFile::from_bytes("downloaded.gguf", written.into_inner()).unwrap());
        assert_eq!(read.laid_out, downloaded.laid_out);
        assert!((*read.bytes).as_ref() == (*downloaded.bytes).as_ref(), "read as the download is laid out");
    }

    /// A tensor whose data does not start on the file's alignment is refused when the file is
    /// opened: read in place, its values would be viewed through a misaligned pointer.
    #[test]
    fn misaligned_tensor_data_is_refused() {
        let values = QTensor::quantize(&Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
        let mut bytes = Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &[], &[("output.weight", &values)]).unwrap();
        let mut bytes = bytes.into_inner();
        // The tensor's directory entry: its name, 2 dims, its type, then its offset.
        let name_end = bytes.windows(13).position(|w| w == b"output.weight").unwrap() + 13;
        let offset_at = name_end + 4 + 2 * 8 + 4;
        bytes[offset_at..offset_at + 8].copy_from_slice(&4u64.to_le_bytes());
        let err = GgufFile::from_bytes("misaligned.gguf", bytes).err().expect("a misaligned tensor is refused").to_string();
        assert!(err.contains("not a multiple of 8"), "{err}");
    }
}
