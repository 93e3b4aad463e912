"""Resume after a re-plan, measured: a tiny DP2 ZeRO-2 run checkpoints and stops, the next attempt
runs at DP1 and resumes through DeepSpeed's universal conversion — save, conversion and load times,
steps lost.

The built-in test model (tests/trainer/layouts.py, ~180 k parameters) trains STEPS steps with a
checkpoint every EVERY steps; the first attempt runs only to KILLED_AT (as if its node was lost
there), the second resumes at DP1 up to STEPS. CPU, gloo, one torchrun at a time.

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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = RunCache(work)
        ckpt = work / "ckpt"
        args = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", str(EVERY), "--checkpoint-keep", "2")
        first = run_trainer(runs.layout_path("dp2-zero2"), nproc=nproc_of(LAYOUTS["dp2-zero2"]),
                            steps=KILLED_AT, args=args)  # fmt: skip
        (ckpt / f"step{KILLED_AT}").rename(ckpt / ".dropped")  # the final save a lost node never makes
        (ckpt / "latest").write_text(f"step{EVERY}")
        saves = [c for c in first.events["checkpoint"] if c["step"] == EVERY]
        second = run_trainer(runs.layout_path("single"), nproc=1, steps=STEPS, args=args)
        resume = second.events["resume"][0]
    lost = KILLED_AT - resume["step"]
    rows = [
        ("checkpoint save at DP2 ZeRO-2 (step 4, all ranks + markers)", f"{saves[0]['seconds']:.3f} s"),
        ("universal conversion (ds_to_universal, rank 0)", f"{resume['convert_seconds']:.3f} s"),
        ("resume total at DP1 (find + convert + load, before step 5)", f"{resume['seconds']:.3f} s"),
        ("load alone (resume total - conversion)", f"{resume['seconds'] - resume['convert_seconds']:.3f} s"),
        ("steps lost (stopped at 6, resumed from 4)", str(lost)),
        ("resumed from step", str(resume["step"])),
    ]
    lines = [
        "# Resume across layouts: DP2 ZeRO-2 -> DP1",
        "",
        f"`python benchmarks/resume.py` on {platform.machine()} / {platform.python_version()}, CPU, gloo; "
        f"built-in test model, checkpoint every {EVERY} steps, first attempt stopped at step {KILLED_AT}.",
        "",
        "| what | figure |",
        "|---|---|",
        *[f"| {a} | {b} |" for a, b in rows],
        "",
        "One run each (2 shared cores): figures, not thresholds.",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resume.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
