"""The run's options (command line and env) and the record-data checks made before torch loads."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardwise_trainer.contract import Layout
from shardwise_trainer.data import records
from shardwise_trainer.data.records import InvalidDataset


@dataclass
class RunOptions:
    """Everything the run needs besides the layout (from the command line and the env)."""

    layout_file: str
    ds_config_file: str | None
    steps: int
    synthetic: bool
    data_file: str | None
    token_dtype: str
    seed: int
    checkpoint_dir: str
    checkpoint_every: int
    metrics_port: int
    metrics_host: str
    stats_dir: str | None
    linger_seconds: float
    #: least time between two rewrites of a rank's stats file (the first and last step always write)
    stats_refresh_seconds: float = 0.5
    lr: float | None = None
    hf_model: str | None = None  # a local Hugging Face model directory (pretrained.py), else built-in
    trust_remote_code: bool = False  # run modelling code shipped in the model directory (opt-in)
    output_dir: str = ""  # where the result is saved in Hugging Face format (outputs.py); "" = not saved
    data_format: str = records.AUTO  # data/records.py FORMATS
    packing: str = "pack"  # data/packing.py POLICIES
    data_cache_dir: str = ""  # "" = <checkpoint dir>/data-cache, else $TMPDIR/shardwise-data-cache
    validation_data: str | None = None
    validation_fraction: float = 0.0
    eval_every: int = 0  # 0 = evaluate at the end only (when there is a validation split)
    chat_template: str | None = None  # a Jinja template file replacing the tokenizer's
    checkpoint_every_minutes: float = 0.0  # also save after this many minutes (rank 0's clock)
    checkpoint_keep: int = 2  # newest complete checkpoints kept


def data_options(opts: RunOptions, layout: Layout) -> Any:
    """The record-data options of the run (data/source.py DataOptions), or None for a token file
    or synthetic data; every argument error here, before torch loads."""
    from shardwise_trainer.data import source  # noqa: PLC0415 - pulls in torch

    has_validation = bool(opts.validation_data or opts.validation_fraction)
    if opts.eval_every < 0:
        raise InvalidDataset(f"--eval-every {opts.eval_every}: expected N >= 0")
    if opts.eval_every and not has_validation:
        raise InvalidDataset(
            "--eval-every needs a validation split: --validation-data FILE or --validation-fraction F"
        )
    if opts.synthetic:
        fmt = records.TOKENS
    else:
        fmt = records.resolve_format(records.check_path(opts.data_file, "--data"), opts.data_format)
    if fmt == records.TOKENS:
        if has_validation:
            raise InvalidDataset(
                "a validation split needs record data (--data-format text, alpaca, sharegpt, messages)"
            )
        return None
    if not opts.hf_model:
        raise InvalidDataset(
            f"--data {opts.data_file} is {fmt} records: tokenizing them needs the model's tokenizer, "
            "give --hf-model DIR (token files and --synthetic-data run without one)"
        )
    cache_dir = opts.data_cache_dir or (
        str(Path(opts.checkpoint_dir) / "data-cache")
        if opts.checkpoint_dir
        else str(Path(tempfile.gettempdir()) / "shardwise-data-cache")
    )
    d = source.DataOptions(
        data_file=str(opts.data_file),
        data_format=fmt,
        packing=opts.packing,
        sequence_length=layout.sequence_length,
        seed=opts.seed,
        model_dir=opts.hf_model,
        trust_remote_code=opts.trust_remote_code,
        cache_dir=cache_dir,
        validation_file=opts.validation_data,
        validation_fraction=opts.validation_fraction,
        chat_template_file=opts.chat_template,
    )
    source.check(d)
    return d
