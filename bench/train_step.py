"""Training step time: gpt2lab vs transformers GPT2LMHeadModel, identical random 124M weights, CPU fp32.

    python bench/train_step.py [--threads 2] [--repeat 3]

One step = forward + backward + AdamW on a batch of 4 x 256 tokens, dropout 0 in both models, the
same AdamW (gpt2lab's parameter groups: decay on matrices only) for both. The two are timed in the
same run, alternating, and the ratio printed. Each is also put against the machine's fp32 matmul
throughput, measured in the same alternation on a GPT-2-shaped product (1024 x 768 @ 768 x 3072, the
MLP's c_fc at 1024 tokens), counting 6 N + 12 L T C FLOPs per token (gpt2lab.train.flops_per_token).
"""

from __future__ import annotations

import argparse

import torch
from common import hf_and_ours, interleaved

from gpt2lab.config import TrainConfig
from gpt2lab.train import configure_optimizer, flops_per_token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="timed steps per model (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf, ours = hf_and_ours(dropout=0.0)
    hf.train(), ours.train()
    optim = TrainConfig().optim
    cpu = torch.device("cpu")
    hf_opt, our_opt = configure_optimizer(hf, optim, cpu), configure_optimizer(ours, optim, cpu)
    seq = torch.randint(0, 50257, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = seq[:, :-1], seq[:, 1:]

    def hf_step():
        loss = hf(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    def our_step():
        _, loss = ours(x, y)
        loss.backward()
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)

    a, b = torch.randn(1024, 768), torch.randn(768, 3072)
    n_matmul = 20

    def matmuls():
        for _ in range(n_matmul):
            a @ b

    times = interleaved({"hf": hf_step, "ours": our_step, "matmul": matmuls}, repeat=args.repeat, warmup=1)
    peak = n_matmul * 2 * 1024 * 768 * 3072 / times["matmul"] / 1e9
    gflop = flops_per_token(ours.config, args.seq) * args.batch * args.seq / 1e9
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, GPT-2 124M, batch {args.batch}x{args.seq}, "
        f"fwd + bwd + AdamW, median of {args.repeat}"
    )
    print(f"machine: fp32 matmul {peak:.0f} GFLOP/s (1024x768 @ 768x3072); one step = {gflop:.0f} GFLOP")
    print(f"{'model':<10} {'step (s)':>9} {'GFLOP/s':>9} {'of matmul':>10}")
    for name, key in (("HF", "hf"), ("gpt2lab", "ours")):
        achieved = gflop / times[key]
        print(f"{name:<10} {times[key]:9.2f} {achieved:9.1f} {achieved / peak:9.1%}")
    print(f"gpt2lab / HF step time: {times['ours'] / times['hf']:.3f}x")


if __name__ == "__main__":
    main()
