"""What CPU decoding gains from weights in 2 MiB pages (``Backends.huge_pages``, ``gpt2lab.pages``).

    python bench/pages.py [--int8] [--rounds 20] [--new-tokens 128] [--threads 2]

Two models with the same random GPT-2 124M weights (float32, or ``--int8``) in one process, one with
``Backends(huge_pages=False)``, greedy batch-1 generations of ``--new-tokens`` tokens after a
16-token prompt, each model in turn first, ``--rounds`` rounds: the two give the same tokens, and
the table has each one's time per token and the ratio of the two round by round. It runs only where
Linux gives 2 MiB pages to memory that asks for them (transparent huge pages in ``madvise`` mode);
the header says how much of the process's memory is in them.
"""

from __future__ import annotations

import os

from gpt2lab.cli import openmp_wait_policy

openmp_wait_policy(os.environ)  # as the command line does, before torch loads its OpenMP runtime
import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import cpu_header, positive_int  # noqa: E402

from gpt2lab import GPT, GPTConfig, generate, pages  # noqa: E402
from gpt2lab.kernels import alternated  # noqa: E402
from gpt2lab.quantize import quantize_int8  # noqa: E402

PROMPT = 16


def huge_pages_mb() -> str:
    """The process's memory in 2 MiB pages, as Linux counts it."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return f"{int(line.split()[1]) / 1024:.0f} MB"
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--int8", action="store_true", help="int8 weights (gpt2lab.quantize)")
    ap.add_argument("--rounds", type=positive_int, default=20)
    ap.add_argument("--new-tokens", type=positive_int, default=128)
    ap.add_argument("--threads", type=positive_int, default=2)
    args = ap.parse_args()
    if not pages.wanted():
        mode = pages.THP_MODE.read_text().strip() if pages.THP_MODE.exists() else "absent on this OS"
        raise SystemExit(f"nothing to compare: Backends.huge_pages acts where {pages.THP_MODE} is madvise ({mode})")
    torch.set_num_threads(args.threads)
    print(cpu_header(args.threads))
    torch.manual_seed(0)
    plain = GPT(GPTConfig()).eval()
    plain.backends = dataclasses.replace(plain.backends, huge_pages=False)
    huge = copy.deepcopy(plain)
    huge.backends = dataclasses.replace(huge.backends, huge_pages=True)
    if args.int8:
        plain, huge = quantize_int8(plain), quantize_int8(huge)
    prompt = torch.randint(0, plain.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    runs = {
        name: lambda model=model: generate(model, prompt.tolist(), args.new_tokens, temperature=0, eos_id=None)
        for name, model in (("4 KiB pages", plain), ("2 MiB pages", huge))
    }
    assert runs["4 KiB pages"]() == runs["2 MiB pages"](), "the two models gave different tokens"
    print(f"memory in 2 MiB pages: {huge_pages_mb()}")
    forward = alternated(runs, (args.rounds + 1) // 2, warmup=1)
    backward = alternated(dict(reversed(runs.items())), args.rounds // 2, warmup=0)
    times = {name: forward[name] + backward[name] for name in runs}
    kind = "int8" if args.int8 else "fp32"
    print(f"{kind} weights, greedy batch 1, {args.new_tokens} new tokens, {args.rounds} rounds in alternation")
    print("| weights in | median ms/token | range (ms/token) |\n|---|---:|---|")
    for name, values in times.items():
        ms = [1000 * v / args.new_tokens for v in values]
        print(f"| {name} | {statistics.median(ms):.2f} | {min(ms):.2f}-{max(ms):.2f} |")
    ratios = sorted(h / p for h, p in zip(times["2 MiB pages"], times["4 KiB pages"], strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    print(
        f"2 MiB / 4 KiB pages, round by round: median {statistics.median(ratios):.3f}x, quartiles {q[0]:.3f}-{q[2]:.3f}"
    )


if __name__ == "__main__":
    main()
