"""Shared benchmark helpers: identical random weights for both libraries, robust timing."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

import torch


def hf_and_ours(config_kwargs: dict | None = None, dropout: float = 0.0):
    """A random-weight transformers GPT2LMHeadModel and our GPT loaded from the same files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2lab import GPT

    torch.manual_seed(0)
    kw = dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout) | (config_kwargs or {})
    hf = GPT2LMHeadModel(GPT2Config(**kw))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = GPT.from_pretrained(d)
    return hf, ours


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median time of each function, measured in alternation so machine noise hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_gflops(m: int = 1024, k: int = 768, n: int = 3072, repeat: int = 10) -> float:
    """The machine's fp32 matmul throughput on a GPT-2-shaped product, GFLOP/s."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    t = timeit(lambda: a @ b, repeat=repeat, warmup=2)
    return 2 * m * k * n / t / 1e9


def memory_read_gbs(n_bytes: int = 512 * 2**20, repeat: int = 5) -> float:
    """Memory read bandwidth, GB/s: summing a buffer much larger than the caches."""
    x = torch.ones(n_bytes // 4)
    t = timeit(lambda: x.sum(), repeat=repeat, warmup=1)
    return n_bytes / t / 1e9
