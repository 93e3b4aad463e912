"""Entry point: ``shardwise-train`` / ``python -m shardwise_trainer`` (under torchrun or alone).

    torchrun --nproc-per-node 2 -m shardwise_trainer --layout layout.json --steps 10 --synthetic-data

Options default to the layout contract's environment variables (``SHARDWISE_LAYOUT_FILE``,
``SHARDWISE_CHECKPOINT_DIR``, ``SHARDWISE_METRICS_PORT``, …) so the operator's pods need no flags.
Exit codes: 0 done, 2 bad layout / arguments (the message says which key), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from shardwise_trainer import contract, failures


def build_parser() -> argparse.ArgumentParser:
    """The command line; every default comes from the contract's env (see docs/layout-contract.md)."""
    env = contract.env
    p = argparse.ArgumentParser(prog="shardwise-train", description=__doc__.split("\n")[0])
    p.add_argument(
        "--layout", default=env(contract.ENV_LAYOUT_FILE), help="layout.json (env SHARDWISE_LAYOUT_FILE)"
    )
    p.add_argument(
        "--ds-config",
        default=env(contract.ENV_DS_CONFIG_FILE),
        help="ds_config.json (env SHARDWISE_DS_CONFIG_FILE); default: layout['deepspeed']",
    )
    p.add_argument("--steps", type=int, default=100, help="total optimizer steps of the run (default 100)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--synthetic-data", action="store_true", help="deterministic synthetic token stream")
    data.add_argument(
        "--data",
        default=os.environ.get(contract.ENV_DATA_FILE) or None,
        help="data file: raw token ids, or records (.jsonl / .json / .parquet / .txt, see --data-format; "
        "env SHARDWISE_DATA)",
    )
    p.add_argument("--token-dtype", choices=("uint16", "int32"), default="uint16")
    p.add_argument(
        "--data-format",
        default=os.environ.get(contract.ENV_DATA_FORMAT) or "auto",
        help="auto (default: by extension and fields), tokens, text, alpaca, sharegpt, messages "
        "(env SHARDWISE_DATA_FORMAT); records need --hf-model (its tokenizer and chat template)",
    )
    p.add_argument(
        "--packing",
        default=os.environ.get(contract.ENV_PACKING) or "pack",
        help="pack (default: samples packed whole into rows, positions restart per sample) or pad "
        "(one sample per row) (env SHARDWISE_PACKING)",
    )
    p.add_argument(
        "--data-cache-dir",
        default=os.environ.get(contract.ENV_DATA_CACHE_DIR) or "",
        metavar="DIR",
        help="where tokenized records are cached (env SHARDWISE_DATA_CACHE_DIR); default "
        "<checkpoint dir>/data-cache, else $TMPDIR/shardwise-data-cache",
    )
    p.add_argument(
        "--validation-data",
        default=os.environ.get(contract.ENV_VALIDATION_DATA) or None,
        metavar="FILE",
        help="validation records (env SHARDWISE_VALIDATION_DATA)",
    )
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=float(os.environ.get(contract.ENV_VALIDATION_FRACTION) or 0.0),
        metavar="F",
        help="hold out this fraction of the --data records (env SHARDWISE_VALIDATION_FRACTION)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=int(os.environ.get(contract.ENV_EVAL_EVERY) or 0),
        metavar="N",
        help="validation loss every N steps (and at the end); 0 = at the end only (env SHARDWISE_EVAL_EVERY)",
    )
    p.add_argument(
        "--chat-template",
        default=os.environ.get(contract.ENV_CHAT_TEMPLATE) or None,
        metavar="FILE",
        help="Jinja chat template replacing the tokenizer's (env SHARDWISE_CHAT_TEMPLATE)",
    )
    p.add_argument("--seed", type=int, default=1234, help="model init and synthetic data seed")
    p.add_argument("--lr", type=float, default=None, help="override the DeepSpeed config's learning rate")
    p.add_argument(
        "--hf-model",
        default=os.environ.get(contract.ENV_HF_MODEL) or None,
        metavar="DIR",
        help="train the pretrained Hugging Face model saved in DIR (local only; env "
        "SHARDWISE_HF_MODEL) instead of the built-in model; needed by lora / qlora / freeze",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=os.environ.get(contract.ENV_TRUST_REMOTE_CODE, "") == "true",
        help="run modelling code shipped in the --hf-model directory (ChatGLM3); an explicit opt-in "
        "(env SHARDWISE_TRUST_REMOTE_CODE=true), never the default",
    )
    p.add_argument(
        "--output-dir",
        default=os.environ.get(contract.ENV_OUTPUT_DIR) or "",
        metavar="DIR",
        help="save the result in Hugging Face format here at the end: the LoRA / QLoRA adapter, or "
        "the full / freeze model as safetensors (env SHARDWISE_OUTPUT_DIR)",
    )
    p.add_argument("--checkpoint-dir", default=env(contract.ENV_CHECKPOINT_DIR) or "")
    p.add_argument("--checkpoint-every", type=int, default=None, help="env SHARDWISE_CHECKPOINT_EVERY")
    p.add_argument(
        "--checkpoint-every-minutes",
        type=float,
        default=float(os.environ.get(contract.ENV_CHECKPOINT_EVERY_MINUTES) or 0),
        help="also save after this many minutes (env SHARDWISE_CHECKPOINT_EVERY_MINUTES)",
    )
    p.add_argument(
        "--checkpoint-keep",
        type=int,
        default=int(os.environ.get(contract.ENV_CHECKPOINT_KEEP) or 2),
        help="newest complete checkpoints kept (env SHARDWISE_CHECKPOINT_KEEP, default 2)",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="env SHARDWISE_METRICS_PORT (0 = off)")
    p.add_argument(
        "--metrics-host",
        default=os.environ.get(contract.ENV_POD_IP) or "0.0.0.0",
        help="address the stats endpoint binds (env SHARDWISE_POD_IP, default all addresses)",
    )
    p.add_argument("--stats-dir", default=None, help="per-pod dir where local ranks drop their stats")
    p.add_argument(
        "--stats-refresh-seconds",
        type=float,
        default=0.5,
        help="least time between two rewrites of a rank's stats file (0 = every step)",
    )
    p.add_argument(
        "--linger-seconds", type=float, default=0.0, help="keep serving stats this long at the end"
    )
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the layout, return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.synthetic_data and not args.data:
        print("shardwise-train: give --synthetic-data or --data FILE", file=sys.stderr)
        return 2
    try:
        from shardwise_trainer.train import RunOptions, run  # noqa: PLC0415 - torch loads lazily

        return run(
            RunOptions(
                layout_file=args.layout,
                ds_config_file=args.ds_config,
                steps=args.steps,
                synthetic=args.synthetic_data,
                data_file=args.data,
                token_dtype=args.token_dtype,
                seed=args.seed,
                checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=(
                    args.checkpoint_every
                    if args.checkpoint_every is not None
                    else contract.env_int(contract.ENV_CHECKPOINT_EVERY)
                ),
                metrics_port=(
                    args.metrics_port
                    if args.metrics_port is not None
                    else contract.env_int(contract.ENV_METRICS_PORT)
                ),
                checkpoint_every_minutes=args.checkpoint_every_minutes,
                checkpoint_keep=args.checkpoint_keep,
                metrics_host=args.metrics_host,
                stats_dir=args.stats_dir,
                linger_seconds=args.linger_seconds,
                stats_refresh_seconds=args.stats_refresh_seconds,
                lr=args.lr,
                hf_model=args.hf_model,
                trust_remote_code=args.trust_remote_code,
                output_dir=args.output_dir,
                data_format=args.data_format,
                packing=args.packing,
                data_cache_dir=args.data_cache_dir,
                validation_data=args.validation_data,
                validation_fraction=args.validation_fraction,
                eval_every=args.eval_every,
                chat_template=args.chat_template,
            )
        )
    except contract.ContractError as exc:
        print(f"shardwise-train: {exc}", file=sys.stderr)
        contract.write_termination_message(
            contract.termination_message(contract.EXIT_BAD_INPUT, exc.reason, str(exc), retryable=False),
            first_only=True,
        )
        return contract.EXIT_BAD_INPUT
    except Exception as exc:  # the traceback for the log, the classification for the operator
        traceback.print_exc(file=sys.stderr)
        failure = failures.classify(
            exc, rank=_global_rank(), peak=failures.measured_peak(), gpu_peak_bytes=failures.gpu_peak_bytes()
        )
        print(f"shardwise-train: {failure.reason}: {failure.message}", file=sys.stderr)
        contract.write_termination_message(failure.termination_message(), first_only=True)
        return failure.exit_code


def _global_rank() -> int | None:
    raw = os.environ.get("RANK")
    return int(raw) if raw and raw.isdigit() else None


if __name__ == "__main__":
    sys.exit(main())
