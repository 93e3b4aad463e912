"""The seed examples' data path on tiny stand-ins of their families: ChatGLM3 (slow remote-code
tokenizer, its own chat template: masks by token-level prefix renders) and Qwen2-VL (chat
``messages`` and plain-text records), each a real LoRA run on records under torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import finetune_layouts as fl
import numpy as np
import pytest
from tests import tiny_models, tiny_remote_tokenizer
from trainer_runner import run_trainer

from shardwise_trainer import contract
from shardwise_trainer.data import chat, packing, records
from shardwise_trainer.data.packing import IGNORE

pytestmark = pytest.mark.trainer

TARGETS_ALL = ["q", "k", "v", "o", "gate", "up", "down"]
CONVERSATION = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is LoRA?"},
    {"role": "assistant", "content": "Low-rank adapters."},
    {"role": "user", "content": "And QLoRA?"},
    {"role": "assistant", "content": "Four bits."},
)


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.chatglm(tmp_path_factory.mktemp("glm") / "chatglm3", remote_tokenizer=True)


@pytest.fixture(scope="module")
def glm_tokenizer(glm_dir: Path) -> Any:
    return chat.load_tokenizer(str(glm_dir), trust_remote_code=True)


def test_the_chatglm3_stand_in_tokenizer_is_slow_remote_code_with_its_template(glm_tokenizer: Any) -> None:
    assert not glm_tokenizer.is_fast and type(glm_tokenizer).__name__ == "ChatGLMTokenizer"
    template, where = chat.resolve_template(glm_tokenizer, None)
    assert where == "model" and template == tiny_remote_tokenizer.CHATGLM3_TEMPLATE


def test_slow_tokenizer_masks_train_exactly_the_answers(glm_tokenizer: Any) -> None:
    template, _ = chat.resolve_template(glm_tokenizer, None)
    ex = records.Example(0, "chat.jsonl:1 (record 0)", messages=CONVERSATION)
    ((ids, mask),) = chat.encode_conversations(glm_tokenizer, template, [ex])
    # the whole conversation as ChatGLM3 renders it, prefix tokens and role tokens included
    assert glm_tokenizer.decode(ids) == (
        "[gMASK]sop<|system|>\n Be brief.<|user|>\n What is LoRA?<|assistant|>\n Low-rank adapters."
        "<|user|>\n And QLoRA?<|assistant|>\n Four bits."
    )
    trained = [glm_tokenizer.decode(ids[start:stop]) for start, stop in _runs(mask)]
    assert trained == ["\n Low-rank adapters.", "\n Four bits."]
    assert "<|assistant|>" not in "".join(trained)
    _, labels = packing.shift(ids, mask)
    assert ((labels != IGNORE) == mask[1:]).all() and (labels[mask[1:]] == ids[1:][mask[1:]]).all()


def test_slow_tokenizer_takes_the_default_template_and_batches(glm_tokenizer: Any) -> None:
    # a {% generation %} template with a slow tokenizer: token prefixes too (no offsets to use)
    exs = [records.Example(i, f"x:{i}", messages=CONVERSATION[1:3]) for i in range(3)]
    out = chat.encode_conversations(glm_tokenizer, chat.DEFAULT_CHAT_TEMPLATE, exs)
    assert len(out) == 3 and all((o[0] == out[0][0]).all() for o in out)
    ids, mask = out[0]
    # the prefix rule's span: the answer and what closes its turn (EOS and the newline)
    assert glm_tokenizer.decode(ids[mask]) == "Low-rank adapters.</s>\n"


def test_a_split_that_merges_across_the_prompt_boundary_is_refused(glm_tokenizer: Any) -> None:
    # no special token ends this prompt: " LoRA" is one piece, so "...L" + "oRA" cannot be cut
    merging = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} L{% endif %}"
    )
    ex = records.Example(
        3,
        "chat.jsonl:4 (record 3)",
        messages=({"role": "user", "content": "a"}, {"role": "assistant", "content": " LoRA"}),
    )
    with pytest.raises(contract.ContractError, match=r"chat.jsonl:4 \(record 3\): messages") as err:
        chat.encode_conversations(glm_tokenizer, merging, [ex])
    assert err.value.reason == contract.REASON_INVALID_DATASET


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _lora_run(
    tmp_path: Path, arch: dict[str, Any], model: Path, data: Path, *extra: str, zero: int = 2
) -> Any:
    layout = tmp_path / "layout.json"
    job = fl.manifest(arch, "lora", loraRank=4, loraTargets=TARGETS_ALL, sequenceLength=64)
    fl.plan_layout(layout, job, gpus=2, zero=zero, micro_batch=2)
    args = ("--hf-model", str(model), "--data", str(data), "--checkpoint-dir", str(tmp_path / "ckpt"), *extra)
    return run_trainer(layout, nproc=2, steps=6, args=args)


def test_chatglm3_stand_in_lora_trains_on_chat_records(glm_dir: Path, tmp_path: Path) -> None:
    data = tiny_models.write_jsonl(tmp_path / "chat.jsonl", tiny_models.chat_records(60))
    result = _lora_run(
        tmp_path,
        tiny_models.SPEC_ARCH["chatglm"],
        glm_dir,
        data,
        "--trust-remote-code",
        "--validation-fraction",
        "0.1",
    )
    (line,) = result.events["data"]
    assert line["format"] == "messages" and line["template"] == "model", line
    assert line["train"]["trained"] > 0 and line["train"]["samples"] + line["validation"]["samples"] == 60
    assert result.losses[6] < result.losses[1], result.losses
    assert [e["step"] for e in result.events["eval"]] == [6]


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.with_chat_template(tiny_models.qwen2_vl(tmp_path_factory.mktemp("qvl") / "qwen2-vl"))


QWEN2_VL_ARCH = {
    **tiny_models.SPEC_ARCH["llama"],
    "family": "qwen2",
    "qkvBias": True,
    "extraParameters": 71008,
}


@pytest.mark.parametrize(
    ("fmt", "docs"),
    [
        ("messages", tiny_models.chat_records(60)),
        ("text", [{"text": line} for line in tiny_models.CORPUS]),
    ],
)
def test_qwen2_vl_stand_in_lora_zero3_trains_on_records(
    qwen2_vl_dir: Path, tmp_path: Path, fmt: str, docs: list[dict[str, Any]]
) -> None:
    data = tiny_models.write_jsonl(tmp_path / "records.jsonl", docs)
    result = _lora_run(tmp_path, QWEN2_VL_ARCH, qwen2_vl_dir, data, zero=3)
    (line,) = result.events["data"]
    assert line["format"] == fmt and line["train"]["trained"] > 0, line
    assert result.losses[6] < result.losses[1], result.losses
