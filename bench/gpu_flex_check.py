"""FlexAttention vs SDPA with a boolean mask for sliding-window layers, on CUDA.

1. Correctness: a 2-layer window+GQA+RoPE model (window layers alternate with global ones) gives the
   same logits, loss and gradients through the flex path as through SDPA with the mask (fp32, no TF32),
   eager and under torch.compile.
2. Speed: one attention call, forward + backward, bf16, 12 query / 4 kv heads of 64, window 256, at
   T = 1024 and 4096 (same tokens per batch), flex vs SDPA with the mask vs SDPA causal (no window).

Usage: python bench/gpu_flex_check.py [--no-compile-model]   (about a minute on an H100, mostly compiling)
Exit status 1 if any comparison fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import gpt2lab.model as model_module
from gpt2lab import GPT, Backends
from gpt2lab.config import GPTConfig

CONFIG = dict(
    n_layer=2, n_head=12, n_kv_head=4, n_embd=768, block_size=1024, pos_emb="rope", window=256, window_pattern="LG"
)


def run(model: torch.nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, loss and every parameter's gradient of one forward + backward."""
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets=idx.roll(-1, dims=1))
    loss.backward()
    module = getattr(model, "_orig_mod", model)  # parameter names without torch.compile's prefix
    return logits.detach(), loss.detach(), {n: p.grad for n, p in module.named_parameters()}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def check_model(device: torch.device, compile_model: bool) -> bool:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    config = GPTConfig(**CONFIG)
    idx = torch.randint(0, config.vocab_size, (2, 1024), device=device)
    reference = GPT(config, Backends(attention="sdpa")).to(device)  # the CPU route: SDPA with a boolean mask
    want = run(reference, idx)
    assert isinstance(reference._window_masks[(1024, idx.device)], torch.Tensor)
    flexed = GPT(config, Backends(attention="flex")).to(device)
    flexed.load_state_dict(reference.state_dict())
    t0 = time.perf_counter()
    got = run(torch.compile(flexed) if compile_model else flexed, idx)
    seconds = time.perf_counter() - t0
    used_flex = isinstance(flexed._window_masks[(1024, idx.device)], model_module.BlockMask)
    errors = {"logits": relative_error(got[0], want[0]), "loss": relative_error(got[1], want[1])}
    errors["worst grad"] = max(relative_error(got[2][n], want[2][n]) for n in want[2])
    ok = used_flex and all(e < 1e-4 for e in errors.values())
    label = "torch.compile(model)" if compile_model else "eager model"
    print(
        f"{label:<21} flex used: {used_flex}  first fwd+bwd {seconds:5.1f} s  relative error vs SDPA+mask: "
        + "  ".join(f"{k} {v:.1e}" for k, v in errors.items())
        + ("  OK" if ok else "  FAILED")
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return ok


def cuda_ms(fn, warmup: int = 3, repeat: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_attention(device: torch.device, window: int = 256, tokens: int = 16384) -> bool:
    kernel = torch.compile(model_module.flex_attention)
    print(f"\nattention fwd+bwd, bf16, 12 q / 4 kv heads x 64, window {window}, {tokens} tokens per call (ms, median)")
    print(f"{'T':>5} {'batch':>5} {'flex':>8} {'sdpa+mask':>10} {'sdpa causal':>12} {'mask/flex':>10} {'out err':>8}")
    ok = True
    for T in (1024, 4096):
        ms, err = time_one(kernel, device, tokens // T, T, window)
        ok &= err < 2e-2  # bf16 outputs
        print(
            f"{T:>5} {tokens // T:>5} {ms['flex']:>8.2f} {ms['sdpa']:>10.2f} {ms['causal']:>12.2f} "
            f"{ms['sdpa'] / ms['flex']:>9.1f}x {err:>8.1e}"
        )
    return ok


def time_one(kernel, device: torch.device, B: int, T: int, window: int) -> tuple[dict[str, float], float]:
    """Milliseconds of forward + backward per method, and flex's output error against SDPA + mask."""
    q = torch.randn(B, 12, T, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, 4, T, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, 4, T, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(q)
    i = torch.arange(T, device=device)
    mask = (i[:, None] >= i[None]) & (i[:, None] - i[None] < window)
    block_mask = model_module.window_block_mask(T, window, device)
    methods = {
        "flex": lambda: kernel(q, k, v, block_mask=block_mask, enable_gqa=True),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }
    err = relative_error(methods["flex"](), methods["sdpa"]())
    return {name: cuda_ms(lambda f=f: f().backward(grad)) for name, f in methods.items()}, err


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile-model", action="store_true", help="skip the torch.compile(model) check")
    args = parser.parse_args()
    if not torch.cuda.is_available() or model_module.flex_attention is None:
        print("needs CUDA and torch.nn.attention.flex_attention (torch >= 2.5)", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    t0 = time.perf_counter()
    ok = check_model(device, compile_model=False)
    if not args.no_compile_model:
        ok &= check_model(device, compile_model=True)
    ok &= time_attention(device)
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
