"""Test-only straggler (SHARDWISE_TEST_SLOW_RANK): extra matmuls inside one rank's forward pass."""

# ruff: noqa: PLC0415  (torch is imported lazily, like everywhere in the trainer)
from __future__ import annotations

import time
from typing import Any

from shardwise_trainer import contract

#: Side of the square matrices multiplied while burning (small: fine-grained deadline checks).
BURN_MATRIX = 48


def parse_slow_rank(value: str | None) -> tuple[int, float] | None:
    """``"<rank>:<factor>"`` -> (rank, factor); None when unset (the default)."""
    if not value:
        return None
    try:
        rank, factor = value.split(":")
        parsed = int(rank), float(factor)
    except ValueError as exc:
        raise contract.ContractError(
            f"{contract.ENV_TEST_SLOW_RANK}={value!r}: expected <rank>:<factor>, e.g. 1:2.0"
        ) from exc
    if not parsed[1] >= 1.0:
        raise contract.ContractError(f"{contract.ENV_TEST_SLOW_RANK}={value!r}: the factor must be >= 1")
    return parsed


class SlowCompute:
    """Burns ``(factor - 1) x`` the rank's measured compute inside its forward calls.

    Inside the forward, before the step's collectives, as a slow GPU would be: the peers wait
    for it inside the gradient all-reduce, so every rank's wall step time grows alike (a sleep
    after the step, the switch's old behaviour, let wall times tell the ranks apart). Sized
    from the previous step's compute without the burn, so the factor does not compound.
    """

    def __init__(self, factor: float, forwards_per_step: int) -> None:
        import torch

        self.factor = factor
        self.forwards_per_step = max(1, forwards_per_step)
        self._a = torch.randn(BURN_MATRIX, BURN_MATRIX)
        self._out = torch.empty(BURN_MATRIX, BURN_MATRIX)
        self._per_forward = 0.0  # seconds to burn in each forward call of this step
        self.injected = 0.0  # seconds burnt in the current step
        self._handle: Any = None

    def attach(self, module: Any) -> None:
        """Burn inside ``module``'s forward (after its own work, before it returns)."""
        self._handle = module.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def begin_step(self) -> None:
        self.injected = 0.0

    def end_step(self, compute_seconds: float) -> None:
        """Size the next step's extra work from this step's compute without the extra work."""
        base = max(0.0, compute_seconds - self.injected)
        self._per_forward = (self.factor - 1.0) * base / self.forwards_per_step

    def burn(self, seconds: float) -> None:
        """Matrix multiplications until ``seconds`` have passed (busy: real compute, no sleep)."""
        import torch

        t0 = time.perf_counter()
        deadline = t0 + seconds
        with torch.no_grad():
            while time.perf_counter() < deadline:
                torch.mm(self._a, self._a, out=self._out)
        self.injected += time.perf_counter() - t0

    def _hook(self, _module: Any, _inputs: Any, _output: Any) -> None:
        if self._per_forward > 0:
            self.burn(self._per_forward)
