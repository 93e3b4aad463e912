"""Tokenized samples to fixed-length rows (ids, shifted labels, position ids) by the packing policy.

A sample of ``n`` tokens gives ``n - 1`` positions: input ``t[k]``, label ``t[k+1]`` when token
``k+1`` is trained, else -100 (ignored by the loss). A row holds ``sequence_length`` positions.

* Too long: a conversation keeps its first ``sequence_length`` positions (the prompt and the
  start of the answer; the rest is cut off, counted as ``truncated``); a document (``text``) is
  split into consecutive windows of ``sequence_length`` positions, every token predicted once.
  A sample left with no trained label (the answer was cut off entirely) is dropped.
* ``pack`` (default): samples are laid into rows in order, whole — one that does not fit in what
  is left of the row starts the next row and the rest of the row is padding. Position ids restart
  at 0 for every sample (and for the padding), so a model that reads packed position ids
  (transformers' Llama / Qwen / Mistral masks: attention stays within each sample) never
  attends across samples.
* ``pad``: one sample per row, padded at the end; positions 0, 1, … (causal attention never
  looks at the padding behind the sample).

Padding carries the tokenizer's PAD (else EOS) id and label -100.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import numpy as np

PACK: Final = "pack"
PAD: Final = "pad"
POLICIES: Final = (PACK, PAD)
IGNORE: Final = -100


@dataclass
class Rows:
    """``ids``, ``labels``, ``positions``: int32 arrays of shape (rows, sequence_length)."""

    ids: np.ndarray
    labels: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class PackStats:
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0  # positions holding sample tokens (not padding)
    trained: int = 0  # positions with a label


def shift(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of one sample: labels are the next token where it is trained, else -100."""
    labels = np.where(mask[1:], ids[1:], IGNORE).astype(np.int32)
    return ids[:-1].astype(np.int32), labels


def fit(
    ids: np.ndarray, mask: np.ndarray, seq: int, *, split: bool, stats: PackStats
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (inputs, labels) pieces of one sample that go into rows (documents split, others cut)."""
    if len(ids) < 2:
        stats.dropped += 1
        return []
    inputs, labels = shift(ids, mask)
    if len(inputs) <= seq:
        pieces = [(inputs, labels)]
    elif split:
        pieces = [(inputs[k : k + seq], labels[k : k + seq]) for k in range(0, len(inputs), seq)]
    else:
        stats.truncated += 1
        pieces = [(inputs[:seq], labels[:seq])]
    kept = [(i, lab) for i, lab in pieces if (lab != IGNORE).any()]
    if not kept:  # e.g. the answer lay entirely past the cut: nothing to learn from the rest
        stats.dropped += 1
    return kept


def build_rows(
    pieces: Iterable[tuple[np.ndarray, np.ndarray]], seq: int, policy: str, pad_id: int, stats: PackStats
) -> Rows:
    """Lay ``pieces`` (each at most ``seq`` long) into rows by ``policy``."""
    rows_ids: list[np.ndarray] = []
    rows_lab: list[np.ndarray] = []
    rows_pos: list[np.ndarray] = []
    cur_ids: list[np.ndarray] = []
    cur_lab: list[np.ndarray] = []
    cur_pos: list[np.ndarray] = []
    fill = 0

    def close() -> None:
        nonlocal fill, cur_ids, cur_lab, cur_pos
        if not cur_ids:
            return
        rest = seq - fill
        if rest:
            cur_ids.append(np.full(rest, pad_id, dtype=np.int32))
            cur_lab.append(np.full(rest, IGNORE, dtype=np.int32))
            # packing: the padding is a segment of its own; pad: positions just continue
            start = 0 if policy == PACK else fill
            cur_pos.append(np.arange(start, start + rest, dtype=np.int32))
        rows_ids.append(np.concatenate(cur_ids))
        rows_lab.append(np.concatenate(cur_lab))
        rows_pos.append(np.concatenate(cur_pos))
        cur_ids, cur_lab, cur_pos, fill = [], [], [], 0

    for inputs, labels in pieces:
        n = len(inputs)
        if policy == PAD or fill + n > seq:
            close()
        cur_ids.append(inputs)
        cur_lab.append(labels)
        cur_pos.append(np.arange(n, dtype=np.int32))
        fill += n
        stats.samples += 1
        stats.tokens += n
        stats.trained += int((labels != IGNORE).sum())
    close()
    if not rows_ids:
        empty = np.zeros((0, seq), dtype=np.int32)
        return Rows(empty, empty.copy(), empty.copy())
    return Rows(np.stack(rows_ids), np.stack(rows_lab), np.stack(rows_pos))
