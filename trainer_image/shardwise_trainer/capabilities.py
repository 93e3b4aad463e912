"""What this trainer runs: the one capability table the planner and the operator's admission consult.

Standard library only. The operator keeps a byte-identical copy in
``operator/shardwise/planner/capabilities.py`` (it never imports the trainer); a unit test holds
the two files equal, and another checks that every layout the planner can return is a row here.

A row says which layouts of a (method, model source) pair run. ``model`` is ``builtin`` (the
trainer's own randomly initialised decoder, any TP / PP) or ``pretrained`` (a Hugging Face model
directory: ``--hf-model DIR``). Anything not in the table is refused with :func:`refusal`'s reason
before a pod starts: by the planner (the layout is never chosen), at admission (``Planned=False``,
reason ``UnsupportedByRuntime``) and by the trainer itself (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

BUILTIN: Final = "builtin"
PRETRAINED: Final = "pretrained"
MODEL_SOURCES: Final = (BUILTIN, PRETRAINED)

#: Methods that need pretrained weights: adapting, freezing or serving a random model is meaningless.
PRETRAINED_ONLY_METHODS: Final = ("lora", "qlora", "freeze", "inference")


@dataclass(frozen=True)
class Capability:
    """One runnable family of layouts; ``max_tp`` / ``max_pp`` 0 = any degree."""

    method: str
    model: str
    max_tp: int
    max_pp: int
    sequence_parallel: bool
    zero_stages: tuple[int, ...]
    #: ZeRO stages allowed together with pipeline parallelism (DeepSpeed's pipeline engine: 0, 1).
    pipeline_zero_stages: tuple[int, ...]
    #: Offload kinds; DeepSpeed's own rules apply on top (optimizer from ZeRO 1, all = ZeRO 3).
    offloads: tuple[str, ...]
    #: Why the rest is not here (quoted in refusals).
    limits: str
    #: Largest expert-parallel degree (mixture-of-experts models); 1 = experts are not sharded.
    max_ep: int = 1
    #: With tp > 1: the ZeRO stages, offloads and model families (empty: any) that run.
    tensor_zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    tensor_offloads: tuple[str, ...] = ("none", "optimizer", "all")
    tensor_families: tuple[str, ...] = ()
    #: With tp > 1: whether a model with a vision tower (extra parameters, e.g. Qwen2-VL) runs.
    tensor_vision_tower: bool = True
    #: Largest Ulysses sequence-parallel degree (attention heads split by all-to-all; 0 = any),
    #: and with sp > 1 the ZeRO stages, offloads and model families (empty: any) that run.
    max_sp: int = 1
    sequence_zero_stages: tuple[int, ...] = (1, 2, 3)
    sequence_offloads: tuple[str, ...] = ("none",)
    sequence_families: tuple[str, ...] = ()


TABLE: Final[tuple[Capability, ...]] = (
    Capability(
        "full",
        BUILTIN,
        max_tp=0,
        max_pp=0,
        sequence_parallel=False,
        zero_stages=(0, 1, 2, 3),
        pipeline_zero_stages=(0, 1),
        offloads=("none", "optimizer", "all"),
        limits="tensor parallelism runs without sequence parallelism; offload needs pp=1",
    ),
    Capability(
        "full",
        PRETRAINED,
        max_tp=0,
        max_pp=1,
        sequence_parallel=False,
        zero_stages=(0, 1, 2, 3),
        pipeline_zero_stages=(),
        offloads=("none", "optimizer", "all"),
        limits=(
            "a pretrained model runs data parallel (ZeRO 0-3) with pp=1, tensor parallel "
            "(DeepSpeed AutoTP) with ZeRO 0-2, no offload, text-only Llama / Mistral / Qwen2 models, "
            "and Ulysses sequence parallel with tp=1, ZeRO 1-3, no offload, text-only Llama / Mistral / "
            "Qwen2 models"
        ),
        tensor_zero_stages=(0, 1, 2),
        tensor_offloads=("none",),
        tensor_families=("llama", "mistral", "qwen2"),
        # AutoTP would shard a vision tower's linears too; not run or tested (Qwen2-VL is qwen2).
        tensor_vision_tower=False,
        max_sp=0,
        sequence_families=("llama", "mistral", "qwen2"),
    ),
    Capability(
        "lora",
        PRETRAINED,
        max_tp=1,
        max_pp=1,
        sequence_parallel=False,
        zero_stages=(0, 1, 2, 3),
        pipeline_zero_stages=(),
        offloads=("none", "optimizer", "all"),
        limits=(
            "LoRA runs data parallel (ZeRO 0-3) with tp=1, pp=1, and Ulysses sequence parallel with "
            "ZeRO 1-3, no offload, text-only Llama / Mistral / Qwen2 models"
        ),
        max_sp=0,
        sequence_families=("llama", "mistral", "qwen2"),
    ),
    Capability(
        "qlora",
        PRETRAINED,
        max_tp=1,
        max_pp=1,
        sequence_parallel=False,
        zero_stages=(0, 1, 2, 3),
        pipeline_zero_stages=(),
        offloads=("none", "optimizer"),
        limits="QLoRA runs data parallel (ZeRO 0-3) with tp=1, pp=1, no parameter offload",
    ),
    # inference: no row yet. The planner models it (weights + KV cache); the trainer has no
    # forward-only run, so a job asking for it is refused at admission (UnsupportedByRuntime).
    Capability(
        "freeze",
        PRETRAINED,
        max_tp=1,
        max_pp=1,
        sequence_parallel=False,
        zero_stages=(0, 1, 2, 3),
        pipeline_zero_stages=(),
        offloads=("none", "optimizer", "all"),
        limits="freeze runs data parallel (ZeRO 0-3) with tp=1, pp=1",
    ),
)

#: Planner LoRA target names -> the Hugging Face module they adapt, per model family. Targets
#: mapped to one module (ChatGLM's fused ``query_key_value`` and ``dense_h_to_4h``) are adapted as
#: one matrix and must be named together.
LORA_MODULES: Final[dict[str, dict[str, str]]] = {
    "llama": {
        "q": "q_proj",
        "k": "k_proj",
        "v": "v_proj",
        "o": "o_proj",
        "gate": "gate_proj",
        "up": "up_proj",
        "down": "down_proj",
    },
    "chatglm": {
        "q": "query_key_value",
        "k": "query_key_value",
        "v": "query_key_value",
        "o": "dense",
        "gate": "dense_h_to_4h",
        "up": "dense_h_to_4h",
        "down": "dense_4h_to_h",
    },
}
#: Families whose decoder layers use the Llama module names.
LORA_FAMILY_ALIASES: Final[dict[str, str]] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "custom": "llama",
    "chatglm": "chatglm",
}


def lora_modules(family: str, targets: tuple[str, ...] | list[str]) -> tuple[str, ...] | str:
    """The module names LoRA adapts for planner ``targets`` in a ``family``, in first-seen order;
    a string (the reason) when a target cannot be adapted as named."""
    table_name = LORA_FAMILY_ALIASES.get(family)
    if table_name is None:
        known = ", ".join(sorted(LORA_FAMILY_ALIASES))
        return f"LoRA is not mapped for model family {family!r} (families: {known})"
    table = LORA_MODULES[table_name]
    out: list[str] = []
    for target in targets:
        if target not in table:
            return f"unknown LoRA target {target!r} for family {family} (one of {', '.join(table)})"
        module = table[target]
        group = [t for t, m in table.items() if m == module]
        missing = [t for t in group if t not in targets]
        if missing:
            return (
                f"LoRA target {target!r} is part of the fused {module} matrix in family {family}: "
                f"name {', '.join(group)} together"
            )
        if module not in out:
            out.append(module)
    return tuple(out)


def model_source_for(method: str, pretrained: bool | None = None) -> str:
    """The model source a job uses: pretrained when it says so or when its method needs one."""
    if pretrained or method in PRETRAINED_ONLY_METHODS:
        return PRETRAINED
    return BUILTIN


def rows(method: str, model: str) -> tuple[Capability, ...]:
    """The table's rows for a method and model source (empty: it does not run at all)."""
    return tuple(c for c in TABLE if c.method == method and c.model == model)


def refusal(
    *,
    method: str,
    model: str,
    tp: int,
    pp: int,
    sequence_parallel: bool,
    zero_stage: int,
    offload: str,
    expert: int = 1,
    family: str | None = None,
    vision_tower: bool = False,
    sp: int = 1,
) -> str | None:
    """None when the trainer runs this layout, else one sentence naming the limit (``family`` and
    ``vision_tower``: what decides whether a pretrained model runs tensor or sequence parallel;
    ``sp``: the Ulysses sequence-parallel degree)."""
    candidates = rows(method, model)
    if not candidates:
        runnable = sorted({f"{c.method} ({c.model})" for c in TABLE})
        if method in PRETRAINED_ONLY_METHODS and model == BUILTIN:
            return (
                f"the trainer cannot run method {method} on its built-in model: it needs a pretrained "
                "model (a Hugging Face model directory)"
            )
        return (
            f"the trainer cannot run method {method} with a {model} model yet (it runs {', '.join(runnable)})"
        )
    reasons: list[str] = []
    for c in candidates:
        if c.max_tp and tp > c.max_tp:
            reasons.append(f"tp={tp}: {c.limits}")
        elif c.max_pp and pp > c.max_pp:
            reasons.append(f"pp={pp}: {c.limits}")
        elif sequence_parallel and not c.sequence_parallel:
            reasons.append(f"sequence parallelism is not run: {c.limits}")
        elif zero_stage not in c.zero_stages:
            reasons.append(f"ZeRO stage {zero_stage}: {c.limits}")
        elif pp > 1 and zero_stage not in c.pipeline_zero_stages:
            reasons.append(f"ZeRO stage {zero_stage} with pp={pp}: DeepSpeed's pipeline engine runs ZeRO 0-1")
        elif tp > 1 and zero_stage not in c.tensor_zero_stages:
            reasons.append(f"ZeRO stage {zero_stage} with tp={tp}: {c.limits}")
        elif tp > 1 and offload not in c.tensor_offloads:
            reasons.append(f"offload={offload} with tp={tp}: {c.limits}")
        elif tp > 1 and c.tensor_families and family not in c.tensor_families:
            reasons.append(f"tp={tp} for model family {family}: {c.limits}")
        elif tp > 1 and vision_tower and not c.tensor_vision_tower:
            reasons.append(f"tp={tp} for a model with a vision tower: {c.limits}")
        elif offload not in c.offloads:
            reasons.append(f"offload={offload}: {c.limits}")
        elif offload != "none" and pp > 1:
            reasons.append(f"offload={offload} with pp={pp}: {c.limits}")
        elif sp > 1 and c.max_sp != 0 and sp > c.max_sp:
            reasons.append(
                f"sp={sp}: Ulysses sequence parallelism runs for full and LoRA fine-tuning of a "
                "pretrained model only"
            )
        elif sp > 1 and (tp > 1 or pp > 1):
            reasons.append(
                f"sp={sp} with tp={tp}, pp={pp}: Ulysses sequence parallelism runs with tp=1, pp=1"
            )
        elif sp > 1 and zero_stage not in c.sequence_zero_stages:
            reasons.append(f"ZeRO stage {zero_stage} with sp={sp}: {c.limits}")
        elif sp > 1 and offload not in c.sequence_offloads:
            reasons.append(f"offload={offload} with sp={sp}: {c.limits}")
        elif sp > 1 and c.sequence_families and family not in c.sequence_families:
            reasons.append(f"sp={sp} for model family {family}: {c.limits}")
        elif sp > 1 and vision_tower:
            reasons.append(f"sp={sp} for a model with a vision tower: {c.limits}")
        elif expert > c.max_ep:
            reasons.append(
                f"expert={expert}: expert parallelism is not run yet (every rank holds all experts; "
                "plan with expert 1)"
            )
        else:
            return None
    return f"the trainer cannot run method {method} ({model} model) with " + "; ".join(reasons)


#: What resuming a checkpoint at another layout cannot change: its method (a checkpoint of
#: another method holds other parameters). DP size and ZeRO stage convert always; TP size
#: without pipeline parallelism and pipeline depth without tensor parallelism, one of the two
#: at a time (DeepSpeed's universal conversion merges TP slices by the model's saved slicing
#: patterns; pipeline stages map to the plain model's parameter names, which no partition moves).
RESUME_FIXED: Final[tuple[str, ...]] = ("method",)


def resume_held(tp: int, pp: int) -> tuple[tuple[int | None, int | None], ...]:
    """The (TP, PP) pins (None: any) a layout must match to resume a checkpoint written at
    (tp, pp), as alternatives in order of preference: keep PP and change TP (PP1), else keep TP
    and change PP (TP1), else keep both."""
    options: list[tuple[int | None, int | None]] = []
    if pp == 1:
        options.append((None, 1))
    if tp == 1:
        options.append((1, None))
    return tuple(options) or ((tp, pp),)


def resume_refusal(saved: dict[str, object], current: dict[str, object]) -> str | None:
    """Why a checkpoint written at the ``saved`` layout cannot resume at ``current`` (None: it can,
    converting when the sharding differs). Layouts are dicts with tp, pp and method keys."""
    changed: list[str] = [k for k in RESUME_FIXED if k in saved and saved.get(k) != current.get(k)]
    tp = (saved.get("tp", 1), current.get("tp", 1))
    pp = (saved.get("pp", 1), current.get("pp", 1))
    if tp[0] != tp[1] and pp != (1, 1):
        changed.insert(0, "tp")
    if pp[0] != pp[1] and tp != (1, 1):
        changed.insert(0 if "tp" not in changed else 1, "pp")
    sp = (saved.get("sp", 1), current.get("sp", 1))
    if sp[0] != sp[1] or sp[0] != 1:
        # DeepSpeed saves an SP run's ranks as model-parallel ranks: no conversion reads them yet.
        moved = [k for k in ("sp", "dp", "zero_stage") if saved.get(k, 1) != current.get(k, 1)]
        if moved:
            changes = ", ".join(f"{k} {saved.get(k, 1)} -> {current.get(k, 1)}" for k in moved)
            return (
                f"the latest checkpoint was written at another layout ({changes}) and a checkpoint "
                "written with or resumed into Ulysses sequence parallelism resumes only at its own SP "
                "size, DP size and ZeRO stage; resume at those, or move the checkpoint directory away "
                "to start at step 0"
            )
    if not changed:
        return None
    changes = ", ".join(f"{k} {saved.get(k, 1)} -> {current.get(k, 1)}" for k in changed)
    return (
        f"the latest checkpoint was written at another layout ({changes}) and the trainer converts "
        "checkpoints across DP size, ZeRO stage, TP size without pipeline parallelism and pipeline "
        "depth without tensor parallelism only; resume at a layout that changes at most one of TP "
        "and PP, with the other 1, and the same method, or move the checkpoint directory away to "
        "start at step 0"
    )
