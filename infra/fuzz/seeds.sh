#!/usr/bin/env bash
# Writes the seed inputs of every fuzz target (fuzz/corpus/TARGET/seed-*): infra/fuzz/seeds.py,
# then the tiny checkpoint it wrote converted to GGUF by `llm quantize` in several types.
#   infra/fuzz/seeds.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 infra/fuzz/seeds.py "$work/tiny"
cargo build --release --locked --bin llm
LLM="${CARGO_TARGET_DIR:-target}/release/llm"
mkdir -p fuzz/corpus/gguf
for type in f16 q8_0 q4_0 q4_k_m; do
    "$LLM" quantize --input "$work/tiny" --type "$type" --output "fuzz/corpus/gguf/seed-$type.gguf"
done
