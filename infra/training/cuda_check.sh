#!/usr/bin/env bash
# Checks `llm`'s CUDA training path against its CPU path on a GPU machine, and times both:
#
#   LLM=path/to/llm infra/training/cuda_check.sh [WORK_DIR]        (default: infra/.work/cuda-check)
#
# LLM must be built with `--features cuda` (see README, *GPU builds*). Each case trains the demo
# task's untrained teacher with the same seed and data on `--device cpu` and `--device cuda`, then
# compares the two runs' per-step losses and written weights (python3 with numpy and safetensors):
# the first step's loss must agree within 1e-5 (the forward pass), every later one within 1e-2 (the
# two devices sum in different orders, and training amplifies that: on an H200 the full fine-tune
# strayed by up to 1e-3 at one step of 20, QAT's rounding to the grid by 3e-4).
# LoRA runs without dropout: its masks are drawn by each device's own generator. The last case times
# a fresh 14-layer model of 165 M parameters (SPEED_STEPS steps on the CPU, 10 on the GPU).
set -euo pipefail
LLM="${LLM:-target/release/llm}"
W="${1:-infra/.work/cuda-check}"
STEPS="${STEPS:-20}"
SPEED_STEPS="${SPEED_STEPS:-3}"
rm -rf "$W" && mkdir -p "$W"

"$LLM" demo-data --output "$W/data" --pretrain 4000 --sft 2000 --eval-per-task 10
D="$W/data"
common=(--batch-size 32 --max-seq-len 64 --checkpoint-every 0 --seed 0 --warmup 5)

# Trains one case on both devices: NAME SUBCOMMAND ARGS...
both() {
    local name=$1; shift
    for device in cpu cuda; do
        echo "== $name on $device"
        "$LLM" "$@" "${common[@]}" --device "$device" --output "$W/$name-$device"
    done
}

both full finetune --method full --base "$D/teacher-init" --data "$D/pretrain.jsonl" --steps "$STEPS" --lr 2e-3
both lora finetune --method lora --base "$D/teacher-init" --data "$D/sft.jsonl" --steps "$STEPS" --lr 1e-2 \
    --lora-dropout 0 --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
    --eval-data "$D/sft-eval.jsonl" --eval-every 10
both qat finetune --method full --qat q4_0 --base "$D/teacher-init" --data "$D/pretrain.jsonl" --steps "$STEPS" --lr 2e-3
both distill distill --teacher "$D/teacher-init" --student-layers 3 --data "$D/sft.jsonl" --steps "$STEPS" --lr 2e-3 \
    --temperature 2 --alpha 0.5

# The speed case: a config that does not fit inside the teacher starts fresh, and --alpha 0 never
# runs the teacher, so this trains a large model from scratch on the labels.
python3 - "$D/teacher-init/config.json" "$W/big-config.json" <<'EOF'
import json, sys
config = json.load(open(sys.argv[1]))
config.update(hidden_size=1024, intermediate_size=2816, num_hidden_layers=14, num_attention_heads=16,
              num_key_value_heads=8, head_dim=64)
json.dump(config, open(sys.argv[2], "w"), indent=2)
EOF
for device in cpu cuda; do
    steps=$([ "$device" = cpu ] && echo "$SPEED_STEPS" || echo 10)
    echo "== speed on $device"
    "$LLM" distill --teacher "$D/teacher-init" --student-config "$W/big-config.json" --alpha 0 --data "$D/pretrain.jsonl" \
        --steps "$steps" --lr 1e-4 "${common[@]}" --device "$device" --output "$W/speed-$device"
done

python3 - "$W" <<'EOF'
import json, pathlib, statistics, sys
import numpy as np
from safetensors.numpy import load_file

work = pathlib.Path(sys.argv[1])
def metrics(run):
    return [json.loads(line) for line in (work / run / "metrics.jsonl").read_text().splitlines() if line.strip()]

def weights(run):
    files = sorted((work / run).glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors

def speed(rows):
    """Tokens/s, the first step (start-up, the GPU's first launches) left out."""
    return statistics.median(r["tokens_per_s"] for r in rows[1:] or rows)

failed = False
print("\n| case | steps | first loss cpu / cuda | last loss cpu / cuda | max rel. loss diff | max abs. weight diff (max abs. weight) | tokens/s cpu / cuda |")
print("|---|---:|---:|---:|---:|---:|---:|")
for case in ["full", "lora", "qat", "distill", "speed"]:
    cpu, cuda = metrics(f"{case}-cpu"), metrics(f"{case}-cuda")
    row = f"| {case} | {len(cpu)} / {len(cuda)} | {cpu[0]['loss']:.5f} / {cuda[0]['loss']:.5f} | {cpu[-1]['loss']:.5f} / {cuda[-1]['loss']:.5f} |"
    rels = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(cpu, cuda)]
    failed |= not (rels[0] < 1e-5 and max(rels) < 1e-2)
    if case == "speed":
        row += f" {max(rels):.1e} (steps 1–{len(rels)}) | | {speed(cpu):.0f} / {speed(cuda):.0f} |"
    else:
        wc, wg = weights(f"{case}-cpu"), weights(f"{case}-cuda")
        assert wc.keys() == wg.keys(), f"{case}: the two runs wrote different tensors"
        diff = max(float(np.abs(wc[k].astype(np.float32) - wg[k].astype(np.float32)).max()) for k in wc)
        scale = max(float(np.abs(wc[k].astype(np.float32)).max()) for k in wc)
        row += f" {max(rels):.1e} | {diff:.1e} ({scale:.2f}) | {speed(cpu):.0f} / {speed(cuda):.0f} |"
        evals = [(a["eval_loss"], b["eval_loss"]) for a, b in zip(cpu, cuda) if "eval_loss" in a and "eval_loss" in b]
        if evals:
            row += " eval loss " + ", ".join(f"{a:.4f} / {b:.4f}" for a, b in evals)
    print(row)
print("\nFAILED: a CUDA run's loss strays from the CPU run's" if failed else "\nOK: CUDA and CPU losses agree (step 1 within 1e-5, every step within 1e-2)")
sys.exit(1 if failed else 0)
EOF
