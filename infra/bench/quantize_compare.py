#!/usr/bin/env python3
"""`llm quantize` side by side with llama.cpp's quantizer: throughput (MiB of input per second)
and peak RSS, on the checkpoint written by make_bench_model.py.

llama.cpp needs two steps (convert_hf_to_gguf.py to f16, then llama-quantize); `llm quantize` reads
the safetensors directly. Both are timed.

    cargo build --release -p llm-cli
    .venv/bin/python infra/bench/quantize_compare.py --llama-cpp /tmp/llsrc/llama_cpp_python-*/vendor/llama.cpp --threads 2
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "infra" / ".work" / "bench"
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}

# Runs a command in a child and reports its wall time and the child's peak RSS.
MEASURE = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(json.dumps({"s": time.perf_counter() - t0, "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""

LLAMA_QUANTIZE = r"""
import ctypes, sys, llama_cpp as lc
lc.llama_backend_init()
p = lc.llama_model_quantize_default_params()
p.ftype, p.nthread = int(sys.argv[3]), int(sys.argv[4])
assert lc.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)) == 0
"""


def measure(cmd):
    out = subprocess.run([sys.executable, "-c", MEASURE, *map(str, cmd)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llm", type=Path, default=ROOT / "target" / "release" / "llm")
    args = ap.parse_args()
    hf = WORK / "hf"
    weights = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    mib = weights / 2**20
    f16 = WORK / "convert-f16.gguf"
    convert = measure([sys.executable, args.llama_cpp / "convert_hf_to_gguf.py", hf, "--outfile", f16, "--outtype", "f16"])
    print(f"checkpoint: {mib:.0f} MiB of f16 safetensors; llama.cpp convert_hf_to_gguf.py to f16: {convert['s']:.1f} s, "
          f"peak RSS {convert['rss'] / 2**20:.0f} MiB\n")
    print("| type | threads | `llm quantize` s | MiB/s | peak RSS MiB | llama-quantize s (from f16 GGUF) | MiB/s | peak RSS MiB | speed ratio (ours / convert+quantize) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, ftype in FTYPES.items():
        out = WORK / f"ours-{name}.gguf"
        ours = measure([args.llm, "--threads", args.threads, "quantize", "--input", hf, "--output", out, "--type", name])
        theirs = measure([sys.executable, "-c", LLAMA_QUANTIZE, f16, WORK / f"theirs-{name}.gguf", ftype, args.threads])
        both = convert["s"] + theirs["s"]
        print(f"| {name} | {args.threads} | {ours['s']:.1f} | {mib / ours['s']:.0f} | {ours['rss'] / 2**20:.0f} "
              f"| {theirs['s']:.1f} | {mib / theirs['s']:.0f} | {theirs['rss'] / 2**20:.0f} | {both / ours['s']:.2f} |", flush=True)
        out.unlink()
        (WORK / f"theirs-{name}.gguf").unlink()


if __name__ == "__main__":
    main()
