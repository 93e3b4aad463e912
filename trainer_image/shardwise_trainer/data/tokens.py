"""Training data: a token file, or a deterministic synthetic stream.

Both are indexed by a GLOBAL sample number, so every layout sees exactly the same samples in the
same optimizer step (what makes losses comparable across layouts) and a resumed run continues
where the checkpoint left off without storing a data cursor:

    sample(step, micro, dp_rank, i) = step * global_batch + (micro * dp + dp_rank) * micro_batch + i

* Token file (``--data FILE``): raw little-endian token ids, no header, ``uint16`` (default,
  vocabularies up to 65 536) or ``int32`` (``--token-dtype int32``), e.g. written by
  ``numpy.asarray(ids, dtype=numpy.uint16).tofile(FILE)``. Sample ``j`` is the window of
  ``sequence_length + 1`` tokens starting at ``(j * sequence_length) mod (n - sequence_length - 1)``.
* Synthetic (``--synthetic-data``): sample ``j`` is an arithmetic sequence modulo the vocabulary
  with a start and a stride drawn from a generator seeded by ``(seed, j)`` — learnable (the loss
  goes down), identical for every layout, no file needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

MAX_STRIDE = 7


class TokenSource:
    """Returns sample ``j`` as a 1-D int64 tensor of ``sequence_length + 1`` tokens."""

    def __init__(
        self,
        *,
        vocab_size: int,
        sequence_length: int,
        seed: int,
        path: str | None,
        token_dtype: str = "uint16",
    ) -> None:
        self.vocab_size, self.seq, self.seed = vocab_size, sequence_length, seed
        self.tokens: np.ndarray | None = None
        if path:
            dtype = {"uint16": np.uint16, "int32": np.int32}[token_dtype]
            self.tokens = np.memmap(Path(path), dtype=dtype, mode="r")
            if len(self.tokens) < sequence_length + 2:
                raise ValueError(f"token file {path} holds {len(self.tokens)} tokens, fewer than one sample")

    def sample(self, j: int) -> torch.Tensor:
        if self.tokens is not None:
            span = len(self.tokens) - self.seq - 1
            start = (j * self.seq) % span
            window = np.asarray(self.tokens[start : start + self.seq + 1], dtype=np.int64)
            return torch.from_numpy(window % self.vocab_size)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        start = int(torch.randint(0, self.vocab_size, (1,), generator=gen))
        stride = int(torch.randint(1, MAX_STRIDE + 1, (1,), generator=gen))
        return (start + stride * torch.arange(self.seq + 1, dtype=torch.int64)) % self.vocab_size

    def micro_batch(
        self, *, step: int, micro: int, dp_rank: int, dp: int, micro_batch: int, global_batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, labels) of one micro-batch of optimizer step ``step`` (0-based)."""
        first = step * global_batch + (micro * dp + dp_rank) * micro_batch
        rows = torch.stack([self.sample(first + i) for i in range(micro_batch)])
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def step_iter(
        self, *, step: int, grad_accum: int, dp_rank: int, dp: int, micro_batch: int, global_batch: int,
        device: torch.device,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """The ``grad_accum`` micro-batches of one optimizer step for this DP rank."""
        for m in range(grad_accum):
            ids, labels = self.micro_batch(
                step=step, micro=m, dp_rank=dp_rank, dp=dp, micro_batch=micro_batch, global_batch=global_batch
            )
            yield ids.to(device), labels.to(device)
