#!/usr/bin/env python3
"""A random model with TinyLlama-1.1B's shapes, as GGUF files in several types, for benchmarks.

Weights are random (speed does not depend on them); the tokenizer is the llama2 fixture's.
Writes infra/.work/bench/hf/ (the safetensors checkpoint) and
infra/.work/bench/tinyllama-shape-{f16,q8_0,q4_0,q4_k_m}.gguf (git-ignored).

    .venv/bin/python infra/bench/make_bench_model.py --llama-cpp /tmp/llsrc/llama_cpp_python-*/vendor/llama.cpp
"""

import argparse
import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "infra" / ".work" / "bench"
TYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True)
    args = ap.parse_args()
    import llama_cpp as lc

    OUT.mkdir(parents=True, exist_ok=True)
    hf = OUT / "hf"
    if not (hf / "model.safetensors").exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                             bos_token_id=1, eos_token_id=2, dtype="float16")
        with torch.device("cpu"):
            model = LlamaForCausalLM(config).to(torch.float16)
        model.save_pretrained(hf, safe_serialization=True)
        for f in ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]:
            shutil.copy(ROOT / "tests/fixtures/llama2/hf" / f, hf / f)
    if not (OUT / "tinyllama-shape-f16.gguf").exists():
        env = {"PYTHONPATH": str(args.llama_cpp / "gguf-py"), "PATH": "/usr/bin:/bin"}
        subprocess.run([sys.executable, args.llama_cpp / "convert_hf_to_gguf.py", hf, "--outfile",
                        OUT / "tinyllama-shape-f16.gguf", "--outtype", "f16"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lc.llama_backend_init()
    for name, ftype in TYPES.items():
        out = OUT / f"tinyllama-shape-{name}.gguf"
        if out.exists():
            continue
        params = lc.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        assert lc.llama_model_quantize(str(OUT / "tinyllama-shape-f16.gguf").encode(), str(out).encode(),
                                       ctypes.byref(params)) == 0
    print("\n".join(str(p) for p in sorted(OUT.glob("*.gguf"))))


if __name__ == "__main__":
    main()
