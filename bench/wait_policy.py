"""How OpenMP threads should wait during decoding: spinning briefly (the runtime's default) against
sleeping (OMP_WAIT_POLICY=PASSIVE), on an idle CPU and on one that another program keeps busy.

    python bench/wait_policy.py [--rounds 4] [--tokens 128] [--threads 2]

Each measurement is a fresh process (the policy is read once, when torch loads its OpenMP runtime)
that builds a random GPT-2 124M, converts it to int8 (the decode whose products are shortest, so the
policy matters most) and times greedy decoding of ``--tokens`` tokens after a warm-up; the two
policies alternate, ``--rounds`` times each. The busy case runs one busy-looping process beside it.
This is the measurement behind gpt2lab.cli.openmp_wait_policy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = """
import sys, time, torch
from gpt2lab import GPT, GPTConfig, generate
from gpt2lab.quantize import quantize_int8
torch.set_num_threads({threads}); torch.manual_seed(0)
model = quantize_int8(GPT(GPTConfig()).eval())
prompt = [list(range(16))]
generate(model, prompt, 8, temperature=0, eos_id=None)
start = time.perf_counter()
generate(model, prompt, {tokens}, temperature=0, eos_id=None)
print({tokens} / (time.perf_counter() - start))
"""

POLICIES = {"spin (default)": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}


def tokens_per_s(policy: dict, tokens: int, threads: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | policy
    code = CHILD.format(tokens=tokens, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print("| CPU | OpenMP wait | int8 greedy b=1 tok/s, median (range) |\n|---|---|---|")
    for load in ("idle", "one busy process beside it"):
        busy = None if load == "idle" else subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            runs: dict[str, list[float]] = {name: [] for name in POLICIES}
            for _ in range(args.rounds):
                for name, policy in POLICIES.items():
                    runs[name].append(tokens_per_s(policy, args.tokens, args.threads))
        finally:
            if busy is not None:
                busy.kill()
        for name, speeds in runs.items():
            print(
                f"| {load} | {name} | {statistics.median(speeds):.1f} ({min(speeds):.1f}-{max(speeds):.1f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
