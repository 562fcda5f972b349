#!/usr/bin/env bash
# Load and soak: `llm serve` (the built-in demo model) under CONNECTIONS concurrent clients (wrk,
# from Debian's packages) for SECONDS, its RSS sampled every 5 s. Prints wrk's latency
# percentiles, the answers by status (200, or 503 when more than --max-queued wait) and the RSS
# at the start of the load, its peak, its end and at each quarter: a leak shows as RSS that keeps
# growing.
#   infra/load/soak.sh [SECONDS=300] [CONNECTIONS=8] [THREADS=2]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-300}" connections="${2:-8}" threads="${3:-2}"
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
cargo build --release --locked --bin llm
LLM="${CARGO_TARGET_DIR:-target}/release/llm"
work=$(mktemp -d)
"$LLM" serve --port 0 --threads "$threads" > /dev/null 2> "$work/serve.log" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
until grep -q "listening on" "$work/serve.log"; do sleep 0.2; done
url=$(grep -o 'http://[0-9.:]*' "$work/serve.log" | head -1)
# Warm: the first request loads the model.
curl -sf "$url/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}' > /dev/null
( while kill -0 $server 2>/dev/null; do ps -o rss= -p $server >> "$work/rss"; sleep 5; done ) &
wrk --threads 2 --connections "$connections" --duration "${seconds}s" --timeout 30s --latency \
    --script infra/load/post.lua "$url/v1/chat/completions"
sleep 1
awk '{ kib[NR] = $1; if ($1 > peak) peak = $1 } END {
    printf "RSS MiB: start %.1f, peak %.1f, end %.1f (%d samples); by quarter:", kib[1] / 1024, peak / 1024, kib[NR] / 1024, NR
    for (q = 1; q <= 4; q++) printf " %.1f", kib[int(NR * q / 4)] / 1024; print "" }' "$work/rss"
