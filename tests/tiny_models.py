"""Tiny pretrained-model directories for the trainer tests, built offline (nothing downloaded).

Each builder writes what a user's model directory holds: ``config.json``, safetensors weights
(``save_pretrained``, random weights from a fixed seed) and a tokenizer trained here with
``tokenizers`` on a few sentences. ``chatglm`` ships its own modelling code (``auto_map``), a
small ChatGLM3-style model with the real module names (fused ``query_key_value``,
``dense_h_to_4h``), so the remote-code path runs as it does for ChatGLM3.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, MAX_POS = 64, 128, 4, 2, 256, 64

#: The planner's architecture block (CRD names) of each tiny model.
SPEC_ARCH: dict[str, dict[str, Any]] = {
    "llama": {
        "family": "llama",
        "layers": 2,
        "hiddenSize": HIDDEN,
        "heads": HEADS,
        "kvHeads": KV_HEADS,
        "ffnHiddenSize": FFN,
        "vocabSize": VOCAB,
        "maxSequenceLength": MAX_POS,
    },
    "chatglm": {
        "family": "chatglm",
        "layers": 2,
        "hiddenSize": HIDDEN,
        "heads": HEADS,
        "kvHeads": KV_HEADS,
        "ffnHiddenSize": FFN,
        "vocabSize": VOCAB,
        "maxSequenceLength": MAX_POS,
        "qkvBias": True,
    },
}

CORPUS = [
    "shardwise plans tensor, pipeline and data parallel layouts.",
    "LoRA adapts a frozen model with low-rank matrices.",
    "QLoRA keeps the base weights in four bits.",
    "ZeRO partitions optimizer states, gradients and parameters.",
] * 8


def save_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer of VOCAB entries trained on CORPUS, saved beside the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Every printable ASCII byte, newline and space is in the alphabet (byte-level symbols), so
    # ASCII text round-trips through encode / decode without <unk> (the data tests decode labels).
    alphabet = [chr(b) for b in range(33, 127)] + ["\u0120", "\u010a"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(directory))


def llama(directory: Path, *, seed: int = 0, layers: int = 2, hidden: int = HIDDEN, ffn: int = FFN) -> Path:
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(str(directory))
    save_tokenizer(directory)
    return directory


def qwen2_vl(directory: Path, *, seed: int = 0) -> Path:
    import torch  # noqa: PLC0415
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration  # noqa: PLC0415

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config={
            "hidden_size": HIDDEN,
            "intermediate_size": FFN,
            "num_hidden_layers": 2,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "vocab_size": VOCAB,
            "max_position_embeddings": MAX_POS,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": HIDDEN,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(str(directory))
    save_tokenizer(directory)
    return directory


CHATGLM_CONFIG_PY = """
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(self, num_layers=2, padded_vocab_size=256, hidden_size=64, ffn_hidden_size=128,
                 kv_channels=16, num_attention_heads=4, seq_length=64, layernorm_epsilon=1e-5,
                 rmsnorm=True, add_qkv_bias=True, multi_query_attention=True,
                 multi_query_group_num=2, **kwargs):
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.add_qkv_bias = add_qkv_bias
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        super().__init__(**kwargs)
"""

CHATGLM_MODELING_PY = '''
"""A small ChatGLM3-style causal LM (module names as in THUDM's modeling_chatglm.py)."""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_chatglm import ChatGLMConfig


class RMSNorm(nn.Module):
    def __init__(self, hidden, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class SelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads, self.groups, self.head_dim = c.num_attention_heads, c.multi_query_group_num, c.kv_channels
        qkv = c.hidden_size + 2 * self.groups * self.head_dim
        self.query_key_value = nn.Linear(c.hidden_size, qkv, bias=c.add_qkv_bias)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size, bias=False)

    def forward(self, x):
        b, s, h = x.shape
        kv = self.groups * self.head_dim
        q, k, v = self.query_key_value(x).split([h, kv, kv], dim=-1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.groups, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.groups, self.head_dim).transpose(1, 2)
        rep = self.heads // self.groups
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(out.transpose(1, 2).reshape(b, s, h))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c.hidden_size, 2 * c.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(c.ffn_hidden_size, c.hidden_size, bias=False)

    def forward(self, x):
        a, b = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(a) * b)


class GLMBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.layernorm_epsilon)
        self.self_attention = SelfAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.layernorm_epsilon)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.self_attention(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.padded_vocab_size, c.hidden_size)

    def forward(self, ids):
        return self.word_embeddings(ids)


class GLMTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(c) for _ in range(c.num_layers))
        self.final_layernorm = RMSNorm(c.hidden_size, c.layernorm_epsilon)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.final_layernorm(x)


class ChatGLMModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embedding = Embedding(c)
        self.encoder = GLMTransformer(c)
        self.output_layer = nn.Linear(c.hidden_size, c.padded_vocab_size, bias=False)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["GLMBlock"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def forward(self, input_ids=None, labels=None, use_cache=None, **kwargs):
        x = self.transformer.embedding(input_ids)
        logits = self.transformer.output_layer(self.transformer.encoder(x))
        return CausalLMOutputWithPast(logits=logits)
'''


def chatglm(directory: Path, *, seed: int = 0, remote_tokenizer: bool = False) -> Path:
    """A ChatGLM3-style model directory with its own modelling code (needs trust_remote_code).

    ``remote_tokenizer``: ChatGLM3's kind of tokenizer too — slow, remote code, its chat template
    (tests/tiny_remote_tokenizer.py) — instead of the fast one of the other stand-ins.
    """
    import importlib  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    import sys  # noqa: PLC0415

    import torch  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "configuration_chatglm.py").write_text(textwrap.dedent(CHATGLM_CONFIG_PY))
    (directory / "modeling_chatglm.py").write_text(textwrap.dedent(CHATGLM_MODELING_PY))
    package = f"tiny_chatglm_{abs(hash(str(directory)))}"
    init = directory / "__init__.py"
    init.write_text("")
    spec = importlib.util.spec_from_file_location(package, init, submodule_search_locations=[str(directory)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    configuration = importlib.import_module(f"{package}.configuration_chatglm")
    modeling = importlib.import_module(f"{package}.modeling_chatglm")
    torch.manual_seed(seed)
    config = configuration.ChatGLMConfig(
        auto_map={
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        }
    )
    model = modeling.ChatGLMForConditionalGeneration(config)
    model.save_pretrained(str(directory))
    init.unlink()
    doc = json.loads((directory / "config.json").read_text())
    doc["model_type"] = "chatglm"
    (directory / "config.json").write_text(json.dumps(doc, indent=2))
    save_tokenizer(directory)
    if remote_tokenizer:
        from tests import tiny_remote_tokenizer  # noqa: PLC0415

        tiny_remote_tokenizer.save(directory, CORPUS, VOCAB)
    return directory


def skewed_tokens(path: Path, *, n: int = 20_000, token: int = 42, share: float = 0.8, seed: int = 0) -> Path:
    """A raw uint16 token file (the trainer's ``--data`` format) where one token is ``share`` of
    the stream: a low-rank adapter on a random base learns it within a few steps, so "the loss
    falls" is a check of the method, not of luck."""
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    ids = np.where(rng.random(n) < share, token, rng.integers(0, VOCAB, n))
    np.asarray(ids, dtype=np.uint16).tofile(path)
    return path


#: A ChatML template without {% generation %} markers (the masks come from prefix renders).
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def with_chat_template(directory: Path, template: str = CHATML) -> Path:
    """Give the model directory's tokenizer a chat template (tokenizer_config.json), as real chat
    models ship one."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2))
    return directory


def chat_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Short chat ``messages`` records whose answers are learnable (a fixed reply per question)."""
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    replies = {"LoRA?": "low rank.", "QLoRA?": "four bits.", "ZeRO?": "partitions."}
    keys = sorted(replies)
    out = []
    for _ in range(n):
        q = keys[int(rng.integers(len(keys)))]
        out.append(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": replies[q]}]}
        )
    return out


def write_jsonl(path: Path, docs: list[Any]) -> Path:
    """One JSON document per line."""
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path
