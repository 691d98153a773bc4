"""GPU benchmark in one short run (about 5 minutes on one H100/H200).

    python bench/gpu.py                 # on a CUDA machine; writes nothing, prints a table
    python bench/gpu.py --dry-run       # tiny shapes on CPU: checks the script end to end
    python bench/gpu.py --train gpt2:16,gpt2:16:sliced --profile   # a sweep, and where the time goes

1. the card's own ceilings: bf16 matmul TFLOP/s (8192^3) and device-to-device copy GB/s;
2. training tokens/s and MFU, bf16 autocast + torch.compile + fused AdamW (vocabulary padded to 50304),
   for each --train run PRESET:BATCH[:sliced] at 1024 tokens per sequence; ``sliced`` takes the loss
   over the logits sliced to the vocabulary instead of GPT.loss's masked padding. --profile adds each
   run's GPU time per kind of kernel (matmul, attention, fused elementwise, optimizer);
3. inference against transformers' GPT2LMHeadModel with identical random 124M weights, bf16: prefill
   tokens/s (1x1024) and greedy decode tokens/s (batch 1, 256 new tokens), ours eager and with the
   compiled decode step (CUDA graphs).
MFU is reported against the datasheet's dense bf16 peak and against the measured matmul ceiling.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from gpt2lab import GPT, GPTConfig, load_model  # noqa: E402
from gpt2lab.config import PRESETS  # noqa: E402
from gpt2lab.decode import compiled_decode, decode_one_token, prefill  # noqa: E402
from gpt2lab.kernels import alternated  # noqa: E402
from gpt2lab.train import BF16_PEAK_TFLOPS, configure_optimizer, flops_per_token  # noqa: E402
from gpt2lab.train_config import OptimSection  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int, warmup: int = 1) -> float:
    """Mean seconds per call after warmup."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


def ceilings(device: torch.device, dry: bool) -> dict:
    n = 256 if dry else 8192
    dtype = torch.float32 if dry else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, repeat=2 if dry else 10, warmup=1 if dry else 3)
    x = torch.empty(2**20 if dry else 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    tc = timed(lambda: y.copy_(x), device, repeat=2 if dry else 10)
    return {"matmul_tflops": 2 * n**3 / t / 1e12, "copy_gbs": 2 * x.numel() / tc / 1e9}


def sliced_loss(model: GPT):
    """GPT.loss with the padded vocabulary's columns sliced off the logits instead of masked: the usual
    way, kept here to measure what the mask buys."""
    vocab = model.config.vocab_size

    def loss(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(x)[..., :vocab]
        return F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)

    return loss


KERNEL_KINDS = (  # (kind, substrings of a kernel's name), first match wins; the rest is "other"
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer and clipping", ("adam", "multi_tensor", "foreach")),
    ("fused elementwise (inductor)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_steps(step, device: torch.device, steps: int = 3) -> dict:
    """Device time per step of each kind of kernel (ms), and the top kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    times: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        us = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if us <= 0:
            continue
        kind = kernel_kind(e.key)
        times[kind] = times.get(kind, 0.0) + us / 1e3 / steps
        kernels.append((us / 1e3 / steps, e.key[:90], kind))
    kernels.sort(reverse=True)
    return {"ms_per_step_by_kind": times, "top_kernels": kernels[:12]}


def train_throughput(
    preset: str, batch: int, seq: int, loss: str, device: torch.device, dry: bool, steps: int, profile: bool
) -> dict:
    overrides = dict(n_layer=2, n_head=2, n_embd=64, block_size=seq) if dry else {}
    config = GPTConfig.from_name(preset, padded_vocab_size=50304, **overrides)
    torch.manual_seed(0)
    torch._dynamo.reset()  # each run compiles afresh, for its own static shapes
    model = GPT(config).to(device)
    if loss == "sliced":
        model.loss = sliced_loss(model)
    optimizer = configure_optimizer(model, OptimSection())
    step_model = model if dry else torch.compile(model)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not dry)
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    y = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def step():
        with amp:
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    sync(device)
    compile_s = time.perf_counter() - t0
    seconds = timed(step, device, repeat=steps, warmup=2)
    tok_s = batch * seq / seconds
    result = {
        "preset": preset,
        "batch": f"{batch}x{seq}",
        "loss": loss,
        "params": model.num_params(),
        "tokens_per_s": tok_s,
        "step_ms": seconds * 1e3,
        "first_step_s": compile_s,
        "model_tflops": flops_per_token(config, seq) * tok_s / 1e12,
    }
    if device.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
    if profile:
        result["profile"] = profile_steps(step, device)
    return result


def parse_runs(text: str) -> list[tuple[str, int, str]]:
    """--train's PRESET:BATCH[:sliced],... as (preset, batch, loss) triples."""
    runs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        loss = parts[2] if len(parts) == 3 else "masked"
        if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1 or loss not in ("masked", "sliced"):
            raise argparse.ArgumentTypeError(f"{item!r} is not PRESET:BATCH or PRESET:BATCH:sliced (e.g. gpt2:16)")
        if parts[0] not in PRESETS:
            raise argparse.ArgumentTypeError(f"unknown preset {parts[0]!r}; choose from {', '.join(PRESETS)}")
        runs.append((parts[0], int(parts[1]), loss))
    return runs


def inference_vs_hf(device: torch.device, dry: bool) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(n_layer=2, n_head=2, n_embd=64) if dry else {}
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d)
    dtype = torch.float32 if dry else torch.bfloat16
    hf, ours = hf.to(device, dtype).eval(), ours.to(device, dtype).eval()
    P, N = (32, 16) if dry else (1024, 256)
    prompt = torch.randint(0, 50257, (1, P), device=device)
    res: dict = {}

    def hf_prefill():  # the last position's logits only, as gpt2lab's prefill computes them
        return hf.lm_head(hf.transformer(prompt, use_cache=False).last_hidden_state[:, -1:])

    def our_prefill():
        ours.setup_cache(1, P)
        return prefill(ours, prompt, torch.arange(P, device=device))

    short = prompt[:, :16]

    def hf_decode():
        return hf.generate(short, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=50256)

    def our_decode(step):  # N new tokens: the prefill's, then N - 1 steps, as generate makes them
        ours.setup_cache(1, 16 + N)
        logits = prefill(ours, short, torch.arange(16, device=device))
        for t in range(16, 16 + N - 1):
            logits = step(ours, logits.argmax(-1, keepdim=True), torch.tensor([t], device=device))
        return logits

    with torch.no_grad():
        decodes = {"hf": hf_decode, "ours": lambda: our_decode(decode_one_token)}
        decodes["ours_compiled"] = functools.partial(our_decode, compiled_decode(ours))
        fns = {"hf_prefill": hf_prefill, "ours_prefill": our_prefill}
        prefills = alternated(fns, 3 if dry else 20, sync=lambda: sync(device), warmup=1 if dry else 3)
        decoded = alternated(decodes, 1 if dry else 3, sync=lambda: sync(device), warmup=1 if dry else 2)
    res = {f"{k}_tok_s": P / statistics.median(v) for k, v in prefills.items()}
    return res | {f"{k}_decode_tok_s": N / statistics.median(v) for k, v in decoded.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, to check the script")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per model (default 10)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument(
        "--train",
        type=parse_runs,
        default="gpt2:16,gpt2-medium:16",
        help="training runs, PRESET:BATCH[:sliced],... at 1024 tokens a sequence (default gpt2:16,gpt2-medium:16)",
    )
    ap.add_argument("--no-inference", action="store_true", help="skip the comparison with transformers")
    ap.add_argument("--profile", action="store_true", help="GPU time per kind of kernel in each training run")
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or use --dry-run to check the script on CPU")
    device = torch.device("cpu" if dry else "cuda")
    torch.set_float32_matmul_precision("high")
    name = "cpu (dry run)" if dry else torch.cuda.get_device_name(device)
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    results: dict = {"device": name, "torch": torch.__version__}
    results["ceilings"] = c = ceilings(device, dry)
    print(f"ceilings: matmul {c['matmul_tflops']:.1f} TFLOP/s, copy {c['copy_gbs']:.0f} GB/s", flush=True)
    datasheet = next((tf for key, tf in BF16_PEAK_TFLOPS if key in name), None)
    results["train"] = []
    runs = (
        [(p, b, 1024, a) for p, b, a in args.train]
        if not dry
        else [("gpt2", 2, 32, loss) for loss in dict.fromkeys(a for _, _, a in args.train)]
    )
    for preset, batch, seq, loss in runs:
        try:
            r = train_throughput(preset, batch, seq, loss, device, dry, 2 if dry else args.steps, args.profile)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # report and go on: one failure should not cost the other figures
            print(f"train {preset}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        if datasheet:
            r["mfu_datasheet"] = r["model_tflops"] / datasheet
        r["mfu_measured_ceiling"] = r["model_tflops"] / c["matmul_tflops"]
        results["train"].append(r)
        print(
            f"train {preset:<12} {r['batch']:>8} {loss:<6}: {r['tokens_per_s']:>10,.0f} tok/s  "
            f"{r['step_ms']:8.1f} ms/step  "
            f"{r['model_tflops']:6.1f} TFLOP/s  MFU {100 * r.get('mfu_datasheet', float('nan')):5.1f}% of datasheet, "
            f"{100 * r['mfu_measured_ceiling']:5.1f}% of measured  (first step {r['first_step_s']:.0f} s)",
            flush=True,
        )
        if "profile" in r:
            prof = r["profile"]
            total = sum(prof["ms_per_step_by_kind"].values())
            print(f"  device time per step by kind of kernel ({total:.1f} ms in all):")
            for kind, ms in sorted(prof["ms_per_step_by_kind"].items(), key=lambda kv: -kv[1]):
                print(f"    {kind:<30} {ms:8.2f} ms  {100 * ms / total:5.1f}%")
            print("  top kernels:")
            for ms, name, kind in prof["top_kernels"]:
                print(f"    {ms:8.2f} ms  [{kind}] {name}")
    if not args.no_inference:
        try:
            results["inference"] = inf = inference_vs_hf(device, dry)
            print(
                f"prefill 1x{1024 if not dry else 32}: HF {inf['hf_prefill_tok_s']:,.0f} tok/s, "
                f"ours {inf['ours_prefill_tok_s']:,.0f} tok/s ({inf['ours_prefill_tok_s'] / inf['hf_prefill_tok_s']:.2f}x)"
            )
            print(
                f"greedy decode b=1: HF {inf['hf_decode_tok_s']:,.0f} tok/s, ours eager {inf['ours_decode_tok_s']:,.0f} "
                f"({inf['ours_decode_tok_s'] / inf['hf_decode_tok_s']:.2f}x), ours compiled "
                f"{inf['ours_compiled_decode_tok_s']:,.0f} ({inf['ours_compiled_decode_tok_s'] / inf['hf_decode_tok_s']:.2f}x)",
                flush=True,
            )
        except Exception as e:
            print(f"inference: FAILED {type(e).__name__}: {e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
