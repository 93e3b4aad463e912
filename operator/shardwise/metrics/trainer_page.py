"""Parsing one trainer pod's stats page (docs/trainer-metrics.md) into per-rank samples."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

#: Prefix of every trainer metric (trainer_image/shardwise_trainer/metrics.py).
TRAINER_PREFIX = "shardwise_trainer_"
#: ``shardwise_trainer_memory_bytes{kind}`` kinds taken as a GPU's used memory, first present wins:
#: the CUDA caching allocator's peak reservation (the peak of what the device holds for the
#: process's tensors, cached blocks included; the CUDA context and NCCL buffers, which the
#: plan's total counts as overhead, are seen by no torch counter), then the peak allocation, the
#: device's current use, and the CPU seam's ``peak_rss`` / ``rss`` (tests and the demo run on CPU,
#: where the prediction error compares process memory with a GPU plan and means little).
USED_MEMORY_KINDS: tuple[str, ...] = ("peak_reserved", "peak_allocated", "device_used", "peak_rss", "rss")
#: The measured device capacity kind (CUDA ``mem_get_info`` total); the plan's value otherwise.
CAPACITY_MEMORY_KIND = "device_total"
#: Every label a trainer series may carry (docs/trainer-metrics.md); a series with another is not
#: the trainer's and is rejected, so a page cannot invent label sets (and windows) of its own.
TRAINER_LABELS = frozenset({"namespace", "job", "pod", "node", "rank", "local_rank", "gpu", "stage", "kind"})
#: Why a trainer series was rejected (the ``reason`` of the operator's rejection counter).
REJECT_UNKNOWN_LABELS = "unknown_labels"
REJECT_RANK_OUT_OF_RANGE = "rank_out_of_range"


class TrainerMetricsError(ValueError):
    """The trainer's stats text could not be parsed (counted as a scrape error by the caller)."""


@dataclass(frozen=True, slots=True)
class RankSample:
    """One scrape of one rank: the trainer's ``shardwise_trainer_*`` gauges for that rank."""

    rank: int
    pod: str = ""
    node: str = ""
    gpu: str = ""
    local_rank: int = 0
    stage: int | None = None
    namespace: str = ""
    job: str = ""
    step: int | None = None
    step_seconds: float | None = None
    wait_seconds: float | None = None
    compute_seconds: float | None = None
    communication_seconds: float | None = None
    tokens_per_second: float | None = None
    memory_bytes: tuple[tuple[str, float], ...] = ()
    model_state_bytes: float | None = None
    predicted_model_state_bytes: float | None = None
    timestamp: float | None = None
    checkpoint_step: float | None = None  # the newest complete checkpoint this attempt saved
    checkpoint_timestamp: float | None = None
    total_steps: float | None = None
    tokens_per_step: float | None = None
    samples_per_step: float | None = None
    loss: float | None = None
    validation_loss: float | None = None

    #: Derived once at construction (the analysis reads them on every pass over the window).
    used_bytes: float | None = field(init=False, default=None, compare=False)
    capacity_bytes: float | None = field(init=False, default=None, compare=False)

    def __post_init__(self) -> None:
        kinds = dict(self.memory_bytes)
        used = next((kinds[k] for k in USED_MEMORY_KINDS if k in kinds and math.isfinite(kinds[k])), None)
        object.__setattr__(self, "used_bytes", used)
        object.__setattr__(self, "capacity_bytes", kinds.get(CAPACITY_MEMORY_KIND))

    def memory(self, kind: str) -> float | None:
        return next((v for k, v in self.memory_bytes if k == kind), None)


_SCALAR_FIELDS = {
    "step": "step",
    "step_seconds": "step_seconds",
    "wait_seconds": "wait_seconds",
    "compute_seconds": "compute_seconds",
    "communication_seconds": "communication_seconds",
    "tokens_per_second": "tokens_per_second",
    "model_state_bytes": "model_state_bytes",
    "predicted_model_state_bytes": "predicted_model_state_bytes",
    "last_update_timestamp_seconds": "timestamp",
    "checkpoint_step": "checkpoint_step",
    "checkpoint_timestamp_seconds": "checkpoint_timestamp",
    "total_steps": "total_steps",
    "tokens_per_step": "tokens_per_step",
    "samples_per_step": "samples_per_step",
    "loss": "loss",
    "validation_loss": "validation_loss",
}


def _int_label(labels: Mapping[str, str], name: str) -> int | None:
    raw = labels.get(name, "")
    try:
        return int(raw)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ParsedPage:
    """One pod's stats page: its per-rank samples and the trainer series it had to reject."""

    samples: tuple[RankSample, ...]
    rejected: Mapping[str, int] = field(default_factory=dict)  # reason -> series


def parse_trainer_metrics(text: str) -> tuple[RankSample, ...]:
    """The per-rank samples of one pod's stats page, ordered by rank (see :func:`parse_page`)."""
    return parse_page(text).samples


def parse_page(text: str, world_size: int | None = None) -> ParsedPage:
    """The per-rank samples of one pod's stats page, ordered by rank, and what was rejected.

    Metrics that are not the trainer's and trainer series without a ``rank`` label are ignored.
    A trainer series with a label the trainer never sets, or a rank that is not in
    ``[0, world_size)`` (not a non-negative integer when the world size is unknown), is rejected
    and counted. Text that is not Prometheus exposition raises :class:`TrainerMetricsError`.
    """
    ranks: dict[int, dict[str, Any]] = {}
    rejected: dict[str, int] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on malformed text
        raise TrainerMetricsError(f"not Prometheus text exposition: {exc}") from exc
    for family in families:
        if not family.name.startswith(TRAINER_PREFIX):
            continue
        short = family.name[len(TRAINER_PREFIX) :]
        for sample in family.samples:
            if "rank" not in sample.labels:
                continue
            if not sample.labels.keys() <= TRAINER_LABELS:
                rejected[REJECT_UNKNOWN_LABELS] = rejected.get(REJECT_UNKNOWN_LABELS, 0) + 1
                continue
            rank = _int_label(sample.labels, "rank")
            if rank is None or rank < 0 or (world_size is not None and rank >= world_size):
                rejected[REJECT_RANK_OUT_OF_RANGE] = rejected.get(REJECT_RANK_OUT_OF_RANGE, 0) + 1
                continue
            entry = ranks.get(rank)
            if entry is None:
                labels = sample.labels
                entry = ranks[rank] = {
                    "rank": rank,
                    "pod": labels.get("pod", ""),
                    "node": labels.get("node", ""),
                    "gpu": labels.get("gpu", ""),
                    "local_rank": _int_label(labels, "local_rank") or 0,
                    "stage": _int_label(labels, "stage"),
                    "namespace": labels.get("namespace", ""),
                    "job": labels.get("job", ""),
                    "memory": {},
                }
            value = float(sample.value)
            if short == "memory_bytes":
                entry["memory"][sample.labels.get("kind", "")] = value
            elif short in _SCALAR_FIELDS:
                entry[_SCALAR_FIELDS[short]] = value
    out = []
    for rank in sorted(ranks):
        entry = ranks[rank]
        memory = entry.pop("memory")
        step = entry.pop("step", None)
        out.append(
            RankSample(
                step=int(step) if step is not None and math.isfinite(step) else None,
                memory_bytes=tuple(sorted(memory.items())),
                **entry,
            )
        )
    return ParsedPage(tuple(out), rejected)


def latest_checkpoint(samples: Iterable[RankSample]) -> tuple[int, float] | None:
    """(step, unix time) of the newest checkpoint any rank reports: a rank reports one only after
    every rank wrote its shards and rank 0 moved ``latest`` (trainer checkpointing.py)."""
    best: tuple[int, float] | None = None
    for s in samples:
        if s.checkpoint_step is None or not math.isfinite(s.checkpoint_step):
            continue
        found = (int(s.checkpoint_step), float(s.checkpoint_timestamp or 0.0))
        if best is None or found > best:
            best = found
    return best
