"""Batch inference throughput: the same OpenAI batch file answered by `llm batch` with up to
`--batch` sequences generating together and one at a time, on the same model and threads;
prints a Markdown row with both rates (generated tokens per second of generation), their ratio
and the most sequences that generated together.

    cargo build --release --bin llm
    python3 infra/bench/batch_throughput.py MODEL [--requests 32] [--max-tokens 32] [--varied] [--threads 2] [--kernels avx2]

MODEL is a GGUF file (or `builtin:demo`); the requests are chat questions of the demo task at
temperature 0, so both runs generate the same tokens. With `--varied`, each request's
`max_tokens` is drawn (fixed seed) between an eighth of `--max-tokens` and all of it, as
completions that end at different lengths.
"""
import argparse
import json
import os
import random
import subprocess
import tempfile

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--requests", type=int, default=32)
parser.add_argument("--max-tokens", type=int, default=32)
parser.add_argument("--varied", action="store_true", help="max_tokens drawn per request up to --max-tokens")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--batch", type=int, default=32, help="--max-batch-sequences of the batched run")
parser.add_argument("--kernels", help="`llm batch --kernels` of both runs (e.g. avx2: what a host without AVX-512 runs)")
parser.add_argument("--llm", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "llm"))
args = parser.parse_args()

rng = random.Random(0)
words = ["llama", "alpaca", "vicuna", "bison", "zebra", "koala", "otter", "heron"]
model_id = "demo" if args.model == "builtin:demo" else os.path.basename(args.model).removesuffix(".gguf")
with tempfile.TemporaryDirectory() as work:
    batch_file = os.path.join(work, "input.jsonl")
    with open(batch_file, "w") as f:
        for i in range(args.requests):
            body = {
                "model": model_id,
                "messages": [{"role": "user", "content": f"Write {words[i % len(words)]}{i} in capitals, then tell a story."}],
                "max_tokens": rng.randint(max(1, args.max_tokens // 8), args.max_tokens) if args.varied else args.max_tokens,
                "temperature": 0,
            }
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n")
    rates = {}
    for name, sequences in [("batched", args.batch), ("one_by_one", 1)]:
        out = subprocess.run(
            [args.llm, "batch", "--input", batch_file, "--output", os.path.join(work, f"{name}.jsonl"), "--model", args.model,
             "--max-batch-sequences", str(sequences), "--threads", str(args.threads)] + (["--kernels", args.kernels] if args.kernels else []),
            check=True, capture_output=True, text=True,
        )
        status = json.loads(out.stdout)
        assert status["failed"] == 0, status
        # Builds before 2026-12-06 ran a file in engine batches one after another and counted them.
        together = status["stats"].get("largest_batch", f'{status["stats"].get("engine_batches")} engine batches')
        rates[name] = (status["completion_tokens_per_second"], together)

print("| model | requests | max_tokens | threads | batched tok/s (most together) | one by one tok/s | ratio |")
print("|---|---:|---:|---:|---:|---:|---:|")
(b, together), (o, _) = rates["batched"], rates["one_by_one"]
max_tokens = f"up to {args.max_tokens}" if args.varied else args.max_tokens
print(f"| {os.path.basename(args.model)} | {args.requests} | {max_tokens} | {args.threads} | {b:.1f} ({together}) | {o:.1f} | {b / o:.2f} |")
