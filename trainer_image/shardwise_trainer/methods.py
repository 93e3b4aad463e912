"""Fine-tuning methods on a pretrained model: which parameters train (full, LoRA, QLoRA, freeze).

The same choices as the planner (``shardwise.planner.memory.stage_counts``), so the trainable
parameter count equals the plan's exactly:

* full: every weight trains, except a vision tower (text-only fine-tuning of Qwen2-VL);
* freeze: only decoder layers ``first_trainable_layer`` … L-1 train (``layout.json``); the
  embedding, the earlier layers, the final norm and the head stay frozen;
* lora: ``peft`` adapters of rank r on the planned targets, mapped to the family's module names
  by ``capabilities.LORA_MODULES`` (ChatGLM's fused ``query_key_value`` for q, k, v), scaled
  alpha / r, no bias; everything else frozen;
* qlora: the same adapters on a 4-bit NF4 base (``pretrained.load_model``), after
  ``peft.prepare_model_for_kbit_training``.

Activation checkpointing uses the model's own ``gradient_checkpointing_enable`` when it declares
support; remote code that does not (``supports_gradient_checkpointing = False``) gets each decoder
layer's forward wrapped in non-reentrant ``torch.utils.checkpoint`` instead, so a plan that
counts on checkpointing runs as planned rather than failing at the first step.
"""

# ruff: noqa: PLC0415 - peft loads lazily, only for LoRA / QLoRA
from __future__ import annotations

from typing import Any

from shardwise_trainer import capabilities, contract, pretrained
from shardwise_trainer.contract import Layout


def decoder_layers(model: Any, layers: int) -> Any:
    """The ``nn.ModuleList`` of the language model's decoder layers (``layers`` long)."""
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers and name.split(".")[-1] == "layers":
            if "visual" in name:
                continue
            return module
    raise contract.ContractError(
        f"the model has no list of {layers} decoder layers named 'layers'", contract.REASON_INVALID_MODEL
    )


def _enable_checkpointing(model: Any, layers: int) -> None:
    """The model's own gradient checkpointing, else each decoder layer recomputed by the trainer.

    Remote code may declare no support, or override the hook with the pre-4.35 signature
    (ChatGLM3's ``_set_gradient_checkpointing(module, value)``), which transformers 5 calls with
    other arguments: a ValueError or TypeError before anything is switched on."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner, "supports_gradient_checkpointing", False):
        try:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return
        except (TypeError, ValueError):
            pass
    _checkpoint_layers(model, layers)


def _checkpoint_layers(model: Any, layers: int) -> None:
    """Recompute each decoder layer in backward (the model cannot do it itself)."""
    import functools

    from torch.utils.checkpoint import checkpoint

    for layer in decoder_layers(model, layers):
        forward = layer.forward

        @functools.wraps(forward)
        def recomputed(*args: Any, _forward: Any = forward, _layer: Any = layer, **kwargs: Any) -> Any:
            if not _layer.training:
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = recomputed


def _freeze_all(model: Any) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def apply_method(model: Any, layout: Layout, family: str, *, checkpointing: bool) -> Any:
    """Mark what trains; returns the model to train (a ``peft`` model for LoRA / QLoRA)."""
    method = layout.method
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "freeze":
        _freeze_all(model)
        layers = decoder_layers(model, layout.architecture.layers)
        for layer in list(layers)[layout.first_trainable_layer :]:
            for p in layer.parameters():
                p.requires_grad_(True)
    elif method in ("lora", "qlora"):
        modules = capabilities.lora_modules(family, layout.lora_targets)
        if isinstance(modules, str):
            raise contract.ContractError(modules, contract.REASON_INVALID_MODEL)
        import peft

        if method == "qlora":
            # Checkpointing is enabled below, the same way as for the other methods.
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _freeze_all(model)
        config = peft.LoraConfig(
            r=layout.lora_rank,
            lora_alpha=layout.lora_alpha,
            lora_dropout=layout.lora_dropout,
            target_modules=list(modules),
            # Adapters on the language model only: a vision tower keeps its weights as they are.
            exclude_modules=r".*visual.*",
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            model = peft.get_peft_model(model, config)
        except ValueError as exc:
            raise contract.ContractError(
                f"LoRA targets {list(modules)}: {exc}", contract.REASON_INVALID_MODEL
            ) from exc
    else:
        raise contract.ContractError(f"method {method!r} is not run on a pretrained model")
    tower = pretrained.vision_tower(model)
    if tower is not None:
        for p in tower.parameters():
            p.requires_grad_(False)
    if checkpointing:
        _enable_checkpointing(model, layout.architecture.layers)
    return model


def trainable_parameters(model: Any) -> int:
    """Trainable parameters at their full (unpartitioned) size, each tensor once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += int(getattr(p, "ds_numel", 0) or p.numel())
    return total
