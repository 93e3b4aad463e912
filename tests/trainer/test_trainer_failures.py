"""The trainer says why it failed: exit code, CamelCase reason and whether a retry can help.

A table of the exceptions real faults raise (torch's OutOfMemoryError, torch.distributed's
DistNetworkError, gloo / NCCL RuntimeErrors, CUDA errors) against the classification, and a real
DP2 torchrun whose rank 1 meets the test-only fault switch: the termination message carries the
reason, the operator's own reading of it (lifecycle.classify) gives the verdict.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed
from trainer_runner import LAYOUTS, RunCache, nproc_of, run_failing

from shardwise import lifecycle
from shardwise.podstate import PodFailure
from shardwise_trainer import contract, failures


def _wrapped(outer: str, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError(outer) from exc
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "reason", "retryable", "code"),
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "GpuOutOfMemory",
            False,
            1,
        ),
        (_wrapped("step failed", torch.OutOfMemoryError("CUDA out of memory")), "GpuOutOfMemory", False, 1),
        (MemoryError(), "HostOutOfMemory", False, 1),
        (torch.distributed.DistNetworkError("Connection reset by peer"), "CommunicationError", True, 75),
        (
            RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"),
            "CommunicationError",
            True,
            75,
        ),
        (RuntimeError("NCCL communicator was aborted: watchdog timeout"), "CommunicationError", True, 75),
        (TimeoutError("Socket Timeout"), "CommunicationError", True, 75),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "DeviceError", True, 75),
        (RuntimeError("CUDA error: device-side assert triggered"), "TrainerError", False, 1),
        (ValueError("shapes (2, 3) and (4, 5) not aligned"), "TrainerError", False, 1),
        (KeyError("model.layers.0"), "TrainerError", False, 1),
    ],
)
def test_classification(exc: BaseException, reason: str, retryable: bool, code: int) -> None:
    failure = failures.classify(exc, rank=3, peak="1.00 GiB host RSS")
    assert (failure.reason, failure.retryable, failure.exit_code) == (reason, retryable, code)
    assert failure.message.startswith("rank 3: ")
    assert "\n" not in failure.message
    if reason == "GpuOutOfMemory":
        assert "measured peak 1.00 GiB" in failure.message and "ZeRO stage" in failure.message


@pytest.mark.parametrize(
    ("reason", "retryable", "policy", "verdict"),
    [
        ("CommunicationError", True, {}, "retryable"),
        ("GpuOutOfMemory", False, {}, "permanent"),
        ("TrainerError", False, {"retryableExitCodes": [1]}, "retryable"),  # the user's list wins
        ("CommunicationError", True, {"permanentExitCodes": [75]}, "permanent"),
    ],
)
def test_the_operator_follows_the_trainer_unless_the_run_policy_says_otherwise(
    reason: str, retryable: bool, policy: dict[str, list[int]], verdict: str
) -> None:
    code = 75 if retryable else 1
    text = contract.termination_message(code, reason, "rank 1: boom", retryable=retryable)
    pod = PodFailure(pod="p", node="n", exit_code=1, reason="Error", message=text)
    assert lifecycle.classify(pod, policy).verdict == verdict
    assert lifecycle.trainer_reason(pod) == (reason, "rank 1: boom")


@pytest.mark.parametrize(
    ("text", "peak", "needed"),
    [
        ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.65 GiB total)", 70 * 2**30, 72 * 2**30),
        ("CUDA out of memory. Tried to allocate 512.00 MiB", 2**30, 2**30 + 2**29),
        ("CUDA out of memory", 2**30, 2**30),  # no allocation named: the peak alone
        ("CUDA out of memory. Tried to allocate 2.00 GiB", None, None),  # no GPU in use: nothing measured
    ],
)
def test_an_out_of_memory_reports_what_it_needed_for_the_operators_replan(
    text: str, peak: int | None, needed: int | None
) -> None:
    failure = failures.classify(torch.OutOfMemoryError(text), rank=0, gpu_peak_bytes=peak)
    assert failure.gpu_memory_needed == needed
    pod = PodFailure(pod="p", node="n", exit_code=1, reason="Error", message=failure.termination_message())
    assert lifecycle.trainer_gpu_memory_needed(pod) == needed
    told = lifecycle.trainer_reason(pod)
    assert told is not None and told[0] == "GpuOutOfMemory" and "gpu-memory-needed" not in told[1]


@pytest.mark.parametrize("value", ["oom", "oom@1", "disk@1:2", "oom@-1:2"])
def test_a_malformed_fault_switch_is_bad_input(value: str) -> None:
    with pytest.raises(contract.ContractError, match=contract.ENV_TEST_FAULT):
        failures.parse_fault(value)


@pytest.mark.trainer
@pytest.mark.parametrize(
    ("fault", "reason", "retryable"),
    [("oom@1:2", "GpuOutOfMemory", False), ("comm@1:2", "CommunicationError", True)],
)
def test_a_faulting_rank_names_its_failure_in_the_termination_message(
    trainer_runs: RunCache, tmp_path: Path, fault: str, reason: str, retryable: bool
) -> None:
    name = "dp2-zero1"
    proc, text = run_failing(
        nproc_of(LAYOUTS[name]),
        trainer_runs.layout_path(name),
        4,
        tmp_path,
        env={contract.ENV_TEST_FAULT: fault},
    )
    assert proc.returncode != 0
    pod = PodFailure(pod="p", node="n", exit_code=proc.returncode, reason="Error", message=text)
    told = lifecycle.trainer_reason(pod)
    assert told is not None and told[0] == reason, text
    assert told[1].startswith("rank 1: ") and "injected" in told[1]
    assert lifecycle.trainer_retryable(pod) is retryable
    assert lifecycle.classify(pod, {}).verdict == ("retryable" if retryable else "permanent")
    assert f"shardwise-train: {reason}: rank 1: " in proc.stderr
