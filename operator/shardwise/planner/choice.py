"""Which fitting layout to choose: the fastest, but the least model parallelism among near-ties."""

from __future__ import annotations

from shardwise.planner.result import Evaluation
from shardwise.planner.units import GIB

#: Layouts whose predicted step time is within this fraction of the fastest are near-ties: the
#: model's error is larger than that, and less model parallelism is simpler to run and debug
#: (fewer TP / PP / EP groups, fewer ways to straggle).
NEAR_TIE = 0.03


def model_parallelism(e: Evaluation) -> tuple[int, int]:
    return e.layout.tp * e.layout.pp, e.layout.ep


def choose(fitting: list[Evaluation]) -> list[Evaluation]:
    """`fitting` (fastest first) reordered: the choice, then the rest fastest first."""
    if not fitting:
        return []
    fastest = min(e.step_time.total for e in fitting)
    near = [e for e in fitting if e.step_time.total <= fastest * (1 + NEAR_TIE)]
    choice = min(near, key=lambda e: (*model_parallelism(e), e.step_time.total, e.memory.total))
    return [choice, *(e for e in fitting if e is not choice)]


_TERMS = {
    "compute": "compute",
    "pipeline_bubble": "pipeline bubble",
    "tensor_parallel": "TP traffic",
    "pipeline_p2p": "PP transfers",
    "data_parallel": "DP traffic",
    "offload": "offload",
    "expert_all_to_all": "expert all-to-all",
}


def explain(alt: Evaluation, choice: Evaluation) -> str:
    """One line: what the runner-up costs compared with the choice."""
    a, c = alt.step_time.to_dict(), choice.step_time.to_dict()
    delta = a["total"] - c["total"]
    pct = 100 * delta / c["total"] if c["total"] else 0.0
    mem = (alt.memory.total - choice.memory.total) / GIB
    memory = f"{abs(mem):.1f} GiB {'more' if mem > 0 else 'less'} memory per GPU" if abs(mem) >= 0.05 else ""
    if delta < 0:
        mp, cmp_ = model_parallelism(alt), model_parallelism(choice)
        why = (
            f"{-pct:.1f}% faster, a near-tie (< {NEAR_TIE:.0%}) with more model parallelism "
            f"(TP x PP = {mp[0]}, EP {mp[1]} vs {cmp_[0]}, EP {cmp_[1]})"
        )
    else:
        term = max(_TERMS, key=lambda k: a[k] - c[k])
        why = f"+{pct:.1f}% step time"
        if a[term] - c[term] > 0:
            why += f" (+{a[term] - c[term]:.3g} s {_TERMS[term]})"
    return why + (f"; {memory}" if memory else "")
