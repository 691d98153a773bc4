"""KV-cache memory and decode speed of the attention variants, on CPU.

A small rotary model (4 layers, 256 wide, 8 heads of 32; rotary so 16k positions are allowed) in
five variants: multi-head, grouped-query (2 kv heads), multi-query, a sliding window of 256 on every
layer, and window + GQA. For each generation length the cache is allocated by ``setup_cache`` exactly
as ``generate`` does and its K/V buffers are measured; decode speed is greedy generation through
``gpt2lab.stream`` from a 16-token prompt (tokens/s over the whole run, prefill included).
In the longest run, the speed of its first and last 1024 tokens shows how a step's cost depends on
the context so far.

Usage: python bench/variants.py [--lengths 1024 4096 16384] [--threads N] [--variants mha gqa2 ...]
(the whole default run takes about 10 minutes on 2 idle cores; run variants in parallel to save time)
"""

from __future__ import annotations

import argparse
import time

import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.generation import stream
from gpt2lab.kernels import cpu_model

BASE = dict(n_layer=4, n_embd=256, n_head=8, pos_emb="rope", block_size=1024)
VARIANTS = {
    "mha": dict(),  # 8 kv heads
    "gqa2": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "window256": dict(window=256),
    "window256+gqa2": dict(window=256, n_kv_head=2),
}
PROMPT = 16
EDGE = 1024  # tokens timed at the start and the end of the longest run


def cache_bytes(model: GPT, length: int) -> int:
    """Bytes of the K and V buffers ``generate`` allocates for one sequence of ``length`` time steps."""
    model.setup_cache(1, length)
    try:
        return sum(block.attn.kv_cache.k.nbytes + block.attn.kv_cache.v.nbytes for block in model.h)
    finally:
        model.clear_cache()


def decode(model: GPT, new_tokens: int) -> tuple[float, float, float]:
    """Tokens/s of a greedy generation of ``new_tokens``, and of its first and last EDGE tokens."""
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    stamps = [time.perf_counter()]
    for _ in stream(model, [prompt], new_tokens, temperature=0.0, eos_id=None):
        stamps.append(time.perf_counter())
    edge = min(EDGE, new_tokens)
    # The first stamp interval holds the prefill; the edges use decode steps only.
    first = edge / (stamps[edge + 1] - stamps[1]) if new_tokens > edge else float("nan")
    last = edge / (stamps[-1] - stamps[-1 - edge])
    return new_tokens / (stamps[-1] - stamps[0]), first, last


def main() -> None:
    parser = argparse.ArgumentParser(description="KV-cache bytes and decode tokens/s of the attention variants (CPU)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="generated tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="rows to run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1, prompt {PROMPT} tokens"
    )
    print(f"model: {BASE}, vocab 50257\n")
    longest = max(args.lengths)
    header = f"{'variant':<20} {'params':>10}" + "".join(
        f" {f'cache@{n}':>12} {f'tok/s@{n}':>10}" for n in args.lengths
    )
    header += f" {f'first {EDGE}':>11} {f'last {EDGE}':>10}"
    print(header + "\n" + "-" * len(header))
    for name in args.variants:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**(BASE | VARIANTS[name]))).eval()
        row = f"{name:<20} {model.num_params():>10,}"
        for n in args.lengths:
            mib = cache_bytes(model, PROMPT + n) / 2**20
            rate, first, last = decode(model, n)
            row += f" {mib:>8.2f} MiB {rate:>10.1f}"
            if n == longest:
                edges = f" {first:>11.1f} {last:>10.1f}"
        print(row + edges, flush=True)
    print(
        f"\ncache@N: K+V buffers for prompt + N tokens; tok/s@N: N / wall time of the whole generation; "
        f"first/last {EDGE}: decode tokens/s at the start and the end of the {longest}-token run"
    )


if __name__ == "__main__":
    main()
