"""gpt2lab vs transformers on this CPU, one process, one run, one table (what `make bench` runs).

    python bench/cpu.py [--threads 2] [--only forward,train,generate,int8,compile,tokenizer] [--quick]

Both libraries get identical random GPT-2 124M weights (fp32, dropout 0) and are timed alternately
in the same run, so machine noise hits both alike. Each row also shows the fraction of the machine's
own ceiling that gpt2lab reaches (this machine's neighbours come and go, so it is measured with each
row): for compute-bound rows (forward, training), fp32 matmul GFLOP/s on a GPT-2-shaped product, the
faster of torch's MKL and oneDNN kernels; for decoding, the memory read rate (a decode step reads
every weight once: ``common.read_probe``); each timed in the same alternation as the row.
``--quick`` runs only the first benchmark's rows (forward 1x256, greedy 100 tokens at batch 1).
"""

from __future__ import annotations

import os

from gpt2lab.cli import openmp_wait_policy

openmp_wait_policy(os.environ)  # as the command line does, before torch loads its OpenMP runtime
import argparse  # noqa: E402
import copy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
from common import (  # noqa: E402
    REPEATED_WARMUP,
    cpu_header,
    decode_bytes,
    hf_and_ours,
    interleaved,
    matmul_gflops,
    matmul_probes,
    memory_read_gbs,
    names_of,
    positive_int,
    read_probe,
)

from gpt2lab.decode import faster_step  # noqa: E402
from gpt2lab.generation import generate  # noqa: E402
from gpt2lab.train import configure_optimizer, flops_per_token  # noqa: E402
from gpt2lab.train_config import OptimSection  # noqa: E402

ROWS: list[tuple[str, float, float, str, str]] = []  # name, hf, ours, ratio text, ceiling text


def row(name: str, hf: float, ours: float, higher_is_better: bool, unit: str, ceiling: str) -> None:
    ratio = ours / hf
    text = f"{ratio:.2f}x {'speed' if higher_is_better else 'time'}"
    ROWS.append((f"{name} ({unit})", hf, ours, text, ceiling))
    print(f"  {name:<34} HF {hf:10.2f}  gpt2lab {ours:10.2f} {unit:<6} {text:<12} {ceiling}", flush=True)


READ_BYTES = 512 * 2**20  # the memory read probe's matrix (common.read_probe)
PROBE_READS = 5  # reads of it per timed probe call: one call per round smooths the rate over 5 reads


def memory_probe():
    """The memory read probe as a decode row times it, once per round of its alternation."""
    read = read_probe(READ_BYTES)
    return lambda: [read() for _ in range(PROBE_READS)]


def read_share(bytes_per_step: float, steps_per_s: float, t: dict[str, float]) -> float:
    """The share of the memory read rate a decoder streams at: ``bytes_per_step`` read ``steps_per_s``
    times a second, over the rate of ``memory_probe`` timed as ``t["probe"]`` in the row's alternation."""
    return bytes_per_step * steps_per_s * t["probe"] / (READ_BYTES * PROBE_READS)


def ceiling(t: dict[str, float], probe_gflop: float) -> float:
    """GFLOP/s of the faster matmul probe timed in the same alternation as a row."""
    return probe_gflop / min(v for k, v in t.items() if k.startswith("matmul"))


def bench_forward(hf, ours, repeat: int, shapes) -> None:
    probes, probe_gflop = matmul_probes()
    for B, T in shapes:
        x = torch.randint(0, 50257, (B, T))
        with torch.no_grad():
            fns = {"hf": lambda x=x: hf(x, use_cache=False), "ours": lambda x=x: ours(x)} | probes
            t = interleaved(fns, repeat=repeat, warmup=REPEATED_WARMUP)
        peak = ceiling(t, probe_gflop)
        gflop = flops_per_token(ours.config, T) / 3 * B * T / 1e9  # forward = 2N + 4LTC per token
        frac = f"{gflop / t['ours'] / peak:.0%} of matmul"
        row(f"forward {B}x{T}", t["hf"] * 1e3, t["ours"] * 1e3, False, "ms", frac)


def bench_train(hf, ours, repeat: int) -> None:
    B, T = 4, 256
    hf, ours = copy.deepcopy(hf).train(), copy.deepcopy(ours).train()  # training changes the weights
    hf_opt, our_opt = configure_optimizer(hf, OptimSection()), configure_optimizer(ours, OptimSection())
    seq = torch.randint(0, 50257, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = seq[:, :-1], seq[:, 1:]

    def hf_step():
        hf(input_ids=x, labels=x).loss.backward()  # HF shifts the labels itself
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    def our_step():
        ours(x, y)[1].backward()
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)

    probes, probe_gflop = matmul_probes()
    t = interleaved({"hf": hf_step, "ours": our_step} | probes, repeat=repeat)
    peak = ceiling(t, probe_gflop)
    gflop = flops_per_token(ours.config, T) * B * T / 1e9
    frac = f"{gflop / t['ours'] / peak:.0%} of matmul"
    row(f"train step {B}x{T} fwd+bwd+AdamW", t["hf"], t["ours"], False, "s", frac)


def hf_greedy(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy generation of exactly n new tokens (unpadded prompt, explicit mask)."""
    return hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=50256,
    )


def bench_generate(hf, ours, cases, repeat: int) -> None:
    probe = memory_probe()
    for B, N in cases:
        prompt = torch.randint(0, 50257, (B, 16), generator=torch.Generator().manual_seed(B))

        def hf_gen(prompt=prompt, N=N):
            return hf_greedy(hf, prompt, N)

        def our_gen(prompt=prompt, N=N):
            return generate(ours, prompt.tolist(), N, temperature=0, eos_id=None)

        if B == 1 and N <= 100:
            assert hf_gen()[0, 16:].tolist() == our_gen()[0], "greedy outputs differ"
        long = N > 100  # tens of seconds per run: one timed run each is stable enough
        fns = {"hf": hf_gen, "ours": our_gen, "probe": probe}
        t = interleaved(fns, repeat=1 if long else repeat, warmup=0 if long else 1)
        tps_hf, tps = B * N / t["hf"], B * N / t["ours"]
        frac = read_share(decode_bytes(ours), N / t["ours"], t)
        row(f"greedy b={B} {N} new tokens", tps_hf, tps, True, "tok/s", f"{frac:.0%} of mem. bandwidth")


def bench_int8(hf, ours) -> None:
    from gpt2lab.quantize import quantize_int8

    q = quantize_int8(ours)
    x = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = ours(x)[0], q(x)[0]
    err = ((got - ref).abs().max() / ref.std()).item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()  # same next token as fp32
    prompt = x[:, :16]

    t = interleaved(
        {
            "hf": lambda: hf_greedy(hf, prompt, 100),
            "ours": lambda: generate(q, prompt.tolist(), 100, temperature=0, eos_id=None),
            "probe": memory_probe(),
        }
    )
    share = read_share(decode_bytes(ours, bytes_per_weight=1), 100 / t["ours"], t)
    row(
        "greedy b=1 100 tok, int8 weights (HF: fp32)",
        100 / t["hf"],
        100 / t["ours"],
        True,
        "tok/s",
        f"max logit err {err:.2f} std, top-1 same {top1:.0%}; {share:.0%} bw",
    )


NEW_PROCESS_COMPILE = """
import sys, time, torch
from gpt2lab import GPT, GPTConfig, generate
torch.set_num_threads(int(sys.argv[1]))
model = GPT(GPTConfig()).eval()  # other weights than the benchmark's: the cache keeps shapes, not weights
model.setup_cache(1, 16 + 1000, keep=True)
t0 = time.perf_counter()
generate(model, [list(range(16))], 8, temperature=0, eos_id=None, compile=True)
print(time.perf_counter() - t0)
"""


def bench_compile(hf, ours) -> None:
    """Compiled decoding against HF's, and what the compile costs: first with an empty inductor cache
    (a temporary one), then in a new process, which finds this one's compiled step in that cache
    where inductor keeps it (a step on plain weights: ``gpt2lab.decode.prepacks_weights``)."""
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(2))
    ours.setup_cache(1, 16 + 1000, keep=True)  # the kept cache the timed calls run in: compiled for below
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": cache}):
        t0 = time.perf_counter()
        generate(ours, prompt.tolist(), 8, temperature=0, eos_id=None, compile=True)
        compile_s = time.perf_counter() - t0
        child = [sys.executable, "-c", NEW_PROCESS_COMPILE, str(torch.get_num_threads())]
        again_s = float(subprocess.run(child, capture_output=True, text=True, check=True).stdout)

    def our_gen():
        return generate(ours, prompt.tolist(), 1000, temperature=0, eos_id=None, compile=True)

    fns = {"hf": lambda: hf_greedy(hf, prompt, 1000), "ours": our_gen, "probe": memory_probe()}
    t = interleaved(fns, repeat=1, warmup=0)
    row(
        "greedy b=1 1000 tok, compiled decode",
        1000 / t["hf"],
        1000 / t["ours"],
        True,
        "tok/s",
        f"compile {compile_s:.0f} s, {again_s:.0f} s in a new process; {faster_step(ours, 1)} step kept; "
        f"{read_share(decode_bytes(ours), 1000 / t['ours'], t):.0%} bw",
    )
    ours.clear_cache()


def bench_tokenizer() -> None:
    import shutil
    import tempfile
    from pathlib import Path

    from transformers import GPT2TokenizerFast

    from gpt2lab.data import stdlib_files
    from gpt2lab.tokenizer import bundled_files, load_tokenizer

    text = ""
    for path in stdlib_files():
        text += path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 4_000_000:
            break
    with tempfile.TemporaryDirectory() as d:
        encoder_json, vocab_bpe = bundled_files()
        shutil.copyfile(encoder_json, Path(d) / "vocab.json")
        shutil.copyfile(vocab_bpe, Path(d) / "merges.txt")
        hf_tok = GPT2TokenizerFast.from_pretrained(d)
    ours = load_tokenizer()
    assert hf_tok(text[:20000])["input_ids"] == ours.encode_ordinary(text[:20000])
    mb = len(text.encode()) / 1e6
    t = interleaved({"hf": lambda: hf_tok(text)["input_ids"], "ours": lambda: ours.encode_ordinary(text)}, repeat=3)
    row(f"tokenize {mb:.1f} MB of Python source", mb / t["hf"], mb / t["ours"], True, "MB/s", "one thread (tiktoken)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rows = ("forward", "train", "generate", "int8", "compile", "tokenizer")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--only", type=names_of(rows), default=set(rows), help=f"rows to run, from {','.join(rows)}")
    ap.add_argument("--quick", action="store_true", help="only forward 1x256 and greedy 100 tokens at batch 1")
    ap.add_argument("--repeat", type=positive_int, default=5, help="timed repetitions of the short benchmarks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = {"forward", "generate"} if args.quick else args.only
    print(cpu_header(args.threads), flush=True)
    print(
        f"fp32; ceilings timed with each row, at the start: "
        f"matmul {matmul_gflops():.0f} GFLOP/s (1024x768 by a 3072x768 weight, best of MKL and oneDNN), memory read {memory_read_gbs():.1f} GB/s now (best of a sum and the one-row products of MKL and oneDNN)",
        flush=True,
    )
    hf, ours = hf_and_ours()
    hf.eval(), ours.eval()
    if "forward" in only:
        bench_forward(hf, ours, args.repeat, [(1, 256)] if args.quick else [(1, 256), (8, 256)])
    if "train" in only:
        bench_train(hf, ours, max(2, args.repeat // 2))
    if "generate" in only:
        cases = [(1, 100)] if args.quick else [(1, 100), (1, 1000), (8, 100), (8, 1000)]
        bench_generate(hf, ours, cases, repeat=5)
    if "int8" in only:
        bench_int8(hf, ours)
    if "compile" in only:
        bench_compile(hf, ours)
    if "tokenizer" in only:
        bench_tokenizer()
    print("\n| benchmark | HF | gpt2lab | gpt2lab vs HF | of the machine's ceiling |\n|---|---:|---:|---:|---|")
    for name, h, o, ratio, ceiling in ROWS:
        print(f"| {name} | {h:.2f} | {o:.2f} | {ratio} | {ceiling} |")


if __name__ == "__main__":
    main()
