#!/usr/bin/env python3
"""A random model with the shapes of TinyLlama-1.1B (the default), of Llama-3.2-1B
(`--shape llama3.2-1b`: a 128,256-token vocabulary, its embeddings tied to the output head, Llama 3
RoPE scaling) or of SmolLM2-360M's layers (`--shape smollm2-360m`: 32 narrow layers, hidden 960,
which is not a whole number of K-quants' 256-value blocks, so llama.cpp's K-quant mixtures fall
back to Q4_0, Q5_0, Q5_1 and Q8_0 for most matrices; tied embeddings, but TinyLlama's 32,000-token
vocabulary, not its own 49,152), as GGUF files in several types, for benchmarks.

Weights are random (speed does not depend on them), drawn with numpy as transformers initialises
a Llama (normal, std 0.02; norms 1), so no torch is needed; the tokenizer is the llama2
fixture's (for TinyLlama's and SmolLM2's shapes) or the llama3 one's. The f16 GGUF is written by
`llm quantize` (checked against llama.cpp by the fixture tests), the quantized ones by
llama.cpp's own quantizer, so both engines are timed on llama.cpp's files. Writes
infra/.work/bench/hf/ (TinyLlama's safetensors checkpoint; llama3.2-1b-hf/ and smollm2-360m-hf/
for the others) and
infra/.work/bench/SHAPE-shape-{f16,q8_0,q4_0,q4_1,q5_0,q5_1,q2_k,q3_k_m,q4_k_m,q5_k_m}.gguf
(git-ignored).

    cargo build --release -p llm-cli
    .venv/bin/python infra/bench/make_bench_model.py [--shape llama3.2-1b|smollm2-360m] [--types q8_0 q4_0 q4_k_m]
"""

import argparse
import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "infra" / ".work" / "bench"
TYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17}
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "torch_dtype": "float16",
}
# Per shape: its config.json beyond LLAMA, the fixture whose tokenizer it takes, its checkpoint's directory.
SHAPES = {
    "tinyllama": ({
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }, "llama2", "hf"),
    "llama3.2-1b": ({
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128009,
    }, "llama3", "llama3.2-1b-hf"),
    "smollm2-360m": ({
        "vocab_size": 32000, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
        "num_attention_heads": 15, "num_key_value_heads": 5, "max_position_embeddings": 8192,
        "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    }, "llama2", "smollm2-360m-hf"),
}


def random_checkpoint(hf, config, tokenizer_fixture):
    """`model.safetensors` with transformers' key names and initialisation."""
    rng = np.random.default_rng(0)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    tensors = {"model.embed_tokens.weight": normal(v, h), "model.norm.weight": np.ones(h, np.float16)}
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = normal(v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": normal(h, h), p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, h),
            p + "mlp.gate_proj.weight": normal(f, h), p + "mlp.up_proj.weight": normal(f, h),
            p + "mlp.down_proj.weight": normal(h, f),
            p + "input_layernorm.weight": np.ones(h, np.float16),
            p + "post_attention_layernorm.weight": np.ones(h, np.float16),
        }
    hf.mkdir(parents=True, exist_ok=True)
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(config, indent=2))
    for tokenizer_file in (ROOT / "tests/fixtures" / tokenizer_fixture / "hf").glob("tokenizer*"):
        shutil.copy(tokenizer_file, hf / tokenizer_file.name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", type=Path, default=ROOT / "target/release/llm", help="the llm binary")
    ap.add_argument("--shape", choices=SHAPES, default="tinyllama", help="the model whose shapes the files take")
    ap.add_argument("--types", nargs="+", choices=TYPES, default=list(TYPES), help="the quantized types to write (default: all)")
    args = ap.parse_args()
    import llama_cpp as lc

    shape, tokenizer_fixture, checkpoint = SHAPES[args.shape]
    hf = OUT / checkpoint
    f16 = OUT / f"{args.shape}-shape-f16.gguf"
    if not f16.exists():
        if not (hf / "model.safetensors").exists():
            random_checkpoint(hf, LLAMA | shape, tokenizer_fixture)
        subprocess.run([args.llm, "quantize", "--input", hf, "--output", f16, "--type", "f16"], check=True)
    lc.llama_backend_init()
    for name in args.types:
        out = OUT / f"{args.shape}-shape-{name}.gguf"
        if out.exists():
            continue
        params = lc.llama_model_quantize_default_params()
        params.ftype = TYPES[name]
        params.nthread = os.cpu_count()
        assert lc.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params)) == 0
    print("\n".join(str(p) for p in sorted(OUT.glob("*.gguf"))))


if __name__ == "__main__":
    main()
