#!/usr/bin/env python3
"""`llm bench` side by side with llama.cpp (llama-cpp-python) on the same GGUF files and threads.

Prints a Markdown table (the one in README.md). Each engine runs in its own process, so that load
time and peak RSS are its own. The decode bound is the tokens/s at which one token reads every
weight once (all tensors but the embedding table, of which a token reads one row) at the
machine's copy bandwidth with as many copies as threads (`bandwidth.py`).

    cargo build --release -p llm-cli
    .venv/bin/python infra/bench/compare.py infra/.work/bench/*.gguf --threads 1 2 --repeat 3
"""

import argparse
import json
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import gguf

from bandwidth import bandwidth

ROOT = Path(__file__).resolve().parents[2]

LLAMA_CPP_RUN = r"""
import json, resource, sys, time
import llama_cpp
path, n_prompt, n_gen, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=path, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_ubatch=n_prompt,
                      n_threads=threads, n_threads_batch=threads, verbose=False)
load_s = time.perf_counter() - t0
# Any valid ids (the work does not depend on them), below the vocabulary's size for small models.
prompt = [1] + [(i * 7919) % min(31000, llm.n_vocab() - 100) + 100 for i in range(n_prompt - 1)]
t0 = time.perf_counter()
llm.eval(prompt)
prefill = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(n_gen - 1):
    llm.eval([42])  # which token is fed does not change the work
decode = time.perf_counter() - t0
print(json.dumps({"load_s": load_s, "prefill_tok_s": n_prompt / prefill, "decode_tok_s": (n_gen - 1) / decode,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


class RunFailed(Exception):
    """An engine's process ended without its numbers (a crash, an error)."""


def last_json(engine, cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        how = f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0 else f"exit status {done.returncode}"
        last = " / ".join(done.stderr.strip().splitlines()[-2:])
        raise RunFailed(f"{engine} failed ({how}){': ' + last if last else ''}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_runs(cmds, repeat):
    """Per engine (`cmds` maps each to its command), each number the median of `repeat` runs, the
    engines taking turns, in the other order each round: a shared machine's neighbours move single
    runs, and a slow spell then falls on every engine alike; and where the host backs memory at
    first touch (the Zen 4 VM), a run that follows another process pays for the memory it takes
    afresh (our loads there 0.2 s or up to 3 s), which would fall on one engine each round."""
    runs = {engine: [] for engine in cmds}
    for nth in range(repeat):
        turns = list(cmds.items())
        for engine, cmd in turns if nth % 2 == 0 else reversed(turns):
            runs[engine].append(last_json(engine, cmd))
    return [{key: statistics.median(run[key] for run in done) for key in done[0] if isinstance(done[0][key], (int, float))}
            for done in runs.values()]


def weight_bytes_per_token(path):
    """Bytes of the tensors one decode step reads whole: all but the token embedding table, of
    which it reads one row, unless the table is the output head too (tied, no `output.weight`)."""
    tensors = gguf.GGUFReader(path).tensors
    tied = all(t.name != "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if tied or t.name != "token_embd.weight")


def arguments(ap):
    """The side-by-side runs' options, on `ap` (also `report.py`'s)."""
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--threads", nargs="+", type=int, default=[2])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--llm", type=Path, default=ROOT / "target" / "release" / "llm")
    ap.add_argument("--repeat", type=int, default=1, help="runs per engine and case; the table has their medians")
    ap.add_argument("--kernels", help="`llm bench --kernels`: ours no faster than these (e.g. avx2)")


def side_by_side(model, threads, args):
    """Medians of `llm bench` and of llama.cpp on `model` at `threads`: (ours, theirs)."""
    return median_runs({
        "llm": [args.llm, "bench", "--model", model, "--prompt-tokens", str(args.prompt_tokens),
                "--gen-tokens", str(args.gen_tokens), "--threads", str(threads), "--json"]
        + (["--kernels", args.kernels] if args.kernels else []),
        "llama.cpp": [sys.executable, "-c", LLAMA_CPP_RUN, str(model), str(args.prompt_tokens), str(args.gen_tokens), str(threads)],
    }, args.repeat)


def read_through(path):
    """Reads `path` once, so that its pages are in the page cache before the first run. Otherwise
    the first run after a switch of files (ours: `llm bench` runs first) read it from disk while
    mapping it lazily, inside its timed prompt: with several 2-4 GiB files on a 24 GiB machine,
    the one-thread rows, which come first, had our prompt at 0.54-0.71 x llama.cpp's, against
    0.88-0.97 x with the files read first (float files, Ice Lake-SP, 2026-12-06)."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def print_table(args, more_columns, more_cells):
    """Prints the Markdown table of `args.models` × `args.threads`: prefill and decode against
    llama.cpp and against the copy bound, then `more_columns`, whose cells
    `more_cells(model, threads, ours, theirs)` gives. Returns whether every row ran."""
    copy_rate = {t: bandwidth(t) for t in args.threads}
    columns = ["model", "threads", "prefill tok/s ours", "llama.cpp", "ratio", "decode tok/s ours", "llama.cpp", "ratio",
               "decode bound tok/s", "ours / bound", *more_columns]
    print("".join(f"| {c} " for c in columns) + "|")
    print("|---" * len(columns) + "|")
    ran = True
    for model in args.models:
        per_token = weight_bytes_per_token(model)
        read_through(model)
        for t in args.threads:
            try:
                ours, theirs = side_by_side(model, t, args)
            except RunFailed as e:
                # The other files and thread counts still run: one engine's crash on one file (llama.cpp's
                # build on one GPU machine crashed loading a model) should not cost the whole table.
                print(f"| {model.name} | {t} | {e} |", flush=True)
                ran = False
                continue
            bound = copy_rate[t] / per_token
            print(f"| {model.name} | {t} "
                  f"| {ours['prefill_tok_s']:.1f} | {theirs['prefill_tok_s']:.1f} | {ours['prefill_tok_s'] / theirs['prefill_tok_s']:.2f} "
                  f"| {ours['decode_tok_s']:.1f} | {theirs['decode_tok_s']:.1f} | {ours['decode_tok_s'] / theirs['decode_tok_s']:.2f} "
                  f"| {bound:.1f} | {ours['decode_tok_s'] / bound:.0%} " + more_cells(model, t, ours, theirs) + "|", flush=True)
    return ran


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(ap)
    args = ap.parse_args()
    mib = lambda b: b / 2**20
    ran = print_table(args, ["load s ours / llama.cpp", "peak RSS MiB ours / llama.cpp", "file MiB"], lambda model, t, ours, theirs: (
        f"| {ours['load_s']:.2f} / {theirs['load_s']:.2f} "
        f"| {mib(ours['peak_rss_bytes']):.0f} / {mib(theirs['peak_rss_bytes']):.0f} | {mib(model.stat().st_size):.0f} "))
    sys.exit(0 if ran else 1)


if __name__ == "__main__":
    main()
