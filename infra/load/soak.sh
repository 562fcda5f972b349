#!/usr/bin/env bash
# Load and soak: the built-in demo model under CONNECTIONS concurrent clients (wrk, from Debian's
# packages) for SECONDS, the server's RSS sampled every 5 s. Prints wrk's latency percentiles, the
# answers by status (200, or 503 when more than --max-queued wait) and the RSS at the start of the
# load, its peak, its end and at each quarter: a leak shows as RSS that keeps growing.
#   infra/load/soak.sh [serve|lambda] [SECONDS=300] [CONNECTIONS=8] [THREADS=2]
# serve:  `llm serve --threads THREADS`.
# lambda: the inference function's release binary, warm, under `cargo lambda watch`'s emulation
#         of the Lambda runtime API, called at its function URL (one invocation at a time, as one
#         Lambda instance takes them; the others wait in the emulator). Needs cargo-lambda
#         (pip install cargo-lambda). THREADS is not used: the function sizes itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-serve}" seconds="${2:-300}" connections="${3:-8}" threads="${4:-2}"
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
target="${CARGO_TARGET_DIR:-target}/release"
work=$(mktemp -d)
pids=()
trap 'kill -- "${pids[@]}" 2>/dev/null; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
case "$mode" in
serve)
    cargo build --release --locked --bin llm
    "$target/llm" serve --port 0 --threads "$threads" > /dev/null 2> "$work/server.log" &
    server=$!
    until grep -q "listening on" "$work/server.log"; do sleep 0.2; done
    url="$(grep -o 'http://[0-9.:]*' "$work/server.log" | head -1)/v1/chat/completions"
    ;;
lambda)
    command -v cargo-lambda >/dev/null || { echo "needs cargo-lambda (pip install cargo-lambda)" >&2; exit 1; }
    cargo build --release --locked -p infer-function
    port=$(free_port)
    # Its own process group, so that what it starts stops with it.
    setsid cargo lambda watch --only-lambda-apis -A 127.0.0.1 -P "$port" > "$work/emulator.log" 2>&1 &
    pids+=(-$!)
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.2; done
    AWS_LAMBDA_RUNTIME_API="http://127.0.0.1:$port/.rt" AWS_LAMBDA_FUNCTION_NAME=_ AWS_LAMBDA_FUNCTION_VERSION=1 \
        AWS_LAMBDA_FUNCTION_MEMORY_SIZE=2048 "$target/infer" > "$work/server.log" 2>&1 &
    server=$!
    url="http://127.0.0.1:$port/lambda-url/_/v1/chat/completions"
    ;;
*) echo "usage: $0 [serve|lambda] [SECONDS] [CONNECTIONS] [THREADS]" >&2; exit 2 ;;
esac
pids+=("$server")
# Warm: the first request loads the model.
until curl -sf "$url" -H 'Content-Type: application/json' \
    -d '{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}' > /dev/null; do sleep 0.5; done
( while kill -0 "$server" 2>/dev/null; do ps -o rss= -p "$server" >> "$work/rss"; sleep 5; done ) > /dev/null 2>&1 &
wrk --threads 2 --connections "$connections" --duration "${seconds}s" --timeout 30s --latency \
    --script infra/load/post.lua "$url"
sleep 1
awk '{ kib[NR] = $1; if ($1 > peak) peak = $1 } END {
    printf "RSS MiB: start %.1f, peak %.1f, end %.1f (%d samples); by quarter:", kib[1] / 1024, peak / 1024, kib[NR] / 1024, NR
    for (q = 1; q <= 4; q++) printf " %.1f", kib[int(NR * q / 4)] / 1024; print "" }' "$work/rss"
# Lines of the server's log that name an error, by message (in Lambda, the emulator cannot hand
# back the answers of the requests wrk leaves unanswered when it stops).
echo "server log, lines naming an error: $(grep -ci error "$work/server.log" || true)"
grep -i error "$work/server.log" | grep -o '"message":"[^"]*"' | sort | uniq -c || true
