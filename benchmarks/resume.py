"""Resume after a re-plan, measured: a tiny run checkpoints and stops, the next attempt runs at
another DP or TP size and resumes through the universal conversion — save, conversion and load
times, steps lost (CASES).

The built-in test model (tests/trainer/layouts.py, ~180 k parameters) trains STEPS steps with a
checkpoint every EVERY steps; the first attempt runs only to KILLED_AT (as if its node was lost
there), the second resumes at the other layout up to STEPS. CPU, gloo, one torchrun at a time.

    python benchmarks/resume.py

Writes benchmarks/results/resume.md.
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests" / "trainer"))

from trainer_runner import LAYOUTS, RunCache, nproc_of, run_trainer  # noqa: E402

STEPS = 10
EVERY = 4
KILLED_AT = 6  # the first attempt stops here: steps 5 and 6 are lost


#: (written at, resumed at): another DP size, TP size and pipeline depth (with and without ZeRO).
CASES = [
    ("dp2-zero2", "single"),
    ("tp2-dp2", "dp2-zero1"),
    ("tp2", "single"),
    ("pp2-dp2", "dp2-zero1"),
    ("pp2", "single"),
]


def _case(saved: str, resumed_at: str) -> tuple[str, ...]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = RunCache(work)
        ckpt = work / "ckpt"
        args = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", str(EVERY), "--checkpoint-keep", "2")
        first = run_trainer(
            runs.layout_path(saved), nproc=nproc_of(LAYOUTS[saved]), steps=KILLED_AT, args=args
        )
        (ckpt / f"step{KILLED_AT}").rename(ckpt / ".dropped")  # the final save a lost node never makes
        (ckpt / "latest").write_text(f"step{EVERY}")
        saves = [c for c in first.events["checkpoint"] if c["step"] == EVERY]
        second = run_trainer(
            runs.layout_path(resumed_at), nproc=nproc_of(LAYOUTS[resumed_at]), steps=STEPS, args=args
        )
        resume = second.events["resume"][0]
    return (
        f"{saved} -> {resumed_at}",
        f"{saves[0]['seconds']:.3f}",
        f"{resume['convert_seconds']:.3f}",
        f"{resume['seconds']:.3f}",
        f"{resume['seconds'] - resume['convert_seconds']:.3f}",
        str(KILLED_AT - resume["step"]),
        str(resume["step"]),
    )


def main() -> None:
    rows = [_case(saved, resumed_at) for saved, resumed_at in CASES]
    lines = [
        "# Resume across layouts: DP size, TP size, pipeline depth",
        "",
        f"`python benchmarks/resume.py` on {platform.machine()} / {platform.python_version()}, CPU, gloo; "
        f"built-in test model, checkpoint every {EVERY} steps, first attempt stopped at step {KILLED_AT} "
        "(its final save dropped, as a lost node never makes it). Layout names: "
        "tests/trainer/trainer_runner.py LAYOUTS (`tp2-dp2` = TP2 DP2 ZeRO-1; `tp2` = TP2 without ZeRO; "
        "`pp2-dp2` = PP2 DP2 ZeRO-1; `pp2` = PP2 without ZeRO; `single` = one process).",
        "",
        "| written at -> resumed at | save (s) | universal conversion (s) "
        "| resume total: find + convert + load (s) | load alone (s) | steps lost | resumed from step |",
        "|---|---|---|---|---|---|---|",
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
        "One run each (2 shared cores): figures, not thresholds.",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resume.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
