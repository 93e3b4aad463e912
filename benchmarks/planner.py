"""Planner speed: full layout searches (llama-2-70b, two MoE models) on 8 … 4096 GPUs, every knob auto.

Writes medians and p90 (milliseconds, one process = one CPU core) to results/planner.json and
results/planner.md and prints them. Target (issue 2): the 4096-GPU search under 50 ms median.
Run: python benchmarks/planner.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from shardwise.planner import Cluster, PlannerSettings, PlanRequest, gpu, plan, preset
from shardwise.planner.memory import clear_caches

GPU_COUNTS = (8, 64, 512, 4096)
GPUS_PER_NODE = 8
# A dense model, and two MoE models whose expert-parallel degrees multiply the layout families.
MODELS = ("llama-2-70b", "mixtral-8x22b", "deepseek-v3")
GPU = "H100-80GB-SXM"
TARGET_MS = 50.0
RESULTS = Path(__file__).parent / "results"


def _request(model: str, gpus: int) -> PlanRequest:
    # Every knob on auto: no pins; global batch defaults to one sample per GPU; expert parallelism
    # planned too (as `shardwise plan` does), so MoE searches cover every EP degree.
    return PlanRequest(
        model=preset(model),
        cluster=Cluster(gpus // GPUS_PER_NODE, GPUS_PER_NODE, gpu(GPU)),
        settings=PlannerSettings(plan_expert_parallel_beyond_runtime=True),
    )


def measure(model: str, gpus: int, repeats: int) -> dict[str, object]:
    request = _request(model, gpus)
    result = plan(request)  # warm-up (imports, caches of the interpreter)
    times = []
    cpu_times = []
    for _ in range(repeats):
        clear_caches()  # cold: no per-layer value carried over from the previous run
        start, cpu_start = time.perf_counter(), time.process_time()
        plan(request)
        times.append((time.perf_counter() - start) * 1000)
        cpu_times.append((time.process_time() - cpu_start) * 1000)
    times.sort()
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    choice = result.choice
    return {
        "model": model,
        "gpus": gpus,
        "nodes": gpus // GPUS_PER_NODE,
        "repeats": repeats,
        "median_ms": round(statistics.median(times), 3),
        "p90_ms": round(p90, 3),
        "min_ms": round(times[0], 3),
        # CPU time of this process: what the search costs on one core, whatever else the
        # machine is running (wall times above include waiting for the core).
        "cpu_median_ms": round(statistics.median(cpu_times), 3),
        "layout_families_considered": result.layouts_considered,
        "feasible": result.feasible,
        "chosen": choice.layout.describe() if choice else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    args = parser.parse_args()
    rows = [measure(m, g, args.repeats) for m in MODELS for g in GPU_COUNTS]
    meta = {
        "models": list(MODELS),
        "gpu": GPU,
        "gpus_per_node": GPUS_PER_NODE,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "target_ms_4096": TARGET_MS,
        "what": "plan(): full search + exact re-evaluation of the best layouts, every knob auto",
        "load_average": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "planner.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = [
        f"# Planner benchmark ({', '.join(MODELS)}; {GPU}, {GPUS_PER_NODE} GPUs per node, every knob auto)",
        "",
        f"One process (one CPU core), Python {meta['python']}, "
        f"{args.repeats} cold repeats after one warm-up.",
        f"Target: 4096-GPU search under {TARGET_MS:.0f} ms median. Load average during the run: "
        f"{meta['load_average']} (wall times include waiting for a shared core; CPU times do not).",
        "",
        "| model | GPUs | median ms (wall) | p90 ms (wall) | median ms (CPU) | layout families "
        "| chosen layout |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['gpus']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{r['cpu_median_ms']:.2f} | {r['layout_families_considered']} | {r['chosen']} |"
        )
    (RESULTS / "planner.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
