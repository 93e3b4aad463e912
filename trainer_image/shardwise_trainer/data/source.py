"""Record data for a run: tokenized once (or read from the cache), then served per step like a TokenSource.

:func:`prepare` runs on every rank before any process group exists: the builder (local rank 0
of each node) reads, validates, tokenizes, packs and publishes the rows to the cache; the other
local ranks wait for the entry. A restart finds the entry and skips tokenization.
:class:`RecordSource` serves the rows of :mod:`.order` with the interface of
:class:`~shardwise_trainer.data.tokens.TokenSource` (``micro_batch`` / ``step_iter``); its batches
are ``(ids, labels)`` or, when packing for a model that reads packed position ids,
``(ids, labels, position_ids)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shardwise_trainer import contract
from shardwise_trainer.data import cache, chat, order, packing, records
from shardwise_trainer.data.packing import PackStats, Rows
from shardwise_trainer.data.records import Example, InvalidDataset

log = logging.getLogger("shardwise_trainer.data")
#: Records per tokenizer call (fast tokenizers encode a batch in parallel).
BATCH = 512
PROGRESS_SECONDS = 5.0


@dataclass(frozen=True)
class DataOptions:
    """What decides the rows (everything but ``cache_dir`` is part of the cache key)."""

    data_file: str
    data_format: str  # a record format, or auto
    packing: str
    sequence_length: int
    seed: int
    model_dir: str
    trust_remote_code: bool
    cache_dir: str
    validation_file: str | None = None
    validation_fraction: float = 0.0
    chat_template_file: str | None = None


@dataclass
class Prepared:
    train: Rows
    validation: Rows | None
    meta: dict[str, Any]
    cached: bool
    seconds: float


def _template_override(opts: DataOptions) -> str | None:
    if not opts.chat_template_file:
        return None
    path = Path(opts.chat_template_file)
    if not path.is_file():
        raise InvalidDataset(f"--chat-template {path}: no such file")
    return path.read_text(encoding="utf-8")


def key_parts(opts: DataOptions) -> dict[str, Any]:
    """What the cache key hashes (file contents by digest)."""
    data = records.check_path(opts.data_file, "--data")
    parts: dict[str, Any] = {
        "data": cache.file_digest(data),
        "format": records.resolve_format(data, opts.data_format),
        "tokenizer": cache.tokenizer_digest(Path(opts.model_dir)),
        "template": _template_override(opts),
        "default_template": chat.DEFAULT_CHAT_TEMPLATE,
        "sequence_length": opts.sequence_length,
        "packing": opts.packing,
    }
    if opts.validation_file:
        val = records.check_path(opts.validation_file, "--validation-data")
        parts["validation"] = [cache.file_digest(val), records.resolve_format(val, opts.data_format)]
    elif opts.validation_fraction > 0:
        parts["validation_fraction"] = [opts.validation_fraction, opts.seed]
    return parts


def check(opts: DataOptions) -> None:
    """Argument-level checks, before torch loads (ContractError InvalidDataset)."""
    if opts.packing not in packing.POLICIES:
        raise InvalidDataset(f"--packing {opts.packing!r}: expected one of {', '.join(packing.POLICIES)}")
    if not 0.0 <= opts.validation_fraction < 1.0:
        raise InvalidDataset(f"--validation-fraction {opts.validation_fraction}: expected 0 <= F < 1")
    if opts.validation_file and opts.validation_fraction:
        raise InvalidDataset("give --validation-data or --validation-fraction, not both")
    for path, flag in ((opts.data_file, "--data"), (opts.validation_file, "--validation-data")):
        if flag == "--validation-data" and not path:
            continue
        p = records.check_path(path, flag)
        fmt = records.resolve_format(p, opts.data_format)
        if fmt == records.TOKENS:
            raise InvalidDataset(
                f"{flag} {p}: a raw token file cannot be mixed with record data (formats: "
                f"{', '.join(records.FORMATS[2:])})"
            )


def _encode(tokenizer: Any, template: str | None, batch: Sequence[Example]) -> list[chat.Encoded]:
    docs = [ex for ex in batch if ex.text is not None]
    if docs and len(docs) == len(batch):
        return chat.encode_documents(tokenizer, batch)
    if template is None:
        raise InvalidDataset(f"{batch[0].where}: a conversation in a text data set")
    return chat.encode_conversations(tokenizer, template, batch)


def _tokenize(
    path: Path, fmt: str, tokenizer: Any, template: str | None, val_records: set[int] | None
) -> tuple[list[tuple[Example, chat.Encoded]], list[tuple[Example, chat.Encoded]], dict[str, float]]:
    """(train, validation) encoded examples of ``path``; records in ``val_records`` go to validation."""
    train: list[tuple[Example, chat.Encoded]] = []
    val: list[tuple[Example, chat.Encoded]] = []
    t0 = last = time.perf_counter()
    n_records = n_tokens = 0
    batch: list[Example] = []

    def flush() -> None:
        nonlocal n_records, n_tokens, last
        for ex, enc in zip(batch, _encode(tokenizer, template, batch), strict=True):
            (val if val_records is not None and ex.record in val_records else train).append((ex, enc))
            n_tokens += len(enc[0])
        n_records += len(batch)
        batch.clear()
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS:
            last = now
            log.warning(
                "tokenizing %s: %d records, %d tokens (%.0f records/s)", path, n_records, n_tokens,
                n_records / (now - t0),
            )  # fmt: skip

    for ex in records.read_examples(path, fmt):
        batch.append(ex)
        if len(batch) >= BATCH:
            flush()
    if batch:
        flush()
    seconds = max(time.perf_counter() - t0, 1e-9)
    rate = {"records": n_records, "tokens": n_tokens, "seconds": seconds}
    log.warning(
        "tokenized %s: %d records, %d tokens in %.1f s (%.0f records/s, %.0f tokens/s)",
        path, n_records, n_tokens, seconds, n_records / seconds, n_tokens / seconds,
    )  # fmt: skip
    return train, val, rate


def _rows(encoded: list[tuple[Example, chat.Encoded]], opts: DataOptions, pad: int) -> tuple[Rows, PackStats]:
    stats = PackStats()
    pieces = (
        piece
        for ex, (ids, mask) in encoded
        for piece in packing.fit(ids, mask, opts.sequence_length, split=ex.text is not None, stats=stats)
    )
    rows = packing.build_rows(pieces, opts.sequence_length, opts.packing, pad, stats)
    return rows, stats


def _count_records(path: Path) -> int:
    return sum(1 for _ in records.raw_records(path))


def build(opts: DataOptions) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read, validate, tokenize and pack: the arrays and meta of a cache entry."""
    data = Path(opts.data_file)
    fmt = records.resolve_format(data, opts.data_format)
    tokenizer = chat.load_tokenizer(opts.model_dir, trust_remote_code=opts.trust_remote_code)
    template, template_source = None, "none"
    val_fmt = (
        records.resolve_format(Path(opts.validation_file), opts.data_format) if opts.validation_file else None
    )
    if fmt in records.CHAT_FORMATS or val_fmt in records.CHAT_FORMATS:
        template, template_source = chat.resolve_template(tokenizer, _template_override(opts))
        log.warning("chat template: %s", template_source)
    val_records: set[int] | None = None
    if opts.validation_fraction > 0:
        n = _count_records(data)
        k = max(1, round(opts.validation_fraction * n))
        if k >= n:
            raise InvalidDataset(f"{data}: {n} records leave none to train on with --validation-fraction")
        val_records = {int(r) for r in np.random.default_rng([opts.seed, 7]).permutation(n)[:k]}
    train_enc, val_enc, rate = _tokenize(data, fmt, tokenizer, template, val_records)
    if opts.validation_file:
        assert val_fmt is not None
        val_enc, _, _ = _tokenize(Path(opts.validation_file), val_fmt, tokenizer, template, None)
    pad = chat.pad_id(tokenizer)
    train, train_stats = _rows(train_enc, opts, pad)
    if not len(train):
        raise InvalidDataset(
            f"{data}: no sample has a trained token left at sequence length {opts.sequence_length}"
        )
    arrays = {"train_ids": train.ids, "train_labels": train.labels, "train_positions": train.positions}
    meta: dict[str, Any] = {
        "format": fmt,
        "template": template_source,
        "packing": opts.packing,
        "sequence_length": opts.sequence_length,
        "pad_id": pad,
        "train": {**vars(train_stats), "rows": len(train)},
        "tokenize": rate,
    }
    if val_enc:
        val, val_stats = _rows(val_enc, opts, pad)
        arrays |= {"val_ids": val.ids, "val_labels": val.labels, "val_positions": val.positions}
        meta["validation"] = {**vars(val_stats), "rows": len(val)}
    return arrays, meta


def _from_arrays(
    arrays: dict[str, np.ndarray], meta: dict[str, Any], cached: bool, seconds: float
) -> Prepared:
    train = Rows(arrays["train_ids"], arrays["train_labels"], arrays["train_positions"])
    val = (
        Rows(arrays["val_ids"], arrays["val_labels"], arrays["val_positions"])
        if "val_ids" in arrays
        else None
    )
    return Prepared(train, val, meta, cached, seconds)


def prepare(opts: DataOptions, *, builder: bool) -> Prepared:
    """The rows of the run: from the cache, else built (``builder``) or waited for (the others)."""
    t0 = time.perf_counter()
    cache_dir = Path(opts.cache_dir)
    key = cache.cache_key(key_parts(opts))
    got = cache.load(cache_dir, key)
    if got is not None:
        log.warning("tokenized data: cached in %s (tokenization skipped)", cache.entry_dir(cache_dir, key))
        return _from_arrays(*got, cached=True, seconds=time.perf_counter() - t0)
    if not builder:
        got = cache.wait_for(cache_dir, key)
        return _from_arrays(*got, cached=False, seconds=time.perf_counter() - t0)
    cache.clear_failure(cache_dir, key)
    try:
        arrays, meta = build(opts)
    except contract.ContractError as exc:
        cache.record_failure(cache_dir, key, str(exc))
        raise
    cache.publish(cache_dir, key, arrays, meta)
    log.warning("tokenized data: saved to %s", cache.entry_dir(cache_dir, key))
    got = cache.load(cache_dir, key)
    assert got is not None
    return _from_arrays(*got, cached=False, seconds=time.perf_counter() - t0)


class RecordSource:
    """Rows of :func:`prepare` served by step, DP rank and micro-batch (:mod:`.order`)."""

    def __init__(self, rows: Rows, *, seed: int, with_positions: bool) -> None:
        self.rows, self.seed, self.with_positions = rows, seed, with_positions

    def _batch(self, picks: Sequence[int | None], rows: Rows | None = None) -> tuple[Any, ...]:
        import torch  # noqa: PLC0415

        src = rows if rows is not None else self.rows
        seq = src.ids.shape[1]
        ids = np.empty((len(picks), seq), dtype=np.int64)
        labels = np.full((len(picks), seq), packing.IGNORE, dtype=np.int64)
        positions = np.tile(np.arange(seq, dtype=np.int64), (len(picks), 1))
        for k, r in enumerate(picks):
            if r is None:  # a filler row: nothing trained, nothing counted
                ids[k] = src.ids[0]
                continue
            ids[k], labels[k], positions[k] = src.ids[r], src.labels[r], src.positions[r]
        out = (torch.from_numpy(ids), torch.from_numpy(labels))
        return (*out, torch.from_numpy(positions)) if self.with_positions else out

    def micro_batch(
        self, *, step: int, micro: int, dp_rank: int, dp: int, micro_batch: int, global_batch: int
    ) -> tuple[Any, ...]:
        """(ids, labels[, position_ids]) of one micro-batch of optimizer step ``step`` (0-based)."""
        picks = order.micro_batch_rows(
            step=step, micro=micro, dp_rank=dp_rank, dp=dp, micro_batch=micro_batch,
            global_batch=global_batch, rows=len(self.rows), seed=self.seed,
        )  # fmt: skip
        return self._batch(picks)

    def step_iter(
        self, *, step: int, grad_accum: int, dp_rank: int, dp: int, micro_batch: int, global_batch: int,
        device: Any,
    ) -> Iterator[tuple[Any, ...]]:  # fmt: skip
        """The ``grad_accum`` micro-batches of one optimizer step for this DP rank."""
        for m in range(grad_accum):
            batch = self.micro_batch(
                step=step, micro=m, dp_rank=dp_rank, dp=dp, micro_batch=micro_batch, global_batch=global_batch
            )
            yield tuple(t.to(device) for t in batch)

    def eval_batches(
        self, rows: Rows, *, dp_rank: int, dp: int, micro_batch: int, device: Any
    ) -> Iterator[tuple[Any, ...]]:
        """Every validation row once over the DP ranks, equal batch counts per rank."""
        for picks in order.eval_rows(rows=len(rows), dp_rank=dp_rank, dp=dp, micro_batch=micro_batch):
            yield tuple(t.to(device) for t in self._batch(picks, rows))
