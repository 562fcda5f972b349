"""The demo pipeline's results (results.jsonl from infra/demo/pipeline.sh) as a Markdown table,
with the targets checked: the distilled student keeps >= 95 % of the teacher's accuracy with
<= 50 % of its parameters and beats the same student trained without the teacher; quantizing
costs at most 0.5 (Q8_0) and 2 (Q4_K_M) accuracy points. Also shown, not a target: the
distillation loss alone against the labels alone, both students starting as the pruned teacher."""
import json
import sys

rows = {r["model"]: r for r in map(json.loads, open(sys.argv[1]))}
tasks = list(next(iter(rows.values()))["tasks"])
print("| model | params | file | exact match | " + " | ".join(tasks) + " | decode tok/s (1 thread) |")
print("|---|---:|---:|---:|" + "---:|" * len(tasks) + "---:|")
for name, r in rows.items():
    size = r["bytes"] / 2**20
    print(f"| {name} | {r['params'] / 1e6:.2f} M | {size:.2f} MiB | {100 * r['accuracy']:.1f} % | "
          + " | ".join(f"{100 * r['tasks'][t]:.0f} %" for t in tasks) + f" | {r['decode_tok_s']:.0f} |")

teacher, student, scratch, labels_only = rows["teacher"], rows["student"], rows["student-scratch"], rows["student-labels-only"]
checks = [
    ("student keeps >= 95 % of the teacher's accuracy", student["accuracy"] >= 0.95 * teacher["accuracy"]),
    ("student has <= 50 % of the teacher's parameters", student["params"] <= 0.5 * teacher["params"]),
    ("student beats the same student trained without the teacher", student["accuracy"] > scratch["accuracy"]),
]
for base in ("teacher", "student"):
    for quant, limit in (("q8_0", 0.005), ("q4_k_m", 0.02)):
        lost = rows[base]["accuracy"] - rows[f"{base}-{quant}.gguf"]["accuracy"]
        # Accuracies are fractions of a few hundred answers: compare whole answers, not floats
        # (0.315 - 0.295 is 0.02000000000000001).
        checks.append((f"{base} {quant} loses <= {100 * limit:g} points ({100 * lost:+.1f})", round(lost, 9) <= limit))
print()
for what, ok in checks:
    print(f"- {'met' if ok else 'NOT met'}: {what}")
print(f"- not a target: the distillation loss alone, against the labels alone from the same pruned teacher: "
      f"{100 * student['accuracy']:.1f} % against {100 * labels_only['accuracy']:.1f} %")
