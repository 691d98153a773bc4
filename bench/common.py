"""Shared benchmark helpers: identical random weights for both libraries, robust timing."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt2lab.kernels import alternated


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (threads, repetitions, rounds, tokens)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def names_of(allowed: tuple[str, ...]) -> Callable[[str], set[str]]:
    """An argparse type: a comma-separated selection from ``allowed``."""

    def parse(text: str) -> set[str]:
        names = {n.strip() for n in text.split(",") if n.strip()}
        unknown = sorted(names - set(allowed))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}; got {text!r}")
        return names

    return parse


def hf_and_ours(config_kwargs: dict | None = None, dropout: float = 0.0):
    """A random-weight transformers GPT2LMHeadModel and our GPT loaded from the same files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2lab import load_model

    torch.manual_seed(0)
    kw = dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout) | (config_kwargs or {})
    hf = GPT2LMHeadModel(GPT2Config(**kw))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d)
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
    """Median time of each function, measured in alternation (``gpt2lab.kernels.alternated``) so machine noise
    hits all of them alike."""
    return {k: statistics.median(v) for k, v in alternated(fns, repeat, warmup=warmup).items()}


def matmul_probes(m: int = 1024, k: int = 768, n: int = 3072) -> tuple[dict[str, Callable[[], object]], float]:
    """One GPT-2-shaped fp32 product (x (m, k) times a (n, k) weight, transposed) through each of the
    CPU's two matmul libraries in torch: MKL (F.linear) and oneDNN (what gpt2lab.ops uses); and its GFLOP.
    The machine's matmul ceiling is the faster of the two."""
    from gpt2lab import ops

    x, w = torch.randn(m, k), torch.randn(n, k)
    probes = {"matmul mkl": lambda: F.linear(x, w)}
    if ops.onednn_available():
        probes["matmul onednn"] = lambda: ops.linear(x, w)
    return probes, 2 * m * k * n / 1e9


def matmul_gflops(repeat: int = 10) -> float:
    """The machine's fp32 matmul ceiling on a GPT-2-shaped product, GFLOP/s (see ``matmul_probes``)."""
    probes, gflop = matmul_probes()
    return gflop / min(timeit(fn, repeat=repeat, warmup=2) for fn in probes.values())


def read_probe(n_bytes: int):
    """A function that reads ``n_bytes`` of float32 once from a matrix much larger than the caches
    (``read_matrix``): the fastest, timed three times each, of torch summing it (a pure read) and
    torch's two one-row products by it, as a decode step reads its weights (MKL's matrix-vector product
    and oneDNN's). Which is fastest depends on the CPU: on the AMD EPYC of docs/benchmarks.md the sum
    read 49 GB/s, oneDNN's product 40 and MKL's 25, and llama.cpp's fp32 decoding streams faster than
    oneDNN's product there, so the products alone make no ceiling."""
    from gpt2lab import ops

    matrix, row = read_matrix(n_bytes), torch.ones(1, 4096)
    probes = [matrix.sum, lambda: torch.mv(matrix, row[0])]
    if ops.onednn_available():
        probes.append(lambda: ops.linear(row, matrix))
    return min(probes, key=lambda fn: timeit(fn, repeat=3, warmup=1))


def read_matrix(n_bytes: int) -> torch.Tensor:
    """``read_probe``'s float32 matrix of ``n_bytes``, 4096 columns wide, in 2 MiB pages wherever
    gpt2lab's decode steps read their weights from such pages (``gpt2lab.pages.wanted``): a ceiling
    read from 4 KiB pages is lower than the steps' own rate (with ``madvise`` on the family-25 EPYC
    of docs/benchmarks.md, torch's sum read a 1 GiB matrix 1.1-1.25x as fast from 2 MiB pages)."""
    from gpt2lab import pages

    matrix = torch.ones(n_bytes // 4 // 4096, 4096)
    return pages.huge_copies([matrix])[0] if pages.wanted() else matrix


def decode_bytes(model, bytes_per_weight: float = 4.0) -> float:
    """Bytes of weights one decode step of a float32 ``model`` reads: every linear weight (the tied
    lm_head too) at ``bytes_per_weight`` (1 for int8 copies of the weights), the rest in float32;
    one row of each embedding table is noise."""
    total = 0.0
    for name, p in model.named_parameters():
        if name == "wpe.weight":
            continue
        total += p.numel() * (bytes_per_weight if p.dim() == 2 else 4)
    return total


def memory_read_gbs(n_bytes: int = 512 * 2**20, repeat: int = 5) -> float:
    """Memory read bandwidth, GB/s: ``read_probe``'s rate."""
    t = timeit(read_probe(n_bytes), repeat=repeat, warmup=1)
    return n_bytes / t / 1e9


# Forward and prefill rows repeat one shape, as evaluation batches and same-length prompts do. gpt2lab
# packs a layer's weight once such products have repaid the copy (Backends.pack_repeated: within two to
# five calls of GPT-2 124M at 256 rows on the Xeon), so those rows time the calls after this many
# warm-up calls of every engine: the steady state of a repeated shape.
REPEATED_WARMUP = 6

VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_header(threads: int) -> str:
    """The CPU model and its vector extensions (the ones matmul kernels use), torch's version, the
    thread count and the int8 weights' bits: what a benchmark's figures hold for."""
    from gpt2lab.kernels import cpu_flags, cpu_model, int8_weight_levels

    flags = cpu_flags()
    present = [f for f in VECTOR_FLAGS if f in flags] or ["(flags unknown on this OS)"]
    bits = 8 if int8_weight_levels() == 127 else 7
    return (
        f"CPU: {cpu_model()}, {platform.machine()}; flags: {' '.join(present)}\n"
        f"torch {torch.__version__}, {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}, "
        f"int8 weights of {bits} bits"
    )
