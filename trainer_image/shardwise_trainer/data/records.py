"""Record files users bring (JSON lines, JSON array, parquet, plain text) read as conversations or documents.

Pure Python + ``pyarrow`` (parquet only, imported when a parquet file is read). Every problem is
a :class:`~shardwise_trainer.contract.ContractError` with reason ``InvalidDataset`` whose one-line
message names ``FILE:LINE (record I): FIELD: what is wrong`` (parquet: ``FILE:record I: …``).

Formats (``--data-format``):

* ``alpaca``: ``instruction`` (str), optional ``input`` (str), ``output`` (str), optional
  ``system`` (str) -> system?, user = instruction [+ blank line + input], assistant = output;
* ``sharegpt``: ``conversations`` = list of ``{"from": system|human|gpt, "value": str}``
  (``user`` / ``assistant`` accepted as aliases), optional record-level ``system``;
* ``messages``: ``messages`` = list of ``{"role": system|user|assistant, "content": str}``;
* ``text``: ``text`` (str) in records, or a ``.txt`` file whose documents are separated by
  blank lines (continued pre-training: every token is trained);
* ``auto``: ``.txt`` -> text; ``.jsonl`` / ``.json`` / ``.parquet`` -> by the first record's
  fields (``messages``, ``conversations``, ``instruction``, ``text``, in that order); any other
  extension -> ``tokens`` (the raw token file of :mod:`.tokens`, unchanged).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from shardwise_trainer import contract

TOKENS: Final = "tokens"
TEXT: Final = "text"
ALPACA: Final = "alpaca"
SHAREGPT: Final = "sharegpt"
MESSAGES: Final = "messages"
AUTO: Final = "auto"
#: Every ``--data-format`` value; ``tokens`` is the raw token file, the rest are record formats.
FORMATS: Final = (AUTO, TOKENS, TEXT, ALPACA, SHAREGPT, MESSAGES)
CHAT_FORMATS: Final = (ALPACA, SHAREGPT, MESSAGES)
RECORD_SUFFIXES: Final = (".jsonl", ".json", ".parquet", ".txt")
#: Fields that tell ``auto`` the format of a record, first match wins.
DETECT_FIELDS: Final = (
    (MESSAGES, MESSAGES),
    ("conversations", SHAREGPT),
    ("instruction", ALPACA),
    ("text", TEXT),
)
ROLES: Final = ("system", "user", "assistant")
SHAREGPT_ROLES: Final = {
    "system": "system",
    "human": "user",
    "gpt": "assistant",
    "user": "user",
    "assistant": "assistant",
}


def InvalidDataset(message: str) -> contract.ContractError:  # noqa: N802 - reads as an exception
    """A ContractError about the data (the job fails with reason InvalidDataset)."""
    return contract.ContractError(message, contract.REASON_INVALID_DATASET)


@dataclass(frozen=True)
class Example:
    """One record: a conversation (``messages`` of ``{"role", "content"}``) or a document (``text``)."""

    record: int  # 0-based index in the file
    where: str  # "FILE:LINE (record I)" for messages
    messages: tuple[Mapping[str, str], ...] = ()
    text: str | None = None


@dataclass(frozen=True)
class _Raw:
    record: int
    where: str
    doc: Any


def _jsonl(path: Path) -> Iterator[_Raw]:
    index = 0
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no} (record {index})"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidDataset(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from exc
            yield _Raw(index, where, doc)
            index += 1


def _json_array(path: Path) -> Iterator[_Raw]:
    """A JSON array of records, decoded element by element so each error names its line."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if not text.startswith("[", pos):
        raise InvalidDataset(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected a JSON array of records")
    pos = _skip_ws(text, pos + 1)
    index, line, counted = 0, 1, 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        where = f"{path}:{line} (record {index})"
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise InvalidDataset(f"{path}:{exc.lineno} (record {index}): not JSON ({exc.msg})") from exc
        yield _Raw(index, where, doc)
        index += 1
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            at = text.count("\n", 0, min(pos, len(text))) + 1
            raise InvalidDataset(f"{path}:{at} (record {index}): not JSON (expected ',' or ']')")
    if pos >= len(text):
        raise InvalidDataset(f"{path}:{text.count(chr(10)) + 1}: not JSON (the array is not closed)")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _parquet(path: Path) -> Iterator[_Raw]:
    try:
        import pyarrow as pa  # noqa: PLC0415 - only for parquet files
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError as exc:
        raise InvalidDataset(f"{path}: parquet needs the package `pyarrow` (the trainer extra)") from exc
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for doc in batch.to_pylist():
                yield _Raw(index, f"{path}:record {index}", doc)
                index += 1
    except (pa.ArrowException, OSError) as exc:
        raise InvalidDataset(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from exc


def _text_file(path: Path) -> Iterator[_Raw]:
    """Documents of a ``.txt`` file: runs of non-blank lines."""
    index, start = 0, 0
    lines: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                if not lines:
                    start = line_no
                lines.append(line)
                continue
            if lines:
                yield _Raw(index, f"{path}:{start} (record {index})", {"text": "".join(lines).rstrip("\n")})
                index, lines = index + 1, []
    if lines:
        yield _Raw(index, f"{path}:{start} (record {index})", {"text": "".join(lines).rstrip("\n")})


def raw_records(path: Path) -> Iterator[_Raw]:
    """The file's records, by extension."""
    readers = {".jsonl": _jsonl, ".json": _json_array, ".parquet": _parquet, ".txt": _text_file}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise InvalidDataset(f"{path}: record files end in {', '.join(RECORD_SUFFIXES)}")
    try:
        yield from reader(path)
    except UnicodeDecodeError as exc:
        raise InvalidDataset(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def check_path(path: str | None, flag: str) -> Path:
    """The data path, or the one-line error of a missing one."""
    if not path:
        raise InvalidDataset(f"{flag}: no data file given")
    p = Path(path)
    if not p.is_file():
        raise InvalidDataset(f"{flag} {path}: no such file")
    return p


def resolve_format(path: Path, fmt: str) -> str:
    """``fmt``, or for ``auto`` the format the file's extension and first record say."""
    if fmt not in FORMATS:
        raise InvalidDataset(f"--data-format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt != AUTO:
        return fmt
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return TEXT
    if suffix not in RECORD_SUFFIXES:
        return TOKENS
    for raw in raw_records(path):
        if not isinstance(raw.doc, dict):
            raise InvalidDataset(f"{raw.where}: a record is a JSON object, got {type(raw.doc).__name__}")
        for field, name in DETECT_FIELDS:
            if field in raw.doc:
                return name
        raise InvalidDataset(
            f"{raw.where}: cannot tell the format from the fields {sorted(raw.doc)}; expected one of "
            f"{', '.join(f for f, _ in DETECT_FIELDS)} (or give --data-format)"
        )
    raise InvalidDataset(f"{path}: holds no records")


def _str(doc: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    value = doc.get(key)
    if value is None and optional:
        return ""
    if value is None:
        raise InvalidDataset(f"{where}: {key}: missing")
    if not isinstance(value, str):
        raise InvalidDataset(f"{where}: {key}: expected a string, got {type(value).__name__}")
    return value


def _turns(
    doc: Mapping[str, Any], where: str, *, key: str, role_key: str, text_key: str, roles: Mapping[str, str]
) -> list[dict[str, str]]:
    items = doc.get(key)
    if items is None:
        raise InvalidDataset(f"{where}: {key}: missing")
    if not isinstance(items, list) or not items:
        raise InvalidDataset(f"{where}: {key}: expected a non-empty list of turns")
    out = []
    for i, turn in enumerate(items):
        field = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise InvalidDataset(f"{where}: {field}: expected an object with {role_key!r} and {text_key!r}")
        role = _str(turn, role_key, f"{where}: {field}")
        if role not in roles:
            raise InvalidDataset(f"{where}: {field}.{role_key}: {role!r} is not one of {', '.join(roles)}")
        out.append({"role": roles[role], "content": _str(turn, text_key, f"{where}: {field}")})
    return out


def to_example(raw: _Raw, fmt: str) -> Example:
    """One record of format ``fmt`` (never ``auto`` / ``tokens``) as an :class:`Example`."""
    doc, where = raw.doc, raw.where
    if not isinstance(doc, dict):
        raise InvalidDataset(f"{where}: a record is a JSON object, got {type(doc).__name__}")
    if fmt == TEXT:
        return Example(raw.record, where, text=_str(doc, "text", where))
    if fmt == ALPACA:
        system = _str(doc, "system", where, optional=True)
        prompt = _str(doc, "instruction", where)
        extra = _str(doc, "input", where, optional=True)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt})
        messages.append({"role": "assistant", "content": _str(doc, "output", where)})
    elif fmt == SHAREGPT:
        system = _str(doc, "system", where, optional=True)
        turns = _turns(
            doc, where, key="conversations", role_key="from", text_key="value", roles=SHAREGPT_ROLES
        )
        messages = ([{"role": "system", "content": system}] if system else []) + turns
    elif fmt == MESSAGES:
        messages = _turns(
            doc, where, key="messages", role_key="role", text_key="content", roles={r: r for r in ROLES}
        )
    else:
        raise InvalidDataset(f"--data-format {fmt!r} is not a record format")
    if not any(m["role"] == "assistant" for m in messages):
        field = {SHAREGPT: "conversations", MESSAGES: "messages"}.get(fmt, "output")
        raise InvalidDataset(f"{where}: {field}: no assistant turn (nothing to train on)")
    return Example(raw.record, where, messages=tuple(messages))


def read_examples(path: Path, fmt: str) -> Iterator[Example]:
    """Every record of ``path`` in format ``fmt`` (a record format), validated."""
    for raw in raw_records(path):
        yield to_example(raw, fmt)
