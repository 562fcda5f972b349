#!/usr/bin/env bash
# Fuzzes each target for SECONDS under libFuzzer, then merges into the committed corpus
# (fuzz/corpus/TARGET) only the new inputs that add coverage. An input that crashes a target is
# written to fuzz/regressions/TARGET/, which `cargo test -p llm-fuzz` replays (with the corpus)
# in CI: fix the crash at its root and keep the input.
#
#   infra/fuzz/run.sh [SECONDS] [TARGET...]        (default: 300 s, every target)
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`). Built without a
# sanitizer: the code under test is safe Rust, and what is looked for is panics, hangs
# (-timeout) and unbounded memory (-rss_limit_mb). Seeds: infra/fuzz/seeds.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-300}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf safetensors config_json tokenizer_json chat_template http_request s3_event batch_file)
fuzz=(cargo +nightly fuzz run --sanitizer none --features libfuzzer)
for target in "${targets[@]}"; do
    found="fuzz/.work/$target"
    mkdir -p "$found" "fuzz/regressions/$target"
    # New inputs go to the first folder; the committed corpus is read as seeds.
    "${fuzz[@]}" "$target" "$found" "fuzz/corpus/$target" -- -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=2048 -max_len=131072 -print_final_stats=1 -artifact_prefix="fuzz/regressions/$target/" \
        > "fuzz/.work/$target.log" 2>&1 || echo "$target: crashed, see fuzz/.work/$target.log and fuzz/regressions/$target/"
    "${fuzz[@]}" "$target" "fuzz/corpus/$target" "$found" -- -merge=1 >> "fuzz/.work/$target.log" 2>&1
    runs=$(grep -ao 'stat::number_of_executed_units: [0-9]*' "fuzz/.work/$target.log" | tail -1 | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -aoE '#[0-9]+[[:space:]]+(pulse|DONE|NEW|REDUCE|INITED)[[:space:]]+cov: [0-9]+ ft: [0-9]+' "fuzz/.work/$target.log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' || echo "?")
    echo "$target: $runs executions in ${seconds} s, $cov, corpus $(ls "fuzz/corpus/$target" | wc -l) inputs"
done
