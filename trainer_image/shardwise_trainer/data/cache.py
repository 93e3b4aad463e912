"""The tokenized-data cache: .npy rows per key, published atomically, waited for by non-builders.

Key: SHA-256 over the data file's bytes, the tokenizer's files, the template, the sequence
length, the packing policy, the format, the validation split and :data:`PIPELINE_VERSION`; any
change gives a new entry (old ones are left for the user to delete). An entry is built in a
``.tmp-*`` directory and renamed into place, so a reader never sees half of one; when two
builders race (nodes sharing one volume) the first rename wins and the other build is dropped.
A build that fails on bad data leaves ``<key>.failed`` holding the one-line message, so the
ranks waiting for the entry fail with the same message instead of waiting forever.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np

from shardwise_trainer.data.records import InvalidDataset

#: Bump when the tokenization / packing code changes what an entry holds.
PIPELINE_VERSION: Final = 1
META_FILE: Final = "meta.json"
#: Files of a model directory that make up its tokenizer (and its chat template).
TOKENIZER_FILES: Final = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_SUFFIXES: Final = (".model", ".tiktoken")
POLL_SECONDS: Final = 0.2


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_digest(model_dir: Path) -> str:
    """Hash of the tokenizer's files (names and bytes), without loading the tokenizer."""
    h = hashlib.sha256()
    for item in sorted(model_dir.iterdir()):
        # A remote-code tokenizer's own module (ChatGLM3's tokenization_chatglm.py) decides its tokens too.
        remote = item.name.startswith("tokenization_") and item.suffix == ".py"
        if item.is_file() and (item.name in TOKENIZER_FILES or item.suffix in TOKENIZER_SUFFIXES or remote):
            h.update(item.name.encode() + b"\0" + file_digest(item).encode())
    return h.hexdigest()


def cache_key(parts: Mapping[str, Any]) -> str:
    doc = json.dumps({**parts, "pipeline_version": PIPELINE_VERSION}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


def entry_dir(cache_dir: Path, key: str) -> Path:
    return cache_dir / key


def load(cache_dir: Path, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays (memory-mapped) and meta of entry ``key``, or None when it is not there."""
    entry = entry_dir(cache_dir, key)
    meta_path = entry / META_FILE
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    return arrays, meta


def publish(cache_dir: Path, key: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Write entry ``key`` (temp dir + rename); a concurrent builder's entry wins if it was first."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".tmp-{key}-"))
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
        # meta.json last: an entry without it is never read
        (tmp / META_FILE).write_text(json.dumps({**meta, "arrays": sorted(arrays)}, indent=1))
        try:
            os.rename(tmp, entry_dir(cache_dir, key))
        except OSError:
            if not (entry_dir(cache_dir, key) / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = cache_dir / f"{key}.failed"
    failed.unlink(missing_ok=True)


def record_failure(cache_dir: Path, key: str, message: str) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".tmp-{key}-", suffix=".failed")
    with os.fdopen(fd, "w") as fh:
        fh.write(message)
    os.replace(tmp, cache_dir / f"{key}.failed")


def clear_failure(cache_dir: Path, key: str) -> None:
    (cache_dir / f"{key}.failed").unlink(missing_ok=True)


def wait_for(cache_dir: Path, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Block until entry ``key`` is published (or its build failed: the same error here)."""
    while True:
        got = load(cache_dir, key)
        if got is not None:
            return got
        failed = cache_dir / f"{key}.failed"
        if failed.is_file():
            raise InvalidDataset(failed.read_text().strip())
        time.sleep(POLL_SECONDS)
