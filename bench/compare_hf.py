"""gpt2lab vs transformers GPT2LMHeadModel, identical random 124M weights, CPU fp32.

    python bench/compare_hf.py [--threads 2]

Forward 1x256 (no grad) and greedy generation of 100 tokens from a 16-token prompt; both measured in
the same run, alternating, with the ratio printed.
"""

from __future__ import annotations

import argparse

import torch
from common import hf_and_ours, interleaved

from gpt2lab.generate import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf, ours = hf_and_ours()
    hf.eval(), ours.eval()
    x = torch.randint(0, 50257, (1, 256))
    prompt = torch.randint(0, 50257, (1, 16))

    @torch.no_grad()
    def hf_forward():
        return hf(x).logits

    @torch.no_grad()
    def our_forward():
        return ours(x)[0]

    def hf_generate():
        return hf.generate(prompt, max_new_tokens=100, min_new_tokens=100, do_sample=False, pad_token_id=50256)

    def our_generate():
        return generate(ours, prompt.tolist(), 100, temperature=0, eos_id=None)

    assert hf_generate()[0, 16:].tolist() == our_generate()[0], "greedy outputs differ"
    fwd = interleaved({"hf": hf_forward, "ours": our_forward}, repeat=args.repeat)
    gen = interleaved({"hf": hf_generate, "ours": our_generate}, repeat=max(3, args.repeat // 2))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, 124M random weights")
    print(f"{'benchmark':<28} {'HF':>10} {'gpt2lab':>10} {'ratio':>8}")
    print(
        f"{'forward 1x256 (ms)':<28} {fwd['hf'] * 1e3:10.1f} {fwd['ours'] * 1e3:10.1f} {fwd['ours'] / fwd['hf']:7.2f}x time"
    )
    hf_tps, our_tps = 100 / gen["hf"], 100 / gen["ours"]
    print(f"{'greedy 100 tok (tok/s)':<28} {hf_tps:10.1f} {our_tps:10.1f} {our_tps / hf_tps:7.2f}x speed")


if __name__ == "__main__":
    main()
