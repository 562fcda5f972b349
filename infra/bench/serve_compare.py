#!/usr/bin/env python3
"""`llm serve` side by side with llama.cpp's OpenAI server (llama-cpp-python's `llama_cpp.server`)
on the same GGUF file and threads, through the official `openai` client: what a caller of the API
sees, where `compare.py` times the engines alone.

Ratios are llama.cpp's time over ours and our rate over llama.cpp's: above 1, ours is faster.
Both servers run at once and take requests in turn (greedy, streamed, one at a time), each after
a warm-up request. Two kinds of request:
- a new prompt (`--prompt-tokens` of text no earlier request started with): time to the first
  token, then the streamed tokens per second after it;
- the next turn of a conversation: the previous turn's prompt and completion and
  `--turn-tokens` more, as a chat client resends them; its time to the first token shows whether
  the server runs the whole conversation again or only what is new (llama.cpp's server keeps
  the last prompt's KV cache and reuses its longest shared start; `llm serve` keeps several,
  `--prompt-cache-mib` of them). With `--conversations K`, K conversations take turns, as
  clients of one server do: a conversation's next turn comes after the other K − 1 conversations'
  turns; with `--turns-at-once`, the K conversations' turns come at once, as K clients' would.
  `--llama-cpp-cache` turns on llama-cpp-python's own cache of several prompts' states
  (`--cache True`, 2 GiB in RAM), off by default.

With `--join-prompt-tokens N`, also a prompt of N tokens sent while a stream of `--max-tokens`
runs: the stream's longest wait between two tokens after it came (`llm serve` runs a long prompt
in parts, a decode step between each two), and the long prompt's time to its first token
(llama-cpp-python's server runs it after the stream). With `--join-short-prompt-tokens M` as
well, a prompt of M tokens follows the long one after a quarter of a second: its time to the
first token shows whether it waits for the long prompt's parts (`llm serve` starts it beside
them when it is short enough).

With `--concurrency N`, also N new prompts sent at once: the tokens per second of all N
streams together and the median time to the first token. `llm serve` lets requests join its
running batch; llama-cpp-python's server answers one at a time (its `interrupt_requests` is
turned off, or each new request would cut the running one short). Run it with `--llm` of an
older build to see what joining a batch gives over one batch at a time.

    pip install openai 'llama-cpp-python[server]'
    .venv/bin/python infra/bench/serve_compare.py infra/.work/bench/tinyllama-shape-q4_k_m.gguf --threads 1 2
"""

import argparse
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from gguf import GGUFReader

from cold_start import free_port

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("river stone light garden number window music paper story winter market silver "
         "harbor engine forest letter bridge candle morning valley question circle").split()


def eos_id(model):
    field = GGUFReader(model).fields["tokenizer.ggml.eos_token_id"]
    return int(field.parts[field.data[0]][0])


class Server:
    def __init__(self, name, cmd, port, eos):
        # Both servers take OpenAI's `logit_bias`: with the end-of-text token banned, every
        # request generates all its tokens (a random model's greedy path may otherwise end early).
        self.name, self.port, self.no_eos = name, port, {str(eos): -100}
        self.log = open(Path("/tmp") / f"serve_compare-{name}-{port}.log", "w")
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                sys.exit(f"{name} exited with status {self.process.returncode}; see {self.log.name}")
            try:
                self.model = self.client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    sys.exit(f"{name} did not answer within 120 s; see {self.log.name}")
                time.sleep(0.5)

    def stream(self, prompt, max_tokens):
        """Time to the first token (s), tokens per second after it, and the completion's text."""
        started = time.perf_counter()
        first = last = finish = None
        text = []
        stream = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                logit_bias=self.no_eos, stream=True)
        for chunk in stream:
            last = time.perf_counter()
            first = first or last
            if chunk.choices:
                text.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
        # Every token was generated, so the rate counts them all; the servers split the last
        # token and the finish reason into chunks differently.
        if finish != "length":
            sys.exit(f"{self.name} finished with {finish!r} before {max_tokens} tokens")
        return first - started, (max_tokens - 1) / (last - first), "".join(text)

    def burst(self, prompts, max_tokens):
        """All `prompts` at once: their tokens per second together, and the median time to the first token."""
        with ThreadPoolExecutor(len(prompts)) as pool:
            started = time.perf_counter()
            answers = list(pool.map(lambda prompt: self.stream(prompt, max_tokens), prompts))
            seconds = time.perf_counter() - started
        return len(prompts) * max_tokens / seconds, statistics.median(a[0] for a in answers)

    def gap_while_joining(self, prompt, long_prompt, max_tokens, short_prompt=None):
        """A stream of `max_tokens` runs; after its fourth token `long_prompt` comes, and
        `short_prompt` (if any) a quarter of a second later. The stream's longest wait between
        two tokens from then on (s), and the long and the short prompt's times to their first
        tokens (s; the short one's `None` without it). Where requests join a running batch, the
        stream should outlast the long prompt's prefill, or its stalls are not all seen."""
        times, streaming = [], threading.Event()

        def run_stream():
            for _ in self.client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                    logit_bias=self.no_eos, stream=True):
                times.append(time.perf_counter())
                if len(times) == 4:
                    streaming.set()

        def run_short():
            time.sleep(0.25)
            return self.stream(short_prompt, 2)[0] if short_prompt else None

        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(run_stream)
            streaming.wait()
            sent = time.perf_counter()
            short = pool.submit(run_short)
            first_token, _, _ = self.stream(long_prompt, 2)
            running.result()
            short_first = short.result()
        return max(b - a for a, b in zip(times, times[1:]) if b > sent), first_token, short_first

    def stop(self):
        self.process.terminate()
        self.process.wait()


def words(rng, n):
    # About 1.2 tokens a word with a Llama tokenizer; the servers' own counts are not needed.
    return " ".join(rng.choice(WORDS) for _ in range(int(n / 1.2)))


def measure(model, threads, args):
    ours_port, theirs_port = free_port(), free_port()
    eos = eos_id(model)
    ours = Server("llm serve", [args.llm, "serve", "--model", model, "--threads", str(threads), "--port", str(ours_port)], ours_port, eos)
    theirs = Server("llama.cpp", [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_threads", str(threads),
                                  "--n_threads_batch", str(threads), "--n_ctx", "4096", "--interrupt_requests", "False",
                                  "--port", str(theirs_port)] + (["--cache", "True"] if args.llama_cpp_cache else []), theirs_port, eos)
    both = (ours, theirs)
    results = {s.name: {"new": [], "decode": [], "turn": [], "burst": [], "burst_first": [], "gap": [], "join_first": [], "short_first": []} for s in both}
    try:
        for server in both:
            server.stream("warm up", 4)
        rng = random.Random(0)
        for _ in range(args.repeat):
            prompt = f"{rng.randrange(10**6)} " + words(rng, args.prompt_tokens)
            for server in both:
                ttft, rate, _ = server.stream(prompt, args.max_tokens)
                results[server.name]["new"].append(ttft)
                results[server.name]["decode"].append(rate)
        # The same conversations on each server, each turn after that server's own completions.
        openings = [f"{rng.randrange(10**6)} " + words(rng, args.prompt_tokens) for _ in range(args.conversations)]
        conversations = {s.name: list(openings) for s in both}
        for measured in [False] + [True] * args.repeat:
            turns = [" " + words(rng, args.turn_tokens) for _ in range(args.conversations)]
            for server in both:
                history = conversations[server.name]
                if args.turns_at_once:
                    with ThreadPoolExecutor(args.conversations) as pool:
                        answers = list(pool.map(lambda prompt: server.stream(prompt, args.max_tokens), history))
                else:
                    answers = [server.stream(prompt, args.max_tokens) for prompt in history]
                for k, (ttft, _, completion) in enumerate(answers):
                    if measured:
                        results[server.name]["turn"].append(ttft)
                    history[k] += completion + turns[k]
        for _ in range(args.repeat if args.concurrency else 0):
            prompts = [f"{rng.randrange(10**6)} " + words(rng, args.prompt_tokens) for _ in range(args.concurrency)]
            for server in both:
                rate, first = server.burst(prompts, args.max_tokens)
                results[server.name]["burst"].append(rate)
                results[server.name]["burst_first"].append(first)
        for _ in range(args.repeat if args.join_prompt_tokens else 0):
            prompt = f"{rng.randrange(10**6)} " + words(rng, 16)
            long_prompt = f"{rng.randrange(10**6)} " + words(rng, args.join_prompt_tokens)
            short_prompt = f"{rng.randrange(10**6)} " + words(rng, args.join_short_prompt_tokens) if args.join_short_prompt_tokens else None
            for server in both:
                gap, first, short_first = server.gap_while_joining(prompt, long_prompt, args.max_tokens, short_prompt)
                results[server.name]["gap"].append(gap)
                results[server.name]["join_first"].append(first)
                if short_first is not None:
                    results[server.name]["short_first"].append(short_first)
    finally:
        for server in both:
            server.stop()
    return {name: {k: statistics.median(v) for k, v in r.items() if v} for name, r in results.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeat", type=int, default=5, help="requests of each kind per server (medians)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--turn-tokens", type=int, default=32, help="new text in each turn of the conversation")
    ap.add_argument("--conversations", type=int, default=1, help="conversations that take turns")
    ap.add_argument("--turns-at-once", action="store_true", help="the conversations' turns come at once, not in turn")
    ap.add_argument("--llama-cpp-cache", action="store_true", help="llama-cpp-python's server with --cache True")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=0, help="also send this many new prompts at once")
    ap.add_argument("--join-prompt-tokens", type=int, default=0,
                    help="also send a prompt this long while a stream of --max-tokens runs")
    ap.add_argument("--join-short-prompt-tokens", type=int, default=0,
                    help="with --join-prompt-tokens, also send a prompt this long a quarter of a second after the long one")
    ap.add_argument("--llm", default=str(ROOT / "target/release/llm"))
    args = ap.parse_args()
    burst = f"| {args.concurrency} at once: tok/s ours | llama.cpp | ratio | first token s, ours | llama.cpp " if args.concurrency else ""
    join = (f"| stream's longest gap s while {args.join_prompt_tokens} tokens join, ours | llama.cpp "
            "| their first token s, ours | llama.cpp ") if args.join_prompt_tokens else ""
    short = (f"| then {args.join_short_prompt_tokens} tokens: first token s, ours | llama.cpp "
             if args.join_prompt_tokens and args.join_short_prompt_tokens else "")
    print("| model | threads | new prompt: first token s, ours | llama.cpp | ratio | next turn: first token s, ours | llama.cpp | ratio "
          f"| streamed tok/s ours | llama.cpp | ratio {burst}{join}{short}|")
    print("|---" * (11 + 5 * bool(args.concurrency) + 4 * bool(args.join_prompt_tokens) + 2 * bool(short)) + "|")
    for model in args.models:
        for threads in args.threads:
            r = measure(model, threads, args)
            ours, theirs = r["llm serve"], r["llama.cpp"]
            print(f"| {Path(model).name} | {threads} "
                  f"| {ours['new']:.3f} | {theirs['new']:.3f} | {theirs['new'] / ours['new']:.2f} "
                  f"| {ours['turn']:.3f} | {theirs['turn']:.3f} | {theirs['turn'] / ours['turn']:.2f} "
                  f"| {ours['decode']:.1f} | {theirs['decode']:.1f} | {ours['decode'] / theirs['decode']:.2f} "
                  + (f"| {ours['burst']:.1f} | {theirs['burst']:.1f} | {ours['burst'] / theirs['burst']:.2f} "
                     f"| {ours['burst_first']:.3f} | {theirs['burst_first']:.3f} " if args.concurrency else "")
                  + (f"| {ours['gap']:.3f} | {theirs['gap']:.3f} | {ours['join_first']:.3f} | {theirs['join_first']:.3f} "
                     if args.join_prompt_tokens else "")
                  + (f"| {ours['short_first']:.3f} | {theirs['short_first']:.3f} " if short else "") + "|", flush=True)


if __name__ == "__main__":
    main()
