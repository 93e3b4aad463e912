"""Fixtures of the trainer tests (real torch + DeepSpeed + torchrun, CPU, gloo).

Without torch / DeepSpeed installed (`pip install -e '.[trainer]'`) the directory is not
collected at all.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("deepspeed") is None:
    collect_ignore_glob = ["test_*.py"]

from trainer_runner import RunCache


@pytest.fixture(scope="session")
def trainer_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunCache]:
    """Session cache of trainer runs (one torchrun at a time; shared by the equivalence, the
    fidelity and the restart tests)."""
    yield RunCache(tmp_path_factory.mktemp("trainer-layouts"))
