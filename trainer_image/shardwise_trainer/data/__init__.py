"""Training data: token files and synthetic streams (tokens), record files tokenized by the model (source)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy on purpose: the record checks (records.py) run before torch is imported.
    if name == "TokenSource":
        from shardwise_trainer.data.tokens import TokenSource  # noqa: PLC0415

        return TokenSource
    raise AttributeError(name)


__all__ = ["TokenSource"]
