"""Efficiency measured in alternation: decode tokens/s of each variant against a reference, and sliding-window
against full causal attention kernels, on the device at hand; KV-cache bytes computed from the configs.

Absolute speeds on a shared machine swing with the neighbours' load, so nothing is timed alone: each round
times the reference and then a variant (in a rotating order), and the statistic is the per-round ratio, whose
logarithm gets a t-interval over rounds. Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2lab.config import GPTConfig
from gpt2lab.decode import decode_one_token, prefill
from gpt2lab.device import resolve_device
from gpt2lab.kernels import alternated
from gpt2lab.model import GPT, flex_applies, flex_kernel, window_block_mask

PREFILL_CHUNK = 512  # prompt tokens per prefill call: bounds the attention scores' memory at long contexts


def efficiency_job(params: dict, run_dir: Path, root: Path) -> dict:
    """Decode rates and kernel times (see the module docstring) for ``params["configs"]`` on ``params["device"]``."""
    device = resolve_device(params["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = {name: GPTConfig.from_dict(c) for name, c in params["configs"].items()}
    torch.manual_seed(0)
    models = {name: GPT(c).to(device=device, dtype=dtype).eval() for name, c in configs.items()}
    decode = [_decode_setting(models, params, B, ctx, device) for B in params["batches"] for ctx in params["contexts"]]
    head = next(iter(configs.values()))
    kernels = _kernel_table(params, head.n_head, head.head_dim, device, dtype)
    return {
        "device": _device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "decode": decode,
        "kernels": kernels,
    }


def _decode_setting(models: dict[str, GPT], params: dict, B: int, ctx: int, device: torch.device) -> dict:
    """Alternated decode rates at batch ``B`` and context ``ctx``: per variant, per round, the reference's
    tokens/s and the variant's, measured back to back, after one untimed call of each model. Learned-position
    variants only up to their table."""
    reference, n = params["reference"], params["new_tokens"]
    names = [
        v
        for v in params["variants"]
        if models[v].config.max_positions in (None,) or ctx <= models[v].config.max_positions
    ]
    last = {name: _prefilled(models[name], B, ctx - n, device) for name in [reference, *names]}
    rates: dict[str, list[list[float]]] = {name: [] for name in names}
    with torch.no_grad():
        for name in [reference, *names]:  # untimed: a model's first steps also plan and calibrate its kernels
            _rate(models[name], last[name], ctx - n, n, device)
        for r in range(params["rounds"]):
            for name in names[r % max(1, len(names)) :] + names[: r % max(1, len(names))]:
                ref = _rate(models[reference], last[reference], ctx - n, n, device)
                rates[name].append([ref, _rate(models[name], last[name], ctx - n, n, device)])
    for model in models.values():
        model.clear_cache()
    return {"batch": B, "context": ctx, "rates": rates}


@torch.no_grad()
def _prefilled(model: GPT, B: int, length: int, device: torch.device) -> torch.Tensor:
    """Set up the cache for ``length`` + the timed steps and fill it with a random prompt; the next token."""
    model.setup_cache(B, length + 1 + PREFILL_CHUNK)  # room for the timed steps (rewritten every round)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (B, length), generator=g).to(device)
    for start in range(0, length, PREFILL_CHUNK):
        stop = min(length, start + PREFILL_CHUNK)
        logits = prefill(model, idx[:, start:stop], torch.arange(start, stop, device=device))
    return logits.argmax(-1, keepdim=True)


def _rate(model: GPT, token: torch.Tensor, start: int, n: int, device: torch.device) -> float:
    """Tokens/s of ``n`` greedy one-token decode steps at time steps start, start + 1, ... (the cache slots
    they write are rewritten by the next measurement, at the same cost)."""
    _sync(device)
    began = time.perf_counter()
    for t in range(start, start + n):
        token = decode_one_token(model, token, torch.tensor([t], device=device)).argmax(-1, keepdim=True)
    _sync(device)
    return token.shape[0] * n / (time.perf_counter() - began)


def _kernel_table(params: dict, heads: int, head_dim: int, device: torch.device, dtype) -> list[dict]:
    """Forward attention of one sequence, window W against full causal, at each context and T / W ratio: per
    kernel the seconds of every interleaved round."""
    rows = []
    for T in params["kernel_contexts"]:
        q, k, v = (torch.randn(1, heads, T, head_dim, device=device, dtype=dtype) for _ in range(3))
        for ratio in params["kernel_ratios"]:
            rows.append(
                {
                    "context": T,
                    "window": T // ratio,
                    "ratio": ratio,
                    "seconds": _time_kernels(q, k, v, T // ratio, params["kernel_rounds"]),
                }
            )
    return rows


def _time_kernels(q, k, v, window: int, rounds: int) -> dict[str, list[float]]:
    """Each kernel the device has for this shape, timed in interleaved rounds (after one warm-up call)."""
    T, device = q.shape[2], q.device
    i = torch.arange(T, device=device)
    band = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < window)
    kernels = {
        "full causal (SDPA)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "window: SDPA + mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=band),
    }
    probe = GPTConfig(n_embd=q.shape[1] * q.shape[3], n_head=q.shape[1], n_layer=1)
    if flex_applies(device, probe):
        block_mask = window_block_mask(T, window, device)
        kernels["window: FlexAttention"] = lambda: flex_kernel(device.type)(q, k, v, block_mask=block_mask)
    with torch.no_grad():
        return alternated(kernels, rounds, sync=lambda: _sync(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    import platform

    return (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})"
    )
