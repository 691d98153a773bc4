"""MKL (F.linear) vs oneDNN (gpt2lab.ops.linear) on every GPT-2 124M linear shape, fp32, this CPU.

    python bench/linear.py [--threads 2] [--repeat 5]

What ``Backends(linear="auto")`` measures for itself (gpt2lab.kernels), at more length, and its
choices on this machine at the end. For batch-1 rows (decoding) the figure is GB/s of weight
read, over a stack of distinct weights larger than the caches (as in a real decode step); for the
others it is GFLOP/s. Forward products, then the two backward products of the lm_head (oneDNN's
grad @ W needs W transposed into a copy, which is counted). Both kernels are timed alternately; the
ratio is oneDNN's speed over MKL's. Last, oneDNN alone at 1 and 8 rows on each weight as stored
(out, in) against an (in, out)-contiguous copy of it: GPT's batch-1 decoding reads its lm_head from
such a copy.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import interleaved, positive_int

from gpt2lab import kernels, ops

SHAPES = {  # name: (in, out)
    "attn.c_attn": (768, 2304),
    "attn.c_proj": (768, 768),
    "mlp.c_fc": (768, 3072),
    "mlp.c_proj": (3072, 768),
    "lm_head": (768, 50257),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--repeat", type=positive_int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not ops.onednn_available():
        raise SystemExit("this PyTorch build has no oneDNN: gpt2lab uses F.linear everywhere")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32\n")
    print("| product | tokens | MKL | oneDNN | oneDNN / MKL |\n|---|---:|---:|---:|---:|")
    for tokens in (1, 256, 1024):
        for name, (k, n) in SHAPES.items():
            weights = distinct_weights(k, n) if tokens == 1 else [torch.randn(n, k) * 0.02]
            count = len(weights)
            x = torch.randn(tokens, k)
            t = interleaved(
                {
                    "mkl": lambda x=x, ws=weights: [F.linear(x, w) for w in ws],
                    "onednn": lambda x=x, ws=weights: [ops.linear(x, w) for w in ws],
                },
                repeat=args.repeat,
            )
            if tokens == 1:
                work, unit = count * 4 * k * n / 1e9, "GB/s"
            else:
                work, unit = count * 2 * tokens * k * n / 1e9, "GFLOP/s"
            print(
                f"| {name} {k}x{n} | {tokens} | {work / t['mkl']:.1f} {unit} | {work / t['onednn']:.1f} {unit} "
                f"| {t['mkl'] / t['onednn']:.2f}x |",
                flush=True,
            )
    for tokens in (256, 1024):  # the lm_head's backward products, which ops.Linear leaves to MKL
        backward_rows(*SHAPES["lm_head"], tokens, args.repeat)
    print(
        "\n| product (oneDNN) | tokens | (out, in) weight | (in, out) copy | copy / weight |\n|---|---:|---:|---:|---:|"
    )
    for tokens in (1, 8):  # the weight layout at one row: GPT's batch-1 decode reads the lm_head from a copy
        for name, (k, n) in SHAPES.items():
            layout_row(name, k, n, tokens, args.repeat)
    table = kernels.KernelTable()
    print(f"\nBackends(linear='auto') on {kernels.machine_key()} ({table.file()}):\n")
    print("| product | 1 row | 8 rows | 256 rows |\n|---|---|---|---|")
    for name, (k, n) in SHAPES.items():
        print(f"| {name} {k}x{n} | " + " | ".join(table.choose(n, k, rows) for rows in (1, 8, 256)) + " |")


def distinct_weights(k: int, n: int) -> list[torch.Tensor]:
    """(n, k) weights, about 400 MB of them: a one-row product reads each once, as a decode step does,
    so they must come from memory, not from the caches."""
    return [torch.randn(n, k) * 0.02 for _ in range(max(1, 400_000_000 // (4 * k * n)))]


def layout_row(name: str, k: int, n: int, tokens: int, repeat: int) -> None:
    """oneDNN's speed on the stored (out, in) weight against a view of an (in, out)-contiguous copy."""
    weights = distinct_weights(k, n)
    count = len(weights)
    copies = [w.t().contiguous().t() for w in weights]
    x = torch.randn(tokens, k)
    t = interleaved(
        {
            "weight": lambda: [ops.linear(x, w) for w in weights],
            "copy": lambda: [ops.linear(x, w) for w in copies],
        },
        repeat=repeat,
    )
    gb = count * 4 * k * n / 1e9
    print(
        f"| {name} {k}x{n} | {tokens} | {gb / t['weight']:.1f} GB/s | {gb / t['copy']:.1f} GB/s "
        f"| {t['weight'] / t['copy']:.2f}x |",
        flush=True,
    )


def backward_rows(k: int, n: int, tokens: int, repeat: int) -> None:
    w, x, grad = torch.randn(n, k), torch.randn(tokens, k), torch.randn(tokens, n)
    gflop = 2 * tokens * k * n / 1e9
    products = {
        "grad @ W": (lambda: grad @ w, lambda: ops._onednn(grad, w.t().contiguous(), None, "none", [], "")),
        "grad^T @ x": (lambda: grad.t() @ x, lambda: ops._onednn(grad.t(), x.t(), None, "none", [], "")),
    }
    for name, (mkl, onednn) in products.items():
        t = interleaved({"mkl": mkl, "onednn": onednn}, repeat=repeat)
        print(
            f"| lm_head backward {name} | {tokens} | {gflop / t['mkl']:.1f} GFLOP/s "
            f"| {gflop / t['onednn']:.1f} GFLOP/s | {t['mkl'] / t['onednn']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
