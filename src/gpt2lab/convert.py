"""Multi-head -> grouped-query attention conversion (the GQA paper's "uptraining" starting point).

Ainslie et al. (2023) turn a multi-head checkpoint into a GQA one by mean-pooling the key and value
heads of each group (or, their ablation, keeping the group's first head), then train briefly. Query head h uses kv head h // (n_head // n_kv_head), so a
group is a run of consecutive heads: pooling consecutive heads keeps every query head reading the
average of the heads it used to read. The converted model is a normal gpt2lab model; fine-tune it
like any other (``--model`` accepts its directory).
"""

from __future__ import annotations

import dataclasses

import torch

from gpt2lab.config import GPTConfig, divisors
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT


def check_target(config: GPTConfig, n_kv_head: int) -> None:
    """Raise ConfigError unless ``n_kv_head`` heads can be made by pooling whole groups of the model's."""
    current = config.n_kv_head
    if not isinstance(n_kv_head, int) or isinstance(n_kv_head, bool) or n_kv_head < 1:
        raise ConfigError(f"n_kv_head must be a positive integer, got {n_kv_head!r}")
    if config.n_head % n_kv_head:
        raise ConfigError(
            f"n_kv_head ({n_kv_head}) must divide n_head ({config.n_head}); "
            f"pick one of {divisors(config.n_head)} (1 = multi-query)"
        )
    if n_kv_head > current:
        raise ConfigError(
            f"the model already has {current} key/value heads, fewer than the {n_kv_head} asked for; "
            f"conversion only pools heads, pick one of {divisors(current)}"
        )
    if current % n_kv_head:
        raise ConfigError(
            f"the model has {current} key/value heads, which cannot be pooled evenly into {n_kv_head}; "
            f"pick one of {divisors(current)}"
        )


METHODS = ("mean", "first")


def pool_kv_heads(tensor: torch.Tensor, n_kv_head: int, head_dim: int, method: str = "mean") -> torch.Tensor:
    """One head per group of consecutive heads along dim 0: (n_old * head_dim, ...) -> (n_kv_head * head_dim,
    ...). ``mean``: the group's mean (the GQA paper's recipe), averaged in float32 (a bf16 sum of many
    heads would lose bits); ``first``: the group's first head (the paper's ablation)."""
    rest = tensor.shape[1:]
    heads = tensor.float().view(n_kv_head, -1, head_dim, *rest)  # (n_kv_head, group, hs, ...)
    pooled = heads.mean(dim=1) if method == "mean" else heads[:, 0]
    return pooled.reshape(n_kv_head * head_dim, *rest).to(tensor.dtype)


@torch.no_grad()
def convert_to_gqa(model: GPT, n_kv_head: int, method: str = "mean") -> GPT:
    """A new model with ``n_kv_head`` key/value heads, each the mean (or, ``method="first"``, the first)
    of the heads of its query group.

    Queries, output projections and every other weight are copied unchanged; the original model is
    not modified. ``n_kv_head`` equal to the model's count gives an exact copy; 1 gives multi-query.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    config = model.config
    check_target(config, n_kv_head)
    new_config = dataclasses.replace(config, n_kv_head=n_kv_head)
    C, hs = config.n_embd, config.head_dim
    kv_dim = config.n_kv_head * hs
    state_dict = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte: set below, so the copy shares one tensor as the original does
        tensor = tensor.detach().clone()
        if key.endswith("attn.c_attn.weight") or key.endswith("attn.c_attn.bias"):
            # Linear layout (out, in): rows [0, C) are queries, then kv_dim rows of keys, then of values.
            q, k, v = tensor.split((C, kv_dim, kv_dim), dim=0)
            k, v = pool_kv_heads(k, n_kv_head, hs, method), pool_kv_heads(v, n_kv_head, hs, method)
            tensor = torch.cat((q, k, v), dim=0)
        state_dict[key] = tensor
    state_dict["lm_head.weight"] = state_dict["wte.weight"]
    converted = GPT.from_state_dict(new_config, state_dict, device=model.wte.weight.device)
    return converted.train(model.training)
