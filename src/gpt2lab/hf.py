"""A pure adapter between HF's GPT-2 layout and ours: config.json fields and state-dict names/shapes.

HF GPT-2 stores ``c_attn``, ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` weights as Conv1D,
shape (in, out); our nn.Linear holds (out, in), so exactly these four are transposed both ways.
Keys may carry a ``transformer.`` prefix; old files carry ``attn.bias``/``attn.masked_bias`` buffers
(a causal mask, not a parameter), which are ignored. Every other unknown or missing key is an error.
No file is read or written here (that is gpt2lab.load).
"""

from __future__ import annotations

import re

import torch

from gpt2lab.config import GPTConfig
from gpt2lab.errors import CheckpointError, ConfigError
from gpt2lab.model import GPT

CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def config_from_json(cfg: dict) -> GPTConfig:
    """The GPTConfig of a config.json: a variant's (``model_type`` gpt2lab) from ours under ``gpt2lab``;
    a GPT-2's from HF's fields, over ours where both are present: transformers keeps our block when it
    saves the model again, but changes only its own fields (a resized vocabulary), which then win."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"config.json must hold a JSON object, not a {type(cfg).__name__}")
    ours = cfg.get("gpt2lab")
    if ours is not None and cfg.get("model_type") != "gpt2":
        return GPTConfig.from_dict(ours)
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"model_type is {cfg['model_type']!r}; only GPT-2 checkpoints (model_type 'gpt2') load")
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"activation_function {cfg['activation_function']!r} is not GPT-2's tanh GELU (gelu_new)")
    n_embd = cfg.get("n_embd", 768)
    if cfg.get("n_inner") not in (None, 4 * n_embd if isinstance(n_embd, int) else None):
        raise ConfigError(f"n_inner={cfg['n_inner']} is not 4 * n_embd; only GPT-2's MLP width is supported")
    if cfg.get("scale_attn_by_inverse_layer_idx") or not cfg.get("scale_attn_weights", True):
        raise ConfigError("attention scaling differs from GPT-2's 1/sqrt(head_dim); not supported")
    fields = {
        "vocab_size": cfg.get("vocab_size", 50257),
        "block_size": cfg.get("n_positions", 1024),
        "n_layer": cfg.get("n_layer", 12),
        "n_head": cfg.get("n_head", 12),
        "n_embd": n_embd,
        "layer_norm_epsilon": cfg.get("layer_norm_epsilon", 1e-5),
    }
    if isinstance(ours, dict):  # our export of a GPT-2, perhaps saved again by transformers
        return GPTConfig.from_dict(ours | fields)
    return GPTConfig(**fields)


def hf_config(config: GPTConfig, eos_id: int = 50256) -> dict:
    """config.json for a model: HF's GPT-2 fields, plus our full config under ``gpt2lab``; ``eos_id``: its
    tokenizer's ``<|endoftext|>`` (also GPT-2's beginning of text)."""
    plain = is_plain_gpt2(config)
    ours = config.to_dict() | ({"padded_vocab_size": None} if plain else {})
    return {
        "architectures": ["GPT2LMHeadModel"] if plain else ["GPT2LabVariant"],
        "model_type": "gpt2" if plain else "gpt2lab",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": True,
        "gpt2lab": ours,
    }


def is_plain_gpt2(config: GPTConfig) -> bool:
    """Whether transformers' GPT2LMHeadModel can hold this config (no variant switched on)."""
    return config.pos_emb == "learned" and config.n_kv_head == config.n_head and config.window is None


def from_hf_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors -> our state dict: strip the prefix, drop mask buffers, transpose Conv1D, tie the
    head (``GPT.from_state_dict`` then checks every name and shape against ``config``)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        key = key.removeprefix("transformer.")
        if IGNORED.match(key):
            continue
        # a contiguous (out, in) copy: a transposed view would leave every matmul on a strided weight
        out[key] = tensor.t().contiguous() if CONV1D.match(key) and tensor.dim() == 2 else tensor
    lm_head = out.pop("lm_head.weight", None)
    if lm_head is not None and "wte.weight" in out and not torch.equal(lm_head, out["wte.weight"]):
        raise CheckpointError("lm_head.weight differs from wte.weight; GPT-2 ties them, untied heads are not supported")
    out["lm_head.weight"] = out.get("wte.weight")
    return out


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights in HF GPT-2 layout: ``transformer.`` prefix, Conv1D transposed, tied lm_head omitted."""
    out = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        tensor = tensor.detach()
        if key == "wte.weight":
            tensor = tensor[: model.config.vocab_size] if is_plain_gpt2(model.config) else tensor
        out[f"transformer.{key}"] = (tensor.t() if CONV1D.match(key) else tensor).contiguous().cpu()
    return out
