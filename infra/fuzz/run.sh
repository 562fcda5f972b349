#!/usr/bin/env bash
# Fuzzes each target until its coverage plateaus, then merges into the committed corpus
# (fuzz/corpus/TARGET) only the new inputs that add coverage. An input that crashes a target is
# written to fuzz/regressions/TARGET/, which `cargo test -p llm-fuzz` replays (with the corpus)
# in CI: fix the crash at its root and keep the input.
#
#   infra/fuzz/run.sh [MAX_SECONDS] [TARGET...]     (default: 1800 s, every target)
#
# A target runs in rounds of ROUND seconds (default 120) and stops at the first round that adds
# less than PLATEAU_PERCENT (default 1) % to its coverage features (a plateau), or after
# MAX_SECONDS. It prints the features after each round. Each round first runs the whole corpus
# again, so for a slow target (a few executions per second) a short round is mostly that: give
# such targets long rounds. Needs a nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz --locked`). Built without a sanitizer: the code under test is safe
# Rust, and what is looked for is panics, hangs (-timeout) and unbounded memory (-rss_limit_mb).
# Seeds: infra/fuzz/seeds.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
max_seconds="${1:-1800}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf safetensors config_json tokenizer_json chat_template http_request s3_event batch_file)
round="${ROUND:-120}" plateau="${PLATEAU_PERCENT:-1}"
fuzz=(cargo +nightly fuzz run --sanitizer none --features libfuzzer)
# The last "cov: N ft: M" libFuzzer printed in a log, as "N M".
coverage() { grep -aoE 'cov: [0-9]+ ft: [0-9]+' "$1" | tail -1 | awk '{ print $2, $4 }'; }
# The executions libFuzzer counted in a log (its last count, when it crashed before its stats).
executions() { grep -aoE 'stat::number_of_executed_units: [0-9]+|^#[0-9]+' "$1" | tail -1 | grep -oE '[0-9]+$' || echo 0; }
for target in "${targets[@]}"; do
    found="fuzz/.work/$target" log="fuzz/.work/$target.log"
    mkdir -p "$found" "fuzz/regressions/$target"
    : > "$log"
    elapsed=0 features=0 runs=0 history="" verdict="no plateau within ${max_seconds} s"
    while [ "$elapsed" -lt "$max_seconds" ]; do
        # New inputs go to the first folder; the committed corpus is read as seeds.
        if ! "${fuzz[@]}" "$target" "$found" "fuzz/corpus/$target" -- -max_total_time="$round" -timeout=10 \
            -rss_limit_mb=2048 -max_len=131072 -print_final_stats=1 -artifact_prefix="fuzz/regressions/$target/" \
            > "$log.round" 2>&1; then
            cat "$log.round" >> "$log"
            runs=$((runs + $(executions "$log.round")))
            verdict="CRASHED after $((elapsed + round)) s at most: see $log and fuzz/regressions/$target/"
            break
        fi
        cat "$log.round" >> "$log"
        elapsed=$((elapsed + round))
        runs=$((runs + $(executions "$log.round")))
        read -r cov ft <<< "$(coverage "$log.round")"
        history="$history ${elapsed}s:$ft"
        if [ "$features" -gt 0 ] && [ $(((ft - features) * 100)) -lt $((features * plateau)) ]; then
            verdict="plateau after ${elapsed} s"
            features=$ft
            break
        fi
        features=$ft
    done
    rm -f "$log.round"
    "${fuzz[@]}" "$target" "fuzz/corpus/$target" "$found" -- -merge=1 >> "$log" 2>&1
    echo "$target: $verdict; $runs executions; cov ${cov:-?} ft ${features}; features by time:$history; corpus $(ls "fuzz/corpus/$target" | wc -l) inputs"
done
