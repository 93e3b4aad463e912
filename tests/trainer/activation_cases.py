"""Saved-for-backward bytes per rank, measured on CPU, against the planner's activation term.

One tiny Llama-style shape (hidden 64, 4 heads, 2 kv heads, ffn 128, vocab 256, 2 layers), bf16,
sequence 128, micro-batch 2, run as the built-in model (checkpointing none / selective / full,
TP 1 and TP 2 on two gloo ranks) and as a Hugging Face ``LlamaForCausalLM`` (sdpa attention,
none / full: the pretrained path checkpoints whole layers). ``shardwise_trainer.saved_activations``
measures; the planner's pure functions (``shardwise.planner.activations``, runtime accounting)
predict. Used by tests/trainer/test_trainer_activations.py and benchmarks/activations.py.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from typing import Any

SEQ, MICRO = 128, 2
SHAPE: dict[str, Any] = {
    "family": "llama",
    "layers": 2,
    "hidden_size": 64,
    "heads": 4,
    "kv_heads": 2,
    "ffn_hidden_size": 128,
    "vocab_size": 256,
}


@dataclass(frozen=True)
class Case:
    model: str  # builtin | hf
    tp: int
    checkpointing: str
    rank: int
    measured_layer: int  # mean over the layers
    measured_output: int
    measured_total: int
    predicted_layer: int
    predicted_output: int
    predicted_total: int

    @property
    def name(self) -> str:
        return f"{self.model} tp{self.tp} rank{self.rank} ckpt={self.checkpointing}"

    def error(self, what: str) -> float:
        got, want = getattr(self, f"measured_{what}"), getattr(self, f"predicted_{what}")
        return (got - want) / want

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name}


def planner_arch() -> Any:
    from shardwise.planner.architecture import Architecture  # noqa: PLC0415

    return Architecture(**SHAPE, max_sequence_length=512)


def predicted(tp: int, checkpointing: str) -> tuple[int, int, int]:
    """(one layer, output, whole model) from the planner's pure functions (what memory.py sums
    for a single stage, before the transient recompute term)."""
    from shardwise.planner import activations as act  # noqa: PLC0415

    arch = planner_arch()
    layer = act.layer_activation_bytes(
        arch,
        SEQ,
        MICRO,
        tp=tp,
        checkpointing=checkpointing,
        accounting=act.RUNTIME,  # type: ignore[arg-type]
    )
    output = act.output_activation_bytes(
        arch, SEQ, MICRO, tp=tp, sequence_parallel=False, accounting=act.RUNTIME
    )
    embedding = act.embedding_activation_bytes(arch, SEQ, MICRO, tp, False)
    return round(layer), round(output), round(arch.layers * layer + output + embedding)


def _case(model: str, tp: int, ckpt: str, rank: int, regions: dict[str, int]) -> Case:
    layers = [v for k, v in regions.items() if k.startswith("layer")]
    p_layer, p_output, p_total = predicted(tp, ckpt)
    return Case(model, tp, ckpt, rank, round(sum(layers) / len(layers)), regions.get("output", 0),
                sum(regions.values()), p_layer, p_output, p_total)  # fmt: skip


def _ids() -> Any:
    import torch  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, SHAPE["vocab_size"], (MICRO, SEQ), generator=gen)


def builtin_cases(tp: int = 1, rank: int = 0, group: Any = None) -> list[Case]:
    import torch  # noqa: PLC0415

    from shardwise_trainer.contract import Architecture  # noqa: PLC0415
    from shardwise_trainer.model import SequentialLM, TPContext  # noqa: PLC0415
    from shardwise_trainer.saved_activations import measure  # noqa: PLC0415

    arch = Architecture(**SHAPE, mlp="swiglu", norm="rmsnorm", tied_embeddings=False, dropout=False,
                        position_embedding="rope", max_sequence_length=512, qkv_bias=False,
                        extra_parameters=0)  # fmt: skip
    out = []
    for ckpt in ("none", "selective", "full"):
        model = SequentialLM(arch, TPContext(tp, rank, group), 0, ckpt).to(torch.bfloat16).train()
        ids = _ids()
        regions = measure(model, model.layers, model.norm, lambda m=model, i=ids: m(i, i))
        out.append(_case("builtin", tp, ckpt, rank, regions))
    return out


def hf_cases() -> list[Case]:
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    from shardwise_trainer.saved_activations import measure  # noqa: PLC0415

    config = LlamaConfig(
        hidden_size=SHAPE["hidden_size"], intermediate_size=SHAPE["ffn_hidden_size"],
        num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"], vocab_size=SHAPE["vocab_size"],
        max_position_embeddings=512, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    out = []
    for ckpt in ("none", "full"):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
        model.train()
        if ckpt == "full":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = _ids()
        regions = measure(
            model, model.model.layers, model.model.norm, lambda m=model, i=ids: m(input_ids=i, labels=i).loss
        )
        out.append(_case("hf", 1, ckpt, 0, regions))
    return out


def _tp_worker(rank: int, world: int, port: int, queue: Any) -> None:
    import torch.distributed as dist  # noqa: PLC0415

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put([c.row() for c in builtin_cases(world, rank, dist.group.WORLD)])
    finally:
        dist.destroy_process_group()


def tp_cases(tp: int = 2) -> list[Case]:
    """The built-in model at TP ``tp`` on that many gloo ranks (every rank's figures)."""
    import torch.multiprocessing as mp  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tp_worker, args=(r, tp, port, queue)) for r in range(tp)]
    for p in procs:
        p.start()
    rows = [row for _ in procs for row in queue.get(timeout=300)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"TP worker exited {p.exitcode}"
    fields = {k for k in Case.__dataclass_fields__}
    return sorted((Case(**{k: v for k, v in r.items() if k in fields}) for r in rows), key=lambda c: c.name)


def all_cases() -> list[Case]:
    return [*builtin_cases(), *tp_cases(2), *hf_cases()]
