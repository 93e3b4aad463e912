"""The run's result in Hugging Face format, loadable by ``transformers`` / ``peft`` without shardwise.

* LoRA / QLoRA: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) via
  ``peft``'s ``save_pretrained``;
* full / freeze: the whole model as safetensors (``save_pretrained``) with its config;
* tokenizer and remote-code files of the model directory are copied beside it, so the output
  directory is a complete model (or adapter) directory.

Under ZeRO-3 the weights are partitioned, under AutoTP (tp > 1) sharded: every rank takes part in
gathering the 16-bit weights (``engine._consolidated_16bit_state_dict``), rank 0 writes. Otherwise
every rank holds whole weights; rank 0 writes its copy.
"""

# ruff: noqa: PLC0415
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

#: Files copied from the model directory into a full-model output (tokenizer, remote code).
COPIED_SUFFIXES = (".py", ".model", ".tiktoken")
COPIED_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)


def _copy_side_files(model_dir: Path, out: Path) -> None:
    for item in model_dir.iterdir():
        if item.is_file() and (item.name in COPIED_NAMES or item.suffix in COPIED_SUFFIXES):
            target = out / item.name
            if not target.exists():
                shutil.copy2(item, target)


def _state_dict(engine: Any, zero_stage: int, prefix: str) -> dict[str, Any] | None:
    """The full 16-bit state dict of the wrapped model on rank 0 (None elsewhere), keys without
    the training wrapper's ``prefix``; a collective under ZeRO-3."""
    import torch.distributed as dist

    if zero_stage == 3 or engine.autotp_size() > 1:
        # ZeRO-3 partitions and AutoTP shards are gathered to whole tensors (a collective).
        state = engine._consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if dist.get_rank() == 0 else None
    if dist.get_rank() != 0 or state is None:
        return None
    return {k.removeprefix(prefix): v.detach().cpu() for k, v in state.items()}


def save(
    engine: Any, model: Any, *, method: str, zero_stage: int, model_dir: str, out_dir: str, prefix: str
) -> str | None:
    """Write the result to ``out_dir`` (all ranks call it); ``model`` is the Hugging Face (or
    peft) model inside the engine's wrapper. Returns the path on rank 0."""
    import torch.distributed as dist

    state = _state_dict(engine, zero_stage, prefix)
    path: str | None = None
    if dist.get_rank() == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # peft keeps only the adapter tensors of the state dict it is given (LoRA / QLoRA).
        model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
        if method not in ("lora", "qlora"):
            _copy_side_files(Path(model_dir), out)
        path = str(out)
    dist.barrier()
    return path


def probe_loss(engine: Any, ids: Any, labels: Any, *, sp_group: Any = None) -> float:
    """The trained model's loss on one batch in eval mode (all ranks call it: a ZeRO-3 or SP
    forward is a collective); what a fresh process that loads the output must reproduce. Under
    SP each rank's forward returns its share, summed over ``sp_group``."""
    import torch
    import torch.distributed as dist

    engine.eval()
    with torch.no_grad():
        loss = engine(ids, labels).float()
        if sp_group is not None:
            dist.all_reduce(loss, group=sp_group)
    engine.train()
    return float(loss)
