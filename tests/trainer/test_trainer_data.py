"""The trainer's record data (data/): formats, masks, packing, sharding, resume, cache, bad input.

Everything but the last test runs in-process on a tiny tokenizer trained offline
(tests/tiny_models.py); the bad-input tests run the CLI in a subprocess (exit 2, one line, the
termination message); one torchrun DP2 LoRA run on a chat ``messages`` file closes the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import finetune_layouts as fl
import numpy as np
import pytest
from tests import tiny_models
from trainer_runner import run_refused, run_trainer

from shardwise_trainer import contract
from shardwise_trainer.data import cache, chat, order, packing, records, source
from shardwise_trainer.data.packing import IGNORE, PackStats

pytestmark = pytest.mark.trainer

#: A ChatML template without {% generation %} markers: masks come from rendering prefixes.
CHATML = tiny_models.CHATML
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is LoRA?"},
    {"role": "assistant", "content": "Low-rank adapters."},
    {"role": "user", "content": "And QLoRA?"},
    {"role": "assistant", "content": "Four bits."},
]
TARGETS_ALL = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.llama(tmp_path_factory.mktemp("data-model") / "llama")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return chat.load_tokenizer(str(model_dir), trust_remote_code=False)


write_jsonl = tiny_models.write_jsonl


def opts(tmp_path: Path, model_dir: Path, data: Path, **kw: Any) -> source.DataOptions:
    base: dict[str, Any] = {
        "data_file": str(data),
        "data_format": "auto",
        "packing": "pack",
        "sequence_length": 64,
        "seed": 1,
        "model_dir": str(model_dir),
        "trust_remote_code": False,
        "cache_dir": str(tmp_path / "cache"),
    }
    return source.DataOptions(**{**base, **kw})


# --- formats ---------------------------------------------------------------------------------------

ALPACA = {"system": "Be brief.", "instruction": "Add", "input": "2 3", "output": "5"}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
MESSAGES = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def _write(path: Path, docs: list[dict[str, Any]]) -> Path:
    if path.suffix == ".jsonl":
        return write_jsonl(path, docs)
    if path.suffix == ".json":
        path.write_text(json.dumps(docs, indent=2))
        return path
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    pq.write_table(pa.Table.from_pylist(docs), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize(
    ("doc", "fmt", "messages"),
    [
        (
            ALPACA,
            "alpaca",
            [("system", "Be brief."), ("user", "Add\n\n2 3"), ("assistant", "5")],
        ),
        (SHAREGPT, "sharegpt", [("user", "Hi"), ("assistant", "Hello")]),
        (MESSAGES, "messages", [("user", "Hi"), ("assistant", "Hello")]),
        ({"text": "plain words"}, "text", None),
    ],
)
def test_each_format_parses_in_each_file_kind(
    tmp_path: Path, suffix: str, doc: dict[str, Any], fmt: str, messages: list[tuple[str, str]] | None
) -> None:
    path = _write(tmp_path / f"data{suffix}", [doc, doc])
    assert records.resolve_format(path, "auto") == fmt
    examples = list(records.read_examples(path, fmt))
    assert [e.record for e in examples] == [0, 1]
    if messages is None:
        assert examples[0].text == "plain words"
    else:
        assert [(m["role"], m["content"]) for m in examples[0].messages] == messages


def test_a_text_file_is_documents_separated_by_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nstill first\n\n\nsecond\n")
    assert records.resolve_format(path, "auto") == "text"
    docs = list(records.read_examples(path, "text"))
    assert [d.text for d in docs] == ["first line\nstill first", "second"]
    assert docs[1].where == f"{path}:5 (record 1)"


def test_other_extensions_stay_token_files(tmp_path: Path) -> None:
    assert records.resolve_format(tmp_path / "tokens.bin", "auto") == "tokens"


# --- masks ---------------------------------------------------------------------------------------


def _trained_text(tokenizer: Any, ids: np.ndarray, mask: np.ndarray) -> str:
    return str(tokenizer.decode(ids[mask]))


def test_default_template_trains_only_the_answers_and_their_eos(tokenizer: Any) -> None:
    template, where = chat.resolve_template(tokenizer, None)
    assert where == "default" and tokenizer.chat_template is None
    ex = records.Example(0, "x", messages=tuple(CONVERSATION))
    ((ids, mask),) = chat.encode_conversations(tokenizer, template, [ex])
    assert tokenizer.decode(ids) == (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nWhat is LoRA?</s>\n<|assistant|>\nLow-rank adapters.</s>\n"
        "<|user|>\nAnd QLoRA?</s>\n<|assistant|>\nFour bits.</s>\n"
    )
    assert _trained_text(tokenizer, ids, mask) == "Low-rank adapters.</s>Four bits.</s>"
    # the labels (shifted) are -100 exactly where the mask is off
    _, labels = packing.shift(ids, mask)
    assert ((labels != IGNORE) == mask[1:]).all() and (labels[mask[1:]] == ids[1:][mask[1:]]).all()


def test_a_template_without_generation_markers_is_split_by_prefixes(tokenizer: Any) -> None:
    ex = records.Example(0, "x", messages=tuple(CONVERSATION))
    ((ids, mask),) = chat.encode_conversations(tokenizer, CHATML, [ex])
    assert _trained_text(tokenizer, ids, mask) == "Low-rank adapters.<|im_end|>\nFour bits.<|im_end|>\n"


def test_the_models_own_template_is_used(tmp_path: Path, model_dir: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    for item in model_dir.iterdir():
        (own / item.name).write_bytes(item.read_bytes())
    config = json.loads((own / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (own / "tokenizer_config.json").write_text(json.dumps(config))
    tok = chat.load_tokenizer(str(own), trust_remote_code=False)
    template, where = chat.resolve_template(tok, None)
    assert where == "model" and template == CHATML


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer: Any) -> None:
    # drops the answer of every turn but the last: prefixes do not line up
    rewriting = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    ex = records.Example(0, "d.jsonl:1 (record 0)", messages=tuple(CONVERSATION))
    with pytest.raises(contract.ContractError, match=r"d.jsonl:1 \(record 0\): messages\[2\]: .*generation"):
        chat.encode_conversations(tokenizer, rewriting, [ex])


def test_text_documents_train_every_token_and_end_in_eos(tokenizer: Any) -> None:
    ((ids, mask),) = chat.encode_documents(tokenizer, [records.Example(0, "x", text="LoRA adapts.")])
    assert mask.all() and int(ids[-1]) == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == "LoRA adapts.</s>"


# --- packing and truncation ------------------------------------------------------------------------


def _sample(n: int, trained_from: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(10, 10 + n, dtype=np.int32)
    mask = np.arange(n) >= trained_from
    return ids, mask


def test_packing_lays_whole_samples_with_positions_restarting() -> None:
    stats = PackStats()
    pieces = [p for n in (4, 3, 5) for p in packing.fit(*_sample(n, 2), 8, split=False, stats=stats)]
    rows = packing.build_rows(pieces, 8, "pack", pad_id=0, stats=stats)
    # samples of 3, 2 and 4 positions: the first two share row 0, the third does not fit there
    assert len(rows) == 2
    assert rows.positions[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert rows.ids[0].tolist() == [10, 11, 12, 10, 11, 0, 0, 0]
    assert rows.labels[0].tolist() == [IGNORE, 12, 13, IGNORE, 12, IGNORE, IGNORE, IGNORE]
    assert rows.positions[1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert rows.labels[1].tolist() == [IGNORE, 12, 13, 14, IGNORE, IGNORE, IGNORE, IGNORE]
    assert stats.samples == 3 and stats.trained == 2 + 1 + 3


def test_pad_policy_puts_one_sample_per_row() -> None:
    stats = PackStats()
    pieces = [p for n in (4, 3) for p in packing.fit(*_sample(n, 1), 8, split=False, stats=stats)]
    rows = packing.build_rows(pieces, 8, "pad", pad_id=2, stats=stats)
    assert len(rows) == 2
    assert rows.ids[1].tolist() == [10, 11, 2, 2, 2, 2, 2, 2]
    assert rows.labels[1].tolist() == [11, 12] + [IGNORE] * 6
    assert rows.positions[1].tolist() == list(range(8))


def test_long_conversations_are_cut_long_documents_split() -> None:
    stats = PackStats()
    cut = packing.fit(*_sample(20, 3), 8, split=False, stats=stats)
    assert len(cut) == 1 and cut[0][0].tolist() == list(range(10, 18)) and stats.truncated == 1
    windows = packing.fit(*_sample(20, 0), 8, split=True, stats=stats)
    assert [len(w[0]) for w in windows] == [8, 8, 3]  # 19 positions, every token predicted once
    assert np.concatenate([w[1] for w in windows]).tolist() == list(range(11, 30))
    # an answer that lies entirely past the cut leaves nothing to train: dropped
    assert packing.fit(*_sample(20, 15), 8, split=False, stats=stats) == [] and stats.dropped == 1


def test_packed_position_ids_keep_attention_inside_each_sample(model_dir: Path) -> None:
    """The documented packing claim, on the real model: the second sample of a packed row gets
    the logits it gets alone (position ids restart per sample, no attention mask, no cache: what
    CausalLMLoss passes)."""
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    from shardwise_trainer import pretrained  # noqa: PLC0415

    assert pretrained.reads_packed_positions(AutoConfig.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    first, second = torch.arange(5, 12), torch.arange(40, 46)
    ids = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(7), torch.arange(6)])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 7:]
        alone = model(input_ids=second[None], use_cache=False).logits[0]
        leaky = model(input_ids=ids, use_cache=False).logits[0, 7:]  # without position ids the samples mix
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)


# --- sharding and resume -----------------------------------------------------------------------------


def test_dp_ranks_see_disjoint_rows_whose_union_is_the_epoch() -> None:
    rows, dp, micro, accum, seed = 48, 2, 3, 2, 5
    global_batch = dp * micro * accum
    seen: dict[int, list[int]] = {0: [], 1: []}
    for step in range(rows // global_batch):
        for rank in range(dp):
            for m in range(accum):
                seen[rank] += order.micro_batch_rows(
                    step=step, micro=m, dp_rank=rank, dp=dp, micro_batch=micro,
                    global_batch=global_batch, rows=rows, seed=seed,
                )  # fmt: skip
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(rows))
    assert seen[0] != sorted(seen[0])  # shuffled, not file order


def _positions(steps: range, *, rows: int, dp: int) -> list[list[int]]:
    return [
        order.micro_batch_rows(
            step=s, micro=0, dp_rank=r, dp=dp, micro_batch=2, global_batch=2 * dp, rows=rows, seed=9
        )
        for s in steps
        for r in range(dp)
    ]


def test_a_restart_at_step_k_continues_with_the_uninterrupted_rows() -> None:
    uninterrupted = _positions(range(0, 40), rows=30, dp=2)  # crosses epochs (30 rows, 4 per step)
    order.epoch_permutation.cache_clear()  # a new process: nothing remembered but the step
    resumed = _positions(range(17, 40), rows=30, dp=2)
    assert resumed == uninterrupted[17 * 2 :]
    # the second epoch is a new order of the same rows
    flat = [r for batch in uninterrupted for r in batch]
    assert sorted(flat[:30]) == sorted(flat[30:60]) == list(range(30)) and flat[:30] != flat[30:60]


def test_record_source_batches_follow_the_order(tmp_path: Path) -> None:
    ids = np.arange(10 * 4, dtype=np.int32).reshape(10, 4)
    rows = packing.Rows(ids, ids + 1000, np.tile(np.arange(4, dtype=np.int32), (10, 1)))
    src = source.RecordSource(rows, seed=3, with_positions=True)
    ids_t, labels_t, pos_t = src.micro_batch(step=2, micro=1, dp_rank=1, dp=2, micro_batch=2, global_batch=8)
    picks = order.micro_batch_rows(
        step=2, micro=1, dp_rank=1, dp=2, micro_batch=2, global_batch=8, rows=10, seed=3
    )
    assert ids_t.tolist() == ids[picks].tolist() and labels_t.tolist() == (ids[picks] + 1000).tolist()
    assert pos_t.shape == (2, 4)
    batches = list(src.eval_batches(rows, dp_rank=1, dp=2, micro_batch=2, device="cpu"))
    assert len(batches) == 3  # ceil(10 / 4) on every rank; the last one has one filler row
    assert batches[-1][1][1].tolist() == [IGNORE] * 4


# --- cache --------------------------------------------------------------------------------------------


def test_the_cache_is_reused_and_the_tokenizer_not_loaded(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [MESSAGES] * 20)
    first = source.prepare(opts(tmp_path, model_dir, data, validation_fraction=0.1), builder=True)
    assert not first.cached and len(first.train) >= 1 and first.validation is not None
    assert first.meta["validation"]["samples"] == 2 and first.meta["train"]["samples"] == 18

    def boom(*_: Any, **__: Any) -> Any:
        raise AssertionError("the tokenizer was loaded on a cache hit")

    monkeypatch.setattr(chat, "load_tokenizer", boom)
    again = source.prepare(opts(tmp_path, model_dir, data, validation_fraction=0.1), builder=True)
    assert again.cached and (np.asarray(again.train.ids) == first.train.ids).all()
    # a waiting (non-builder) rank reads the same entry
    waiter = source.prepare(opts(tmp_path, model_dir, data, validation_fraction=0.1), builder=False)
    assert (np.asarray(waiter.train.labels) == first.train.labels).all()
    # another sequence length is another entry
    with pytest.raises(AssertionError, match="tokenizer was loaded"):
        source.prepare(opts(tmp_path, model_dir, data, sequence_length=32), builder=True)


def test_a_failed_build_fails_the_waiting_ranks_with_the_same_message(
    tmp_path: Path, model_dir: Path
) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [MESSAGES, {"messages": [{"role": "user"}]}])
    o = opts(tmp_path, model_dir, data)
    with pytest.raises(contract.ContractError) as built:
        source.prepare(o, builder=True)
    with pytest.raises(contract.ContractError) as waited:
        source.prepare(o, builder=False)
    assert str(built.value) == str(waited.value) == f"{data}:2 (record 1): messages[0]: content: missing"
    assert waited.value.reason == contract.REASON_INVALID_DATASET
    assert not list(Path(o.cache_dir).glob(cache.cache_key(source.key_parts(o))))


# --- bad input: exit 2, one line naming file:line:field, reason InvalidDataset --------------------------


@pytest.fixture(scope="module")
def lora_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data-bad") / "lora.json"
    job = fl.manifest(
        tiny_models.SPEC_ARCH["llama"], "lora", loraRank=4, loraTargets=TARGETS_ALL, sequenceLength=64
    )
    fl.plan_layout(path, job, gpus=1, zero=0, micro_batch=2)
    return path


def _bad(layout: Path, tmp_path: Path, *args: str) -> tuple[int, str, str, Path]:
    """run_refused with an output and a cache directory of the test's own; also returns the output."""
    out = tmp_path / "out"
    extra = ["--output-dir", str(out)] if "--hf-model" in args else []
    code, line, message = run_refused(
        layout, tmp_path, *args, *extra, "--data-cache-dir", str(tmp_path / "cache")
    )
    return code, line, message, out


BAD_CASES = {
    "missing-field": (
        [MESSAGES, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}],
        ".jsonl",
        ":2 (record 1): messages[1]: content: missing",
    ),
    "bad-role": (
        [{"conversations": [{"from": "robot", "value": "x"}]}],
        ".jsonl",
        ":1 (record 0): conversations[0].from: 'robot' is not one of",
    ),
    "alpaca-no-output": ([ALPACA, ALPACA, {"instruction": "x"}], ".json", ":14 (record 2): output: missing"),
    "not-json": (json.dumps(MESSAGES) + '\n{"messages": [\n', ".jsonl", ":2 (record 1): not JSON"),
    "not-parquet": ("PAR1 garbage", ".parquet", ": not a readable parquet file"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_a_bad_record_exits_2_naming_file_line_field(
    lora_layout: Path, model_dir: Path, tmp_path: Path, case: str
) -> None:
    content, suffix, expected = BAD_CASES[case]
    data = tmp_path / f"data{suffix}"
    if isinstance(content, str):
        data.write_text(content)
    else:
        _write(data, content)
    fmt = ["--data-format", "sharegpt"] if case == "bad-role" else []
    code, line, message, out = _bad(
        lora_layout, tmp_path, "--hf-model", str(model_dir), "--data", str(data), *fmt
    )
    assert code == 2 and f"{data}{expected}" in line, line
    assert "shardwise.dev/exit-code=2" in message and "shardwise.dev/reason=InvalidDataset" in message
    assert not out.exists()  # nothing half-written in the output dir


def test_unknown_format_missing_file_and_no_model_exit_2(
    lora_layout: Path, model_dir: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [MESSAGES])
    code, line, message, _ = _bad(lora_layout, tmp_path, "--hf-model", str(model_dir), "--data", str(data),
                                  "--data-format", "csv")  # fmt: skip
    assert code == 2 and "--data-format 'csv'" in line and "reason=InvalidDataset" in message
    code, line, _, _ = _bad(
        lora_layout, tmp_path, "--hf-model", str(model_dir), "--data", str(tmp_path / "nope.jsonl")
    )
    assert code == 2 and "nope.jsonl: no such file" in line
    full = tmp_path / "full.json"
    job = fl.manifest(tiny_models.SPEC_ARCH["llama"], "full", sequenceLength=64)
    fl.plan_layout(full, job, gpus=1, zero=0, micro_batch=2)
    code, line, message, _ = _bad(full, tmp_path, "--data", str(data))
    assert code == 2 and "messages records" in line and "give --hf-model DIR" in line
    assert "reason=InvalidDataset" in message


def test_no_template_and_no_eos_exits_2(lora_layout: Path, model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for item in model_dir.iterdir():
        (bare / item.name).write_bytes(item.read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = bare / name
        if path.exists():
            doc = json.loads(path.read_text())
            doc.pop("eos_token", None)
            path.write_text(json.dumps(doc))
    data = write_jsonl(tmp_path / "chat.jsonl", [MESSAGES])
    code, line, message, _ = _bad(lora_layout, tmp_path, "--hf-model", str(bare), "--data", str(data))
    assert code == 2 and "no chat template and no EOS token" in line and "reason=InvalidDataset" in message


# --- one real run: DP2 LoRA on chat messages, the loss falls, a validation loss is emitted ---------------


def test_dp2_lora_on_chat_messages_trains_reports_validation_loss_and_resumes(
    model_dir: Path, tmp_path: Path
) -> None:
    layout = tmp_path / "lora-dp2.json"
    job = fl.manifest(
        tiny_models.SPEC_ARCH["llama"], "lora", loraRank=4, loraTargets=TARGETS_ALL, sequenceLength=64
    )
    fl.plan_layout(layout, job, gpus=2, zero=2, micro_batch=2)
    data = write_jsonl(tmp_path / "chat.jsonl", tiny_models.chat_records(200))
    stats = tmp_path / "stats"
    args = (
        "--hf-model", str(model_dir), "--data", str(data), "--validation-fraction", "0.1",
        "--eval-every", "4", "--stats-dir", str(stats), "--checkpoint-dir", str(tmp_path / "ckpt"),
    )  # fmt: skip
    result = run_trainer(layout, nproc=2, steps=8, args=args)
    (data_line,) = result.events["data"]
    assert (
        data_line["format"] == "messages" and data_line["template"] == "default" and not data_line["cached"]
    )
    assert data_line["train"]["samples"] + data_line["validation"]["samples"] == 200
    # tokenized once for both ranks (rank 1 waited for the entry), next to the checkpoints
    assert result.stderr.count("tokenized data: saved to") == 1
    assert (tmp_path / "ckpt" / "data-cache").is_dir()
    losses = result.losses
    assert losses[8] < losses[1], losses
    evals = result.events["eval"]
    assert [e["step"] for e in evals] == [4, 8] and evals[1]["loss"] < evals[0]["loss"]
    for rank in (0, 1):
        rank_stats = json.loads((stats / f"rank-{rank}.json").read_text())
        assert rank_stats["validation_loss"] == pytest.approx(evals[1]["loss"])

    # a restart resumes at step 8 from the checkpoint and reads the cache: no tokenization
    resumed = run_trainer(layout, nproc=2, steps=10, args=args)
    assert resumed.done["resumed_from"] == 8 and resumed.events["data"][0]["cached"]
    assert "tokenized data: cached in" in resumed.stderr and "tokenized data: saved" not in resumed.stderr
    assert sorted(resumed.losses) == [9, 10] and [e["step"] for e in resumed.events["eval"]] == [10]
