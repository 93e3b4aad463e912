"""Pretrained Hugging Face models: a local model directory, checked against the plan, then loaded.

``--hf-model DIR`` (env ``SHARDWISE_HF_MODEL``) names a directory written by ``save_pretrained``:
``config.json``, the weights (``*.safetensors`` or ``pytorch_model*.bin``, sharded or not) and
usually the tokenizer files. Nothing is ever fetched from a hub (``HF_HUB_OFFLINE=1`` /
``TRANSFORMERS_OFFLINE=1`` for the whole process); ``transformers`` is imported here only.

Checks before torch loads (each a :class:`~shardwise_trainer.contract.ContractError`, exit 2):
the layout is one the capability table runs for a pretrained model; ``config.json`` exists; every
weight file the index names is there; a directory that ships its own modelling code
(``auto_map`` in config.json, e.g. ChatGLM3) needs the explicit opt-in ``--trust-remote-code``.
Then the config must describe the planned architecture (layers, hidden size, heads, kv heads,
vocabulary, FFN width, embedding tying; ChatGLM's and Qwen2-VL's own field names are read).

Classes: ``AutoModelForCausalLM``; a Qwen2-VL (``model_type`` ``qwen2_vl``) loads its
conditional-generation class through ``AutoModelForImageTextToText`` and trains text-only with
its vision tower frozen, as the planner counts it; remote code loads what its ``auto_map`` names.

Under ZeRO-3 the weights are loaded partitioned: ``HfDeepSpeedConfig`` is created before
``from_pretrained``, so ``transformers`` builds the model inside ``deepspeed.zero.Init`` and each
rank materialises only its partition (never a full copy per rank). QLoRA loads the base in 4-bit
NF4 with double quantisation (``bitsandbytes``).
"""

# ruff: noqa: PLC0415 - transformers / torch load lazily, only for a pretrained model
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shardwise_trainer import contract
from shardwise_trainer.contract import Architecture, Layout

#: Set for the whole process before transformers / huggingface_hub are imported.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def InvalidModel(message: str) -> contract.ContractError:  # noqa: N802 - reads as an exception
    """A ContractError about the model directory (the job fails with reason InvalidModel)."""
    return contract.ContractError(message, contract.REASON_INVALID_MODEL)


#: Keeps the ZeRO-3 integration alive while from_pretrained runs (transformers holds a weakref).
_HF_DS_CONFIG: list[Any] = []


def force_offline() -> None:
    """Make any hub access fail instead of downloading (set before the first import)."""
    os.environ.update(OFFLINE_ENV)


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads((path / "config.json").read_text())
    except FileNotFoundError as exc:
        raise InvalidModel(
            f"--hf-model {path}: no config.json there (a local directory written by save_pretrained "
            "is expected; models are never downloaded)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise InvalidModel(f"--hf-model {path}: config.json is not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise InvalidModel(f"--hf-model {path}: config.json is not a JSON object")
    return doc


def _check_weights(path: Path) -> None:
    for index_name in INDEX_FILES:
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as exc:
                raise InvalidModel(f"--hf-model {path}: {index_name} is malformed ({exc})") from exc
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise InvalidModel(
                    f"--hf-model {path}: weight files missing: {', '.join(missing[:5])}"
                    f"{' …' if len(missing) > 5 else ''} (named by {index_name})"
                )
            return
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise InvalidModel(
            f"--hf-model {path}: no weight files (*.safetensors or pytorch_model*.bin); "
            "save the model with save_pretrained"
        )


def check_model_dir(layout: Layout, model_dir: str, *, trust_remote_code: bool) -> None:
    """Reject what cannot run, before torch or transformers is loaded."""
    refused = contract.runtime_refusal(layout, pretrained=True)
    if refused:
        raise contract.ContractError(refused, contract.REASON_UNSUPPORTED)
    path = Path(model_dir)
    if not path.is_dir():
        raise InvalidModel(f"--hf-model {model_dir}: not a directory")
    doc = _read_config_json(path)
    _check_weights(path)
    if doc.get("auto_map") and not trust_remote_code:
        code = sorted(p.name for p in path.glob("*.py"))
        raise InvalidModel(
            f"--hf-model {model_dir} ships its own modelling code ({', '.join(code) or 'auto_map'}); "
            "running it is an explicit opt-in: pass --trust-remote-code (spec.model.trustRemoteCode)"
        )


def _import_transformers() -> Any:
    force_offline()
    try:
        import transformers
    except ImportError as exc:
        raise InvalidModel(
            "--hf-model needs the package `transformers` (the image's trainer extra); it is not installed"
        ) from exc
    return transformers


def text_config(config: Any) -> Any:
    """The language model's config (Qwen2-VL nests it as ``text_config``)."""
    inner = getattr(config, "text_config", None)
    return inner if inner is not None and getattr(inner, "hidden_size", None) else config


def is_vision_language(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def config_fields(config: Any) -> dict[str, tuple[str, Any]]:
    """The architecture fields of a Hugging Face config under the layout's names, each with the
    config.json field it came from (value None = absent)."""
    if getattr(config, "model_type", "") == "chatglm":
        heads = getattr(config, "num_attention_heads", None)
        mqa = bool(getattr(config, "multi_query_attention", False))
        groups = getattr(config, "multi_query_group_num", heads) if mqa else heads
        return {
            "layers": ("num_layers", getattr(config, "num_layers", None)),
            "hidden_size": ("hidden_size", getattr(config, "hidden_size", None)),
            "heads": ("num_attention_heads", heads),
            "kv_heads": ("multi_query_group_num", groups),
            "vocab_size": ("padded_vocab_size", getattr(config, "padded_vocab_size", None)),
            "ffn_hidden_size": ("ffn_hidden_size", getattr(config, "ffn_hidden_size", None)),
            "tied_embeddings": ("tie_word_embeddings", None),
            "max_positions": ("seq_length", getattr(config, "seq_length", None)),
        }
    cfg = text_config(config)
    nested = "text_config." if cfg is not config else ""
    heads = getattr(cfg, "num_attention_heads", None)
    tied = getattr(config, "tie_word_embeddings", getattr(cfg, "tie_word_embeddings", None))
    return {
        "layers": (f"{nested}num_hidden_layers", getattr(cfg, "num_hidden_layers", None)),
        "hidden_size": (f"{nested}hidden_size", getattr(cfg, "hidden_size", None)),
        "heads": (f"{nested}num_attention_heads", heads),
        "kv_heads": (f"{nested}num_key_value_heads", getattr(cfg, "num_key_value_heads", None) or heads),
        "vocab_size": (f"{nested}vocab_size", getattr(cfg, "vocab_size", None)),
        "ffn_hidden_size": (f"{nested}intermediate_size", getattr(cfg, "intermediate_size", None)),
        "tied_embeddings": ("tie_word_embeddings", None if tied is None else bool(tied)),
        "max_positions": (f"{nested}max_position_embeddings", getattr(cfg, "max_position_embeddings", None)),
    }


def config_mismatches(config: Any, arch: Architecture, sequence_length: int) -> list[str]:
    """Fields where the Hugging Face ``config`` and the layout's architecture disagree."""
    got = config_fields(config)
    out = []
    for key in (
        "layers",
        "hidden_size",
        "heads",
        "kv_heads",
        "vocab_size",
        "ffn_hidden_size",
        "tied_embeddings",
    ):
        theirs, value = got[key]
        if value is None and key in ("ffn_hidden_size", "tied_embeddings"):
            continue
        want = getattr(arch, key)
        if value != want:
            out.append(
                f"model.architecture.{key}={want!r} but the model's config.json has {theirs}={value!r}"
            )
    theirs, max_pos = got["max_positions"]
    if max_pos is not None and sequence_length > int(max_pos):
        out.append(f"training.sequence_length={sequence_length} exceeds the model's {theirs}={max_pos}")
    return out


def load_config(model_dir: str, layout: Layout, *, trust_remote_code: bool) -> Any:
    """The model's config, checked against the layout (ContractError naming every mismatch)."""
    transformers = _import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, ImportError) as exc:
        raise InvalidModel(f"--hf-model {model_dir}: cannot read its config: {exc}") from exc
    problems = config_mismatches(config, layout.architecture, layout.sequence_length)
    if problems:
        raise InvalidModel(
            f"--hf-model {model_dir} does not match the layout it was planned for: " + "; ".join(problems)
        )
    return config


def model_family(config: Any) -> str:
    """The capability table's family of a loaded config (LoRA module names)."""
    return "chatglm" if getattr(config, "model_type", "") == "chatglm" else "llama"


def _auto_class(transformers: Any, config: Any) -> Any:
    auto_map = getattr(config, "auto_map", None) or {}
    if auto_map and "AutoModelForCausalLM" not in auto_map and "AutoModel" in auto_map:
        return transformers.AutoModel  # ChatGLM-style remote code maps its LM class to AutoModel
    if is_vision_language(config):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def load_model(
    model_dir: str,
    config: Any,
    *,
    ds_config: dict[str, Any],
    zero_stage: int,
    quantize_4bit: bool,
    compute_dtype: Any,
    trust_remote_code: bool,
    attn_implementation: str | None = None,
) -> Any:
    """The pretrained model, fp32 (DeepSpeed applies the layout's precision) or 4-bit NF4 for
    QLoRA; partitioned at load under ZeRO-3 (``attn_implementation``: transformers' choice when
    None; sequence parallelism needs the one its attention wrapper replaced)."""
    import torch

    transformers = _import_transformers()
    kwargs: dict[str, Any] = {
        "config": config,
        "local_files_only": True,
        "trust_remote_code": trust_remote_code,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize_4bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,  # the planner's 4.127 bits per weight
            bnb_4bit_compute_dtype=compute_dtype,
            # Packed 4-bit weights stored as 16-bit elements: ZeRO-3 can partition and gather
            # them like any other 16-bit tensor (the DeepSpeed ZeRO-3 + QLoRA recipe).
            bnb_4bit_quant_storage=compute_dtype,
        )
        if zero_stage < 3:
            device = "cpu" if not torch.cuda.is_available() else torch.cuda.current_device()
            kwargs["device_map"] = {"": device}
        kwargs["dtype"] = compute_dtype
    else:
        kwargs["dtype"] = torch.float32
    if zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG.clear()
        _HF_DS_CONFIG.append(HfDeepSpeedConfig(ds_config))  # from_pretrained now runs in zero.Init
    try:
        model = _auto_class(transformers, config).from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"--hf-model {model_dir}: cannot load the weights: {exc}") from exc
    model.config.use_cache = False
    if quantize_4bit:
        keep_4bit_weights_trainable(model)
    return model


def keep_4bit_weights_trainable(model: Any) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference during a validation pass.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit`` converts its weight to a packed
    inference layout the first time it runs in eval mode without grad, and keeps it: the training
    step after the first validation then took the inference kernel, whose in-place bias add
    fails under autograd ("a view of a leaf Variable ... in-place operation"). Machines without
    the instruction set never convert, which is why this appeared on one machine only. Returns
    the number of layers changed."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def vision_tower(model: Any) -> Any:
    """The vision tower of a vision-language model (Qwen2-VL ``visual``), else None."""
    for path in ("visual", "model.visual", "base_model.model.visual"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def count_parameters(module: Any) -> int:
    """Parameters of the pretrained model (ZeRO-3 partitioned ones at their full size, a 4-bit
    weight at its unpacked size), tied tensors once, LoRA adapters left out."""
    seen: set[int] = set()
    total = 0
    for name, p in module.named_parameters(remove_duplicate=False):
        if "lora_" in name:
            continue
        state = getattr(p, "quant_state", None)
        if state is not None and id(p) not in seen:
            seen.add(id(p))
            total += int(state.shape.numel())
            continue
        if id(p) not in seen:
            seen.add(id(p))
            total += int(getattr(p, "ds_numel", 0) or p.numel())
    return total


def reads_packed_positions(config: Any) -> bool:
    """Whether the model keeps attention inside each sample of a packed row given position ids
    that restart per sample: transformers' own decoders (their causal-mask builder detects packed
    sequences from the position ids, on every attention backend). Remote code and Qwen2-VL's 3-D
    rope positions are not known to: they get no position ids."""
    return not getattr(config, "auto_map", None) and not is_vision_language(config)


#: Prefix of the wrapped model's keys in the engine's state dict (``CausalLMLoss.model``).
WRAPPED_PREFIX = "model."


def wrap_for_training(model: Any, shard: Any = None) -> Any:
    """``forward(ids, labels) -> mean loss``, the built-in model's interface (labels are already
    shifted by the data source, so the model's own shifting loss is not used). With a
    ``sequence_parallel.SequenceShard`` each rank runs its slice and returns its loss share."""
    import torch
    from torch import nn

    from shardwise_trainer.model import TPContext, lm_loss

    class CausalLMLoss(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.model = inner
            self._tp = TPContext(size=1, rank=0, group=None)
            self._shard = shard

        def forward(
            self, ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
        ) -> torch.Tensor:
            # Packed rows carry position ids restarting per sample: transformers then masks
            # attention to each sample (reads_packed_positions). Labels -100 are ignored.
            if self._shard is not None:
                ids, labels, position_ids = self._shard.slice(ids, labels, position_ids)
            extra = {} if position_ids is None else {"position_ids": position_ids}
            logits = self.model(input_ids=ids, use_cache=False, **extra).logits
            if self._shard is not None:
                return self._shard.loss_share(logits, labels)
            return lm_loss(logits, labels, self._tp)

    model.train()  # from_pretrained returns the model in eval mode
    return CausalLMLoss(model)
