"""Numerical equivalence: every parallel layout trains the SAME model as the single-process run.

Tiny Llama-style model (GQA, SwiGLU, RMSNorm, rope) and a GPT-style variant (GeLU, LayerNorm with
biases, learned positions, tied embeddings), fp32, fixed seed, the same synthetic global batch
per step, 10 AdamW steps. Layout-independent initialisation (each full weight drawn from a
generator seeded by its global name, then sliced) makes the starting weights identical.

Tolerance: |loss - reference| <= 1e-4 at every step (loss ≈ 5.5, so ~2e-5 relative). In fp32
the layouts differ only in the order of floating-point sums (TP all-reduces partial matmuls and
the vocab-parallel softmax; DP averages gradients; ZeRO reduce-scatters into partitions), i.e.
~1e-7 relative per operation; Adam's normalised updates carry such differences forward without
amplifying them much over 10 steps (observed: <= 2e-6). A layout that trains a different model
(a wrong shard, a missing all-reduce, a wrong data split, a wrong stage boundary) is off by
1e-3 .. 1e-1 from step 2 on, far outside the tolerance.
"""

from __future__ import annotations

import pytest
from trainer_runner import RunCache

pytestmark = pytest.mark.trainer

TOLERANCE = 1e-4
STEPS = 10


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("dp2-zero1", "single"),
        ("dp2-zero2", "single"),
        ("dp2-zero3", "single"),
        ("tp2", "single"),
        ("pp2", "single"),
        ("tp2-dp2", "single"),
        ("pp2-dp2", "single"),
        ("gpt-tp2", "gpt-single"),
        ("gpt-pp2", "gpt-single"),
    ],
)
def test_parallel_layout_matches_single_process(trainer_runs: RunCache, name: str, reference: str) -> None:
    ref = trainer_runs.run(reference, STEPS).losses
    got = trainer_runs.run(name, STEPS).losses
    assert sorted(got) == list(range(1, STEPS + 1))
    diffs = {step: abs(got[step] - ref[step]) for step in ref}
    worst = max(diffs.values())
    assert worst <= TOLERANCE, f"{name} vs {reference}: per-step |Δloss| {diffs}"


@pytest.mark.parametrize("name", ["single", "gpt-single"])
def test_reference_runs_learn(trainer_runs: RunCache, name: str) -> None:
    """The reference itself trains (so equal curves are not two flat lines)."""
    losses = trainer_runs.run(name, STEPS).losses
    assert losses[STEPS] < losses[1] - 0.05, losses
