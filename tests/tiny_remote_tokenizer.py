"""A ChatGLM3-style slow, remote-code tokenizer for the tiny ChatGLM stand-in (built offline).

ChatGLM3 ships ``tokenization_chatglm.py``: a Python (slow) ``PreTrainedTokenizer`` over a
SentencePiece model, with the ``[gMASK]`` / ``sop`` prefix and the ``<|user|>`` /
``<|assistant|>`` role tokens, loaded with ``trust_remote_code``; it has no character offsets.
This stand-in keeps all of that but the SentencePiece model (not a dependency here): a greedy
longest-match over a small vocabulary of ASCII characters and the corpus' words. The chat
template is ChatGLM3's own (tokenizer_config.json of THUDM/chatglm3-6b).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

CHATGLM3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n"
    " {{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SPECIAL = [
    "<unk>", "<s>", "</s>", "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
]  # fmt: skip

TOKENIZATION_PY = '''
"""ChatGLM3-style slow tokenizer (stand-in: greedy longest match instead of SentencePiece)."""
import json
import os

from transformers import PreTrainedTokenizer

SPECIAL = %(special)r


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "vocab.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, **kwargs):
        with open(vocab_file, encoding="utf-8") as fh:
            self.pieces = json.load(fh)
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.longest = max(len(p) for p in self.pieces)
        self.vocab_file = vocab_file
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("pad_token", "<unk>")
        kwargs.setdefault("additional_special_tokens", SPECIAL[3:])
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self.pieces)

    def get_vocab(self):
        return {**self.ids, **self.added_tokens_encoder}

    def _tokenize(self, text, **kwargs):
        out, i = [], 0
        while i < len(text):
            for size in range(min(self.longest, len(text) - i), 0, -1):
                piece = text[i : i + size]
                if piece in self.ids and piece not in SPECIAL:
                    out.append(piece)
                    i += size
                    break
            else:
                out.append("<unk>")
                i += 1
        return out

    def _convert_token_to_id(self, token):
        return self.ids.get(token, self.ids["<unk>"])

    def _convert_id_to_token(self, index):
        return self.pieces[index]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        prefix = [self.ids["[gMASK]"], self.ids["sop"]]
        return prefix + token_ids_0 + (token_ids_1 or [])

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = os.path.join(save_directory, (filename_prefix or "") + "vocab.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.pieces, fh)
        return (path,)
'''


def save(directory: Path, corpus: list[str], vocab_size: int) -> None:
    """Write tokenization_chatglm.py, vocab.json and a tokenizer_config.json with its auto_map."""
    words = sorted({w for line in corpus for w in line.replace(".", " .").replace(",", " ,").split()})
    chars = [chr(b) for b in range(32, 127)] + ["\n"]
    pieces = [*SPECIAL, *chars, *(f" {w}" for w in words if len(w) > 1), *(w for w in words if len(w) > 1)]
    pieces = list(dict.fromkeys(pieces))[:vocab_size]
    (directory / "tokenization_chatglm.py").write_text(
        textwrap.dedent(TOKENIZATION_PY % {"special": SPECIAL})
    )
    (directory / "vocab.json").write_text(json.dumps(pieces))
    for stale in ("tokenizer.json", "special_tokens_map.json"):
        (directory / stale).unlink(missing_ok=True)
    config = {
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "chat_template": CHATGLM3_TEMPLATE,
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
