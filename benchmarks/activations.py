"""Saved-for-backward bytes per rank, measured on CPU, against the planner's activation term.

The cases of tests/trainer/activation_cases.py (tiny Llama shape, bf16, sequence 128,
micro-batch 2; built-in model at TP 1 / TP 2 under checkpointing none / selective / full, a
Hugging Face Llama under none / full), with the planner's runtime accounting and, for contrast,
the paper's (Korthikanti Table 2 terms, which the planner used before it was measured).

    python benchmarks/activations.py

Writes benchmarks/results/activations.json and .md.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path[:0] = [str(ROOT / "tests" / "trainer"), str(ROOT / "operator"), str(ROOT / "trainer_image")]

KIB = 1024


def _paper_layer(tp: int, ckpt: str) -> int:
    from activation_cases import MICRO, SEQ, planner_arch  # noqa: PLC0415

    from shardwise.planner import activations as act  # noqa: PLC0415

    return round(act.layer_activation_bytes(planner_arch(), SEQ, MICRO, tp=tp, checkpointing=ckpt))  # type: ignore[arg-type]


def main() -> None:
    from activation_cases import MICRO, SEQ, SHAPE, all_cases  # noqa: PLC0415

    cases = all_cases()
    rows = [{**c.row(), "paper_layer": _paper_layer(c.tp, c.checkpointing)} for c in cases]
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"machine": platform.platform(), "cpus": os.cpu_count(), "shape": SHAPE, "seq": SEQ,
           "micro_batch": MICRO, "rows": rows}  # fmt: skip
    (RESULTS / "activations.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Activations: measured saved-for-backward bytes per rank vs the planner",
        "",
        f"Tiny Llama shape {SHAPE}, bf16, sequence {SEQ}, micro-batch {MICRO}, CPU "
        f"({os.cpu_count()} cores). Measured with `torch.autograd.graph.saved_tensors_hooks`, "
        "each storage once, parameters left out (`shardwise_trainer/saved_activations.py`); "
        "predicted by `shardwise.planner.activations` with the runtime accounting "
        "(`python benchmarks/activations.py`). KiB; error = (measured - planned) / planned.",
        "",
        "| case | layer measured | layer planned | error | output measured | output planned | error "
        "| total measured | total planned | error | layer, paper accounting (error) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, r in zip(cases, rows, strict=True):
        paper = r["paper_layer"]
        lines.append(
            f"| {c.name} | {c.measured_layer / KIB:.1f} | {c.predicted_layer / KIB:.1f} | "
            f"{c.error('layer'):+.1%} | {c.measured_output / KIB:.1f} | {c.predicted_output / KIB:.1f} | "
            f"{c.error('output'):+.1%} | {c.measured_total / KIB:.1f} | {c.predicted_total / KIB:.1f} | "
            f"{c.error('total'):+.1%} | {paper / KIB:.1f} ({(c.measured_layer - paper) / paper:+.1%}) |"
        )
    lines += [
        "",
        "What is left between measured and planned: the RoPE cos / sin tables (the built-in model "
        "keeps 4 of s·d per layer, Hugging Face 2 per model), the int64 token ids and labels, and "
        "under TP the vocabulary-parallel loss's int64 local targets and bool mask (O(s·b)).",
        "The paper accounting counts an s² softmax tensor (the trainer's fused attention keeps none: "
        "a log-sum-exp per row instead) and one 16-bit tensor per RMSNorm (the implementations keep "
        "an fp32 copy and the 16-bit output): under it 'none' is off by about 15 % here (the two "
        "errors partly cancel at s = 128; the s² term dominates at long s) and 'selective' by 30-50 %.",
    ]
    (RESULTS / "activations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
