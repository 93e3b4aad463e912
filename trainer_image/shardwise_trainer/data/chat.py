"""Conversations and documents to token ids and a "trained" mask, by the model's tokenizer and template.

Only assistant turns are trained: a token is trained when its characters lie in an assistant
span of the rendered conversation. The spans come from the template itself:

* a template with ``{% generation %}`` markers (the default template here, and e.g. some Qwen /
  SmolLM templates): ``apply_chat_template(..., return_assistant_tokens_mask=True)``, what
  ``transformers`` defines;
* any other template: by rendering prefixes. For assistant turn ``i`` the span runs from the end
  of ``render(messages[:i], add_generation_prompt=True)`` to the end of
  ``render(messages[:i+1])``: the answer plus whatever the template closes the turn with
  (``<|im_end|>\\n``, ``<|eot_id|>``, ``</s>``), never the role header. A template whose earlier
  turns change when later ones are added (it cannot be split this way) is refused: give it
  ``{% generation %}`` markers with ``--chat-template FILE``.

With a fast tokenizer the spans are characters, mapped to tokens by the offsets. A slow tokenizer
(ChatGLM3's SentencePiece remote code) has no offsets: the same prefix renders are tokenized
instead and the spans are token counts, ``len(tokens(prompt))`` to ``len(tokens(upto))``, checked
to be token prefixes of each other and of the whole conversation's tokens (a tokenizer that merges
across the boundary is refused with the record's place); ``{% generation %}`` templates take
this path too with a slow tokenizer (transformers' assistant mask needs offsets).

A tokenizer without a chat template gets :data:`DEFAULT_CHAT_TEMPLATE` (Zephyr style: a
``<|role|>`` header line, each turn closed by the tokenizer's EOS token); without an EOS token no
default applies and the run is refused. Documents (``text``) are tokenized with the tokenizer's
own special tokens (e.g. BOS) plus an EOS token, and every token is trained.
"""

# ruff: noqa: PLC0415 - transformers loads lazily, only for record data
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from shardwise_trainer.data.records import Example, InvalidDataset

#: Zephyr-style template for tokenizers that ship none; the ``{% generation %}`` span is the answer
#: and the EOS token that ends it (so the model learns to stop).
DEFAULT_CHAT_TEMPLATE: Final = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}{{ eos_token }}{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

Encoded = tuple[np.ndarray, np.ndarray]  # (int32 token ids, bool trained mask), same length


def load_tokenizer(model_dir: str, *, trust_remote_code: bool) -> Any:
    """The model directory's own tokenizer (fast, or slow remote code); never downloaded."""
    from shardwise_trainer import pretrained

    transformers = pretrained._import_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise pretrained.InvalidModel(
            f"--hf-model {model_dir}: no usable tokenizer there ({str(exc).splitlines()[0]}); record "
            "data is tokenized with the model's own tokenizer"
        ) from exc
    return tok


def resolve_template(tokenizer: Any, override: str | None) -> tuple[str, str]:
    """(template, where it came from: ``--chat-template`` / ``model`` / ``default``)."""
    if override:
        return override, "--chat-template"
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.get_chat_template()), "model"
    if tokenizer.eos_token is None:
        raise InvalidDataset(
            "the model's tokenizer has no chat template and no EOS token, so the default template "
            "cannot close a turn; give --chat-template FILE"
        )
    return DEFAULT_CHAT_TEMPLATE, "default"


def has_generation_markers(template: str) -> bool:
    return re.search(r"{%-?\s*generation\s*-?%}", template) is not None


def _render(tokenizer: Any, template: str, messages: Sequence[Any], ex: Example, *, prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            list(messages), chat_template=template, tokenize=False, add_generation_prompt=prompt
        )
    except Exception as exc:  # jinja2 errors and the template's own raise_exception(...)
        raise InvalidDataset(f"{ex.where}: messages: the chat template refused it ({exc})") from exc
    return str(text)


def _prefix_renders(tokenizer: Any, template: str, ex: Example) -> tuple[str, list[tuple[str, str]]]:
    """The whole conversation and, per assistant turn, (prompt up to it, conversation through it)."""
    full = _render(tokenizer, template, ex.messages, ex, prompt=False)
    renders = []
    for i, message in enumerate(ex.messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise InvalidDataset(f"{ex.where}: messages[0]: the conversation starts with an assistant turn")
        prompt = _render(tokenizer, template, ex.messages[:i], ex, prompt=True)
        upto = _render(tokenizer, template, ex.messages[: i + 1], ex, prompt=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise InvalidDataset(
                f"{ex.where}: messages[{i}]: the chat template renders earlier turns differently once "
                "later ones follow, so the prompt cannot be told from the answer; give a template with "
                "{% generation %} markers (--chat-template FILE)"
            )
        renders.append((prompt, upto))
    return full, renders


def _prefix_spans(tokenizer: Any, template: str, ex: Example) -> tuple[str, list[tuple[int, int]]]:
    full, renders = _prefix_renders(tokenizer, template, ex)
    return full, [(len(prompt), len(upto)) for prompt, upto in renders]


def _token_prefix_masks(tokenizer: Any, template: str, batch: Sequence[Example]) -> list[Encoded]:
    """Slow tokenizers: the assistant spans as token counts of the prefix renders."""
    per_example = [_prefix_renders(tokenizer, template, ex) for ex in batch]
    texts = [t for full, renders in per_example for t in (full, *(x for pair in renders for x in pair))]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    out = []
    for ex, (_, renders) in zip(batch, per_example, strict=True):
        full = list(next(ids))
        mask = np.zeros(len(full), dtype=bool)
        for turn, _ in enumerate(renders):
            prompt, upto = list(next(ids)), list(next(ids))
            if upto[: len(prompt)] != prompt or full[: len(upto)] != upto:
                raise InvalidDataset(
                    f"{ex.where}: messages: assistant turn {turn + 1}: the tokenizer splits the prompt "
                    "and the answer differently once they are joined, so the answer's tokens cannot be "
                    "told apart; give a template that ends the prompt on a special token (--chat-template)"
                )
            mask[len(prompt) : len(upto)] = True
        out.append((np.asarray(full, dtype=np.int32), mask))
    return out


def _mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(len(offsets), dtype=bool)
    if not offsets:
        return mask
    arr = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    for start, end in spans:  # a token is trained when it overlaps an assistant span
        mask |= (arr[:, 0] < end) & (arr[:, 1] > start)
    return mask


def encode_conversations(tokenizer: Any, template: str, batch: Sequence[Example]) -> list[Encoded]:
    """Token ids and trained masks of a batch of conversations (one tokenizer call per batch)."""
    if not batch:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return _token_prefix_masks(tokenizer, template, batch)
    if has_generation_markers(template):
        convs = [list(ex.messages) for ex in batch]
        try:
            out = tokenizer.apply_chat_template(
                convs,
                chat_template=template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
        except Exception:  # find the record the template refuses, one by one
            for ex in batch:
                _render(tokenizer, template, ex.messages, ex, prompt=False)
            raise
        return [
            (np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool))
            for ids, mask in zip(out["input_ids"], out["assistant_masks"], strict=True)
        ]
    texts, spans = [], []
    for ex in batch:
        text, s = _prefix_spans(tokenizer, template, ex)
        texts.append(text)
        spans.append(s)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [
        (np.asarray(ids, dtype=np.int32), _mask_from_offsets(offsets, s))
        for ids, offsets, s in zip(enc["input_ids"], enc["offset_mapping"], spans, strict=True)
    ]


def encode_documents(tokenizer: Any, batch: Sequence[Example]) -> list[Encoded]:
    """Token ids of a batch of documents (the tokenizer's special tokens + EOS); all trained."""
    if not batch:
        return []
    enc = tokenizer([ex.text or "" for ex in batch], add_special_tokens=True)
    eos = tokenizer.eos_token_id
    out = []
    for encoded in enc["input_ids"]:
        ids = [*encoded, eos] if eos is not None and (not encoded or encoded[-1] != eos) else encoded
        arr = np.asarray(ids, dtype=np.int32)
        out.append((arr, np.ones(len(arr), dtype=bool)))
    return out


def pad_id(tokenizer: Any) -> int:
    """The id padding positions carry (never trained): PAD, else EOS, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0
