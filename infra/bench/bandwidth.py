#!/usr/bin/env python3
"""The machine's memory copy bandwidth: THREADS processes each copy a 256 MiB buffer (far
larger than any cache) into another, repeatedly; prints bytes copied per second, all processes
together, as JSON. Decode reads each weight once per token, so weight bytes per token divided by
this is the bound on decode tokens/s that `compare.py` reports against.

    .venv/bin/python infra/bench/bandwidth.py [--threads N] [--seconds S]
"""

import argparse
import json
import multiprocessing as mp
import time

import numpy as np

SIZE = 256 << 20


def copy_rate(seconds, start, results):
    src = np.ones(SIZE, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page before timing
    start.wait()
    copied, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        np.copyto(dst, src)
        copied += SIZE
    results.put(copied / (time.perf_counter() - t0))


def bandwidth(threads=1, seconds=2.0):
    """Bytes per second copied by `threads` concurrent copies."""
    start, results = mp.Barrier(threads), mp.Queue()
    procs = [mp.Process(target=copy_rate, args=(seconds, start, results)) for _ in range(threads)]
    for p in procs:
        p.start()
    total = sum(results.get() for _ in procs)
    for p in procs:
        p.join()
    return total


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    print(json.dumps({"threads": args.threads, "copy_bytes_per_s": bandwidth(args.threads, args.seconds)}))
