"""Optional Hugging Face model path: ``--hf-model DIR`` (or env ``SHARDWISE_HF_MODEL``).

Loads ``transformers.AutoModelForCausalLM.from_pretrained(DIR, local_files_only=True)`` — the
user provides ``transformers`` and the weights; nothing is ever fetched from a hub (the process
runs with ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``). ``transformers`` is imported here
only, and only when the option is given.

The model's config must describe the architecture the layout was planned for (layers, hidden
size, heads, kv heads, vocabulary, and where the config has them the FFN width and embedding
tying): a mismatch is a :class:`~shardwise_trainer.contract.ContractError` (exit 2), since
the plan — memory, ZeRO partitions, stage boundaries — would be wrong.

Limits: layouts with ``tp == 1`` and ``pp == 1`` only (DP with ZeRO 0-3). Tensor and pipeline
parallelism of the built-in model rely on its own layer classes (Megatron-style sharded linears,
``PipelineModule`` layer specs); a Hugging Face model under ``tp > 1`` or ``pp > 1`` is rejected
with exit 2 before anything is loaded.
"""

# ruff: noqa: PLC0415 - transformers / torch load lazily, only when --hf-model is given
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shardwise_trainer import contract
from shardwise_trainer.contract import Architecture, Layout

#: Set for the whole process before transformers / huggingface_hub are imported.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def force_offline() -> None:
    """Make any hub access fail instead of downloading (set before the first import)."""
    os.environ.update(OFFLINE_ENV)


def check_layout(layout: Layout, model_dir: str) -> None:
    """Reject what this path cannot run, before torch or transformers is loaded."""
    if layout.tp > 1 or layout.pp > 1:
        raise contract.ContractError(
            f"--hf-model runs layouts with tp=1 and pp=1 only (data parallel with ZeRO 0-3); this layout "
            f"has tp={layout.tp} pp={layout.pp}: tensor / pipeline parallelism of a Hugging Face model "
            "is not implemented (plan with --tp 1 --pp 1, or use the built-in model)"
        )
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise contract.ContractError(
            f"--hf-model {model_dir}: no config.json there (a local directory written by "
            "save_pretrained is expected; models are never downloaded)"
        )


def _import_transformers() -> Any:
    force_offline()
    try:
        import transformers
    except ImportError as exc:
        raise contract.ContractError(
            "--hf-model needs the optional package `transformers` (pip install transformers, or the "
            "image's trainer extra); it is not installed"
        ) from exc
    return transformers


def config_mismatches(config: Any, arch: Architecture, sequence_length: int) -> list[str]:
    """Fields where the Hugging Face ``config`` and the layout's architecture disagree."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    expected: list[tuple[str, str, Any, Any]] = [
        ("layers", "num_hidden_layers", getattr(config, "num_hidden_layers", None), arch.layers),
        ("hidden_size", "hidden_size", getattr(config, "hidden_size", None), arch.hidden_size),
        ("heads", "num_attention_heads", heads, arch.heads),
        ("kv_heads", "num_key_value_heads", kv_heads, arch.kv_heads),
        ("vocab_size", "vocab_size", getattr(config, "vocab_size", None), arch.vocab_size),
    ]
    ffn = getattr(config, "intermediate_size", None)
    if ffn is not None:
        expected.append(("ffn_hidden_size", "intermediate_size", ffn, arch.ffn_hidden_size))
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is not None:
        expected.append(("tied_embeddings", "tie_word_embeddings", bool(tied), arch.tied_embeddings))
    out = [
        f"model.architecture.{ours}={want!r} but the model's config.json has {theirs}={got!r}"
        for ours, theirs, got, want in expected
        if got != want
    ]
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and sequence_length > int(max_pos):
        out.append(
            f"training.sequence_length={sequence_length} exceeds the model's "
            f"max_position_embeddings={max_pos}"
        )
    return out


def load_config(model_dir: str, layout: Layout) -> Any:
    """The model's config, checked against the layout (ContractError naming every mismatch)."""
    transformers = _import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise contract.ContractError(f"--hf-model {model_dir}: cannot read its config: {exc}") from exc
    problems = config_mismatches(config, layout.architecture, layout.sequence_length)
    if problems:
        raise contract.ContractError(
            f"--hf-model {model_dir} does not match the layout it was planned for: " + "; ".join(problems)
        )
    return config


def build_model(model_dir: str, config: Any, checkpointing: str) -> Any:
    """The loaded model wrapped as ``forward(ids, labels) -> mean loss`` (fp32 master weights:
    DeepSpeed applies the layout's precision, as for the built-in model)."""
    import torch
    from torch import nn

    from shardwise_trainer.model import TPContext, lm_loss

    transformers = _import_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, local_files_only=True, dtype=torch.float32
    )
    model.config.use_cache = False
    if checkpointing != "none":  # HF models checkpoint whole decoder layers ("selective" = full)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # from_pretrained returns the model in eval mode

    class HFCausalLM(nn.Module):
        """``forward(ids, labels)``: the same next-token loss as the built-in model (labels are
        already shifted by the data source, so the model's own shifting loss is not used)."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.model = inner
            self._tp = TPContext(size=1, rank=0, group=None)

        def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logits = self.model(input_ids=ids, use_cache=False).logits
            return lm_loss(logits, labels, self._tp)

    return HFCausalLM(model)


def count_parameters(module: Any) -> int:
    """Parameters of the loaded model, shared (tied) tensors counted once."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
